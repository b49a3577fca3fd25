// Deterministic block-wide sums: a fixed butterfly inside each warp, then a
// fixed butterfly over the warp results. No atomics, so the same inputs give
// the same bits on every run.
#pragma once

#include <cuda_runtime.h>

namespace regext::cuda {

struct SumPair {
  double a;
  double b;
};

__device__ __forceinline__ SumPair warp_sum(SumPair v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    v.a += __shfl_xor_sync(0xffffffffu, v.a, offset);
    v.b += __shfl_xor_sync(0xffffffffu, v.b, offset);
  }
  return v;
}

// Every thread of the block must call it; the result is valid in thread 0.
// blockDim.x must be a multiple of 32 and at most 1024.
__device__ __forceinline__ SumPair block_sum(SumPair v) {
  __shared__ SumPair warp_results[32];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int num_warps = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // warp_results may still be read by a previous call
  if (lane == 0) warp_results[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < num_warps ? warp_results[lane] : SumPair{0.0, 0.0};
    v = warp_sum(v);
  }
  return v;
}

}  // namespace regext::cuda
