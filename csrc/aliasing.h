// Memory aliasing between the tensors of one list, for the in-place operators.
//
// The in-place operators (penalty_grad_accumulate_, prox_l1_, prox_group_l2_)
// are defined to act on their list *in order*, exactly as a loop that calls
// the operator once per tensor would: a tensor listed twice is updated twice,
// and a view overlapping an earlier entry sees that entry's update. Kernels
// get this by splitting the list into consecutive runs in which no two tensors
// share memory and processing the runs one after another; within a run every
// chunk may run concurrently. Without any aliasing (the usual case) the whole
// list is one run. Host-side only; it compares addresses, so it serves any
// device.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

namespace regext {

// [first byte, one past the last byte) that a strided tensor can touch; an
// empty range for a tensor without elements.
inline std::pair<uintptr_t, uintptr_t> byte_span(const at::Tensor& t) {
  if (t.numel() == 0) return {0, 0};
  int64_t extent = 1;  // in elements, from the first one
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (t.size(d) > 1) extent += (t.size(d) - 1) * std::max<int64_t>(t.stride(d), 0);
  }
  const auto begin = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  return {begin, begin + static_cast<uintptr_t>(extent * t.element_size())};
}

inline bool spans_overlap(const std::pair<uintptr_t, uintptr_t>& a,
                          const std::pair<uintptr_t, uintptr_t>& b) {
  return a.first < a.second && b.first < b.second && a.first < b.second &&
         b.first < a.second;
}

// Boundaries [0, b1, ..., n] of the consecutive runs of `tensors` in which no
// two tensors' memory spans overlap. The test is conservative (two interleaved
// views such as x[::2] and x[1::2] land in different runs), which only costs
// time, never correctness.
inline std::vector<size_t> alias_free_runs(at::TensorList tensors) {
  const size_t n = tensors.size();
  std::vector<std::pair<uintptr_t, uintptr_t>> spans(n);
  for (size_t i = 0; i < n; ++i) spans[i] = byte_span(tensors[i]);

  // Fast path: sort the non-empty spans; if no neighbours overlap, nothing does.
  std::vector<std::pair<uintptr_t, uintptr_t>> sorted;
  sorted.reserve(n);
  for (const auto& s : spans) {
    if (s.first < s.second) sorted.push_back(s);
  }
  std::sort(sorted.begin(), sorted.end());
  bool any_overlap = false;
  for (size_t i = 1; i < sorted.size() && !any_overlap; ++i) {
    any_overlap = sorted[i].first < sorted[i - 1].second;
  }
  if (!any_overlap) return {0, n};

  // Greedy: start a new run at the first tensor that overlaps one in the current run.
  std::vector<size_t> bounds{0};
  for (size_t i = 1; i < n; ++i) {
    for (size_t j = bounds.back(); j < i; ++j) {
      if (spans_overlap(spans[i], spans[j])) {
        bounds.push_back(i);
        break;
      }
    }
  }
  bounds.push_back(n);
  return bounds;
}

}  // namespace regext
