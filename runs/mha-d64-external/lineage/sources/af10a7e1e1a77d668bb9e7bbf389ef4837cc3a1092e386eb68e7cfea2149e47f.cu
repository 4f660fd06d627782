// sm90: Hopper-native forward attention in the style of FlashAttention-3, head dims 64, 128, 256.
//
// A CTA computes BLOCK_M x D tiles of O, one (batch, head, m_block) tile at a time:
//   warpgroup 0      producer: one thread claims tiles (persistent: from p.tile_counter) and
//                    issues TMA loads of Q per tile (into Q_BUFFERS buffers) and K/V per key block
//                    into a STAGES-deep ring of 128B-swizzled shared-memory buffers; completion
//                    lands on mbarriers.
//   warpgroups 1..2  consumers: each owns 64 query rows. S = Q K^T and O += P V run on the tensor
//                    cores as warpgroup MMAs (wgmma, operands from shared memory, P straight from
//                    registers); the online softmax runs in between.
// Overlap: inside a consumer the QK^T of block j+1 is issued before the PV of block j, so the
// softmax of block j+1 runs while that PV is on the tensor cores (FA3's intra-warpgroup
// pipelining), and this runs on across tiles: the first QK^T of the next tile is issued with the
// last PV of the current one, whose epilogue then runs while the tensor cores work (the next
// tile's Q is already in the second Q buffer). Across consumers named barriers hand the tensor
// cores back and forth (ping-pong), so one warpgroup's softmax hides under the other's GEMMs.
// Key blocks run from the last to the first, so the masked blocks (causal diagonal, ragged
// seqlen_k) come first and the rest run mask-free. The online softmax rescales O lazily: a row
// keeps its running max until a new one exceeds it by more than 2^RESCALE_LOG2 (probabilities
// then stay <= 2^RESCALE_LOG2, exact in FP32 sums), and a warp whose rows all keep theirs skips
// the O rescale. Requires sm_90a (wgmma, setmaxnreg).
#include <avo/attention.cuh>

#ifndef AVO_HEAD_DIM
#error "compile with -DAVO_HEAD_DIM=64, 128 or 256"
#endif
#define HEAD_DIM AVO_HEAD_DIM
static_assert(HEAD_DIM == 64 || HEAD_DIM == 128 || HEAD_DIM == 256,
              "sm90: head dims 64, 128 and 256 are implemented (wgmma N and TMA box counts)");

#define STAGES 2             // @tunable 2 3
#define PRODUCER_REGS 24     // @tunable 24 32 40
#define CONSUMER_REGS 240    // @tunable 232 240
#define PINGPONG 1           // @tunable 0 1
#define PERSISTENT 1         // @tunable 0 1
#define HEAD_CHUNK 8         // @tunable 4 8 16 32
#define RESCALE_LOG2 8       // @tunable 0 4 8
#define Q_BUFFERS 1          // @tunable 1 2
#define BLOCK_N_D64 176       // @tunable 128 176
#define BLOCK_N_D128 176      // @tunable 128 160 176
#define BLOCK_N_D256 80       // @tunable 64 80
#define EXP2_POLY_D64 4       // @tunable 0 2 3 4 8

// Keys per block for this head dim (S = 64 x BLOCK_N accumulators per consumer thread group):
// wider blocks amortise the per-block costs; registers and shared memory bound them.
#define BLOCK_N (HEAD_DIM == 64 ? BLOCK_N_D64 : HEAD_DIM == 128 ? BLOCK_N_D128 : BLOCK_N_D256)
// Every EXP2_POLY-th column pair of S takes its exponential on the FMA units (0: none). At d64 the
// exponentials keep the MUFU unit (16 a clock per SM) exactly as long as the two GEMMs keep the tensor
// cores, so the two share the critical path; at d128 and d256 the GEMMs are 2 and 4 times longer.
#define EXP2_POLY (HEAD_DIM == 64 ? EXP2_POLY_D64 : 0)
#define BLOCK_M 128          // 2 consumer warpgroups x 64 rows
#define NUM_CONSUMERS 2
#define NUM_THREADS (128 * (NUM_CONSUMERS + 1))
#define CTAS_PER_SM 1        // __launch_bounds__ minimum CTAs per SM: sets the register cap below
#define BOX_COLS 64          // a 128B-swizzled TMA box is 64 bf16 wide
#define KCHUNKS (HEAD_DIM / BOX_COLS)

