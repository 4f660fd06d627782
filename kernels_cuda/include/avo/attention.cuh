// The AVO attention kernel contract (see kernels_cuda/CONTRACT.md).
// The harness fills AvoAttnParams on the host with the same layout; change
// both together and bump AVO_ABI_VERSION.
#pragma once
#include <cuda_bf16.h>

#define AVO_ABI_VERSION 1

// Opaque 128-byte TMA descriptor (CUtensorMap); cuda.h is not available to NVRTC.
struct alignas(64) AvoTensorMap {
  unsigned long long opaque[16];
};

struct AvoAttnParams {
  // TMA descriptors over the 4-D views (D, S, H, B) of Q, K, V, O with a
  // 128-byte swizzle and box (64, rows, 1, 1). Only encoded when the kernel's
  // avo_launch asks for TMA (rows > 0); otherwise zero.
  AvoTensorMap tma_q, tma_k, tma_v, tma_o;

  const __nv_bfloat16* q;  // (B, Sq, Hq, D)
  const __nv_bfloat16* k;  // (B, Sk, Hkv, D)
  const __nv_bfloat16* v;  // (B, Sk, Hkv, D)
  __nv_bfloat16* o;        // (B, Sq, Hq, D)
  float* lse;              // (B, Hq, Sq), natural log of the softmax denominator

  // Strides in elements; the last dimension (D) is always contiguous.
  long long q_batch_stride, q_row_stride, q_head_stride;
  long long k_batch_stride, k_row_stride, k_head_stride;
  long long v_batch_stride, v_row_stride, v_head_stride;
  long long o_batch_stride, o_row_stride, o_head_stride;
  long long lse_batch_stride, lse_head_stride;  // row stride is 1

  int batch, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim;
  float softmax_scale;       // usually 1/sqrt(head_dim)
  float softmax_scale_log2;  // softmax_scale * log2(e)
  int causal;                // key j visible to query i iff j <= i + seqlen_k - seqlen_q
  int num_sms;               // multiprocessors on the device
  int* tile_counter;         // zeroed before every launch; for dynamic persistent schedulers
};

// Launch geometry, read by the harness from the compiled module. Each kernel
// defines it once, e.g.
//   AVO_LAUNCH(NUM_THREADS, SMEM_BYTES, BLOCK_M, 0, 0, 0);
// fields: threads per block, dynamic shared memory bytes, query rows per tile,
// persistent CTAs per SM (0 = grid of (ceil(Sq/block_m), Hq, B)), TMA box rows
// for Q and for K/V (0 = no tensor maps).
#define AVO_LAUNCH(threads, smem, block_m, persistent, tma_rows_q, tma_rows_kv) \
  extern "C" __device__ const int avo_launch[8] = {                            \
      (threads), (smem), (block_m), (persistent), (tma_rows_q), (tma_rows_kv), \
      1, AVO_ABI_VERSION}

// The entry point every kernel defines:
//   extern "C" __global__ void avo_attention(const __grid_constant__ AvoAttnParams p);
