// Makes pyadapt._C_cuda importable as a Python module; importing it runs the TORCH_LIBRARY
// registrations of the CUDA kernels (torch.ops.pyadapt_cuda.*). Kept apart from pyadapt._C so
// a CUDA build that fails, or a machine without the CUDA libraries, never costs the CPU kernels.
#include <Python.h>

static PyModuleDef pyadapt_c_cuda_module = {PyModuleDef_HEAD_INIT, "_C_cuda",
                                            "pyadapt CUDA kernels", -1, nullptr};

PyMODINIT_FUNC PyInit__C_cuda(void) { return PyModule_Create(&pyadapt_c_cuda_module); }
