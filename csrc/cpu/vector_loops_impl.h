// The CPU loops of vector_loops.h, for one instruction set. Included once by
// each vector_loops_<isa>.cpp after every header it needs (this file includes
// none: its own inline functions must be the only code compiled for the ISA,
// so that no inline function of another header gets an ISA-specific copy that
// the linker could pick for the default path) and after `#pragma GCC target`,
// with these defined:
//   REGEXT_ISA          the namespace of this variant (default, avx2, avx512)
//   REGEXT_FLOAT_LANES  floats per native vector register (4, 8 or 16)
//   REGEXT_ISA_LOOPS    the name of the function returning the variant's table
//
// The arithmetic is written over the algorithm's lanes (16 float32 lanes, 8
// float64 lanes), each kept in whole native registers, so every variant adds
// the same numbers in the same order: results are bitwise identical across
// instruction sets. The build passes -ffp-contract=off: no variant fuses a*b+c.

#define REGEXT_INLINE inline __attribute__((always_inline))

namespace regext::cpu::REGEXT_ISA {
namespace {

constexpr int kF = REGEXT_FLOAT_LANES;  // floats per register
constexpr int kD = kF / 2;              // doubles per register
static_assert(kF == 4 || kF == 8 || kF == 16, "REGEXT_FLOAT_LANES must be 4, 8 or 16");

typedef float FloatV __attribute__((vector_size(4 * kF)));
typedef float FloatHalfV __attribute__((vector_size(4 * kD)));
typedef double DoubleV __attribute__((vector_size(8 * kD)));
typedef int IntV __attribute__((vector_size(4 * kF)));
typedef long long LongV __attribute__((vector_size(8 * kD)));
typedef unsigned short Bits16V __attribute__((vector_size(2 * kF)));
typedef unsigned int Bits32V __attribute__((vector_size(4 * kF)));

// The algorithm's lanes in native registers.
struct Floats16 {
  FloatV p[16 / kF];
};
struct Doubles8 {
  DoubleV p[8 / kD];
};

// kF consecutive elements as floats.
REGEXT_INLINE FloatV load_floats(const float* x) {
  FloatV v;
  __builtin_memcpy(&v, x, sizeof(v));
  return v;
}
REGEXT_INLINE FloatV load_floats(const c10::BFloat16* x) {
  // bfloat16 is the top half of a float32.
  Bits16V bits;
  __builtin_memcpy(&bits, x, sizeof(bits));
  return reinterpret_cast<FloatV>(__builtin_convertvector(bits, Bits32V) << 16);
}
REGEXT_INLINE FloatV load_floats(const c10::Half* x) {
  FloatV v;
  for (int i = 0; i < kF; ++i) v[i] = static_cast<float>(x[i]);
  return v;
}

template <typename T>
REGEXT_INLINE Floats16 load16(const T* x) {
  Floats16 v;
  for (int k = 0; k < 16 / kF; ++k) v.p[k] = load_floats(x + k * kF);
  return v;
}

REGEXT_INLINE void add_abs_and_square(Floats16& abs_acc, Floats16& sq_acc, const Floats16& v) {
  for (int k = 0; k < 16 / kF; ++k) {
    abs_acc.p[k] += reinterpret_cast<FloatV>(reinterpret_cast<IntV>(v.p[k]) & 0x7fffffff);
    sq_acc.p[k] += v.p[k] * v.p[k];
  }
}

// The low (H = 0) or high (H = 1) half of a register's floats (where no ISA
// conversion is used below).
template <int H>
[[maybe_unused]] REGEXT_INLINE FloatHalfV half_of(FloatV v) {
#if REGEXT_FLOAT_LANES == 16
  return H == 0 ? __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7)
                : __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
#elif REGEXT_FLOAT_LANES == 8
  return H == 0 ? __builtin_shufflevector(v, v, 0, 1, 2, 3)
                : __builtin_shufflevector(v, v, 4, 5, 6, 7);
#else
  return H == 0 ? __builtin_shufflevector(v, v, 0, 1) : __builtin_shufflevector(v, v, 2, 3);
#endif
}

// The low (H = 0) or high (H = 1) half of a register's floats, widened exactly to
// float64. GCC 12 lowers __builtin_convertvector from 4 floats to 4 doubles into
// 2-element pieces through the stack; the ISA's own conversion is one instruction.
template <int H>
REGEXT_INLINE DoubleV widen(FloatV v) {
#if defined(__x86_64__) && REGEXT_FLOAT_LANES == 16
  // The zero-masked forms: GCC 12's unmasked ones warn about an "undefined" operand.
  return reinterpret_cast<DoubleV>(
      _mm512_maskz_cvtps_pd(0xFF, _mm512_maskz_extractf32x8_ps(0xFF, v, H)));
#elif defined(__x86_64__) && REGEXT_FLOAT_LANES == 8
  return reinterpret_cast<DoubleV>(
      _mm256_cvtps_pd(H == 0 ? _mm256_castps256_ps128(v) : _mm256_extractf128_ps(v, 1)));
#elif defined(__x86_64__)
  return reinterpret_cast<DoubleV>(_mm_cvtps_pd(H == 0 ? v : _mm_movehl_ps(v, v)));
#else
  return __builtin_convertvector(half_of<H>(v), DoubleV);
#endif
}

// Float lanes [first, first + kD) of v, widened exactly to float64.
template <int first>
REGEXT_INLINE DoubleV widen_lanes(const Floats16& v) {
  return widen<(first % kF) / kD>(v.p[first / kF]);
}

// acc[L] += (double(v[L]) + double(v[L + 8])) for the 8 float64 lanes L: the
// 16 float lanes of a block, widened exactly and paired, then added.
template <int K = 0>
REGEXT_INLINE void add_widened(Doubles8& acc, const Floats16& v) {
  acc.p[K] += widen_lanes<K * kD>(v) + widen_lanes<8 + K * kD>(v);
  if constexpr (K + 1 < 8 / kD) add_widened<K + 1>(acc, v);
}

// Float lanes [8 * H, 8 * H + 8) of v as the 8 float64 lanes.
template <int H, int K = 0>
REGEXT_INLINE void widen8(Doubles8& out, const Floats16& v) {
  out.p[K] = widen_lanes<8 * H + K * kD>(v);
  if constexpr (K + 1 < 8 / kD) widen8<H, K + 1>(out, v);
}

// The 8 float64 lanes added in lane order.
REGEXT_INLINE double lane_sum(const Doubles8& acc) {
  double sum = 0.0;
  for (int k = 0; k < 8 / kD; ++k) {
    for (int j = 0; j < kD; ++j) sum += acc.p[k][j];
  }
  return sum;
}

// 16 consecutive elements widened to float64: a = the first 8, b = the next 8.
REGEXT_INLINE void load_doubles16(const double* x, Doubles8& a, Doubles8& b) {
  __builtin_memcpy(&a, x, sizeof(a));
  __builtin_memcpy(&b, x + 8, sizeof(b));
}
template <typename T>
REGEXT_INLINE void load_doubles16(const T* x, Doubles8& a, Doubles8& b) {
  const Floats16 v = load16(x);
  widen8<0>(a, v);
  widen8<1>(b, v);
}

REGEXT_INLINE DoubleV abs_of(DoubleV v) {
  return reinterpret_cast<DoubleV>(reinterpret_cast<LongV>(v) & 0x7fffffffffffffffLL);
}

// Elements per block of the float32 loops below.
constexpr int64_t kBlockElems = 256;

// Software prefetch, into L2, of the block kPrefetchBytes ahead of `p` (a block
// of kBlockElems elements), one request per cache line: the hardware prefetchers
// stop at every 4 KiB page boundary, and a single stream read by one core then
// waits on memory latency. One request per 256 bytes, into L1, or a shorter
// distance, left one core's DRAM read slower than x.sum()'s
// (benchmarks/results/README.md has the measurements). Prefetches past the end
// of a tensor are harmless (they never fault).
constexpr int64_t kPrefetchBytes = 65536;
constexpr int64_t kCacheLine = 64;

template <typename T>
REGEXT_INLINE void prefetch_ahead(const T* p, int rw = 0) {
  const char* ahead = reinterpret_cast<const char*>(p) + kPrefetchBytes;
  constexpr int64_t kBlockBytes = kBlockElems * static_cast<int64_t>(sizeof(T));
  for (int64_t offset = 0; offset < kBlockBytes; offset += kCacheLine) {
    if (rw) {
      __builtin_prefetch(ahead + offset, 1, 2);
    } else {
      __builtin_prefetch(ahead + offset, 0, 2);
    }
  }
}

// The float64 loop: every element widened to double, so the sums are exact to
// ~1e-15 relative and never overflow or underflow for float32 and the half
// types. Lanes: element i + L of each 16 goes to lane L (a) or L - 8 (b).
template <typename T>
REGEXT_INLINE AbsSqSums abs_sq_sums_double(const T* x, int64_t n) {
  Doubles8 abs_a{}, abs_b{}, sq_a{}, sq_b{};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    if (i % kBlockElems == 0) prefetch_ahead(x + i);
    Doubles8 a, b;
    load_doubles16(x + i, a, b);
    for (int k = 0; k < 8 / kD; ++k) {
      abs_a.p[k] += abs_of(a.p[k]);
      abs_b.p[k] += abs_of(b.p[k]);
      sq_a.p[k] += a.p[k] * a.p[k];
      sq_b.p[k] += b.p[k] * b.p[k];
    }
  }
  for (int k = 0; k < 8 / kD; ++k) {
    abs_a.p[k] += abs_b.p[k];
    sq_a.p[k] += sq_b.p[k];
  }
  double abs_sum = lane_sum(abs_a), sq_sum = lane_sum(sq_a);
  for (; i < n; ++i) {
    const double v = static_cast<double>(x[i]);
    abs_sum += __builtin_fabs(v);
    sq_sum += v * v;
  }
  return {abs_sum, sq_sum};
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
  Doubles8 abs_acc{}, sq_acc{};
  int64_t i = 0;
  for (; i + kBlockElems <= n; i += kBlockElems) {
    Floats16 abs_a{}, abs_b{}, sq_a{}, sq_b{};
    prefetch_ahead(x + i);
    for (int64_t j = i; j < i + kBlockElems; j += 32) {
      add_abs_and_square(abs_a, sq_a, load16(x + j));
      add_abs_and_square(abs_b, sq_b, load16(x + j + 16));
    }
    add_widened(abs_acc, abs_a);
    add_widened(abs_acc, abs_b);
    add_widened(sq_acc, sq_a);
    add_widened(sq_acc, sq_b);
    after_block(i, kBlockElems);
  }
  after_block(i, n - i);
  // The tail: whole vectors of 16, then single elements in float64.
  Floats16 abs_t{}, sq_t{};
  for (; i + 16 <= n; i += 16) add_abs_and_square(abs_t, sq_t, load16(x + i));
  add_widened(abs_acc, abs_t);
  add_widened(sq_acc, sq_t);
  double abs_sum = lane_sum(abs_acc), sq_sum = lane_sum(sq_acc);
  for (; i < n; ++i) {
    const double v = static_cast<double>(x[i]);
    abs_sum += __builtin_fabs(v);
    sq_sum += v * v;
  }
  // float32 squares overflow above |x| ~ 1.8e19 (and lane sums near 3.4e38),
  // and lose bits below |x| ~ 1.1e-19, where x^2 is subnormal: at most
  // 2^-150 per element. That loss is negligible (< 1e-8 relative) unless the
  // sum of squares is below n * 1e-37; an all-zero run (abs_sum == 0) is exact.
  // NaN/inf inputs land here too and get the float64 loop's answer.
  const bool finite = __builtin_isfinite(abs_sum) && __builtin_isfinite(sq_sum);
  const bool no_underflow_loss = sq_sum >= 1e-37 * static_cast<double>(n) || abs_sum == 0.0;
  return {{abs_sum, sq_sum}, finite && no_underflow_loss};
}

