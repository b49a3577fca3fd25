// The innermost CPU loops: one contiguous run of elements of one dtype.
//
// They are compiled once per instruction set (AVX-512, AVX2, baseline x86-64)
// and picked at load time, so a default build runs on any x86-64 and still
// uses the widest vectors the machine has. All of them are pure functions of
// their inputs: the same run gives the same bits on every thread and every ISA.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cstdint>

namespace regext::cpu {

// sum |x| and sum x^2 over x[0, n). For float32 and the half types the sums
// are formed in float32 over blocks of 256 elements and in float64 across
// blocks (relative error ~1e-7, at most ~5e-7); `exact` (or data that float32
// cannot square without overflow or underflow loss, NaN/inf included) widens
// every element to float64 instead (~1e-15). float64 data is always exact.
struct AbsSqSums {
  double abs = 0.0;
  double sq = 0.0;
};

AbsSqSums abs_sq_sums(const float* x, int64_t n, bool exact);
AbsSqSums abs_sq_sums(const double* x, int64_t n, bool exact);
AbsSqSums abs_sq_sums(const c10::Half* x, int64_t n, bool exact);
AbsSqSums abs_sq_sums(const c10::BFloat16* x, int64_t n, bool exact);

// abs_sq_sums(x, n, exact) and, in the same read of x,
// penalty_grad(x, g, n, sign_coef, linear_coef, 1, accumulate=true): for
// gradients that do not depend on the sums (the squared L2 form).
AbsSqSums abs_sq_sums_add_grad(const float* x, float* g, int64_t n, bool exact,
                               double sign_coef, double linear_coef);
AbsSqSums abs_sq_sums_add_grad(const double* x, double* g, int64_t n, bool exact,
                               double sign_coef, double linear_coef);
AbsSqSums abs_sq_sums_add_grad(const c10::Half* x, c10::Half* g, int64_t n, bool exact,
                               double sign_coef, double linear_coef);
AbsSqSums abs_sq_sums_add_grad(const c10::BFloat16* x, c10::BFloat16* g, int64_t n, bool exact,
                               double sign_coef, double linear_coef);

// out[i] = sign_coef * sign(x[i]) + (x[i] * linear_scale) * linear_coef
// (accumulate: out[i] += ...), with GradCoefficients' fields (penalty_math.h).
void penalty_grad(const float* x, float* out, int64_t n, double sign_coef, double linear_coef,
                  double linear_scale, bool accumulate);
void penalty_grad(const double* x, double* out, int64_t n, double sign_coef,
                  double linear_coef, double linear_scale, bool accumulate);
void penalty_grad(const c10::Half* x, c10::Half* out, int64_t n, double sign_coef,
                  double linear_coef, double linear_scale, bool accumulate);
void penalty_grad(const c10::BFloat16* x, c10::BFloat16* out, int64_t n, double sign_coef,
                  double linear_coef, double linear_scale, bool accumulate);

// x[i] = sign(x[i]) * max(|x[i]| - t, 0) in place (regext::soft_threshold).
void soft_threshold_(float* x, int64_t n, double t);
void soft_threshold_(double* x, int64_t n, double t);
void soft_threshold_(c10::Half* x, int64_t n, double t);
void soft_threshold_(c10::BFloat16* x, int64_t n, double t);

// x[i] = x[i] * scale in place, in ScaleCompute (compute_types.h), rounded once.
void scale_(float* x, int64_t n, double scale);
void scale_(double* x, int64_t n, double scale);
void scale_(c10::Half* x, int64_t n, double scale);
void scale_(c10::BFloat16* x, int64_t n, double scale);

// The number of elements equal to +0 or -0 in x[0, n).
int64_t count_zeros(const float* x, int64_t n);
int64_t count_zeros(const double* x, int64_t n);
int64_t count_zeros(const c10::Half* x, int64_t n);
int64_t count_zeros(const c10::BFloat16* x, int64_t n);

}  // namespace regext::cpu
