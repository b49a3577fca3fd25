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
//     sign_coef * sign(x) + linear_coef * x.
// grad_out is the incoming gradient of the 0-dim result.
//
// Unless split_scale != 0: then linear_coef = (grad_out * l2) / ||x|| has left
// double's normal range (a tiny coefficient on a tensor of huge norm, e.g.
// l2 = 1e-300 and ||x|| = 1e38, underflows to a subnormal or 0) although every
// gradient element does not (|x| / ||x|| <= 1), and the linear term is
//     (x * split_scale) * split_coef,   split_scale = 1 / ||x||, split_coef = grad_out * l2.
// linear_coef keeps its old meaning, so a kernel that ignores the split still
// computes what it did before.
struct GradCoefficients {
  double sign_coef;
  double linear_coef;
  double split_coef = 0.0;
  double split_scale = 0.0;
};

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
      c.split_coef = coef;
      c.split_scale = 1.0 / norm;
    }
  }
  return c;
}

}  // namespace regext
