// CPU backend of the proximal and sparsity operators (interface: csrc/backend.h;
// operators: csrc/prox_ops.cpp).
//
// Same structure as penalty_cpu.cpp: every tensor is cut into the fixed chunks
// of chunking.h and the chunks of all tensors are spread over at::parallel_for.
// Each chunk is independent, so results do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <vector>

#include "../backend.h"
#include "../chunking.h"
#include "../penalty_math.h"
#include "cpu_common.h"
#include "vector_loops.h"

namespace regext::cpu {
namespace {

// fn(chunk index, chunk) for every chunk of `dense`, in parallel.
template <typename Fn>
void for_each_chunk(const std::vector<at::Tensor>& dense, const ChunkTable& table, Fn&& fn) {
  const int64_t num_chunks = static_cast<int64_t>(table.chunks.size());
  at::parallel_for(0, num_chunks, grain_in_chunks(table, total_numel(dense)),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t c = begin; c < end; ++c) fn(c, table.chunks[c]);
                   });
}

}  // namespace

void prox_l1(const std::vector<at::Tensor>& dense, double threshold) {
  const ChunkTable table = make_chunk_table(dense, kChunkElems);
  for_each_chunk(dense, table, [&](int64_t, const Chunk& chunk) {
    const at::Tensor& x = dense[chunk.tensor];
    dispatch_float_types(x, [&](auto* tag) {
      using scalar_t = std::remove_pointer_t<decltype(tag)>;
      auto* data = static_cast<scalar_t*>(x.data_ptr());
      soft_threshold_(data + chunk.begin, chunk.length, threshold);
    });
  });
}

void prox_group_l2(const std::vector<at::Tensor>& dense, const at::Tensor& stats,
                   double threshold) {
  const double* s = stats.const_data_ptr<double>();
  std::vector<double> scales(dense.size());
  for (size_t t = 0; t < dense.size(); ++t) {
    scales[t] = group_shrink_scale(s[t * kStatsColumns + 1], threshold);
  }
  const ChunkTable table = make_chunk_table(dense, kChunkElems);
  for_each_chunk(dense, table, [&](int64_t, const Chunk& chunk) {
    const double scale = scales[chunk.tensor];
    if (scale == 1.0) return;  // unchanged, bit for bit
    const at::Tensor& x = dense[chunk.tensor];
    dispatch_float_types(x, [&](auto* tag) {
      using scalar_t = std::remove_pointer_t<decltype(tag)>;
      auto* data = static_cast<scalar_t*>(x.data_ptr());
      scale_(data + chunk.begin, chunk.length, scale);
    });
  });
}

void count_zeros(const std::vector<at::Tensor>& dense, const at::Tensor& counts) {
  const ChunkTable table = make_chunk_table(dense, kChunkElems);
  std::vector<int64_t> partial(table.chunks.size());
  for_each_chunk(dense, table, [&](int64_t c, const Chunk& chunk) {
    const at::Tensor& x = dense[chunk.tensor];
    dispatch_float_types(x, [&](auto* tag) {
      using scalar_t = std::remove_pointer_t<decltype(tag)>;
      const auto* data = static_cast<const scalar_t*>(x.const_data_ptr());
      partial[c] = count_zeros(data + chunk.begin, chunk.length);
    });
  });
  int64_t* out = counts.data_ptr<int64_t>();
  for (size_t t = 0; t + 1 < table.first_chunk.size(); ++t) {
    int64_t zeros = 0;
    for (int64_t c = table.first_chunk[t]; c < table.first_chunk[t + 1]; ++c) zeros += partial[c];
    out[t] = zeros;
  }
}

}  // namespace regext::cpu
