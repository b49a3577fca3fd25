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
  m.def(
      "penalty_grad_accumulate_(Tensor(a!)[] grads, Tensor[] params, Tensor stats,"
      " float l1, float l2, bool l2_squared, int[]? stats_rows=None) -> ()");
}

// The compiled library is loaded by `import regext._C`; it needs a module init
// function but no Python bindings: everything is reached through torch.ops.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "regext operators (reach them through torch.ops.regext)",
      -1, nullptr};
  return PyModule_Create(&module_def);
}
