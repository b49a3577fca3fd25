// The proximal and sparsity operators (schemas: csrc/schemas.h), written once
// over a backend (csrc/backend.h): argument checks, the list-order runs of
// aliasing tensors, dense staging of strided views, output allocation.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "aliasing.h"
#include "backend.h"
#include "param_checks.h"
#include "penalty_math.h"
#include "staging.h"

namespace regext {

// Calls update(dense, first) for each alias-free run params[first, first + dense.size()),
// in list order.
// Dense tensors are updated where they lie; any other view through a
// contiguous copy that is written back before the next run starts.
template <typename Update>
void update_in_place(at::TensorList params, Update&& update) {
  const std::vector<size_t> runs = alias_free_runs(params);
  for (size_t r = 0; r + 1 < runs.size(); ++r) {
    const std::vector<at::Tensor> dense = as_dense(params.slice(runs[r], runs[r + 1] - runs[r]));
    update(dense, runs[r]);
    for (size_t t = runs[r]; t < runs[r + 1]; ++t) {
      const at::Tensor& d = dense[t - runs[r]];
      if (!d.is_same(params[t])) params[t].copy_(d);
    }
  }
}

template <typename Backend>
void prox_l1_(at::TensorList params, const at::Tensor& threshold) {
  constexpr const char* op = "regext::prox_l1_";
  check_coefficient(op, "threshold", threshold, check_mutable_list(op, params));
  update_in_place(params, [&](const std::vector<at::Tensor>& dense, size_t) {
    Backend::prox_l1(dense, threshold);
  });
}

template <typename Backend>
void prox_group_l2_(at::TensorList params, const at::Tensor& threshold) {
  constexpr const char* op = "regext::prox_group_l2_";
  const c10::Device device = check_mutable_list(op, params);
  check_coefficient(op, "threshold", threshold, device);
  const auto options = at::TensorOptions().device(device);
  const at::Tensor zero = at::zeros({}, at::kDouble);  // no total is needed
  update_in_place(params, [&](const std::vector<at::Tensor>& dense, size_t) {
    // The norms come from penalty_forward's own stats pass (float64 sums).
    const at::Tensor stats =
        at::empty({static_cast<int64_t>(dense.size()), kStatsColumns}, options.dtype(at::kDouble));
    const at::Tensor unused_total = at::empty({}, options.dtype(at::kDouble));
    Backend::stats_and_total(dense, stats, unused_total, zero, zero, false);
    Backend::prox_group_l2(dense, stats, threshold);
  });
}

template <typename Backend>
at::Tensor count_zeros(at::TensorList params) {
  constexpr const char* op = "regext::count_zeros";
  const c10::Device device = device_of(op, params);
  check_tensor_list(op, "params", params, device);
  at::Tensor counts = at::empty({static_cast<int64_t>(params.size())},
                                at::TensorOptions().device(device).dtype(at::kLong));
  Backend::count_zeros(as_dense(params), counts);
  return counts;
}

}  // namespace regext
