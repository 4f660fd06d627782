// sm90: Hopper-native forward attention in the style of FlashAttention-3.
//
// A CTA computes BLOCK_M x D tiles of O, one (batch, head, m_block) tile at a time:
//   warpgroup 0      producer: one thread claims tiles (persistent: from p.tile_counter) and
//                    issues TMA loads of Q per tile and K/V per key block into a STAGES-deep ring
//                    of 128B-swizzled shared-memory buffers; completion lands on mbarriers.
//   warpgroups 1..2  consumers: each owns 64 query rows. S = Q K^T and O += P V run on the tensor
//                    cores as warpgroup MMAs (wgmma, operands from shared memory, P straight from
//                    registers); the online softmax runs in between.
// Overlap: inside a consumer the QK^T of block j+1 is issued before the PV of block j, so the
// softmax of block j+1 runs while that PV is on the tensor cores (FA3's intra-warpgroup
// pipelining); across consumers named barriers hand the tensor cores back and forth (ping-pong),
// so one warpgroup's softmax hides under the other's GEMMs. Key blocks run from the last to the
// first, so the masked blocks (causal diagonal, ragged seqlen_k) come first and the rest run
// mask-free. The persistent grid overlaps one tile's epilogue with the next tile's loads.
// Key blocks are BLOCK_N_FULL keys wide without a mask and BLOCK_N_CAUSAL wide with the causal
// mask (a wide block amortises the per-block costs; a narrow one wastes less of the diagonal).
// The online softmax rescales O lazily: a row keeps its running max until a new one exceeds it by
// more than 2^RESCALE_LOG2 (probabilities then stay <= 2^RESCALE_LOG2, exact in FP32 sums), and a
// warp whose rows all keep theirs skips the O rescale.
// The first block of a tile (the last keys) is usually ragged: with TAIL_TRIM its QK^T and PV run
// only as wide as the keys it holds (the narrowest of 32, 64, 96, 128 and the block width that
// covers them), so a 4096-key row no longer computes 128 of its last 176 keys for nothing.
// Requires sm_90a (wgmma, setmaxnreg). Head dim 128.
#include <avo/attention.cuh>

#ifndef AVO_HEAD_DIM
#error "compile with -DAVO_HEAD_DIM=128"
#endif
#define HEAD_DIM AVO_HEAD_DIM
static_assert(HEAD_DIM == 128, "sm90 seed: only head dim 128 is implemented (the wgmma N and TMA box counts assume it)");

#define STAGES 2             // @tunable 2 3
#define PRODUCER_REGS 24     // @tunable 24 32 40
#define CONSUMER_REGS 240    // @tunable 232 240
#define PINGPONG 1           // @tunable 0 1
#define PERSISTENT 1         // @tunable 0 1
#define HEAD_CHUNK 8         // @tunable 4 8 16 32
#define BLOCK_N_FULL 176      // @tunable 128 176
#define BLOCK_N_CAUSAL 176    // @tunable 128 176
#define RESCALE_LOG2 8       // @tunable 0 8
#define TAIL_TRIM 1          // @tunable 0 1

#define BLOCK_M 128          // 2 consumer warpgroups x 64 rows
#define BLOCK_N_MAX (BLOCK_N_FULL > BLOCK_N_CAUSAL ? BLOCK_N_FULL : BLOCK_N_CAUSAL)
// K/V TMA box rows: the whole block when both masks use one width, else 16 (a divisor of both);
// the 128B swizzle is a function of the shared-memory address, so 1024-byte aligned 16-row boxes
// laid end to end give the same layout as one tall box.
#define KV_BOX_ROWS (BLOCK_N_FULL == BLOCK_N_CAUSAL ? BLOCK_N_FULL : 16)
#define NUM_CONSUMERS 2
#define NUM_THREADS (128 * (NUM_CONSUMERS + 1))
#define CTAS_PER_SM 1        // __launch_bounds__ minimum CTAs per SM: sets the register cap below
#define BOX_COLS 64          // a 128B-swizzled TMA box is 64 bf16 wide
#define KCHUNKS (HEAD_DIM / BOX_COLS)

// Shared memory: all tiles 1024-byte aligned (the 128B swizzle pattern repeats every 1024 bytes
// and wgmma descriptors assume base_offset 0). A K/V slot holds BLOCK_N_MAX rows.
#define Q_BYTES (BLOCK_M * HEAD_DIM * 2)
#define KV_BYTES (BLOCK_N_MAX * HEAD_DIM * 2)
#define OFF_Q 0
#define OFF_K (OFF_Q + Q_BYTES)
#define OFF_V (OFF_K + STAGES * KV_BYTES)
#define OFF_BAR (OFF_V + STAGES * KV_BYTES)
#define OFF_TILE (OFF_BAR + 128)  // the current tile index, producer -> consumers
#define SMEM_BYTES (OFF_BAR + 256 + 1024)  // barriers, tile slot, slack to align the base to 1024

// ---- validity rules -------------------------------------------------------------------------
// Every combination of the tunables either meets these rules or fails to compile with a message
// that names the broken rule ("sm90 rule [name]") and the values that work. A combination that
// breaks a register rule compiles without them but hangs on the GPU. The rules read only STAGES,
// PRODUCER_REGS and CONSUMER_REGS. This block and everything above it compile on their own:
// tests/test_sm90_space.py cuts the file at the end marker and checks every declared combination.
//
// Registers at launch: the kernel uses setmaxnreg, so ptxas sets its register count to the
// __launch_bounds__ cap, 65536 / (NUM_THREADS * CTAS_PER_SM) rounded down to a multiple of 8
// (168 for 384 threads; ptxas prints "Used 168 registers"). The CTA starts with that many per
// thread in every warp; 168 x 384 = 64512 of the 65536 registers, so no second CTA fits on the SM.
#define LAUNCH_REGS (65536 / (NUM_THREADS * CTAS_PER_SM) / 8 * 8)
// PTX ISA, setmaxnreg: the count is a multiple of 8 in [24, 256]; .dec may only lower a warp's
// count and .inc only raise it (undefined behaviour otherwise).
static_assert(PRODUCER_REGS % 8 == 0 && PRODUCER_REGS >= 24 && PRODUCER_REGS <= LAUNCH_REGS,
              "sm90 rule [producer regs]: PRODUCER_REGS must be a multiple of 8 in [24, 168] "
              "(setmaxnreg.dec lowers the 168 registers each thread starts with)");