// Shared memory: all tiles 1024-byte aligned (the 128B swizzle pattern repeats every 1024 bytes
// and wgmma descriptors assume base_offset 0). A second Q buffer is used where it fits.
#define Q_BYTES (BLOCK_M * HEAD_DIM * 2)
#define KV_BYTES (BLOCK_N * HEAD_DIM * 2)
#define SMEM_LIMIT (227 * 1024)
#define SMEM_WITH(qbufs) ((qbufs) * Q_BYTES + 2 * STAGES * KV_BYTES + 256 + 1024)
#define Q_BUF (Q_BUFFERS == 2 && SMEM_WITH(2) <= SMEM_LIMIT ? 2 : 1)
#define OFF_K (Q_BUF * Q_BYTES)
#define OFF_V (OFF_K + STAGES * KV_BYTES)
#define OFF_BAR (OFF_V + STAGES * KV_BYTES)
#define OFF_TILE (OFF_BAR + 128)  // the tile index of each Q buffer, producer -> consumers
#define SMEM_BYTES (OFF_BAR + 256 + 1024)  // barriers, tile slots, slack to align the base to 1024

// ---- validity rules -------------------------------------------------------------------------
// Every combination of the tunables either meets these rules or fails to compile with a message
// that names the broken rule ("sm90 rule [name]") and the values that work. A combination that
// breaks a register rule compiles without them but hangs on the GPU. This block and everything
// above it compile on their own: tests/test_sm90_space.py cuts the file at the end marker and
// checks every declared combination.
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
// Key block widths: the wgmma wrappers below exist for these N (S = Q K^T is m64 x BLOCK_N).
static_assert(BLOCK_N == 64 || BLOCK_N == 80 || BLOCK_N == 128 || BLOCK_N == 160 || BLOCK_N == 176,
              "sm90 rule [block width]: BLOCK_N must be 64, 80, 128, 160 or 176");
static_assert(EXP2_POLY >= 0 && EXP2_POLY <= BLOCK_N / 8,
              "sm90 rule [exp2 poly]: EXP2_POLY_D64 must be 0 (off) or a period in [1, BLOCK_N / 8] column pairs");
static_assert(RESCALE_LOG2 >= 0 && RESCALE_LOG2 <= 16,
              "sm90 rule [rescale]: RESCALE_LOG2 must be in [0, 16] (probabilities up to 2^RESCALE_LOG2)");
// Shared memory: at most 227 KB per CTA on sm_90: Q_BUF x Q + STAGES x (K + V). d128 with
// 160-key blocks: 2 x 32 + 2 x 80 = 224 KB; 3 stages fit only with 128-key blocks and one Q buffer.
static_assert(STAGES >= 2 && SMEM_BYTES <= SMEM_LIMIT,
              "sm90 rule [shared memory]: Q + STAGES x (K + V) must fit in 227 KB: lower STAGES or the block width");
static_assert(8 * (4 + 4 * STAGES) <= OFF_TILE - OFF_BAR,
              "sm90 rule [mbarriers]: the 4 + 4 * STAGES mbarriers must fit in the 128 bytes before the tile slots");

AVO_LAUNCH(NUM_THREADS, SMEM_BYTES, BLOCK_M, PERSISTENT, BLOCK_M, BLOCK_N);
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

// D[64x80] (+)= A[64x16] * B[16x80], A and B K-major in shared memory.
__device__ __forceinline__ void wgmma_ss_n80(float (&d)[40], unsigned long long a, unsigned long long b, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %42, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n80k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39} "
      ", %40, %41, p, 1, 1, 0, 0;\n}\n"
      :
      "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
      "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
      "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
      "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
      "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39])
      : "l"(a), "l"(b), "r"(accumulate));
}

// D[64x128] (+)= A[64x16] * B[16x128], A and B K-major in shared memory.
__device__ __forceinline__ void wgmma_ss_n128(float (&d)[64], unsigned long long a, unsigned long long b, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63} "
      ", %64, %65, p, 1, 1, 0, 0;\n}\n"
      :
      "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
      "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
      "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
      "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
      "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
      "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
      "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
      "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "l"(a), "l"(b), "r"(accumulate));
}

