// Everything a multi-tensor launch needs but the kernel itself, written once:
// device guard, current stream, dtype dispatch over the batches of a plan,
// the launch and its check.
#pragma once

#include <c10/core/Device.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <utility>
#include <vector>

#include "../compute_types.h"
#include "tensor_batch.cuh"

namespace regext::cuda {

// Threads per block of every kernel, and the bound each declares with
// __launch_bounds__: 16 warps keep enough 16-byte loads in flight to saturate
// memory with one block per 32Ki-element chunk.
constexpr int kBlockThreads = 512;

// The device and stream of one operator call: every launch goes on the
// current stream of the tensors' device, so nothing here synchronizes.
struct OnDevice {
  explicit OnDevice(c10::Device device)
      : guard(device), stream(c10::cuda::getCurrentCUDAStream(device.index())) {}
  c10::cuda::CUDAGuard guard;
  cudaStream_t stream;
};

// kernel<<<blocks, threads, 0, stream>>>(args...), then the launch check.
// Under the CPU emulator (tests/cuda_emu, which defines CUEMU) the same call
// runs the kernel there.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), int64_t blocks, int threads, cudaStream_t stream,
            Args&&... args) {
#if defined(CUEMU)
  ::cuemu::launch(kernel, blocks, threads, stream, std::forward<Args>(args)...);
#else
  kernel<<<static_cast<unsigned>(blocks), threads, 0, stream>>>(std::forward<Args>(args)...);
#endif
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
struct TypeTag {
  using type = T;
};

// fn(TypeTag<scalar_t>{}, plan) for every batch that owns at least one chunk.
template <typename Fn>
void for_each_batch(const std::vector<BatchPlan>& plans, Fn&& fn) {
  for (const BatchPlan& plan : plans) {
    if (plan.num_chunks == 0) continue;
    REGEXT_DISPATCH_FLOATING_TYPES(plan.dtype, "regext_cuda", [&] { fn(TypeTag<scalar_t>{}, plan); });
  }
}

}  // namespace regext::cuda