static_assert(CONSUMER_REGS % 8 == 0 && CONSUMER_REGS >= LAUNCH_REGS && CONSUMER_REGS <= 256,
              "sm90 rule [consumer regs]: CONSUMER_REGS must be a multiple of 8 in [168, 256] "
              "(setmaxnreg.inc raises the 168 registers each thread starts with)");
// PTX ISA, setmaxnreg: "A pool of available registers is maintained per-CTA" and "setmaxnreg.inc
// blocks the execution until enough registers are available in the CTA's register pool". The
// pool holds only what the CTA was launched with (registers of exited warps do not return to
// it), so the consumers' .inc waits forever unless the producer's .dec freed enough:
// PRODUCER_REGS + NUM_CONSUMERS * CONSUMER_REGS <= (NUM_CONSUMERS + 1) * 168 = 504.
// 32/240 needs 512 and 40/240 needs 520: both hang although they fit in the 64K register file.
static_assert(PRODUCER_REGS + NUM_CONSUMERS * CONSUMER_REGS <= (NUM_CONSUMERS + 1) * LAUNCH_REGS,
              "sm90 rule [register pool]: PRODUCER_REGS + 2 * CONSUMER_REGS must be <= 504 (3 warpgroups x 168 "
              "registers at launch), else setmaxnreg.inc waits forever; valid pairs: 24/240, 24/232, 32/232, 40/232");
// Key block widths: the wgmma wrappers below exist for N = 128 and 176.
static_assert((BLOCK_N_FULL == 128 || BLOCK_N_FULL == 176) && (BLOCK_N_CAUSAL == 128 || BLOCK_N_CAUSAL == 176),
              "sm90 rule [block width]: BLOCK_N_FULL and BLOCK_N_CAUSAL must be 128 or 176");
static_assert(RESCALE_LOG2 >= 0 && RESCALE_LOG2 <= 16,
              "sm90 rule [rescale]: RESCALE_LOG2 must be in [0, 16] (probabilities up to 2^RESCALE_LOG2)");
// Shared memory: at most 227 KB per CTA on sm_90: Q 32 KB + STAGES x (K + V) of BLOCK_N_MAX rows
// (128 rows: 64 KB a stage, 176 rows: 88 KB), so STAGES 3 fits only with 128-key blocks.
static_assert(STAGES >= 2 && SMEM_BYTES <= 227 * 1024,
              "sm90 rule [shared memory]: Q + STAGES x (K + V) must fit in 227 KB: STAGES 2, or STAGES 3 with "
              "both block widths 128");
static_assert(8 * (2 + 4 * STAGES) <= OFF_TILE - OFF_BAR,
              "sm90 rule [mbarriers]: the 2 + 4 * STAGES mbarriers must fit in the 128 bytes before the tile slot");

AVO_LAUNCH(NUM_THREADS, SMEM_BYTES, BLOCK_M, PERSISTENT, BLOCK_M, KV_BOX_ROWS);
// ---- end of the validity rules --------------------------------------------------------------

#define NEG_INF __int_as_float(0xff800000)

// ---------------------------------------------------------------------------------------------
// PTX wrappers
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ unsigned smem_u32(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void mbar_init(unsigned bar, unsigned count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count));
}
__device__ __forceinline__ void mbar_expect_tx(unsigned bar, unsigned bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(unsigned bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_wait(unsigned bar, unsigned parity) {
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "WAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT_%=;\n"
      "}\n" ::"r"(bar), "r"(parity) : "memory");
}

// One 64-column box of a 4-D (D, S, H, B) tensor map into shared memory, completing on `bar`.
__device__ __forceinline__ void tma_load(unsigned dst, const AvoTensorMap* map, unsigned bar,
                                         int d, int s, int h, int b) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%3, %4, %5, %6}], [%2];" ::"r"(dst), "l"(reinterpret_cast<unsigned long long>(map)),
      "r"(bar), "r"(d), "r"(s), "r"(h), "r"(b) : "memory");
}

// Named barriers 1.. (0 is __syncthreads): ping-pong turns between the consumer warpgroups.
__device__ __forceinline__ void bar_sync(int id, int n) { asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(n) : "memory"); }
__device__ __forceinline__ void bar_arrive(int id, int n) { asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(n) : "memory"); }

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory"); }

// Keeps the compiler from moving register reads/writes across an asynchronous wgmma.
__device__ __forceinline__ void reg_fence(float& x) { asm volatile("" : "+f"(x)::"memory"); }
__device__ __forceinline__ void reg_fence(unsigned& x) { asm volatile("" : "+r"(x)::"memory"); }

// Shared-memory matrix descriptor, 128-byte swizzle. lbo/sbo in bytes.
__device__ __forceinline__ unsigned long long smem_desc(unsigned addr, unsigned lbo, unsigned sbo) {
  unsigned long long d = 0;
  d |= (unsigned long long)((addr & 0x3FFFF) >> 4);
  d |= (unsigned long long)((lbo >> 4) & 0x3FFF) << 16;
  d |= (unsigned long long)((sbo >> 4) & 0x3FFF) << 32;
  d |= 1ull << 62;  // SWIZZLE_128B
  return d;
}

// D[64x32] (+)= A[64x16] * B[16x32], A and B K-major in shared memory.
__device__ __forceinline__ void wgmma_ss_n32(float (&d)[16], unsigned long long a, unsigned long long b, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15} "
      ", %16, %17, p, 1, 1, 0, 0;\n}\n"
      :
      "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
      "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
      : "l"(a), "l"(b), "r"(accumulate));
}

