// Groups of the group lasso, and how their work is cut: the L2 term
// sum_g w_g ||x_g||_2 over groups of a tensor's elements instead of the whole
// tensor (Yuan & Lin 2006; Wen et al. 2016, "Learning Structured Sparsity in Deep
// Neural Networks"; Scardapane et al. 2017, "Group sparse regularization for deep
// neural networks").
//
// A group is a slice along one dimension: dim 0 (rows: the output neurons of a
// Linear, the filters of a Conv) or dim 1 (columns: input features, input
// channels). A dense tensor read flat in memory order is then
// [outer, groups, inner]: the element at memory offset o belongs to group
// (o / inner) % groups, because for any dense layout its coordinate along a
// dimension of stride `inner` and size `groups` is exactly that. Memory is a
// sequence of outer * groups "runs" of `inner` elements, run r in group r % groups.
// A tensor with fewer than 2 dims, or grouped along -1, is one group.
//
// The work is a fixed table of items, the same on every backend and for any
// thread count (so results are bitwise reproducible), of two kinds:
// - kRuns (one row of groups, outer == 1, or runs of at least kLongRun elements):
//   an item is one piece of at most kChunkElems elements of a long run, or a
//   range of whole short runs; each piece or run has its own partial-sum slot.
// - kPositions (outer > 1 and short runs, e.g. the columns of a row-major weight):
//   an item is a block of `rows_per_item` outer indices, read once and in memory
//   order, summed per group; each (item, group) has its own slot.
// A group's sums are its slots added in a fixed order (combine_order below).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "chunking.h"

namespace regext {

// Runs at least this long are summed run by run with the contiguous loops;
// shorter ones, repeated over outer > 1, are summed per position.
constexpr int64_t kLongRun = 256;
// A kPositions item covers at least this many periods (outer indices), so that
// its slots (one per group) are at most 1/64 of its elements.
constexpr int64_t kMinRowsPerItem = 64;

enum class GroupWork : int32_t { kRuns = 0, kPositions = 1 };

struct GroupLayout {
  int64_t outer = 1;
  int64_t groups = 1;
  int64_t inner = 0;      // elements of a run
  int64_t first_row = 0;  // the stats row of group 0 (groups occupy consecutive rows)
  double weight = 1.0;    // w_g: 1, or sqrt(elements per group) with sqrt_size

  // How the tensor's work is cut (see the file comment).
  GroupWork work = GroupWork::kRuns;
  int64_t pieces_per_run = 1;  // kRuns with inner > kChunkElems: pieces of one run
  int64_t runs_per_item = 1;   // kRuns with short runs
  int64_t rows_per_item = 1;   // kPositions
  int64_t num_items = 0;
  int64_t num_slots = 0;

  C10_HOST_DEVICE int64_t period() const { return groups * inner; }
  C10_HOST_DEVICE int64_t runs() const { return outer * groups; }
  // kRuns: an item is one piece of a run (else a range of whole runs).
  C10_HOST_DEVICE bool item_is_piece() const { return inner >= kChunkElems; }
};

// The number of groups of a tensor with these sizes grouped along `dim`
// (regext/_groups.py counts them the same way for the fake kernels).
inline int64_t count_groups(const at::Tensor& t, int64_t dim) {
  return (dim < 0 || t.dim() < 2) ? 1 : t.size(dim);
}

// The layout and work table of dense tensor `t` grouped along `dim` (-1: one group).
inline GroupLayout group_layout(const at::Tensor& t, int64_t dim, bool sqrt_size,
                                int64_t first_row) {
  GroupLayout g;
  g.first_row = first_row;
  const int64_t n = t.numel();
  g.groups = count_groups(t, dim);
  g.weight = (sqrt_size && g.groups > 0) ? std::sqrt(static_cast<double>(n / g.groups)) : 1.0;
  if (n == 0) {  // groups of zero elements: no runs, no items, zero sums
    g.outer = 0;
    return g;
  }
  if (g.groups == 1) {
    g.inner = n;
  } else {
    g.inner = t.stride(dim);  // dense: the stride of a dimension of size > 1 is exact
    g.outer = n / (g.groups * g.inner);
  }
  if (g.outer == 1 || g.inner >= kLongRun) {
    g.work = GroupWork::kRuns;
    if (g.inner >= kChunkElems) {
      g.pieces_per_run = (g.inner + kChunkElems - 1) / kChunkElems;
      g.num_items = g.runs() * g.pieces_per_run;
      g.num_slots = g.num_items;  // slot = run * pieces_per_run + piece
    } else {
      g.runs_per_item = std::max<int64_t>(1, kChunkElems / g.inner);
      g.num_items = (g.runs() + g.runs_per_item - 1) / g.runs_per_item;
      g.num_slots = g.runs();  // slot = run
    }
  } else {
    g.work = GroupWork::kPositions;
    g.rows_per_item =
        std::min(g.outer, std::max(kMinRowsPerItem, (kChunkElems + g.period() - 1) / g.period()));
    g.num_items = (g.outer + g.rows_per_item - 1) / g.rows_per_item;
    g.num_slots = g.num_items * g.groups;  // slot = item * groups + group
  }
  return g;
}

// Checks group_dims against a list of `n` tensors: one entry each, -1, 0 or 1.
inline void check_group_dims(const char* op, at::IntArrayRef group_dims, size_t n) {
  TORCH_CHECK_VALUE(group_dims.size() == n, op, ": group_dims has ", group_dims.size(),
                    " entries but there are ", n, " params");
  for (size_t t = 0; t < n; ++t) {
    TORCH_CHECK_VALUE(group_dims[t] >= -1 && group_dims[t] <= 1, op, ": group_dims[", t,
                      "] = ", group_dims[t],
                      "; use -1 (the whole tensor), 0 (rows) or 1 (columns)");
  }
}

// The layouts of a list: group_dims[t] for tensor t, groups placed in list order
// from stats row 0 (or from first_rows[t] when given). Also checks group_dims.
inline std::vector<GroupLayout> group_layouts(const char* op, at::TensorList dense,
                                              at::IntArrayRef group_dims, bool sqrt_size,
                                              at::ArrayRef<int64_t> first_rows = {}) {
  check_group_dims(op, group_dims, dense.size());
  std::vector<GroupLayout> layouts;
  layouts.reserve(dense.size());
  int64_t row = 0;
  for (size_t t = 0; t < dense.size(); ++t) {
    layouts.push_back(
        group_layout(dense[t], group_dims[t], sqrt_size, first_rows.empty() ? row : first_rows[t]));
    row += layouts.back().groups;
  }
  return layouts;
}

// The stats rows all groups of the list occupy when placed in list order.
inline int64_t total_groups(at::ArrayRef<GroupLayout> layouts) {
  int64_t n = 0;
  for (const GroupLayout& l : layouts) n += l.groups;
  return n;
}

// The partial-sum slots of group g of a tensor, in the fixed order they are added:
// fn(slot) for runs g, g + groups, ... (and their pieces), or for items 0, 1, ...
template <typename Fn>
C10_HOST_DEVICE inline void combine_order(const GroupLayout& l, int64_t g, Fn&& fn) {
  if (l.work == GroupWork::kRuns) {
    for (int64_t run = g; run < l.runs(); run += l.groups) {
      for (int64_t p = 0; p < l.pieces_per_run; ++p) fn(run * l.pieces_per_run + p);
    }
  } else {
    for (int64_t item = 0; item < l.num_items; ++item) fn(item * l.groups + g);
  }
}

}  // namespace regext
