// Every op schema in one place, and the `swa_fast._C` Python module.
//
// The module also carries an eager fast path for each op: it unpacks the Python lists straight into
// tensors and redispatches to the device kernel, skipping torch.ops' argument parsing and the
// autograd/view fallbacks, which cost more than the update itself for a list of 1,000 small
// tensors. It bumps the written tensors' version counters as the dispatcher would. Traced code
// (torch.compile) goes through torch.ops.swa_fast instead.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <vector>

#ifndef SWA_FAST_WITH_CUDA
#define SWA_FAST_WITH_CUDA 0
#endif

TORCH_LIBRARY(swa_fast, m) {
  // rounding: None (to nearest), or (seed, step, stream, each index's first element in the flat
  // average) for stochastic rounding into bf16 and fp16 averages (swa_fast/ops/rounding.py); stats:
  // None, or an int64 [written lists, 4] to which the pass adds what it saw of each written list
  // (swa_fast/ops/pass_stats.py)
  m.def("lerp_(Tensor(a!)[] avg, Tensor[] src, Tensor weight, Tensor? rounding=None, Tensor(z!)? stats=None) -> ()");
  m.def(
      "moments_(Tensor(a!)[] mean, Tensor(b!)[] sq, Tensor[] src, Tensor weight, Tensor? rounding=None, "
      "Tensor(z!)? stats=None) -> ()");
  // avgs: K lists of averages concatenated (avgs[k * len(src) + i]), K = len(weights), 1 to 4
  m.def(
      "multi_lerp_(Tensor(a!)[] avgs, Tensor[] src, Tensor weights, Tensor? rounding=None, "
      "Tensor(z!)? stats=None) -> ()");
  // weights: (the EMA's weight, the correction's scale)
  m.def("bema_(Tensor(a!)[] ema, Tensor(b!)[] out, Tensor[] start, Tensor[] src, Tensor weights) -> ()");
  // srcs: K lists of sources concatenated (srcs[k * len(dst) + i]), K = len(weights), 1 to 8
  m.def("weighted_sum_(Tensor(a!)[] dst, Tensor[] srcs, Tensor weights) -> ()");
  m.def("copy_(Tensor(a!)[] dst, Tensor[] src) -> ()");
  m.def("swap_(Tensor(a!)[] a, Tensor(b!)[] b) -> ()");
}

namespace {

using TL = at::TensorList;
using T = const at::Tensor&;
using OT = const std::optional<at::Tensor>&;

// The tensors of a Python sequence, borrowed: their C++ reference counts are left alone (counting a
// Python-owned tensor takes the GIL) and the Python objects are kept alive
// instead, so a list changed by another thread while the kernel runs frees nothing it uses.
class BorrowedTensors {
 public:
  BorrowedTensors(PyObject* obj, const char* op, const char* name) {
    PyObject* seq = PySequence_Fast(obj, "");
    if (seq == nullptr) {
      PyErr_Clear();
      TORCH_CHECK_VALUE(false, "swa_fast.", op, ": `", name, "` must be a list of tensors, got ",
                        Py_TYPE(obj)->tp_name);
    }
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject** items = PySequence_Fast_ITEMS(seq);
    for (Py_ssize_t i = 0; i < n; ++i) {
      if (!THPVariable_Check(items[i])) {
        const std::string type = Py_TYPE(items[i])->tp_name;
        Py_DECREF(seq);
        TORCH_CHECK_VALUE(false, "swa_fast.", op, ": `", name, "[", i, "]` is a ", type, ", expected a Tensor");
      }
    }
    objects_.assign(items, items + n);
    tensors_.reserve(n);
    for (PyObject* o : objects_) {
      Py_INCREF(o);
      tensors_.emplace_back(c10::intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>::reclaim(
          THPVariable_Unpack(o).unsafeGetTensorImpl()));
    }
    Py_DECREF(seq);
  }
  ~BorrowedTensors() {  // runs with the GIL held
    for (auto& t : tensors_) t.unsafeReleaseTensorImpl();
    for (PyObject* o : objects_) Py_DECREF(o);
  }
  BorrowedTensors(const BorrowedTensors&) = delete;
  BorrowedTensors& operator=(const BorrowedTensors&) = delete;

