// Argument checks shared by every operator and backend.
//
// The Python front end validates before it calls an operator; these checks
// guard the operators themselves (torch.ops.regext.* is public) and raise the
// same kinds of error: TypeError for a wrong dtype or layout, ValueError for a
// bad coefficient, naming the argument and the position.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/OptionalArrayRef.h>

#include <cmath>
#include <cstdlib>
#include <vector>

namespace regext {

inline bool is_supported_dtype(c10::ScalarType t) {
  return t == c10::kFloat || t == c10::kDouble || t == c10::kHalf || t == c10::kBFloat16;
}

// The device of a list's first tensor; a list must not be empty.
inline c10::Device device_of(const char* op, at::TensorList params) {
  TORCH_CHECK_VALUE(!params.empty(), op, ": params must hold at least one tensor");
  return params[0].device();
}

// A tensor's elements must lie inside its storage. FSDP1 frees an unsharded
// parameter by resizing its storage to 0 bytes, and a view kept from inside
// summon_full_params still has its shape: reading it would read freed memory
// (torch's own x.sum() crashes on such a tensor). Metadata only: a few integer
// operations per tensor.
inline void check_storage_holds(const char* op, const char* arg, size_t i, const at::Tensor& t) {
  if (t.numel() == 0 || !t.has_storage() || t.is_meta()) return;
  int64_t last = t.storage_offset();
  for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * std::abs(t.stride(d));
  const int64_t needed = (last + 1) * static_cast<int64_t>(t.element_size());
  const int64_t held = static_cast<int64_t>(t.storage().nbytes());
  TORCH_CHECK_VALUE(held >= needed, op, ": ", arg, "[", i, "] (shape ", t.sizes(), ", dtype ",
                    t.scalar_type(), ") needs ", needed, " bytes of storage but its storage holds ",
                    held, ": its memory was freed (FSDP1 frees unsharded parameters outside "
                    "summon_full_params and the forward)");
}

// Every tensor must be strided, real floating point, and on `device`.
inline void check_tensor_list(const char* op, const char* arg, at::TensorList tensors,
                              c10::Device device) {
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK_TYPE(t.defined(), op, ": ", arg, "[", i, "] is an undefined tensor");
    TORCH_CHECK_TYPE(t.layout() == c10::kStrided, op, ": ", arg, "[", i, "] has layout ",
                     t.layout(), "; only strided (dense) tensors are supported");
    TORCH_CHECK_TYPE(
        is_supported_dtype(t.scalar_type()), op, ": ", arg, "[", i, "] has dtype ", t.scalar_type(),
        "; expected a real floating-point dtype (float16, bfloat16, float32, float64)");
    TORCH_CHECK(t.device() == device, op, ": ", arg, "[", i, "] is on ", t.device(), " but ", arg,
                "[0] is on ", device, "; call once per device");
    check_storage_holds(op, arg, i, t);
  }
}

// A coefficient or threshold: a 0-dim real floating-point tensor on the CPU or on
// the parameters' device. A CPU value must be finite and >= 0 (reading it costs
// no synchronization); a value on the device is used as it is, since reading it
// would synchronize with the device (regext.fused_penalty's docstring says what
// an invalid one does).
inline void check_coefficient(const char* op, const char* name, const at::Tensor& c,
                              c10::Device device) {
  TORCH_CHECK_TYPE(c.defined() && c.dim() == 0 && is_supported_dtype(c.scalar_type()), op, ": ",
                   name, " must be a 0-dim float16, bfloat16, float32 or float64 tensor, got ",
                   c.defined() ? c.toString() : "an undefined tensor", " of shape ",
                   c.defined() ? c.sizes() : at::IntArrayRef{});
  TORCH_CHECK(c.device().is_cpu() || c.device() == device, op, ": ", name, " is on ", c.device(),
              " but the parameters are on ", device, "; put it on the CPU or on ", device);
  if (c.device().is_cpu()) {
    const double value = c.item<double>();
    TORCH_CHECK_VALUE(std::isfinite(value) && value >= 0.0, op, ": ", name,
                      " must be a finite number >= 0, got ", value);
  }
}

// A tensor about to be written in place must have no stride-0 dimension of size
// > 1 (as expand() makes): at::has_internal_overlap answers Yes only for those.
// Other overlapping as_strided views it cannot decide (TooHard) pass, as they do
// in torch's own in-place ops. torch's assert_no_internal_overlap checks the same
// without naming the argument; the Python front end's ValueError names it.
inline void check_owns_its_elements(const char* op, const char* arg, size_t i,
                                    const at::Tensor& t) {
  TORCH_CHECK_VALUE(at::has_internal_overlap(t) != at::MemOverlap::Yes, op, ": ", arg, "[", i,
                    "] has overlapping memory (an expanded tensor, shape ", t.sizes(), ", stride ",
                    t.strides(), ", dtype ", t.scalar_type(),
                    "); it cannot be updated in place: pass a clone()");
}

