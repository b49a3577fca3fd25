// CUDA backend of the proximal and sparsity operators (interface:
// csrc/backend.h). Same multi-tensor launches as penalty_cuda.cu: one block per
// 32Ki-element chunk of any tensor, tensor addresses in the kernel argument,
// one launch per (dtype, batch of <= 1000 tensors); norms and thresholds are
// read on the device, so nothing here synchronizes with the host.
#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#include "../backend.h"
#include "../compute_types.h"
#include "../penalty_math.h"
#include "block_reduce.cuh"
#include "device_scalar.cuh"
#include "launch.cuh"
#include "tensor_batch.cuh"

namespace regext {
namespace cuda {
namespace {

template <typename T>
__global__ void __launch_bounds__(kBlockThreads)
    prox_l1_kernel(const __grid_constant__ TensorBatch batch, DeviceScalar threshold) {
  using C = typename ElementwiseCompute<T>::type;
  const ChunkSpan span = chunk_of_block(batch);
  T* __restrict__ x = static_cast<T*>(batch.outputs[span.tensor]) + span.begin;
  const C t = static_cast<C>(threshold.get());
#pragma unroll 4
  for (int i = threadIdx.x; i < span.length; i += blockDim.x) {
    x[i] = static_cast<T>(soft_threshold(static_cast<C>(x[i]), t));
  }
}

template <typename T>
__global__ void __launch_bounds__(kBlockThreads)
    group_shrink_kernel(const __grid_constant__ TensorBatch batch, const double* __restrict__ stats,
                        DeviceScalar threshold) {
  using P = typename ScaleCompute<T>::type;
  const ChunkSpan span = chunk_of_block(batch);
  const double scale = group_shrink_scale(
      stats[static_cast<int64_t>(batch.row[span.tensor]) * kStatsColumns + 1], threshold.get());
  if (scale == 1.0) return;  // unchanged, bit for bit (also NaN/inf norms)
  T* __restrict__ x = static_cast<T*>(batch.outputs[span.tensor]) + span.begin;
  const P s = static_cast<P>(scale);
#pragma unroll 4
  for (int i = threadIdx.x; i < span.length; i += blockDim.x) {
    x[i] = static_cast<T>(static_cast<P>(x[i]) * s);
  }
}

template <typename T>
__global__ void __launch_bounds__(kBlockThreads)
    zero_count_kernel(const __grid_constant__ TensorBatch batch, int64_t* __restrict__ partials) {
  const ChunkSpan span = chunk_of_block(batch);
  const T* __restrict__ x = static_cast<const T*>(batch.inputs[span.tensor]) + span.begin;
  using C = typename ElementwiseCompute<T>::type;  // exact for every dtype
  int64_t count = 0;
  for (int i = threadIdx.x; i < span.length; i += blockDim.x) {
    count += is_exact_zero(static_cast<C>(x[i])) ? 1 : 0;
  }
  count = block_sum(count);
  if (threadIdx.x == 0) partials[blockIdx.x] = count;
}

__global__ void __launch_bounds__(kBlockThreads)
    zero_count_combine_kernel(const __grid_constant__ TensorBatch batch,
                              const int64_t* __restrict__ partials, int64_t* __restrict__ counts) {
  for (int j = threadIdx.x; j < batch.num_tensors; j += blockDim.x) {
    int64_t total = 0;
    for (int32_t c = batch.chunk_prefix[j]; c < batch.chunk_prefix[j + 1]; ++c)
      total += partials[c];
    counts[batch.row[j]] = total;
  }
}

// The batches of a list updated in place: each tensor is its own output.
std::vector<BatchPlan> in_place_plans(at::ArrayRef<at::Tensor> dense) {
  return plan_batches(dense, dense, identity_rows(dense.size()));
}

}  // namespace
}  // namespace cuda

using namespace cuda;

void CudaBackend::prox_l1(at::ArrayRef<at::Tensor> dense, const at::Tensor& threshold_tensor) {
  if (dense.empty()) return;
  const OnDevice on(dense[0].device());
  const DeviceScalar threshold = device_scalar(threshold_tensor, dense[0].device());
  for_each_batch(in_place_plans(dense), [&](auto tag, const BatchPlan& plan) {
    using T = typename decltype(tag)::type;
    launch(prox_l1_kernel<T>, plan.num_chunks, kBlockThreads, on.stream, plan.batch, threshold);
  });
}

void CudaBackend::prox_group_l2(at::ArrayRef<at::Tensor> dense, const at::Tensor& stats,
                                const at::Tensor& threshold_tensor) {
  if (dense.empty()) return;
  const OnDevice on(stats.device());
  const DeviceScalar threshold = device_scalar(threshold_tensor, stats.device());
  for_each_batch(in_place_plans(dense), [&](auto tag, const BatchPlan& plan) {
    using T = typename decltype(tag)::type;
    launch(group_shrink_kernel<T>, plan.num_chunks, kBlockThreads, on.stream, plan.batch,
           stats.const_data_ptr<double>(), threshold);
  });
}

void CudaBackend::count_zeros(at::ArrayRef<at::Tensor> dense, const at::Tensor& counts) {
  if (dense.empty()) return;
  const OnDevice on(counts.device());
  const std::vector<BatchPlan> plans = plan_batches(dense, {}, identity_rows(dense.size()));
  at::Tensor partials = at::empty({std::max<int64_t>(total_chunks(plans), 1)}, counts.options());
  int64_t* slots = partials.data_ptr<int64_t>();
  for_each_batch(plans, [&](auto tag, const BatchPlan& plan) {
    using T = typename decltype(tag)::type;
    launch(zero_count_kernel<T>, plan.num_chunks, kBlockThreads, on.stream, plan.batch,
           slots + plan.chunk_base);
  });
  // Every batch writes its rows, also one whose tensors are all empty (zero counts).
  for (const BatchPlan& plan : plans) {
    launch(zero_count_combine_kernel, 1, kBlockThreads, on.stream, plan.batch,
           slots + plan.chunk_base, counts.data_ptr<int64_t>());
  }
}

}  // namespace regext
