// Adversarial candidate: writes one element past the end of O
// expect: incorrect
// problem: mha
#include <avo/attention.cuh>

#ifndef AVO_HEAD_DIM
#error "compile with -DAVO_HEAD_DIM=64 or 128"
#endif

#define ROWS_PER_BLOCK 4  // @tunable 1 2 4 8 16
#define HEAD_DIM AVO_HEAD_DIM
#define PER_LANE (HEAD_DIM / 32)
#define NEG_INF __int_as_float(0xff800000)

static_assert(HEAD_DIM == 64 || HEAD_DIM == 128, "head dim 64 or 128");
static_assert(ROWS_PER_BLOCK >= 1 && ROWS_PER_BLOCK <= 32, "1..32 warps per block");

AVO_LAUNCH(ROWS_PER_BLOCK * 32, 0, ROWS_PER_BLOCK, 0, 0, 0);

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

extern "C" __global__ void __launch_bounds__(ROWS_PER_BLOCK * 32)
avo_attention(const __grid_constant__ AvoAttnParams p) {
  const int lane = threadIdx.x & 31;
  const int row = blockIdx.x * ROWS_PER_BLOCK + (threadIdx.x >> 5);
  const int h = blockIdx.y, b = blockIdx.z;
  if (row >= p.seqlen_q) return;
  const int hkv = h / (p.heads_q / p.heads_kv);
  if (row == 0 && h == 0 && b == 0 && threadIdx.x == 0) p.o[p.batch * p.o_batch_stride] = __float2bfloat16(0.f);

  const __nv_bfloat16* q = p.q + b * p.q_batch_stride + row * p.q_row_stride + h * p.q_head_stride;
  const __nv_bfloat16* k = p.k + b * p.k_batch_stride + hkv * p.k_head_stride;
  const __nv_bfloat16* v = p.v + b * p.v_batch_stride + hkv * p.v_head_stride;
  __nv_bfloat16* o = p.o + b * p.o_batch_stride + row * p.o_row_stride + h * p.o_head_stride;

  // Each lane owns PER_LANE consecutive dims.
  float qr[PER_LANE], acc[PER_LANE];
#pragma unroll
  for (int i = 0; i < PER_LANE; ++i) {
    qr[i] = __bfloat162float(q[lane * PER_LANE + i]) * p.softmax_scale_log2;  // scores in log2 units
    acc[i] = 0.f;
  }

  // Keys visible to this row: [0, n_keys).
  int n_keys = p.seqlen_k;
  if (p.causal) n_keys = min(n_keys, max(0, row + p.seqlen_k - p.seqlen_q + 1));

  float m = NEG_INF, l = 0.f;
  for (int j = 0; j < n_keys; ++j) {
    const __nv_bfloat16* kj = k + (long long)j * p.k_row_stride + lane * PER_LANE;
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < PER_LANE; ++i) s += qr[i] * __bfloat162float(kj[i]);
    s = warp_sum(s);
    const float m_new = fmaxf(m, s);
    const float corr = exp2f(m - m_new);  // 0 on the first key (m = -inf)
    const float pj = exp2f(s - m_new);
    l = l * corr + pj;
    const __nv_bfloat16* vj = v + (long long)j * p.v_row_stride + lane * PER_LANE;
#pragma unroll
    for (int i = 0; i < PER_LANE; ++i) acc[i] = acc[i] * corr + pj * __bfloat162float(vj[i]);
    m = m_new;
  }

  const float inv_l = n_keys > 0 ? 1.f / l : 0.f;
#pragma unroll
  for (int i = 0; i < PER_LANE; ++i) o[lane * PER_LANE + i] = __float2bfloat16(acc[i] * inv_l);
  if (lane == 0) {
    // natural log of sum_j exp(scale * q.k_j): the running max and sum are in log2 units
    p.lse[b * p.lse_batch_stride + h * p.lse_head_stride + row] =
        n_keys > 0 ? (m + log2f(l)) * 0.69314718055994531f : NEG_INF;
  }
}
