// The CPU loops for AVX-512 (vector_loops_impl.h): 512-bit registers. The
// same features as ATen's AVX512 capability: F, BW, VL and DQ.
#include <cstdint>
#include <type_traits>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "../compute_types.h"
#include "../penalty_math.h"
#include "vector_loops.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,f16c")
#define REGEXT_ISA isa_avx512
#define REGEXT_ISA_NAME "avx512"
#define REGEXT_FLOAT_LANES 16
#define REGEXT_ISA_LOOPS avx512_loops
#include "vector_loops_impl.h"
#pragma GCC pop_options
#else
namespace regext::cpu {
const VectorLoops* avx512_loops() { return nullptr; }
}  // namespace regext::cpu
#endif
