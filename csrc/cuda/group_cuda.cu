// CUDA backend of the group lasso operators (interface: csrc/backend.h; groups
// and the work table: csrc/groups.h, the same items as the CPU backend's).
//
// Forward, per (dtype, batch of <= kMaxGroupedTensors tensors):
//   1. group_partial_kernel: one block per work item, which reads its elements
//      once and writes the partial sums of the item's slots:
//      - a piece of a long run (a row of >= 32Ki elements): the block's sum;
//      - a range of short runs (rows of a row-major weight): one warp per run;
//      - a block of periods (kPositions: columns, conv input channels): one
//        thread per group, over the block's outer indices and the group's run.
//   2. group_combine_kernel: one thread per group adds its slots in the fixed
//      order of combine_order into its stats row, and writes the group's
//      weighted norm w_g ||x_g|| for the total (the forward only).
// then group_total_kernel: one block adds every row into the 0-dim total.
// The proximal step runs 1 and 2 for its stats (no total), then its shrink.
// Gradient and proximal step: one elementwise launch per batch over the same
// items; each block, warp or thread derives its group's coefficient once from
// the stats on the device. Sums and elementwise arithmetic are float64 for
// every dtype: the simplest correct choice, ~3 float64 operations per element,
// which GPUs with a low FP64 rate may not sustain at memory speed (README,
// "What to expect on a GPU"). The CPU kernels differ by rounding only: their
// row sums use the per-tensor path's float32 blocks (~1e-7 relative), their
// column sums float64. No atomics, no host synchronization: graph-capturable
// like the other kernels.
#include <ATen/ATen.h>

#include <cstdint>
#include <limits>
#include <vector>

#include "../backend.h"
#include "../compute_types.h"
#include "../groups.h"
#include "../penalty_math.h"
#include "block_reduce.cuh"
#include "block_total.cuh"
#include "device_scalar.cuh"
#include "launch.cuh"

