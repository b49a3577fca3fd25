// What a device backend implements: the interface between the operator layer
// (csrc/penalty_ops.h, csrc/prox_ops.h) and the kernels (csrc/cpu, csrc/cuda).
//
// The operator layer validates arguments, makes every tensor dense and
// allocates outputs; a backend only streams over memory. Conventions:
// - `dense[t]` is params[t] itself when its elements fill one span of memory,
//   else a contiguous copy; kernels read it flat, in memory order.
// - `stats` is float64 [n, 2]: (sum |x|, sum x^2) of tensor t in row t.
// - `targets[t]` has exactly the strides of `dense[t]`, so element i of one is
//   element i of the other.
// - The tensors of one in-place call never share memory (the operator layer
//   splits aliasing lists into runs, csrc/aliasing.h).
// - Coefficients (l1, l2, thresholds) are checked 0-dim tensors on the CPU or on
//   the parameters' device; a backend reads one where it lies, never copying it
//   between host and device.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

#include "groups.h"

namespace regext {

struct GradRequest {
  at::ArrayRef<at::Tensor> dense;    // parameters
  at::ArrayRef<at::Tensor> targets;  // gradients to write or add to
  const at::Tensor& stats;
  at::ArrayRef<int64_t> rows;    // stats row of each parameter
  const at::Tensor& grad_total;  // 0-dim, on the parameters' device
  const at::Tensor& l1;          // 0-dim coefficients: on the CPU or the
  const at::Tensor& l2;          // parameters' device (param_checks.h)
  bool l2_squared;
  bool accumulate;  // targets[t] += ... instead of targets[t] = ...
};

// The group lasso's gradient (csrc/groups.h): layouts[t] describes dense[t] and
// the stats row of its group 0.
struct GroupGradRequest {
  at::ArrayRef<at::Tensor> dense;
  at::ArrayRef<at::Tensor> targets;
  at::ArrayRef<GroupLayout> layouts;
  const at::Tensor& stats;
  const at::Tensor& grad_total;
  const at::Tensor& l1;
  const at::Tensor& l2;
  bool accumulate;
};

// Both backends provide these static functions (csrc/cpu/*.cpp, csrc/cuda/*.cu):
//   empty_like_dense(t)             a new tensor with the sizes and strides of dense `t`
//   stats_and_total(dense, stats, total, l1, l2, l2_squared)
//                                   every row of `stats` and the 0-dim `total`
//                                   (float32 or float64)
//   grads(request)                  writes or adds every gradient
//   prox_l1(dense, threshold)       soft_threshold (penalty_math.h) of every element
//   prox_group_l2(dense, stats, threshold)
//                                   dense[t] *= group_shrink_scale(stats[t][1], threshold);
//                                   a factor of exactly 1 leaves the tensor untouched
//   prox_metric(dense, moments, means, coefs)
//                                   dense[t][i] = metric_prox(dense[t][i], d, row t of
//                                   coefs) with d = metric_denominator(moments[t][i],
//                                   means[t][i]) (penalty_math.h; `means` empty: none).
//                                   moments[t] and means[t] have dense[t]'s strides;
//                                   `coefs`: float64 [n, kMetricColumns] on the tensors'
//                                   device; a row whose steps are both 0 leaves
//                                   dense[t] untouched
//   count_zeros(dense, counts)      counts[t] = elements of dense[t] equal to +-0
//                                   (`counts`: int64 [n] on the tensors' device)
// and, for the group lasso (csrc/groups.h: `layouts[t]` describes dense[t]),
//   group_stats_and_total(dense, layouts, stats, total, l1, l2)
//                                   stats[first_row + g] = (sum |x|, sum x^2) of group g,
//                                   total = l1 * sum |x| + l2 * sum_g w_g ||x_g||_2
//   group_grads(request)            writes or adds every gradient:
//                                   l1 sign(x) + l2 w_g x / ||x_g||, times grad_total
//   prox_group_lasso(dense, layouts, threshold)
//                                   each group *= group_shrink_scale(its sum x^2,
//                                   threshold * w_g), from sums equal to
//                                   group_stats_and_total's (the backend may compute
//                                   them in the same pass); a factor of 1 leaves it untouched
//   prox_group_metric(dense, moments, means, layouts, coefs)
//                                   each group's proximal step in the metric
//                                   (csrc/group_metric_math.h) with lam = coefs[t][0] * w_g
//                                   and d from moments/means as prox_metric's; a row
//                                   with coefs[t][0] = 0 leaves dense[t] untouched
// and say in kSamePassSquaredAccumulate whether they also have
//   stats_total_and_accumulate_squared(dense, targets, stats, total, l1, l2)
//                                   stats_and_total(l2_squared = true) and, in the
//                                   same read of each tensor, targets[t] += its
//                                   gradient (in that form it needs no norm)

struct CpuBackend {
  static constexpr bool kSamePassSquaredAccumulate = true;
  static at::Tensor empty_like_dense(const at::Tensor& t);
  static void stats_and_total(at::ArrayRef<at::Tensor> dense, const at::Tensor& stats,
                              const at::Tensor& total, const at::Tensor& l1, const at::Tensor& l2,
                              bool l2_squared);
  static void grads(const GradRequest& request);
  static void stats_total_and_accumulate_squared(at::ArrayRef<at::Tensor> dense,
                                                 at::ArrayRef<at::Tensor> targets,
                                                 const at::Tensor& stats, const at::Tensor& total,
                                                 const at::Tensor& l1, const at::Tensor& l2);
  static void prox_l1(at::ArrayRef<at::Tensor> dense, const at::Tensor& threshold);
  static void prox_group_l2(at::ArrayRef<at::Tensor> dense, const at::Tensor& stats,
                            const at::Tensor& threshold);
  static void prox_metric(at::ArrayRef<at::Tensor> dense, at::ArrayRef<at::Tensor> moments,
                          at::ArrayRef<at::Tensor> means, const at::Tensor& coefs);
  static void count_zeros(at::ArrayRef<at::Tensor> dense, const at::Tensor& counts);
  static void group_stats_and_total(at::ArrayRef<at::Tensor> dense,
                                    at::ArrayRef<GroupLayout> layouts, const at::Tensor& stats,
                                    const at::Tensor& total, const at::Tensor& l1,
                                    const at::Tensor& l2);
  static void group_grads(const GroupGradRequest& request);
  static void prox_group_lasso(at::ArrayRef<at::Tensor> dense, at::ArrayRef<GroupLayout> layouts,
                               const at::Tensor& threshold);
  static void prox_group_metric(at::ArrayRef<at::Tensor> dense, at::ArrayRef<at::Tensor> moments,
                                at::ArrayRef<at::Tensor> means, at::ArrayRef<GroupLayout> layouts,
                                const at::Tensor& coefs);
};

struct CudaBackend {
  static constexpr bool kSamePassSquaredAccumulate = false;
  static at::Tensor empty_like_dense(const at::Tensor& t);
  static void stats_and_total(at::ArrayRef<at::Tensor> dense, const at::Tensor& stats,
                              const at::Tensor& total, const at::Tensor& l1, const at::Tensor& l2,
                              bool l2_squared);
  static void grads(const GradRequest& request);
  static void prox_l1(at::ArrayRef<at::Tensor> dense, const at::Tensor& threshold);
  static void prox_group_l2(at::ArrayRef<at::Tensor> dense, const at::Tensor& stats,
                            const at::Tensor& threshold);
  static void prox_metric(at::ArrayRef<at::Tensor> dense, at::ArrayRef<at::Tensor> moments,
                          at::ArrayRef<at::Tensor> means, const at::Tensor& coefs);
  static void count_zeros(at::ArrayRef<at::Tensor> dense, const at::Tensor& counts);
  static void group_stats_and_total(at::ArrayRef<at::Tensor> dense,
                                    at::ArrayRef<GroupLayout> layouts, const at::Tensor& stats,
                                    const at::Tensor& total, const at::Tensor& l1,
                                    const at::Tensor& l2);
  static void group_grads(const GroupGradRequest& request);
  static void prox_group_lasso(at::ArrayRef<at::Tensor> dense, at::ArrayRef<GroupLayout> layouts,
                               const at::Tensor& threshold);
  static void prox_group_metric(at::ArrayRef<at::Tensor> dense, at::ArrayRef<at::Tensor> moments,
                                at::ArrayRef<at::Tensor> means, at::ArrayRef<GroupLayout> layouts,
                                const at::Tensor& coefs);
};

}  // namespace regext
