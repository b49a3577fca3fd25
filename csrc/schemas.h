// The schemas of every regext operator: the one place they are declared.
//
// Adding an operator touches, in order:
//   1. define_operators below (mark every argument it writes `(a!)`);
//   2. regext/_meta.py: its fake kernel;
//   3. csrc/penalty_ops.h or csrc/prox_ops.h: the operator, templated on a backend,
//      and its line in csrc/register_operators.h;
//   4. csrc/backend.h and both backends (csrc/cpu, csrc/cuda), each tested under
//      the CUDA emulator (tests/cuda_emu) before it is tested anywhere else;
//   5. csrc/inplace_autograd.cpp kInplaceOps, if it writes an argument
//      (tests/test_op_registry.py checks the list against the `(a!)` schemas);
//   6. tests/op_samples.py: one entry, which opcheck, meta, compile, thread and
//      emulated-CUDA tests iterate;
//   7. the Python wrapper and its docstring (the semantics live there).
#pragma once

#include <torch/library.h>

namespace regext {

// Coefficients and thresholds are 0-dim tensors (float16 to float64) on the CPU or on
// the parameters' device, so that a changing value neither recompiles a compiled
// step nor synchronizes with a GPU; the Python API turns numbers into them.
inline void define_operators(torch::Library& m) {
  // l1 * sum ||p||_1 + l2 * sum ||p||_2 (or ||p||_2^2) in one read: the 0-dim total
  // (float64 if any parameter is float64, else float32) and float64 stats
  // [len(params), 2] = (sum |x|, sum x^2) per tensor (regext.fused_penalty).
  m.def(
      "penalty_forward(Tensor[] params, Tensor l1, Tensor l2, bool l2_squared)"
      " -> (Tensor total, Tensor stats)");
  // grad_total * d(penalty)/d(params[t]) from the stats, one pass; params[t] uses
  // stats row stats_rows[t] (default t). Gradients have their parameter's dtype and layout.
  m.def(
      "penalty_backward(Tensor grad_total, Tensor[] params, Tensor stats, Tensor l1,"
      " Tensor l2, bool l2_squared, int[]? stats_rows=None) -> Tensor[]");
  // grads[t] += d(penalty)/d(params[t]) in list order (regext.add_penalty_grad_).
  m.def(
      "penalty_grad_accumulate_(Tensor(a!)[] grads, Tensor[] params, Tensor stats,"
      " Tensor l1, Tensor l2, bool l2_squared, int[]? stats_rows=None) -> ()");
  // penalty_forward, then penalty_grad_accumulate_ with its stats; one read of each
  // parameter in the squared form where the backend can (not differentiable).
  m.def(
      "penalty_forward_accumulate_(Tensor(a!)[] grads, Tensor[] params, Tensor l1, Tensor l2,"
      " bool l2_squared) -> (Tensor total, Tensor stats)");
  // Soft-thresholding in place, in list order (regext.prox_l1_).
  m.def("prox_l1_(Tensor(a!)[] params, Tensor threshold) -> ()");
  // Per-tensor group shrinkage in place, in list order (regext.prox_group_l2_).
  m.def("prox_group_l2_(Tensor(a!)[] params, Tensor threshold) -> ()");
  // The proximal step of L1 (and squared L2) in an optimizer's diagonal metric, in
  // place, in list order: moments[t] (and means[t], centered RMSprop; empty: none) is
  // the state params[t] is divided by, coefs a float64 [len(params), 4] table on the
  // params' device, one (l1_step, ridge_step, scale, eps) row per tensor
  // (csrc/penalty_math.h, MetricCoefs; regext.prox_l1_ with metric=).
  m.def(
      "prox_metric_(Tensor(a!)[] params, Tensor[] moments, Tensor[] means, Tensor coefs)"
      " -> ()");
  // int64 [len(params)]: elements equal to +0 or -0 per tensor (regext.sparsity_report).
  m.def("count_zeros(Tensor[] params) -> Tensor");

  // The group lasso (csrc/groups.h): params[t] is split into groups along
  // group_dims[t] (-1: one group, 0: rows, 1: columns; a tensor of fewer than 2
  // dims is one group), each weighted by w_g = sqrt(its size) with sqrt_size, else 1.
  // l1 * sum ||p||_1 + l2 * sum_g w_g ||g||_2 in one read: the 0-dim total and float64
  // stats [number of groups, 2] = (sum |x|, sum x^2) per group, in list order.
  m.def(
      "group_penalty_forward(Tensor[] params, int[] group_dims, Tensor l1, Tensor l2,"
      " bool sqrt_size) -> (Tensor total, Tensor stats)");
  // grad_total * d(penalty)/d(params[t]), one pass; the groups of params[t] use
  // stats rows first_rows[t], first_rows[t] + 1, ... (default: list order).
  m.def(
      "group_penalty_backward(Tensor grad_total, Tensor[] params, int[] group_dims, Tensor stats,"
      " Tensor l1, Tensor l2, bool sqrt_size, int[]? first_rows=None) -> Tensor[]");
  // grads[t] += d(penalty)/d(params[t]) in list order.
  m.def(
      "group_penalty_grad_accumulate_(Tensor(a!)[] grads, Tensor[] params, int[] group_dims,"
      " Tensor stats, Tensor l1, Tensor l2, bool sqrt_size, int[]? first_rows=None) -> ()");
  // Group shrinkage of every group in place, threshold * w_g, in list order
  // (regext.prox_group_l2_ with group=).
  m.def(
      "prox_group_lasso_(Tensor(a!)[] params, int[] group_dims, Tensor threshold,"
      " bool sqrt_size) -> ()");
  // The group lasso's proximal step in an optimizer's diagonal metric, in place, in
  // list order (csrc/group_metric_math.h; regext.prox_group_l2_ with metric=):
  // moments, means and coefs as prox_metric_'s (coefs[t][0] the group threshold
  // step, coefs[t][1] 0), groups as prox_group_lasso_'s.
  m.def(
      "prox_group_metric_(Tensor(a!)[] params, Tensor[] moments, Tensor[] means,"
      " int[] group_dims, Tensor coefs, bool sqrt_size) -> ()");
}

}  // namespace regext
