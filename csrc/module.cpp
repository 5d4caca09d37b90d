// The Python module lip_cuda._C. Importing it loads the library, whose
// static initialisers register the operators; it holds no Python functions,
// only whether the CUDA kernels were compiled in.
#include <Python.h>

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) {
    return nullptr;
  }
#ifdef WITH_CUDA
  const long with_cuda = 1;
#else
  const long with_cuda = 0;
#endif
  if (PyModule_AddObject(module, "WITH_CUDA", PyBool_FromLong(with_cuda)) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