namespace regext {
namespace cuda {
namespace {

constexpr int kMaxGroupedTensors = 224;

// Up to kMaxGroupedTensors tensors of one dtype, entirely in the kernel argument.
struct GroupBatch {
  GroupLayout layout[kMaxGroupedTensors];
  const void* inputs[kMaxGroupedTensors];
  void* outputs[kMaxGroupedTensors];
  int64_t first_slot[kMaxGroupedTensors];  // into the launch's slot buffer
  int32_t item_prefix[kMaxGroupedTensors + 1];
  int32_t group_prefix[kMaxGroupedTensors + 1];  // the batch's groups, tensor by tensor
  int32_t num_tensors;
};
static_assert(sizeof(GroupBatch) <= 32764 - 256, "GroupBatch exceeds the parameter limit");

struct GroupBatchPlan {
  GroupBatch batch;
  c10::ScalarType dtype;
  int64_t num_items;
  int64_t num_groups;
};

// Tensors grouped by dtype (first-seen order), at most kMaxGroupedTensors per
// batch. `outputs` empty: none (the forward); else parallel to `inputs`.
std::vector<GroupBatchPlan> plan_group_batches(at::ArrayRef<at::Tensor> inputs,
                                               at::ArrayRef<at::Tensor> outputs,
                                               at::ArrayRef<GroupLayout> layouts) {
  constexpr int64_t kMax32 = std::numeric_limits<int32_t>::max();
  std::vector<int64_t> first_slot(inputs.size());
  int64_t slots = 0;
  for (size_t t = 0; t < inputs.size(); ++t) {
    first_slot[t] = slots;
    slots += layouts[t].num_slots;
  }
  const std::vector<c10::ScalarType> dtypes = dtypes_in_list_order(inputs);
  std::vector<GroupBatchPlan> plans;
  for (auto dtype : dtypes) {
    GroupBatchPlan* plan = nullptr;
    for (size_t t = 0; t < inputs.size(); ++t) {
      if (inputs[t].scalar_type() != dtype) continue;
      const GroupLayout& l = layouts[t];
      TORCH_CHECK(l.num_items < kMax32 && l.groups < kMax32, "regext: tensor too large");
      if (plan == nullptr || plan->batch.num_tensors == kMaxGroupedTensors ||
          plan->num_items + l.num_items > kMax32 || plan->num_groups + l.groups > kMax32) {
        plans.emplace_back();
        plan = &plans.back();
        plan->batch.num_tensors = 0;
        plan->batch.item_prefix[0] = 0;
        plan->batch.group_prefix[0] = 0;
        plan->dtype = dtype;
        plan->num_items = 0;
        plan->num_groups = 0;
      }
      GroupBatch& b = plan->batch;
      const int j = b.num_tensors++;
      b.layout[j] = l;
      b.inputs[j] = inputs[t].const_data_ptr();
      b.outputs[j] = outputs.empty() ? nullptr : outputs[t].data_ptr();
      b.first_slot[j] = first_slot[t];
      plan->num_items += l.num_items;
      plan->num_groups += l.groups;
      b.item_prefix[j + 1] = static_cast<int32_t>(plan->num_items);
      b.group_prefix[j + 1] = static_cast<int32_t>(plan->num_groups);
    }
  }
  return plans;
}

struct ItemOfBlock {
  int tensor;
  int64_t item;
};

__device__ __forceinline__ ItemOfBlock item_of_block(const GroupBatch& b) {
  const int j = owner_of(b.item_prefix, b.num_tensors, blockIdx.x);
  return {j, static_cast<int64_t>(blockIdx.x) - b.item_prefix[j]};
}

// What an item covers, for the three kinds of csrc/groups.h:
struct ItemSpan {
  int64_t begin = 0, length = 0;  // a piece: its elements
  int64_t first = 0, end = 0;     // short runs: runs [first, end); kPositions: rows
};

__device__ __forceinline__ ItemSpan span_of(const GroupLayout& l, int64_t k) {
  ItemSpan s;
  if (l.work == GroupWork::kPositions) {
    s.first = k * l.rows_per_item;
    s.end = min(l.outer, s.first + l.rows_per_item);
  } else if (l.item_is_piece()) {
    const int64_t run = k / l.pieces_per_run, piece = k % l.pieces_per_run;
    const int64_t offset = piece * kChunkElems;
    s.begin = run * l.inner + offset;
    s.length = min(kChunkElems, l.inner - offset);
  } else {
    s.first = k * l.runs_per_item;
    s.end = min(l.runs(), s.first + l.runs_per_item);
  }
  return s;
}

template <typename T>
__device__ __forceinline__ void add_element(SumPair& s, T value) {
  const double v = static_cast<double>(value);
  s.a += fabs(v);
  s.b += v * v;
}

template <typename T>
__global__ void __launch_bounds__(kBlockThreads)
    group_partial_kernel(const __grid_constant__ GroupBatch batch, SumPair* __restrict__ slots) {
  const ItemOfBlock it = item_of_block(batch);
  const GroupLayout& l = batch.layout[it.tensor];
  const T* __restrict__ x = static_cast<const T*>(batch.inputs[it.tensor]);
  SumPair* __restrict__ out = slots + batch.first_slot[it.tensor];
  const ItemSpan s = span_of(l, it.item);
  if (l.work == GroupWork::kPositions) {
    const int64_t period = l.period();
    for (int64_t g = threadIdx.x; g < l.groups; g += blockDim.x) {
      SumPair sums{0.0, 0.0};
      for (int64_t o = s.first; o < s.end; ++o) {
        const T* run = x + o * period + g * l.inner;
        for (int64_t i = 0; i < l.inner; ++i) add_element(sums, run[i]);
      }
      out[it.item * l.groups + g] = sums;
    }
  } else if (l.item_is_piece()) {
    SumPair sums{0.0, 0.0};
    for (int64_t i = threadIdx.x; i < s.length; i += blockDim.x) add_element(sums, x[s.begin + i]);
    sums = block_sum(sums);
    if (threadIdx.x == 0) out[it.item] = sums;
  } else {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, num_warps = blockDim.x >> 5;
    for (int64_t run = s.first + warp; run < s.end; run += num_warps) {  // warp-uniform
      SumPair sums{0.0, 0.0};
      const T* r = x + run * l.inner;
      for (int64_t i = lane; i < l.inner; i += 32) add_element(sums, r[i]);
      sums = warp_sum(sums);
      if (lane == 0) out[run] = sums;
    }
  }
}

// One thread per group of the batch: its slots in combine_order into its stats
// row, and w_g * ||x_g|| into l2_terms.
__global__ void __launch_bounds__(kBlockThreads)
    group_combine_kernel(const __grid_constant__ GroupBatch batch,
                         const SumPair* __restrict__ slots, double* __restrict__ stats,
                         double* __restrict__ l2_terms /* null: not wanted */, int64_t num_groups) {
  const int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= num_groups) return;
  const int j = owner_of(batch.group_prefix, batch.num_tensors, index);
  const GroupLayout& l = batch.layout[j];
  const int64_t g = index - batch.group_prefix[j];
  const SumPair* in = slots + batch.first_slot[j];
  SumPair sums{0.0, 0.0};
  combine_order(l, g, [&](int64_t slot) { sums += in[slot]; });
  const int64_t row = l.first_row + g;
  stats[row * kStatsColumns + 0] = sums.a;
  stats[row * kStatsColumns + 1] = sums.b;
  if (l2_terms != nullptr) l2_terms[row] = l.weight * l2_term(sums.b, /*l2_squared=*/false);
}

__global__ void __launch_bounds__(kBlockThreads)
    group_total_kernel(const double* __restrict__ stats, const double* __restrict__ l2_terms,
                       int64_t num_rows, DeviceScalar l1, DeviceScalar l2, void* total,
                       bool total_is_double) {
  write_block_total(
      stats, num_rows, [&](int64_t r) { return l2_terms[r]; }, l1, l2, total, total_is_double);
}

// Applies op(element pointer, group) to every element of the block's item; the
// group is uniform over each call of `per_group(g)`, which returns the functor
// used for that group's elements (so its coefficient is derived once).
template <typename T, typename PerGroup>
__device__ __forceinline__ void for_each_element_by_group(const GroupBatch& batch, T* x,
                                                          PerGroup&& per_group) {
  const ItemOfBlock it = item_of_block(batch);
  const GroupLayout& l = batch.layout[it.tensor];
  const ItemSpan s = span_of(l, it.item);
  if (l.work == GroupWork::kPositions) {
    const int64_t period = l.period();
    for (int64_t g = threadIdx.x; g < l.groups; g += blockDim.x) {
      const auto op = per_group(l, g);
      for (int64_t o = s.first; o < s.end; ++o) {
        const int64_t base = o * period + g * l.inner;
        for (int64_t i = 0; i < l.inner; ++i) op(base + i);
      }
    }
  } else if (l.item_is_piece()) {
    const auto op = per_group(l, (s.begin / l.inner) % l.groups);
    for (int64_t i = threadIdx.x; i < s.length; i += blockDim.x) op(s.begin + i);
  } else {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, num_warps = blockDim.x >> 5;
    for (int64_t run = s.first + warp; run < s.end; run += num_warps) {
      const auto op = per_group(l, run % l.groups);
      for (int64_t i = lane; i < l.inner; i += 32) op(run * l.inner + i);
    }
  }
}

template <typename T, bool kAccumulate>
__global__ void __launch_bounds__(kBlockThreads)
    group_grad_kernel(const __grid_constant__ GroupBatch batch, const double* __restrict__ stats,
                      DeviceScalar grad_total, DeviceScalar l1, DeviceScalar l2) {
  const int j = item_of_block(batch).tensor;
  const T* __restrict__ x = static_cast<const T*>(batch.inputs[j]);
  T* __restrict__ out = static_cast<T*>(batch.outputs[j]);
  const double g_total = grad_total.get(), c1 = l1.get(), c2 = l2.get();
  for_each_element_by_group(batch, out, [&](const GroupLayout& l, int64_t g) {
    const GradCoefficients k = grad_coefficients(
        g_total, stats[(l.first_row + g) * kStatsColumns + 1], c1, c2 * l.weight, false);
    return [=](int64_t i) {
      const double v = static_cast<double>(x[i]);
      const double grad = k.sign_coef * sign_of(v) + (v * k.linear_scale) * k.linear_coef;
      out[i] = static_cast<T>(kAccumulate ? static_cast<double>(out[i]) + grad : grad);
    };
  });
}

template <typename T>
__global__ void __launch_bounds__(kBlockThreads)
    group_lasso_shrink_kernel(const __grid_constant__ GroupBatch batch,
                              const double* __restrict__ stats, DeviceScalar threshold) {
  using P = typename ScaleCompute<T>::type;
  const int j = item_of_block(batch).tensor;
  T* __restrict__ x = static_cast<T*>(batch.outputs[j]);
  const double t = threshold.get();
  for_each_element_by_group(batch, x, [&](const GroupLayout& l, int64_t g) {
    const double scale =
        group_shrink_scale(stats[(l.first_row + g) * kStatsColumns + 1], t * l.weight);
    const P s = static_cast<P>(scale);
    return [=](int64_t i) {
      if (scale != 1.0) x[i] = static_cast<T>(static_cast<P>(x[i]) * s);  // 1: bit for bit
    };
  });
}

template <typename Fn>
void for_each_group_batch(const std::vector<GroupBatchPlan>& plans, Fn&& fn) {
  for (const GroupBatchPlan& plan : plans) {
    if (plan.num_items == 0) continue;
    REGEXT_DISPATCH_FLOATING_TYPES(plan.dtype, "regext_cuda_groups",
                                   [&] { fn(TypeTag<scalar_t>{}, plan); });
  }
}

// Steps 1 and 2 of the forward: every group's sums into its stats row and, where
// l2_terms is not null, its weighted norm for the total.
void launch_group_sums(const OnDevice& on, const std::vector<GroupBatchPlan>& plans,
                       at::ArrayRef<GroupLayout> layouts, const at::Tensor& stats,
                       double* l2_terms) {
  int64_t num_slots = 0;
  for (const auto& l : layouts) num_slots += l.num_slots;
  // One slot per piece, run or (item, group); every slot written by one block.
  at::Tensor slots = at::empty({std::max<int64_t>(num_slots, 1), kStatsColumns}, stats.options());
  auto* slot_ptr = reinterpret_cast<SumPair*>(slots.data_ptr<double>());
  for_each_group_batch(plans, [&](auto tag, const GroupBatchPlan& plan) {
    using T = typename decltype(tag)::type;
    launch(group_partial_kernel<T>, plan.num_items, kBlockThreads, on.stream, plan.batch, slot_ptr);
  });
  for (const GroupBatchPlan& plan : plans) {
    if (plan.num_groups == 0) continue;
    launch(group_combine_kernel, (plan.num_groups + kBlockThreads - 1) / kBlockThreads,
           kBlockThreads, on.stream, plan.batch, slot_ptr, stats.data_ptr<double>(), l2_terms,
           plan.num_groups);
  }
}

}  // namespace
}  // namespace cuda

