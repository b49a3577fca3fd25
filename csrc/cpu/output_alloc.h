// Allocation of the CPU gradients that penalty_backward returns.
#pragma once

#include <ATen/core/Tensor.h>

namespace regext::cpu {

// A new CPU tensor with the sizes, strides and dtype of the dense tensor `t`
// (what empty_like(t) gives), from torch's CPU allocator but without a trip
// through the dispatcher: for 500 small gradients that trip cost ~0.1 ms.
//
// Tried and dropped: backing gradients of 2 MiB and more with transparent huge
// pages (2 MiB-aligned blocks, madvise(MADV_HUGEPAGE)). It halved the time of
// one isolated backward on fresh memory (GPT-2 small: ~120 -> ~55 ms on the
// 2-core VM), but in repeated training steps glibc already recycles the
// gradients' memory without page faults, and the aligned blocks defeated that
// reuse: GPT-2 small forward+backward went from 87-93 ms to 130-175 ms
// (benchmarks/bench_penalty.py, 2 threads, side by side).
at::Tensor empty_like_dense(const at::Tensor& t);

}  // namespace regext::cpu
