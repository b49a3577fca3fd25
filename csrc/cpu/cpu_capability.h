// Which instruction-set variant of the CPU loops (vector_loops.h) runs.
#pragma once

#include <string>

#include "vector_loops.h"

namespace regext::cpu {

// Chosen once, at the first call: REGEXT_CPU_CAPABILITY (default, avx2 or
// avx512, like ATEN_CPU_CAPABILITY for ATen) if set, else the best variant this
// CPU supports. A variant the CPU lacks falls back to the best one it has, with
// a warning; an unknown name is an error (then `loops` is null).
struct CapabilityChoice {
  const VectorLoops* loops = nullptr;
  std::string warning;
  std::string error;
};

const CapabilityChoice& capability_choice();

}  // namespace regext::cpu
