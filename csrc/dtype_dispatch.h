// The floating-point dtypes regext supports, and the switch every backend uses
// to turn a runtime dtype into a compile-time scalar type.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

namespace regext {

// Runs fn(static_cast<scalar_t*>(nullptr)) for the scalar_t of `dtype`.
template <typename Fn>
void dispatch_float_types(c10::ScalarType dtype, Fn&& fn) {
  switch (dtype) {
    case c10::kFloat: fn(static_cast<float*>(nullptr)); break;
    case c10::kDouble: fn(static_cast<double*>(nullptr)); break;
    case c10::kHalf: fn(static_cast<c10::Half*>(nullptr)); break;
    case c10::kBFloat16: fn(static_cast<c10::BFloat16*>(nullptr)); break;
    default: TORCH_CHECK(false, "regext: unsupported dtype ", dtype);
  }
}

}  // namespace regext
