// Deterministic block-wide sums: a fixed butterfly inside each warp, then a
// fixed butterfly over the warp results. No atomics, so the same inputs give
// the same bits on every run.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace regext::cuda {

struct SumPair {
  double a;
  double b;
  __device__ SumPair& operator+=(const SumPair& o) {
    a += o.a;
    b += o.b;
    return *this;
  }
};

__device__ __forceinline__ SumPair shfl_xor(SumPair v, int offset) {
  return {__shfl_xor_sync(0xffffffffu, v.a, offset), __shfl_xor_sync(0xffffffffu, v.b, offset)};
}
__device__ __forceinline__ int64_t shfl_xor(int64_t v, int offset) {
  return __shfl_xor_sync(0xffffffffu, v, offset);
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += shfl_xor(v, offset);
  return v;
}

// Every thread of the block must call it; the result is valid in thread 0.
// blockDim.x must be a multiple of 32 and at most 1024.
template <typename T>
__device__ __forceinline__ T block_sum(T v) {
  __shared__ T warp_results[32];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int num_warps = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // warp_results may still be read by a previous call
  if (lane == 0) warp_results[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < num_warps ? warp_results[lane] : T{};
    v = warp_sum(v);
  }
  return v;
}

}  // namespace regext::cuda
