// cuemu stand-in: an emulator error (divergent barrier, bad mask, launch bounds,
// parameter size, ...) becomes a c10::Error at the launch check, as a CUDA error would.
#pragma once
#include <c10/util/Exception.h>
#include <cuda_runtime.h>
#define C10_CUDA_KERNEL_LAUNCH_CHECK()                                            \
  do {                                                                            \
    const std::string cuemu_error_ = ::cuemu::take_error();                       \
    TORCH_CHECK(cuemu_error_.empty(), "CUDA kernel launch failed (emulated): ",   \
                cuemu_error_);                                                    \
  } while (0)
