// The group lasso's proximal step in an optimizer's diagonal metric
// (prox_group_metric_), the arithmetic both backends share.
//
// For a group x (its elements x_i, their metric denominators d_i > 0: csrc/
// penalty_math.h, metric_denominator) and lam = l1_step * w_g (the group threshold
// times the optimizer's step size, times sqrt(group size) with sqrt_size), the step is
//     u = argmin_u lam ||u||_2 + 1/2 sum_i d_i (u_i - x_i)^2
// (the scaled proximal mapping of Lee, Sun & Saunders 2014, "Proximal Newton-type
// methods for minimizing composite functions"; issue 22). u = 0 iff
// ||d o x||_2 <= lam (0 is optimal iff the subgradient ball of radius lam holds
// D x). Otherwise, with c_i = lam / d_i and tau = ||u||_2, stationarity
// d_i (u_i - x_i) + lam u_i / tau = 0 gives u_i = x_i tau / (tau + c_i), and tau is
// the root of phi(tau) = sum_i (x_i / (tau + c_i))^2 = 1. h = phi^(-1/2) is
// increasing and concave in tau, so Newton's method on h(tau) = 1 started below the
// root, at tau_0 = max(0, ||x|| - max_{x_i != 0} c_i) (there every |x_i|/(tau+c_i)
// >= |x_i|/||x||, so phi >= 1), increases monotonically to it, quadratically near
// it: 4-6 iterations on the weights of a trained layer. The step in tau is
//     (1 - h) / h' = (phi^(3/2) - phi) / sum_i x_i^2 / (tau + c_i)^3,
// and the iteration stops when no longer moving tau by more than 2^-50 of itself
// (float64 round-off: from there rounding alone makes the steps) or after
// kMaxNewtonIterations. With d_i = 0 (eps = 0, v_i = 0) c_i = inf and u_i = 0.
// A group holding NaN or inf is left unchanged (as the Euclidean step leaves a
// non-finite norm's group); lam = 0 leaves every group unchanged.
//
// Everything is float64 for every dtype: the zero decision compares two sums of
// squares and the root needs float64 round-off to meet rtol 1e-5 after the
// dtype's rounding. regext.reference.prox_group_metric_reference is the same
// method with torch operations.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>

namespace regext {

constexpr int kMaxNewtonIterations = 100;

// Whether x is finite: x - x is 0 for finite x and NaN for NaN and +-inf (one
// expression for host and device code, where std::isfinite and isfinite differ).
C10_HOST_DEVICE inline bool is_finite_value(double x) {
  return x - x == 0.0;
}

// tau_0 from ||x||^2 and max c_i over the nonzero x_i.
C10_HOST_DEVICE inline double group_metric_start(double sum_sq, double c_max) {
  const double tau = ::sqrt(sum_sq) - c_max;
  return tau > 0.0 ? tau : 0.0;
}

// One element's terms of phi and of sum x^2 / (tau + c)^3.
struct NewtonSums {
  double phi = 0.0;
  double cubes = 0.0;
};
C10_HOST_DEVICE inline void add_newton_terms(NewtonSums& s, double x, double c, double tau) {
  const double r = 1.0 / (tau + c);
  const double q = x * r;
  const double q2 = q * q;
  s.phi += q2;
  s.cubes += q2 * r;
}

// The Newton step from the sums (0 where they carry no information).
C10_HOST_DEVICE inline double newton_step(const NewtonSums& s) {
  return (s.phi * ::sqrt(s.phi) - s.phi) / (s.cubes > 0.0 ? s.cubes : 1.0);
}

// Whether the step still moves tau by more than float64 round-off (false for NaN).
C10_HOST_DEVICE inline bool newton_moves(double step, double tau) {
  return step > tau * 0x1p-50;
}

// u_i from the root tau.
C10_HOST_DEVICE inline double group_metric_value(double x, double c, double tau) {
  return (1.0 / (tau + c)) * tau * x;
}

}  // namespace regext