// D[64x32] = A[64x16] * B[16x32], A and B K-major in shared memory.
__device__ __forceinline__ void wgmma_ss0_n32(float (&d)[16], unsigned long long a, unsigned long long b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15} "
      ", %16, %17, p, 1, 1, 0, 0;\n}\n"
      :
      "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3]), "=f"(d[4]), "=f"(d[5]), "=f"(d[6]), "=f"(d[7]),
      "=f"(d[8]), "=f"(d[9]), "=f"(d[10]), "=f"(d[11]), "=f"(d[12]), "=f"(d[13]), "=f"(d[14]), "=f"(d[15])
      : "l"(a), "l"(b), "r"(0));
}

// D[64x64] (+)= A[64x16] * B[16x64], A and B K-major in shared memory.
__device__ __forceinline__ void wgmma_ss_n64(float (&d)[32], unsigned long long a, unsigned long long b, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31} "
      ", %32, %33, p, 1, 1, 0, 0;\n}\n"
      :
      "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
      "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
      "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
      "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "l"(a), "l"(b), "r"(accumulate));
}

// D[64x64] = A[64x16] * B[16x64], A and B K-major in shared memory.
__device__ __forceinline__ void wgmma_ss0_n64(float (&d)[32], unsigned long long a, unsigned long long b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31} "
      ", %32, %33, p, 1, 1, 0, 0;\n}\n"
      :
      "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3]), "=f"(d[4]), "=f"(d[5]), "=f"(d[6]), "=f"(d[7]),
      "=f"(d[8]), "=f"(d[9]), "=f"(d[10]), "=f"(d[11]), "=f"(d[12]), "=f"(d[13]), "=f"(d[14]), "=f"(d[15]),
      "=f"(d[16]), "=f"(d[17]), "=f"(d[18]), "=f"(d[19]), "=f"(d[20]), "=f"(d[21]), "=f"(d[22]), "=f"(d[23]),
      "=f"(d[24]), "=f"(d[25]), "=f"(d[26]), "=f"(d[27]), "=f"(d[28]), "=f"(d[29]), "=f"(d[30]), "=f"(d[31])
      : "l"(a), "l"(b), "r"(0));
}

// D[64x96] (+)= A[64x16] * B[16x96], A and B K-major in shared memory.
__device__ __forceinline__ void wgmma_ss_n96(float (&d)[48], unsigned long long a, unsigned long long b, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %50, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n96k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47} "
      ", %48, %49, p, 1, 1, 0, 0;\n}\n"
      :
      "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
      "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
      "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
      "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
      "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
      "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47])
      : "l"(a), "l"(b), "r"(accumulate));
}

// D[64x96] = A[64x16] * B[16x96], A and B K-major in shared memory.
__device__ __forceinline__ void wgmma_ss0_n96(float (&d)[48], unsigned long long a, unsigned long long b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %50, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n96k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47} "
      ", %48, %49, p, 1, 1, 0, 0;\n}\n"
      :
      "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3]), "=f"(d[4]), "=f"(d[5]), "=f"(d[6]), "=f"(d[7]),
      "=f"(d[8]), "=f"(d[9]), "=f"(d[10]), "=f"(d[11]), "=f"(d[12]), "=f"(d[13]), "=f"(d[14]), "=f"(d[15]),
      "=f"(d[16]), "=f"(d[17]), "=f"(d[18]), "=f"(d[19]), "=f"(d[20]), "=f"(d[21]), "=f"(d[22]), "=f"(d[23]),
      "=f"(d[24]), "=f"(d[25]), "=f"(d[26]), "=f"(d[27]), "=f"(d[28]), "=f"(d[29]), "=f"(d[30]), "=f"(d[31]),
      "=f"(d[32]), "=f"(d[33]), "=f"(d[34]), "=f"(d[35]), "=f"(d[36]), "=f"(d[37]), "=f"(d[38]), "=f"(d[39]),
      "=f"(d[40]), "=f"(d[41]), "=f"(d[42]), "=f"(d[43]), "=f"(d[44]), "=f"(d[45]), "=f"(d[46]), "=f"(d[47])
      : "l"(a), "l"(b), "r"(0));
}

// D[64x128] (+)= A[64x16] * B[16x128], A and B K-major in shared memory.
__device__ __forceinline__ void wgmma_ss_n128(float (&d)[64], unsigned long long a, unsigned long long b, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "l"(a), "l"(b), "r"(accumulate));
}

// D[64x128] = A[64x16] * B[16x128], A and B K-major in shared memory.
__device__ __forceinline__ void wgmma_ss0_n128(float (&d)[64], unsigned long long a, unsigned long long b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, 0, 0;\n}\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3]), "=f"(d[4]), "=f"(d[5]), "=f"(d[6]), "=f"(d[7]), "=f"(d[8]), "=f"(d[9]), "=f"(d[10]), "=f"(d[11]), "=f"(d[12]), "=f"(d[13]), "=f"(d[14]), "=f"(d[15]), "=f"(d[16]), "=f"(d[17]), "=f"(d[18]), "=f"(d[19]), "=f"(d[20]), "=f"(d[21]), "=f"(d[22]), "=f"(d[23]), "=f"(d[24]), "=f"(d[25]), "=f"(d[26]), "=f"(d[27]), "=f"(d[28]), "=f"(d[29]), "=f"(d[30]), "=f"(d[31]), "=f"(d[32]), "=f"(d[33]), "=f"(d[34]), "=f"(d[35]), "=f"(d[36]), "=f"(d[37]), "=f"(d[38]), "=f"(d[39]), "=f"(d[40]), "=f"(d[41]), "=f"(d[42]), "=f"(d[43]), "=f"(d[44]), "=f"(d[45]), "=f"(d[46]), "=f"(d[47]), "=f"(d[48]), "=f"(d[49]), "=f"(d[50]), "=f"(d[51]), "=f"(d[52]), "=f"(d[53]), "=f"(d[54]), "=f"(d[55]), "=f"(d[56]), "=f"(d[57]), "=f"(d[58]), "=f"(d[59]), "=f"(d[60]), "=f"(d[61]), "=f"(d[62]), "=f"(d[63])
      : "l"(a), "l"(b), "r"(0));
}