// A list that is about to be written in place: every tensor passes before
// anything is modified, and no tensor's elements overlap each other.
inline c10::Device check_mutable_list(const char* op, at::TensorList params) {
  const c10::Device device = device_of(op, params);
  check_tensor_list(op, "params", params, device);
  for (size_t i = 0; i < params.size(); ++i) check_owns_its_elements(op, "params", i, params[i]);
  return device;
}

// `stats` must be an [n, 2] float64 tensor as penalty_forward produces it.
inline void check_stats(const char* op, const at::Tensor& stats, c10::Device device) {
  TORCH_CHECK(stats.scalar_type() == c10::kDouble && stats.dim() == 2 && stats.size(1) == 2 &&
                  stats.is_contiguous(),
              op,
              ": stats must be a contiguous float64 tensor of shape [n, 2] "
              "(as returned by penalty_forward), got dtype ",
              stats.scalar_type(), " and shape ", stats.sizes());
  TORCH_CHECK(stats.device() == device, op, ": stats is on ", stats.device(),
              " but the parameters are on ", device);
}

// The incoming gradient of the 0-dim penalty: one float32/float64 element on `device`.
inline void check_grad_total(const char* op, const at::Tensor& grad_total, c10::Device device) {
  TORCH_CHECK(grad_total.numel() == 1 && (grad_total.scalar_type() == c10::kFloat ||
                                          grad_total.scalar_type() == c10::kDouble),
              op, ": grad_total must be one float32 or float64 element, got dtype ",
              grad_total.scalar_type(), " and shape ", grad_total.sizes());
  TORCH_CHECK(grad_total.device() == device, op, ": grad_total is on ", grad_total.device(),
              " but the parameters are on ", device);
}

// The row of `stats` for each parameter: stats_rows[t] if given, else t.
inline std::vector<int64_t> resolve_stats_rows(const char* op,
                                               c10::OptionalArrayRef<int64_t> stats_rows,
                                               int64_t num_params, int64_t num_rows) {
  std::vector<int64_t> rows(num_params);
  if (!stats_rows.has_value()) {
    TORCH_CHECK(num_rows == num_params, op, ": stats has ", num_rows, " rows but there are ",
                num_params, " params (pass stats_rows for a subset)");
    for (int64_t t = 0; t < num_params; ++t) rows[t] = t;
    return rows;
  }
  TORCH_CHECK(static_cast<int64_t>(stats_rows->size()) == num_params, op, ": stats_rows has ",
              stats_rows->size(), " entries but there are ", num_params, " params");
  for (int64_t t = 0; t < num_params; ++t) {
    rows[t] = (*stats_rows)[t];
    TORCH_CHECK(rows[t] >= 0 && rows[t] < num_rows, op, ": stats_rows[", t, "] = ", rows[t],
                " is out of range for stats with ", num_rows, " rows");
  }
  return rows;
}

// Mutated lists (gradients) must match their parameters element by element.
inline void check_same_shapes(const char* op, const char* arg, at::TensorList out,
                              at::TensorList params) {
  TORCH_CHECK(out.size() == params.size(), op, ": ", arg, " has ", out.size(),
              " tensors but params has ", params.size());
  for (size_t i = 0; i < out.size(); ++i) {
    TORCH_CHECK(out[i].sizes() == params[i].sizes(), op, ": ", arg, "[", i, "] has shape ",
                out[i].sizes(), " but params[", i, "] has shape ", params[i].sizes());
  }
}

// Gradients to accumulate into: each matches its parameter's shape and dtype,
// lies on the same device and owns its elements.
inline void check_grads_for(const char* op, at::TensorList grads, at::TensorList params,
                            c10::Device device) {
  check_tensor_list(op, "params", params, device);
  check_tensor_list(op, "grads", grads, device);
  check_same_shapes(op, "grads", grads, params);
  for (size_t t = 0; t < grads.size(); ++t) {
    TORCH_CHECK_TYPE(grads[t].scalar_type() == params[t].scalar_type(), op, ": grads[", t,
                     "] has dtype ", grads[t].scalar_type(), " but params[", t, "] has dtype ",
                     params[t].scalar_type());
    check_owns_its_elements(op, "grads", t, grads[t]);
  }
}

}  // namespace regext
