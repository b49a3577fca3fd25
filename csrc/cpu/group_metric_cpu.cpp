// CPU backend of the group lasso's proximal step in an optimizer's metric
// (prox_group_metric_; interface: csrc/backend.h; the method: csrc/group_metric_math.h;
// groups: csrc/groups.h).
//
// Work items are ranges of whole groups of one tensor, about kChunkElems elements
// each (at least one group). An item reads its groups' elements, second moments
// (and means) once, in memory order, into float64 buffers laid out group by group
// (x_i, d_i and c_i = lam / d_i: the instruction-set loop metric_gather), takes each
// group's start sums and runs its Newton iterations there, in cache (start_sums and
// newton_sums, 8 lanes in a fixed order), and writes the changed groups back: one
// read of each parameter and its state and one write, whatever the iteration count.
// The same bits on every instruction-set variant and for any thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../backend.h"
#include "../compute_types.h"
#include "../group_metric_math.h"
#include "../groups.h"
#include "../penalty_math.h"
#include "cpu_common.h"
#include "vector_loops.h"

namespace regext {
namespace {

struct GroupRange {
  int64_t tensor, first, end;  // groups [first, end) of dense[tensor]
};

// The items: ranges of whole groups of about kChunkElems elements, skipping tensors
// without elements or whose row leaves them unchanged.
std::vector<GroupRange> group_ranges(at::ArrayRef<GroupLayout> layouts, const double* coefs) {
  std::vector<GroupRange> items;
  for (size_t t = 0; t < layouts.size(); ++t) {
    const GroupLayout& l = layouts[t];
    const MetricCoefs c{coefs[t * kMetricColumns + 0], coefs[t * kMetricColumns + 1],
                        coefs[t * kMetricColumns + 2], coefs[t * kMetricColumns + 3]};
    if (l.num_items == 0 || c.is_identity()) continue;
    const int64_t group_size = l.outer * l.inner;
    const int64_t per_item = std::max<int64_t>(1, kChunkElems / std::max<int64_t>(group_size, 1));
    for (int64_t g = 0; g < l.groups; g += per_item) {
      items.push_back({static_cast<int64_t>(t), g, std::min(l.groups, g + per_item)});
    }
  }
  return items;
}

// The scratch of one thread: x, d and c of an item's groups, group by group, and
// one period's span in memory order (column layouts: inner < the span).
struct Scratch {
  std::vector<double> xs, ds, cs, span_x, span_d, span_c;
  std::vector<GroupMetricStart> starts;
  std::vector<char> changed;
};

template <typename T>
void step_groups(const GroupRange& item, const GroupLayout& l, const MetricCoefs& coefs, T* x,
                 const T* v, const T* m, Scratch& w) {
  const int64_t count = item.end - item.first;
  const int64_t group_size = l.outer * l.inner;
  const double lam = coefs.l1_step * l.weight;
  // Groups of several periods (columns) are written a period at a time, one element
  // per group: a stride of 8 extra doubles keeps those stores out of the same L1 sets
  // (a stride of 1024 doubles, 8 KiB, made the column gather 5x slower than rows').
  const int64_t stride = l.outer == 1 ? group_size : group_size + 8;
  const int64_t total = count * stride, span = count * l.inner;
  w.xs.resize(total);
  w.ds.resize(total);
  w.cs.resize(total);
  const auto& loops = cpu::loops_for<T>();
  const cpu::VectorLoops& isa = cpu::vector_loops();
  // Gather, in memory order: period o holds groups [first, end) as count * inner
  // consecutive elements (the instruction-set loop: x, d and c in float64). With one
  // period (rows, whole tensors) they are already group by group; otherwise each run
  // of inner elements goes to its group's place.
  for (int64_t o = 0; o < l.outer; ++o) {
    const int64_t base = o * l.period() + item.first * l.inner;
    const T* mo = m == nullptr ? nullptr : m + base;
    if (l.outer == 1) {
      loops.metric_gather(x + base, v + base, mo, span, coefs.scale, coefs.eps, lam,
                          w.xs.data(), w.ds.data(), w.cs.data());
      continue;
    }
    w.span_x.resize(span);
    w.span_d.resize(span);
    w.span_c.resize(span);
    loops.metric_gather(x + base, v + base, mo, span, coefs.scale, coefs.eps, lam,
                        w.span_x.data(), w.span_d.data(), w.span_c.data());
    for (int64_t k = 0; k < count; ++k) {
      const int64_t to = k * stride + o * l.inner, from = k * l.inner;
      for (int64_t j = 0; j < l.inner; ++j) {  // often 1 (columns): no library call
        w.xs[to + j] = w.span_x[from + j];
        w.ds[to + j] = w.span_d[from + j];
        w.cs[to + j] = w.span_c[from + j];
      }
    }
  }
  w.starts.resize(count);
  for (int64_t k = 0; k < count; ++k) {
    const int64_t at = k * stride;
    w.starts[k] = isa.start_sums(w.xs.data() + at, w.ds.data() + at, w.cs.data() + at,
                                 group_size);
  }
  std::vector<double>& xs = w.xs;
  std::vector<double>& cs = w.cs;
  std::vector<GroupMetricStart>& starts = w.starts;
  // Solve each group in place (u overwrites x once tau is known), then write the
  // changed groups back in memory order, a period at a time (one group after the
  // other would store a column's elements a row apart: the same L1 sets again).
  w.changed.assign(count, 0);
  for (int64_t k = 0; k < count; ++k) {
    const GroupMetricCase what = group_metric_case(starts[k], lam);
    if (what == GroupMetricCase::kUnchanged) continue;
    const double* gx = xs.data() + k * stride;
    const double* gc = cs.data() + k * stride;
    double* out = xs.data() + k * stride;
    if (what == GroupMetricCase::kNaN) {
      std::fill(out, out + group_size, std::numeric_limits<double>::quiet_NaN());
    } else if (what == GroupMetricCase::kZero) {
      std::fill(out, out + group_size, 0.0);
    } else {
      const auto newton_sums = isa.newton_sums;  // this CPU's variant
      double tau = group_metric_start(starts[k]);
      bool failed = false;
      for (int it = 0; it < kMaxNewtonIterations; ++it) {
        const double step = newton_step(newton_sums(gx, gc, group_size, tau));
        failed = newton_failed(step);
        if (failed || !newton_moves(step, tau)) break;
        tau += step;
      }
      if (failed) continue;  // beyond float64's range: unchanged
      for (int64_t e = 0; e < group_size; ++e) out[e] = group_metric_value(gx[e], gc[e], tau);
    }
    w.changed[k] = 1;
  }
  for (int64_t o = 0; o < l.outer; ++o) {
    T* row = x + o * l.period() + item.first * l.inner;
    for (int64_t k = 0; k < count; ++k) {
      if (!w.changed[k]) continue;
      const double* src = xs.data() + k * stride + o * l.inner;
      T* dst = row + k * l.inner;
      for (int64_t j = 0; j < l.inner; ++j) dst[j] = from_double<T>(src[j]);
    }
  }
}

}  // namespace

void CpuBackend::prox_group_metric(at::ArrayRef<at::Tensor> dense,
                                   at::ArrayRef<at::Tensor> moments,
                                   at::ArrayRef<at::Tensor> means,
                                   at::ArrayRef<GroupLayout> layouts, const at::Tensor& coefs) {
  const double* rows = coefs.const_data_ptr<double>();
  const std::vector<GroupRange> items = group_ranges(layouts, rows);
  const int64_t num_items = static_cast<int64_t>(items.size());
  at::parallel_for(0, num_items, cpu::grain_for(num_items, cpu::total_numel(dense)), [&](int64_t begin, int64_t end) {
    Scratch scratch;  // reused by this thread's items
    for (int64_t i = begin; i < end; ++i) {
      const GroupRange& item = items[i];
      const size_t t = static_cast<size_t>(item.tensor);
      const double* r = rows + t * kMetricColumns;
      const MetricCoefs c{r[0], r[1], r[2], r[3]};
      REGEXT_DISPATCH_FLOATING_TYPES(dense[t].scalar_type(), "prox_group_metric_", [&] {
        const auto* m =
            means.empty() ? nullptr : static_cast<const scalar_t*>(means[t].const_data_ptr());
        step_groups<scalar_t>(item, layouts[t], c, static_cast<scalar_t*>(dense[t].data_ptr()),
                              static_cast<const scalar_t*>(moments[t].const_data_ptr()), m,
                              scratch);
      });
    }
  });
}

}  // namespace regext