// D[64x176] (+)= A[64x16] * B[16x176], A and B K-major in shared memory.
__device__ __forceinline__ void wgmma_ss_n176(float (&d)[88], unsigned long long a, unsigned long long b, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %90, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n176k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87}, %88, %89, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87])
      : "l"(a), "l"(b), "r"(accumulate));
}

// D[64x176] = A[64x16] * B[16x176], A and B K-major in shared memory.
__device__ __forceinline__ void wgmma_ss0_n176(float (&d)[88], unsigned long long a, unsigned long long b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %90, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n176k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87}, %88, %89, p, 1, 1, 0, 0;\n}\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3]), "=f"(d[4]), "=f"(d[5]), "=f"(d[6]), "=f"(d[7]), "=f"(d[8]), "=f"(d[9]), "=f"(d[10]), "=f"(d[11]), "=f"(d[12]), "=f"(d[13]), "=f"(d[14]), "=f"(d[15]), "=f"(d[16]), "=f"(d[17]), "=f"(d[18]), "=f"(d[19]), "=f"(d[20]), "=f"(d[21]), "=f"(d[22]), "=f"(d[23]), "=f"(d[24]), "=f"(d[25]), "=f"(d[26]), "=f"(d[27]), "=f"(d[28]), "=f"(d[29]), "=f"(d[30]), "=f"(d[31]), "=f"(d[32]), "=f"(d[33]), "=f"(d[34]), "=f"(d[35]), "=f"(d[36]), "=f"(d[37]), "=f"(d[38]), "=f"(d[39]), "=f"(d[40]), "=f"(d[41]), "=f"(d[42]), "=f"(d[43]), "=f"(d[44]), "=f"(d[45]), "=f"(d[46]), "=f"(d[47]), "=f"(d[48]), "=f"(d[49]), "=f"(d[50]), "=f"(d[51]), "=f"(d[52]), "=f"(d[53]), "=f"(d[54]), "=f"(d[55]), "=f"(d[56]), "=f"(d[57]), "=f"(d[58]), "=f"(d[59]), "=f"(d[60]), "=f"(d[61]), "=f"(d[62]), "=f"(d[63]), "=f"(d[64]), "=f"(d[65]), "=f"(d[66]), "=f"(d[67]), "=f"(d[68]), "=f"(d[69]), "=f"(d[70]), "=f"(d[71]), "=f"(d[72]), "=f"(d[73]), "=f"(d[74]), "=f"(d[75]), "=f"(d[76]), "=f"(d[77]), "=f"(d[78]), "=f"(d[79]), "=f"(d[80]), "=f"(d[81]), "=f"(d[82]), "=f"(d[83]), "=f"(d[84]), "=f"(d[85]), "=f"(d[86]), "=f"(d[87])
      : "l"(a), "l"(b), "r"(0));
}

// D[64x128] += A[64x16] * B[16x128], A in registers, B MN-major in shared memory.
__device__ __forceinline__ void wgmma_rs_n128(float (&d)[64], const unsigned (&a)[4], unsigned long long b) {
  asm volatile(
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, 1, 1, 1, 1;\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));
}

template <int BN> struct Gemm;
template <> struct Gemm<32> {
  static __device__ __forceinline__ void ss(float (&d)[16], unsigned long long a, unsigned long long b, int acc) {
    wgmma_ss_n32(d, a, b, acc);
  }
  static __device__ __forceinline__ void ss0(float (&d)[16], unsigned long long a, unsigned long long b) {
    wgmma_ss0_n32(d, a, b);
  }
};
template <> struct Gemm<64> {
  static __device__ __forceinline__ void ss(float (&d)[32], unsigned long long a, unsigned long long b, int acc) {
    wgmma_ss_n64(d, a, b, acc);
  }
  static __device__ __forceinline__ void ss0(float (&d)[32], unsigned long long a, unsigned long long b) {
    wgmma_ss0_n64(d, a, b);
  }
};
template <> struct Gemm<96> {
  static __device__ __forceinline__ void ss(float (&d)[48], unsigned long long a, unsigned long long b, int acc) {
    wgmma_ss_n96(d, a, b, acc);
  }
  static __device__ __forceinline__ void ss0(float (&d)[48], unsigned long long a, unsigned long long b) {
    wgmma_ss0_n96(d, a, b);
  }
};
template <> struct Gemm<128> {
  static __device__ __forceinline__ void ss(float (&d)[64], unsigned long long a, unsigned long long b, int acc) {
    wgmma_ss_n128(d, a, b, acc);
  }
  static __device__ __forceinline__ void ss0(float (&d)[64], unsigned long long a, unsigned long long b) {
    wgmma_ss0_n128(d, a, b);
  }
};
template <> struct Gemm<176> {
  static __device__ __forceinline__ void ss(float (&d)[88], unsigned long long a, unsigned long long b, int acc) {
    wgmma_ss_n176(d, a, b, acc);
  }
  static __device__ __forceinline__ void ss0(float (&d)[88], unsigned long long a, unsigned long long b) {
    wgmma_ss0_n176(d, a, b);
  }
};

// The first W columns of an S block, and the first W / 16 k16 steps of its P (the same registers).
template <int W, int N> __device__ __forceinline__ float (&cols(float (&s)[N]))[W / 2] {
  static_assert(W / 2 <= N, "a view within the block");
  return *reinterpret_cast<float(*)[W / 2]>(&s[0]);
}
template <int W, int N> __device__ __forceinline__ unsigned (&steps(unsigned (&p)[N][4]))[W / 16][4] {
  static_assert(W / 16 <= N, "a view within the block");
  return *reinterpret_cast<unsigned(*)[W / 16][4]>(&p[0][0]);
}
template <int N> struct Width { enum { value = N }; };

