// See vector_loops.h. The bodies are templates written so that GCC vectorizes
// them (fixed-width lane arrays, no cross-lane dependence); each public
// overload is cloned per ISA with `target_clones` and dispatched at load time.
// The build passes -ffp-contract=off so no clone fuses a*b+c differently.
#include "vector_loops.h"

#include <cmath>

#include "../penalty_math.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && \
    !defined(REGEXT_NO_TARGET_CLONES)
#define REGEXT_ISA_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define REGEXT_ISA_CLONES
#endif

#define REGEXT_INLINE inline __attribute__((always_inline))

namespace regext::cpu {
namespace {

// Independent accumulators: enough to fill two AVX-512 registers of doubles,
// which hides the add latency and keeps each rounding chain short.
constexpr int kLanes = 16;

template <typename T>
REGEXT_INLINE AbsSqSums abs_sq_sums_impl(const T* x, int64_t n) {
  // Accumulating in double keeps the result exact to ~1e-15 relative for any
  // chunk, never overflows for float32/half inputs (x^2 of 3e38 fits), and
  // costs nothing here: the loop is bound by memory, not by arithmetic.
  double abs_acc[kLanes] = {};
  double sq_acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int lane = 0; lane < kLanes; ++lane) {
      const double v = static_cast<double>(static_cast<float>(x[i + lane]));
      abs_acc[lane] += std::fabs(v);
      sq_acc[lane] += v * v;
    }
  }
  for (int lane = 0; i < n; ++i, ++lane) {
    const double v = static_cast<double>(static_cast<float>(x[i]));
    abs_acc[lane] += std::fabs(v);
    sq_acc[lane] += v * v;
  }
  // Pairwise combination of the lanes, in a fixed order.
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int lane = 0; lane < width; ++lane) {
      abs_acc[lane] += abs_acc[lane + width];
      sq_acc[lane] += sq_acc[lane + width];
    }
  }
  return {abs_acc[0], sq_acc[0]};
}

template <>
REGEXT_INLINE AbsSqSums abs_sq_sums_impl<double>(const double* x, int64_t n) {
  double abs_acc[kLanes] = {};
  double sq_acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int lane = 0; lane < kLanes; ++lane) {
      const double v = x[i + lane];
      abs_acc[lane] += std::fabs(v);
      sq_acc[lane] += v * v;
    }
  }
  for (int lane = 0; i < n; ++i, ++lane) {
    abs_acc[lane] += std::fabs(x[i]);
    sq_acc[lane] += x[i] * x[i];
  }
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int lane = 0; lane < width; ++lane) {
      abs_acc[lane] += abs_acc[lane + width];
      sq_acc[lane] += sq_acc[lane + width];
    }
  }
  return {abs_acc[0], sq_acc[0]};
}

// Gradients of float32 and the half types are computed in float32 (as torch's
// autograd of the loop does) and rounded once to the parameter's dtype.
template <typename T, typename Compute>
REGEXT_INLINE void penalty_grad_impl(const T* x, T* out, int64_t n, double sign_coef,
                                     double linear_coef, bool accumulate) {
  const Compute s = static_cast<Compute>(sign_coef);
  const Compute l = static_cast<Compute>(linear_coef);
  if (accumulate) {
    for (int64_t i = 0; i < n; ++i) {
      const Compute v = static_cast<Compute>(x[i]);
      out[i] = static_cast<T>(static_cast<Compute>(out[i]) + (s * sign_of(v) + l * v));
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      const Compute v = static_cast<Compute>(x[i]);
      out[i] = static_cast<T>(s * sign_of(v) + l * v);
    }
  }
}

}  // namespace

REGEXT_ISA_CLONES AbsSqSums abs_sq_sums(const float* x, int64_t n) {
  return abs_sq_sums_impl(x, n);
}
REGEXT_ISA_CLONES AbsSqSums abs_sq_sums(const double* x, int64_t n) {
  return abs_sq_sums_impl(x, n);
}
REGEXT_ISA_CLONES AbsSqSums abs_sq_sums(const c10::Half* x, int64_t n) {
  return abs_sq_sums_impl(x, n);
}
REGEXT_ISA_CLONES AbsSqSums abs_sq_sums(const c10::BFloat16* x, int64_t n) {
  return abs_sq_sums_impl(x, n);
}

REGEXT_ISA_CLONES void penalty_grad(const float* x, float* out, int64_t n, double sign_coef,
                                    double linear_coef, bool accumulate) {
  penalty_grad_impl<float, float>(x, out, n, sign_coef, linear_coef, accumulate);
}
REGEXT_ISA_CLONES void penalty_grad(const double* x, double* out, int64_t n, double sign_coef,
                                    double linear_coef, bool accumulate) {
  penalty_grad_impl<double, double>(x, out, n, sign_coef, linear_coef, accumulate);
}
REGEXT_ISA_CLONES void penalty_grad(const c10::Half* x, c10::Half* out, int64_t n,
                                    double sign_coef, double linear_coef, bool accumulate) {
  penalty_grad_impl<c10::Half, float>(x, out, n, sign_coef, linear_coef, accumulate);
}
REGEXT_ISA_CLONES void penalty_grad(const c10::BFloat16* x, c10::BFloat16* out, int64_t n,
                                    double sign_coef, double linear_coef, bool accumulate) {
  penalty_grad_impl<c10::BFloat16, float>(x, out, n, sign_coef, linear_coef, accumulate);
}

}  // namespace regext::cpu
