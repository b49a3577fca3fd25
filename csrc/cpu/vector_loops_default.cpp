// The CPU loops for baseline x86-64 (SSE2) and any other architecture: the
// variant every machine can run (vector_loops_impl.h).
#include <cstdint>
#include <type_traits>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "../compute_types.h"
#include "../penalty_math.h"
#include "vector_loops.h"

#define REGEXT_ISA isa_default
#define REGEXT_ISA_NAME "default"
#define REGEXT_FLOAT_LANES 4
#define REGEXT_ISA_LOOPS default_loops
#include "vector_loops_impl.h"
