// See vector_loops.h. The bodies are templates written so that GCC vectorizes
// them (fixed-width lane arrays, no cross-lane dependence); each public
// overload is cloned per ISA with `target_clones` and dispatched at load time.
// The build passes -ffp-contract=off so no clone fuses a*b+c differently.
#include "vector_loops.h"

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "../compute_types.h"
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

// Fixed-width vectors (GCC vector extensions): the compiler maps them onto
// whatever registers the ISA clone has (one zmm, two ymm or four xmm), so the
// arithmetic, and hence the rounding, is identical in every clone.
typedef double Doubles8 __attribute__((vector_size(64)));
typedef long long Int64s8 __attribute__((vector_size(64)));
typedef float Floats8 __attribute__((vector_size(32)));
typedef float Floats16 __attribute__((vector_size(64)));
typedef int Int32s16 __attribute__((vector_size(64)));

// Widens N consecutive elements to a vector of N floats (N = 8 or 16).
template <int N>
struct Lanes {
  typedef float Floats __attribute__((vector_size(4 * N)));
  typedef unsigned short Bits16 __attribute__((vector_size(2 * N)));
  typedef unsigned int Bits32 __attribute__((vector_size(4 * N)));
};

template <int N>
REGEXT_INLINE typename Lanes<N>::Floats load_floats(const float* x) {
  typename Lanes<N>::Floats v;
  __builtin_memcpy(&v, x, sizeof(v));
  return v;
}
template <int N>
REGEXT_INLINE typename Lanes<N>::Floats load_floats(const c10::BFloat16* x) {
  // bfloat16 is the top half of a float32.
  typename Lanes<N>::Bits16 bits;
  __builtin_memcpy(&bits, x, sizeof(bits));
  return reinterpret_cast<typename Lanes<N>::Floats>(
      __builtin_convertvector(bits, typename Lanes<N>::Bits32) << 16);
}
template <int N>
REGEXT_INLINE typename Lanes<N>::Floats load_floats(const c10::Half* x) {
  typename Lanes<N>::Floats v;
  for (int i = 0; i < N; ++i) v[i] = static_cast<float>(x[i]);
  return v;
}

template <typename T>
REGEXT_INLINE Floats8 load8(const T* x) {
  return load_floats<8>(x);
}
template <typename T>
REGEXT_INLINE Floats16 load16(const T* x) {
  return load_floats<16>(x);
}

REGEXT_INLINE Floats16 abs16(Floats16 v) {
  return reinterpret_cast<Floats16>(reinterpret_cast<Int32s16>(v) & 0x7fffffff);
}

REGEXT_INLINE Doubles8 abs8(Doubles8 v) {
  return reinterpret_cast<Doubles8>(reinterpret_cast<Int64s8>(v) & 0x7fffffffffffffffLL);
}

// Elements per block of the float32 loops below.
constexpr int64_t kBlockElems = 256;

// Software prefetch of the block kPrefetchBytes ahead of `p` (a block of
// kBlockElems elements), one request per 256 bytes: the hardware prefetchers
// stop at every 4 KiB page boundary, and a single stream read by one core
// then waits on memory latency. Measured on the 2-core Xeon VM, summing GPT-2
// small (475 MiB), two runs: 48-51 -> 39-42 ms on one thread, 27 -> 20-23 ms
// on two. Prefetches past the end of a tensor are harmless (they never fault).
constexpr int64_t kPrefetchBytes = 8192;

template <typename T>
REGEXT_INLINE void prefetch_ahead(const T* p, int rw = 0) {
  const char* ahead = reinterpret_cast<const char*>(p) + kPrefetchBytes;
  constexpr int64_t kBlockBytes = kBlockElems * static_cast<int64_t>(sizeof(T));
  for (int64_t offset = 0; offset < kBlockBytes; offset += 256) {
    if (rw) {
      __builtin_prefetch(ahead + offset, 1);
    } else {
      __builtin_prefetch(ahead + offset, 0);
    }
  }
}