template <typename T>
AbsSqSums abs_sq_sums(const T* x, int64_t n, bool exact) {
  if constexpr (!std::is_same_v<T, double>) {
    if (!exact) {
      const FloatBlockSums fast = abs_sq_sums_float_blocks(x, n, [](int64_t, int64_t) {});
      if (fast.trusted) return fast.sums;
    }
  }
  return abs_sq_sums_double(x, n);
}

// sum x^2 alone, bit for bit abs_sq_sums(x, n, exact).sq: the same float32 blocks
// and lane order for the squares, without the |x| lanes (fewer instructions where
// the data is in cache: the proximal step of the group lasso). Wherever
// abs_sq_sums would not trust its float32 blocks (non-finite, or a sum of squares
// small enough to have lost bits, which includes an all-zero run) this calls it.
REGEXT_INLINE void add_square(Floats16& sq_acc, const Floats16& v) {
  for (int k = 0; k < 16 / kF; ++k) sq_acc.p[k] += v.p[k] * v.p[k];
}

template <typename T>
double sq_sum(const T* x, int64_t n, bool exact) {
  if constexpr (!std::is_same_v<T, double>) {
    if (!exact) {
      Doubles8 sq_acc{};
      int64_t i = 0;
      for (; i + kBlockElems <= n; i += kBlockElems) {
        Floats16 sq_a{}, sq_b{};
        prefetch_ahead(x + i);
        for (int64_t j = i; j < i + kBlockElems; j += 32) {
          add_square(sq_a, load16(x + j));
          add_square(sq_b, load16(x + j + 16));
        }
        add_widened(sq_acc, sq_a);
        add_widened(sq_acc, sq_b);
      }
      Floats16 sq_t{};
      for (; i + 16 <= n; i += 16) add_square(sq_t, load16(x + i));
      add_widened(sq_acc, sq_t);
      double sum = lane_sum(sq_acc);
      for (; i < n; ++i) {
        const double v = static_cast<double>(x[i]);
        sum += v * v;
      }
      if (__builtin_isfinite(sum) && sum >= 1e-37 * static_cast<double>(n) && sum > 0.0) {
        return sum;
      }
    }
  }
  return abs_sq_sums(x, n, exact).sq;
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
    const int64_t end = begin + kBlockElems < n ? begin + kBlockElems : n;
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
void penalty_grad(const T* x, T* out, int64_t n, double sign_coef, double linear_coef,
                  double linear_scale, bool accumulate) {
  if (linear_scale != 1.0) {
    penalty_grad_impl<T, double, true>(x, out, n, sign_coef, linear_coef, linear_scale, accumulate);
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
AbsSqSums abs_sq_sums_add_grad(const T* x, T* g, int64_t n, bool exact, double sign_coef,
                               double linear_coef) {
  auto add_grad = [&](int64_t begin, int64_t length) {
    penalty_grad<T>(x + begin, g + begin, length, sign_coef, linear_coef, 1.0,
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

// soft_threshold (penalty_math.h) on a register of lanes, with vector selects: both
// sides of every select are computed, which the scalar form cannot get compilers to
// do without AVX-512 masks (a subtraction on one side only may not be speculated).
template <typename V>
REGEXT_INLINE V soft_threshold_lanes(V x, V t) {
  const V zero{};
  const V magnitude = x < zero ? -x : x;
  const V shrunk = magnitude - t;
  const V signed_shrunk = x < zero ? -shrunk : shrunk;
  return magnitude <= t ? zero : signed_shrunk;
}

// fn(begin, end) over x[0, n) in blocks of kBlockElems elements, each block's
// successor prefetched for writing first.
template <typename T, typename Fn>
REGEXT_INLINE void for_each_block_rw(T* x, int64_t n, Fn&& fn) {
  for (int64_t begin = 0; begin < n; begin += kBlockElems) {
    prefetch_ahead(x + begin, /*rw=*/1);
    fn(begin, begin + kBlockElems < n ? begin + kBlockElems : n);
  }
}

template <typename T>
void soft_threshold_(T* x, int64_t n, double t) {
  using Compute = typename ElementwiseCompute<T>::type;
  const Compute tc = static_cast<Compute>(t);
  for_each_block_rw(x, n, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    if constexpr (std::is_same_v<T, float>) {
      const FloatV tv = FloatV{} + tc;
      for (; i + kF <= end; i += kF) {
        const FloatV r = soft_threshold_lanes(load_floats(x + i), tv);
        __builtin_memcpy(x + i, &r, sizeof(r));
      }
    } else if constexpr (std::is_same_v<T, double>) {
      const DoubleV tv = DoubleV{} + tc;
      for (; i + kD <= end; i += kD) {
        DoubleV v;
        __builtin_memcpy(&v, x + i, sizeof(v));
        const DoubleV r = soft_threshold_lanes(v, tv);
        __builtin_memcpy(x + i, &r, sizeof(r));
      }
    } else {
      const FloatV tv = FloatV{} + tc;
      for (; i + kF <= end; i += kF) {
        const FloatV r = soft_threshold_lanes(load_floats(x + i), tv);
        for (int k = 0; k < kF; ++k) x[i + k] = static_cast<T>(r[k]);
      }
    }
    for (; i < end; ++i) {
      x[i] = static_cast<T>(soft_threshold<Compute>(static_cast<Compute>(x[i]), tc));
    }
  });
}

template <typename T>
void scale_(T* x, int64_t n, double scale) {
  using Compute = typename ScaleCompute<T>::type;
  const Compute s = static_cast<Compute>(scale);
  for_each_block_rw(x, n, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      x[i] = static_cast<T>(static_cast<Compute>(x[i]) * s);
    }
  });
}

template <typename T>
int64_t count_zeros(const T* x, int64_t n) {
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

// ---- Per-position loops, for groups whose runs are short (csrc/groups.h) ----
// Elementwise in float64 with no sum across positions, so every instruction set
// gives the same bits; the compiler vectorizes them for each.

template <typename T>
void abs_sq_accumulate(const T* x, int64_t n, double* abs_acc, double* sq_acc) {
  for (int64_t begin = 0; begin < n; begin += kBlockElems) {
    const int64_t end = begin + kBlockElems < n ? begin + kBlockElems : n;
    prefetch_ahead(x + begin);
    for (int64_t i = begin; i < end; ++i) {
      const double v = static_cast<double>(x[i]);
      abs_acc[i] += __builtin_fabs(v);
      sq_acc[i] += v * v;
    }
  }
}

template <typename T>
void penalty_grad_by_position(const T* x, T* out, int64_t n, double sign_coef,
                              const double* linear_coef, const double* linear_scale,
                              bool accumulate) {
  for (int64_t begin = 0; begin < n; begin += kBlockElems) {
    const int64_t end = begin + kBlockElems < n ? begin + kBlockElems : n;
    prefetch_ahead(x + begin);
    prefetch_ahead(out + begin, /*rw=*/1);
    for (int64_t i = begin; i < end; ++i) {
      const double v = static_cast<double>(x[i]);
      const double g = sign_coef * sign_of(v) + (v * linear_scale[i]) * linear_coef[i];
      out[i] = static_cast<T>(accumulate ? static_cast<double>(out[i]) + g : g);
    }
  }
}

template <typename T>
void scale_by_position_(T* x, int64_t n, const double* scale) {
  using Compute = typename ScaleCompute<T>::type;
  for_each_block_rw(x, n, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      x[i] = static_cast<T>(static_cast<Compute>(x[i]) * static_cast<Compute>(scale[i]));
    }
  });
}

// ---- The proximal step in an optimizer's metric (prox_metric_) ----
// Elementwise, in float64 (metric_prox) or in float32 where that provably agrees
// (metric_prox_float; penalty_math.h says when): correctly rounded sqrt, division and
// conversions, no fused multiply-add, the same per-lane decisions as the scalar
// code, so every instruction set gives the bits of the functions in penalty_math.h.

// sqrt of every lane with the ISA's instruction (correctly rounded, as ::sqrt).
REGEXT_INLINE DoubleV sqrt_lanes(DoubleV v) {
#if defined(__x86_64__) && REGEXT_FLOAT_LANES == 16
  return reinterpret_cast<DoubleV>(_mm512_maskz_sqrt_pd(0xFF, reinterpret_cast<__m512d>(v)));
#elif defined(__x86_64__) && REGEXT_FLOAT_LANES == 8
  return reinterpret_cast<DoubleV>(_mm256_sqrt_pd(reinterpret_cast<__m256d>(v)));
#elif defined(__x86_64__)
  return reinterpret_cast<DoubleV>(_mm_sqrt_pd(reinterpret_cast<__m128d>(v)));
#else
  DoubleV r;
  for (int j = 0; j < kD; ++j) r[j] = __builtin_sqrt(v[j]);
  return r;
#endif
}

// kF consecutive elements as float64: lo = the first kD, hi = the next kD.
template <typename T>
REGEXT_INLINE void load_double_pair(const T* x, DoubleV& lo, DoubleV& hi) {
  if constexpr (std::is_same_v<T, double>) {
    __builtin_memcpy(&lo, x, sizeof(lo));
    __builtin_memcpy(&hi, x + kD, sizeof(hi));
  } else {
    const FloatV f = load_floats(x);
    lo = widen<0>(f);
    hi = widen<1>(f);
  }
}

// kD float64 lanes rounded to float (to nearest, as static_cast<float>), stored at out.
REGEXT_INLINE void store_narrowed(float* out, DoubleV v) {
#if defined(__x86_64__) && REGEXT_FLOAT_LANES == 16
  const __m256 f = _mm512_maskz_cvtpd_ps(0xFF, reinterpret_cast<__m512d>(v));
#elif defined(__x86_64__) && REGEXT_FLOAT_LANES == 8
  const __m128 f = _mm256_cvtpd_ps(reinterpret_cast<__m256d>(v));
#elif defined(__x86_64__)
  const __m128 f = _mm_cvtpd_ps(reinterpret_cast<__m128d>(v));  // 2 floats in the low half
#else
  float f[kD];
  for (int j = 0; j < kD; ++j) f[j] = static_cast<float>(v[j]);
#endif
  __builtin_memcpy(out, &f, kD * sizeof(float));
}

// The inverse of load_double_pair, each lane rounded once to T.
template <typename T>
REGEXT_INLINE void store_double_pair(T* x, DoubleV lo, DoubleV hi) {
  if constexpr (std::is_same_v<T, double>) {
    __builtin_memcpy(x, &lo, sizeof(lo));
    __builtin_memcpy(x + kD, &hi, sizeof(hi));
  } else if constexpr (std::is_same_v<T, float>) {
    store_narrowed(x, lo);
    store_narrowed(x + kD, hi);
  } else {
    for (int j = 0; j < kD; ++j) {
      x[j] = from_double<T>(lo[j]);
      x[kD + j] = from_double<T>(hi[j]);
    }
  }
}

// Register forms of metric_denominator and metric_prox (penalty_math.h): the same
// operations in the same order, with vector selects for the clamp.
struct MetricLanes {
  DoubleV l1_step, ridge_step, scale, eps, one;
  bool l1, ridge;
  explicit MetricLanes(const MetricCoefs& c)
      : l1_step(DoubleV{} + c.l1_step),
        ridge_step(DoubleV{} + c.ridge_step),
        scale(DoubleV{} + c.scale),
        eps(DoubleV{} + c.eps),
        one(DoubleV{} + 1.0),
        l1(c.l1_step != 0.0),
        ridge(c.ridge_step != 0.0) {}
};

template <bool kCentered>
REGEXT_INLINE DoubleV metric_prox_lanes(DoubleV x, DoubleV v, DoubleV m, const MetricLanes& k) {
  DoubleV s = v;
  if constexpr (kCentered) {
    const DoubleV zero{};
    s = v - m * m;
    s = s < zero ? zero : s;
  }
  const DoubleV d = sqrt_lanes(s) * k.scale + k.eps;
  DoubleV y = x;
  if (k.l1) y = soft_threshold_lanes(y, k.l1_step / d);
  if (k.ridge) y = y / (k.one + k.ridge_step / d);
  return y;
}

template <typename T, bool kCentered>
REGEXT_INLINE void metric_prox_impl(T* x, const T* v, const T* m, int64_t n,
                                    const MetricCoefs& c) {
  const MetricLanes k(c);
  for_each_block_rw(x, n, [&](int64_t begin, int64_t end) {
    prefetch_ahead(v + begin);
    if constexpr (kCentered) prefetch_ahead(m + begin);
    int64_t i = begin;
    for (; i + kF <= end; i += kF) {
      DoubleV x0, x1, v0, v1, m0{}, m1{};
      load_double_pair(x + i, x0, x1);
      load_double_pair(v + i, v0, v1);
      if constexpr (kCentered) load_double_pair(m + i, m0, m1);
      store_double_pair(x + i, metric_prox_lanes<kCentered>(x0, v0, m0, k),
                        metric_prox_lanes<kCentered>(x1, v1, m1, k));
    }
    for (; i < end; ++i) {
      const double mean = kCentered ? static_cast<double>(m[i]) : 0.0;
      const double d =
          metric_denominator<kCentered>(static_cast<double>(v[i]), mean, c.scale, c.eps);
      x[i] = from_double<T>(metric_prox(static_cast<double>(x[i]), d, c));
    }
  });
}

// sqrt of every float lane with the ISA's instruction (correctly rounded, as ::sqrtf).
REGEXT_INLINE FloatV sqrt_floats(FloatV v) {
#if defined(__x86_64__) && REGEXT_FLOAT_LANES == 16
  return reinterpret_cast<FloatV>(_mm512_maskz_sqrt_ps(0xFFFF, reinterpret_cast<__m512>(v)));
#elif defined(__x86_64__) && REGEXT_FLOAT_LANES == 8
  return reinterpret_cast<FloatV>(_mm256_sqrt_ps(reinterpret_cast<__m256>(v)));
#elif defined(__x86_64__)
  return reinterpret_cast<FloatV>(_mm_sqrt_ps(reinterpret_cast<__m128>(v)));
#else
  FloatV r;
  for (int j = 0; j < kF; ++j) r[j] = __builtin_sqrtf(v[j]);
  return r;
#endif
}

// Whether every lane of a comparison result is true (-1): the sign bits, gathered by
// the ISA's movemask (a reduction through memory stalled the loop below).
REGEXT_INLINE bool all_lanes(IntV mask) {
#if defined(__x86_64__) && REGEXT_FLOAT_LANES == 16
  return _mm512_movepi32_mask(reinterpret_cast<__m512i>(mask)) == 0xFFFF;
#elif defined(__x86_64__) && REGEXT_FLOAT_LANES == 8
  return _mm256_movemask_ps(reinterpret_cast<__m256>(mask)) == 0xFF;
#elif defined(__x86_64__)
  return _mm_movemask_ps(reinterpret_cast<__m128>(mask)) == 0xF;
#else
  bool all = true;
  for (int k = 0; k < kF; ++k) all = all && mask[k] != 0;
  return all;
#endif
}

// metric_prox_float (penalty_math.h) on a register: the same operations, lane by
// lane; `decided` is true (-1) in the lanes it computed, false in those it leaves to
// float64.
struct MetricFloatLanes {
  FloatV l1_step, ridge_step, scale, eps, one, zero_below, exact_above, min_d;
  explicit MetricFloatLanes(const MetricCoefsFloat& c)
      : l1_step(FloatV{} + c.l1_step),
        ridge_step(FloatV{} + c.ridge_step),
        scale(FloatV{} + c.scale),
        eps(FloatV{} + c.eps),
        one(FloatV{} + 1.0f),
        zero_below(FloatV{} + kMetricZeroBelow),
        exact_above(FloatV{} + kMetricExactAbove),
        min_d(FloatV{} + kMetricMinDenominator) {}
};

// Soft-thresholding here works on the bits: |x| by clearing the sign, the result's
// sign put back with an xor, the zeros by masking. For every lane it decides (x not
// NaN) that is soft_threshold's result bit for bit: +0 where |x| <= t, else
// sign(x)·(|x| − t) with |x| − t > 0; and fewer instructions than its selects.
template <bool kL1, bool kRidge>
REGEXT_INLINE FloatV metric_prox_float_lanes(FloatV x, FloatV v, const MetricFloatLanes& k,
                                             IntV& decided) {
  const FloatV d = sqrt_floats(v) * k.scale + k.eps;
  decided = d >= k.min_d;
  FloatV y = x;
  if constexpr (kL1) {
    const IntV bits = reinterpret_cast<IntV>(x);
    const FloatV magnitude = reinterpret_cast<FloatV>(bits & 0x7fffffff);
    const FloatV t = k.l1_step / d;
    decided &= (magnitude <= t * k.zero_below) | (magnitude >= t * k.exact_above);
    const IntV shrunk = reinterpret_cast<IntV>(magnitude - t) ^ (bits & INT32_MIN);
    y = reinterpret_cast<FloatV>(shrunk & ~(magnitude <= t));
  }
  if constexpr (kRidge) y = y / (k.one + k.ridge_step / d);
  return y;
}

// One element: the float32 step where it decides, else the float64 step.
template <typename T>
REGEXT_INLINE T metric_prox_element(T x, T v, const MetricCoefs& c, const MetricCoefsFloat& cf) {
  float y;
  if (metric_prox_float(static_cast<float>(x), static_cast<float>(v), cf, &y)) {
    return static_cast<T>(y);
  }
  const double d = metric_denominator<false>(static_cast<double>(v), 0.0, c.scale, c.eps);
  return from_double<T>(metric_prox(static_cast<double>(x), d, c));
}

// float32/float16/bfloat16 parameters with plain second moments, coefficients within
// float32's range: the fast path, each register's undecided lanes redone in float64.
// kF lanes of y stored at x, rounded to T; the lanes `decided` does not hold are
// computed by metric_prox_element instead.
template <typename T>
REGEXT_INLINE void store_decided(T* x, const T* v, FloatV y, IntV decided, const MetricCoefs& c,
                                 const MetricCoefsFloat& cf) {
  if (all_lanes(decided)) {
    if constexpr (std::is_same_v<T, float>) {
      __builtin_memcpy(x, &y, sizeof(y));
    } else {
      for (int j = 0; j < kF; ++j) x[j] = static_cast<T>(y[j]);
    }
    return;
  }
  for (int j = 0; j < kF; ++j) {
    x[j] = decided[j] ? static_cast<T>(y[j]) : metric_prox_element(x[j], v[j], c, cf);
  }
}

// Two registers per iteration: the square root and the division are long-latency
// chains, and two independent ones keep the units busy.
template <typename T, bool kL1, bool kRidge>
REGEXT_INLINE void metric_prox_float_loop(T* x, const T* v, int64_t n, const MetricCoefs& c) {
  const MetricCoefsFloat cf = metric_coefs_float(c);
  const MetricFloatLanes k(cf);
  for_each_block_rw(x, n, [&](int64_t begin, int64_t end) {
    prefetch_ahead(v + begin);
    int64_t i = begin;
    for (; i + 2 * kF <= end; i += 2 * kF) {
      IntV decided0, decided1;
      const FloatV y0 =
          metric_prox_float_lanes<kL1, kRidge>(load_floats(x + i), load_floats(v + i), k, decided0);
      const FloatV y1 = metric_prox_float_lanes<kL1, kRidge>(load_floats(x + i + kF),
                                                            load_floats(v + i + kF), k, decided1);
      if (std::is_same_v<T, float> && all_lanes(decided0 & decided1)) {  // the usual case
        __builtin_memcpy(x + i, &y0, sizeof(y0));
        __builtin_memcpy(x + i + kF, &y1, sizeof(y1));
        continue;
      }
      store_decided(x + i, v + i, y0, decided0, c, cf);
      store_decided(x + i + kF, v + i + kF, y1, decided1, c, cf);
    }
    for (; i < end; ++i) x[i] = metric_prox_element(x[i], v[i], c, cf);
  });
}

template <typename T>
REGEXT_INLINE void metric_prox_float_impl(T* x, const T* v, int64_t n, const MetricCoefs& c) {
  if (c.l1_step != 0.0 && c.ridge_step != 0.0) {
    metric_prox_float_loop<T, true, true>(x, v, n, c);
  } else if (c.l1_step != 0.0) {
    metric_prox_float_loop<T, true, false>(x, v, n, c);
  } else {
    metric_prox_float_loop<T, false, true>(x, v, n, c);
  }
}

template <typename T>
void metric_prox_(T* x, const T* v, const T* m, int64_t n, const MetricCoefs& c) {
  if (m != nullptr) {
    metric_prox_impl<T, true>(x, v, m, n, c);
    return;
  }
  if constexpr (!std::is_same_v<T, double>) {
    if (metric_fits_float(c)) {
      metric_prox_float_impl(x, v, n, c);
      return;
    }
  }
  metric_prox_impl<T, false>(x, v, nullptr, n, c);
}

// ---- The group lasso in an optimizer's metric: one Newton iteration's sums ----
// Plain C++ over 8 lanes in structure-of-arrays form: the compiler vectorizes the
// lane loop with this variant's registers (2, 4 or 8 doubles per division), the
// operations per lane and their order are those of add_newton_terms on every variant.
constexpr int kNewtonLanes = 8;
NewtonSums newton_sums(const double* x, const double* c, int64_t n, double tau) {
  double phi[kNewtonLanes] = {}, cubes[kNewtonLanes] = {};
  int64_t e = 0;
  for (; e + kNewtonLanes <= n; e += kNewtonLanes) {
    for (int k = 0; k < kNewtonLanes; ++k) {
      NewtonSums terms;  // 0 + q2 == q2: the same bits as adding to the lane directly
      add_newton_terms(terms, x[e + k], c[e + k], tau);
      phi[k] += terms.phi;
      cubes[k] += terms.cubes;
    }
  }
  for (int k = 0; e < n; ++e, ++k) {
    NewtonSums terms;
    add_newton_terms(terms, x[e], c[e], tau);
    phi[k] += terms.phi;
    cubes[k] += terms.cubes;
  }
  for (int width = kNewtonLanes / 2; width > 0; width /= 2) {
    for (int k = 0; k < width; ++k) {
      phi[k] += phi[k + width];
      cubes[k] += cubes[k + width];
    }
  }
  NewtonSums total;
  total.phi = phi[0];
  total.cubes = cubes[0];
  return total;
}

// ---- The group lasso in an optimizer's metric: the first read of a run ----
// x, d = metric_denominator(v, m) and c = lam / d as float64, into gx, gd, gc: the
// operations of the scalar forms (penalty_math.h) in registers, so the same bits.
template <typename T, bool kCentered>
REGEXT_INLINE void metric_gather_impl(const T* x, const T* v, const T* m, int64_t n,
                                      double scale, double eps, double lam, double* gx,
                                      double* gd, double* gc) {
  const DoubleV sc = DoubleV{} + scale, ep = DoubleV{} + eps, la = DoubleV{} + lam;
  auto denominator = [&](DoubleV vv, DoubleV mm) {
    DoubleV s = vv;
    if constexpr (kCentered) {
      const DoubleV zero{};
      s = vv - mm * mm;
      s = s < zero ? zero : s;
    }
    return sqrt_lanes(s) * sc + ep;
  };
  int64_t i = 0;
  for (; i + kF <= n; i += kF) {
    DoubleV x0, x1, v0, v1, m0{}, m1{};
    load_double_pair(x + i, x0, x1);
    load_double_pair(v + i, v0, v1);
    if constexpr (kCentered) load_double_pair(m + i, m0, m1);
    const DoubleV d0 = denominator(v0, m0), d1 = denominator(v1, m1);
    const DoubleV c0 = la / d0, c1 = la / d1;
    __builtin_memcpy(gx + i, &x0, sizeof(x0));
    __builtin_memcpy(gx + i + kD, &x1, sizeof(x1));
    __builtin_memcpy(gd + i, &d0, sizeof(d0));
    __builtin_memcpy(gd + i + kD, &d1, sizeof(d1));
    __builtin_memcpy(gc + i, &c0, sizeof(c0));
    __builtin_memcpy(gc + i + kD, &c1, sizeof(c1));
  }
  for (; i < n; ++i) {
    const double mean = kCentered ? static_cast<double>(m[i]) : 0.0;
    gx[i] = static_cast<double>(x[i]);
    gd[i] = metric_denominator<kCentered>(static_cast<double>(v[i]), mean, scale, eps);
    gc[i] = lam / gd[i];
  }
}

template <typename T>
void metric_gather(const T* x, const T* v, const T* m, int64_t n, double scale, double eps,
                   double lam, double* gx, double* gd, double* gc) {
  if (m != nullptr) {
    metric_gather_impl<T, true>(x, v, m, n, scale, eps, lam, gx, gd, gc);
  } else {
    metric_gather_impl<T, false>(x, v, nullptr, n, scale, eps, lam, gx, gd, gc);
  }
}

// A group's start sums (add_start_terms) over its gathered values, element e into
// lane e % 8, lanes combined in a fixed tree (sums) or by maximum: the same bits on
// every variant.
GroupMetricStart start_sums(const double* x, const double* d, const double* c, int64_t n) {
  GroupMetricStart lanes[kNewtonLanes];
  int64_t e = 0;
  for (; e + kNewtonLanes <= n; e += kNewtonLanes) {
    for (int k = 0; k < kNewtonLanes; ++k) add_start_terms(lanes[k], x[e + k], d[e + k], c[e + k]);
  }
  for (int k = 0; e < n; ++e, ++k) add_start_terms(lanes[k], x[e], d[e], c[e]);
  for (int width = kNewtonLanes / 2; width > 0; width /= 2) {
    for (int k = 0; k < width; ++k) {
      GroupMetricStart& a = lanes[k];
      const GroupMetricStart& b = lanes[k + width];
      a.sum_sq += b.sum_sq;
      a.sum_sq_dx += b.sum_sq_dx;
      a.bad_x += b.bad_x;
      a.nan_d += b.nan_d;
      a.c_max = b.c_max > a.c_max ? b.c_max : a.c_max;
      a.best_single = b.best_single > a.best_single ? b.best_single : a.best_single;
    }
  }
  return lanes[0];
}

template <typename T>
constexpr LoopsFor<T> loops() {
  return {&abs_sq_sums<T>,
          &abs_sq_sums_add_grad<T>,
          &penalty_grad<T>,
          &soft_threshold_<T>,
          &scale_<T>,
          &count_zeros<T>,
          &abs_sq_accumulate<T>,
          &penalty_grad_by_position<T>,
          &scale_by_position_<T>,
          &sq_sum<T>,
          &metric_prox_<T>,
          &metric_gather<T>};
}

constexpr VectorLoops kLoops{REGEXT_ISA_NAME,          loops<float>(),
                             loops<double>(),          loops<c10::Half>(),
                             loops<c10::BFloat16>(),   &newton_sums,
                             &start_sums};

}  // namespace
}  // namespace regext::cpu::REGEXT_ISA

namespace regext::cpu {
const VectorLoops* REGEXT_ISA_LOOPS() { return &REGEXT_ISA::kLoops; }
}  // namespace regext::cpu

#undef REGEXT_INLINE