__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ unsigned pack_bf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<unsigned*>(&v);
}

// ---------------------------------------------------------------------------------------------
// Consumer building blocks. Accumulator layout of m64nNk16 (per thread of the warpgroup):
//   d[4*j + r]: row 16*warp + lane/4 + 8*(r/2), column 8*j + 2*(lane%4) + (r%2).
// Each row lives in 4 lanes (lane%4); each thread holds 2 rows (r/2 = 0, 1).
// ---------------------------------------------------------------------------------------------

// S = Q K^T over the head dim: KCHUNKS boxes of 64 columns, 4 k16 steps each (32 bytes apart).
// A K slot's 64-column boxes are BLOCK_N_MAX rows (BLOCK_N_MAX * 128 bytes) apart.
template <int BN>
__device__ __forceinline__ void gemm_qk(float (&s)[BN / 2], unsigned q_base, unsigned k_base) {
  // Each step's descriptors are the base's plus a constant: the address field holds addr >> 4 and a
  // shared address (< 256 KB) never carries out of it, so one add replaces the mask, shift and or.
  const unsigned long long a0 = smem_desc(q_base, 16, 1024), b0 = smem_desc(k_base, 16, 1024);
#pragma unroll
  for (int c = 0; c < KCHUNKS; ++c) {
#pragma unroll
    for (int k = 0; k < BOX_COLS / 16; ++k) {
      const unsigned long long a = a0 + ((c * BLOCK_M * 128 + k * 32) >> 4);
      const unsigned long long b = b0 + ((c * BLOCK_N_MAX * 128 + k * 32) >> 4);
      if (c == 0 && k == 0) Gemm<BN>::ss0(s, a, b);  // S is only written: no false read of its registers
      else Gemm<BN>::ss(s, a, b, 1);
    }
  }
}

// O += P V: P (64 x BN) from registers, V (BN x D) MN-major; each k16 step is 16 key rows
// (2048 bytes); the two 64-column boxes of V are LBO = BLOCK_N_MAX * 128 apart, 8-row groups
// SBO = 1024 apart.
template <int BN>
__device__ __forceinline__ void gemm_pv(float (&o)[64], const unsigned (&p)[BN / 16][4], unsigned v_base) {
  const unsigned long long v0 = smem_desc(v_base, BLOCK_N_MAX * 128, 1024);  // + a constant per step, as in gemm_qk
#pragma unroll
  for (int k = 0; k < BN / 16; ++k) {
    wgmma_rs_n128(o, p[k], v0 + ((k * 2048) >> 4));
  }
}

// Masks out keys that are beyond seqlen_k or (causal) after row + seqlen_k - seqlen_q.
template <int BN>
__device__ __forceinline__ void apply_mask(float (&s)[BN / 2], int n0, int row0, int seqlen_k, int causal_off,
                                           bool causal) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int j = 0; j < BN / 8; ++j) {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int col = n0 + 8 * j + 2 * (lane & 3) + (r & 1);
      const int row = row0 + 8 * (r >> 1);
      const bool hidden = col >= seqlen_k || (causal && col > row + causal_off);
      if (hidden) s[4 * j + r] = NEG_INF;
    }
  }
}

// Online softmax on a fresh S block: turns s into unnormalised probabilities exp2(s*scale - m)
// against the row's running max m (raw score units), adds them to the partial row sum l, and
// returns whether this warp must rescale O by corr (per row; 1 for rows that keep their max).
// kFirst: m is this block's max. Else a row moves its max only when the new one exceeds it by
// more than 2^RESCALE_LOG2 in probability; the answer is the same for the whole warp, so the O
// rescale is a uniform branch, and a warp whose rows all keep their max skips it.
template <bool kFirst, int BN>
__device__ __forceinline__ bool softmax_step(float (&s)[BN / 2], float (&m)[2], float (&l)[2], float (&corr)[2],
                                             float scale_log2) {
  float mx[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float x = m[h];
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) x = fmaxf(x, fmaxf(s[4 * j + 2 * h], s[4 * j + 2 * h + 1]));
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
    mx[h] = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
  }
  bool rescale = false;
  if (kFirst) {
    m[0] = mx[0];
    m[1] = mx[1];
  } else {
    // m = -inf and a finite new max: +inf > threshold, moves; both -inf: NaN, keeps (p stays 0)
    const bool grow0 = (mx[0] - m[0]) * scale_log2 > float(RESCALE_LOG2);
    const bool grow1 = (mx[1] - m[1]) * scale_log2 > float(RESCALE_LOG2);
    rescale = __any_sync(0xffffffffu, grow0 || grow1);
    corr[0] = corr[1] = 1.f;
    if (rescale) {
      if (grow0) {
        corr[0] = ex2((m[0] - mx[0]) * scale_log2);  // m = -inf gives 0, as wanted
        m[0] = mx[0];
      }
      if (grow1) {
        corr[1] = ex2((m[1] - mx[1]) * scale_log2);
        m[1] = mx[1];
      }
    }
  }
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    // A row with no visible key so far keeps m = -inf; subtract 0 instead so p = 0, not NaN.
    const float ms = m[h] == NEG_INF ? 0.f : m[h] * scale_log2;
    float sum = 0.f;
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        float& x = s[4 * j + 2 * h + c];
        x = ex2(fmaf(x, scale_log2, -ms));
        sum += x;
      }
    }
    l[h] = kFirst ? sum : l[h] * corr[h] + sum;
  }
  return rescale;
}