// The float64 reference loop: every element widened to double, so the sums
// are exact to ~1e-15 relative and never overflow or underflow for float32 and
// the half types. It costs ~12 vector instructions per 16 elements, which makes
// it compute-bound (about 11 GB/s per core on an AVX-512 Xeon with one 512-bit
// FMA port), so it only runs where the float32 blocks below cannot be trusted.
template <typename T>
REGEXT_INLINE AbsSqSums abs_sq_sums_double(const T* x, int64_t n) {
  Doubles8 abs_a = {}, abs_b = {}, sq_a = {}, sq_b = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    if (i % kBlockElems == 0) prefetch_ahead(x + i);
    Doubles8 a, b;
    if constexpr (std::is_same_v<T, double>) {
      __builtin_memcpy(&a, x + i, sizeof(a));
      __builtin_memcpy(&b, x + i + 8, sizeof(b));
    } else {
      a = __builtin_convertvector(load8(x + i), Doubles8);
      b = __builtin_convertvector(load8(x + i + 8), Doubles8);
    }
    abs_a += abs8(a);
    abs_b += abs8(b);
    sq_a += a * a;
    sq_b += b * b;
  }
  abs_a += abs_b;
  sq_a += sq_b;
  double abs_sum = 0.0, sq_sum = 0.0;
  for (int lane = 0; lane < 8; ++lane) {
    abs_sum += abs_a[lane];
    sq_sum += sq_a[lane];
  }
  for (; i < n; ++i) {
    const double v = static_cast<double>(x[i]);
    abs_sum += std::fabs(v);
    sq_sum += v * v;
  }
  return {abs_sum, sq_sum};
}

// Adds the 16 float lanes of v to the 8 double lanes of acc (lanes i and i + 8
// to lane i), each lane widened exactly before the add.
REGEXT_INLINE Doubles8 add_widened(Doubles8 acc, Floats16 v) {
  const Floats8 lo = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7);
  const Floats8 hi = __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  return acc + (__builtin_convertvector(lo, Doubles8) + __builtin_convertvector(hi, Doubles8));
}

// The fast path for float32 and the half types: |x| and x^2 are summed in
// float32 lanes over short blocks (kBlockElems elements: 8 terms per lane),
// and each block's lanes are widened and added in float64. About 5 vector
// instructions per 16 elements, so the loop runs at memory speed. The float32
// part adds a relative error of at most ~8 float32 roundings (5e-7) in the
// worst case, ~1e-7 typically; the float64 part keeps it from growing with n.

struct FloatBlockSums {
  AbsSqSums sums;
  bool trusted;  // false: redo with abs_sq_sums_double
};

