// A sampler run's prepared form, stepped from C++: fastdiff.samplers.sampler.Sampler._fast_step.
//
// The plan's slot assignment (fastdiff/samplers/program.py) is made once in Python; a step
// of a run that follows it is then one call here: check what can change between steps,
// put the slots' tensors into the fused op, store its outputs. On a cold cache (right
// after a UNet call) every Python-level attribute read and tensor method costs a few
// microseconds, so doing this work in Python cost more than the fused kernel itself.
//
// Whatever is not the common case is left to Python, which knows the error messages and
// the fallbacks: step() returns a code instead of a tensor (kLeave ... kFinished below),
// Python does that part (draws the noise, unwraps the model output, raises, leaves the
// prepared form) and calls again. Nothing of the step is done before a code is returned.
#include <torch/extension.h>

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/csrc/autograd/python_variable.h>

#include <atomic>
#include <optional>
#include <string>
#include <vector>

namespace {

// What step() leaves to Python (fastdiff/samplers/sampler.py reads the same numbers).
enum Code : int {
  kLeave = 1,     // x or an input cannot follow the form (another kind, autograd): by names
  kSwitch = 2,    // the caller starts or stops donating: the other form from this step
  kPrepare = 3,   // a model output that is not a tensor like x (unwrap / slice / cast / raise)
  kCheckT = 4,    // a timestep this check does not cover (Python checks it, or raises)
  kNoise = 5,     // the step draws noise and none in the kernel's form was given
  kFinished = 6,  // a step after the run's last
};

// Passes over at least this many elements release the GIL (~100 us on one CPU core).
constexpr int64_t kReleaseGil = 1 << 18;

// Bumped by fastdiff._ops.set_backend: a program holds the op its backend chose when it
// was built, so a run stepped from here after a switch leaves for the general step (which
// resolves the op per step) instead of keeping the old backend's kernel to its end.
std::atomic<int64_t> g_backend_epoch{0};

using StepFn = std::vector<at::Tensor>(const at::Tensor&, const std::optional<at::Tensor>&,
                                       const at::Tensor&, const std::optional<at::Tensor>&,
                                       at::TensorList, const std::optional<at::Tensor>&,
                                       const at::Tensor&, bool, int64_t);
using StepOutFn = void(const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
                       const std::optional<at::Tensor>&, at::TensorList,
                       const std::optional<at::Tensor>&, const at::Tensor&, bool, at::TensorList);

// One model call: its Recipe (program.py) and what Sampler._runs says of its op.
struct Call {
  int64_t x_slot;
  bool x_owned;
  std::vector<int64_t> history;
  int64_t x_base;  // -1: none
  std::vector<int64_t> outs;
  std::vector<int64_t> release;
  int64_t x_at, x_in_at;  // output index of the new state, of the next model input (-1)
  bool clamp, noise;
  bool check_t;  // one model time for the whole batch: compared here
  double t_want;
  at::Tensor coeffs;  // this call's coefficient row, on the run's device
};

// The static part, built once per plan, form, device and dtype.
struct Program {
  std::vector<Call> calls;
  int64_t n_slots;
  bool owned, guided;
  double t_tol;   // |t - t_want| <= t_tol (1 + |t_want|): Sampler's tolerance, from Python
  int64_t epoch;  // g_backend_epoch when the op was resolved
  c10::TypedOperatorHandle<StepFn> op;
  c10::TypedOperatorHandle<StepOutFn> op_out;

