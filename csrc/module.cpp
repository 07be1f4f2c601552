// Makes pyadapt._C importable as a Python module; importing it runs the TORCH_LIBRARY
// registrations of the kernels linked into it (torch.ops.pyadapt_C.*).
#include <Python.h>

static PyModuleDef pyadapt_c_module = {PyModuleDef_HEAD_INIT, "_C", "pyadapt native kernels",
                                       -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&pyadapt_c_module); }