// after_block(begin, length) runs after each block's sums are formed (and
// once for the tail), while the block is still in L1: the one-pass
// forward-and-accumulate below updates the gradient there.
template <typename T, typename AfterBlock>
REGEXT_INLINE FloatBlockSums abs_sq_sums_float_blocks(const T* x, int64_t n,
                                                      AfterBlock&& after_block) {
  Doubles8 abs_acc = {}, sq_acc = {};
  int64_t i = 0;
  for (; i + kBlockElems <= n; i += kBlockElems) {
    Floats16 abs_a = {}, abs_b = {}, sq_a = {}, sq_b = {};
    prefetch_ahead(x + i);
    for (int64_t j = i; j < i + kBlockElems; j += 32) {
      const Floats16 a = load16(x + j), b = load16(x + j + 16);
      abs_a += abs16(a);
      abs_b += abs16(b);
      sq_a += a * a;
      sq_b += b * b;
    }
    abs_acc = add_widened(add_widened(abs_acc, abs_a), abs_b);
    sq_acc = add_widened(add_widened(sq_acc, sq_a), sq_b);
    after_block(i, kBlockElems);
  }
  after_block(i, n - i);
  // The tail: whole vectors of 16, then single elements in float64.
  Floats16 abs_t = {}, sq_t = {};
  for (; i + 16 <= n; i += 16) {
    const Floats16 a = load16(x + i);
    abs_t += abs16(a);
    sq_t += a * a;
  }
  abs_acc = add_widened(abs_acc, abs_t);
  sq_acc = add_widened(sq_acc, sq_t);
  double abs_sum = 0.0, sq_sum = 0.0;
  for (int lane = 0; lane < 8; ++lane) {
    abs_sum += abs_acc[lane];
    sq_sum += sq_acc[lane];
  }
  for (; i < n; ++i) {
    const double v = static_cast<double>(x[i]);
    abs_sum += std::fabs(v);
    sq_sum += v * v;
  }
  // float32 squares overflow above |x| ~ 1.8e19 (and lane sums near 3.4e38),
  // and lose bits below |x| ~ 1.1e-19, where x^2 is subnormal: at most
  // 2^-150 per element. That loss is negligible (< 1e-8 relative) unless the
  // sum of squares is below n * 1e-37; an all-zero run (abs_sum == 0) is exact.
  // NaN/inf inputs land here too and get the float64 loop's answer.
  const bool finite = std::isfinite(abs_sum) && std::isfinite(sq_sum);
  const bool no_underflow_loss = sq_sum >= 1e-37 * static_cast<double>(n) || abs_sum == 0.0;
  return {{abs_sum, sq_sum}, finite && no_underflow_loss};
}

template <typename T>
REGEXT_INLINE AbsSqSums abs_sq_sums_impl(const T* x, int64_t n, bool exact) {
  if constexpr (!std::is_same_v<T, double>) {
    if (exact) return abs_sq_sums_double(x, n);
    const FloatBlockSums fast = abs_sq_sums_float_blocks(x, n, [](int64_t, int64_t) {});
    if (fast.trusted) return fast.sums;
  }
  return abs_sq_sums_double(x, n);
}

// Gradients of float32 and the half types are computed in float32 (as torch's
// autograd of the loop does) and rounded once to the parameter's dtype, as
// long as both coefficients are comfortably inside float32's range
// (coef_fits_float, penalty_math.h); otherwise in float64.
// kScaled: the linear term is (x * linear_scale) * linear_coef (float64 only).
template <typename T, typename Compute, bool kScaled = false>
REGEXT_INLINE void penalty_grad_impl(const T* x, T* out, int64_t n, double sign_coef,
                                     double linear_coef, double linear_scale, bool accumulate) {
  const Compute s = static_cast<Compute>(sign_coef);
  const Compute l = static_cast<Compute>(linear_coef);
  const Compute k = static_cast<Compute>(linear_scale);
  auto term = [&](Compute v) { return s * sign_of(v) + (kScaled ? (v * k) * l : l * v); };
  for (int64_t begin = 0; begin < n; begin += kBlockElems) {
    const int64_t end = std::min(n, begin + kBlockElems);
    prefetch_ahead(x + begin);
    prefetch_ahead(out + begin, /*rw=*/1);
    if (accumulate) {
      for (int64_t i = begin; i < end; ++i) {
        const Compute v = static_cast<Compute>(x[i]);
        out[i] = static_cast<T>(static_cast<Compute>(out[i]) + term(v));
      }
    } else {
      for (int64_t i = begin; i < end; ++i) {
        out[i] = static_cast<T>(term(static_cast<Compute>(x[i])));
      }
    }
  }
}

template <typename T>
REGEXT_INLINE void penalty_grad_any(const T* x, T* out, int64_t n, double sign_coef,
                                    double linear_coef, double linear_scale, bool accumulate) {
  if (linear_scale != 1.0) {
    penalty_grad_impl<T, double, true>(x, out, n, sign_coef, linear_coef, linear_scale,
                                       accumulate);
    return;
  }
  using Compute = typename ElementwiseCompute<T>::type;
  if constexpr (!std::is_same_v<Compute, double>) {
    if (coef_fits_float(sign_coef) && coef_fits_float(linear_coef)) {
      penalty_grad_impl<T, Compute>(x, out, n, sign_coef, linear_coef, 1.0, accumulate);
      return;
    }
  }
  penalty_grad_impl<T, double>(x, out, n, sign_coef, linear_coef, 1.0, accumulate);
}