  Program(const std::string& name, py::list calls_, int64_t n_slots_, bool owned_, bool guided_,
          double t_tol_)
      : n_slots(n_slots_),
        owned(owned_),
        guided(guided_),
        t_tol(t_tol_),
        epoch(g_backend_epoch.load(std::memory_order_relaxed)),
        op(c10::Dispatcher::singleton().findSchemaOrThrow(name.c_str(), "").typed<StepFn>()),
        op_out(c10::Dispatcher::singleton().findSchemaOrThrow(name.c_str(), "out").typed<StepOutFn>()) {
    for (py::handle h : calls_) {
      auto t = h.cast<py::tuple>();
      TORCH_CHECK(t.size() == 14, "StepProgram: a call is a 14-tuple, got ", t.size());
      Call c{t[0].cast<int64_t>(), t[1].cast<bool>(), t[2].cast<std::vector<int64_t>>(),
             t[3].cast<int64_t>(), t[4].cast<std::vector<int64_t>>(),
             t[5].cast<std::vector<int64_t>>(), t[6].cast<int64_t>(), t[7].cast<int64_t>(),
             t[8].cast<bool>(), t[9].cast<bool>(), t[10].cast<bool>(), t[11].cast<double>(),
             t[12].cast<at::Tensor>()};
      TORCH_CHECK(t[13].cast<int64_t>() == (int64_t)c.outs.size(), "StepProgram: n_out mismatch");
      for (auto s : c.history) TORCH_CHECK(s >= 0 && s < n_slots, "StepProgram: bad slot");
      for (auto s : c.outs) TORCH_CHECK(s >= 0 && s < n_slots, "StepProgram: bad slot");
      for (auto s : c.release) TORCH_CHECK(s >= 0 && s < n_slots, "StepProgram: bad slot");
      TORCH_CHECK(c.x_slot >= 0 && c.x_slot < n_slots && c.x_base < n_slots, "StepProgram: bad slot");
      TORCH_CHECK(c.x_at >= 0 && c.x_at < (int64_t)c.outs.size() && c.x_in_at < (int64_t)c.outs.size(),
                  "StepProgram: bad output index");
      calls.push_back(std::move(c));
    }
  }
};

bool is_number(PyObject* o) {
  return (PyFloat_Check(o) || PyLong_Check(o)) && !PyBool_Check(o);
}

// The value of a one-element CPU tensor (without a dispatcher call for the usual dtypes).
double scalar_of(const at::Tensor& t) {
  if (t.is_contiguous()) {
    switch (t.scalar_type()) {
      case at::kFloat: return *t.const_data_ptr<float>();
      case at::kDouble: return *t.const_data_ptr<double>();
      case at::kLong: return (double)*t.const_data_ptr<int64_t>();
      case at::kInt: return (double)*t.const_data_ptr<int32_t>();
      default: break;
    }
  }
  return t.item<double>();
}

// One run in the prepared form: the slots' tensors and the index of the next call. The
// Python run (fastdiff.samplers.sampler._Run) owns this object; its `k` and `x_in` are
// kept current from here (a borrowed reference: the run outlives what it owns).
struct Run {
  std::shared_ptr<Program> p;
  std::vector<at::Tensor> slots;  // undefined: empty
  std::vector<int64_t> shape;
  at::ScalarType dtype;
  at::Device device;
  int64_t k;
  PyObject* owner;

  Run(std::shared_ptr<Program> p_, py::object owner_, py::list slots_, const at::Tensor& like,
      int64_t k_)
      : p(std::move(p_)),
        shape(like.sizes().vec()),
        dtype(like.scalar_type()),
        device(like.device()),
        k(k_),
        owner(owner_.ptr()) {
    TORCH_CHECK((int64_t)slots_.size() == p->n_slots, "StepRun: expected ", p->n_slots, " slots");
    for (py::handle h : slots_) slots.push_back(h.is_none() ? at::Tensor() : h.cast<at::Tensor>());
  }

  bool like_x(const at::Tensor& t) const {
    return t.sizes() == c10::IntArrayRef(shape) && t.scalar_type() == dtype && t.device() == device;
  }