using namespace cuda;

void CudaBackend::group_stats_and_total(at::ArrayRef<at::Tensor> dense,
                                        at::ArrayRef<GroupLayout> layouts, const at::Tensor& stats,
                                        const at::Tensor& total, const at::Tensor& l1_tensor,
                                        const at::Tensor& l2_tensor) {
  const OnDevice on(stats.device());
  const DeviceScalar l1 = device_scalar(l1_tensor, stats.device());
  const DeviceScalar l2 = device_scalar(l2_tensor, stats.device());
  const int64_t num_rows = stats.size(0);
  at::Tensor l2_terms = at::empty({std::max<int64_t>(num_rows, 1)}, stats.options());
  launch_group_sums(on, plan_group_batches(dense, {}, layouts), layouts, stats,
                    l2_terms.data_ptr<double>());
  launch(group_total_kernel, 1, kBlockThreads, on.stream, stats.const_data_ptr<double>(),
         l2_terms.const_data_ptr<double>(), num_rows, l1, l2, total.data_ptr(),
         total.scalar_type() == at::kDouble);
}

void CudaBackend::group_grads(const GroupGradRequest& r) {
  const c10::Device device = r.stats.device();
  const OnDevice on(device);
  const DeviceScalar grad_total = device_scalar(r.grad_total, device);
  const DeviceScalar l1 = device_scalar(r.l1, device), l2 = device_scalar(r.l2, device);
  for_each_group_batch(
      plan_group_batches(r.dense, r.targets, r.layouts), [&](auto tag, const GroupBatchPlan& plan) {
        using T = typename decltype(tag)::type;
        launch(r.accumulate ? group_grad_kernel<T, true> : group_grad_kernel<T, false>,
               plan.num_items, kBlockThreads, on.stream, plan.batch,
               r.stats.const_data_ptr<double>(), grad_total, l1, l2);
      });
}

void CudaBackend::prox_group_lasso(at::ArrayRef<at::Tensor> dense,
                                   at::ArrayRef<GroupLayout> layouts,
                                   const at::Tensor& threshold_tensor) {
  const c10::Device device = dense.front().device();
  const OnDevice on(device);
  const DeviceScalar threshold = device_scalar(threshold_tensor, device);
  // The group norms from the forward's kernels (no total), then one shrink launch;
  // one plan for both (the sums read `inputs`, the shrink writes `outputs`).
  const at::Tensor stats = at::empty({total_groups(layouts), kStatsColumns},
                                     at::TensorOptions().device(device).dtype(at::kDouble));
  const std::vector<GroupBatchPlan> plans = plan_group_batches(dense, dense, layouts);
  launch_group_sums(on, plans, layouts, stats, /*l2_terms=*/nullptr);
  for_each_group_batch(plans, [&](auto tag, const GroupBatchPlan& plan) {
    using T = typename decltype(tag)::type;
    launch(group_lasso_shrink_kernel<T>, plan.num_items, kBlockThreads, on.stream, plan.batch,
           stats.const_data_ptr<double>(), threshold);
  });
}

}  // namespace regext
