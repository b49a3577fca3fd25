// CPU backend of the penalty operators (interface: csrc/backend.h).
//
// One parallel pass over the chunk table of all tensors produces per-chunk
// partial sums; a short serial pass adds each tensor's chunks in order in
// float64. Thread count never changes the chunk boundaries, so results are
// bitwise identical for any torch.get_num_threads().
#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>

#include <vector>

#include "../backend.h"
#include "../penalty_math.h"
#include "cpu_common.h"
#include "vector_loops.h"

namespace regext {
namespace {

// The gradient added in the same pass as the sums (penalty_forward_accumulate_
// in the squared form): targets[t] += sign_coef * sign(x) + linear_coef * x.
struct SamePassUpdate {
  at::ArrayRef<at::Tensor> targets;
  double sign_coef;
  double linear_coef;
};

// stats[t] = (sum |x|, sum x^2) for every tensor, into float64 [n, 2]; with
// `update`, each chunk's gradient is added right after its sums.
void compute_stats(at::ArrayRef<at::Tensor> dense, const at::Tensor& stats,
                   const SamePassUpdate* update = nullptr) {
  const ChunkTable table = make_chunk_table(dense, kChunkElems);
  std::vector<cpu::AbsSqSums> partial(table.chunks.size());
  const bool exact = cpu::any_float64(dense);

  cpu::for_each_chunk(dense, table, [&](int64_t c, const Chunk& chunk) {
    const at::Tensor& t = dense[chunk.tensor];
    REGEXT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "penalty_forward", [&] {
      const auto* data = static_cast<const scalar_t*>(t.const_data_ptr()) + chunk.begin;
      if (update == nullptr) {
        partial[c] = cpu::loops_for<scalar_t>().abs_sq_sums(data, chunk.length, exact);
      } else {
        auto* grad = static_cast<scalar_t*>(update->targets[chunk.tensor].data_ptr());
        partial[c] = cpu::loops_for<scalar_t>().abs_sq_sums_add_grad(
            data, grad + chunk.begin, chunk.length, exact, update->sign_coef, update->linear_coef);
      }
    });
  });

  double* out = stats.data_ptr<double>();
  for (size_t t = 0; t < dense.size(); ++t) {
    double abs_sum = 0.0, sq_sum = 0.0;
    for (int64_t c = table.first_chunk[t]; c < table.first_chunk[t + 1]; ++c) {
      abs_sum += partial[c].abs;
      sq_sum += partial[c].sq;
    }
    out[t * kStatsColumns + 0] = abs_sum;
    out[t * kStatsColumns + 1] = sq_sum;
  }
}

// total = l1 * sum_t ||x_t||_1 + l2 * sum_t (||x_t||_2 or ||x_t||_2^2), from stats.
void write_total(const at::Tensor& stats, const at::Tensor& total, double l1, double l2,
                 bool l2_squared) {
  const double* s = stats.const_data_ptr<double>();
  PenaltyTotals totals;
  for (int64_t t = 0; t < stats.size(0); ++t) {
    totals.add(s[t * kStatsColumns + 0], s[t * kStatsColumns + 1], l2_squared);
  }
  cpu::fill_total(total, totals.combine(l1, l2));
}

}  // namespace

// From torch's CPU allocator without a trip through the dispatcher: for 500
// small gradients that trip costs ~0.1 ms.
at::Tensor CpuBackend::empty_like_dense(const at::Tensor& t) {
  return at::detail::empty_strided_cpu(t.sizes(), t.strides(), t.scalar_type());
}

void CpuBackend::stats_and_total(at::ArrayRef<at::Tensor> dense, const at::Tensor& stats,
                                 const at::Tensor& total, const at::Tensor& l1,
                                 const at::Tensor& l2, bool l2_squared) {
  compute_stats(dense, stats);
  write_total(stats, total, l1.item<double>(), l2.item<double>(), l2_squared);
}

void CpuBackend::stats_total_and_accumulate_squared(
    at::ArrayRef<at::Tensor> dense, at::ArrayRef<at::Tensor> targets, const at::Tensor& stats,
    const at::Tensor& total, const at::Tensor& l1_tensor, const at::Tensor& l2_tensor) {
  const double l1 = l1_tensor.item<double>(), l2 = l2_tensor.item<double>();
  // The squared form's gradient, l1 * sign(x) + 2 * l2 * x, needs no sums.
  const GradCoefficients k = grad_coefficients(1.0, 0.0, l1, l2, /*l2_squared=*/true);
  const SamePassUpdate update{targets, k.sign_coef, k.linear_coef};
  compute_stats(dense, stats, &update);
  write_total(stats, total, l1, l2, /*l2_squared=*/true);
}

void CpuBackend::grads(const GradRequest& r) {
  // CPU scalars: reading them synchronizes with nothing.
  const double grad_total = r.grad_total.item<double>();
  const double l1 = r.l1.item<double>(), l2 = r.l2.item<double>();
  const double* stats = r.stats.const_data_ptr<double>();
  std::vector<GradCoefficients> coefs(r.dense.size());
  for (size_t t = 0; t < r.dense.size(); ++t) {
    coefs[t] =
        grad_coefficients(grad_total, stats[r.rows[t] * kStatsColumns + 1], l1, l2, r.l2_squared);
  }
  const ChunkTable table = make_chunk_table(r.dense, kChunkElems);
  cpu::for_each_chunk(r.dense, table, [&](int64_t, const Chunk& chunk) {
    const at::Tensor& x = r.dense[chunk.tensor];
    const GradCoefficients& k = coefs[chunk.tensor];
    REGEXT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "penalty_backward", [&] {
      const auto* src = static_cast<const scalar_t*>(x.const_data_ptr()) + chunk.begin;
      auto* dst = static_cast<scalar_t*>(r.targets[chunk.tensor].data_ptr()) + chunk.begin;
      cpu::loops_for<scalar_t>().penalty_grad(src, dst, chunk.length, k.sign_coef, k.linear_coef,
                                              k.linear_scale, r.accumulate);
    });
  });
}

}  // namespace regext
