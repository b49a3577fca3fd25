// The proximal and sparsity operators (schemas in csrc/ops.cpp), for every
// device: argument checks, the list-order runs of aliasing tensors, dense
// staging of strided views, output allocation. The arithmetic is in the
// backends (csrc/backend.h): csrc/cpu/prox_cpu.cpp and csrc/cuda/prox_cuda.cu.
// A build without CUDA kernels serves CUDA tensors with the torch-op kernels
// of regext/_fallback.py.
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "aliasing.h"
#include "backend.h"
#include "chunking.h"
#include "param_checks.h"
#include "penalty_math.h"

namespace regext {
namespace {

void check_threshold(const char* op, double threshold) {
  TORCH_CHECK_VALUE(std::isfinite(threshold) && threshold >= 0.0, op,
                    ": threshold must be a finite number >= 0, got ", threshold);
}

c10::Device device_of(const char* op, at::TensorList params) {
  TORCH_CHECK_VALUE(!params.empty(), op, ": params must hold at least one tensor");
  return params[0].device();
}

// Checks a list that is about to be written in place: nothing is modified
// before every tensor has passed.
c10::Device check_mutable_list(const char* op, at::TensorList params) {
  const c10::Device device = device_of(op, params);
  check_tensor_list(op, "params", params, device);
  for (const auto& p : params) at::assert_no_internal_overlap(p);
  return device;
}

// Calls update(dense) for each alias-free run of `params`, in list order.
// Dense tensors are updated where they lie; any other view through a
// contiguous copy that is written back before the next run starts.
template <typename Update>
void update_in_place(at::TensorList params, Update&& update) {
  const std::vector<size_t> runs = alias_free_runs(params);
  for (size_t r = 0; r + 1 < runs.size(); ++r) {
    std::vector<at::Tensor> dense;
    dense.reserve(runs[r + 1] - runs[r]);
    for (size_t t = runs[r]; t < runs[r + 1]; ++t) dense.push_back(as_dense(params[t]));
    update(dense);
    for (size_t t = runs[r]; t < runs[r + 1]; ++t) {
      const at::Tensor& d = dense[t - runs[r]];
      if (!d.is_same(params[t])) params[t].copy_(d);
    }
  }
}

void check_backend(const char* op, c10::Device device) {
#ifdef REGEXT_WITH_CUDA
  if (device.is_cuda()) return;
#endif
  TORCH_CHECK(device.is_cpu(), op, ": no compiled kernel for device ", device);
}

// The backend's kernels for `device`: cpu:: or cuda:: (csrc/backend.h).
#ifdef REGEXT_WITH_CUDA
#define REGEXT_BACKEND_CALL(device, fn, ...) \
  ((device).is_cuda() ? cuda::fn(__VA_ARGS__) : cpu::fn(__VA_ARGS__))
#else
#define REGEXT_BACKEND_CALL(device, fn, ...) cpu::fn(__VA_ARGS__)
#endif

void prox_l1_(at::TensorList params, double threshold) {
  constexpr const char* op = "regext::prox_l1_";
  check_threshold(op, threshold);
  const c10::Device device = check_mutable_list(op, params);
  check_backend(op, device);
  update_in_place(params, [&](const std::vector<at::Tensor>& dense) {
    REGEXT_BACKEND_CALL(device, prox_l1, dense, threshold);
  });
}

void prox_group_l2_(at::TensorList params, double threshold) {
  constexpr const char* op = "regext::prox_group_l2_";
  check_threshold(op, threshold);
  const c10::Device device = check_mutable_list(op, params);
  check_backend(op, device);
  const auto options = at::TensorOptions().device(device);
  update_in_place(params, [&](const std::vector<at::Tensor>& dense) {
    // The norms come from penalty_forward's own stats pass (float64 sums).
    const at::Tensor stats = at::empty({static_cast<int64_t>(dense.size()), kStatsColumns},
                                       options.dtype(at::kDouble));
    const at::Tensor unused_total = at::empty({}, options.dtype(at::kDouble));
    REGEXT_BACKEND_CALL(device, penalty_stats_and_total, dense, stats, unused_total, 0.0, 0.0,
                        false);
    REGEXT_BACKEND_CALL(device, prox_group_l2, dense, stats, threshold);
  });
}

at::Tensor count_zeros(at::TensorList params) {
  constexpr const char* op = "regext::count_zeros";
  const c10::Device device = device_of(op, params);
  check_tensor_list(op, "params", params, device);
  check_backend(op, device);
  at::Tensor counts = at::empty({static_cast<int64_t>(params.size())},
                                at::TensorOptions().device(device).dtype(at::kLong));
  REGEXT_BACKEND_CALL(device, count_zeros, as_dense(params), counts);
  return counts;
}

}  // namespace

TORCH_LIBRARY_IMPL(regext, CPU, m) {
  m.impl("prox_l1_", &prox_l1_);
  m.impl("prox_group_l2_", &prox_group_l2_);
  m.impl("count_zeros", &count_zeros);
}

#ifdef REGEXT_WITH_CUDA
TORCH_LIBRARY_IMPL(regext, CUDA, m) {
  m.impl("prox_l1_", &prox_l1_);
  m.impl("prox_group_l2_", &prox_group_l2_);
  m.impl("count_zeros", &count_zeros);
}
#endif

}  // namespace regext
