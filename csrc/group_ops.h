// The group lasso operators (schemas: csrc/schemas.h; groups: csrc/groups.h),
// written once over a backend (csrc/backend.h), with the same argument checks,
// dense staging and list-order semantics as the per-tensor operators.
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

#include "aliasing.h"
#include "backend.h"
#include "groups.h"
#include "param_checks.h"
#include "penalty_ops.h"
#include "prox_ops.h"
#include "staging.h"

namespace regext {

// The stats row of group 0 of each tensor: first_rows[t] if given (each tensor's
// groups must fit in `num_rows`), else the list-order placement, which must
// fill exactly `num_rows` rows.
inline std::vector<int64_t> resolve_first_rows(const char* op, at::TensorList params,
                                               at::IntArrayRef group_dims,
                                               c10::OptionalArrayRef<int64_t> first_rows,
                                               int64_t num_rows) {
  check_group_dims(op, group_dims, params.size());
  std::vector<int64_t> rows(params.size());
  if (!first_rows.has_value()) {
    int64_t row = 0;
    for (size_t t = 0; t < params.size(); ++t) {
      rows[t] = row;
      row += count_groups(params[t], group_dims[t]);
    }
    TORCH_CHECK(row == num_rows, op, ": stats has ", num_rows, " rows but the params have ", row,
                " groups (pass first_rows for a subset)");
    return rows;
  }
  TORCH_CHECK(first_rows->size() == params.size(), op, ": first_rows has ", first_rows->size(),
              " entries but there are ", params.size(), " params");
  for (size_t t = 0; t < params.size(); ++t) {
    rows[t] = (*first_rows)[t];
    const int64_t groups = count_groups(params[t], group_dims[t]);
    TORCH_CHECK(rows[t] >= 0 && rows[t] + groups <= num_rows, op, ": first_rows[", t,
                "] = ", rows[t], " with ", groups, " groups is out of range for stats with ",
                num_rows, " rows");
  }
  return rows;
}

template <typename Backend>
std::tuple<at::Tensor, at::Tensor> group_penalty_forward(at::TensorList params,
                                                         at::IntArrayRef group_dims,
                                                         const at::Tensor& l1, const at::Tensor& l2,
                                                         bool sqrt_size) {
  constexpr const char* op = "regext::group_penalty_forward";
  const c10::Device device = device_of(op, params);
  check_coefficients(op, l1, l2, device);
  check_tensor_list(op, "params", params, device);
  const std::vector<at::Tensor> dense = as_dense(params);
  const std::vector<GroupLayout> layouts = group_layouts(op, dense, group_dims, sqrt_size);
  const auto options = at::TensorOptions().device(device);
  at::Tensor stats = at::empty({total_groups(layouts), kStatsColumns}, options.dtype(at::kDouble));
  at::Tensor total = at::empty({}, options.dtype(result_dtype(params)));
  Backend::group_stats_and_total(dense, layouts, stats, total, l1, l2);
  return {total, stats};
}

template <typename Backend>
std::vector<at::Tensor> group_penalty_backward(const at::Tensor& grad_total, at::TensorList params,
                                               at::IntArrayRef group_dims, const at::Tensor& stats,
                                               const at::Tensor& l1, const at::Tensor& l2,
                                               bool sqrt_size,
                                               c10::OptionalArrayRef<int64_t> first_rows) {
  constexpr const char* op = "regext::group_penalty_backward";
  check_backward_arguments(op, grad_total, params, stats, l1, l2);
  const std::vector<int64_t> rows =
      resolve_first_rows(op, params, group_dims, first_rows, stats.size(0));
  const std::vector<at::Tensor> dense = as_dense(params);
  const std::vector<GroupLayout> layouts = group_layouts(op, dense, group_dims, sqrt_size, rows);
  GradOutputs out = new_grad_outputs<Backend>(params, dense);
  Backend::group_grads(GroupGradRequest{dense, out.targets, layouts, stats, grad_total, l1, l2,
                                        /*accumulate=*/false});
  return out.finish();
}

template <typename Backend>
void group_penalty_grad_accumulate_(at::TensorList grads, at::TensorList params,
                                    at::IntArrayRef group_dims, const at::Tensor& stats,
                                    const at::Tensor& l1, const at::Tensor& l2, bool sqrt_size,
                                    c10::OptionalArrayRef<int64_t> first_rows) {
  constexpr const char* op = "regext::group_penalty_grad_accumulate_";
  const c10::Device device = device_of(op, params);
  check_coefficients(op, l1, l2, device);
  check_grads_for(op, grads, params, device);
  check_stats(op, stats, device);
  const std::vector<int64_t> rows =
      resolve_first_rows(op, params, group_dims, first_rows, stats.size(0));
  const std::vector<at::Tensor> dense = as_dense(params);
  const std::vector<GroupLayout> layouts = group_layouts(op, dense, group_dims, sqrt_size, rows);
  const std::vector<at::Tensor> targets = accumulate_targets(grads, dense);
  const at::Tensor one = at::ones({}, at::TensorOptions().device(device).dtype(at::kDouble));
  accumulate_in_runs(grads, targets, [&](size_t b, size_t n) {
    Backend::group_grads(GroupGradRequest{
        at::ArrayRef<at::Tensor>(dense).slice(b, n), at::ArrayRef<at::Tensor>(targets).slice(b, n),
        at::ArrayRef<GroupLayout>(layouts).slice(b, n), stats, one, l1, l2,
        /*accumulate=*/true});
  });
}

template <typename Backend>
void prox_group_lasso_(at::TensorList params, at::IntArrayRef group_dims,
                       const at::Tensor& threshold, bool sqrt_size) {
  constexpr const char* op = "regext::prox_group_lasso_";
  const c10::Device device = check_mutable_list(op, params);
  check_coefficient(op, "threshold", threshold, device);
  check_group_dims(op, group_dims, params.size());
  update_in_place(params, [&](const std::vector<at::Tensor>& dense, size_t first) {
    const at::IntArrayRef dims = group_dims.slice(first, dense.size());
    Backend::prox_group_lasso(dense, group_layouts(op, dense, dims, sqrt_size), threshold);
  });
}

// The group lasso's proximal step in an optimizer's metric (csrc/group_metric_math.h):
// coefs rows as prox_metric_'s, with l1_step the group threshold step (times w_g per
// group) and ridge_step 0 (checked on the CPU; the group step has no ridge term).
template <typename Backend>
void prox_group_metric_(at::TensorList params, at::TensorList moments, at::TensorList means,
                        at::IntArrayRef group_dims, const at::Tensor& coefs, bool sqrt_size) {
  constexpr const char* op = "regext::prox_group_metric_";
  const c10::Device device = check_metric_arguments(op, params, moments, means, coefs);
  check_group_dims(op, group_dims, params.size());
  if (device.is_cpu()) {
    const double* c = coefs.const_data_ptr<double>();
    for (size_t t = 0; t < params.size(); ++t) {
      TORCH_CHECK_VALUE(c[t * kMetricColumns + 1] == 0.0, op, ": coefs[", t,
                        "][1] (ridge_step) must be 0, got ", c[t * kMetricColumns + 1],
                        "; the group lasso's step has no ridge term (apply prox_metric_ for it)");
    }
  }
  update_in_place(params, [&](const std::vector<at::Tensor>& dense, size_t first) {
    const size_t n = dense.size();
    const std::vector<at::Tensor> v = laid_out_like(moments.slice(first, n), dense);
    const std::vector<at::Tensor> m =
        means.empty() ? std::vector<at::Tensor>{} : laid_out_like(means.slice(first, n), dense);
    Backend::prox_group_metric(
        dense, v, m, group_layouts(op, dense, group_dims.slice(first, n), sqrt_size),
        coefs.narrow(0, static_cast<int64_t>(first), static_cast<int64_t>(n)));
  });
}

}  // namespace regext
