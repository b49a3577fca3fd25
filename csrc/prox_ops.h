// The proximal and sparsity operators (schemas: csrc/schemas.h), written once
// over a backend (csrc/backend.h): argument checks, the list-order runs of
// aliasing tensors, dense staging of strided views, output allocation.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
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

// The state a metric step reads (moments, means): one tensor per parameter, of
// its shape and dtype, on its device.
inline void check_state_list(const char* op, const char* arg, at::TensorList state,
                             at::TensorList params, c10::Device device) {
  check_same_shapes(op, arg, state, params);
  check_tensor_list(op, arg, state, device);
  for (size_t t = 0; t < state.size(); ++t) {
    TORCH_CHECK_TYPE(state[t].scalar_type() == params[t].scalar_type(), op, ": ", arg, "[", t,
                     "] has dtype ", state[t].scalar_type(), " but params[", t, "] has dtype ",
                     params[t].scalar_type());
  }
}

// The first tensor of `reads` (in list order) whose memory may overlap a tensor of
// `writes`, with that tensor: {-1, -1} when none does. O(n log n): the writes'
// spans sorted by begin with the running maximum of their ends, one binary search
// per read (a read span [b, e) meets a write span that begins before e and ends
// after b).
inline std::pair<int64_t, int64_t> first_read_write_overlap(at::TensorList reads,
                                                            at::TensorList writes) {
  struct Span {
    uintptr_t begin, end;
    int64_t index;
  };
  std::vector<Span> spans;
  for (size_t w = 0; w < writes.size(); ++w) {
    const auto s = byte_span(writes[w]);
    if (s.first < s.second) spans.push_back({s.first, s.second, static_cast<int64_t>(w)});
  }
  std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) {
    return a.begin < b.begin;
  });
  std::vector<size_t> furthest(spans.size());  // the span reaching furthest among [0, k]
  for (size_t k = 0; k < spans.size(); ++k) {
    furthest[k] = (k > 0 && spans[furthest[k - 1]].end >= spans[k].end) ? furthest[k - 1] : k;
  }
  for (size_t r = 0; r < reads.size(); ++r) {
    const auto s = byte_span(reads[r]);
    if (!(s.first < s.second)) continue;
    const auto after = std::lower_bound(
        spans.begin(), spans.end(), s.second,
        [](const Span& span, uintptr_t end) { return span.begin < end; });
    if (after == spans.begin()) continue;
    const Span& reach = spans[furthest[(after - spans.begin()) - 1]];
    if (reach.end > s.first) return {static_cast<int64_t>(r), reach.index};
  }
  return {-1, -1};
}

// The coefs table of prox_metric_: float64 [n, kMetricColumns], contiguous, on the
// parameters' device (a CUDA kernel reads its rows there). Rows on the CPU are
// checked: every entry finite and >= 0.
inline void check_metric_coefs(const char* op, const at::Tensor& coefs, int64_t n,
                               c10::Device device) {
  TORCH_CHECK_TYPE(coefs.scalar_type() == c10::kDouble && coefs.dim() == 2 &&
                       coefs.size(0) == n && coefs.size(1) == kMetricColumns &&
                       coefs.is_contiguous(),
                   op, ": coefs must be a contiguous float64 tensor of shape [", n, ", ",
                   kMetricColumns, "] (one (l1_step, ridge_step, scale, eps) row per param), got ",
                   coefs.scalar_type(), " of shape ", coefs.sizes());
  TORCH_CHECK_VALUE(coefs.device() == device, op, ": coefs is on ", coefs.device(),
                    " but the parameters are on ", device, "; put it on ", device);
  if (!device.is_cpu()) return;  // reading a device table would synchronize
  static const char* const kNames[kMetricColumns] = {"l1_step", "ridge_step", "scale", "eps"};
  const double* c = coefs.const_data_ptr<double>();
  for (int64_t i = 0; i < n * kMetricColumns; ++i) {
    TORCH_CHECK_VALUE(std::isfinite(c[i]) && c[i] >= 0.0, op, ": coefs[", i / kMetricColumns,
                      "][", i % kMetricColumns, "] (", kNames[i % kMetricColumns],
                      ") must be a finite number >= 0, got ", c[i]);
  }
}

// The arguments every metric step shares: the parameters it writes (returns their
// device), the state it reads (separate from them), the coefs table.
inline c10::Device check_metric_arguments(const char* op, at::TensorList params,
                                          at::TensorList moments, at::TensorList means,
                                          const at::Tensor& coefs) {
  const c10::Device device = check_mutable_list(op, params);
  check_state_list(op, "moments", moments, params, device);
  if (!means.empty()) check_state_list(op, "means", means, params, device);
  check_metric_coefs(op, coefs, static_cast<int64_t>(params.size()), device);
  for (const auto& [arg, state] : {std::pair{"moments", moments}, std::pair{"means", means}}) {
    const auto [r, w] = first_read_write_overlap(state, params);
    TORCH_CHECK_VALUE(r < 0, op, ": ", arg, "[", r, "] shares memory with params[", w,
                      "], which the step writes; the state it reads must be separate tensors");
  }
  return device;
}

template <typename Backend>
void prox_metric_(at::TensorList params, at::TensorList moments, at::TensorList means,
                  const at::Tensor& coefs) {
  constexpr const char* op = "regext::prox_metric_";
  check_metric_arguments(op, params, moments, means, coefs);
  update_in_place(params, [&](const std::vector<at::Tensor>& dense, size_t first) {
    const size_t n = dense.size();
    const std::vector<at::Tensor> v = laid_out_like(moments.slice(first, n), dense);
    const std::vector<at::Tensor> m =
        means.empty() ? std::vector<at::Tensor>{} : laid_out_like(means.slice(first, n), dense);
    Backend::prox_metric(dense, v, m,
                         coefs.narrow(0, static_cast<int64_t>(first), static_cast<int64_t>(n)));
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
