// How the operator layer prepares tensors for a backend (csrc/backend.h):
// dense views, the result dtype, and where in-place updates are computed.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace regext {

// A tensor whose elements fill a contiguous span of memory (any permutation of
// a contiguous tensor: transposes, channels-last) can be read and written as a
// flat array in memory order. Anything else is copied to contiguous first.
inline at::Tensor as_dense(const at::Tensor& t) {
  return t.is_non_overlapping_and_dense() ? t : t.contiguous();
}

inline std::vector<at::Tensor> as_dense(at::TensorList tensors) {
  std::vector<at::Tensor> out;
  out.reserve(tensors.size());
  for (const auto& t : tensors) out.push_back(as_dense(t));
  return out;
}

// The dtype of the penalty: float64 if any parameter is float64, else float32.
inline c10::ScalarType result_dtype(at::TensorList tensors) {
  for (const auto& t : tensors) {
    if (t.scalar_type() == c10::kDouble) return c10::kDouble;
  }
  return c10::kFloat;
}

// Tensors read beside an in-place update (an optimizer's state), each laid out
// exactly as dense[t], so that element i of one is element i of the other: the
// tensor itself when it already is, else a copy in dense[t]'s layout.
inline std::vector<at::Tensor> laid_out_like(at::TensorList tensors,
                                             const std::vector<at::Tensor>& dense) {
  std::vector<at::Tensor> out(tensors.size());
  for (size_t t = 0; t < tensors.size(); ++t) {
    const bool same = tensors[t].is_non_overlapping_and_dense() &&
                      tensors[t].strides() == dense[t].strides();
    out[t] = same ? tensors[t] : at::empty_like(dense[t]).copy_(tensors[t]);
  }
  return out;
}

// Where each gradient update is computed: the gradient itself when it shares
// its parameter's dense layout (updated in place), else a zero buffer with the
// parameter's layout that is added to the gradient afterwards.
inline std::vector<at::Tensor> accumulate_targets(at::TensorList grads,
                                                  const std::vector<at::Tensor>& dense) {
  std::vector<at::Tensor> targets(grads.size());
  for (size_t t = 0; t < grads.size(); ++t) {
    const bool in_place =
        grads[t].is_non_overlapping_and_dense() && grads[t].strides() == dense[t].strides();
    targets[t] = in_place ? grads[t] : at::zeros_like(dense[t]);
  }
  return targets;
}

}  // namespace regext
