// Multi-tensor launches: how a list of tensors travels to one kernel.
//
// A TensorBatch describes up to kMaxTensorsPerLaunch tensors of one dtype
// entirely inside the kernel argument (addresses, 64-bit sizes, output rows
// and a chunk prefix), so a launch needs no host-to-device copy and can be
// captured in a CUDA graph. The grid has one block per chunk: block b works
// on chunk b - chunk_prefix[j] of the tensor j with
// chunk_prefix[j] <= b < chunk_prefix[j + 1] (kChunkElems elements per chunk, as on
// the CPU).
//
// Lessons from earlier multi-tensor code, built in here:
// - sizes and offsets are int64 (tensors beyond 2^31 elements work);
// - every tensor keeps an explicit output row, so skipping or splitting never
//   shifts a result onto the wrong tensor; zero-element tensors stay in the
//   batch with zero chunks and still get their (zero) row written;
// - the capacity is set from the 32 KiB kernel-parameter limit of CUDA 12.1+
//   and checked at compile time; larger lists take more launches, never one
//   launch per tensor.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <limits>
#include <vector>

#include "../chunking.h"

namespace regext::cuda {

constexpr int kMaxTensorsPerLaunch = 1000;

struct TensorBatch {
  const void* inputs[kMaxTensorsPerLaunch];
  void* outputs[kMaxTensorsPerLaunch];  // gradients (backward only)
  int64_t numel[kMaxTensorsPerLaunch];
  int32_t row[kMaxTensorsPerLaunch];    // stats row of each tensor
  int32_t chunk_prefix[kMaxTensorsPerLaunch + 1];
  int32_t num_tensors;
};

// Kernel parameters may total 32764 bytes (CUDA 12.1+, sm_70+); leave room
// for the scalar arguments that travel beside the batch.
static_assert(sizeof(TensorBatch) <= 32764 - 256, "TensorBatch exceeds the parameter limit");

struct BatchPlan {
  TensorBatch batch;
  c10::ScalarType dtype;
  int64_t num_chunks;   // chunk_prefix[num_tensors]
  int64_t chunk_base;   // first slot of this batch in a shared partial-sums buffer
};

// The dtypes of a list, each once, in the order they first appear: batches are
// planned dtype by dtype in this order.
inline std::vector<c10::ScalarType> dtypes_in_list_order(at::ArrayRef<at::Tensor> tensors) {
  std::vector<c10::ScalarType> dtypes;
  for (const auto& t : tensors) {
    bool seen = false;
    for (auto d : dtypes) seen = seen || d == t.scalar_type();
    if (!seen) dtypes.push_back(t.scalar_type());
  }
  return dtypes;
}

// Groups tensors by dtype (first-seen order), then cuts each group into
// batches of at most kMaxTensorsPerLaunch tensors and INT32_MAX chunks.
// `outputs`, when non-empty, must be parallel to `inputs`.
inline std::vector<BatchPlan> plan_batches(at::ArrayRef<at::Tensor> inputs,
                                           at::ArrayRef<at::Tensor> outputs,
                                           at::ArrayRef<int64_t> rows) {
  const std::vector<c10::ScalarType> dtypes = dtypes_in_list_order(inputs);
  std::vector<BatchPlan> plans;
  int64_t chunk_base = 0;
  for (auto dtype : dtypes) {
    BatchPlan* plan = nullptr;
    for (size_t t = 0; t < inputs.size(); ++t) {
      if (inputs[t].scalar_type() != dtype) continue;
      const int64_t chunks = (inputs[t].numel() + kChunkElems - 1) / kChunkElems;
      TORCH_CHECK(chunks < std::numeric_limits<int32_t>::max(), "regext: tensor too large");
      if (plan == nullptr || plan->batch.num_tensors == kMaxTensorsPerLaunch ||
          plan->num_chunks + chunks > std::numeric_limits<int32_t>::max()) {
        if (plan != nullptr) chunk_base += plan->num_chunks;
        plans.emplace_back();
        plan = &plans.back();
        plan->batch.num_tensors = 0;
        plan->batch.chunk_prefix[0] = 0;
        plan->dtype = dtype;
        plan->num_chunks = 0;
        plan->chunk_base = chunk_base;
      }
      TensorBatch& b = plan->batch;
      const int j = b.num_tensors++;
      b.inputs[j] = inputs[t].const_data_ptr();
      b.outputs[j] = outputs.empty() ? nullptr : outputs[t].data_ptr();
      b.numel[j] = inputs[t].numel();
      b.row[j] = static_cast<int32_t>(rows[t]);
      plan->num_chunks += chunks;
      b.chunk_prefix[j + 1] = static_cast<int32_t>(plan->num_chunks);
    }
    if (plan != nullptr) chunk_base += plan->num_chunks;
  }
  return plans;
}

// Rows 0..n-1: each tensor's result lands in its own position.
inline std::vector<int64_t> identity_rows(size_t n) {
  std::vector<int64_t> rows(n);
  for (size_t t = 0; t < n; ++t) rows[t] = static_cast<int64_t>(t);
  return rows;
}

inline int64_t total_chunks(const std::vector<BatchPlan>& plans) {
  int64_t n = 0;
  for (const auto& p : plans) n += p.num_chunks;
  return n;
}

// The largest j with prefix[j] <= index (zero-width tensors are never
// chosen): the tensor of a block in launches planned by prefix sums of items or groups.
__device__ __forceinline__ int owner_of(const int32_t* prefix, int num_tensors, int64_t index) {
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

// The tensor that owns chunk `chunk` of this launch: the largest j with
// chunk_prefix[j] <= chunk. Zero-chunk tensors share their prefix with the
// next tensor and are never chosen. Same answer in every thread: broadcast
// reads of the parameter bank.
// Any batch with num_tensors, numel and chunk_prefix laid out as TensorBatch's.
template <typename Batch>
__device__ __forceinline__ int owner_of_chunk(const Batch& b, int32_t chunk) {
  int lo = 0, hi = b.num_tensors - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (b.chunk_prefix[mid] <= chunk) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// The chunk of this block (one block per chunk): its tensor, where it starts in
// that tensor, and its length (kChunkElems, less for a tensor's last chunk).
struct ChunkSpan {
  int tensor;
  int64_t begin;
  int length;
};

template <typename Batch>
__device__ __forceinline__ ChunkSpan chunk_of_block(const Batch& batch) {
  const int32_t chunk = static_cast<int32_t>(blockIdx.x);
  const int j = owner_of_chunk(batch, chunk);
  const int64_t begin = static_cast<int64_t>(chunk - batch.chunk_prefix[j]) * kChunkElems;
  return {j, begin, static_cast<int>(min(kChunkElems, batch.numel[j] - begin))};
}

}  // namespace regext::cuda
