// Allocation of the CPU gradients that penalty_backward returns.
#pragma once

#include <ATen/core/Tensor.h>

namespace regext::cpu {

// A new CPU tensor with the sizes, strides and dtype of the dense tensor `t`
// (what empty_like(t) gives), allocated without a trip through the dispatcher.
//
// Large ones (>= 2 MiB) are backed by transparent huge pages where Linux
// offers them (THP mode "madvise" or "always"). A gradient is written once into
// memory that is usually fresh from the kernel, and first-touch faults on 4 KiB
// pages cost more than writing the data: 500 MB of GPT-2-small gradients took
// ~120 ms on 4 KiB pages and ~55 ms on 2 MiB pages on this project's 2-core VM.
// PyTorch's own allocator does the same for every allocation only when
// THP_MEM_ALLOC_ENABLE=1 is set.
at::Tensor empty_like_dense(const at::Tensor& t);

}  // namespace regext::cpu
