// CPU backend of the group lasso operators (interface: csrc/backend.h; groups
// and the work table: csrc/groups.h).
//
// One parallel pass over the work items of all tensors writes per-item partial
// sums into slots; a short serial pass adds each group's slots in their fixed
// order (combine_order). Items never depend on the thread count, so results
// are bitwise identical for any torch.get_num_threads(). The gradient and the
// proximal step are one more pass over the same items, elementwise.
#include <ATen/ATen.h>

#include <vector>

#include "../backend.h"
#include "../groups.h"
#include "../penalty_math.h"
#include "cpu_common.h"
#include "vector_loops.h"

namespace regext {
namespace {

// Every work item of every tensor: (tensor, item index within the tensor).
struct ItemTable {
  std::vector<int64_t> tensor_of, item_of;
  std::vector<int64_t> first_slot;  // per tensor: its slots in the shared slot array
  int64_t num_slots = 0;
};

ItemTable make_item_table(at::ArrayRef<GroupLayout> layouts) {
  ItemTable table;
  table.first_slot.reserve(layouts.size());
  for (size_t t = 0; t < layouts.size(); ++t) {
    table.first_slot.push_back(table.num_slots);
    table.num_slots += layouts[t].num_slots;
    for (int64_t k = 0; k < layouts[t].num_items; ++k) {
      table.tensor_of.push_back(static_cast<int64_t>(t));
      table.item_of.push_back(k);
    }
  }
  return table;
}

// fn(tensor, item) for every item, spread over threads as for_each_chunk does.
template <typename Fn>
void for_each_item(at::ArrayRef<at::Tensor> dense, const ItemTable& table, Fn&& fn) {
  const int64_t num_items = static_cast<int64_t>(table.tensor_of.size());
  at::parallel_for(0, num_items, cpu::grain_for(num_items, cpu::total_numel(dense)), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) fn(table.tensor_of[i], table.item_of[i]);
  });
}

// The elements item k of a kRuns layout covers: fn(offset, length) per run or piece,
// with the slot it owns.
template <typename Fn>
void for_each_run_of_item(const GroupLayout& l, int64_t k, Fn&& fn) {
  if (l.item_is_piece()) {
    const int64_t run = k / l.pieces_per_run, piece = k % l.pieces_per_run;
    const int64_t begin = piece * kChunkElems;
    fn(run * l.inner + begin, std::min(kChunkElems, l.inner - begin), /*slot=*/k, run);
    return;
  }
  const int64_t end = std::min(l.runs(), (k + 1) * l.runs_per_item);
  for (int64_t run = k * l.runs_per_item; run < end; ++run) fn(run * l.inner, l.inner, run, run);
}

// The rows [o0, o1) of kPositions item k.
inline std::pair<int64_t, int64_t> rows_of_item(const GroupLayout& l, int64_t k) {
  const int64_t o0 = k * l.rows_per_item;
  return {o0, std::min(l.outer, o0 + l.rows_per_item)};
}

// The partial sums of item k of a tensor with layout l into its slots `out`.
template <typename T>
void item_sums(const GroupLayout& l, int64_t k, const T* x, bool exact, cpu::AbsSqSums* out) {
  const auto& loops = cpu::loops_for<T>();
  if (l.work == GroupWork::kRuns) {
    for_each_run_of_item(l, k, [&](int64_t offset, int64_t length, int64_t slot, int64_t) {
      out[slot] = loops.abs_sq_sums(x + offset, length, exact);
    });
    return;
  }
  // Per position over the item's rows, in float64, then per group.
  const auto [o0, o1] = rows_of_item(l, k);
  const int64_t period = l.period();
  std::vector<double> abs_acc(period, 0.0), sq_acc(period, 0.0);
  for (int64_t o = o0; o < o1; ++o) {
    loops.abs_sq_accumulate(x + o * period, period, abs_acc.data(), sq_acc.data());
  }
  for (int64_t g = 0; g < l.groups; ++g) {
    cpu::AbsSqSums sums;
    for (int64_t i = g * l.inner; i < (g + 1) * l.inner; ++i) {
      sums.abs += abs_acc[i];
      sums.sq += sq_acc[i];
    }
    out[k * l.groups + g] = sums;
  }
}

// stats[first_row + g] for every group; `exact`: float64 sums for every dtype (as the
// per-tensor pass does where the result is float64, i.e. any tensor is float64).
void group_stats(at::ArrayRef<at::Tensor> dense, at::ArrayRef<GroupLayout> layouts,
                 const at::Tensor& stats, bool exact) {
  const ItemTable table = make_item_table(layouts);
  std::vector<cpu::AbsSqSums> slots(table.num_slots);
  for_each_item(dense, table, [&](int64_t t, int64_t k) {
    REGEXT_DISPATCH_FLOATING_TYPES(dense[t].scalar_type(), "group_penalty_forward", [&] {
      item_sums(layouts[t], k, static_cast<const scalar_t*>(dense[t].const_data_ptr()), exact,
                slots.data() + table.first_slot[t]);
    });
  });

  double* rows = stats.data_ptr<double>();
  for (size_t t = 0; t < layouts.size(); ++t) {
    const GroupLayout& l = layouts[t];
    const cpu::AbsSqSums* in = slots.data() + table.first_slot[t];
    for (int64_t g = 0; g < l.groups; ++g) {
      double abs_sum = 0.0, sq_sum = 0.0;
      combine_order(l, g, [&](int64_t slot) {
        abs_sum += in[slot].abs;
        sq_sum += in[slot].sq;
      });
      rows[(l.first_row + g) * kStatsColumns + 0] = abs_sum;
      rows[(l.first_row + g) * kStatsColumns + 1] = sq_sum;
    }
  }
}

