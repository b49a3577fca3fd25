// What the CPU kernels (penalty_cpu.cpp, prox_cpu.cpp, group_cpu.cpp) share: the
// parallel loop over the chunk table, the float64-exact rule and writing the 0-dim
// total.
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

// The 0-dim total (float32 or float64) from the float64 value. A float32 result
// rounds it once; a value beyond float32's range becomes inf, as the loop's would
// (filling a float tensor with the double raises "value cannot be converted to
// type float without overflow").
inline void fill_total(const at::Tensor& total, double value) {
  if (total.scalar_type() == c10::kFloat) {
    total.fill_(static_cast<float>(value));
  } else {
    total.fill_(value);
  }
}

// Whether the sums of a list must be float64-exact: a float64 result (some tensor
// is float64) gets float64-exact sums from every tensor; otherwise float32 tensors
// use the faster float32 blocks, whose ~1e-7 error is that of the float32
// result's own rounding.
inline bool any_float64(at::TensorList tensors) {
  for (const auto& t : tensors) {
    if (t.scalar_type() == at::kDouble) return true;
  }
  return false;
}

inline int64_t total_numel(at::TensorList tensors) {
  int64_t n = 0;
  for (const auto& t : tensors) n += t.numel();
  return n;
}

// The at::parallel_for grain for `num_items` work items covering `total` elements:
// no thread gets less than kMinElemsPerThread elements on average (one thread for
// less than that in all).
inline int64_t grain_for(int64_t num_items, int64_t total) {
  return total <= kMinElemsPerThread
             ? num_items + 1
             : std::max<int64_t>((num_items * kMinElemsPerThread + total - 1) / total, 1);
}

// fn(chunk index, chunk) for every chunk of `table`, spread over at::parallel_for
// with a grain that gives no thread less than kMinElemsPerThread elements on
// average. Chunk boundaries never depend on the thread count.
template <typename Fn>
void for_each_chunk(at::TensorList tensors, const ChunkTable& table, Fn&& fn) {
  const int64_t num_chunks = static_cast<int64_t>(table.chunks.size());
  at::parallel_for(0, num_chunks, grain_for(num_chunks, total_numel(tensors)), [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) fn(c, table.chunks[c]);
  });
}

}  // namespace regext::cpu
