// A 0-dim tensor (a coefficient, a threshold, the incoming gradient) read where
// it lies: a tensor on the CPU is read when the launch is prepared and travels
// as a value; a tensor on the parameters' device travels as its address and is
// read by the kernel. Neither costs a host-device copy or a synchronization, and
// a CUDA graph replays with the device tensor's value at replay time.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace regext::cuda {

struct DeviceScalar {
  enum class Kind : int8_t { kValue, kFloat, kDouble, kHalf, kBFloat16 };
  const void* address;
  double value;
  Kind kind;

  __host__ __device__ __forceinline__ double get() const {
    switch (kind) {
      case Kind::kFloat: return *static_cast<const float*>(address);
      case Kind::kDouble: return *static_cast<const double*>(address);
      case Kind::kHalf: return static_cast<float>(*static_cast<const c10::Half*>(address));
      case Kind::kBFloat16: return static_cast<float>(*static_cast<const c10::BFloat16*>(address));
      default: return value;
    }
  }
};

// `t` (checked: 0-dim, real floating point, on the CPU or on `device`).
inline DeviceScalar device_scalar(const at::Tensor& t, c10::Device device) {
  if (t.device() != device) return {nullptr, t.item<double>(), DeviceScalar::Kind::kValue};
  switch (t.scalar_type()) {
    case c10::kFloat: return {t.const_data_ptr(), 0.0, DeviceScalar::Kind::kFloat};
    case c10::kDouble: return {t.const_data_ptr(), 0.0, DeviceScalar::Kind::kDouble};
    case c10::kHalf: return {t.const_data_ptr(), 0.0, DeviceScalar::Kind::kHalf};
    default: return {t.const_data_ptr(), 0.0, DeviceScalar::Kind::kBFloat16};
  }
}

}  // namespace regext::cuda
