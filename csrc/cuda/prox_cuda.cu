// CUDA backend of the proximal and sparsity operators (interface:
// csrc/backend.h; operators: csrc/prox_ops.cpp). Same multi-tensor launches as
// penalty_cuda.cu: one block per 32Ki-element chunk of any tensor, tensor
// addresses in the kernel argument, one launch per (dtype, batch of <= 1000
// tensors); norms and thresholds are read on the device, so nothing here
// synchronizes with the host.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <vector>

#include "../backend.h"
#include "../dtype_dispatch.h"
#include "../penalty_math.h"
#include "tensor_batch.cuh"

namespace regext::cuda {
namespace {

constexpr int kBlockThreads = 512;

// soft_threshold runs in float32 (float64 for float64), as on the CPU.
template <typename T> struct ProxComputeType { using type = float; };
template <> struct ProxComputeType<double> { using type = double; };
// The group-shrink product is formed in float64 (float32 for the half types).
template <typename T> struct ScaleComputeType { using type = double; };
template <> struct ScaleComputeType<c10::Half> { using type = float; };
template <> struct ScaleComputeType<c10::BFloat16> { using type = float; };

template <typename T>
__global__ void __launch_bounds__(kBlockThreads)
    prox_l1_kernel(const __grid_constant__ TensorBatch batch, double threshold) {
  using C = typename ProxComputeType<T>::type;
  const ChunkSpan span = chunk_of_block(batch);
  T* __restrict__ x = static_cast<T*>(batch.outputs[span.tensor]) + span.begin;
  const C t = static_cast<C>(threshold);
#pragma unroll 4
  for (int i = threadIdx.x; i < span.length; i += blockDim.x) {
    x[i] = static_cast<T>(soft_threshold(static_cast<C>(x[i]), t));
  }
}

template <typename T>
__global__ void __launch_bounds__(kBlockThreads)
    group_shrink_kernel(const __grid_constant__ TensorBatch batch,
                        const double* __restrict__ stats, double threshold) {
  using P = typename ScaleComputeType<T>::type;
  const ChunkSpan span = chunk_of_block(batch);
  const double scale = group_shrink_scale(
      stats[static_cast<int64_t>(batch.row[span.tensor]) * kStatsColumns + 1], threshold);
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
  __shared__ int warp_counts[kBlockThreads / 32];
  const ChunkSpan span = chunk_of_block(batch);
  const T* __restrict__ x = static_cast<const T*>(batch.inputs[span.tensor]) + span.begin;
  int count = 0;
  for (int i = threadIdx.x; i < span.length; i += blockDim.x) {
    count += is_exact_zero(static_cast<float>(x[i])) ? 1 : 0;
  }
  // Integer sums are exact: any order gives the same count.
  for (int offset = 16; offset > 0; offset >>= 1) count += __shfl_xor_sync(0xffffffffu, count, offset);
  if ((threadIdx.x & 31) == 0) warp_counts[threadIdx.x >> 5] = count;
  __syncthreads();
  if (threadIdx.x == 0) {
    int64_t total = 0;
    for (int w = 0; w < static_cast<int>(blockDim.x >> 5); ++w) total += warp_counts[w];
    partials[blockIdx.x] = total;
  }
}

__global__ void zero_count_combine_kernel(const __grid_constant__ TensorBatch batch,
                                          const int64_t* __restrict__ partials,
                                          int64_t* __restrict__ counts) {
  for (int j = threadIdx.x; j < batch.num_tensors; j += blockDim.x) {
    int64_t total = 0;
    for (int32_t c = batch.chunk_prefix[j]; c < batch.chunk_prefix[j + 1]; ++c) total += partials[c];
    counts[batch.row[j]] = total;
  }
}

cudaStream_t stream_of(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index());
}

// Runs launch(T* tag, plan, stream) once per non-empty batch of `dense`, which
// is updated in place (each tensor is its own output), on the current stream
// of its device, and checks each launch.
template <typename Launch>
void update_per_batch(const std::vector<at::Tensor>& dense, Launch&& launch) {
  if (dense.empty()) return;
  const c10::cuda::CUDAGuard guard(dense[0].device());
  const cudaStream_t stream = stream_of(dense[0]);
  for (const BatchPlan& plan : plan_batches(dense, dense, identity_rows(dense.size()))) {
    if (plan.num_chunks == 0) continue;
    dispatch_float_types(plan.dtype, [&](auto* tag) {
      launch(tag, plan, stream);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
}

}  // namespace

void prox_l1(const std::vector<at::Tensor>& dense, double threshold) {
  update_per_batch(dense, [&](auto* tag, const BatchPlan& plan, cudaStream_t stream) {
    using T = std::remove_pointer_t<decltype(tag)>;
    prox_l1_kernel<T><<<static_cast<unsigned>(plan.num_chunks), kBlockThreads, 0, stream>>>(
        plan.batch, threshold);
  });
}

void prox_group_l2(const std::vector<at::Tensor>& dense, const at::Tensor& stats,
                   double threshold) {
  update_per_batch(dense, [&](auto* tag, const BatchPlan& plan, cudaStream_t stream) {
    using T = std::remove_pointer_t<decltype(tag)>;
    group_shrink_kernel<T><<<static_cast<unsigned>(plan.num_chunks), kBlockThreads, 0, stream>>>(
        plan.batch, stats.const_data_ptr<double>(), threshold);
  });
}

void count_zeros(const std::vector<at::Tensor>& dense, const at::Tensor& counts) {
  if (dense.empty()) return;
  const c10::cuda::CUDAGuard guard(counts.device());
  const cudaStream_t stream = stream_of(counts);
  const std::vector<BatchPlan> plans = plan_batches(dense, {}, identity_rows(dense.size()));
  at::Tensor partials = at::empty({std::max<int64_t>(total_chunks(plans), 1)}, counts.options());
  int64_t* slots = partials.data_ptr<int64_t>();
  for (const BatchPlan& plan : plans) {
    if (plan.num_chunks > 0) {
      dispatch_float_types(plan.dtype, [&](auto* tag) {
        using T = std::remove_pointer_t<decltype(tag)>;
        zero_count_kernel<T><<<static_cast<unsigned>(plan.num_chunks), kBlockThreads, 0, stream>>>(
            plan.batch, slots + plan.chunk_base);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
    zero_count_combine_kernel<<<1, 256, 0, stream>>>(plan.batch, slots + plan.chunk_base,
                                                     counts.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace regext::cuda