// abs_sq_sums and penalty_grad(accumulate) in one read of x: each float32
// block's gradient is added right after its sums, from L1. The sums are
// bit-identical to abs_sq_sums (same blocks, same order), the gradient to
// penalty_grad's (it is elementwise). Where abs_sq_sums takes its float64
// path, x is summed again from cache (the chunk is at most 256 KiB).
template <typename T>
REGEXT_INLINE AbsSqSums abs_sq_sums_add_grad_impl(const T* x, T* g, int64_t n, bool exact,
                                                  double sign_coef, double linear_coef) {
  auto add_grad = [&](int64_t begin, int64_t length) {
    penalty_grad_any<T>(x + begin, g + begin, length, sign_coef, linear_coef, 1.0,
                        /*accumulate=*/true);
  };
  if constexpr (!std::is_same_v<T, double>) {
    if (!exact) {
      const FloatBlockSums fast = abs_sq_sums_float_blocks(x, n, add_grad);
      return fast.trusted ? fast.sums : abs_sq_sums_double(x, n);
    }
  }
  const AbsSqSums sums = abs_sq_sums_double(x, n);
  add_grad(0, n);
  return sums;
}

template <typename T, typename Compute = typename ElementwiseCompute<T>::type>
REGEXT_INLINE void soft_threshold_impl(T* x, int64_t n, double t) {
  const Compute tc = static_cast<Compute>(t);
  for (int64_t i = 0; i < n; ++i) {
    x[i] = static_cast<T>(soft_threshold<Compute>(static_cast<Compute>(x[i]), tc));
  }
}

template <typename T, typename Compute = typename ScaleCompute<T>::type>
REGEXT_INLINE void scale_impl(T* x, int64_t n, double scale) {
  const Compute s = static_cast<Compute>(scale);
  for (int64_t i = 0; i < n; ++i) {
    x[i] = static_cast<T>(static_cast<Compute>(x[i]) * s);
  }
}

template <typename T>
REGEXT_INLINE int64_t count_zeros_impl(const T* x, int64_t n) {
  int64_t zeros = 0;
  if constexpr (std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::BFloat16>) {
    // +-0 in both 16-bit formats: every bit but the sign is clear.
    for (int64_t i = 0; i < n; ++i) {
      unsigned short bits;
      __builtin_memcpy(&bits, x + i, sizeof(bits));
      zeros += (bits & 0x7fffu) == 0;
    }
  } else {
    for (int64_t i = 0; i < n; ++i) zeros += is_exact_zero(x[i]);
  }
  return zeros;
}

}  // namespace

REGEXT_ISA_CLONES AbsSqSums abs_sq_sums(const float* x, int64_t n, bool exact) {
  return abs_sq_sums_impl(x, n, exact);
}
REGEXT_ISA_CLONES AbsSqSums abs_sq_sums(const double* x, int64_t n, bool exact) {
  return abs_sq_sums_impl(x, n, exact);
}
REGEXT_ISA_CLONES AbsSqSums abs_sq_sums(const c10::Half* x, int64_t n, bool exact) {
  return abs_sq_sums_impl(x, n, exact);
}
REGEXT_ISA_CLONES AbsSqSums abs_sq_sums(const c10::BFloat16* x, int64_t n, bool exact) {
  return abs_sq_sums_impl(x, n, exact);
}

