// Argument checks shared by every operator and backend.
//
// The Python front end validates before it calls an operator; these checks
// guard the operators themselves (torch.ops.regext.* is public) and raise the
// same kinds of error: TypeError for a wrong dtype or layout, ValueError for a
// bad coefficient, naming the argument and the position.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <string>

namespace regext {

inline bool is_supported_dtype(c10::ScalarType t) {
  return t == c10::kFloat || t == c10::kDouble || t == c10::kHalf ||
         t == c10::kBFloat16;
}

// Every tensor must be strided, real floating point, and on `device`.
inline void check_tensor_list(const char* op, const char* arg, at::TensorList tensors,
                              c10::Device device) {
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK_TYPE(t.defined(), op, ": ", arg, "[", i, "] is an undefined tensor");
    TORCH_CHECK_TYPE(t.layout() == c10::kStrided, op, ": ", arg, "[", i,
                     "] has layout ", t.layout(), "; only strided (dense) tensors are supported");
    TORCH_CHECK_TYPE(is_supported_dtype(t.scalar_type()), op, ": ", arg, "[", i, "] has dtype ",
                     t.scalar_type(),
                     "; expected a real floating-point dtype (float16, bfloat16, float32, float64)");
    TORCH_CHECK(t.device() == device, op, ": ", arg, "[", i, "] is on ", t.device(),
                " but ", arg, "[0] is on ", device, "; call once per device");
  }
}

inline void check_coefficient(const char* op, const char* name, double value) {
  TORCH_CHECK_VALUE(std::isfinite(value) && value >= 0.0, op, ": ", name,
                    " must be a finite number >= 0, got ", value);
}

// `stats` must be the [n, 2] float64 tensor penalty_forward produced for the same list.
inline void check_stats(const char* op, const at::Tensor& stats, int64_t num_tensors,
                        c10::Device device) {
  TORCH_CHECK(stats.scalar_type() == c10::kDouble && stats.dim() == 2 &&
                  stats.size(0) == num_tensors && stats.size(1) == 2 && stats.is_contiguous(),
              op, ": stats must be a contiguous float64 tensor of shape [", num_tensors,
              ", 2] (as returned by penalty_forward), got dtype ", stats.scalar_type(),
              " and shape ", stats.sizes());
  TORCH_CHECK(stats.device() == device, op, ": stats is on ", stats.device(),
              " but the parameters are on ", device);
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

}  // namespace regext
