// egma_fast._C: the op schemas (namespace egma_fast_C), their CPU kernels, and the Python module.
//
// The autograd formulas and fake (meta) implementations are registered from Python in
// egma_fast/ops/cpp_backend.py (torch.library.register_autograd / register_fake), which
// set_python_module names so that torch can find them. CUDA kernels register themselves in
// cuda/ops_cuda.cpp when the extension is built with them (EGMA_WITH_CUDA).
#include <Python.h>
#include <torch/library.h>

#include <stdexcept>

#include "cpu/isa.h"
#include "ops.h"

namespace egma {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cross_map_fwd_cpu(
    const at::Tensor& P, const at::Tensor& S, const at::Tensor& sent_mask, const at::Tensor& GS,
    const at::Tensor& use_gaze, const at::Tensor& theta, const at::Tensor& alpha, EGMA_CROSS_MAP_OPTION_PARAMS) {
  return cpu::cross_map_fwd(P, S, sent_mask, GS, use_gaze, theta, alpha, EGMA_CROSS_MAP_OPTIONS);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_map_bwd_cpu(
    const at::Tensor& grad_mlce_s2p, const at::Tensor& grad_mlce_p2s, const at::Tensor& grad_egm_image,
    const at::Tensor& grad_egm_text, const at::Tensor& P, const at::Tensor& S, const at::Tensor& sent_mask,
    const at::Tensor& GS, const at::Tensor& use_gaze, const at::Tensor& theta, const at::Tensor& alpha,
    EGMA_CROSS_MAP_OPTION_PARAMS) {
  return cpu::cross_map_bwd(grad_mlce_s2p, grad_mlce_p2s, grad_egm_image, grad_egm_text, P, S, sent_mask, GS,
                            use_gaze, theta, alpha, EGMA_CROSS_MAP_OPTIONS);
}

}  // namespace
}  // namespace egma

TORCH_LIBRARY(egma_fast_C, m) {
  m.set_python_module("egma_fast.ops.cpp_backend");
  // zero_slot [Bt] bool: texts whose image-side max is floored at 0 (pad_as_zero, SPEC 2.1).
  // Returns (zI, zT, win_patch [Bi, Bt, M], win_sentence [Bi, Bt, n] or [0] when not saved).
  m.def(
      "late_interaction_fwd(Tensor P, Tensor S, Tensor sent_mask, Tensor? patch_mask, Tensor zero_slot, "
      "bool save_sentence_argmax) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "late_interaction_bwd(Tensor grad_zI, Tensor grad_zT, Tensor P, Tensor S, Tensor sent_mask, "
      "Tensor? patch_mask, Tensor zero_slot, Tensor win_patch, Tensor win_sentence) -> (Tensor, Tensor)");
  // Returns (mlce_s2p, mlce_p2s, egm_image, egm_text), each [B].
  m.def(
      "cross_map_fwd(Tensor P, Tensor S, Tensor sent_mask, Tensor GS, Tensor use_gaze, Tensor theta, "
      "Tensor alpha, " EGMA_CROSS_MAP_OPTION_SCHEMA ") -> (Tensor, Tensor, Tensor, Tensor)");
  // Returns (grad_P, grad_S, grad_alpha).
  m.def(
      "cross_map_bwd(Tensor grad_mlce_s2p, Tensor grad_mlce_p2s, Tensor grad_egm_image, Tensor grad_egm_text, "
      "Tensor P, Tensor S, Tensor sent_mask, Tensor GS, Tensor use_gaze, Tensor theta, Tensor alpha, "
      EGMA_CROSS_MAP_OPTION_SCHEMA ") -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(egma_fast_C, CPU, m) {
  m.impl("late_interaction_fwd", &egma::cpu::late_interaction_fwd);
  m.impl("late_interaction_bwd", &egma::cpu::late_interaction_bwd);
  m.impl("cross_map_fwd", &egma::cross_map_fwd_cpu);
  m.impl("cross_map_bwd", &egma::cross_map_bwd_cpu);
}

// ------------------------------------------------------------------------------------------------
// The Python module egma_fast._C: importing it loads the library above (registering the ops).
// ------------------------------------------------------------------------------------------------
namespace {

PyObject* py_cpu_isa(PyObject*, PyObject*) {
  return PyUnicode_FromString(egma::cpu::isa_name(egma::cpu::current_isa()));
}

PyObject* py_supported_cpu_isas(PyObject*, PyObject*) {
  const auto names = egma::cpu::supported_isas();
  PyObject* list = PyList_New(static_cast<Py_ssize_t>(names.size()));
  if (!list) return nullptr;
  for (size_t i = 0; i < names.size(); ++i) PyList_SET_ITEM(list, i, PyUnicode_FromString(names[i].c_str()));
  return list;
}

PyObject* py_set_cpu_isa(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8(arg);
  if (!name) return nullptr;
  try {
    return PyUnicode_FromString(egma::cpu::set_isa(name).c_str());
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
    return nullptr;
  }
}

PyMethodDef methods[] = {
    {"cpu_isa", py_cpu_isa, METH_NOARGS, "The instruction set the CPU kernels use (generic, avx2, avx512)."},
    {"supported_cpu_isas", py_supported_cpu_isas, METH_NOARGS, "Instruction sets this CPU and build support."},
    {"set_cpu_isa", py_set_cpu_isa, METH_O,
     "Use the named instruction set's CPU kernels (for tests); returns the previous one. Never change it between "
     "an op's forward and backward."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                          "egma_fast's compiled ops (torch.ops.egma_fast_C): C++ CPU kernels and, when built "
                          "with them, CUDA kernels.",
                          -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&module_def);
  if (!module) return nullptr;
#ifdef EGMA_WITH_CUDA
  const int with_cuda = 1;
#else
  const int with_cuda = 0;
#endif
  if (PyModule_AddObject(module, "WITH_CUDA", PyBool_FromLong(with_cuda)) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
