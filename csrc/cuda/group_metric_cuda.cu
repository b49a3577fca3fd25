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
  const std::vector<c10::ScalarType> dtypes = dtypes_in_list_order(dense);
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
  const int j = owner_of(batch.group_prefix, batch.num_tensors, blockIdx.x);
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

  // The start sums (group_metric_math.h), block-wide; thread 0 decides for the block.
  __shared__ double shared_tau;
  __shared__ int shared_state;
  GroupMetricStart start;
  for (int64_t e = threadIdx.x; e < n; e += blockDim.x) {
    double d;
    const double xe = element(e, &d);
    add_start_terms(start, xe, d, lam / d);  // c = +inf where d = 0, 0 where d = +inf
  }
  const SumPair squares = block_sum(SumPair{start.sum_sq, start.sum_sq_dx});
  const SumPair counts = block_sum(SumPair{start.bad_x, start.nan_d});
  const double c_max = block_max(start.c_max);
  const double best_single = block_max(start.best_single);  // each >= 0: block_max's fill
  if (threadIdx.x == 0) {
    GroupMetricStart total;
    total.sum_sq = squares.a;
    total.sum_sq_dx = squares.b;
    total.c_max = c_max;
    total.best_single = best_single;
    total.bad_x = counts.a;
    total.nan_d = counts.b;
    shared_state = static_cast<int>(group_metric_case(total, lam));
    shared_tau = group_metric_start(total);
  }
  __syncthreads();
  const auto what = static_cast<GroupMetricCase>(shared_state);
  if (what == GroupMetricCase::kUnchanged) return;
  if (what != GroupMetricCase::kSolve) {
    const T fill = from_double<T>(what == GroupMetricCase::kZero
                                      ? 0.0
                                      : std::numeric_limits<double>::quiet_NaN());
    for (int64_t e = threadIdx.x; e < n; e += blockDim.x) x[index(e)] = fill;
    return;
  }
  // Newton's iterations: 1 = moved, 0 = converged, -1 = the sums left float64's range.
  double tau = shared_tau;
  for (int it = 0; it < kMaxNewtonIterations; ++it) {
    NewtonSums sums;
    for (int64_t e = threadIdx.x; e < n; e += blockDim.x) {
      double d;
      const double xe = element(e, &d);
      add_newton_terms(sums, xe, lam / d, tau);
    }
    const SumPair total = block_sum(SumPair{sums.phi, sums.cubes});
    if (threadIdx.x == 0) {
      NewtonSums s;
      s.phi = total.a;
      s.cubes = total.b;
      const double step = newton_step(s);
      shared_state = newton_failed(step) ? -1 : newton_moves(step, tau) ? 1 : 0;
      if (shared_state == 1) shared_tau = tau + step;
    }
    __syncthreads();
    const int state = shared_state;
    tau = shared_tau;
    if (state == -1) return;  // unchanged
    if (state == 0) break;
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
