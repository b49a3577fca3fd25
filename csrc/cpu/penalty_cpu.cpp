// CPU kernels of the penalty operators (schemas in csrc/ops.cpp).
//
// One parallel pass over the chunk table of all tensors produces per-chunk
// partial sums; a short serial pass adds each tensor's chunks in order in
// float64. Thread count never changes the chunk boundaries, so results are
// bitwise identical for any torch.get_num_threads().
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../chunking.h"
#include "../param_checks.h"
#include "../penalty_math.h"
#include "vector_loops.h"

namespace regext::cpu {
namespace {

// 32Ki elements: big enough that a chunk amortizes its bookkeeping, small
// enough that 500 small tensors and one huge tensor both spread over all cores.
constexpr int64_t kChunkElems = int64_t{1} << 15;
// Below this many elements in total, threads cost more than they save.
constexpr int64_t kMinParallelElems = int64_t{1} << 16;

int64_t grain_in_chunks(const ChunkTable& table, int64_t total_elems) {
  return total_elems < kMinParallelElems ? static_cast<int64_t>(table.chunks.size()) + 1 : 1;
}

int64_t total_numel(at::TensorList tensors) {
  int64_t n = 0;
  for (const auto& t : tensors) n += t.numel();
  return n;
}

// Runs fn(scalar_t-typed pointer) for the dtype of `t`.
template <typename Fn>
void dispatch_float_types(const at::Tensor& t, Fn&& fn) {
  switch (t.scalar_type()) {
    case c10::kFloat: fn(static_cast<float*>(nullptr)); break;
    case c10::kDouble: fn(static_cast<double*>(nullptr)); break;
    case c10::kHalf: fn(static_cast<c10::Half*>(nullptr)); break;
    case c10::kBFloat16: fn(static_cast<c10::BFloat16*>(nullptr)); break;
    default: TORCH_CHECK(false, "regext: unsupported dtype ", t.scalar_type());
  }
}

// stats[t] = (sum |x|, sum x^2) for every tensor, float64 [n, 2].
at::Tensor compute_stats(const std::vector<at::Tensor>& dense) {
  const int64_t num_tensors = static_cast<int64_t>(dense.size());
  at::Tensor stats = at::zeros({num_tensors, kStatsColumns}, at::kDouble);
  const ChunkTable table = make_chunk_table(dense, kChunkElems);
  const int64_t num_chunks = static_cast<int64_t>(table.chunks.size());
  std::vector<AbsSqSums> partial(num_chunks);

  at::parallel_for(0, num_chunks, grain_in_chunks(table, total_numel(dense)),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t c = begin; c < end; ++c) {
                       const Chunk& chunk = table.chunks[c];
                       const at::Tensor& t = dense[chunk.tensor];
                       dispatch_float_types(t, [&](auto* tag) {
                         using scalar_t = std::remove_pointer_t<decltype(tag)>;
                         const auto* data = static_cast<const scalar_t*>(t.const_data_ptr());
                         partial[c] = abs_sq_sums(data + chunk.begin, chunk.length);
                       });
                     }
                   });

  double* out = stats.data_ptr<double>();
  for (int64_t t = 0; t < num_tensors; ++t) {
    double abs_sum = 0.0, sq_sum = 0.0;
    for (int64_t c = table.first_chunk[t]; c < table.first_chunk[t + 1]; ++c) {
      abs_sum += partial[c].abs;
      sq_sum += partial[c].sq;
    }
    out[t * kStatsColumns + 0] = abs_sum;
    out[t * kStatsColumns + 1] = sq_sum;
  }
  return stats;
}

// Writes (or adds) the penalty gradient of every tensor. `out[t]` must have
// the same strides as `dense[t]`, both dense, so memory order matches.
void write_grads(const std::vector<at::Tensor>& dense, const std::vector<at::Tensor>& out,
                 const at::Tensor& stats, const std::vector<int64_t>& rows, double grad_total,
                 double l1, double l2, bool l2_squared, bool accumulate) {
  const int64_t num_tensors = static_cast<int64_t>(dense.size());
  const double* stats_data = stats.const_data_ptr<double>();
  std::vector<GradCoefficients> coefs(num_tensors);
  for (int64_t t = 0; t < num_tensors; ++t) {
    coefs[t] = grad_coefficients(grad_total, stats_data[rows[t] * kStatsColumns + 1], l1, l2,
                                 l2_squared);
  }
  const ChunkTable table = make_chunk_table(dense, kChunkElems);
  const int64_t num_chunks = static_cast<int64_t>(table.chunks.size());
  at::parallel_for(0, num_chunks, grain_in_chunks(table, total_numel(dense)),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t c = begin; c < end; ++c) {
                       const Chunk& chunk = table.chunks[c];
                       const at::Tensor& x = dense[chunk.tensor];
                       const GradCoefficients& k = coefs[chunk.tensor];
                       dispatch_float_types(x, [&](auto* tag) {
                         using scalar_t = std::remove_pointer_t<decltype(tag)>;
                         const auto* src = static_cast<const scalar_t*>(x.const_data_ptr());
                         auto* dst = static_cast<scalar_t*>(out[chunk.tensor].data_ptr());
                         penalty_grad(src + chunk.begin, dst + chunk.begin, chunk.length,
                                      k.sign_coef, k.linear_coef, accumulate);
                       });
                     }
                   });
}

