// Every op schema in one place, and the `swa_fast._C` Python module (it only carries build facts;
// the ops are reached through torch.ops.swa_fast).
#include <Python.h>
#include <torch/library.h>

#ifndef SWA_FAST_WITH_CUDA
#define SWA_FAST_WITH_CUDA 0
#endif

TORCH_LIBRARY(swa_fast, m) {
  m.def("lerp_(Tensor(a!)[] avg, Tensor[] src, Tensor weight) -> ()");
  m.def("moments_(Tensor(a!)[] mean, Tensor(b!)[] sq, Tensor[] src, Tensor weight) -> ()");
  m.def("copy_(Tensor(a!)[] dst, Tensor[] src) -> ()");
  m.def("swap_(Tensor(a!)[] a, Tensor(b!)[] b) -> ()");
}

namespace {

PyObject* build_info(PyObject*, PyObject*) {
  return Py_BuildValue("{s:O,s:s,s:s,s:s}", "cuda", SWA_FAST_WITH_CUDA ? Py_True : Py_False, "cuda_archs",
                       SWA_FAST_BUILD_CUDA_ARCHS, "cuda_version", SWA_FAST_BUILD_CUDA_VERSION, "torch_version",
                       SWA_FAST_BUILD_TORCH_VERSION);
}

PyMethodDef methods[] = {
    {"build_info", build_info, METH_NOARGS, "What this extension was built with."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "swa_fast compiled kernels", -1, methods};

}  // namespace

extern "C" PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
