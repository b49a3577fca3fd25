// The CUDA kernels of every regext operator (built only with the CUDA kernels).
#include "../register_operators.h"

TORCH_LIBRARY_IMPL(regext, CUDA, m) { regext::register_operators<regext::CudaBackend>(m); }
