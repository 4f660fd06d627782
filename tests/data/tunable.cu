// A contract-conforming kernel with several tunables, for loop tests (it computes nothing useful).
#include <avo/attention.cuh>

#define BLOCK_M 64    // @tunable 32 64 128
#define BLOCK_N 64    // @tunable 32 64 128
#define NUM_WARPS 4   // @tunable 2 4 8
#define STAGES 2      // @tunable 1 2 3

AVO_LAUNCH(NUM_WARPS * 32, STAGES * BLOCK_N * AVO_HEAD_DIM * 2, BLOCK_M, 0, 0, 0);

extern "C" __global__ void avo_attention(const __grid_constant__ AvoAttnParams p) {
  if (threadIdx.x == 0 && blockIdx.x == 0) p.lse[0] = 0.f;
}