// l1 * sum |x| + l2 * sum_g w_g ||x_g||_2 over every group, into the 0-dim total.
void write_group_total(at::ArrayRef<GroupLayout> layouts, const at::Tensor& stats,
                       const at::Tensor& total, double l1, double l2) {
  const double* s = stats.const_data_ptr<double>();
  PenaltyTotals totals;
  for (const GroupLayout& l : layouts) {
    for (int64_t g = l.first_row; g < l.first_row + l.groups; ++g) {
      totals.sum_l1 += s[g * kStatsColumns + 0];
      totals.sum_l2 += l.weight * l2_term(s[g * kStatsColumns + 1], /*l2_squared=*/false);
    }
  }
  cpu::fill_total(total, totals.combine(l1, l2));
}

// Per-position copies of per-group values for kPositions layouts: value_of(g) at
// every position of group g in one period.
template <typename ValueOf>
std::vector<double> by_position(const GroupLayout& l, ValueOf&& value_of) {
  std::vector<double> out(l.period());
  for (int64_t g = 0; g < l.groups; ++g) {
    const double v = value_of(g);
    for (int64_t i = g * l.inner; i < (g + 1) * l.inner; ++i) out[i] = v;
  }
  return out;
}

}  // namespace

void CpuBackend::group_stats_and_total(at::ArrayRef<at::Tensor> dense,
                                       at::ArrayRef<GroupLayout> layouts, const at::Tensor& stats,
                                       const at::Tensor& total, const at::Tensor& l1,
                                       const at::Tensor& l2) {
  group_stats(dense, layouts, stats, cpu::any_float64(dense));
  write_group_total(layouts, stats, total, l1.item<double>(), l2.item<double>());
}

void CpuBackend::group_grads(const GroupGradRequest& r) {
  const double grad_total = r.grad_total.item<double>();
  const double l1 = r.l1.item<double>(), l2 = r.l2.item<double>();
  const double* stats = r.stats.const_data_ptr<double>();
  auto coefficients = [&](const GroupLayout& l, int64_t g) {
    return grad_coefficients(grad_total, stats[(l.first_row + g) * kStatsColumns + 1], l1,
                             l2 * l.weight, /*l2_squared=*/false);
  };
  // Each group's coefficients, per position for kPositions layouts.
  std::vector<std::vector<GradCoefficients>> per_group(r.dense.size());
  std::vector<std::vector<double>> linear_coef(r.dense.size()), linear_scale(r.dense.size());
  for (size_t t = 0; t < r.dense.size(); ++t) {
    const GroupLayout& l = r.layouts[t];
    if (l.num_items == 0) continue;
    per_group[t].resize(l.groups);
    for (int64_t g = 0; g < l.groups; ++g) per_group[t][g] = coefficients(l, g);
    if (l.work == GroupWork::kPositions) {
      linear_coef[t] = by_position(l, [&](int64_t g) { return per_group[t][g].linear_coef; });
      linear_scale[t] = by_position(l, [&](int64_t g) { return per_group[t][g].linear_scale; });
    }
  }
  const double sign_coef = grad_total * l1;
  const ItemTable table = make_item_table(r.layouts);
  for_each_item(r.dense, table, [&](int64_t t, int64_t k) {
    const GroupLayout& l = r.layouts[t];
    REGEXT_DISPATCH_FLOATING_TYPES(r.dense[t].scalar_type(), "group_penalty_backward", [&] {
      const auto* x = static_cast<const scalar_t*>(r.dense[t].const_data_ptr());
      auto* out = static_cast<scalar_t*>(r.targets[t].data_ptr());
      const auto& loops = cpu::loops_for<scalar_t>();
      if (l.work == GroupWork::kRuns) {
        for_each_run_of_item(l, k, [&](int64_t offset, int64_t length, int64_t, int64_t run) {
          const GradCoefficients& c = per_group[t][run % l.groups];
          loops.penalty_grad(x + offset, out + offset, length, c.sign_coef, c.linear_coef,
                             c.linear_scale, r.accumulate);
        });
        return;
      }
      const auto [o0, o1] = rows_of_item(l, k);
      const int64_t period = l.period();
      for (int64_t o = o0; o < o1; ++o) {
        loops.penalty_grad_by_position(x + o * period, out + o * period, period, sign_coef,
                                       linear_coef[t].data(), linear_scale[t].data(), r.accumulate);
      }
    });
  });
}

