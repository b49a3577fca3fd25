// See output_alloc.h.
#include "output_alloc.h"

#include <ATen/EmptyTensor.h>

namespace regext::cpu {

at::Tensor empty_like_dense(const at::Tensor& t) {
  return at::detail::empty_strided_cpu(t.sizes(), t.strides(), t.scalar_type());
}

}  // namespace regext::cpu
