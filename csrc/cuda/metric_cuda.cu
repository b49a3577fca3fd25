// CUDA backend of the proximal step in an optimizer's metric (prox_metric_;
// interface: csrc/backend.h; formulas: csrc/penalty_math.h). One block per
// 32Ki-element chunk of any tensor, as prox_cuda.cu, with three addresses per
// tensor (the parameter, its second moments, its means or none), so a batch holds
// fewer tensors than a TensorBatch. Each block reads its tensor's coefficient row
// on the device (the row that AMP's found_inf zeroed leaves the tensor untouched);
// nothing here synchronizes with the host. float32/float16/bfloat16 parameters are
// stepped in float32 wherever that provably agrees with float64 (penalty_math.h:
// all but the coordinates within 12.5% above their threshold), the rest in float64:
// a square root and one or two divisions per element, which GPUs with 1/32-1/64 of
// the FP32 rate in FP64 feel only where many coordinates sit near their threshold.
#include <ATen/ATen.h>

#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "../backend.h"
#include "../compute_types.h"
#include "../penalty_math.h"
#include "launch.cuh"
#include "tensor_batch.cuh"

namespace regext {
namespace cuda {
namespace {

constexpr int kMaxMetricTensors = 800;

// Up to kMaxMetricTensors tensors of one dtype, in the kernel argument.
struct MetricBatch {
  void* params[kMaxMetricTensors];
  const void* moments[kMaxMetricTensors];
  const void* means[kMaxMetricTensors];  // null without means
  int64_t numel[kMaxMetricTensors];
  int32_t row[kMaxMetricTensors];  // the tensor's row of coefs
  int32_t chunk_prefix[kMaxMetricTensors + 1];
  int32_t num_tensors;
};
static_assert(sizeof(MetricBatch) <= 32764 - 256, "MetricBatch exceeds the parameter limit");

struct MetricBatchPlan {
  MetricBatch batch;
  c10::ScalarType dtype;
  int64_t num_chunks;
};

// Tensors grouped by dtype (first-seen order), then cut into batches of at most
// kMaxMetricTensors tensors and INT32_MAX chunks; row t of coefs stays with tensor t.
std::vector<MetricBatchPlan> plan_metric_batches(at::ArrayRef<at::Tensor> dense,
                                                 at::ArrayRef<at::Tensor> moments,
                                                 at::ArrayRef<at::Tensor> means) {
  constexpr int64_t kMax32 = std::numeric_limits<int32_t>::max();
  const std::vector<c10::ScalarType> dtypes = dtypes_in_list_order(dense);
  std::vector<MetricBatchPlan> plans;
  for (auto dtype : dtypes) {
    MetricBatchPlan* plan = nullptr;
    for (size_t t = 0; t < dense.size(); ++t) {
      if (dense[t].scalar_type() != dtype) continue;
      const int64_t chunks = (dense[t].numel() + kChunkElems - 1) / kChunkElems;
      TORCH_CHECK(chunks < kMax32, "regext: tensor too large");
      if (plan == nullptr || plan->batch.num_tensors == kMaxMetricTensors ||
          plan->num_chunks + chunks > kMax32) {
        plans.emplace_back();
        plan = &plans.back();
        plan->batch.num_tensors = 0;
        plan->batch.chunk_prefix[0] = 0;
        plan->dtype = dtype;
        plan->num_chunks = 0;
      }
      MetricBatch& b = plan->batch;
      const int j = b.num_tensors++;
      b.params[j] = dense[t].data_ptr();
      b.moments[j] = moments[t].const_data_ptr();
      b.means[j] = means.empty() ? nullptr : means[t].const_data_ptr();
      b.numel[j] = dense[t].numel();
      b.row[j] = static_cast<int32_t>(t);
      plan->num_chunks += chunks;
      b.chunk_prefix[j + 1] = static_cast<int32_t>(plan->num_chunks);
    }
  }
  return plans;
}

template <typename T, bool kCentered>
__global__ void __launch_bounds__(kBlockThreads)
    metric_prox_kernel(const __grid_constant__ MetricBatch batch, const double* __restrict__ coefs) {
  const ChunkSpan span = chunk_of_block(batch);
  const double* row = coefs + static_cast<int64_t>(batch.row[span.tensor]) * kMetricColumns;
  const MetricCoefs c{row[0], row[1], row[2], row[3]};
  if (c.is_identity()) return;  // unchanged, bit for bit (a skipped AMP step)
  T* __restrict__ x = static_cast<T*>(batch.params[span.tensor]) + span.begin;
  const T* __restrict__ v = static_cast<const T*>(batch.moments[span.tensor]) + span.begin;
  const T* __restrict__ m =
      kCentered ? static_cast<const T*>(batch.means[span.tensor]) + span.begin : nullptr;
  // float32 where it provably agrees with float64 (penalty_math.h), as the CPU does.
  constexpr bool kMayUseFloat = !kCentered && !std::is_same<T, double>::value;
  const bool use_float = kMayUseFloat && metric_fits_float(c);
  const MetricCoefsFloat cf = metric_coefs_float(c);
#pragma unroll 4
  for (int i = threadIdx.x; i < span.length; i += blockDim.x) {
    if (use_float) {
      float y;
      if (metric_prox_float(static_cast<float>(x[i]), static_cast<float>(v[i]), cf, &y)) {
        x[i] = static_cast<T>(y);
        continue;
      }
    }
    const double mean = kCentered ? static_cast<double>(m[i]) : 0.0;
    const double d = metric_denominator<kCentered>(static_cast<double>(v[i]), mean, c.scale, c.eps);
    x[i] = from_double<T>(metric_prox(static_cast<double>(x[i]), d, c));
  }
}

}  // namespace
}  // namespace cuda

using namespace cuda;

void CudaBackend::prox_metric(at::ArrayRef<at::Tensor> dense, at::ArrayRef<at::Tensor> moments,
                              at::ArrayRef<at::Tensor> means, const at::Tensor& coefs) {
  if (dense.empty()) return;
  const OnDevice on(dense[0].device());
  const double* rows = coefs.const_data_ptr<double>();
  for (const MetricBatchPlan& plan : plan_metric_batches(dense, moments, means)) {
    if (plan.num_chunks == 0) continue;
    REGEXT_DISPATCH_FLOATING_TYPES(plan.dtype, "prox_metric_", [&] {
      launch(means.empty() ? metric_prox_kernel<scalar_t, false> : metric_prox_kernel<scalar_t, true>,
             plan.num_chunks, kBlockThreads, on.stream, plan.batch, rows);
    });
  }
}

}  // namespace regext