namespace {

// Whether each group of a tensor is one run held by a single item (a row shorter
// than a chunk, or a whole small tensor): then the proximal step scales each run
// right after summing it, while it is in cache, so memory is read once, not twice.
// The sums are the same calls as group_stats', so the result is the same bits.
bool shrinks_run_by_run(const GroupLayout& l) {
  return l.work == GroupWork::kRuns && l.outer == 1 && !l.item_is_piece();
}

// The proximal step of the tensors whose groups shrink run by run (one pass).
void prox_run_by_run(at::ArrayRef<at::Tensor> dense, at::ArrayRef<GroupLayout> layouts,
                     double threshold, bool exact) {
  const ItemTable table = make_item_table(layouts);
  for_each_item(dense, table, [&](int64_t t, int64_t k) {
    const GroupLayout& l = layouts[t];
    REGEXT_DISPATCH_FLOATING_TYPES(dense[t].scalar_type(), "prox_group_lasso_", [&] {
      auto* x = static_cast<scalar_t*>(dense[t].data_ptr());
      const auto& loops = cpu::loops_for<scalar_t>();
      for_each_run_of_item(l, k, [&](int64_t offset, int64_t length, int64_t, int64_t) {
        const double sum_sq = loops.sq_sum(x + offset, length, exact);
        const double scale = group_shrink_scale(sum_sq, threshold * l.weight);
        if (scale != 1.0) loops.scale_(x + offset, length, scale);  // 1: unchanged, bit for bit
      });
    });
  });
}

// The proximal step of any tensors: their group norms first (group_stats), then one
// scaling pass.
void prox_from_stats(at::ArrayRef<at::Tensor> dense, std::vector<GroupLayout> layouts,
                     double threshold, bool exact) {
  int64_t rows = 0;
  for (GroupLayout& l : layouts) {  // these tensors' groups, from stats row 0
    l.first_row = rows;
    rows += l.groups;
  }
  const at::Tensor stats = at::empty({rows, kStatsColumns}, at::kDouble);
  group_stats(dense, layouts, stats, exact);
  const double* s = stats.const_data_ptr<double>();
  std::vector<std::vector<double>> scales(dense.size()), position_scales(dense.size());
  for (size_t t = 0; t < dense.size(); ++t) {
    const GroupLayout& l = layouts[t];
    if (l.num_items == 0) continue;
    scales[t].resize(l.groups);
    for (int64_t g = 0; g < l.groups; ++g) {
      scales[t][g] =
          group_shrink_scale(s[(l.first_row + g) * kStatsColumns + 1], threshold * l.weight);
    }
    if (l.work == GroupWork::kPositions) {
      position_scales[t] = by_position(l, [&](int64_t g) { return scales[t][g]; });
    }
  }
  const ItemTable table = make_item_table(layouts);
  for_each_item(dense, table, [&](int64_t t, int64_t k) {
    const GroupLayout& l = layouts[t];
    REGEXT_DISPATCH_FLOATING_TYPES(dense[t].scalar_type(), "prox_group_lasso_", [&] {
      auto* x = static_cast<scalar_t*>(dense[t].data_ptr());
      const auto& loops = cpu::loops_for<scalar_t>();
      if (l.work == GroupWork::kRuns) {
        for_each_run_of_item(l, k, [&](int64_t offset, int64_t length, int64_t, int64_t run) {
          const double scale = scales[t][run % l.groups];
          if (scale != 1.0) loops.scale_(x + offset, length, scale);  // 1: unchanged, bit for bit
        });
        return;
      }
      const auto [o0, o1] = rows_of_item(l, k);
      const int64_t period = l.period();
      for (int64_t o = o0; o < o1; ++o) {
        loops.scale_by_position_(x + o * period, period, position_scales[t].data());
      }
    });
  });
}

}  // namespace

void CpuBackend::prox_group_lasso(at::ArrayRef<at::Tensor> dense, at::ArrayRef<GroupLayout> layouts,
                                  const at::Tensor& threshold_tensor) {
  const double threshold = threshold_tensor.item<double>();
  const bool exact = cpu::any_float64(dense);  // the sums group_penalty_forward would use
  std::vector<at::Tensor> one_pass, two_pass;
  std::vector<GroupLayout> one_pass_layouts, two_pass_layouts;
  for (size_t t = 0; t < dense.size(); ++t) {
    const bool fused = shrinks_run_by_run(layouts[t]);
    (fused ? one_pass : two_pass).push_back(dense[t]);
    (fused ? one_pass_layouts : two_pass_layouts).push_back(layouts[t]);
  }
  if (!one_pass.empty()) prox_run_by_run(one_pass, one_pass_layouts, threshold, exact);
  if (!two_pass.empty()) prox_from_stats(two_pass, two_pass_layouts, threshold, exact);
}

}  // namespace regext
