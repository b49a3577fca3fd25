// The CPU kernels of every regext operator.
#include "../register_operators.h"

TORCH_LIBRARY_IMPL(regext, CPU, m) { regext::register_operators<regext::CpuBackend>(m); }
