// The CPU loops for AVX2 (vector_loops_impl.h): 256-bit registers.
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
#pragma GCC target("avx2,f16c")
#define REGEXT_ISA isa_avx2
#define REGEXT_ISA_NAME "avx2"
#define REGEXT_FLOAT_LANES 8
#define REGEXT_ISA_LOOPS avx2_loops
#include "vector_loops_impl.h"
#pragma GCC pop_options
#else
namespace regext::cpu {
const VectorLoops* avx2_loops() { return nullptr; }
}  // namespace regext::cpu
#endif
