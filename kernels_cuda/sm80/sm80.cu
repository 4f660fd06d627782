// sm80: FlashAttention-2 style forward attention (BF16 in/out, FP32 accumulation).
//
// One CTA computes BLOCK_M query rows of one (batch, head). Each warp owns 16 * WARP_M_FRAGS
// rows; its Q fragments stay in registers (Q_IN_REGS) or are re-read from shared memory per tile.
// K/V tiles of BLOCK_N keys stream through a STAGES-deep cp.async ring in XOR-swizzled shared
// memory; S = Q K^T and O += P V run on mma.sync m16n8k16 (BF16 -> FP32) with operands from
// ldmatrix (.trans for V).
// Online softmax in log2 units (exp2 with softmax_scale_log2); the row sum is kept per thread
// and reduced across the quad only once, at the end. KV tiles are visited last to first, so the
// few tiles that need a mask (causal diagonal, ragged end of K) come first and the rest run
// the unmasked path. Causal tiles above the diagonal are never loaded, and causal query tiles
// start heaviest first.
#include <avo/attention.cuh>

#ifndef AVO_HEAD_DIM
#error "compile with -DAVO_HEAD_DIM=64 or 128"
#endif
#define HEAD_DIM AVO_HEAD_DIM

// Every warp reads the whole K and V tile from shared memory, so shared-memory traffic per MMA
// halves with 32 rows per warp (WARP_M_FRAGS 2) instead of 16; on H100 that was worth +20% at
// d128. 32 rows leave no registers for Q at d128 (O 128 + S 64 + Q 64 > 255), hence Q_IN_REGS 0
// there; at d64 Q_IN_REGS 1 measured +3%. STAGES 3 at d128 costs the second CTA per SM (smem):
// -15%. See kernels_cuda/NOTES.md (sm80) for the measurements behind each default.
#define NUM_WARPS 4     // @tunable 4 8
#define WARP_M_FRAGS 2  // @tunable 1 2
#define Q_IN_REGS 0     // @tunable 0 1
#define BLOCK_N 64      // @tunable 32 64 128
#define STAGES 2        // @tunable 2 3

#define BLOCK_M (NUM_WARPS * 16 * WARP_M_FRAGS)
#define NUM_THREADS (NUM_WARPS * 32)
#define CHUNKS (HEAD_DIM / 8)  // 16-byte chunks per row
#define TILE_BYTES (BLOCK_N * HEAD_DIM * 2)
#define Q_BYTES (BLOCK_M * HEAD_DIM * 2)
#define SMEM_BYTES (Q_BYTES + STAGES * 2 * TILE_BYTES)

static_assert(HEAD_DIM == 64 || HEAD_DIM == 128, "head dim 64 or 128");
static_assert(BLOCK_N % 16 == 0, "BLOCK_N must be a multiple of 16 (one mma k-step of P V)");
static_assert(STAGES >= 2, "at least double buffering");
static_assert(NUM_THREADS % CHUNKS == 0 && BLOCK_N % (NUM_THREADS / CHUNKS) == 0,
              "a K/V tile must be whole passes of NUM_THREADS 16-byte copies");
static_assert(BLOCK_M % (NUM_THREADS / CHUNKS) == 0, "a Q tile must be whole passes of NUM_THREADS 16-byte copies");
static_assert(SMEM_BYTES <= 227 * 1024, "shared memory over the per-block limit");
// Live FP32/BF16x2 registers per thread: O (HEAD_DIM/2) + S (BLOCK_N/2) + Q (HEAD_DIM/4, if held in
// registers) per 16-row fragment. Past ~208 ptxas spills inside the MMA loop (d128, 2 fragments,
// Q in registers, BLOCK_N 32: 92 bytes). At 192 (the d128 default) ptxas still spills ~250 bytes
// (loop-invariant addresses, the row sums: ~a dozen local accesses per tile), measured cheaper
// than the spill-free BLOCK_N 32.
static_assert(WARP_M_FRAGS * (HEAD_DIM / 2 + BLOCK_N / 2 + Q_IN_REGS * HEAD_DIM / 4) <= 208,
              "accumulators + Q fragments would not fit in 255 registers: fewer WARP_M_FRAGS or smaller BLOCK_N");

AVO_LAUNCH(NUM_THREADS, SMEM_BYTES, BLOCK_M, 0, 0, 0);

#define NEG_INF __int_as_float(0xff800000)