// The accumulator layout of S equals the A-operand register layout of m64k16, so P is packed
// pairwise: k16 step k uses S columns 16k..16k+15 = accumulator blocks j = 2k, 2k+1.
template <int BN>
__device__ __forceinline__ void to_bf16(const float (&s)[BN / 2], unsigned (&p)[BN / 16][4]) {
#pragma unroll
  for (int k = 0; k < BN / 16; ++k) {
    p[k][0] = pack_bf16(s[8 * k + 0], s[8 * k + 1]);
    p[k][1] = pack_bf16(s[8 * k + 2], s[8 * k + 3]);
    p[k][2] = pack_bf16(s[8 * k + 4], s[8 * k + 5]);
    p[k][3] = pack_bf16(s[8 * k + 6], s[8 * k + 7]);
  }
}

__device__ __forceinline__ void rescale_o(float (&o)[64], const float (&corr)[2]) {
#pragma unroll
  for (int j = 0; j < 16; ++j) {
    o[4 * j + 0] *= corr[0];
    o[4 * j + 1] *= corr[0];
    o[4 * j + 2] *= corr[1];
    o[4 * j + 3] *= corr[1];
  }
}

// ---------------------------------------------------------------------------------------------
// The kernel
// ---------------------------------------------------------------------------------------------
struct Tile {
  int m_block, h, b, hkv, n_keys, n_blocks;  // n_keys: the keys the tile's last row sees
};

// Tile `idx` of num_m * Hq * B. The (head, batch) pairs go in chunks of HEAD_CHUNK: CTAs running
// together then share those heads' K/V in L2. Inside a chunk the longest rows (largest m_block,
// which see the most keys under a causal mask) come first, so short tiles fill the tail.
template <int BN>
__device__ __forceinline__ Tile tile_at(const AvoAttnParams& p, int idx, int num_m) {
  const int hb_total = p.heads_q * p.batch;
  const int chunk = idx / (num_m * HEAD_CHUNK);
  const int in_chunk = idx - chunk * num_m * HEAD_CHUNK;
  const int size = min(HEAD_CHUNK, hb_total - chunk * HEAD_CHUNK);
  const int hb = chunk * HEAD_CHUNK + in_chunk % size;
  Tile t;
  t.m_block = num_m - 1 - in_chunk / size;
  t.h = hb % p.heads_q;
  t.b = hb / p.heads_q;
  t.hkv = t.h / (p.heads_q / p.heads_kv);
  int n_keys = p.seqlen_k;
  if (p.causal) n_keys = min(n_keys, max(0, (t.m_block + 1) * BLOCK_M + p.seqlen_k - p.seqlen_q));
  t.n_keys = n_keys;
  t.n_blocks = (n_keys + BN - 1) / BN;
  return t;
}

struct Smem {
  unsigned base;
  __device__ unsigned full_q() const { return base + OFF_BAR; }
  __device__ unsigned empty_q() const { return base + OFF_BAR + 8; }
  // full_* : TMA -> consumers (transaction bytes), empty_* : consumers -> producer (one arrive per consumer warp)
  __device__ unsigned full_k(int s) const { return base + OFF_BAR + 8 * (2 + s); }
  __device__ unsigned full_v(int s) const { return base + OFF_BAR + 8 * (2 + STAGES + s); }
  __device__ unsigned empty_k(int s) const { return base + OFF_BAR + 8 * (2 + 2 * STAGES + s); }
  __device__ unsigned empty_v(int s) const { return base + OFF_BAR + 8 * (2 + 3 * STAGES + s); }
};

// One K or V block of BN rows starting at key n0, as KCHUNKS x (BN / KV_BOX_ROWS) TMA boxes.
template <int BN>
__device__ __forceinline__ void load_kv(unsigned dst, const AvoTensorMap* map, unsigned bar, int n0, int hkv, int b) {
  mbar_expect_tx(bar, BN * HEAD_DIM * 2);
#pragma unroll 1
  for (int c = 0; c < KCHUNKS; ++c)
#pragma unroll 1
    for (int r = 0; r < BN; r += KV_BOX_ROWS)
      tma_load(dst + c * BLOCK_N_MAX * 128 + r * 128, map, bar, c * BOX_COLS, n0 + r, hkv, b);
}

// The producer's thread: tiles (the first from blockIdx, then, persistent, claimed one by one
// from p.tile_counter, so CTAs that drew short causal tiles take more); each index goes to the
// consumers through smem with the Q load, and num_tiles tells them to stop.
template <int BN>
__device__ __forceinline__ void produce(const AvoAttnParams& p, const Smem& sm, unsigned char* smem) {
  const int num_m = (p.seqlen_q + BLOCK_M - 1) / BLOCK_M;
  const int num_tiles = num_m * p.heads_q * p.batch;
  int idx = PERSISTENT ? blockIdx.x : blockIdx.x + num_m * (blockIdx.y + p.heads_q * blockIdx.z);
  volatile int* tile_slot = reinterpret_cast<volatile int*>(smem + OFF_TILE);
  int kv_it = 0;  // K/V blocks loaded so far: ring slot and barrier parity
  for (int q_it = 0;; ++q_it) {
    mbar_wait(sm.empty_q(), (q_it & 1) ^ 1);  // a fresh barrier counts as released
    const bool done = idx >= num_tiles;
    *tile_slot = done ? num_tiles : idx;
    const Tile t = tile_at<BN>(p, done ? 0 : idx, num_m);
    if (done || t.n_blocks == 0) {
      mbar_arrive(sm.full_q());
      if (done) break;
    } else {
      mbar_expect_tx(sm.full_q(), Q_BYTES);
      for (int c = 0; c < KCHUNKS; ++c)
        tma_load(sm.base + OFF_Q + c * BLOCK_M * 128, &p.tma_q, sm.full_q(), c * BOX_COLS, t.m_block * BLOCK_M, t.h,
                 t.b);
    }
    idx = PERSISTENT ? atomicAdd(p.tile_counter, 1) + gridDim.x : num_tiles;
#pragma unroll 1
    for (int i = 0; i < t.n_blocks; ++i, ++kv_it) {
      const int n0 = (t.n_blocks - 1 - i) * BN;
      const int s = kv_it % STAGES;
      const unsigned parity = ((kv_it / STAGES) & 1) ^ 1;
      mbar_wait(sm.empty_k(s), parity);
      load_kv<BN>(sm.base + OFF_K + s * KV_BYTES, &p.tma_k, sm.full_k(s), n0, t.hkv, t.b);
      mbar_wait(sm.empty_v(s), parity);
      load_kv<BN>(sm.base + OFF_V + s * KV_BYTES, &p.tma_v, sm.full_v(s), n0, t.hkv, t.b);
    }
  }
}