// D[64x160] (+)= A[64x16] * B[16x160], A and B K-major in shared memory.
__device__ __forceinline__ void wgmma_ss_n160(float (&d)[80], unsigned long long a, unsigned long long b, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %82, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n160k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "
      "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79} "
      ", %80, %81, p, 1, 1, 0, 0;\n}\n"
      :
      "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
      "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
      "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
      "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
      "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
      "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
      "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
      "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]),
      "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]),
      "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79])
      : "l"(a), "l"(b), "r"(accumulate));
}

// D[64x176] (+)= A[64x16] * B[16x176], A and B K-major in shared memory.
__device__ __forceinline__ void wgmma_ss_n176(float (&d)[88], unsigned long long a, unsigned long long b, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %90, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n176k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "
      "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "
      "%80, %81, %82, %83, %84, %85, %86, %87} "
      ", %88, %89, p, 1, 1, 0, 0;\n}\n"
      :
      "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
      "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
      "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
      "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
      "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
      "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
      "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
      "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]),
      "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]),
      "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]),
      "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87])
      : "l"(a), "l"(b), "r"(accumulate));
}

// D[64x64] += A[64x16] * B[16x64], A in registers, B MN-major in shared memory.
__device__ __forceinline__ void wgmma_rs_n64(float (&d)[32], const unsigned (&a)[4], unsigned long long b) {
  asm volatile(
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31} "
      ", {%32, %33, %34, %35}, %36, 1, 1, 1, 1;\n"
      :
      "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
      "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
      "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
      "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));
}

// D[64x128] += A[64x16] * B[16x128], A in registers, B MN-major in shared memory.
__device__ __forceinline__ void wgmma_rs_n128(float (&d)[64], const unsigned (&a)[4], unsigned long long b) {
  asm volatile(
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63} "
      ", {%64, %65, %66, %67}, %68, 1, 1, 1, 1;\n"
      :
      "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
      "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
      "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
      "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
      "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
      "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
      "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
      "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));
}

