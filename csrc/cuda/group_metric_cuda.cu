// CUDA backend of the group lasso's proximal step in an optimizer's metric
// (prox_group_metric_; interface: csrc/backend.h; the method and its shared
// arithmetic: csrc/group_metric_math.h; groups: csrc/groups.h).
//
// One block per group, all groups of up to kMaxMetricGroupTensors tensors of one
// dtype in one launch. A block reads its group's elements and their second moments
// (and means): once for the sums that decide zero or not and start Newton's method
// (sum x^2, sum (d x)^2, max c over the nonzero x, and whether any x is NaN or inf),
// then once per Newton iteration (4-6 on trained weights: the group's elements stay
// in L1/L2 between iterations for groups of up to tens of thousands of elements),
// then once to write u. Every block-wide sum is the fixed butterfly of
// block_reduce.cuh, so results are the same bits on every run; tau is broadcast
// through shared memory after each sum. The tensor's coefficient row is read on the
// device (a row with l1_step 0, e.g. AMP's skipped step, leaves the tensor
// untouched); nothing synchronizes with the host. Column groups of a row-major
// weight are read with a stride of one row (uncoalesced); GPU speed is unmeasured
// (README, "What to expect on a GPU").
#include <ATen/ATen.h>

#include <cstdint>
#include <limits>
#include <vector>

#include "../backend.h"
#include "../compute_types.h"
#include "../group_metric_math.h"
#include "../groups.h"
#include "../penalty_math.h"
#include "block_reduce.cuh"
#include "launch.cuh"

