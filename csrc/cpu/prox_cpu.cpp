// CPU backend of the proximal and sparsity operators (interface: csrc/backend.h).
// Every tensor is cut into the fixed chunks of chunking.h and the chunks of all
// tensors are spread over at::parallel_for; chunks are independent, so results
// do not depend on the thread count.
#include <ATen/ATen.h>

#include <vector>

#include "../backend.h"
#include "../penalty_math.h"
#include "cpu_common.h"
#include "vector_loops.h"

namespace regext {

void CpuBackend::prox_l1(at::ArrayRef<at::Tensor> dense, const at::Tensor& threshold_tensor) {
  const double threshold = threshold_tensor.item<double>();
  const ChunkTable table = make_chunk_table(dense, kChunkElems);
  cpu::for_each_chunk(dense, table, [&](int64_t, const Chunk& chunk) {
    const at::Tensor& x = dense[chunk.tensor];
    REGEXT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "prox_l1_", [&] {
      cpu::loops_for<scalar_t>().soft_threshold_(static_cast<scalar_t*>(x.data_ptr()) + chunk.begin,
                                                 chunk.length, threshold);
    });
  });
}

void CpuBackend::prox_group_l2(at::ArrayRef<at::Tensor> dense, const at::Tensor& stats,
                               const at::Tensor& threshold_tensor) {
  const double threshold = threshold_tensor.item<double>();
  const double* s = stats.const_data_ptr<double>();
  std::vector<double> scales(dense.size());
  for (size_t t = 0; t < dense.size(); ++t) {
    scales[t] = group_shrink_scale(s[t * kStatsColumns + 1], threshold);
  }
  const ChunkTable table = make_chunk_table(dense, kChunkElems);
  cpu::for_each_chunk(dense, table, [&](int64_t, const Chunk& chunk) {
    const double scale = scales[chunk.tensor];
    if (scale == 1.0) return;  // unchanged, bit for bit
    const at::Tensor& x = dense[chunk.tensor];
    REGEXT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "prox_group_l2_", [&] {
      cpu::loops_for<scalar_t>().scale_(static_cast<scalar_t*>(x.data_ptr()) + chunk.begin,
                                        chunk.length, scale);
    });
  });
}

void CpuBackend::prox_metric(at::ArrayRef<at::Tensor> dense, at::ArrayRef<at::Tensor> moments,
                             at::ArrayRef<at::Tensor> means, const at::Tensor& coefs) {
  const double* rows = coefs.const_data_ptr<double>();
  auto coefs_of = [&](int64_t t) {
    const double* r = rows + t * kMetricColumns;
    return MetricCoefs{r[0], r[1], r[2], r[3]};
  };
  const ChunkTable table = make_chunk_table(dense, kChunkElems);
  cpu::for_each_chunk(dense, table, [&](int64_t, const Chunk& chunk) {
    const MetricCoefs c = coefs_of(chunk.tensor);
    if (c.is_identity()) return;  // unchanged, bit for bit
    const at::Tensor& x = dense[chunk.tensor];
    REGEXT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "prox_metric_", [&] {
      const scalar_t* m = means.empty() ? nullptr
                                        : static_cast<const scalar_t*>(
                                              means[chunk.tensor].const_data_ptr()) + chunk.begin;
      cpu::loops_for<scalar_t>().metric_prox_(
          static_cast<scalar_t*>(x.data_ptr()) + chunk.begin,
          static_cast<const scalar_t*>(moments[chunk.tensor].const_data_ptr()) + chunk.begin, m,
          chunk.length, c);
    });
  });
}

void CpuBackend::count_zeros(at::ArrayRef<at::Tensor> dense, const at::Tensor& counts) {
  const ChunkTable table = make_chunk_table(dense, kChunkElems);
  std::vector<int64_t> partial(table.chunks.size());
  cpu::for_each_chunk(dense, table, [&](int64_t c, const Chunk& chunk) {
    const at::Tensor& x = dense[chunk.tensor];
    REGEXT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "count_zeros", [&] {
      partial[c] = cpu::loops_for<scalar_t>().count_zeros(
          static_cast<const scalar_t*>(x.const_data_ptr()) + chunk.begin, chunk.length);
    });
  });
  int64_t* out = counts.data_ptr<int64_t>();
  for (size_t t = 0; t < dense.size(); ++t) {
    int64_t zeros = 0;
    for (int64_t c = table.first_chunk[t]; c < table.first_chunk[t + 1]; ++c) zeros += partial[c];
    out[t] = zeros;
  }
}

}  // namespace regext
