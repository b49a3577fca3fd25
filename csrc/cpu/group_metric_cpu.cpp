// CPU backend of the group lasso's proximal step in an optimizer's metric
// (prox_group_metric_; interface: csrc/backend.h; the method: csrc/group_metric_math.h;
// groups: csrc/groups.h).
//
// Work items are ranges of whole groups of one tensor, about kChunkElems elements
// each (at least one group). An item reads its groups' elements, second moments
// (and means) once, in memory order, into float64 buffers laid out group by group
// (x_i and c_i = lam / d_i), solves every group's Newton iteration there, in cache,
// and writes the changed groups back: one read of each parameter and its state and
// one write, whatever the iteration count. Sums run element by element in a fixed
// order inside one item, so results do not depend on the thread count, and this
// file is compiled once (no per-ISA variants): the same bits on every CPU.
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

template <typename T, bool kCentered>
void step_groups(const GroupRange& item, const GroupLayout& l, const MetricCoefs& coefs, T* x,
                 const T* v, const T* m, std::vector<double>& xs, std::vector<double>& cs,
                 std::vector<GroupMetricStart>& starts) {
  const int64_t count = item.end - item.first;
  const int64_t group_size = l.outer * l.inner;
  const double lam = coefs.l1_step * l.weight;
  xs.resize(count * group_size);
  cs.resize(count * group_size);
  starts.assign(count, GroupMetricStart{});
  // Gather, in memory order: period o holds groups [first, end) as count * inner
  // consecutive elements.
  for (int64_t o = 0; o < l.outer; ++o) {
    const int64_t base = o * l.period() + item.first * l.inner;
    for (int64_t k = 0; k < count; ++k) {
      // A local copy: gx and gc are double*, which may alias the fields of starts[k]
      // as far as the compiler knows; in registers the sums need no reload per element.
      GroupMetricStart s = starts[k];
      double* gx = xs.data() + k * group_size + o * l.inner;
      double* gc = cs.data() + k * group_size + o * l.inner;
      for (int64_t j = 0; j < l.inner; ++j) {
        const int64_t i = base + k * l.inner + j;
        const double xi = static_cast<double>(x[i]);
        const double d = metric_denominator<kCentered>(
            static_cast<double>(v[i]), kCentered ? static_cast<double>(m[i]) : 0.0, coefs.scale,
            coefs.eps);
        const double ci = lam / d;  // +inf where d = 0, 0 where d = +inf
        gx[j] = xi;
        gc[j] = ci;
        add_start_terms(s, xi, d, ci);
      }
      starts[k] = s;
    }
  }
  // Solve each group, then write it back where it changes.
  for (int64_t k = 0; k < count; ++k) {
    const GroupMetricCase what = group_metric_case(starts[k], lam);
    if (what == GroupMetricCase::kUnchanged) continue;
    const double* gx = xs.data() + k * group_size;
    const double* gc = cs.data() + k * group_size;
    double* out = xs.data() + k * group_size;  // u overwrites x once tau is known
    if (what == GroupMetricCase::kNaN) {
      std::fill(out, out + group_size, std::numeric_limits<double>::quiet_NaN());
    } else if (what == GroupMetricCase::kZero) {
      std::fill(out, out + group_size, 0.0);
    } else {
      const auto newton_sums = cpu::vector_loops().newton_sums;  // this CPU's variant
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
    const int64_t g = item.first + k;
    for (int64_t o = 0; o < l.outer; ++o) {
      T* dst = x + o * l.period() + g * l.inner;
      const double* src = out + o * l.inner;
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
  const int64_t total = cpu::total_numel(dense);
  const int64_t grain =
      total <= cpu::kMinElemsPerThread
          ? num_items + 1
          : std::max<int64_t>((num_items * cpu::kMinElemsPerThread + total - 1) / total, 1);
  at::parallel_for(0, num_items, grain, [&](int64_t begin, int64_t end) {
    std::vector<double> xs, cs;  // reused by this thread's items
    std::vector<GroupMetricStart> starts;
    for (int64_t i = begin; i < end; ++i) {
      const GroupRange& item = items[i];
      const size_t t = static_cast<size_t>(item.tensor);
      const double* r = rows + t * kMetricColumns;
      const MetricCoefs c{r[0], r[1], r[2], r[3]};
      REGEXT_DISPATCH_FLOATING_TYPES(dense[t].scalar_type(), "prox_group_metric_", [&] {
        auto* x = static_cast<scalar_t*>(dense[t].data_ptr());
        const auto* v = static_cast<const scalar_t*>(moments[t].const_data_ptr());
        if (means.empty()) {
          step_groups<scalar_t, false>(item, layouts[t], c, x, v, nullptr, xs, cs, starts);
        } else {
          const auto* m = static_cast<const scalar_t*>(means[t].const_data_ptr());
          step_groups<scalar_t, true>(item, layouts[t], c, x, v, m, xs, cs, starts);
        }
      });
    }
  });
}

}  // namespace regext
