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
// root (group_metric_start) increases monotonically to it, quadratically near it:
// 4-6 iterations on the weights of a trained layer. The step in tau is
//     (1 - h) / h' = (phi^(3/2) - phi) / sum_i x_i^2 / (tau + c_i)^3,
// and the iteration stops when no longer moving tau by more than 2^-50 of itself
// (float64 round-off: from there rounding alone makes the steps) or after
// kMaxNewtonIterations. With d_i = 0 (eps = 0, v_i = 0) c_i = inf and u_i = 0;
// with d_i = +inf (v_i = inf) c_i = 0 and u_i = x_i. lam = 0 leaves every group
// unchanged; group_metric_case says what NaN, inf and overflow do.
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

// What the first read of a group gathers, element by element (then summed, or the
// maximum taken, across threads or lanes).
struct GroupMetricStart {
  double sum_sq = 0.0;      // sum x^2
  double sum_sq_dx = 0.0;   // sum (d x)^2 over the nonzero x
  double c_max = 0.0;       // max c over the nonzero x (NaN ignored)
  double best_single = 0.0; // max(0, max |x_i| - c_i) over the nonzero x
  double bad_x = 0.0;       // elements that are NaN or +-inf
  double nan_d = 0.0;       // elements whose denominator is NaN (a NaN moment or mean)
};
C10_HOST_DEVICE inline void add_start_terms(GroupMetricStart& s, double x, double d, double c) {
  // Selects, not branches: the loop that calls this once per element is a straight
  // line (its time is the float64 square root and division of each element: ~8 ns
  // per element on one Zen 4 core, scalar).
  const bool finite = is_finite_value(x);
  s.bad_x += finite ? 0.0 : 1.0;
  s.nan_d += d != d ? 1.0 : 0.0;
  const bool counts = finite && x != 0.0;  // x = 0 adds 0 to every sum; 0 * inf never arises
  const double xs = counts ? x : 0.0;
  s.sum_sq += xs * xs;
  const double dx = counts ? d * x : 0.0;
  s.sum_sq_dx += dx * dx;
  const double cs = counts ? c : 0.0;
  s.c_max = cs > s.c_max ? cs : s.c_max;  // NaN c: not greater, ignored
  const double single = counts ? (x < 0.0 ? -x : x) - c : 0.0;
  s.best_single = single > s.best_single ? single : s.best_single;
}

// What becomes of a group, from its start sums:
//  - NaN or inf among its x: unchanged (as the Euclidean step leaves a group whose
//    norm is not finite);
//  - a NaN denominator (the optimizer's state holds NaN): every element NaN, as the
//    per-coordinate metric step makes that coordinate NaN (the metric is undefined);
//  - sum x^2 beyond float64's range (|x| near 1e154): unchanged, as above;
//  - ||d o x|| <= lam: zero; otherwise solved by Newton's method.
enum class GroupMetricCase : int { kUnchanged, kNaN, kZero, kSolve };
C10_HOST_DEVICE inline GroupMetricCase group_metric_case(const GroupMetricStart& s, double lam) {
  if (s.bad_x > 0.0) return GroupMetricCase::kUnchanged;
  if (s.nan_d > 0.0) return GroupMetricCase::kNaN;
  if (!is_finite_value(s.sum_sq)) return GroupMetricCase::kUnchanged;
  if (s.sum_sq_dx <= lam * lam) return GroupMetricCase::kZero;
  return GroupMetricCase::kSolve;
}

// tau_0, a lower bound of the root: phi(tau) >= ||x||^2 / (tau + c_max)^2 and
// phi(tau) >= x_i^2 / (tau + c_i)^2 for every i, so phi >= 1 at both
// ||x|| - c_max and |x_i| - c_i. The second keeps tau_0 > 0 when a nonzero x_i has
// c_i = 0 (d_i = +inf: a coordinate the metric does not move), where tau = 0 would
// divide by 0, and near the root when c spans many decades.
C10_HOST_DEVICE inline double group_metric_start(const GroupMetricStart& s) {
  const double tau = ::sqrt(s.sum_sq) - s.c_max;
  return tau > s.best_single ? tau : s.best_single;
}

// One element's terms of phi and of sum x^2 / (tau + c)^3 (0 for x = 0).
struct NewtonSums {
  double phi = 0.0;
  double cubes = 0.0;
};
C10_HOST_DEVICE inline void add_newton_terms(NewtonSums& s, double x, double c, double tau) {
  // The division always, then a select (the CPU loop stays vectorizable: a division
  // under a condition is not speculated, as it may raise a floating-point flag):
  // tau + c may be 0 where x = 0 (c = 0 and tau = 0), and 0 * (1 / 0) would be NaN.
  const double all = 1.0 / (tau + c);
  const double r = x == 0.0 ? 0.0 : all;
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

// A step that is NaN or +inf: the sums left float64's range (coordinates whose
// denominators span some 600 decades); the group is then left unchanged.
C10_HOST_DEVICE inline bool newton_failed(double step) {
  return !is_finite_value(step);
}

// u_i from the root tau (x = 0 stays as it is).
C10_HOST_DEVICE inline double group_metric_value(double x, double c, double tau) {
  if (x == 0.0) return x;
  return (1.0 / (tau + c)) * tau * x;
}

}  // namespace regext