  at::TensorList list() const { return tensors_; }
  c10::DispatchKeySet device_keys() const {
    const bool cuda = !tensors_.empty() && tensors_[0].is_cuda();
    return c10::DispatchKeySet(cuda ? c10::DispatchKey::CUDA : c10::DispatchKey::CPU);
  }
  void bump_versions() const {
    for (const auto& t : tensors_) t.unsafeGetTensorImpl()->bump_version();
  }

 private:
  std::vector<PyObject*> objects_;
  std::vector<at::Tensor> tensors_;
};

// type(obj).__name__, as checks.py names a type.
std::string type_name(PyObject* obj) {
  PyObject* name = PyObject_GetAttrString(reinterpret_cast<PyObject*>(Py_TYPE(obj)), "__name__");
  const char* utf8 = name != nullptr ? PyUnicode_AsUTF8(name) : nullptr;
  std::string out = utf8 != nullptr ? utf8 : Py_TYPE(obj)->tp_name;
  Py_XDECREF(name);
  PyErr_Clear();
  return out;
}

// isinstance(obj, numbers.Real): what checks.py accepts (numpy's real scalars are registered there,
// its complex ones and bool_ are not).
bool is_real_number(PyObject* obj) {
  // Set under the GIL, not as a guarded static: an import may let another thread in, which would
  // then wait on the guard while holding the GIL.
  static PyObject* real = nullptr;  // kept for the life of the process
  if (real == nullptr) {
    PyObject* numbers = PyImport_ImportModule("numbers");
    if (numbers == nullptr) throw python_error();
    real = PyObject_GetAttrString(numbers, "Real");
    Py_DECREF(numbers);
    if (real == nullptr) throw python_error();
  }
  const int is_real = PyObject_IsInstance(obj, real);
  if (is_real < 0) throw python_error();
  return is_real == 1;
}

// The weight: a tensor, or a real Python number written into this thread's CPU float64 scalar, so
// that a float weight (an SWA weight 1/(n+1) is a new one every call) costs no allocation and no
// torch.tensor(). Reusing it is safe: the kernels read a CPU weight by value before the
// call returns. (Never freed: a thread's exit must not depend on torch's allocator still being up.)
at::Tensor unpack_weight(PyObject* obj, const char* op) {
  if (THPVariable_Check(obj)) return THPVariable_Unpack(obj);
  TORCH_CHECK_VALUE(PyFloat_Check(obj) || PyLong_Check(obj) || is_real_number(obj), "swa_fast.", op,
                    ": `weight` must be a real number or a 0-dim floating-point tensor, got ", type_name(obj));
  const double value = PyFloat_AsDouble(obj);  // through __float__ for numbers that are not floats
  if (value == -1.0 && PyErr_Occurred()) throw python_error();
  thread_local at::Tensor* scalar = new at::Tensor(at::empty({}, at::TensorOptions().dtype(at::kDouble)));
  *scalar->mutable_data_ptr<double>() = value;
  return *scalar;
}

// The weights of multi_lerp_, bema_ and weighted_sum_: a tensor, or a sequence of real numbers written into this
// thread's CPU float64 vector (as unpack_weight, and safe to reuse for the same reason).
at::Tensor unpack_weights(PyObject* obj, const char* op) {
  if (THPVariable_Check(obj)) return THPVariable_Unpack(obj);
  PyObject* seq = PyUnicode_Check(obj) || PyBytes_Check(obj) ? nullptr : PySequence_Fast(obj, "");
  if (seq == nullptr) {
    PyErr_Clear();
    TORCH_CHECK_VALUE(false, "swa_fast.", op, ": `weights` must be a sequence of real numbers or a 1-D ",
                      "floating-point tensor, got ", type_name(obj));
  }
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  PyObject** items = PySequence_Fast_ITEMS(seq);
  thread_local at::Tensor* values = new at::Tensor(at::empty({0}, at::TensorOptions().dtype(at::kDouble)));
  if (values->numel() != n) *values = at::empty({n}, at::TensorOptions().dtype(at::kDouble));
  double* out = values->mutable_data_ptr<double>();
  for (Py_ssize_t k = 0; k < n; ++k) {
    PyObject* item = items[k];
    const bool real = PyFloat_Check(item) || PyLong_Check(item) || is_real_number(item);
    if (!real) {
      const std::string type = type_name(item);
      Py_DECREF(seq);
      TORCH_CHECK_VALUE(false, "swa_fast.", op, ": `weights[", k, "]` must be a real number, got ", type);
    }
    out[k] = PyFloat_AsDouble(item);
    if (out[k] == -1.0 && PyErr_Occurred()) {
      Py_DECREF(seq);
      throw python_error();
    }
  }
  Py_DECREF(seq);
  return *values;
}

template <typename Sig>
c10::TypedOperatorHandle<Sig> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// Positional arguments as METH_FASTCALL passes them, without an argument tuple to unpack;
// `optional` more may follow.
bool expect_args(const char* op, Py_ssize_t nargs, Py_ssize_t expected, Py_ssize_t optional = 0) {
  if (nargs >= expected && nargs <= expected + optional) return true;
  PyErr_Format(PyExc_TypeError, "swa_fast.%s takes %zd positional arguments (%zd given)", op, expected, nargs);
  return false;
}

// The optional last argument `rounding` of lerp_, moments_ and multi_lerp_ (args[at], when given):
// None, or a tensor, which the op checks (rounding.py's check_rounding, as its first message).
std::optional<at::Tensor> unpack_rounding(PyObject* const* args, Py_ssize_t nargs, Py_ssize_t at, const char* op) {
  if (nargs <= at || args[at] == Py_None) return std::nullopt;
  if (THPVariable_Check(args[at])) return THPVariable_Unpack(args[at]);
  TORCH_CHECK_VALUE(false, "swa_fast.", op,
                    ": `rounding` must be None or a 1-D int64 tensor on the CPU (seed, step, stream, then each "
                    "index's first element), got ",
                    type_name(args[at]));
}

// The optional argument `stats` after `rounding` (args[at], when given): None, or a tensor, which the
// op checks (pass_stats.py's check_stats, as its first message; `written_lists`: the row count it
// names). Its version counter is bumped with the written lists' (bump_stats).
std::optional<at::Tensor> unpack_stats(PyObject* const* args, Py_ssize_t nargs, Py_ssize_t at, const char* op,
                                       int64_t written_lists) {
  if (nargs <= at || args[at] == Py_None) return std::nullopt;
  if (THPVariable_Check(args[at])) return THPVariable_Unpack(args[at]);
  TORCH_CHECK_VALUE(false, "swa_fast.", op, ": `stats` must be None or an int64 tensor of shape [", written_lists,
                    ", 4] (written, unchanged, non-finite, max |update|, per written list), got ",
                    type_name(args[at]));
}

void bump_stats(const std::optional<at::Tensor>& stats) {
  if (stats.has_value()) stats->unsafeGetTensorImpl()->bump_version();
}

PyObject* py_lerp(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (!expect_args("lerp_", nargs, 3, 2)) return nullptr;
  static auto op = op_handle<void(TL, TL, T, OT, OT)>("swa_fast::lerp_");
  const BorrowedTensors avg(args[0], "lerp_", "avg"), src(args[1], "lerp_", "src");
  const at::Tensor weight = unpack_weight(args[2], "lerp_");
  const std::optional<at::Tensor> rounding = unpack_rounding(args, nargs, 3, "lerp_");
  const std::optional<at::Tensor> stats = unpack_stats(args, nargs, 4, "lerp_", 1);
  {
    pybind11::gil_scoped_release no_gil;
    op.redispatch(avg.device_keys(), avg.list(), src.list(), weight, rounding, stats);
  }
  avg.bump_versions();
  bump_stats(stats);
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

PyObject* py_moments(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (!expect_args("moments_", nargs, 4, 2)) return nullptr;
  static auto op = op_handle<void(TL, TL, TL, T, OT, OT)>("swa_fast::moments_");
  const BorrowedTensors mean(args[0], "moments_", "mean"), sq(args[1], "moments_", "sq"),
      src(args[2], "moments_", "src");
  const at::Tensor weight = unpack_weight(args[3], "moments_");
  const std::optional<at::Tensor> rounding = unpack_rounding(args, nargs, 4, "moments_");
  const std::optional<at::Tensor> stats = unpack_stats(args, nargs, 5, "moments_", 2);
  {
    pybind11::gil_scoped_release no_gil;
    op.redispatch(mean.device_keys(), mean.list(), sq.list(), src.list(), weight, rounding, stats);
  }
  mean.bump_versions();
  sq.bump_versions();
  bump_stats(stats);
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

// avgs: the K lists concatenated (swa_fast.multi_lerp_ concatenates nested lists).
PyObject* py_multi_lerp(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (!expect_args("multi_lerp_", nargs, 3, 2)) return nullptr;
  static auto op = op_handle<void(TL, TL, T, OT, OT)>("swa_fast::multi_lerp_");
  const BorrowedTensors avgs(args[0], "multi_lerp_", "avgs"), src(args[1], "multi_lerp_", "src");
  const at::Tensor weights = unpack_weights(args[2], "multi_lerp_");
  const std::optional<at::Tensor> rounding = unpack_rounding(args, nargs, 3, "multi_lerp_");
  // (a row per weight: the count the op checks `weights` for, or 1 where they are no 1-D tensor)
  const std::optional<at::Tensor> stats =
      unpack_stats(args, nargs, 4, "multi_lerp_", weights.dim() == 1 ? weights.size(0) : 1);
  {
    pybind11::gil_scoped_release no_gil;
    op.redispatch(avgs.device_keys(), avgs.list(), src.list(), weights, rounding, stats);
  }
  avgs.bump_versions();
  bump_stats(stats);
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

PyObject* py_bema(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (!expect_args("bema_", nargs, 5)) return nullptr;
  static auto op = op_handle<void(TL, TL, TL, TL, T)>("swa_fast::bema_");
  const BorrowedTensors ema(args[0], "bema_", "ema"), out(args[1], "bema_", "out"),
      start(args[2], "bema_", "start"), src(args[3], "bema_", "src");
  const at::Tensor weights = unpack_weights(args[4], "bema_");
  {
    pybind11::gil_scoped_release no_gil;
    op.redispatch(ema.device_keys(), ema.list(), out.list(), start.list(), src.list(), weights);
  }
  ema.bump_versions();
  out.bump_versions();
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

// srcs: the K lists concatenated (swa_fast.weighted_sum_ concatenates nested lists).
PyObject* py_weighted_sum(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (!expect_args("weighted_sum_", nargs, 3)) return nullptr;
  static auto op = op_handle<void(TL, TL, T)>("swa_fast::weighted_sum_");
  const BorrowedTensors dst(args[0], "weighted_sum_", "dst"), srcs(args[1], "weighted_sum_", "srcs");
  const at::Tensor weights = unpack_weights(args[2], "weighted_sum_");
  {
    pybind11::gil_scoped_release no_gil;
    op.redispatch(dst.device_keys(), dst.list(), srcs.list(), weights);
  }
  dst.bump_versions();
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

// copy_ and swap_ share a signature: (written list, second list); swap_ writes both.
template <bool kSecondWritten>
PyObject* py_two_lists(const c10::TypedOperatorHandle<void(TL, TL)>& op, const char* name, const char* first_name,
                       const char* second_name, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (!expect_args(name, nargs, 2)) return nullptr;
  const BorrowedTensors first(args[0], name, first_name), second(args[1], name, second_name);
  {
    pybind11::gil_scoped_release no_gil;
    op.redispatch(first.device_keys(), first.list(), second.list());
  }
  first.bump_versions();
  if (kSecondWritten) second.bump_versions();
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

PyObject* py_copy(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  static auto op = op_handle<void(TL, TL)>("swa_fast::copy_");
  return py_two_lists<false>(op, "copy_", "dst", "src", args, nargs);
}
PyObject* py_swap(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  static auto op = op_handle<void(TL, TL)>("swa_fast::swap_");
  return py_two_lists<true>(op, "swap_", "a", "b", args, nargs);
}

// The drop-in AveragedModel's update in one call from Python: lerp_(avg, src, weight), then
// copy_(dst, copy_src) (the model's buffers), each its own op through the dispatcher, the GIL
// released once. lerp_'s errors are raised (it wrote nothing); copy_'s ValueError only tells the
// caller, by returning False, that the lerp_ is done and the copy is its to make another way.
PyObject* py_lerp_then_copy(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (!expect_args("lerp_then_copy_", nargs, 5)) return nullptr;
  static auto lerp = op_handle<void(TL, TL, T, OT, OT)>("swa_fast::lerp_");
  static auto copy = op_handle<void(TL, TL)>("swa_fast::copy_");
  const BorrowedTensors avg(args[0], "lerp_", "avg"), src(args[1], "lerp_", "src");
  const at::Tensor weight = unpack_weight(args[2], "lerp_");
  const BorrowedTensors dst(args[3], "copy_", "dst"), copy_src(args[4], "copy_", "src");
  bool copied = true;
  {
    pybind11::gil_scoped_release no_gil;
    lerp.redispatch(avg.device_keys(), avg.list(), src.list(), weight, std::nullopt, std::nullopt);
    try {
      copy.redispatch(dst.device_keys(), dst.list(), copy_src.list());
    } catch (const c10::ValueError&) {
      copied = false;
    }
  }
  avg.bump_versions();
  if (copied) dst.bump_versions();
  return PyBool_FromLong(copied);
  END_HANDLE_TH_ERRORS
}

// same_values(dicts, expected): whether the values of the dicts in `dicts`, dict after dict in
// insertion order, None left out (an unset bias), are the very objects of the list `expected`, in
// order. The staleness test of a
// walked module's tensors (model_tensors.ModuleWalk), run on every update: comparing pointers here
// skips building the Python list of a thousand tensors it would otherwise compare.
PyObject* same_values(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 2 || !PyList_Check(args[0]) || !PyList_Check(args[1])) {
    PyErr_SetString(PyExc_TypeError, "swa_fast._C.same_values(dicts: list, expected: list)");
    return nullptr;
  }
  PyObject* const expected = args[1];
  const Py_ssize_t n = PyList_GET_SIZE(expected);
  Py_ssize_t at = 0;
  for (Py_ssize_t d = 0; d < PyList_GET_SIZE(args[0]); ++d) {
    PyObject* const dict = PyList_GET_ITEM(args[0], d);
    if (!PyDict_Check(dict)) {
      PyErr_Format(PyExc_TypeError, "swa_fast._C.same_values: dicts[%zd] is a %s, expected a dict", d,
                   Py_TYPE(dict)->tp_name);
      return nullptr;
    }
    Py_ssize_t pos = 0;
    PyObject *key, *value;
    while (PyDict_Next(dict, &pos, &key, &value)) {
      if (value == Py_None) continue;
      if (at == n || value != PyList_GET_ITEM(expected, at)) Py_RETURN_FALSE;
      ++at;
    }
  }
  if (at != n) Py_RETURN_FALSE;
  Py_RETURN_TRUE;
}

// What setup.py recorded (its `info`): the CUDA kernels, why (not), their architectures and from where.
PyObject* build_info(PyObject*, PyObject*) {
  return Py_BuildValue("{s:O,s:s,s:s,s:s,s:s,s:s}", "cuda", SWA_FAST_WITH_CUDA ? Py_True : Py_False,
                       "cuda_archs", SWA_FAST_BUILD_CUDA_ARCHS, "cuda_archs_from", SWA_FAST_BUILD_CUDA_ARCHS_FROM,
                       "cuda_reason", SWA_FAST_BUILD_CUDA_REASON, "cuda_version", SWA_FAST_BUILD_CUDA_VERSION,
                       "torch_version", SWA_FAST_BUILD_TORCH_VERSION);
}

PyCFunction fastcall(_PyCFunctionFast f) { return reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(f)); }

PyMethodDef methods[] = {
    {"lerp_", fastcall(py_lerp), METH_FASTCALL,
     "lerp_(avg, src, weight, rounding=None, stats=None): eager fast path of torch.ops.swa_fast.lerp_"},
    {"moments_", fastcall(py_moments), METH_FASTCALL,
     "moments_(mean, sq, src, weight, rounding=None, stats=None): eager fast path"},
    {"multi_lerp_", fastcall(py_multi_lerp), METH_FASTCALL,
     "multi_lerp_(avgs, src, weights, rounding=None, stats=None): eager fast path"},
    {"bema_", fastcall(py_bema), METH_FASTCALL, "bema_(ema, out, start, src, weights): eager fast path"},
    {"weighted_sum_", fastcall(py_weighted_sum), METH_FASTCALL,
     "weighted_sum_(dst, srcs, weights): eager fast path"},
    {"copy_", fastcall(py_copy), METH_FASTCALL, "copy_(dst, src): eager fast path"},
    {"swap_", fastcall(py_swap), METH_FASTCALL, "swap_(a, b): eager fast path"},
    {"lerp_then_copy_", fastcall(py_lerp_then_copy), METH_FASTCALL,
     "lerp_then_copy_(avg, src, weight, dst, copy_src): lerp_, then copy_; False when copy_ refused its lists"},
    {"same_values", fastcall(same_values), METH_FASTCALL,
     "same_values(dicts, expected): whether the dicts' values are the objects of `expected`, in order"},
    {"build_info", build_info, METH_NOARGS, "What this extension was built with."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "swa_fast compiled kernels", -1, methods};

}  // namespace

extern "C" PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
