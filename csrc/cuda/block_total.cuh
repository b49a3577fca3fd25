// The penalty's 0-dim total from per-row sums, formed by one block: shared by
// the per-tensor (penalty_cuda.cu) and group (group_cuda.cu) forward kernels.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../penalty_math.h"
#include "block_reduce.cuh"
#include "device_scalar.cuh"

namespace regext::cuda {

// l1 * sum_r stats[r][0] + l2 * sum_r l2_term_of(r) over rows [0, num_rows), added
// in float64 in a fixed order, written by thread 0 as float32 or float64. Called
// by all threads of one block. (`stats` may have been written by the same kernel:
// the caller reads it through plain loads, never __restrict__.)
template <typename L2TermOf>
__device__ void write_block_total(const double* stats, int64_t num_rows, L2TermOf&& l2_term_of,
                                  DeviceScalar l1, DeviceScalar l2, void* out, bool out_is_double) {
  SumPair sums{0.0, 0.0};
  for (int64_t r = threadIdx.x; r < num_rows; r += blockDim.x) {
    sums.a += stats[r * kStatsColumns + 0];
    sums.b += l2_term_of(r);
  }
  sums = block_sum(sums);
  if (threadIdx.x == 0) {
    PenaltyTotals totals;
    totals.sum_l1 = sums.a;
    totals.sum_l2 = sums.b;
    const double value = totals.combine(l1.get(), l2.get());
    if (out_is_double) {
      *static_cast<double*>(out) = value;
    } else {
      *static_cast<float*>(out) = static_cast<float>(value);
    }
  }
}

}  // namespace regext::cuda
