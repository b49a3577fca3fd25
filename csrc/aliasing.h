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
//
// Cost: O(n log n) in the list length whatever the overlaps (one sort, then
// ordered-set lookups for the tensors that overlap another). An earlier greedy
// compared each tensor with every tensor of its run, O(n^2) as soon as any two
// overlapped: one duplicate in 50k tensors of 20 floats made prox_l1_ 10x
// slower (113 -> 1216 ms), the planning dwarfing the kernels.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <iterator>
#include <map>
#include <utility>
#include <vector>

namespace regext {

// [first byte, one past the last byte) of memory; empty when first >= second.
using ByteSpan = std::pair<uintptr_t, uintptr_t>;

// The span a strided tensor can touch; an empty range for a tensor without
// elements.
inline ByteSpan byte_span(const at::Tensor& t) {
  if (t.numel() == 0) return {0, 0};
  int64_t extent = 1;  // in elements, from the first one
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (t.size(d) > 1) extent += (t.size(d) - 1) * std::max<int64_t>(t.stride(d), 0);
  }
  const auto begin = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  return {begin, begin + static_cast<uintptr_t>(extent * t.element_size())};
}

inline bool span_is_empty(const ByteSpan& s) { return !(s.first < s.second); }

inline std::vector<ByteSpan> byte_spans(at::TensorList tensors) {
  std::vector<ByteSpan> spans(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) spans[i] = byte_span(tensors[i]);
  return spans;
}

// True when no two non-empty spans overlap, in O(n log n): sorted by begin,
// if no two neighbours overlap nothing does (each span then ends at or before
// the next one begins, so at or before every later one begins).
inline bool spans_pairwise_disjoint(std::vector<ByteSpan> spans) {
  spans.erase(std::remove_if(spans.begin(), spans.end(), span_is_empty), spans.end());
  std::sort(spans.begin(), spans.end());
  for (size_t i = 1; i < spans.size(); ++i) {
    if (spans[i].first < spans[i - 1].second) return false;
  }
  return true;
}

// True when no two tensors of the list share memory (same conservative test
// as alias_free_runs: one run).
inline bool no_tensors_overlap(at::TensorList tensors) {
  return spans_pairwise_disjoint(byte_spans(tensors));
}

// Pairwise disjoint non-empty spans, ordered by begin: one run's tensors.
// Because they are disjoint, ordering by begin also orders them by end, so of
// the members that begin before a span ends, the last one reaches furthest:
// a span overlaps some member iff it overlaps that one. One lookup, O(log n),
// where comparing against every member made the greedy below O(n^2).
class DisjointSpans {
 public:
  // Adds `s` unless it overlaps a member; false (and no change) if it does.
  // An empty span overlaps nothing and is not stored.
  bool insert_if_disjoint(const ByteSpan& s) {
    if (span_is_empty(s)) return true;
    const auto next = end_by_begin_.lower_bound(s.second);  // first to begin at or after s's end
    if (next != end_by_begin_.begin() && std::prev(next)->second > s.first) return false;
    // Disjoint: s belongs right before `next` (its predecessor ends by s.first),
    // so the hint is exact and the insertion costs no second search.
    end_by_begin_.emplace_hint(next, s.first, s.second);
    return true;
  }
  void clear() { end_by_begin_.clear(); }

 private:
  std::map<uintptr_t, uintptr_t> end_by_begin_;
};

// Which spans overlap at least one other span of the list, in O(n log n): a
// span that overlaps nothing can neither start a run nor be the reason another
// one does, so the greedy below skips it. Sorted by begin, span r overlaps an
// earlier-sorted one iff the furthest end before it passes its begin, and a
// later-sorted one iff the next begin lies before its end.
inline std::vector<char> overlaps_another(const std::vector<ByteSpan>& spans) {
  struct Indexed {
    ByteSpan span;
    size_t index;
  };
  std::vector<Indexed> sorted;
  sorted.reserve(spans.size());
  for (size_t i = 0; i < spans.size(); ++i) {
    if (!span_is_empty(spans[i])) sorted.push_back({spans[i], i});
  }
  std::sort(sorted.begin(), sorted.end(),
            [](const Indexed& a, const Indexed& b) { return a.span < b.span; });
  std::vector<char> flagged(spans.size(), 0);
  uintptr_t reach = 0;  // the furthest end of the spans sorted before r
  for (size_t r = 0; r < sorted.size(); ++r) {
    const ByteSpan& s = sorted[r].span;
    flagged[sorted[r].index] = (r > 0 && reach > s.first) ||
                               (r + 1 < sorted.size() && sorted[r + 1].span.first < s.second);
    reach = std::max(reach, s.second);
  }
  return flagged;
}

// Boundaries [0, b1, ..., n] of the consecutive runs of `tensors` in which no
// two tensors' memory spans overlap. The test is conservative (two interleaved
// views such as x[::2] and x[1::2] land in different runs), which only costs
// time, never correctness.
inline std::vector<size_t> alias_free_runs(at::TensorList tensors) {
  const size_t n = tensors.size();
  const std::vector<ByteSpan> spans = byte_spans(tensors);
  const std::vector<char> flagged = overlaps_another(spans);
  // Fast path (the usual case): nothing overlaps, one run, no ordered set built.
  if (std::find(flagged.begin(), flagged.end(), char{1}) == flagged.end()) return {0, n};

  // Greedy: start a new run at the first tensor that overlaps one in the
  // current run. Only flagged spans take part, which gives the same
  // boundaries (the others overlap nothing) and keeps the ordered set as small
  // as the aliasing: two entries for one duplicate in 100k tensors. The run's
  // spans are pairwise disjoint by construction, which is what DisjointSpans
  // needs; a new run starts from an empty set.
  std::vector<size_t> bounds{0};
  DisjointSpans run;
  for (size_t i = 0; i < n; ++i) {
    if (!flagged[i]) continue;
    if (!run.insert_if_disjoint(spans[i])) {
      bounds.push_back(i);
      run.clear();
      run.insert_if_disjoint(spans[i]);  // into the empty set: always succeeds
    }
  }
  bounds.push_back(n);
  return bounds;
}

}  // namespace regext
