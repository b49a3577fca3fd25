// The dtypes regext supports and the arithmetic each one is computed in, for
// every backend (host and device code).
#pragma once

#include <ATen/Dispatch.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace regext {

// Runs the lambda with `scalar_t` set to the C++ type of `dtype`: float16,
// bfloat16, float32 or float64 (the operators reject anything else first).
#define REGEXT_DISPATCH_FLOATING_TYPES(dtype, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, name, __VA_ARGS__)

// Elementwise results (gradients, soft-thresholding) are computed in float32,
// as torch's autograd of the loop computes them, except for float64, and
// rounded once to the parameter's dtype.
template <typename T> struct ElementwiseCompute { using type = float; };
template <> struct ElementwiseCompute<double> { using type = double; };

// The group-shrink product x * scale is formed in float64, in float32 for the
// half types, and rounded once to the parameter's dtype.
template <typename T> struct ScaleCompute { using type = double; };
template <> struct ScaleCompute<c10::Half> { using type = float; };
template <> struct ScaleCompute<c10::BFloat16> { using type = float; };

// A float64 result rounded once to T: through float32 for the half types, as c10's
// conversions go (the same rounding on the host and the device).
template <typename T>
C10_HOST_DEVICE inline T from_double(double y) {
  return static_cast<T>(static_cast<float>(y));
}
template <>
C10_HOST_DEVICE inline double from_double<double>(double y) {
  return y;
}

}  // namespace regext
