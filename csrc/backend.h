// The interface between the operators (csrc/penalty_ops.cpp) and the device
// kernels (csrc/cpu, csrc/cuda). The operators validate arguments, make every
// tensor dense and allocate outputs; a backend only streams over memory.
//
// Conventions shared by all backends:
// - `dense[t]` is params[t] itself when its elements fill one span of memory,
//   else a contiguous copy; kernels read it flat, in memory order.
// - `stats` is float64 [n, 2]: (sum |x|, sum x^2) of tensor t in row t.
// - `targets[t]` has exactly the strides of `dense[t]`, so element i of one is
//   element i of the other.
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

namespace regext {

struct GradRequest {
  const std::vector<at::Tensor>& dense;    // parameters
  const std::vector<at::Tensor>& targets;  // gradients to write or add to
  const at::Tensor& stats;
  const std::vector<int64_t>& rows;        // stats row of each parameter
  const at::Tensor& grad_total;            // 0-dim, on the parameters' device
  double l1;
  double l2;
  bool l2_squared;
  bool accumulate;  // targets[t] += ... instead of targets[t] = ...
};

namespace cpu {
// Writes every row of `stats` and the 0-dim `total` (float32 or float64).
void penalty_stats_and_total(const std::vector<at::Tensor>& dense, const at::Tensor& stats,
                             const at::Tensor& total, double l1, double l2, bool l2_squared);
void penalty_grads(const GradRequest& request);
// penalty_stats_and_total(l2_squared = true), and in the same read of each
// tensor targets[t] += its gradient (which in this form needs no norm).
// The targets share no memory with each other (one alias-free run).
void penalty_stats_total_and_accumulate_squared(const std::vector<at::Tensor>& dense,
                                                const std::vector<at::Tensor>& targets,
                                                const at::Tensor& stats, const at::Tensor& total,
                                                double l1, double l2);
}  // namespace cpu

#ifdef REGEXT_WITH_CUDA
namespace cuda {
void penalty_stats_and_total(const std::vector<at::Tensor>& dense, const at::Tensor& stats,
                             const at::Tensor& total, double l1, double l2, bool l2_squared);
void penalty_grads(const GradRequest& request);
}  // namespace cuda
#endif

// ---- Proximal steps and sparsity (operators: csrc/prox_ops.cpp) ----
//
// Same conventions: every tensor of `dense` is dense and is updated in place,
// flat in memory order; the operator has already split the list into runs
// without shared memory, so the tensors of one call never alias each other.
namespace cpu {
// x <- soft_threshold(x, threshold) (penalty_math.h) for every element.
void prox_l1(const std::vector<at::Tensor>& dense, double threshold);
// dense[t] *= group_shrink_scale(stats[t][1], threshold) (penalty_math.h); a
// factor of exactly 1 leaves the tensor untouched. `stats` as above.
void prox_group_l2(const std::vector<at::Tensor>& dense, const at::Tensor& stats,
                   double threshold);
// counts[t] = the number of elements of dense[t] equal to +0 or -0; `counts`
// is int64 [n] on the tensors' device.
void count_zeros(const std::vector<at::Tensor>& dense, const at::Tensor& counts);
}  // namespace cpu

#ifdef REGEXT_WITH_CUDA
namespace cuda {
void prox_l1(const std::vector<at::Tensor>& dense, double threshold);
void prox_group_l2(const std::vector<at::Tensor>& dense, const at::Tensor& stats,
                   double threshold);
void count_zeros(const std::vector<at::Tensor>& dense, const at::Tensor& counts);
}  // namespace cuda
#endif

}  // namespace regext