// D[64x256] += A[64x16] * B[16x256], A in registers, B MN-major in shared memory.
__device__ __forceinline__ void wgmma_rs_n256(float (&d)[128], const unsigned (&a)[4], unsigned long long b) {
  asm volatile(
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "
      "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "
      "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "
      "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "
      "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127} "
      ", {%128, %129, %130, %131}, %132, 1, 1, 1, 1;\n"
      :
      "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
      "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
      "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
      "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
      "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
      "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
      "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
      "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]),
      "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]),
      "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]),
      "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]),
      "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]),
      "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]),
      "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]),
      "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]),
      "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]),
      "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));
}

// The GEMMs at this head dim and block width.
template <int N> struct Ss;
template <> struct Ss<64> { template <class D> static __device__ __forceinline__ void mma(D& d, unsigned long long a, unsigned long long b, int acc) { wgmma_ss_n64(d, a, b, acc); } };
template <> struct Ss<80> { template <class D> static __device__ __forceinline__ void mma(D& d, unsigned long long a, unsigned long long b, int acc) { wgmma_ss_n80(d, a, b, acc); } };
template <> struct Ss<128> { template <class D> static __device__ __forceinline__ void mma(D& d, unsigned long long a, unsigned long long b, int acc) { wgmma_ss_n128(d, a, b, acc); } };
template <> struct Ss<160> { template <class D> static __device__ __forceinline__ void mma(D& d, unsigned long long a, unsigned long long b, int acc) { wgmma_ss_n160(d, a, b, acc); } };
template <> struct Ss<176> { template <class D> static __device__ __forceinline__ void mma(D& d, unsigned long long a, unsigned long long b, int acc) { wgmma_ss_n176(d, a, b, acc); } };
template <int N> struct Rs;
template <> struct Rs<64> { template <class D> static __device__ __forceinline__ void mma(D& d, const unsigned (&a)[4], unsigned long long b) { wgmma_rs_n64(d, a, b); } };
template <> struct Rs<128> { template <class D> static __device__ __forceinline__ void mma(D& d, const unsigned (&a)[4], unsigned long long b) { wgmma_rs_n128(d, a, b); } };
template <> struct Rs<256> { template <class D> static __device__ __forceinline__ void mma(D& d, const unsigned (&a)[4], unsigned long long b) { wgmma_rs_n256(d, a, b); } };

__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// 2^x on the FMA units (FlashAttention-4's trick). x = n + f, n the nearest integer (adding 1.5 * 2^23
// rounds it into the low mantissa bits) and f in [-0.5, 0.5]; 2^f from a degree-3 polynomial fitted for
// relative error (1.0e-4 at most, under BF16's 2^-9: P is rounded to BF16 for the PV GEMM); 2^n added to the
// exponent bits. Clamping at -127 makes a masked -inf exactly +0 (n = -127, f = 0, 2^f = 1), and keeps every
// other input at or above the smallest denormal exponent, so the sum into the exponent never wraps.
// Inputs are at most RESCALE_LOG2 (lazy rescale), far from overflow. No MUFU and no conversion (F2I and
// FRND share its 16-a-clock rate): 3 FADD, 3 FFMA, FMNMX and a shift-add.
__device__ __forceinline__ float ex2_poly(float x) {
  x = fmaxf(x, -127.f);
  const float r = x + 12582912.f;
  const float f = x - (r - 12582912.f);
  const float p = fmaf(fmaf(fmaf(0.05500891f, f, 0.24221101f), f, 0.69328296f), f, 1.f);
  return __int_as_float(__float_as_int(p) + (__float_as_int(r) << 23));
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
typedef float SAcc[BLOCK_N / 2];         // S of one key block
typedef float OAcc[HEAD_DIM / 2];        // O of the tile
typedef unsigned PFrag[BLOCK_N / 16][4]; // P as the A operand of PV, one k16 step per row

// S = Q K^T over the head dim: KCHUNKS boxes of 64 columns, 4 k16 steps each (32 bytes apart).
__device__ __forceinline__ void gemm_qk(SAcc& s, unsigned q_base, unsigned k_base) {
#pragma unroll
  for (int c = 0; c < KCHUNKS; ++c) {
#pragma unroll
    for (int k = 0; k < BOX_COLS / 16; ++k) {
      const unsigned long long a = smem_desc(q_base + c * BLOCK_M * 128 + k * 32, 16, 1024);
      const unsigned long long b = smem_desc(k_base + c * BLOCK_N * 128 + k * 32, 16, 1024);
      Ss<BLOCK_N>::mma(s, a, b, c > 0 || k > 0);
    }
  }
}

// O += P V: P (64 x BLOCK_N) from registers, V (BLOCK_N x D) MN-major; each k16 step is 16 key
// rows (2048 bytes); V's 64-column boxes are LBO = BLOCK_N * 128 apart, 8-row groups SBO = 1024.
__device__ __forceinline__ void gemm_pv(OAcc& o, const PFrag& p, unsigned v_base) {
#pragma unroll
  for (int k = 0; k < BLOCK_N / 16; ++k) Rs<HEAD_DIM>::mma(o, p[k], smem_desc(v_base + k * 2048, BLOCK_N * 128, 1024));
}

// Masks out keys that are beyond seqlen_k or (causal) after row + seqlen_k - seqlen_q.
__device__ __forceinline__ void apply_mask(SAcc& s, int n0, int row0, int seqlen_k, int causal_off, bool causal) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int j = 0; j < BLOCK_N / 8; ++j) {
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
template <bool kFirst>
__device__ __forceinline__ bool softmax_step(SAcc& s, float (&m)[2], float (&l)[2], float (&corr)[2], float scale_log2) {
  float mx[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float x = m[h];
#pragma unroll
    for (int j = 0; j < BLOCK_N / 8; ++j) x = fmaxf(x, fmaxf(s[4 * j + 2 * h], s[4 * j + 2 * h + 1]));
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
    for (int j = 0; j < BLOCK_N / 8; ++j) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        float& x = s[4 * j + 2 * h + c];
        const float arg = fmaf(x, scale_log2, -ms);
        x = EXP2_POLY && j % (EXP2_POLY ? EXP2_POLY : 1) == EXP2_POLY - 1 ? ex2_poly(arg) : ex2(arg);
        sum += x;
      }
    }
    l[h] = kFirst ? sum : l[h] * corr[h] + sum;
  }
  return rescale;
}

