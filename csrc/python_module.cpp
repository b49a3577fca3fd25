// regext._C, the Python module whose import loads the operator library. The
// operators are reached through torch.ops.regext; the module itself says
// whether the CUDA kernels were built and which CPU loops run.
#include <Python.h>

#include "cpu/cpu_capability.h"

namespace {

PyObject* cpu_capability(PyObject*, PyObject*) {
  return PyUnicode_FromString(regext::cpu::capability_choice().loops->capability);
}

PyMethodDef methods[] = {
    {"cpu_capability", cpu_capability, METH_NOARGS,
     "The instruction set of the CPU loops in use: default, avx2 or avx512."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) {
  // The CPU loops are chosen here, once, so that REGEXT_CPU_CAPABILITY problems
  // surface at import: an unknown name fails the import, an unsupported one warns.
  const regext::cpu::CapabilityChoice& choice = regext::cpu::capability_choice();
  if (choice.loops == nullptr) {
    PyErr_SetString(PyExc_ValueError, choice.error.c_str());
    return nullptr;
  }
  if (!choice.warning.empty() && PyErr_WarnEx(PyExc_RuntimeWarning, choice.warning.c_str(), 1)) {
    return nullptr;
  }
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "regext operators (reach them through torch.ops.regext)",
      -1, methods};
  PyObject* module = PyModule_Create(&module_def);
  if (module != nullptr && PyModule_AddIntConstant(module, "with_cuda", REGEXT_WITH_CUDA) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
