// The innermost CPU loops: one contiguous run of elements of one dtype.
//
// Each is compiled once per instruction set (vector_loops_{default,avx2,avx512}.cpp,
// from vector_loops_impl.h) and the best one the CPU has is chosen when regext
// loads (cpu_capability.cpp; REGEXT_CPU_CAPABILITY forces one). All of them are
// pure functions of their inputs and define their summation order by the
// algorithm (16 float32 lanes, 8 float64 lanes, 256-element blocks), never by
// the register width: the same run gives the same bits on every thread and
// every instruction set.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

#include "../group_metric_math.h"
#include "../penalty_math.h"

namespace regext::cpu {

struct AbsSqSums {
  double abs = 0.0;
  double sq = 0.0;
};

// The loops for elements of type T.
template <typename T>
struct LoopsFor {
  // sum |x| and sum x^2 over x[0, n). For float32 and the half types the sums
  // are formed in float32 over blocks of 256 elements and in float64 across
  // blocks (relative error ~1e-7, at most ~5e-7); `exact` (or data that float32
  // cannot square without overflow or underflow loss, NaN/inf included) widens
  // every element to float64 instead (~1e-15). float64 data is always exact.
  AbsSqSums (*abs_sq_sums)(const T* x, int64_t n, bool exact);
  // abs_sq_sums(x, n, exact) and, in the same read of x,
  // penalty_grad(x, g, n, sign_coef, linear_coef, 1, accumulate=true): for
  // gradients that do not depend on the sums (the squared L2 form).
  AbsSqSums (*abs_sq_sums_add_grad)(const T* x, T* g, int64_t n, bool exact, double sign_coef,
                                    double linear_coef);
  // out[i] = sign_coef * sign(x[i]) + (x[i] * linear_scale) * linear_coef
  // (accumulate: out[i] += ...), with GradCoefficients' fields (penalty_math.h).
  void (*penalty_grad)(const T* x, T* out, int64_t n, double sign_coef, double linear_coef,
                       double linear_scale, bool accumulate);
  // x[i] = sign(x[i]) * max(|x[i]| - t, 0) in place (regext::soft_threshold).
  void (*soft_threshold_)(T* x, int64_t n, double t);
  // x[i] = x[i] * scale in place, in ScaleCompute (compute_types.h), rounded once.
  void (*scale_)(T* x, int64_t n, double scale);
  // The number of elements equal to +0 or -0 in x[0, n).
  int64_t (*count_zeros)(const T* x, int64_t n);
  // Per position (groups with short runs, csrc/groups.h), in float64:
  // abs_acc[i] += |x[i]|, sq_acc[i] += x[i]^2.
  void (*abs_sq_accumulate)(const T* x, int64_t n, double* abs_acc, double* sq_acc);
  // out[i] = sign_coef * sign(x[i]) + (x[i] * linear_scale[i]) * linear_coef[i]
  // (accumulate: out[i] += ...), formed in float64 and rounded to T (through float32
  // for the half types, as c10's conversions go).
  void (*penalty_grad_by_position)(const T* x, T* out, int64_t n, double sign_coef,
                                   const double* linear_coef, const double* linear_scale,
                                   bool accumulate);
  // x[i] = x[i] * scale[i] in place, in ScaleCompute, rounded once.
  void (*scale_by_position_)(T* x, int64_t n, const double* scale);
  // abs_sq_sums(x, n, exact).sq, bit for bit, with less work where it can.
  double (*sq_sum)(const T* x, int64_t n, bool exact);
  // The proximal step in an optimizer's metric, in place: x[i] = metric_prox(x[i],
  // metric_denominator(v[i], m[i], ...), c) (penalty_math.h), with the means m of
  // centered RMSprop, or m == nullptr for none. float64 arithmetic, rounded once to T
  // (through float32 for the half types, as c10's conversions go); for float32 and the
  // half types without means, metric_prox_float wherever it decides (within 5e-6 of
  // the float64 step, the same zeros).
  void (*metric_prox_)(T* x, const T* v, const T* m, int64_t n, const MetricCoefs& c);
  // The first read of the group lasso in an optimizer's metric (group_metric_math.h):
  // gx[i] = x[i], gd[i] = metric_denominator(v[i], m[i], scale, eps) and
  // gc[i] = lam / gd[i], in float64 (m == nullptr: no means); the scalar forms' bits.
  void (*metric_gather)(const T* x, const T* v, const T* m, int64_t n, double scale,
                        double eps, double lam, double* gx, double* gd, double* gc);
};

// One instruction-set variant of every loop.
struct VectorLoops {
  const char* capability;  // "default", "avx2" or "avx512"
  LoopsFor<float> f32;
  LoopsFor<double> f64;
  LoopsFor<c10::Half> f16;
  LoopsFor<c10::BFloat16> bf16;
  // One Newton iteration's sums of the group lasso in an optimizer's metric
  // (csrc/group_metric_math.h) over a group's gathered float64 x and c: element e adds
  // add_newton_terms to lane e % 8, the 8 lanes are added in a fixed tree. The same
  // operations in the same order on every variant (only the register width differs):
  // the same bits.
  NewtonSums (*newton_sums)(const double* x, const double* c, int64_t n, double tau);
  // A group's start sums (add_start_terms) over its gathered x, d and c: 8 lanes as
  // newton_sums', the sums added in a fixed tree, the maxima taken.
  GroupMetricStart (*start_sums)(const double* x, const double* d, const double* c, int64_t n);
};

// The variants compiled into this build (each null where the compiler or the
// architecture cannot build it).
const VectorLoops* default_loops();
const VectorLoops* avx2_loops();
const VectorLoops* avx512_loops();

// The variant chosen when the library loaded (cpu_capability.cpp).
const VectorLoops& vector_loops();

template <typename T>
const LoopsFor<T>& loops_for() {
  const VectorLoops& v = vector_loops();
  if constexpr (std::is_same_v<T, float>)
    return v.f32;
  else if constexpr (std::is_same_v<T, double>)
    return v.f64;
  else if constexpr (std::is_same_v<T, c10::Half>)
    return v.f16;
  else
    return v.bf16;
}

}  // namespace regext::cpu