// The accumulator layout of S equals the A-operand register layout of m64k16, so P is packed
// pairwise: k16 step k uses S columns 16k..16k+15 = accumulator blocks j = 2k, 2k+1.
__device__ __forceinline__ void to_bf16(const SAcc& s, PFrag& p) {
#pragma unroll
  for (int k = 0; k < BLOCK_N / 16; ++k) {
    p[k][0] = pack_bf16(s[8 * k + 0], s[8 * k + 1]);
    p[k][1] = pack_bf16(s[8 * k + 2], s[8 * k + 3]);
    p[k][2] = pack_bf16(s[8 * k + 4], s[8 * k + 5]);
    p[k][3] = pack_bf16(s[8 * k + 6], s[8 * k + 7]);
  }
}

__device__ __forceinline__ void rescale_o(OAcc& o, const float (&corr)[2]) {
#pragma unroll
  for (int j = 0; j < HEAD_DIM / 8; ++j) {
    o[4 * j + 0] *= corr[0];
    o[4 * j + 1] *= corr[0];
    o[4 * j + 2] *= corr[1];
    o[4 * j + 3] *= corr[1];
  }
}

template <class T, int N>
__device__ __forceinline__ void fence_all(T (&x)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) reg_fence(x[i]);
}

__device__ __forceinline__ void fence_p(PFrag& p) {
#pragma unroll
  for (int k = 0; k < BLOCK_N / 16; ++k) fence_all(p[k]);
}

// ---------------------------------------------------------------------------------------------
// The kernel
// ---------------------------------------------------------------------------------------------
struct Tile {
  int m_block, h, b, hkv, n_blocks;
};

// Tile `idx` of num_m * Hq * B. The (head, batch) pairs go in chunks of HEAD_CHUNK: CTAs running
// together then share those heads' K/V in L2. Inside a chunk the longest rows (largest m_block,
// which see the most keys under a causal mask) come first, so short tiles fill the tail.
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
  t.n_blocks = (n_keys + BLOCK_N - 1) / BLOCK_N;
  return t;
}

struct Smem {
  unsigned base;
  // full_* : TMA -> consumers (transaction bytes), empty_* : consumers -> producer (one arrive per consumer warp)
  __device__ unsigned full_q(int b) const { return base + OFF_BAR + 8 * b; }
  __device__ unsigned empty_q(int b) const { return base + OFF_BAR + 8 * (2 + b); }
  __device__ unsigned full_k(int s) const { return base + OFF_BAR + 8 * (4 + s); }
  __device__ unsigned full_v(int s) const { return base + OFF_BAR + 8 * (4 + STAGES + s); }
  __device__ unsigned empty_k(int s) const { return base + OFF_BAR + 8 * (4 + 2 * STAGES + s); }
  __device__ unsigned empty_v(int s) const { return base + OFF_BAR + 8 * (4 + 3 * STAGES + s); }
  __device__ unsigned q(int b) const { return base + b * Q_BYTES; }
  __device__ unsigned k(int s) const { return base + OFF_K + s * KV_BYTES; }
  __device__ unsigned v(int s) const { return base + OFF_V + s * KV_BYTES; }
};