// One consumer warpgroup's pass over the key blocks of one tile: O, the row max and sum, and the
// S and P registers. Member templates, not generic lambdas: NVRTC treats the operator() of a generic
// lambda as a host function.
template <int BN>
struct TileLoop {
  const AvoAttnParams& p;
  const Smem& sm;
  const Tile& t;
  const int kv_it, row0, cw, lane;
  float o[64], m[2], l[2], corr[2];
  float s[BN / 2];
  unsigned pr[BN / 16][4];

  __device__ __forceinline__ TileLoop(const AvoAttnParams& p_, const Smem& sm_, const Tile& t_, int kv_it_, int row0_,
                                      int cw_, int lane_)
      : p(p_), sm(sm_), t(t_), kv_it(kv_it_), row0(row0_), cw(cw_), lane(lane_) {
#pragma unroll
    for (int i = 0; i < 64; ++i) o[i] = 0.f;
    m[0] = m[1] = NEG_INF;
    l[0] = l[1] = 0.f;
  }

  // Ping-pong: a warpgroup issues its GEMMs only in its turn and hands the turn on right after,
  // so one warpgroup's softmax runs while the other's GEMMs occupy the tensor cores.
  __device__ __forceinline__ void turn_begin() const { if (PINGPONG) bar_sync(1 + cw, 256); }
  __device__ __forceinline__ void turn_end() const { if (PINGPONG) bar_arrive(1 + (cw ^ 1), 256); }
  __device__ __forceinline__ void release(unsigned bar) const {
    __syncwarp();
    if (lane == 0) mbar_arrive(bar);
  }
  __device__ __forceinline__ unsigned q_base() const { return sm.base + OFF_Q + 64 * cw * 128; }
  __device__ __forceinline__ int causal_off() const { return p.seqlen_k - p.seqlen_q; }
  // A block computed w keys wide needs masking if it reaches past seqlen_k or (causal) past the
  // tile's first row.
  __device__ __forceinline__ bool needs_mask(int n0, int w) const {
    return n0 + w > p.seqlen_k || (p.causal && n0 + w - 1 > t.m_block * BLOCK_M + causal_off());
  }

  // The first (last-in-sequence) block, W keys wide: S, softmax, P.
  template <int W>
  __device__ __forceinline__ void first() {
    const int n0 = (t.n_blocks - 1) * BN;
    const int sk = kv_it % STAGES;
    float(&sw)[W / 2] = cols<W>(s);
    mbar_wait(sm.full_k(sk), (kv_it / STAGES) & 1);
    turn_begin();
    wgmma_fence();
    gemm_qk<W>(sw, q_base(), sm.base + OFF_K + sk * KV_BYTES);
    wgmma_commit();
    turn_end();
    wgmma_wait<0>();
#pragma unroll
    for (int i = 0; i < W / 2; ++i) reg_fence(sw[i]);
    release(sm.empty_k(sk));
    if (t.n_blocks == 1) release(sm.empty_q());
    if (needs_mask(n0, W)) apply_mask<W>(sw, n0, row0, p.seqlen_k, causal_off(), p.causal);
    softmax_step<true, W>(sw, m, l, corr, p.softmax_scale_log2);
    to_bf16<W>(sw, steps<W>(pr));
  }

  // Block i: S_i = Q K_i^T beside O += P_{i-1} V_{i-1}, block i-1 having been WP keys wide.
  template <int WP>
  __device__ __forceinline__ void step(int i) {
    const int n0 = (t.n_blocks - 1 - i) * BN;
    const int it_k = kv_it + i, it_v = kv_it + i - 1;
    const int sk = it_k % STAGES, sv = it_v % STAGES;
    mbar_wait(sm.full_k(sk), (it_k / STAGES) & 1);
    turn_begin();
    wgmma_fence();
    gemm_qk<BN>(s, q_base(), sm.base + OFF_K + sk * KV_BYTES);  // S_i
    wgmma_commit();
    mbar_wait(sm.full_v(sv), (it_v / STAGES) & 1);
    gemm_pv<WP>(o, steps<WP>(pr), sm.base + OFF_V + sv * KV_BYTES);  // overlaps the softmax below
    wgmma_commit();
    turn_end();
    wgmma_wait<1>();                                             // S_i ready
#pragma unroll
    for (int j = 0; j < BN / 2; ++j) reg_fence(s[j]);
    release(sm.empty_k(sk));
    if (i == t.n_blocks - 1) release(sm.empty_q());              // last use of Q: next tile's Q may load
    if (needs_mask(n0, BN)) apply_mask<BN>(s, n0, row0, p.seqlen_k, causal_off(), p.causal);
    const bool rescale = softmax_step<false, BN>(s, m, l, corr, p.softmax_scale_log2);
    wgmma_wait<0>();                                             // PV done: O and P registers are free
#pragma unroll
    for (int j = 0; j < 64; ++j) reg_fence(o[j]);
#pragma unroll
    for (int k = 0; k < WP / 16; ++k)
#pragma unroll
      for (int r = 0; r < 4; ++r) reg_fence(pr[k][r]);
    release(sm.empty_v(sv));
    if (rescale) rescale_o(o, corr);
    to_bf16<BN>(s, pr);
  }

