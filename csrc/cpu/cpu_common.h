// Helpers shared by the CPU kernels (penalty_cpu.cpp, prox_cpu.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "../chunking.h"
#include "../dtype_dispatch.h"

namespace regext::cpu {

// 32Ki elements: big enough that a chunk amortizes its bookkeeping, small
// enough that 500 small tensors and one huge tensor both spread over all cores.
constexpr int64_t kChunkElems = int64_t{1} << 15;
// Each thread gets at least this many elements (1 MiB of float32): below it,
// waking a second thread costs more than the work it takes over, and on a
// busy machine the wake-up can cost milliseconds.
constexpr int64_t kMinElemsPerThread = int64_t{1} << 18;

// at::parallel_for's grain, in chunks, so that no thread gets less than
// kMinElemsPerThread elements on average. It never moves a chunk boundary.
inline int64_t grain_in_chunks(const ChunkTable& table, int64_t total_elems) {
  const int64_t num_chunks = static_cast<int64_t>(table.chunks.size());
  if (total_elems <= kMinElemsPerThread) return num_chunks + 1;  // one thread
  const int64_t grain = (num_chunks * kMinElemsPerThread + total_elems - 1) / total_elems;
  return std::max<int64_t>(grain, 1);
}

inline int64_t total_numel(at::TensorList tensors) {
  int64_t n = 0;
  for (const auto& t : tensors) n += t.numel();
  return n;
}

// Runs fn(scalar_t-typed pointer) for the dtype of `t`.
template <typename Fn>
void dispatch_float_types(const at::Tensor& t, Fn&& fn) {
  regext::dispatch_float_types(t.scalar_type(), std::forward<Fn>(fn));
}

}  // namespace regext::cpu
