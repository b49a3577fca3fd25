// CUDA backend of the penalty operators (interface: csrc/backend.h).
//
// Forward, per (dtype, batch of <= 1000 tensors):
//   1. partial_sums_kernel: one block per 32Ki-element chunk of any tensor,
//      reads it once (16-byte loads when aligned) and writes the chunk's
//      (sum |x|, sum x^2) to its own slot (float32 runs, float64 across runs:
//      ThreadSums). No atomics.
//   2. combine_kernel: one block; warp w adds the slots of tensors w, w+16, ...
//      in a fixed order into stats[row]. With a single batch the same block
//      then computes the weighted total (no third launch).
//   3. total_kernel: only when there were several batches (several dtypes or
//      more than 1000 tensors): one block turns all of stats into the total.
// Backward: grad_kernel, one block per chunk, one launch per batch; the
// incoming gradient, the coefficients and the norms are read on the device:
// nothing here synchronizes with the host, so a training step can be captured
// in a graph.
#include <ATen/ATen.h>

#include <cstdint>
#include <type_traits>
#include <vector>

#include "../backend.h"
#include "../compute_types.h"
#include "../penalty_math.h"
#include "block_reduce.cuh"
#include "block_total.cuh"
#include "device_scalar.cuh"
#include "launch.cuh"
#include "tensor_batch.cuh"

namespace regext {
namespace cuda {
namespace {

template <typename T>
struct alignas(16) Vec16 {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// How a thread sums |x| and x^2. Where the result is float64 (float64 data, or
// any float64 tensor in the list, as on the CPU) every element is widened to
// float64. Otherwise short runs (four 16-byte loads: 16 float32 or 32 half
// elements) are summed in float32, each load's elements in order and the four
// loads pairwise (at most 8 roundings in a row, ~5e-7 relative at worst), and
// the runs are added in float64: one float64 add per run instead of three per
// element, which keeps GPUs whose FP64 rate is 1/32-1/64 of FP32 at memory
// speed. A run whose float32 squares overflow, or lose bits to underflow (sum
// of squares below n * 1e-37 with a nonzero |x|), or that holds NaN/inf, is
// summed again in float64 from the registers: the CPU kernels' rule.
struct ThreadSums {
  double abs = 0.0;
  double sq = 0.0;

