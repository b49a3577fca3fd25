// What the CPU kernels (penalty_cpu.cpp, prox_cpu.cpp) share: the parallel
// loop over the chunk table.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>

#include "../chunking.h"
#include "../compute_types.h"

namespace regext::cpu {

// Each thread gets at least this many elements (1 MiB of float32): below it,
// waking a second thread costs more than the work it takes over, and on a
// busy machine the wake-up can cost milliseconds.
constexpr int64_t kMinElemsPerThread = int64_t{1} << 18;

inline int64_t total_numel(at::TensorList tensors) {
  int64_t n = 0;
  for (const auto& t : tensors) n += t.numel();
  return n;
}

// fn(chunk index, chunk) for every chunk of `table`, spread over at::parallel_for
// with a grain that gives no thread less than kMinElemsPerThread elements on
// average. Chunk boundaries never depend on the thread count.
template <typename Fn>
void for_each_chunk(at::TensorList tensors, const ChunkTable& table, Fn&& fn) {
  const int64_t num_chunks = static_cast<int64_t>(table.chunks.size());
  const int64_t total = total_numel(tensors);
  const int64_t grain = total <= kMinElemsPerThread
                            ? num_chunks + 1  // one thread
                            : std::max<int64_t>(
                                  (num_chunks * kMinElemsPerThread + total - 1) / total, 1);
  at::parallel_for(0, num_chunks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) fn(c, table.chunks[c]);
  });
}

}  // namespace regext::cpu
