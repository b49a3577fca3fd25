// The penalty operators, for every device: argument checks, dense views,
// output allocation; the arithmetic is in the backends (csrc/backend.h).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <unordered_set>
#include <vector>

#include "backend.h"
#include "chunking.h"
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
    grads.push_back(at::empty_like(params[t]));
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

void penalty_grad_accumulate_(at::TensorList grads, at::TensorList params,
                              const at::Tensor& stats, double l1, double l2, bool l2_squared,
                              c10::OptionalArrayRef<int64_t> stats_rows) {
  constexpr const char* op = "regext::penalty_grad_accumulate_";
  check_coefficients(op, l1, l2);
  const c10::Device device = device_of(op, params);
  check_tensor_list(op, "params", params, device);
  check_tensor_list(op, "grads", grads, device);
  check_same_shapes(op, "grads", grads, params);
  check_stats(op, stats, device);
  const std::vector<int64_t> rows = resolve_stats_rows(
      op, stats_rows, static_cast<int64_t>(params.size()), stats.size(0));
  for (size_t t = 0; t < grads.size(); ++t) {
    TORCH_CHECK_TYPE(grads[t].scalar_type() == params[t].scalar_type(), op, ": grads[", t,
                     "] has dtype ", grads[t].scalar_type(), " but params[", t, "] has dtype ",
                     params[t].scalar_type());
  }

  // Fast path: gradient and parameter share one dense layout and the gradient
  // is updated in place. Otherwise the update is computed densely, then added.
  // A gradient listed twice (a parameter passed twice) is updated in place
  // only once: the kernels update all tensors concurrently, and two
  // read-modify-writes of the same memory would race.
  const std::vector<at::Tensor> dense = as_dense(params);
  std::vector<at::Tensor> targets(grads.size());
  std::vector<size_t> staged;
  std::unordered_set<const void*> updated_in_place;
  for (size_t t = 0; t < grads.size(); ++t) {
    if (grads[t].is_non_overlapping_and_dense() && grads[t].strides() == dense[t].strides() &&
        (grads[t].numel() == 0 || updated_in_place.insert(grads[t].data_ptr()).second)) {
      targets[t] = grads[t];
    } else {
      targets[t] = at::zeros_like(dense[t]);
      staged.push_back(t);
    }
  }
  const at::Tensor one = at::ones({}, at::TensorOptions().device(device).dtype(at::kDouble));
  run_grads(device, GradRequest{dense, targets, stats, rows, one, l1, l2, l2_squared,
                                /*accumulate=*/true});
  for (size_t t : staged) grads[t].add_(targets[t]);
}

}  // namespace

TORCH_LIBRARY_IMPL(regext, CPU, m) {
  m.impl("penalty_forward", &penalty_forward);
  m.impl("penalty_backward", &penalty_backward);
  m.impl("penalty_grad_accumulate_", &penalty_grad_accumulate_);
}

#ifdef REGEXT_WITH_CUDA
TORCH_LIBRARY_IMPL(regext, CUDA, m) {
  m.impl("penalty_forward", &penalty_forward);
  m.impl("penalty_backward", &penalty_backward);
  m.impl("penalty_grad_accumulate_", &penalty_grad_accumulate_);
}
#endif

}  // namespace regext