  // The last PV, of a block WP keys wide.
  template <int WP>
  __device__ __forceinline__ void last_pv() {
    const int it_v = kv_it + t.n_blocks - 1;
    const int sv = it_v % STAGES;
    mbar_wait(sm.full_v(sv), (it_v / STAGES) & 1);
    turn_begin();
    wgmma_fence();
    gemm_pv<WP>(o, steps<WP>(pr), sm.base + OFF_V + sv * KV_BYTES);
    wgmma_commit();
    turn_end();
    wgmma_wait<0>();
#pragma unroll
    for (int j = 0; j < 64; ++j) reg_fence(o[j]);
    release(sm.empty_v(sv));
  }

  // The first block and whatever reads its P (block 1's step, or the last PV), at width W.
  template <int W>
  __device__ __forceinline__ void head() {
    first<W>();
    if (t.n_blocks > 1) step<W>(1);
    else last_pv<W>();
  }

  __device__ __forceinline__ void run() {
    const int w = t.n_keys - (t.n_blocks - 1) * BN;  // visible keys of the first block, 1..BN
    if (TAIL_TRIM && w <= 32) head<32>();
    else if (TAIL_TRIM && w <= 64) head<64>();
    else if (TAIL_TRIM && w <= 96) head<96>();
    else if (TAIL_TRIM && BN > 128 && w <= 128) head<128>();
    else head<BN>();
    for (int i = 2; i < t.n_blocks; ++i) step<BN>(i);
    if (t.n_blocks > 1) last_pv<BN>();
  }
};

// A consumer warpgroup: rows 64*cw .. 64*cw+63 of every tile the producer hands over.
template <int BN>
__device__ __forceinline__ void consume(const AvoAttnParams& p, const Smem& sm, unsigned char* smem, int cw) {
  const int warp = (threadIdx.x / 32) & 3, lane = threadIdx.x & 31;
  auto release = [&](unsigned bar) {
    __syncwarp();
    if (lane == 0) mbar_arrive(bar);
  };
  if (PINGPONG && cw == 1) bar_arrive(1, 256);  // consumer 0 takes the first turn

  const int num_m = (p.seqlen_q + BLOCK_M - 1) / BLOCK_M;
  const int num_tiles = num_m * p.heads_q * p.batch;
  const volatile int* tile_slot = reinterpret_cast<const volatile int*>(smem + OFF_TILE);
  int kv_it = 0;
  for (int q_it = 0;; ++q_it) {
    mbar_wait(sm.full_q(), q_it & 1);
    const int idx = __shfl_sync(0xffffffffu, *tile_slot, 0);  // warp-uniform, so wgmma stays convergent
    if (idx >= num_tiles) break;
    const Tile t = tile_at<BN>(p, idx, num_m);
    if (t.n_blocks == 0) release(sm.empty_q());  // nothing loaded; the slot is read
    const int row0 = t.m_block * BLOCK_M + 64 * cw + 16 * warp + lane / 4;  // this thread's first row
    TileLoop<BN> loop(p, sm, t, kv_it, row0, cw, lane);
    if (t.n_blocks > 0) loop.run();
    kv_it += t.n_blocks;
    float(&o)[64] = loop.o;
    float(&m)[2] = loop.m;
    float(&l)[2] = loop.l;

    // ------------------------------- epilogue -------------------------------
    // Full row sums across the 4 lanes of a row; rows with no visible key (l = 0) write 0 / -inf.
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      l[h] += __shfl_xor_sync(0xffffffffu, l[h], 1);
      l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);
    }
    __nv_bfloat16* o_base = p.o + t.b * p.o_batch_stride + t.h * p.o_head_stride;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = row0 + 8 * h;
      if (row < p.seqlen_q) {
        const float inv = l[h] > 0.f ? 1.f / l[h] : 0.f;
        __nv_bfloat16* orow = o_base + (long long)row * p.o_row_stride + 2 * (lane & 3);
#pragma unroll
        for (int j = 0; j < 16; ++j)
          *reinterpret_cast<unsigned*>(orow + 8 * j) = pack_bf16(o[4 * j + 2 * h] * inv, o[4 * j + 2 * h + 1] * inv);
        if ((lane & 3) == 0) {
          p.lse[t.b * p.lse_batch_stride + t.h * p.lse_head_stride + row] =
              l[h] > 0.f ? (m[h] * p.softmax_scale_log2 + __log2f(l[h])) * 0.69314718055994531f : NEG_INF;
        }
      }
    }
  }
}

extern "C" __global__ void __launch_bounds__(NUM_THREADS, CTAS_PER_SM) avo_attention(const __grid_constant__ AvoAttnParams p) {
  extern __shared__ unsigned char smem_raw[];
  unsigned char* smem = reinterpret_cast<unsigned char*>((reinterpret_cast<size_t>(smem_raw) + 1023) & ~size_t(1023));
  const Smem sm{smem_u32(smem)};

  const int warpgroup = threadIdx.x / 128;
  if (threadIdx.x == 0) {
    mbar_init(sm.full_q(), 1);
    mbar_init(sm.empty_q(), NUM_CONSUMERS * 4);
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(sm.full_k(s), 1);
      mbar_init(sm.full_v(s), 1);
      mbar_init(sm.empty_k(s), NUM_CONSUMERS * 4);
      mbar_init(sm.empty_v(s), NUM_CONSUMERS * 4);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();

  if (warpgroup == 0) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(PRODUCER_REGS));
    if (threadIdx.x != 0) return;
    if (p.causal) produce<BLOCK_N_CAUSAL>(p, sm, smem);
    else produce<BLOCK_N_FULL>(p, sm, smem);
    return;
  }
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(CONSUMER_REGS));
  if (p.causal) consume<BLOCK_N_CAUSAL>(p, sm, smem, warpgroup - 1);
  else consume<BLOCK_N_FULL>(p, sm, smem, warpgroup - 1);
}