namespace regext {
namespace cuda {
namespace {

// Threads per group: groups are often short (a row of a few hundred elements).
constexpr int kGroupMetricThreads = 256;
constexpr int kMaxMetricGroupTensors = 440;

struct MetricGroupTensor {
  void* param;
  const void* moment;
  const void* mean;  // null without means
  int64_t outer, groups, inner;
  double weight;  // w_g
  int32_t row;    // the tensor's row of coefs
};

struct MetricGroupBatch {
  MetricGroupTensor tensor[kMaxMetricGroupTensors];
  int32_t group_prefix[kMaxMetricGroupTensors + 1];  // the batch's groups, tensor by tensor
  int32_t num_tensors;
};
static_assert(sizeof(MetricGroupBatch) <= 32764 - 256,
              "MetricGroupBatch exceeds the parameter limit");

struct MetricGroupPlan {
  MetricGroupBatch batch;
  c10::ScalarType dtype;
  int64_t num_groups;
};

// Tensors with elements grouped by dtype (first-seen order), then cut into batches of
// at most kMaxMetricGroupTensors tensors and INT32_MAX groups.
std::vector<MetricGroupPlan> plan_metric_groups(at::ArrayRef<at::Tensor> dense,
                                                at::ArrayRef<at::Tensor> moments,
                                                at::ArrayRef<at::Tensor> means,
                                                at::ArrayRef<GroupLayout> layouts) {
  constexpr int64_t kMax32 = std::numeric_limits<int32_t>::max();
  std::vector<c10::ScalarType> dtypes;
  for (const auto& t : dense) {
    bool seen = false;
    for (auto d : dtypes) seen = seen || d == t.scalar_type();
    if (!seen) dtypes.push_back(t.scalar_type());
  }
  std::vector<MetricGroupPlan> plans;
  for (auto dtype : dtypes) {
    MetricGroupPlan* plan = nullptr;
    for (size_t t = 0; t < dense.size(); ++t) {
      const GroupLayout& l = layouts[t];
      if (dense[t].scalar_type() != dtype || l.num_items == 0) continue;
      TORCH_CHECK(l.groups < kMax32, "regext: tensor has too many groups");
      if (plan == nullptr || plan->batch.num_tensors == kMaxMetricGroupTensors ||
          plan->num_groups + l.groups > kMax32) {
        plans.emplace_back();
        plan = &plans.back();
        plan->batch.num_tensors = 0;
        plan->batch.group_prefix[0] = 0;
        plan->dtype = dtype;
        plan->num_groups = 0;
      }
      MetricGroupBatch& b = plan->batch;
      const int j = b.num_tensors++;
      b.tensor[j] = MetricGroupTensor{dense[t].data_ptr(),
                                      moments[t].const_data_ptr(),
                                      means.empty() ? nullptr : means[t].const_data_ptr(),
                                      l.outer,
                                      l.groups,
                                      l.inner,
                                      l.weight,
                                      static_cast<int32_t>(t)};
      plan->num_groups += l.groups;
      b.group_prefix[j + 1] = static_cast<int32_t>(plan->num_groups);
    }
  }
  return plans;
}

// The largest j with prefix[j] <= index (tensors without groups are never chosen).
__device__ __forceinline__ int tensor_of_group(const int32_t* prefix, int num_tensors,
                                               int64_t index) {
  int lo = 0, hi = num_tensors - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (prefix[mid] <= index)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

// Block-wide maximum (valid in thread 0), the butterfly of block_sum with fmax.
__device__ __forceinline__ double block_max(double v) {
  __shared__ double warp_results[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, num_warps = blockDim.x >> 5;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    v = fmax(v, __shfl_xor_sync(0xffffffffu, v, offset));
  }
  __syncthreads();  // warp_results may still be read by a previous call
  if (lane == 0) warp_results[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < num_warps ? warp_results[lane] : 0.0;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      v = fmax(v, __shfl_xor_sync(0xffffffffu, v, offset));
    }
  }
  return v;
}

// Element e (0 <= e < outer * inner) of group g, as an offset into the tensor.
struct GroupIndex {
  int64_t period, base, inner;
  __device__ __forceinline__ int64_t operator()(int64_t e) const {
    return (e / inner) * period + base + e % inner;
  }
};

template <typename T, bool kCentered>
__global__ void __launch_bounds__(kGroupMetricThreads)
    group_metric_kernel(const __grid_constant__ MetricGroupBatch batch,
                        const double* __restrict__ coefs) {
  const int j = tensor_of_group(batch.group_prefix, batch.num_tensors, blockIdx.x);
  const MetricGroupTensor& t = batch.tensor[j];
  const double* row = coefs + static_cast<int64_t>(t.row) * kMetricColumns;
  if (row[0] == 0.0) return;  // unchanged, bit for bit (no step, or a skipped AMP step)
  const double lam = row[0] * t.weight, scale = row[2], eps = row[3];
  const int64_t g = static_cast<int64_t>(blockIdx.x) - batch.group_prefix[j];
  const int64_t n = t.outer * t.inner;
  const GroupIndex index{t.groups * t.inner, g * t.inner, t.inner};
  T* __restrict__ x = static_cast<T*>(t.param);
  const T* __restrict__ v = static_cast<const T*>(t.moment);
  const T* __restrict__ m = static_cast<const T*>(t.mean);
  auto element = [&](int64_t e, double* d) {  // x_e, and its denominator d_e
    const int64_t i = index(e);
    const double mean = kCentered ? static_cast<double>(m[i]) : 0.0;
    *d = metric_denominator<kCentered>(static_cast<double>(v[i]), mean, scale, eps);
    return static_cast<double>(x[i]);
  };

  __shared__ double shared_sums[3];  // sum x^2, sum (d x)^2, max c over the nonzero x
  __shared__ double shared_tau;
  __shared__ int shared_moves;
  SumPair squares{0.0, 0.0}, flags{0.0, 0.0};
  double c_max = 0.0;
  for (int64_t e = threadIdx.x; e < n; e += blockDim.x) {
    double d;
    const double xe = element(e, &d);
    const double c = lam / d;  // +inf where d = 0
    flags.a += is_finite_value(xe) ? 0.0 : 1.0;
    squares.a += xe * xe;
    const double dx = d * xe;
    squares.b += dx * dx;
    if (xe != 0.0 && c > c_max) c_max = c;
  }
  squares = block_sum(squares);
  flags = block_sum(flags);
  c_max = block_max(c_max);
  if (threadIdx.x == 0) {
    shared_sums[0] = squares.a;
    shared_sums[1] = squares.b;
    shared_sums[2] = c_max;
    shared_moves = flags.a == 0.0;  // all finite
  }
  __syncthreads();
  if (!shared_moves) return;  // NaN or inf in the group: unchanged
  if (shared_sums[1] <= lam * lam) {
    for (int64_t e = threadIdx.x; e < n; e += blockDim.x) x[index(e)] = T(0);
    return;
  }
  double tau = group_metric_start(shared_sums[0], shared_sums[2]);
  for (int it = 0; it < kMaxNewtonIterations; ++it) {
    NewtonSums sums;
    for (int64_t e = threadIdx.x; e < n; e += blockDim.x) {
      double d;
      const double xe = element(e, &d);
      add_newton_terms(sums, xe, lam / d, tau);
    }
    SumPair total = block_sum(SumPair{sums.phi, sums.cubes});
    if (threadIdx.x == 0) {
      NewtonSums s;
      s.phi = total.a;
      s.cubes = total.b;
      const double step = newton_step(s);
      shared_moves = newton_moves(step, tau);
      shared_tau = shared_moves ? tau + step : tau;
    }
    __syncthreads();
    const bool moves = shared_moves;
    tau = shared_tau;
    if (!moves) break;
  }
  for (int64_t e = threadIdx.x; e < n; e += blockDim.x) {
    double d;
    const double xe = element(e, &d);
    x[index(e)] = from_double<T>(group_metric_value(xe, lam / d, tau));
  }
}

}  // namespace
}  // namespace cuda

using namespace cuda;

void CudaBackend::prox_group_metric(at::ArrayRef<at::Tensor> dense,
                                    at::ArrayRef<at::Tensor> moments,
                                    at::ArrayRef<at::Tensor> means,
                                    at::ArrayRef<GroupLayout> layouts, const at::Tensor& coefs) {
  if (dense.empty()) return;
  const OnDevice on(dense[0].device());
  const double* rows = coefs.const_data_ptr<double>();
  for (const MetricGroupPlan& plan : plan_metric_groups(dense, moments, means, layouts)) {
    if (plan.num_groups == 0) continue;
    REGEXT_DISPATCH_FLOATING_TYPES(plan.dtype, "prox_group_metric_", [&] {
      launch(means.empty() ? group_metric_kernel<scalar_t, false>
                           : group_metric_kernel<scalar_t, true>,
             plan.num_groups, kGroupMetricThreads, on.stream, plan.batch, rows);
    });
  }
}

}  // namespace regext