  // 0: t agrees with this call's model time (or is a device tensor, not read), else kCheckT.
  int check_t(const Call& c, PyObject* t) const {
    if (t == Py_None) return 0;
    double v;
    if (THPVariable_Check(t)) {
      const at::Tensor& tt = THPVariable_Unpack(t);
      const int64_t n = tt.numel();
      if (tt.dim() > 1 || (n != 1 && n != shape[0])) return kCheckT;  // Python raises
      if (tt.device().type() != at::kCPU) return 0;  // reading it would synchronise
      if (n != 1 || !c.check_t) return kCheckT;
      v = scalar_of(tt);
    } else if (is_number(t) && c.check_t) {
      v = PyFloat_AsDouble(t);
      if (v == -1.0 && PyErr_Occurred()) {
        PyErr_Clear();
        return kCheckT;
      }
    } else {
      return kCheckT;
    }
    return std::abs(v - c.t_want) <= p->t_tol * (1.0 + std::abs(c.t_want)) ? 0 : kCheckT;
  }

  void set_owner(const char* name, PyObject* value) {
    // value: a new reference (stolen)
    const int rc = PyObject_SetAttrString(owner, name, value);
    Py_DECREF(value);
    if (rc != 0) throw py::error_already_set();
  }

  py::object step(py::handle x_, py::handle m_, py::handle mc_, py::handle t_, py::handle z_,
                  bool donate) {
    if (k >= (int64_t)p->calls.size()) return py::int_((int)kFinished);
    if (p->epoch != g_backend_epoch.load(std::memory_order_relaxed)) return py::int_((int)kLeave);
    // The run outlives this call even if another thread drops it while the GIL is released.
    const py::object keep = py::reinterpret_borrow<py::object>(owner);
    const Call& c = p->calls[k];
    if (!THPVariable_Check(x_.ptr())) return py::int_((int)kLeave);
    const at::Tensor& x = THPVariable_Unpack(x_.ptr());
    if (!like_x(x) || !x.is_contiguous() || (c.x_owned && !x.is_same(slots[c.x_slot])))
      return py::int_((int)kLeave);
    const bool grad = at::GradMode::is_enabled();
    if (grad && x.requires_grad()) return py::int_((int)kLeave);
    if (p->owned ? (c.x_owned && !donate) : donate) return py::int_((int)kSwitch);
    if (!THPVariable_Check(m_.ptr())) return py::int_((int)kPrepare);
    const at::Tensor& m = THPVariable_Unpack(m_.ptr());
    if (!like_x(m)) return py::int_((int)kPrepare);
    if (grad && m.requires_grad()) return py::int_((int)kLeave);
    std::optional<at::Tensor> mc;
    if (!mc_.is_none()) {
      if (!p->guided || !THPVariable_Check(mc_.ptr())) return py::int_((int)kPrepare);
      const at::Tensor& t = THPVariable_Unpack(mc_.ptr());
      if (!like_x(t)) return py::int_((int)kPrepare);
      if (grad && t.requires_grad()) return py::int_((int)kLeave);
      mc = t.contiguous();
    }
    if (int code = check_t(c, t_.ptr())) return py::int_(code);
    std::optional<at::Tensor> z;
    if (c.noise) {
      if (!THPVariable_Check(z_.ptr())) return py::int_((int)kNoise);
      const at::Tensor& t = THPVariable_Unpack(z_.ptr());
      if (!like_x(t) || !t.is_contiguous()) return py::int_((int)kNoise);
      if (grad && t.requires_grad()) return py::int_((int)kLeave);
      z = t;
    }

    slots[c.x_slot] = x;
    std::vector<at::Tensor> history;
    history.reserve(c.history.size());
    for (auto s : c.history) history.push_back(slots[s]);
    std::optional<at::Tensor> base;
    if (c.x_base >= 0) base = slots[c.x_base];
    const at::Tensor mo = m.contiguous();
    bool into = p->owned;
    for (auto s : c.outs) into = into && slots[s].defined();
    std::vector<at::Tensor> outs;
    {
      // Other Python threads run while a long pass does (as torch.ops calls let them);
      // a short one keeps the GIL, which costs less than handing it over.
      std::optional<py::gil_scoped_release> no_gil;
      if (x.numel() >= kReleaseGil) no_gil.emplace();
      // Autograd was ruled out above (no input asks for it), so the dispatcher's
      // autograd-not-implemented fallback has nothing to do: skip it.
      at::AutoDispatchBelowADInplaceOrView guard;
      if (into) {
        // Contiguous inputs of x's size and dtype are either one of these tensors exactly
        // (a model returning its input) or share no memory with them: the op's rule for
        // outputs that are inputs.
        outs.reserve(c.outs.size());
        for (auto s : c.outs) outs.push_back(slots[s]);
        p->op_out.call(x, base, mo, mc, history, z, c.coeffs, c.clamp, outs);
      } else {
        // New outputs (shown to the caller, or the run's own memory the first time): the
        // op's recycled blocks.
        outs = p->op.call(x, base, mo, mc, history, z, c.coeffs, c.clamp, (int64_t)c.outs.size());
        for (size_t i = 0; i < outs.size(); ++i) slots[c.outs[i]] = outs[i];
      }
    }
    if (into) {
      // What the skipped fallback does for an op that writes its arguments.
      for (auto& o : outs)
        if (!o.is_inference()) torch::autograd::impl::bump_version(o);
    }
    for (auto s : c.release) slots[s] = at::Tensor();
    const at::Tensor& next = outs[c.x_at];
    PyObject* next_py = THPVariable_Wrap(next);
    if (next_py == nullptr) throw py::error_already_set();
    py::object result = py::reinterpret_steal<py::object>(next_py);
    if (c.x_in_at >= 0) {
      PyObject* x_in = THPVariable_Wrap(outs[c.x_in_at]);
      if (x_in == nullptr) throw py::error_already_set();
      PyObject* version = next.is_inference()
          ? (Py_INCREF(Py_None), Py_None)
          : PyLong_FromUnsignedLong(next.unsafeGetTensorImpl()->version_counter().current_version());
      Py_INCREF(next_py);
      set_owner("x_in", PyTuple_Pack(3, next_py, x_in, version));
      Py_DECREF(next_py);
      Py_DECREF(x_in);
      Py_DECREF(version);
    }
    k += 1;
    set_owner("k", PyLong_FromLongLong(k));
    return result;
  }

