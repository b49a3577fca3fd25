// The penalty operators (schemas: csrc/schemas.h), written once over a backend
// (csrc/backend.h): argument checks, dense views, output allocation. The
// dispatcher picks the backend: csrc/cpu/register_cpu.cpp and
// csrc/cuda/register_cuda.cpp register these templates for their keys.
#pragma once

#include <ATen/ATen.h>

#include <numeric>
#include <tuple>
#include <vector>

#include "aliasing.h"
#include "backend.h"
#include "param_checks.h"
#include "penalty_math.h"
#include "staging.h"

namespace regext {

inline void check_coefficients(const char* op, const at::Tensor& l1, const at::Tensor& l2,
                               c10::Device device) {
  check_coefficient(op, "l1", l1, device);
  check_coefficient(op, "l2", l2, device);
}

// The forward's outputs: float64 [n, 2] stats and the 0-dim total.
inline std::tuple<at::Tensor, at::Tensor> empty_stats_and_total(at::TensorList params,
                                                                c10::Device device) {
  const auto options = at::TensorOptions().device(device);
  return {
      at::empty({static_cast<int64_t>(params.size()), kStatsColumns}, options.dtype(at::kDouble)),
      at::empty({}, options.dtype(result_dtype(params)))};
}

template <typename Backend>
std::tuple<at::Tensor, at::Tensor> penalty_forward(at::TensorList params, const at::Tensor& l1,
                                                   const at::Tensor& l2, bool l2_squared) {
  constexpr const char* op = "regext::penalty_forward";
  const c10::Device device = device_of(op, params);
  check_coefficients(op, l1, l2, device);
  check_tensor_list(op, "params", params, device);
  auto [stats, total] = empty_stats_and_total(params, device);
  Backend::stats_and_total(as_dense(params), stats, total, l1, l2, l2_squared);
  return {total, stats};
}

// The checks a backward operator starts with (every argument on one device).
inline void check_backward_arguments(const char* op, const at::Tensor& grad_total,
                                     at::TensorList params, const at::Tensor& stats,
                                     const at::Tensor& l1, const at::Tensor& l2) {
  const c10::Device device = device_of(op, params);
  check_coefficients(op, l1, l2, device);
  check_tensor_list(op, "params", params, device);
  check_stats(op, stats, device);
  check_grad_total(op, grad_total, device);
}

// New gradients for penalty_backward: a dense parameter's gradient gets its
// memory layout (channels-last stays channels-last), as empty_like and the fake
// kernel give. Only when a strided view suggests a layout other than its dense
// copy's is the gradient computed in a staging tensor (`targets`) and copied.
struct GradOutputs {
  std::vector<at::Tensor> grads, targets;
  std::vector<size_t> staged;
  std::vector<at::Tensor> finish() {
    for (size_t t : staged) grads[t].copy_(targets[t]);
    return std::move(grads);
  }
};

template <typename Backend>
GradOutputs new_grad_outputs(at::TensorList params, const std::vector<at::Tensor>& dense) {
  GradOutputs out;
  out.grads.reserve(dense.size());
  out.targets.reserve(dense.size());
  for (size_t t = 0; t < dense.size(); ++t) {
    out.grads.push_back(dense[t].is_same(params[t]) ? Backend::empty_like_dense(params[t])
                                                    : at::empty_like(params[t]));
    if (out.grads[t].strides() == dense[t].strides()) {
      out.targets.push_back(out.grads[t]);
    } else {
      out.targets.push_back(at::empty_like(dense[t]));
      out.staged.push_back(t);
    }
  }
  return out;
}

template <typename Backend>
std::vector<at::Tensor> penalty_backward(const at::Tensor& grad_total, at::TensorList params,
                                         const at::Tensor& stats, const at::Tensor& l1,
                                         const at::Tensor& l2, bool l2_squared,
                                         c10::OptionalArrayRef<int64_t> stats_rows) {
  constexpr const char* op = "regext::penalty_backward";
  check_backward_arguments(op, grad_total, params, stats, l1, l2);
  const std::vector<int64_t> rows =
      resolve_stats_rows(op, stats_rows, static_cast<int64_t>(params.size()), stats.size(0));

  const std::vector<at::Tensor> dense = as_dense(params);
  GradOutputs out = new_grad_outputs<Backend>(params, dense);
  Backend::grads(GradRequest{dense, out.targets, stats, rows, grad_total, l1, l2, l2_squared,
                             /*accumulate=*/false});
  return out.finish();
}

// Calls accumulate(first, count) for each run of gradients without shared memory
// (csrc/aliasing.h), in list order, so a gradient listed twice receives both
// updates and is never raced on; then adds each staged target into its gradient.
template <typename Accumulate>
void accumulate_in_runs(at::TensorList grads, const std::vector<at::Tensor>& targets,
                        Accumulate&& accumulate) {
  const std::vector<size_t> runs = alias_free_runs(grads);
  for (size_t r = 0; r + 1 < runs.size(); ++r) {
    const size_t b = runs[r], n = runs[r + 1] - b;
    accumulate(b, n);
    for (size_t t = b; t < b + n; ++t) {
      if (!targets[t].is_same(grads[t])) grads[t].add_(targets[t]);
    }
  }
}

// grads[t] += d(penalty)/d(params[t]) from `stats`, in list order.
template <typename Backend>
void accumulate_grads(c10::Device device, at::TensorList grads,
                      const std::vector<at::Tensor>& dense, const std::vector<at::Tensor>& targets,
                      const at::Tensor& stats, at::ArrayRef<int64_t> rows, const at::Tensor& l1,
                      const at::Tensor& l2, bool l2_squared) {
  const at::Tensor one = at::ones({}, at::TensorOptions().device(device).dtype(at::kDouble));
  accumulate_in_runs(grads, targets, [&](size_t b, size_t n) {
    Backend::grads(GradRequest{at::ArrayRef<at::Tensor>(dense).slice(b, n),
                               at::ArrayRef<at::Tensor>(targets).slice(b, n), stats,
                               rows.slice(b, n), one, l1, l2, l2_squared,
                               /*accumulate=*/true});
  });
}

template <typename Backend>
void penalty_grad_accumulate_(at::TensorList grads, at::TensorList params, const at::Tensor& stats,
                              const at::Tensor& l1, const at::Tensor& l2, bool l2_squared,
                              c10::OptionalArrayRef<int64_t> stats_rows) {
  constexpr const char* op = "regext::penalty_grad_accumulate_";
  const c10::Device device = device_of(op, params);
  check_coefficients(op, l1, l2, device);
  check_grads_for(op, grads, params, device);
  check_stats(op, stats, device);
  const std::vector<int64_t> rows =
      resolve_stats_rows(op, stats_rows, static_cast<int64_t>(params.size()), stats.size(0));
  const std::vector<at::Tensor> dense = as_dense(params);
  accumulate_grads<Backend>(device, grads, dense, accumulate_targets(grads, dense), stats, rows, l1,
                            l2, l2_squared);
}

// True when the gradients can be updated while the parameters are still
// being read: every gradient is updated in place and no gradient shares
// memory with another gradient or with any parameter.
inline bool can_update_while_reading(at::TensorList grads, const std::vector<at::Tensor>& dense,
                                     const std::vector<at::Tensor>& targets) {
  for (size_t t = 0; t < grads.size(); ++t) {
    if (!targets[t].is_same(grads[t])) return false;
  }
  std::vector<at::Tensor> all(grads.begin(), grads.end());
  all.insert(all.end(), dense.begin(), dense.end());
  return no_tensors_overlap(all);  // one sort, not the run split: only "any?" matters
}

template <typename Backend>
std::tuple<at::Tensor, at::Tensor> penalty_forward_accumulate_(at::TensorList grads,
                                                               at::TensorList params,
                                                               const at::Tensor& l1,
                                                               const at::Tensor& l2,
                                                               bool l2_squared) {
  constexpr const char* op = "regext::penalty_forward_accumulate_";
  const c10::Device device = device_of(op, params);
  check_coefficients(op, l1, l2, device);
  check_grads_for(op, grads, params, device);
  auto [stats, total] = empty_stats_and_total(params, device);
  const std::vector<at::Tensor> dense = as_dense(params);
  const std::vector<at::Tensor> targets = accumulate_targets(grads, dense);
  if constexpr (Backend::kSamePassSquaredAccumulate) {
    if (l2_squared && can_update_while_reading(grads, dense, targets)) {
      // One read of each parameter: the squared form's gradient needs no norm.
      Backend::stats_total_and_accumulate_squared(dense, targets, stats, total, l1, l2);
      return {total, stats};
    }
  }
  // The Euclidean norm's gradient needs every norm first: a second read.
  Backend::stats_and_total(dense, stats, total, l1, l2, l2_squared);
  std::vector<int64_t> rows(params.size());
  std::iota(rows.begin(), rows.end(), int64_t{0});
  accumulate_grads<Backend>(device, grads, dense, targets, stats, rows, l1, l2, l2_squared);
  return {total, stats};
}

}  // namespace regext
