// See cpu_capability.h.
#include "cpu_capability.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>

namespace regext::cpu {
namespace {

// The variants, best first, with whether this CPU can run each.
struct Candidate {
  const char* name;
  const VectorLoops* loops;
  bool supported;
};

bool cpu_has_avx2() {
#if defined(__x86_64__) && defined(__GNUC__)
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

bool cpu_has_avx512() {
#if defined(__x86_64__) && defined(__GNUC__)
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

CapabilityChoice choose(const char* requested) {
  const Candidate candidates[] = {
      {"avx512", avx512_loops(), avx512_loops() != nullptr && cpu_has_avx512()},
      {"avx2", avx2_loops(), avx2_loops() != nullptr && cpu_has_avx2()},
      {"default", default_loops(), true},
  };
  CapabilityChoice choice;
  int first = 0;  // the best variant allowed
  if (requested != nullptr && *requested != '\0') {
    const std::string want(requested);
    first = -1;
    for (int i = 0; i < 3; ++i) {
      if (want == candidates[i].name) first = i;
    }
    if (first < 0) {
      choice.error = "REGEXT_CPU_CAPABILITY=" + want +
                     " is not a CPU capability regext has: use default, avx2 or avx512 "
                     "(or unset it for the best this CPU supports)";
      return choice;
    }
  }
  for (int i = first; i < 3; ++i) {
    if (!candidates[i].supported) continue;
    choice.loops = candidates[i].loops;
    if (i != first) {
      choice.warning = std::string("REGEXT_CPU_CAPABILITY=") + candidates[first].name +
                       ", but this CPU or build cannot run it; using " + candidates[i].name;
    }
    return choice;
  }
  return choice;  // unreachable: default is always supported
}

}  // namespace

const CapabilityChoice& capability_choice() {
  static const CapabilityChoice choice = choose(std::getenv("REGEXT_CPU_CAPABILITY"));
  return choice;
}

const VectorLoops& vector_loops() {
  const CapabilityChoice& choice = capability_choice();
  TORCH_CHECK(choice.loops != nullptr, "regext: ", choice.error);
  return *choice.loops;
}

}  // namespace regext::cpu