double read_scalar(const char* op, const at::Tensor& grad_total) {
  TORCH_CHECK(grad_total.numel() == 1, op, ": grad_total must hold one element, got shape ",
              grad_total.sizes());
  return grad_total.item<double>();  // a CPU tensor: no device synchronization
}

std::tuple<at::Tensor, at::Tensor> penalty_forward(at::TensorList params, double l1, double l2,
                                                   bool l2_squared) {
  constexpr const char* op = "regext::penalty_forward";
  check_coefficient(op, "l1", l1);
  check_coefficient(op, "l2", l2);
  check_tensor_list(op, "params", params, c10::Device(c10::kCPU));

  const at::Tensor stats = compute_stats(as_dense(params));
  const double* s = stats.const_data_ptr<double>();
  PenaltyTotals totals;
  for (size_t t = 0; t < params.size(); ++t) {
    totals.add(s[t * kStatsColumns + 0], s[t * kStatsColumns + 1], l2_squared);
  }
  at::Tensor total = at::scalar_tensor(totals.combine(l1, l2),
                                       at::TensorOptions().dtype(result_dtype(params)));
  return {total, stats};
}

std::vector<at::Tensor> penalty_backward(const at::Tensor& grad_total, at::TensorList params,
                                         const at::Tensor& stats, double l1, double l2,
                                         bool l2_squared,
                                         c10::OptionalArrayRef<int64_t> stats_rows) {
  constexpr const char* op = "regext::penalty_backward";
  check_coefficient(op, "l1", l1);
  check_coefficient(op, "l2", l2);
  check_tensor_list(op, "params", params, c10::Device(c10::kCPU));
  check_stats(op, stats, c10::Device(c10::kCPU));
  const std::vector<int64_t> rows = resolve_stats_rows(
      op, stats_rows, static_cast<int64_t>(params.size()), stats.size(0));
  const double g = read_scalar(op, grad_total);

  std::vector<at::Tensor> dense = as_dense(params);
  // empty_like(param) keeps the strides of a dense parameter, so each gradient
  // has its parameter's memory layout (channels-last stays channels-last). The
  // fake kernel allocates the same way. Only when a strided view suggests a
  // layout other than its dense copy's is the gradient staged and copied.
  std::vector<at::Tensor> grads, targets;
  std::vector<size_t> staged;
  grads.reserve(dense.size());
  targets.reserve(dense.size());
  for (size_t t = 0; t < dense.size(); ++t) {
    grads.push_back(at::empty_like(params[t]));
    if (grads[t].strides() == dense[t].strides()) {
      targets.push_back(grads[t]);
    } else {
      targets.push_back(at::empty_like(dense[t]));
      staged.push_back(t);
    }
  }
  write_grads(dense, targets, stats, rows, g, l1, l2, l2_squared, /*accumulate=*/false);
  for (size_t t : staged) grads[t].copy_(targets[t]);
  return grads;
}

void penalty_grad_accumulate_(at::TensorList grads, at::TensorList params,
                              const at::Tensor& stats, double l1, double l2, bool l2_squared,
                              c10::OptionalArrayRef<int64_t> stats_rows) {
  constexpr const char* op = "regext::penalty_grad_accumulate_";
  check_coefficient(op, "l1", l1);
  check_coefficient(op, "l2", l2);
  check_tensor_list(op, "params", params, c10::Device(c10::kCPU));
  check_tensor_list(op, "grads", grads, c10::Device(c10::kCPU));
  check_same_shapes(op, "grads", grads, params);
  check_stats(op, stats, c10::Device(c10::kCPU));
  const std::vector<int64_t> rows = resolve_stats_rows(
      op, stats_rows, static_cast<int64_t>(params.size()), stats.size(0));
  for (size_t t = 0; t < grads.size(); ++t) {
    TORCH_CHECK_TYPE(grads[t].scalar_type() == params[t].scalar_type(), op, ": grads[", t,
                     "] has dtype ", grads[t].scalar_type(), " but params[", t, "] has dtype ",
                     params[t].scalar_type());
  }

  // Fast path: gradient and parameter share one dense layout and are updated
  // in place. Otherwise the update is computed densely and added afterwards.
  std::vector<at::Tensor> dense = as_dense(params);
  std::vector<at::Tensor> targets(grads.size());
  std::vector<size_t> staged;
  for (size_t t = 0; t < grads.size(); ++t) {
    if (grads[t].is_non_overlapping_and_dense() && grads[t].strides() == dense[t].strides()) {
      targets[t] = grads[t];
    } else {
      targets[t] = at::zeros_like(dense[t]);
      staged.push_back(t);
    }
  }
  write_grads(dense, targets, stats, rows, 1.0, l1, l2, l2_squared, /*accumulate=*/true);
  for (size_t t : staged) grads[t].add_(targets[t]);
}

}  // namespace

TORCH_LIBRARY_IMPL(regext, CPU, m) {
  m.impl("penalty_forward", &penalty_forward);
  m.impl("penalty_backward", &penalty_backward);
  m.impl("penalty_grad_accumulate_", &penalty_grad_accumulate_);
}

}  // namespace regext::cpu
