// The regext operator library and its Python module, regext._C.
#include <Python.h>

#include "schemas.h"

TORCH_LIBRARY(regext, m) { regext::define_operators(m); }

// `import regext._C` loads the library; everything is reached through
// torch.ops.regext. The module only says whether the CUDA kernels were built.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "regext operators (reach them through torch.ops.regext)",
      -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module != nullptr && PyModule_AddIntConstant(module, "with_cuda", REGEXT_WITH_CUDA) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
