// The scalar arithmetic of the penalty, shared by the CPU and CUDA kernels.
//
// Every formula here mirrors what PyTorch's autograd does for the reference loop
//     l1 * sum_t torch.norm(p_t, 1) + l2 * sum_t torch.norm(p_t, 2)
// (or l2 * sum_t p_t.pow(2).sum() in squared mode), so that values and
// gradients agree with it in every corner: sign(0) = sign(NaN) = 0, a zero-norm
// tensor gets a zero L2 gradient, a NaN or infinite norm propagates.
#pragma once

#include <c10/macros/Macros.h>
#include <cmath>
#include <cstdint>

namespace regext {

// Per-tensor statistics, one row of the `stats` tensor: [sum |x|, sum x^2].
constexpr int64_t kStatsColumns = 2;

// sign(x) exactly as torch.sign / torch.sgn: 0 for +-0 and for NaN.
template <typename T>
C10_HOST_DEVICE inline T sign_of(T x) {
  return static_cast<T>((T(0) < x) - (x < T(0)));
}

// The L2 term of one tensor: its Euclidean norm, or its squared norm.
C10_HOST_DEVICE inline double l2_term(double sum_sq, bool l2_squared) {
  return l2_squared ? sum_sq : ::sqrt(sum_sq);
}

// The whole penalty from per-tensor sums, in the loop's order of operations:
// l1 * (sum of L1 norms) + l2 * (sum of L2 terms). Coefficients of 0 still
// multiply, so a NaN/inf norm makes the result NaN exactly as the loop does.
struct PenaltyTotals {
  double sum_l1 = 0.0;
  double sum_l2 = 0.0;
  C10_HOST_DEVICE void add(double sum_abs, double sum_sq, bool l2_squared) {
    sum_l1 += sum_abs;
    sum_l2 += l2_term(sum_sq, l2_squared);
  }
  C10_HOST_DEVICE double combine(double l1, double l2) const {
    return l1 * sum_l1 + l2 * sum_l2;
  }
};

// d(penalty)/dx for every element x of one tensor is
//     sign_coef * sign(x) + (x * linear_scale) * linear_coef,
// with linear_scale = 1 (the term is then linear_coef * x) except where
// (grad_out * l2) / ||x|| would leave double's normal range although no
// gradient element does (|x| / ||x|| <= 1): a tiny coefficient on a tensor of
// huge norm, e.g. l2 = 1e-300 and ||x|| = 1e38. There linear_scale = 1 / ||x||
// and linear_coef = grad_out * l2, and kernels form the product in float64.
// grad_out is the incoming gradient of the 0-dim result.
struct GradCoefficients {
  double sign_coef;
  double linear_coef;
  double linear_scale = 1.0;
};

// Whether a gradient coefficient may be rounded to float32 for the float32
// arithmetic of float32/float16/bfloat16 gradients. 1/||x|| leaves float32's
// range for tensors of tiny or huge elements (||x|| < ~3e-39 made the factor
// inf, and inf * 0 = NaN; ||x|| > ~1e38 / l2 made it subnormal or 0) although
// every gradient element, l2 * x / ||x||, is at most l2 in magnitude. Kernels
// compute in float64 when a coefficient does not fit: the choice depends only
// on the tensor's coefficients, so results stay the same on every thread.
C10_HOST_DEVICE inline bool coef_fits_float(double c) {
  const double a = ::fabs(c);
  return a == 0.0 || (a >= 1e-30 && a <= 1e30);
}

C10_HOST_DEVICE inline GradCoefficients grad_coefficients(
    double grad_out, double sum_sq, double l1, double l2, bool l2_squared) {
  GradCoefficients c;
  c.sign_coef = grad_out * l1;
  if (l2_squared) {
    c.linear_coef = 2.0 * (grad_out * l2);
  } else {
    // torch's norm backward: x * (g / ||x||), masked to 0 where ||x|| == 0.
    // A NaN norm fails the == 0 test and stays NaN.
    const double norm = ::sqrt(sum_sq);
    const double coef = grad_out * l2;
    c.linear_coef = (norm == 0.0) ? 0.0 : coef / norm;
    // 1 / norm is a normal double for every finite nonzero norm (norm is at least
    // sqrt(4.9e-324) = 2.2e-162 and at most 1.3e154), and |x / norm| <= 1.
    // (Comparisons instead of isfinite/isnormal: the same code on host and device.)
    constexpr double kMax = 1.7976931348623157e308, kMinNormal = 2.2250738585072014e-308;
    const double mag = ::fabs(c.linear_coef);
    if (coef != 0.0 && ::fabs(coef) <= kMax && norm != 0.0 && norm <= kMax &&
        !(mag >= kMinNormal && mag <= kMax)) {
      c.linear_coef = coef;
      c.linear_scale = 1.0 / norm;
    }
  }
  return c;
}

// ---- Proximal steps and sparsity (prox_l1_, prox_group_l2_, count_zeros) ----

// Soft-thresholding, the proximal map of t * |x|:  sign(x) * max(|x| - t, 0).
// Computed in T (float for float32/float16/bfloat16, double for float64) and
// rounded once to the parameter's dtype. Every |x| <= t becomes +0 exactly,
// so t = 0 changes nothing but -0 -> +0. NaN stays NaN and +-inf stays +-inf
// (for finite t). |x| - t is exact whenever |x| <= 2t (Sterbenz), so applying
// the step twice with t equals applying it once with 2t up to one rounding.
// (The CPU loops apply the same formula to whole registers: soft_threshold_lanes
// in cpu/vector_loops_impl.h.)
template <typename T>
C10_HOST_DEVICE inline T soft_threshold(T x, T t) {
  const T magnitude = x < T(0) ? -x : x;  // NaN and -0 pass through unchanged
  const T shrunk = magnitude - t;
  const T signed_shrunk = x < T(0) ? -shrunk : shrunk;
  return magnitude <= t ? T(0) : signed_shrunk;  // +0; false for NaN
}

// Group shrinkage, the proximal map of t * ||x||_2 for one whole tensor:
//     x <- x * max(0, 1 - t / ||x||_2),
// from sum_sq = sum x^2 (a `stats` column). The factor is 0 when ||x|| <= t
// (an all-zero tensor stays zero, also for t = 0), 1 - t/||x|| in (0, 1]
// otherwise, and exactly 1 when the norm is +inf or NaN: a tensor holding
// NaN/inf is left unchanged (its non-finite entries stay visible) instead
// of having every finite entry turned into NaN.
C10_HOST_DEVICE inline double group_shrink_scale(double sum_sq, double t) {
  const double norm = ::sqrt(sum_sq);
  if (norm != norm) return 1.0;  // NaN
  if (norm <= t) return 0.0;
  return 1.0 - t / norm;         // 1 for an infinite norm
}

// An exact zero (+0 or -0) for count_zeros; NaN is not zero.
template <typename T>
C10_HOST_DEVICE inline bool is_exact_zero(T x) {
  return x == T(0);
}

}  // namespace regext
