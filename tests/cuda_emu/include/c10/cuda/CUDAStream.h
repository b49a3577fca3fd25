// cuemu stand-in: launches run synchronously, so every stream is the same.
#pragma once
#include <c10/core/Device.h>
#include <cuda_runtime.h>
namespace c10::cuda {
struct CUDAStream {
  operator cudaStream_t() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return {}; }
}  // namespace c10::cuda