// The producer's thread: tiles (the first from blockIdx, then, persistent, claimed one by one
// from p.tile_counter, so CTAs that drew short causal tiles take more); each index goes to the
// consumers through its Q buffer's tile slot with the Q load, and num_tiles tells them to stop.
__device__ __forceinline__ void produce(const AvoAttnParams& p, const Smem& sm, unsigned char* smem) {
  const int num_m = (p.seqlen_q + BLOCK_M - 1) / BLOCK_M;
  const int num_tiles = num_m * p.heads_q * p.batch;
  int idx = PERSISTENT ? blockIdx.x : blockIdx.x + num_m * (blockIdx.y + p.heads_q * blockIdx.z);
  volatile int* tile_slot = reinterpret_cast<volatile int*>(smem + OFF_TILE);
  int kv_it = 0;  // K/V blocks loaded so far: ring slot and barrier parity
  for (int q_it = 0;; ++q_it) {
    const int qb = q_it % Q_BUF;
    mbar_wait(sm.empty_q(qb), ((q_it / Q_BUF) & 1) ^ 1);  // a fresh barrier counts as released
    const bool done = idx >= num_tiles;
    tile_slot[qb] = done ? num_tiles : idx;
    const Tile t = tile_at(p, done ? 0 : idx, num_m);
    if (done || t.n_blocks == 0) {
      mbar_arrive(sm.full_q(qb));
      if (done) break;
    } else {
      mbar_expect_tx(sm.full_q(qb), Q_BYTES);
      for (int c = 0; c < KCHUNKS; ++c)
        tma_load(sm.q(qb) + c * BLOCK_M * 128, &p.tma_q, sm.full_q(qb), c * BOX_COLS, t.m_block * BLOCK_M, t.h, t.b);
    }
    idx = PERSISTENT ? atomicAdd(p.tile_counter, 1) + gridDim.x : num_tiles;
#pragma unroll 1
    for (int i = 0; i < t.n_blocks; ++i, ++kv_it) {
      const int n0 = (t.n_blocks - 1 - i) * BLOCK_N;
      const int s = kv_it % STAGES;
      const unsigned parity = ((kv_it / STAGES) & 1) ^ 1;
      mbar_wait(sm.empty_k(s), parity);
      mbar_expect_tx(sm.full_k(s), KV_BYTES);
      for (int c = 0; c < KCHUNKS; ++c)
        tma_load(sm.k(s) + c * BLOCK_N * 128, &p.tma_k, sm.full_k(s), c * BOX_COLS, n0, t.hkv, t.b);
      mbar_wait(sm.empty_v(s), parity);
      mbar_expect_tx(sm.full_v(s), KV_BYTES);
      for (int c = 0; c < KCHUNKS; ++c)
        tma_load(sm.v(s) + c * BLOCK_N * 128, &p.tma_v, sm.full_v(s), c * BOX_COLS, n0, t.hkv, t.b);
    }
  }
}

// A consumer warpgroup's view of one tile: its rows and which key blocks need the mask.
struct Rows {
  Tile t;
  int row0;  // this thread's first row
  __device__ Rows(const Tile& tile, int cw, int warp, int lane)
      : t(tile), row0(tile.m_block * BLOCK_M + 64 * cw + 16 * warp + lane / 4) {}
  // A block needs masking if it reaches past seqlen_k or (causal) past the tile's first row.
  __device__ bool needs_mask(const AvoAttnParams& p, int n0) const {
    return n0 + BLOCK_N > p.seqlen_k || (p.causal && n0 + BLOCK_N - 1 > t.m_block * BLOCK_M + p.seqlen_k - p.seqlen_q);
  }
  __device__ int n0(int i) const { return (t.n_blocks - 1 - i) * BLOCK_N; }  // i-th block in processing order
};

// Writes this thread's rows of O (normalised by the full row sums) and LSE; rows with no visible
// key (l = 0) write 0 / -inf.
__device__ __forceinline__ void epilogue(const AvoAttnParams& p, const Rows& r, const OAcc& o, const float (&m)[2],
                                         float (&l)[2], float scale_log2) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    l[h] += __shfl_xor_sync(0xffffffffu, l[h], 1);
    l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);
  }
  __nv_bfloat16* o_base = p.o + r.t.b * p.o_batch_stride + r.t.h * p.o_head_stride;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int row = r.row0 + 8 * h;
    if (row < p.seqlen_q) {
      const float inv = l[h] > 0.f ? 1.f / l[h] : 0.f;
      __nv_bfloat16* orow = o_base + (long long)row * p.o_row_stride + 2 * (lane & 3);
#pragma unroll
      for (int j = 0; j < HEAD_DIM / 8; ++j)
        *reinterpret_cast<unsigned*>(orow + 8 * j) = pack_bf16(o[4 * j + 2 * h] * inv, o[4 * j + 2 * h + 1] * inv);
      if ((lane & 3) == 0) {
        p.lse[r.t.b * p.lse_batch_stride + r.t.h * p.lse_head_stride + row] =
            l[h] > 0.f ? (m[h] * scale_log2 + __log2f(l[h])) * 0.69314718055994531f : NEG_INF;
      }
    }
  }
}