  template <typename T>
  __device__ __forceinline__ void add_exact(T value) {
    const double v = static_cast<double>(value);
    abs += fabs(v);
    sq += v * v;
  }
  template <typename T>
  __device__ __forceinline__ void add_exact(const Vec16<T>& vec) {
#pragma unroll
    for (int k = 0; k < Vec16<T>::kSize; ++k) add_exact(vec.v[k]);
  }
};

// (sum |x|, sum x^2) of some elements in float32.
struct FloatSums {
  float abs;
  float sq;
  // Whether these sums of n elements may be used as they are (no NaN/inf, by
  // comparisons: NaN fails both; no underflow loss that matters).
  __device__ __forceinline__ bool trusted(int n) const {
    constexpr float kMax = 3.4028234663852886e38f;
    return abs <= kMax && sq <= kMax && (sq >= static_cast<float>(n) * 1e-37f || abs == 0.f);
  }
  __device__ __forceinline__ FloatSums operator+(const FloatSums& o) const {
    return {abs + o.abs, sq + o.sq};
  }
};

template <typename T>
__device__ __forceinline__ FloatSums float_sums(const Vec16<T>& vec) {
  FloatSums s{0.f, 0.f};
#pragma unroll
  for (int k = 0; k < Vec16<T>::kSize; ++k) {
    const float v = static_cast<float>(vec.v[k]);
    s.abs += fabsf(v);
    s.sq += v * v;
  }
  return s;
}

template <typename T, bool kExact>
__global__ void __launch_bounds__(kBlockThreads)
    partial_sums_kernel(const __grid_constant__ TensorBatch batch, SumPair* __restrict__ partials) {
  constexpr bool kFloatRuns = !kExact && !std::is_same_v<T, double>;
  constexpr int V = Vec16<T>::kSize;
  const ChunkSpan span = chunk_of_block(batch);
  const int n = span.length;
  const T* __restrict__ x = static_cast<const T*>(batch.inputs[span.tensor]) + span.begin;

  ThreadSums sums;
  int tail_start = 0;
  if (aligned16(x)) {
    const int num_vecs = n / V;
    const Vec16<T>* xv = reinterpret_cast<const Vec16<T>*>(x);
    const int stride = blockDim.x;
    int i = threadIdx.x;
    // Four independent 16-byte loads in flight per thread before any use.
    for (; i + 3 * stride < num_vecs; i += 4 * stride) {
      const Vec16<T> a = xv[i], b = xv[i + stride], c = xv[i + 2 * stride], d = xv[i + 3 * stride];
      if constexpr (kFloatRuns) {
        const FloatSums run = (float_sums(a) + float_sums(b)) + (float_sums(c) + float_sums(d));
        if (run.trusted(4 * V)) {
          sums.abs += run.abs;
          sums.sq += run.sq;
          continue;
        }
      }
      sums.add_exact(a);
      sums.add_exact(b);
      sums.add_exact(c);
      sums.add_exact(d);
    }
    for (; i < num_vecs; i += stride) {
      const Vec16<T> a = xv[i];
      if constexpr (kFloatRuns) {
        const FloatSums run = float_sums(a);
        if (run.trusted(V)) {
          sums.abs += run.abs;
          sums.sq += run.sq;
          continue;
        }
      }
      sums.add_exact(a);
    }
    tail_start = num_vecs * V;
  }
  for (int i = tail_start + threadIdx.x; i < n; i += blockDim.x) sums.add_exact(x[i]);
  const SumPair total = block_sum(SumPair{sums.abs, sums.sq});
  if (threadIdx.x == 0) partials[blockIdx.x] = total;
}

// Sums `stats` rows [0, num_rows) into the weighted penalty, written in float32
// or float64. Called by all threads of one block.
// (stats is written by the same kernel in combine_kernel: no __restrict__, whose
// read-only-cache loads could be stale.)
__device__ void write_total(const double* stats, int64_t num_rows, DeviceScalar l1, DeviceScalar l2,
                            bool l2_squared, void* out, bool out_is_double) {
  write_block_total(
      stats, num_rows, [&](int64_t r) { return l2_term(stats[r * kStatsColumns + 1], l2_squared); },
      l1, l2, out, out_is_double);
}

__global__ void __launch_bounds__(kBlockThreads)
    combine_kernel(const __grid_constant__ TensorBatch batch, const SumPair* __restrict__ partials,
                   double* __restrict__ stats, bool write_total_too, int64_t num_rows,
                   DeviceScalar l1, DeviceScalar l2, bool l2_squared, void* total,
                   bool total_is_double) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int num_warps = blockDim.x >> 5;
  for (int j = warp; j < batch.num_tensors; j += num_warps) {
    SumPair sums{0.0, 0.0};
    for (int32_t c = batch.chunk_prefix[j] + lane; c < batch.chunk_prefix[j + 1]; c += 32) {
      sums.a += partials[c].a;
      sums.b += partials[c].b;
    }
    sums = warp_sum(sums);
    if (lane == 0) {
      stats[static_cast<int64_t>(batch.row[j]) * kStatsColumns + 0] = sums.a;
      stats[static_cast<int64_t>(batch.row[j]) * kStatsColumns + 1] = sums.b;
    }
  }
  if (write_total_too) {
    __syncthreads();  // makes this block's stats writes visible to all its threads
    write_total(stats, num_rows, l1, l2, l2_squared, total, total_is_double);
  }
}

__global__ void __launch_bounds__(kBlockThreads)
    total_kernel(const double* __restrict__ stats, int64_t num_rows, DeviceScalar l1,
                 DeviceScalar l2, bool l2_squared, void* total, bool total_is_double) {
  write_total(stats, num_rows, l1, l2, l2_squared, total, total_is_double);
}

// One gradient element in compute type C. kScaled: the linear term is
// (x * scale) * linear_coef (GradCoefficients' split, float64 only).
template <typename T, typename C, bool kAccumulate, bool kScaled>
__device__ __forceinline__ T grad_of(T x, T old, C sign_coef, C linear_coef, C scale) {
  const C v = static_cast<C>(x);
  const C linear = kScaled ? (v * scale) * linear_coef : linear_coef * v;
  const C g = sign_coef * sign_of(v) + linear;
  return static_cast<T>(kAccumulate ? static_cast<C>(old) + g : g);
}

template <typename T, typename C, bool kAccumulate, bool kScaled>
__device__ __forceinline__ void grad_chunk(const T* __restrict__ x, T* __restrict__ out, int n,
                                           C sign_coef, C linear_coef, C scale) {
  int tail_start = 0;
  if (aligned16(x) && aligned16(out)) {
    constexpr int V = Vec16<T>::kSize;
    const int num_vecs = n / V;
    const Vec16<T>* xv = reinterpret_cast<const Vec16<T>*>(x);
    Vec16<T>* ov = reinterpret_cast<Vec16<T>*>(out);
    // x and out are __restrict__: unrolling lets the loads of several
    // iterations issue before the first store.
#pragma unroll 4
    for (int i = threadIdx.x; i < num_vecs; i += blockDim.x) {
      const Vec16<T> in = xv[i];
      Vec16<T> result;
      if constexpr (kAccumulate) {
        result = ov[i];
#pragma unroll
        for (int e = 0; e < V; ++e) {
          result.v[e] =
              grad_of<T, C, true, kScaled>(in.v[e], result.v[e], sign_coef, linear_coef, scale);
        }
      } else {
#pragma unroll
        for (int e = 0; e < V; ++e) {
          result.v[e] = grad_of<T, C, false, kScaled>(in.v[e], T(0), sign_coef, linear_coef, scale);
        }
      }
      ov[i] = result;
    }
    tail_start = num_vecs * V;
  }
  for (int i = tail_start + threadIdx.x; i < n; i += blockDim.x) {
    out[i] = grad_of<T, C, kAccumulate, kScaled>(x[i], kAccumulate ? out[i] : T(0), sign_coef,
                                                 linear_coef, scale);
  }
}

template <typename T, bool kAccumulate>
__global__ void __launch_bounds__(kBlockThreads)
    grad_kernel(const __grid_constant__ TensorBatch batch, const double* __restrict__ stats,
                DeviceScalar grad_total, DeviceScalar l1, DeviceScalar l2, bool l2_squared) {
  using C = typename ElementwiseCompute<T>::type;
  const ChunkSpan span = chunk_of_block(batch);
  const int j = span.tensor;
  const int n = span.length;
  const T* __restrict__ x = static_cast<const T*>(batch.inputs[j]) + span.begin;
  T* __restrict__ out = static_cast<T*>(batch.outputs[j]) + span.begin;

  const GradCoefficients k = grad_coefficients(
      grad_total.get(), stats[static_cast<int64_t>(batch.row[j]) * kStatsColumns + 1], l1.get(),
      l2.get(), l2_squared);
  // The same choice for every thread of the block (one tensor per block).
  if (k.linear_scale != 1.0) {
    grad_chunk<T, double, kAccumulate, true>(x, out, n, k.sign_coef, k.linear_coef, k.linear_scale);
    return;
  }
  if constexpr (!std::is_same_v<C, double>) {
    if (coef_fits_float(k.sign_coef) && coef_fits_float(k.linear_coef)) {
      grad_chunk<T, C, kAccumulate, false>(x, out, n, static_cast<C>(k.sign_coef),
                                           static_cast<C>(k.linear_coef), C(1));
      return;
    }
  }
  grad_chunk<T, double, kAccumulate, false>(x, out, n, k.sign_coef, k.linear_coef, 1.0);
}

}  // namespace
}  // namespace cuda

using namespace cuda;

at::Tensor CudaBackend::empty_like_dense(const at::Tensor& t) {
  return at::empty_strided(t.sizes(), t.strides(), t.options());
}

void CudaBackend::stats_and_total(at::ArrayRef<at::Tensor> dense, const at::Tensor& stats,
                                  const at::Tensor& total, const at::Tensor& l1_tensor,
                                  const at::Tensor& l2_tensor, bool l2_squared) {
  const OnDevice on(stats.device());
  const DeviceScalar l1 = device_scalar(l1_tensor, stats.device());
  const DeviceScalar l2 = device_scalar(l2_tensor, stats.device());
  const std::vector<BatchPlan> plans = plan_batches(dense, {}, identity_rows(dense.size()));
  const int64_t num_rows = static_cast<int64_t>(dense.size());
  // A float64 result: every tensor summed in float64 (see ThreadSums).
  const bool total_is_double = total.scalar_type() == at::kDouble;

  // One slot per chunk, every slot written by exactly one block.
  at::Tensor partials =
      at::empty({std::max<int64_t>(total_chunks(plans), 1), kStatsColumns}, stats.options());
  auto* partial_slots = reinterpret_cast<SumPair*>(partials.data_ptr<double>());
  for_each_batch(plans, [&](auto tag, const BatchPlan& plan) {
    using T = typename decltype(tag)::type;
    launch(total_is_double ? partial_sums_kernel<T, true> : partial_sums_kernel<T, false>,
           plan.num_chunks, kBlockThreads, on.stream, plan.batch, partial_slots + plan.chunk_base);
  });
  const bool single_batch = plans.size() == 1;
  for (const BatchPlan& plan : plans) {
    launch(combine_kernel, 1, kBlockThreads, on.stream, plan.batch, partial_slots + plan.chunk_base,
           stats.data_ptr<double>(), single_batch, num_rows, l1, l2, l2_squared, total.data_ptr(),
           total_is_double);
  }
  if (!single_batch) {
    launch(total_kernel, 1, kBlockThreads, on.stream, stats.const_data_ptr<double>(), num_rows, l1,
           l2, l2_squared, total.data_ptr(), total_is_double);
  }
}

void CudaBackend::grads(const GradRequest& r) {
  const c10::Device device = r.stats.device();
  const OnDevice on(device);
  const DeviceScalar grad_total = device_scalar(r.grad_total, device);
  const DeviceScalar l1 = device_scalar(r.l1, device), l2 = device_scalar(r.l2, device);
  for_each_batch(plan_batches(r.dense, r.targets, r.rows), [&](auto tag, const BatchPlan& plan) {
    using T = typename decltype(tag)::type;
    launch(r.accumulate ? grad_kernel<T, true> : grad_kernel<T, false>, plan.num_chunks,
           kBlockThreads, on.stream, plan.batch, r.stats.const_data_ptr<double>(), grad_total, l1,
           l2, r.l2_squared);
  });
}

}  // namespace regext
