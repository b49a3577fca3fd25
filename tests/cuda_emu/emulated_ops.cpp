// The regext operators on the CUDA backend run by cuemu: the library
// `regext_cuemu`, with regext's own schemas and operator layer
// (csrc/register_operators.h instantiated with CudaBackend, whose kernels are
// csrc/cuda/*.cu compiled as C++), registered for CPU tensors. Plus the
// emulator's controls: the fiber schedule and the log of launches.
#include <c10/core/CPUAllocator.h>

#include <cstring>
#include <string>

#include "../../csrc/register_operators.h"
#include "../../csrc/schemas.h"
#include "cuemu.h"

namespace {

// Fills every new CPU allocation with 0xFF bytes, NaN in every float dtype and
// -1 in the integer ones, so that an output element no kernel writes (a stats
// row, a partial-sum slot, a count) shows up in the results instead of
// silently reading whatever the memory held.
class PoisoningAllocator final : public c10::Allocator {
 public:
  explicit PoisoningAllocator(c10::Allocator* base) : base_(base) {}
  c10::DataPtr allocate(size_t n) override {
    c10::DataPtr ptr = base_->allocate(n);
    if (n > 0) std::memset(ptr.get(), 0xFF, n);
    return ptr;
  }
  c10::DeleterFnPtr raw_deleter() const override { return base_->raw_deleter(); }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    base_->copy_data(dest, src, count);
  }

 private:
  c10::Allocator* base_;
};

void install_poisoning_allocator() {
  static PoisoningAllocator allocator(c10::GetCPUAllocator());
  c10::SetCPUAllocator(&allocator, /*priority=*/100);
}

void set_schedule(std::string schedule) {
  TORCH_CHECK(schedule == "forward" || schedule == "reverse" || schedule.rfind("random:", 0) == 0,
              "cuemu: schedule must be forward, reverse or random:SEED, got ", schedule);
  cuemu::rt().set_schedule(schedule);
}

// int64 [launches, 3]: (blocks, threads per block, kernel-parameter bytes) of
// every launch since the last clear_launch_log().
at::Tensor launch_log() {
  const auto& log = cuemu::rt().log;
  at::Tensor out = at::empty({static_cast<int64_t>(log.size()), 3}, at::kLong);
  for (size_t i = 0; i < log.size(); ++i) {
    out[i][0] = static_cast<int64_t>(log[i].blocks);
    out[i][1] = static_cast<int64_t>(log[i].threads);
    out[i][2] = static_cast<int64_t>(log[i].param_bytes);
  }
  return out;
}

void clear_launch_log() { cuemu::rt().log.clear(); }

}  // namespace

TORCH_LIBRARY(regext_cuemu, m) {
  regext::define_operators(m);
  m.def("set_schedule(str schedule) -> ()", &set_schedule);
  m.def("launch_log() -> Tensor", &launch_log);
  m.def("clear_launch_log() -> ()", &clear_launch_log);
  install_poisoning_allocator();
}

TORCH_LIBRARY_IMPL(regext_cuemu, CPU, m) {
  regext::register_operators<regext::CudaBackend>(m);
}