// A consumer warpgroup: rows 64*cw .. 64*cw+63 of every tile the producer hands over.
__device__ __forceinline__ void consume(const AvoAttnParams& p, const Smem& sm, unsigned char* smem, int cw) {
  const int warp = (threadIdx.x / 32) & 3, lane = threadIdx.x & 31;
  const unsigned q_off = 64 * cw * 128;  // this warpgroup's 64 rows inside a Q buffer
  const int causal_off = p.seqlen_k - p.seqlen_q;
  const float scale_log2 = p.softmax_scale_log2;

  // Ping-pong: a warpgroup issues its GEMMs only in its turn and hands the turn on right after,
  // so one warpgroup's softmax runs while the other's GEMMs occupy the tensor cores. Both
  // warpgroups see the same tiles and take the same number of turns.
  auto turn_begin = [&]() { if (PINGPONG) bar_sync(1 + cw, 256); };
  auto turn_end = [&]() { if (PINGPONG) bar_arrive(1 + (cw ^ 1), 256); };
  auto release = [&](unsigned bar) {
    __syncwarp();
    if (lane == 0) mbar_arrive(bar);
  };
  if (PINGPONG && cw == 1) bar_arrive(1, 256);  // consumer 0 takes the first turn

  const int num_m = (p.seqlen_q + BLOCK_M - 1) / BLOCK_M;
  const int num_tiles = num_m * p.heads_q * p.batch;
  const volatile int* tile_slot = reinterpret_cast<const volatile int*>(smem + OFF_TILE);
  // the index of tile number `it` (counting this CTA's tiles), once its Q buffer is full
  auto fetch = [&](int it) {
    mbar_wait(sm.full_q(it % Q_BUF), (it / Q_BUF) & 1);
    return __shfl_sync(0xffffffffu, tile_slot[it % Q_BUF], 0);  // warp-uniform, so wgmma stays convergent
  };

  int kv_it = 0;  // K/V blocks consumed so far (ring slot and parity)
  int q_it = 0;   // tiles fetched so far
  int idx = fetch(0);
  OAcc o;
  SAcc s;
  PFrag pr;
  float m[2], l[2], corr[2];
  while (idx < num_tiles) {
    Rows r(tile_at(p, idx, num_m), cw, warp, lane);
    if (r.t.n_blocks == 0) {  // no key is visible to any row of this tile: nothing was loaded
      release(sm.empty_q(q_it % Q_BUF));
#pragma unroll
      for (int i = 0; i < HEAD_DIM / 2; ++i) o[i] = 0.f;
      m[0] = m[1] = NEG_INF;
      l[0] = l[1] = 0.f;
      epilogue(p, r, o, m, l, scale_log2);
      idx = fetch(++q_it);
      continue;
    }
    // the first block of a tile that starts afresh: S, softmax, P
    {
      const int sk = kv_it % STAGES;
      mbar_wait(sm.full_k(sk), (kv_it / STAGES) & 1);
      turn_begin();
      wgmma_fence();
      gemm_qk(s, sm.q(q_it % Q_BUF) + q_off, sm.k(sk));
      wgmma_commit();
      turn_end();
      wgmma_wait<0>();
      fence_all(s);
      release(sm.empty_k(sk));
      if (r.t.n_blocks == 1) release(sm.empty_q(q_it % Q_BUF));
#pragma unroll
      for (int i = 0; i < HEAD_DIM / 2; ++i) o[i] = 0.f;
      m[0] = m[1] = NEG_INF;
      l[0] = l[1] = 0.f;
      if (r.needs_mask(p, r.n0(0))) apply_mask(s, r.n0(0), r.row0, p.seqlen_k, causal_off, p.causal);
      softmax_step<true>(s, m, l, corr, scale_log2);
      to_bf16(s, pr);
    }
    int i = 1;
    while (true) {
      if (i < r.t.n_blocks) {  // S of block i with the PV of block i - 1
        const int it_k = kv_it + i, it_v = kv_it + i - 1;
        const int sk = it_k % STAGES, sv = it_v % STAGES;
        mbar_wait(sm.full_k(sk), (it_k / STAGES) & 1);
        turn_begin();
        wgmma_fence();
        gemm_qk(s, sm.q(q_it % Q_BUF) + q_off, sm.k(sk));
        wgmma_commit();
        mbar_wait(sm.full_v(sv), (it_v / STAGES) & 1);
        gemm_pv(o, pr, sm.v(sv));  // overlaps the softmax below
        wgmma_commit();
        turn_end();
        wgmma_wait<1>();  // S ready
        fence_all(s);
        release(sm.empty_k(sk));
        if (i == r.t.n_blocks - 1) release(sm.empty_q(q_it % Q_BUF));  // last use of Q: the buffer may refill
        if (r.needs_mask(p, r.n0(i))) apply_mask(s, r.n0(i), r.row0, p.seqlen_k, causal_off, p.causal);
        const bool rescale = softmax_step<false>(s, m, l, corr, scale_log2);
        wgmma_wait<0>();  // PV done: O and P registers are free
        fence_all(o);
        fence_p(pr);
        release(sm.empty_v(sv));
        if (rescale) rescale_o(o, corr);
        to_bf16(s, pr);
        ++i;
        continue;
      }
      // Every block of this tile but its last PV is done. If the next tile has keys, its first S
      // goes to the tensor cores with that PV, and this tile's epilogue runs while they work.
      const int it_v = kv_it + r.t.n_blocks - 1, sv = it_v % STAGES;
      const int next = fetch(q_it + 1);
      const bool handoff = next < num_tiles && tile_at(p, next, num_m).n_blocks > 0;
      if (handoff) {
        const Rows r2(tile_at(p, next, num_m), cw, warp, lane);
        const int it_k = kv_it + r.t.n_blocks, sk = it_k % STAGES;
        const int qb2 = (q_it + 1) % Q_BUF;
        mbar_wait(sm.full_k(sk), (it_k / STAGES) & 1);
        turn_begin();
        wgmma_fence();
        gemm_qk(s, sm.q(qb2) + q_off, sm.k(sk));
        wgmma_commit();
        mbar_wait(sm.full_v(sv), (it_v / STAGES) & 1);
        gemm_pv(o, pr, sm.v(sv));
        wgmma_commit();
        turn_end();
        wgmma_wait<1>();
        fence_all(s);
        release(sm.empty_k(sk));
        if (r2.t.n_blocks == 1) release(sm.empty_q(qb2));
        if (r2.needs_mask(p, r2.n0(0))) apply_mask(s, r2.n0(0), r2.row0, p.seqlen_k, causal_off, p.causal);
        float m2[2] = {NEG_INF, NEG_INF}, l2[2] = {0.f, 0.f};
        softmax_step<true>(s, m2, l2, corr, scale_log2);
        wgmma_wait<0>();
        fence_all(o);
        fence_p(pr);
        release(sm.empty_v(sv));
        epilogue(p, r, o, m, l, scale_log2);
#pragma unroll
        for (int j = 0; j < HEAD_DIM / 2; ++j) o[j] = 0.f;
        m[0] = m2[0], m[1] = m2[1], l[0] = l2[0], l[1] = l2[1];
        to_bf16(s, pr);
        kv_it += r.t.n_blocks;
        ++q_it;
        r = r2;
        i = 1;
        continue;
      }
      // no next tile to overlap with: the last PV alone, then the epilogue
      mbar_wait(sm.full_v(sv), (it_v / STAGES) & 1);
      turn_begin();
      wgmma_fence();
      gemm_pv(o, pr, sm.v(sv));
      wgmma_commit();
      turn_end();
      wgmma_wait<0>();
      fence_all(o);
      release(sm.empty_v(sv));
      epilogue(p, r, o, m, l, scale_log2);
      kv_it += r.t.n_blocks;
      ++q_it;
      idx = next;
      break;
    }
  }
}

extern "C" __global__ void __launch_bounds__(NUM_THREADS, CTAS_PER_SM) avo_attention(const __grid_constant__ AvoAttnParams p) {
  extern __shared__ unsigned char smem_raw[];
  unsigned char* smem = reinterpret_cast<unsigned char*>((reinterpret_cast<size_t>(smem_raw) + 1023) & ~size_t(1023));
  const Smem sm{smem_u32(smem)};

  const int warpgroup = threadIdx.x / 128;
  if (threadIdx.x == 0) {
    for (int b = 0; b < Q_BUF; ++b) {
      mbar_init(sm.full_q(b), 1);
      mbar_init(sm.empty_q(b), NUM_CONSUMERS * 4);
    }
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
    if (threadIdx.x == 0) produce(p, sm, smem);
    return;
  }
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(CONSUMER_REGS));
  consume(p, sm, smem, warpgroup - 1);
}
