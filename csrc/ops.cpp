// Operator schemas of the regext library: the one place they are declared.
//
// Backends register kernels for these names in csrc/cpu and csrc/cuda; the
// fake (meta) kernels that let torch.compile trace them live in
// regext/_meta.py. Mutated arguments are annotated `(a!)` so that functionalization
// and torch.library.opcheck see the aliasing.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(regext, m) {
  // Reads every tensor once. Returns the 0-dim penalty
  //   l1 * sum_t ||p_t||_1 + l2 * sum_t ||p_t||_2   (or ||p_t||_2^2 when l2_squared)
  // in the result dtype (float64 if any parameter is float64, else float32),
  // and `stats`, a float64 [len(params), 2] tensor holding sum|x| and sum x^2
  // per tensor, which the backward needs instead of a second read.
  m.def(
      "penalty_forward(Tensor[] params, float l1, float l2, bool l2_squared)"
      " -> (Tensor total, Tensor stats)");
  // Writes d(penalty)/d(p_t) * grad_total for every tensor in one pass.
  // Each gradient has its parameter's dtype, shape and (dense) strides.
  // stats_rows[t], when given, is the row of `stats` that belongs to params[t]
  // (so a subset of the forward's tensors, e.g. those requiring grad, needs no
  // gather on the device); by default params[t] uses row t.
  m.def(
      "penalty_backward(Tensor grad_total, Tensor[] params, Tensor stats, float l1,"
      " float l2, bool l2_squared, int[]? stats_rows=None) -> Tensor[]");
  // grads[t] += d(penalty)/d(p_t) in place, from the stats of penalty_forward.
  // Applied in list order: a gradient listed twice (a parameter listed twice)
  // receives both updates (see the in-place operators below).
  m.def(
      "penalty_grad_accumulate_(Tensor(a!)[] grads, Tensor[] params, Tensor stats,"
      " float l1, float l2, bool l2_squared, int[]? stats_rows=None) -> ()");
  // penalty_forward followed by penalty_grad_accumulate_(grads, params, stats):
  // the same total, stats and gradients. In the squared form the gradient
  // needs no norm, so where no gradient shares memory with another tensor the
  // CPU kernel adds it in the same read of each parameter (one pass, not two).
  // Not differentiable (it is the gradient).
  m.def(
      "penalty_forward_accumulate_(Tensor(a!)[] grads, Tensor[] params, float l1, float l2,"
      " bool l2_squared) -> (Tensor total, Tensor stats)");

  // ---- In-place proximal steps and sparsity (csrc/prox_ops.cpp) ----
  //
  // The in-place operators act on `params` in list order, exactly as calling
  // the operator once per tensor would: a tensor listed twice is updated twice,
  // and a view that overlaps an earlier entry sees that entry's update
  // (kernels split the list at shared memory: csrc/aliasing.h). Each tensor is
  // updated where it lies, whatever its strides; a tensor whose elements
  // overlap in memory (stride 0, expand) is rejected before anything is written,
  // as is a bad threshold (ValueError) or dtype/device (TypeError/RuntimeError).
  // `threshold` must be finite and >= 0. All tensors are on one device; the
  // dtypes may differ (float16, bfloat16, float32, float64). Towards autograd
  // they behave like torch's in-place ops (csrc/inplace_autograd.cpp).
  //
  // Soft-thresholding, elementwise: x <- sign(x) * max(|x| - threshold, 0),
  // computed in float32 (float64 for float64 tensors) and rounded once
  // (regext::soft_threshold in penalty_math.h). |x| <= threshold gives +0;
  // NaN stays NaN, +-inf stays +-inf.
  m.def("prox_l1_(Tensor(a!)[] params, float threshold) -> ()");
  // Group shrinkage, per tensor: x <- x * max(0, 1 - threshold / ||x||_2), with
  // ||x||_2 from a float64 sum of squares (the stats pass of penalty_forward)
  // and the factor from regext::group_shrink_scale: 0 when ||x|| <= threshold
  // (an all-zero tensor stays zero), exactly 1 (tensor untouched) when the
  // norm is +inf or NaN. The product is formed in float64 (float32 for the
  // half types) and rounded once.
  m.def("prox_group_l2_(Tensor(a!)[] params, float threshold) -> ()");
  // The number of elements equal to +0 or -0 in each tensor (NaN is not zero):
  // an int64 tensor of shape [len(params)] on the parameters' device.
  m.def("count_zeros(Tensor[] params) -> Tensor");
}

// The compiled library is loaded by `import regext._C`; it needs a module init
// function but no Python bindings: everything is reached through torch.ops.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "regext operators (reach them through torch.ops.regext)",
      -1, nullptr};
  return PyModule_Create(&module_def);
}