// ---- PTX wrappers ---------------------------------------------------------------------------
__device__ __forceinline__ unsigned smem_u32(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// 16-byte async copy; src_bytes = 0 zero-fills (rows past the end of Q/K/V: zero V keeps 0*NaN out of O).
__device__ __forceinline__ void cp_async16(unsigned dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

__device__ __forceinline__ void ldsm_x4(unsigned addr, unsigned (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_t(unsigned addr, unsigned (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

// D = A(16x16, row) * B(16x8, col) + D, BF16 inputs, FP32 accumulators.
__device__ __forceinline__ void mma_bf16(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
               "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ unsigned pack_bf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<unsigned*>(&v);
}

// Byte offset of 16-byte chunk `c` of row `r` in a [rows][HEAD_DIM] BF16 tile. XOR-ing the chunk
// with (r & 7) spreads the 8 rows an ldmatrix phase reads over all 32 banks (rows are 128 or
// 256 bytes long, so unswizzled they would all hit the same banks).
__device__ __forceinline__ unsigned swz(int r, int c) { return (r * CHUNKS + (c ^ (r & 7))) * 16; }

// ldmatrix addressing without per-load XOR: a lane reads row r (r & 7 == x) and chunk 2*kk + c0
// for k-step kk. Since (2*kk + c0) ^ x == (2*kk & ~7) + ((2*kk & 7) ^ c0 ^ x), the lane-dependent
// part takes only 4 values; precompute them (offs[i] for kk % 4 == i) and add the constant part.
__device__ __forceinline__ void lane_offsets(int r, int c0, unsigned (&offs)[4]) {
#pragma unroll
  for (int i = 0; i < 4; ++i) offs[i] = (r * CHUNKS + ((2 * i) ^ c0 ^ (r & 7))) * 16;
}
#define KSTEP_OFF(offs, kk) ((offs)[(kk) & 3] + ((kk) >> 2) * 128)

// Issue cp.async for rows [row0, row0 + ROWS) of a (S, D) slice with `stride` elements per row.
template <int ROWS>
__device__ __forceinline__ void load_tile(unsigned dst, const __nv_bfloat16* src, long long stride, int row0,
                                          int nrows, int tid) {
  // A pass of NUM_THREADS copies covers ROWS_PER_PASS whole rows; one pointer walks down the rows
  // (few live registers: the loop sits in the middle of the MMA loop's register budget).
  constexpr int ROWS_PER_PASS = NUM_THREADS / CHUNKS;
  const int r0 = tid / CHUNKS, c = tid % CHUNKS;
  const __nv_bfloat16* g = src + (long long)(row0 + r0) * stride + c * 8;
#pragma unroll
  for (int i = 0; i < ROWS / ROWS_PER_PASS; ++i) {
    const int r = r0 + i * ROWS_PER_PASS;
    const bool in = row0 + r < nrows;
    cp_async16(dst + swz(r, c), in ? g : src, in ? 16 : 0);
    g += ROWS_PER_PASS * stride;
  }
}

// ---- one KV tile: S = Q K^T, online softmax, O += P V -----------------------------------------
// The A operand of S = Q K^T. Held in registers for the whole kernel when Q_IN_REGS; otherwise
// re-read from shared memory every tile (FlashAttention-2's choice for d128 with 32 rows per warp,
// where O + S + Q fragments would exceed 255 registers; the extra ldmatrix traffic is small
// next to K and V, which every warp reads in full).
struct QOperand {
#if Q_IN_REGS
  unsigned frag[WARP_M_FRAGS][HEAD_DIM / 16][4];
#else
  unsigned base;  // this warp's first Q row; fragment f is 16 f rows further (same swizzle phase)
#endif
  __device__ __forceinline__ void get(int f, int kk, const unsigned (&offs)[4], unsigned (&a)[4]) const {
#if Q_IN_REGS
    a[0] = frag[f][kk][0], a[1] = frag[f][kk][1], a[2] = frag[f][kk][2], a[3] = frag[f][kk][3];
#else
    ldsm_x4(base + f * 16 * CHUNKS * 16 + KSTEP_OFF(offs, kk), a);
#endif
  }
};

struct RowState {
  float o[WARP_M_FRAGS][HEAD_DIM / 8][4];  // O accumulators (C fragments, 8 dims per n-tile)
  float m[WARP_M_FRAGS][2];                // running max of raw scores, rows g and g + 8
  float l[WARP_M_FRAGS][2];                // running sum of this thread's exp2 terms (quad-reduced at the end)
};

// MASK: apply the causal / end-of-K mask (only the diagonal and ragged tiles need it).
// row0: this thread's first query row (g), for frag f the rows are row0 + 16 f + {0, 8}.
template <bool MASK>
__device__ __forceinline__ void attend_tile(const QOperand& q, RowState& st,
                                            unsigned k_base, unsigned v_base, const unsigned (&offs)[4],
                                            const unsigned (&k_offs)[4],
                                            int n0, int row0, int seqlen_k,
                                            int causal_shift, bool causal, float scale_log2, int lane) {
  float s[WARP_M_FRAGS][BLOCK_N / 8][4];
#pragma unroll
  for (int f = 0; f < WARP_M_FRAGS; ++f)
#pragma unroll
    for (int j = 0; j < BLOCK_N / 8; ++j) s[f][j][0] = s[f][j][1] = s[f][j][2] = s[f][j][3] = 0.f;

  // S = Q K^T: one ldmatrix.x4 gives the B fragments of 16 keys x 16 dims, as matrices
  // (keys 0-7, dims 0-7), (keys 0-7, dims 8-15), (keys 8-15, dims 0-7), (keys 8-15, dims 8-15):
  // each MMA's B pair is then two adjacent ldmatrix outputs. The (0-7|8-15 keys, 0-7 dims) order
  // that would share Q's and V's lane offsets needs register shuffles for every MMA and measured
  // 10% slower at d128 (6% at d64).
#pragma unroll
  for (int kk = 0; kk < HEAD_DIM / 16; ++kk) {
    unsigned a[WARP_M_FRAGS][4];
#pragma unroll
    for (int f = 0; f < WARP_M_FRAGS; ++f) q.get(f, kk, offs, a[f]);
#pragma unroll
    for (int nn = 0; nn < BLOCK_N / 16; ++nn) {
      unsigned b[4];
      ldsm_x4(k_base + KSTEP_OFF(k_offs, kk) + nn * 16 * CHUNKS * 16, b);
#pragma unroll
      for (int f = 0; f < WARP_M_FRAGS; ++f) {
        mma_bf16(s[f][2 * nn], a[f], b[0], b[1]);
        mma_bf16(s[f][2 * nn + 1], a[f], b[2], b[3]);
      }
    }
  }

  if (MASK) {
    // key j is visible to query i iff j < seqlen_k and (!causal or j <= i + causal_shift)
#pragma unroll
    for (int f = 0; f < WARP_M_FRAGS; ++f)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = row0 + 16 * f + 8 * h;
        const int lim = causal ? min(seqlen_k, row + causal_shift + 1) : seqlen_k;
#pragma unroll
        for (int j = 0; j < BLOCK_N / 8; ++j)
#pragma unroll
          for (int e = 0; e < 2; ++e)
            if (n0 + j * 8 + 2 * (lane & 3) + e >= lim) s[f][j][2 * h + e] = NEG_INF;
      }
  }

  // Online softmax. The 4 threads of a quad share a row: reduce the max with two shuffles.
  // P goes to BF16 pairs as soon as it exists, halving the registers S holds through P V.
  unsigned pk[WARP_M_FRAGS][BLOCK_N / 8][2];
#pragma unroll
  for (int f = 0; f < WARP_M_FRAGS; ++f)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float mx = st.m[f][h];
#pragma unroll
      for (int j = 0; j < BLOCK_N / 8; ++j) mx = fmaxf(mx, fmaxf(s[f][j][2 * h], s[f][j][2 * h + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      // A row with nothing visible yet keeps max -inf; subtract 0 instead so exp2 gives 0, not NaN.
      const float m_sub = (mx == NEG_INF ? 0.f : mx) * scale_log2;
      const float corr = fast_exp2(st.m[f][h] * scale_log2 - m_sub);
      st.m[f][h] = mx;
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < BLOCK_N / 8; ++j) {
        const float p0 = fast_exp2(fmaf(s[f][j][2 * h], scale_log2, -m_sub));
        const float p1 = fast_exp2(fmaf(s[f][j][2 * h + 1], scale_log2, -m_sub));
        sum += p0 + p1;
        pk[f][j][h] = pack_bf16(p0, p1);
      }
      st.l[f][h] = st.l[f][h] * corr + sum;
#pragma unroll
      for (int d = 0; d < HEAD_DIM / 8; ++d) {
        st.o[f][d][2 * h] *= corr;
        st.o[f][d][2 * h + 1] *= corr;
      }
    }

  // O += P V. The C fragments of two adjacent S n-tiles are exactly the A fragment of one
  // 16-key k-step, so P never leaves registers. ldmatrix.trans turns row-major V into B fragments.
#pragma unroll
  for (int kk = 0; kk < BLOCK_N / 16; ++kk) {
    unsigned a[WARP_M_FRAGS][4];
#pragma unroll
    for (int f = 0; f < WARP_M_FRAGS; ++f) {
      a[f][0] = pk[f][2 * kk][0];
      a[f][1] = pk[f][2 * kk][1];
      a[f][2] = pk[f][2 * kk + 1][0];
      a[f][3] = pk[f][2 * kk + 1][1];
    }
#pragma unroll
    for (int dd = 0; dd < HEAD_DIM / 16; ++dd) {
      unsigned b[4];
      ldsm_x4_t(v_base + KSTEP_OFF(offs, dd) + kk * 16 * CHUNKS * 16, b);
#pragma unroll
      for (int f = 0; f < WARP_M_FRAGS; ++f) {
        mma_bf16(st.o[f][2 * dd], a[f], b[0], b[1]);
        mma_bf16(st.o[f][2 * dd + 1], a[f], b[2], b[3]);
      }
    }
  }
}

extern "C" __global__ void __launch_bounds__(NUM_THREADS, 1) avo_attention(const __grid_constant__ AvoAttnParams p) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int h = blockIdx.y, b = blockIdx.z;
  // Causal: the last query tiles see the most keys; start them first so the short ones fill the tail.
  const int m_block = p.causal ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
  const int m0 = m_block * BLOCK_M;
  const int hkv = h / (p.heads_q / p.heads_kv);
  const int seqlen_q = p.seqlen_q, seqlen_k = p.seqlen_k;
  const int causal_shift = seqlen_k - seqlen_q;  // key j visible to row i iff j <= i + causal_shift

  const __nv_bfloat16* qg = p.q + b * p.q_batch_stride + h * p.q_head_stride;
  const __nv_bfloat16* kg = p.k + b * p.k_batch_stride + hkv * p.k_head_stride;
  const __nv_bfloat16* vg = p.v + b * p.v_batch_stride + hkv * p.v_head_stride;

  const unsigned q_smem = smem_u32(smem);
  const unsigned kv_smem = q_smem + Q_BYTES;  // stage s: K at kv_smem + 2 s TILE_BYTES, V right after

  // KV tiles this query tile needs: causal stops at the last key the last row sees.
  const int n_end = p.causal ? min(seqlen_k, m0 + BLOCK_M + causal_shift) : seqlen_k;
  const int n_tiles = n_end > 0 ? (n_end + BLOCK_N - 1) / BLOCK_N : 0;

  load_tile<BLOCK_M>(q_smem, qg, p.q_row_stride, m0, seqlen_q, tid);
  cp_async_commit();
  // Prologue: the first STAGES-1 tiles (visited from the last tile backwards).
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < n_tiles) {
      const int n0 = (n_tiles - 1 - s) * BLOCK_N;
      load_tile<BLOCK_N>(kv_smem + 2 * s * TILE_BYTES, kg, p.k_row_stride, n0, seqlen_k, tid);
      load_tile<BLOCK_N>(kv_smem + (2 * s + 1) * TILE_BYTES, vg, p.v_row_stride, n0, seqlen_k, tid);
    }
    cp_async_commit();  // empty groups keep the wait_group arithmetic uniform
  }

  // Q (A operand, row-major): lanes 0-15 address rows, lanes 16-31 the upper 8 dims of each k-step.
  const int warp_row = warp * 16 * WARP_M_FRAGS;
  // Q (A operand) and V (B operand, .trans) ldmatrix.x4 read a 16-row x 16-column block with
  // lanes 0-15 addressing rows 0-15 at columns 0-7 and lanes 16-31 the same rows at columns 8-15.
  unsigned offs[4];
  lane_offsets(lane & 15, lane >> 4, offs);
  // K: lanes 0-7 keys 0-7 dims 0-7, lanes 8-15 keys 0-7 dims 8-15, lanes 16-31 keys 8-15 likewise.
  unsigned k_offs[4];
  lane_offsets((lane & 7) + ((lane >> 4) << 3), (lane >> 3) & 1, k_offs);
  const unsigned q_warp = q_smem + warp_row * CHUNKS * 16;
  QOperand q;
#if Q_IN_REGS
  cp_async_wait<STAGES - 1>();
  __syncthreads();
#pragma unroll
  for (int f = 0; f < WARP_M_FRAGS; ++f)
#pragma unroll
    for (int kk = 0; kk < HEAD_DIM / 16; ++kk) ldsm_x4(q_warp + f * 16 * CHUNKS * 16 + KSTEP_OFF(offs, kk), q.frag[f][kk]);
#else
  q.base = q_warp;  // the first wait + barrier of the main loop also covers the Q group
#endif

  RowState st;
#pragma unroll
  for (int f = 0; f < WARP_M_FRAGS; ++f) {
#pragma unroll
    for (int d = 0; d < HEAD_DIM / 8; ++d) st.o[f][d][0] = st.o[f][d][1] = st.o[f][d][2] = st.o[f][d][3] = 0.f;
    st.m[f][0] = st.m[f][1] = NEG_INF;
    st.l[f][0] = st.l[f][1] = 0.f;
  }
  const int row0 = m0 + warp_row + (lane >> 2);
  // Tiles from n_unmasked on need a mask: they cross the end of K or reach past the first row's diagonal.
  int n_unmasked = seqlen_k / BLOCK_N;
  if (p.causal) n_unmasked = min(n_unmasked, max(0, (m0 + causal_shift + 1) / BLOCK_N));

  for (int it = 0; it < n_tiles; ++it) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();  // tile `it` visible to all warps; everyone is done with the stage refilled below
    {
      const int nxt = it + STAGES - 1;
      if (nxt < n_tiles) {
        const int n0 = (n_tiles - 1 - nxt) * BLOCK_N;
        const unsigned dst = kv_smem + 2 * (nxt % STAGES) * TILE_BYTES;
        load_tile<BLOCK_N>(dst, kg, p.k_row_stride, n0, seqlen_k, tid);
        load_tile<BLOCK_N>(dst + TILE_BYTES, vg, p.v_row_stride, n0, seqlen_k, tid);
      }
      cp_async_commit();
    }
    const int tile = n_tiles - 1 - it;
    const unsigned k_base = kv_smem + 2 * (it % STAGES) * TILE_BYTES;
    if (tile >= n_unmasked)
      attend_tile<true>(q, st, k_base, k_base + TILE_BYTES, offs, k_offs, tile * BLOCK_N, row0, seqlen_k,
                        causal_shift, p.causal, p.softmax_scale_log2, lane);
    else
      attend_tile<false>(q, st, k_base, k_base + TILE_BYTES, offs, k_offs, tile * BLOCK_N, row0, seqlen_k,
                         causal_shift, p.causal, p.softmax_scale_log2, lane);
  }
  // All copies landed and every warp is past its last Q read before O overwrites the Q buffer
  // (Q rows are copied by all threads; with no KV tile the loop's barriers never ran).
  cp_async_wait<0>();
  __syncthreads();

  // Epilogue: finish the row sums across the quad, normalise, write LSE, then stage O (BF16)
  // through this warp's rows of the Q buffer so the global stores are 16-byte and coalesced.
  float* lse = p.lse + b * p.lse_batch_stride + h * p.lse_head_stride;
#pragma unroll
  for (int f = 0; f < WARP_M_FRAGS; ++f)
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      float l = st.l[f][hh];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      const float inv = l > 0.f ? 1.f / l : 0.f;  // no visible key: O = 0
#pragma unroll
      for (int d = 0; d < HEAD_DIM / 8; ++d) {
        st.o[f][d][2 * hh] *= inv;
        st.o[f][d][2 * hh + 1] *= inv;
      }
      const int row = row0 + 16 * f + 8 * hh;
      if ((lane & 3) == 0 && row < seqlen_q)
        lse[row] = l > 0.f ? st.m[f][hh] * p.softmax_scale + __logf(l) : NEG_INF;
    }
  // Each warp stages and re-reads only its own rows, so a warp barrier orders the round trip.
#pragma unroll
  for (int f = 0; f < WARP_M_FRAGS; ++f)
#pragma unroll
    for (int d = 0; d < HEAD_DIM / 8; ++d)
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const int r = warp_row + 16 * f + (lane >> 2) + 8 * hh;
        const unsigned off = swz(r, d) + (lane & 3) * 4;
        *reinterpret_cast<unsigned*>(smem + off) = pack_bf16(st.o[f][d][2 * hh], st.o[f][d][2 * hh + 1]);
      }
  __syncwarp();
  __nv_bfloat16* og = p.o + b * p.o_batch_stride + h * p.o_head_stride;
#pragma unroll
  for (int i = 0; i < 16 * WARP_M_FRAGS * CHUNKS / 32; ++i) {
    const int idx = lane + 32 * i;
    const int r = warp_row + idx / CHUNKS, c = idx % CHUNKS;
    if (m0 + r < seqlen_q)
      *reinterpret_cast<uint4*>(og + (long long)(m0 + r) * p.o_row_stride + c * 8) =
          *reinterpret_cast<const uint4*>(smem + swz(r, c));
  }
}