REGEXT_ISA_CLONES AbsSqSums abs_sq_sums_add_grad(const float* x, float* g, int64_t n, bool exact,
                                                double sign_coef, double linear_coef) {
  return abs_sq_sums_add_grad_impl(x, g, n, exact, sign_coef, linear_coef);
}
REGEXT_ISA_CLONES AbsSqSums abs_sq_sums_add_grad(const double* x, double* g, int64_t n, bool exact,
                                                double sign_coef, double linear_coef) {
  return abs_sq_sums_add_grad_impl(x, g, n, exact, sign_coef, linear_coef);
}
REGEXT_ISA_CLONES AbsSqSums abs_sq_sums_add_grad(const c10::Half* x, c10::Half* g, int64_t n, bool exact,
                                                double sign_coef, double linear_coef) {
  return abs_sq_sums_add_grad_impl(x, g, n, exact, sign_coef, linear_coef);
}
REGEXT_ISA_CLONES AbsSqSums abs_sq_sums_add_grad(const c10::BFloat16* x, c10::BFloat16* g, int64_t n, bool exact,
                                                double sign_coef, double linear_coef) {
  return abs_sq_sums_add_grad_impl(x, g, n, exact, sign_coef, linear_coef);
}

REGEXT_ISA_CLONES void penalty_grad(const float* x, float* out, int64_t n, double sign_coef,
                                    double linear_coef, double linear_scale, bool accumulate) {
  penalty_grad_any<float>(x, out, n, sign_coef, linear_coef, linear_scale, accumulate);
}
REGEXT_ISA_CLONES void penalty_grad(const double* x, double* out, int64_t n, double sign_coef,
                                    double linear_coef, double linear_scale, bool accumulate) {
  penalty_grad_any<double>(x, out, n, sign_coef, linear_coef, linear_scale, accumulate);
}
REGEXT_ISA_CLONES void penalty_grad(const c10::Half* x, c10::Half* out, int64_t n,
                                    double sign_coef, double linear_coef, double linear_scale,
                                    bool accumulate) {
  penalty_grad_any<c10::Half>(x, out, n, sign_coef, linear_coef, linear_scale, accumulate);
}
REGEXT_ISA_CLONES void penalty_grad(const c10::BFloat16* x, c10::BFloat16* out, int64_t n,
                                    double sign_coef, double linear_coef, double linear_scale,
                                    bool accumulate) {
  penalty_grad_any<c10::BFloat16>(x, out, n, sign_coef, linear_coef, linear_scale, accumulate);
}

REGEXT_ISA_CLONES void soft_threshold_(float* x, int64_t n, double t) {
  soft_threshold_impl<float>(x, n, t);
}
REGEXT_ISA_CLONES void soft_threshold_(double* x, int64_t n, double t) {
  soft_threshold_impl<double>(x, n, t);
}
REGEXT_ISA_CLONES void soft_threshold_(c10::Half* x, int64_t n, double t) {
  soft_threshold_impl<c10::Half>(x, n, t);
}
REGEXT_ISA_CLONES void soft_threshold_(c10::BFloat16* x, int64_t n, double t) {
  soft_threshold_impl<c10::BFloat16>(x, n, t);
}

REGEXT_ISA_CLONES void scale_(float* x, int64_t n, double scale) {
  scale_impl<float>(x, n, scale);
}
REGEXT_ISA_CLONES void scale_(double* x, int64_t n, double scale) {
  scale_impl<double>(x, n, scale);
}
REGEXT_ISA_CLONES void scale_(c10::Half* x, int64_t n, double scale) {
  scale_impl<c10::Half>(x, n, scale);
}
REGEXT_ISA_CLONES void scale_(c10::BFloat16* x, int64_t n, double scale) {
  scale_impl<c10::BFloat16>(x, n, scale);
}

REGEXT_ISA_CLONES int64_t count_zeros(const float* x, int64_t n) { return count_zeros_impl(x, n); }
REGEXT_ISA_CLONES int64_t count_zeros(const double* x, int64_t n) {
  return count_zeros_impl(x, n);
}
REGEXT_ISA_CLONES int64_t count_zeros(const c10::Half* x, int64_t n) {
  return count_zeros_impl(x, n);
}
REGEXT_ISA_CLONES int64_t count_zeros(const c10::BFloat16* x, int64_t n) {
  return count_zeros_impl(x, n);
}

}  // namespace regext::cpu
