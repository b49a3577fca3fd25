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

// ---- Proximal steps in an optimizer's diagonal metric (prox_metric_) ----
//
// An Adam-type optimizer moves coordinate i by lr * m_i / denom_i, i.e. it takes a
// gradient step in the metric D = diag(denom) / lr. The proximal step of
// l1 |x| + l2 x^2 in that metric (the scaled proximal mapping of Lee, Sun & Saunders,
// "Proximal Newton-type methods for minimizing composite functions", 2014; the
// penalty is separable, so it acts per coordinate) is, with d = denom_i,
//     x <- sign(x) * max(|x| - l1_step / d, 0) / (1 + ridge_step / d),
// with l1_step = lr * l1 and ridge_step = 2 * lr * l2: soft-thresholding at lr*l1/d
// (the Euclidean step when d = 1), then the ridge factor. The denominator is read
// from the optimizer's state: d = sqrt(v - m^2) * scale + eps, where v is the
// second-moment state (Adam's exp_avg_sq or max_exp_avg_sq, Adagrad's sum,
// RMSprop's square_avg), m the mean gradient of centered RMSprop (0 otherwise) and
// scale Adam's 1 / sqrt(1 - beta2^t) (1 otherwise). The row of a tensor in the
// coefs table of prox_metric_:
constexpr int64_t kMetricColumns = 4;
struct MetricCoefs {
  double l1_step;     // lr * l1 (Adagrad: its decayed lr)
  double ridge_step;  // 2 * lr * l2 of the squared L2 term, 0 without one
  double scale;       // multiplies sqrt(v - m^2)
  double eps;         // added after: the optimizer's eps
  // Both steps 0 (no penalty, or an AMP step that was skipped): the tensor is
  // left untouched, bit for bit (kernels test this once per tensor).
  C10_HOST_DEVICE bool is_identity() const { return l1_step == 0.0 && ridge_step == 0.0; }
};

// d for one coordinate, in float64. v - m^2 is clamped at 0: it is >= 0 in exact
// arithmetic (an average of squares is at least the square of the average) and only
// rounding can make it negative, where torch's RMSprop would take sqrt(< 0) = NaN.
// A NaN v or m stays NaN.
template <bool kCentered>
C10_HOST_DEVICE inline double metric_denominator(double v, double m, double scale, double eps) {
  double s = v;
  if (kCentered) {
    s = v - m * m;
    s = s < 0.0 ? 0.0 : s;
  }
  return ::sqrt(s) * scale + eps;
}

// The step itself, in float64, from d. With d = 0 (eps = 0 and v = 0) the
// threshold is +inf and the coordinate becomes 0 (the ridge factor is 0 too); with
// d = +inf (v = inf) the threshold is 0 and nothing moves. Each term is skipped
// when its step is 0, so that 0 / 0 never arises. The CPU loops apply the same
// operations to whole registers (metric_prox_lanes in cpu/vector_loops_impl.h).
C10_HOST_DEVICE inline double metric_prox(double x, double d, const MetricCoefs& c) {
  double y = x;
  if (c.l1_step != 0.0) y = soft_threshold(y, c.l1_step / d);
  if (c.ridge_step != 0.0) y = y / (1.0 + c.ridge_step / d);
  return y;
}

// The float32 fast path of float32/float16/bfloat16 parameters (plain second moments;
// centered RMSprop and float64 parameters always take the float64 path). A float64
// square root and division per element cost ~3.5 cycles on a Zen 4 core, which made
// the step compute-bound at a third of the optimizer step's time; their float32 forms
// cost ~1. The float32 step is used where it provably agrees with the float64 one:
//   - the threshold t32 = fl(l1 / fl(fl(sqrt(v)) * scale + eps)) is within 6 units of
//     2^-24 of the exact t (each of the six roundings, coefficients included, adds at
//     most one; a sum of positive terms keeps the relative error), so below 2^-21;
//   - a coordinate with |x| <= t32 (1 - 2^-20) is zero in float64 too, one with
//     |x| >= 1.125 t32 nonzero, and there |y| >= t/8 (to 2^-21) bounds the error of
//     y = |x| - t32 by 8 * 2^-21 + 2^-24 relative, ~4e-6 (with the ridge factor's
//     three roundings, below 5e-6): the same zeros, within 5e-6 of the float64 step;
//   - a coordinate between the two, a denominator below 1e-30 (subnormal products) or
//     NaN, or NaN x, returns false here and is computed by metric_prox in float64
//     instead. (l1_step <= 1e8 keeps every threshold below 1e38: finite in float32.)
// Both backends, scalar and vector code, make the same decisions with the same
// correctly rounded operations (no fused multiply-add): the same bits everywhere.
constexpr float kMetricZeroBelow = 1.0f - 0x1p-20f;  // |x| <= t32 * this: certainly 0
constexpr float kMetricExactAbove = 1.125f;           // |x| >= t32 * this: error <= 5e-6
constexpr float kMetricMinDenominator = 1e-30f;
constexpr double kMetricMaxL1Step = 1e8;  // / kMetricMinDenominator stays below 1e38

struct MetricCoefsFloat {
  float l1_step, ridge_step, scale, eps;
  bool l1, ridge;
};

// Whether a tensor's coefficients may be rounded to float32 (each 0 or within
// [1e-30, 1e30], coef_fits_float; l1_step at most 1e8): then the fast path applies
// element by element.
C10_HOST_DEVICE inline bool metric_fits_float(const MetricCoefs& c) {
  return coef_fits_float(c.l1_step) && c.l1_step <= kMetricMaxL1Step &&
         coef_fits_float(c.ridge_step) && coef_fits_float(c.scale) && coef_fits_float(c.eps);
}

C10_HOST_DEVICE inline MetricCoefsFloat metric_coefs_float(const MetricCoefs& c) {
  return {static_cast<float>(c.l1_step), static_cast<float>(c.ridge_step),
          static_cast<float>(c.scale), static_cast<float>(c.eps), c.l1_step != 0.0,
          c.ridge_step != 0.0};
}

// The step of one coordinate in float32 into *out; false (and *out untouched) where
// the coordinate must be computed in float64 (see above).
C10_HOST_DEVICE inline bool metric_prox_float(float x, float v, const MetricCoefsFloat& c,
                                              float* out) {
  const float d = ::sqrtf(v) * c.scale + c.eps;
  if (!(d >= kMetricMinDenominator)) return false;  // also NaN
  float y = x;
  if (c.l1) {
    const float t = c.l1_step / d;
    const float magnitude = x < 0.0f ? -x : x;
    if (!(magnitude <= t * kMetricZeroBelow || magnitude >= t * kMetricExactAbove)) {
      return false;  // near the threshold, or NaN x
    }
    y = soft_threshold(x, t);
  }
  if (c.ridge) y = y / (1.0f + c.ridge_step / d);
  *out = y;
  return true;
}

// An exact zero (+0 or -0) for count_zeros; NaN is not zero.
template <typename T>
C10_HOST_DEVICE inline bool is_exact_zero(T x) {
  return x == T(0);
}

}  // namespace regext
