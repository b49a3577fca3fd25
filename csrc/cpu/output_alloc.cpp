// See output_alloc.h.
#include "output_alloc.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#include <cstdlib>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace regext::cpu {
namespace {

constexpr size_t kHugePageBytes = size_t{2} << 20;

#if defined(__linux__)
// Blocks of 2 MiB-aligned memory advised for huge pages, for allocations of
// at least 2 MiB; smaller ones go to torch's CPU allocator. The advice is only
// a hint: with THP "never" the memory is ordinary pages, as before.
//
// Only whole 2 MiB ranges can be huge pages, so the tail of a block whose size
// is not a multiple of 2 MiB would fault 4 KiB at a time. The block is rounded
// up to whole huge pages where that wastes at most 1/8 of it (9.4 MB -> 10 MB);
// otherwise its tail keeps small pages.
//
// Allocations and frees are reported to the profiler like torch's own, so
// torch.profiler(profile_memory=True) still sees every gradient.
class HugePageCpuAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t nbytes) override {
    if (nbytes < kHugePageBytes) return c10::GetCPUAllocator()->allocate(nbytes);
    const size_t rounded = (nbytes + kHugePageBytes - 1) / kHugePageBytes * kHugePageBytes;
    const size_t length = rounded - nbytes <= nbytes / 8 ? rounded : nbytes;
    void* data = nullptr;
    if (posix_memalign(&data, kHugePageBytes, length) != 0) {
      return c10::GetCPUAllocator()->allocate(nbytes);  // raises torch's OOM error if need be
    }
    madvise(data, length, MADV_HUGEPAGE);
    auto* block = new Block{data, length};
    c10::reportMemoryUsageToProfiler(data, static_cast<int64_t>(length), 0, 0,
                                     c10::Device(c10::kCPU));
    return {data, block, &free_block, c10::Device(c10::kCPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

 private:
  struct Block {
    void* data;
    size_t length;
  };

  static void free_block(void* context) {
    auto* block = static_cast<Block*>(context);
    c10::reportMemoryUsageToProfiler(block->data, -static_cast<int64_t>(block->length), 0, 0,
                                     c10::Device(c10::kCPU));
    std::free(block->data);
    delete block;
  }
};

c10::Allocator* gradient_allocator() {
  static HugePageCpuAllocator allocator;
  return &allocator;
}
#else
c10::Allocator* gradient_allocator() { return c10::GetCPUAllocator(); }
#endif

}  // namespace

at::Tensor empty_like_dense(const at::Tensor& t) {
  return at::detail::empty_strided_generic(t.sizes(), t.strides(), gradient_allocator(),
                                           c10::DispatchKeySet(c10::DispatchKey::CPU),
                                           t.scalar_type());
}

}  // namespace regext::cpu