  py::list get_slots() const {
    py::list out;
    for (const auto& t : slots) {
      if (t.defined())
        out.append(py::cast(t));
      else
        out.append(py::none());
    }
    return out;
  }
};

}  // namespace

// The extension module: importing it also runs the op registrations (csrc/fastdiff.cpp).
PYBIND11_MODULE(_C, m) {
  m.doc() = "fastdiff's compiled kernels (registered as torch.ops.fastdiff.*) and the prepared sampler step";
  m.def("_backend_changed", [] { g_backend_epoch.fetch_add(1, std::memory_order_relaxed); },
        "Called by fastdiff._ops.set_backend: runs stepped here leave for the general step");
  m.def("_backend_epoch", [] { return g_backend_epoch.load(std::memory_order_relaxed); },
        "How many times the backend changed (a prepared program is built for one epoch)");
  py::class_<Program, std::shared_ptr<Program>>(m, "StepProgram")
      .def(py::init<const std::string&, py::list, int64_t, bool, bool, double>(), py::arg("op"),
           py::arg("calls"), py::arg("n_slots"), py::arg("owned"), py::arg("guided"),
           py::arg("t_tol"))
      .def_readonly("owned", &Program::owned);
  py::class_<Run>(m, "StepRun")
      .def(py::init<std::shared_ptr<Program>, py::object, py::list, const at::Tensor&, int64_t>(),
           py::arg("program"), py::arg("owner"), py::arg("slots"), py::arg("like"), py::arg("k"))
      .def("step", &Run::step, py::arg("x"), py::arg("model_out"), py::arg("model_out_cond"),
           py::arg("t"), py::arg("noise"), py::arg("donate"))
      .def("slots", &Run::get_slots)
      .def_property_readonly("owned", [](const Run& r) { return r.p->owned; });
}
