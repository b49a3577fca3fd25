// The penalty operators, for every device: argument checks, dense views,
// output allocation; the arithmetic is in the backends (csrc/backend.h).
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <torch/library.h>

#include <numeric>
#include <vector>

#include "aliasing.h"
#include "backend.h"
#include "chunking.h"
#include "cpu/output_alloc.h"
#include "param_checks.h"
#include "penalty_math.h"

namespace regext {
namespace {

bool on_cuda(c10::Device device) { return device.is_cuda(); }

void run_stats_and_total(c10::Device device, const std::vector<at::Tensor>& dense,
                         const at::Tensor& stats, const at::Tensor& total, double l1, double l2,
                         bool l2_squared) {
#ifdef REGEXT_WITH_CUDA
  if (on_cuda(device)) return cuda::penalty_stats_and_total(dense, stats, total, l1, l2, l2_squared);
#endif
  TORCH_CHECK(device.is_cpu(), "regext: no kernels for device ", device);
  cpu::penalty_stats_and_total(dense, stats, total, l1, l2, l2_squared);
}

void run_grads(c10::Device device, const GradRequest& request) {
#ifdef REGEXT_WITH_CUDA
  if (on_cuda(device)) return cuda::penalty_grads(request);
#endif
  TORCH_CHECK(device.is_cpu(), "regext: no kernels for device ", device);
  cpu::penalty_grads(request);
}

c10::Device device_of(const char* op, at::TensorList params) {
  TORCH_CHECK_VALUE(!params.empty(), op, ": params must hold at least one tensor");
  return params[0].device();
}

// A new tensor with the sizes and strides of the dense tensor `t`, which is
// what empty_like(t) gives (on CPU see csrc/cpu/output_alloc.h).
at::Tensor empty_with_layout_of(const at::Tensor& t) {
  if (t.device().is_cpu()) return cpu::empty_like_dense(t);
  return at::empty_strided(t.sizes(), t.strides(), t.options());
}

void check_coefficients(const char* op, double l1, double l2) {
  check_coefficient(op, "l1", l1);
  check_coefficient(op, "l2", l2);
}

std::tuple<at::Tensor, at::Tensor> penalty_forward(at::TensorList params, double l1, double l2,
                                                   bool l2_squared) {
  constexpr const char* op = "regext::penalty_forward";
  check_coefficients(op, l1, l2);
  const c10::Device device = device_of(op, params);
  check_tensor_list(op, "params", params, device);

  const auto options = at::TensorOptions().device(device);
  at::Tensor stats = at::empty({static_cast<int64_t>(params.size()), kStatsColumns},
                               options.dtype(at::kDouble));
  at::Tensor total = at::empty({}, options.dtype(result_dtype(params)));
  run_stats_and_total(device, as_dense(params), stats, total, l1, l2, l2_squared);
  return {total, stats};
}

std::vector<at::Tensor> penalty_backward(const at::Tensor& grad_total, at::TensorList params,
                                         const at::Tensor& stats, double l1, double l2,
                                         bool l2_squared,
                                         c10::OptionalArrayRef<int64_t> stats_rows) {
  constexpr const char* op = "regext::penalty_backward";
  check_coefficients(op, l1, l2);
  const c10::Device device = device_of(op, params);
  check_tensor_list(op, "params", params, device);
  check_stats(op, stats, device);
  check_grad_total(op, grad_total, device);
  const std::vector<int64_t> rows = resolve_stats_rows(
      op, stats_rows, static_cast<int64_t>(params.size()), stats.size(0));

  const std::vector<at::Tensor> dense = as_dense(params);
  // empty_like(param) keeps the strides of a dense parameter, so each gradient
  // has its parameter's memory layout (channels-last stays channels-last); the
  // fake kernel allocates the same way. Only when a strided view suggests a
  // layout other than its dense copy's is the gradient staged and copied.
  std::vector<at::Tensor> grads, targets;
  std::vector<size_t> staged;
  grads.reserve(dense.size());
  targets.reserve(dense.size());
  for (size_t t = 0; t < dense.size(); ++t) {
    grads.push_back(dense[t].is_same(params[t]) ? empty_with_layout_of(params[t])
                                                : at::empty_like(params[t]));
    if (grads[t].strides() == dense[t].strides()) {
      targets.push_back(grads[t]);
    } else {
      targets.push_back(at::empty_like(dense[t]));
      staged.push_back(t);
    }
  }
  run_grads(device, GradRequest{dense, targets, stats, rows, grad_total, l1, l2, l2_squared,
                                /*accumulate=*/false});
  for (size_t t : staged) grads[t].copy_(targets[t]);
  return grads;
}

// Checks shared by the accumulating operators: every gradient matches its
// parameter's shape and dtype, lies on the same device and owns its elements.
void check_grads_for(const char* op, at::TensorList grads, at::TensorList params,
                     c10::Device device) {
  check_tensor_list(op, "params", params, device);
  check_tensor_list(op, "grads", grads, device);
  check_same_shapes(op, "grads", grads, params);
  for (size_t t = 0; t < grads.size(); ++t) {
    TORCH_CHECK_TYPE(grads[t].scalar_type() == params[t].scalar_type(), op, ": grads[", t,
                     "] has dtype ", grads[t].scalar_type(), " but params[", t, "] has dtype ",
                     params[t].scalar_type());
    at::assert_no_internal_overlap(grads[t]);
  }
}

// Where each gradient update is computed: the gradient itself when it shares
// its parameter's dense layout (updated in place), else a zero buffer with the
// parameter's layout that is added to the gradient afterwards.
std::vector<at::Tensor> accumulate_targets(at::TensorList grads,
                                           const std::vector<at::Tensor>& dense) {
  std::vector<at::Tensor> targets(grads.size());
  for (size_t t = 0; t < grads.size(); ++t) {
    if (grads[t].is_non_overlapping_and_dense() && grads[t].strides() == dense[t].strides()) {
      targets[t] = grads[t];
    } else {
      targets[t] = at::zeros_like(dense[t]);
    }
  }
  return targets;
}

// grads[t] += d(penalty)/d(params[t]) from `stats`, in list order.
void accumulate_grads(c10::Device device, at::TensorList grads,
                      const std::vector<at::Tensor>& dense,
                      const std::vector<at::Tensor>& targets, const at::Tensor& stats,
                      const std::vector<int64_t>& rows, double l1, double l2, bool l2_squared) {
  const at::Tensor one = at::ones({}, at::TensorOptions().device(device).dtype(at::kDouble));
  // A gradient listed twice (a parameter listed twice) gets both updates and
  // is never raced on: the runs of gradients without shared memory (exact
  // duplicates or overlapping views) are processed in list order
  // (csrc/aliasing.h); without aliasing the whole list is one run, and no
  // gradient-sized temporary is needed either way.
  const std::vector<size_t> runs = alias_free_runs(grads);
  for (size_t r = 0; r + 1 < runs.size(); ++r) {
    const auto b = static_cast<std::ptrdiff_t>(runs[r]);
    const auto e = static_cast<std::ptrdiff_t>(runs[r + 1]);
    const bool whole = runs.size() == 2;
    const std::vector<at::Tensor> run_dense =
        whole ? dense : std::vector<at::Tensor>(dense.begin() + b, dense.begin() + e);
    const std::vector<at::Tensor> run_targets =
        whole ? targets : std::vector<at::Tensor>(targets.begin() + b, targets.begin() + e);
    const std::vector<int64_t> run_rows =
        whole ? rows : std::vector<int64_t>(rows.begin() + b, rows.begin() + e);
    run_grads(device, GradRequest{run_dense, run_targets, stats, run_rows, one, l1, l2,
                                  l2_squared, /*accumulate=*/true});
    for (auto t = b; t < e; ++t) {
      if (!targets[t].is_same(grads[t])) grads[t].add_(targets[t]);
    }
  }
}

void penalty_grad_accumulate_(at::TensorList grads, at::TensorList params,
                              const at::Tensor& stats, double l1, double l2, bool l2_squared,
                              c10::OptionalArrayRef<int64_t> stats_rows) {
  constexpr const char* op = "regext::penalty_grad_accumulate_";
  check_coefficients(op, l1, l2);
  const c10::Device device = device_of(op, params);
  check_grads_for(op, grads, params, device);
  check_stats(op, stats, device);
  const std::vector<int64_t> rows = resolve_stats_rows(
      op, stats_rows, static_cast<int64_t>(params.size()), stats.size(0));
  const std::vector<at::Tensor> dense = as_dense(params);
  accumulate_grads(device, grads, dense, accumulate_targets(grads, dense), stats, rows, l1, l2,
                   l2_squared);
}

// True when the gradients can be updated while the parameters are still
// being read: every gradient is updated in place and no gradient shares
// memory with another gradient or with any parameter.
bool can_update_while_reading(at::TensorList grads, const std::vector<at::Tensor>& dense,
                              const std::vector<at::Tensor>& targets) {
  for (size_t t = 0; t < grads.size(); ++t) {
    if (!targets[t].is_same(grads[t])) return false;
  }
  std::vector<at::Tensor> all(grads.begin(), grads.end());
  all.insert(all.end(), dense.begin(), dense.end());
  return alias_free_runs(all).size() == 2;
}

std::tuple<at::Tensor, at::Tensor> penalty_forward_accumulate_(at::TensorList grads,
                                                               at::TensorList params, double l1,
                                                               double l2, bool l2_squared) {
  constexpr const char* op = "regext::penalty_forward_accumulate_";
  check_coefficients(op, l1, l2);
  const c10::Device device = device_of(op, params);
  check_grads_for(op, grads, params, device);

  const auto options = at::TensorOptions().device(device);
  at::Tensor stats = at::empty({static_cast<int64_t>(params.size()), kStatsColumns},
                               options.dtype(at::kDouble));
  at::Tensor total = at::empty({}, options.dtype(result_dtype(params)));
  const std::vector<at::Tensor> dense = as_dense(params);
  const std::vector<at::Tensor> targets = accumulate_targets(grads, dense);
  if (device.is_cpu() && l2_squared && can_update_while_reading(grads, dense, targets)) {
    // One read of each parameter: the squared form's gradient needs no norm.
    cpu::penalty_stats_total_and_accumulate_squared(dense, targets, stats, total, l1, l2);
    return {total, stats};
  }
  // The Euclidean norm's gradient needs every norm first: a second read.
  run_stats_and_total(device, dense, stats, total, l1, l2, l2_squared);
  std::vector<int64_t> rows(params.size());
  std::iota(rows.begin(), rows.end(), int64_t{0});
  accumulate_grads(device, grads, dense, targets, stats, rows, l1, l2, l2_squared);
  return {total, stats};
}

}  // namespace

TORCH_LIBRARY_IMPL(regext, CPU, m) {
  m.impl("penalty_forward", &penalty_forward);
  m.impl("penalty_backward", &penalty_backward);
  m.impl("penalty_grad_accumulate_", &penalty_grad_accumulate_);
  m.impl("penalty_forward_accumulate_", &penalty_forward_accumulate_);
}

#ifdef REGEXT_WITH_CUDA
TORCH_LIBRARY_IMPL(regext, CUDA, m) {
  m.impl("penalty_forward", &penalty_forward);
  m.impl("penalty_backward", &penalty_backward);
  m.impl("penalty_grad_accumulate_", &penalty_grad_accumulate_);
  m.impl("penalty_forward_accumulate_", &penalty_forward_accumulate_);
}
#endif

}  // namespace regext
