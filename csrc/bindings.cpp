// pybind11 module cllm._core: converts and validates at the boundary, does no maths. The GIL is released around
// all work. Parameters and gradients are exposed as NumPy views into the model's buffers. The per-part kernels
// (_core.kernels) are bound in bindings_kernels.cpp.
#include <pybind11/stl.h>

#include <dlfcn.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <mutex>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <thread>
#include <type_traits>

#include "bindings.h"
#include "cllm.h"
#include "isa.h"

namespace cllm_py {

using namespace cllm;

FloatArray zeros(std::vector<py::ssize_t> shape) {
    FloatArray a(shape);
    std::fill(a.mutable_data(), a.mutable_data() + a.size(), 0.0f);
    return a;
}

void check_ids(const IntArray& a, const char* what, int vocab_size) {
    const int32_t* d = a.data();
    const int64_t n = a.size(), T = a.ndim() == 2 ? a.shape(1) : n;
    for (int64_t i = 0; i < n; i++)
        if (d[i] < 0 || d[i] >= vocab_size) {
            std::ostringstream s;
            s << "token id " << d[i] << " out of range for vocab_size " << vocab_size << " (" << what;
            if (a.ndim() == 2) s << " batch row " << i / T << ",";
            s << " position " << i % T << ")";
            throw py::value_error(s.str());
        }
}

void check_tokens(const IntArray& a, const char* what, int vocab_size, int max_seq_len) {
    if (a.ndim() != 2)
        throw py::value_error(std::string(what) + " must be 2-D [batch, time], got " + std::to_string(a.ndim()) +
                              "-D");
    const int64_t B = a.shape(0), T = a.shape(1);
    if (B == 0 || T == 0)
        throw py::value_error(std::string(what) + " is empty (shape [" + std::to_string(B) + ", " +
                              std::to_string(T) + "])");
    if (T > max_seq_len)
        throw py::value_error("sequence length " + std::to_string(T) + " exceeds max_seq_len " +
                              std::to_string(max_seq_len));
    check_ids(a, what, vocab_size);
}

namespace {

// ---- the model -----------------------------------------------------------------------------------
// A Model with a lock: one call at a time touches its buffers and arena. `holder` is the thread in a locked call
// and `busy` names that call: a callback it runs (on_step, on_grads_ready) that uses the model again is refused,
// as waiting for the lock its own thread holds would wait for ever.
struct PyModel {
    Model m;
    std::mutex mu;
    std::atomic<std::thread::id> holder{};
    const char* busy = "";  // written and read by the holder only
    PyModel(const Config& c, uint64_t seed) : m(c, seed) {}
    const Config& cfg() const { return m.cfg; }
};

// Runs f(model) without the GIL, holding the model's lock; `what` names the call for a re-entry's error.
template <class F>
auto locked(PyModel& pm, const char* what, F&& f) {
    if (pm.holder.load() == std::this_thread::get_id())
        throw std::runtime_error(std::string("the model is running ") + pm.busy +
                                 " on this thread: it cannot be used (" + what +
                                 ") from that call's own callback (on_step, on_text, on_grads_ready)");
    py::gil_scoped_release release;
    std::lock_guard<std::mutex> lock(pm.mu);
    struct Hold {
        PyModel& pm;
        Hold(PyModel& p, const char* w) : pm(p) {
            pm.busy = w;
            pm.holder.store(std::this_thread::get_id());
        }
        ~Hold() { pm.holder.store(std::thread::id()); }
    } hold(pm, what);
    return f(pm.m);
}

// fn() with the GIL, holding the model's lock: Python code that changes the weights (load_parameters, an optimizer
// step, EMA swaps) waits for a running generate, which then sees one model throughout.
py::object exclusive(PyModel& pm, py::object fn) {
    return locked(pm, "exclusive(fn)", [&](Model&) {
        py::gil_scoped_acquire gil;
        return fn();
    });
}

py::array view(py::object owner, float* ptr, const std::vector<int64_t>& shape) {
    std::vector<py::ssize_t> sh(shape.begin(), shape.end());
    return py::array_t<float>(sh, ptr, owner);  // no copy: a view kept alive by its owner
}

// {name: view} over the parameter or the gradient buffer
py::dict tensor_views(py::object self, FloatBuffer Model::*buffer) {
    Model& m = self.cast<PyModel&>().m;
    py::dict out;
    for (auto& t : m.layout.tensors) out[py::str(t.name)] = view(self, (m.*buffer).get() + t.offset, t.shape);
    return out;
}
py::dict param_views(py::object self) { return tensor_views(self, &Model::params); }
py::dict grad_views(py::object self) { return tensor_views(self, &Model::grads); }
py::array flat_params(py::object self) {
    Model& m = self.cast<PyModel&>().m;
    return view(self, m.params.get(), {(int64_t)m.layout.total});
}
py::array flat_grads(py::object self) {
    Model& m = self.cast<PyModel&>().m;
    return view(self, m.grads.get(), {(int64_t)m.layout.total});
}

FloatArray position_table(PyModel& pm) {
    const Config& c = pm.cfg();
    require(pm.m.positions() != nullptr, "a llama model has no position table: its positions are rotary (RoPE)");
    FloatArray out = empty({c.max_seq_len, c.embedding_dim});
    std::copy(pm.m.positions(), pm.m.positions() + (size_t)c.max_seq_len * c.embedding_dim, out.mutable_data());
    return out;
}

void check_pair(PyModel& pm, const IntArray& x, const IntArray& y) {
    if (x.ndim() != y.ndim() || x.shape(0) != y.shape(0) || (x.ndim() > 1 && x.shape(1) != y.shape(1)))
        throw py::value_error("inputs and targets must have the same shape");
    check_tokens(x, "inputs", pm.cfg().vocab_size, pm.cfg().max_seq_len);
    check_tokens(y, "targets", pm.cfg().vocab_size, pm.cfg().max_seq_len);
}

// on_grads_ready (None or a callable(from, to)) runs with the GIL as the backward finishes the gradients [from, to).
// embedding_grad (None or a float32 [B, T, C] array, tied head only) receives the gradient at the embedding output
// instead of wte and wpe (Model::backward's demb).
float forward_backward(PyModel& pm, const IntArray& x, const IntArray& y, bool accumulate, float grad_scale,
                       float label_smoothing, py::object on_grads_ready, std::optional<py::array> embedding_grad) {
    check_pair(pm, x, y);
    require(label_smoothing >= 0.0f && label_smoothing <= 1.0f, "label_smoothing must be in [0, 1]");
    const int B = (int)x.shape(0), T = (int)x.shape(1), C = pm.cfg().embedding_dim;
    float* demb = nullptr;
    if (embedding_grad) {
        py::array& e = *embedding_grad;  // written in place: never a converted copy
        require(pm.cfg().tie_embeddings, "embedding_grad needs a tied head (tie_embeddings)");
        require(e.dtype().is(py::dtype::of<float>()) && (e.flags() & py::array::c_style) && e.writeable() &&
                    e.ndim() == 3 && e.shape(0) == B && e.shape(1) == T && e.shape(2) == C,
                "embedding_grad must be a writable C-contiguous float32 array [B, T, C] = [" + std::to_string(B) +
                    ", " + std::to_string(T) + ", " + std::to_string(C) + "]");
        demb = static_cast<float*>(e.mutable_data());
    }
    GradsReady ready;
    if (!on_grads_ready.is_none())
        ready = [&on_grads_ready](size_t from, size_t to) {
            py::gil_scoped_acquire gil;
            on_grads_ready(from, to);  // a Python exception leaves the backward as error_already_set
        };
    return locked(pm, "forward_backward", [&](Model& m) {
        return m.forward_backward(x.data(), y.data(), B, T, accumulate, grad_scale, label_smoothing, ready, demb);
    });
}

FloatArray forward(PyModel& pm, const IntArray& x) {
    check_tokens(x, "inputs", pm.cfg().vocab_size, pm.cfg().max_seq_len);
    const int B = (int)x.shape(0), T = (int)x.shape(1), V = pm.cfg().vocab_size;
    FloatArray out = empty({B, T, V});
    float* o = out.mutable_data();
    locked(pm, "forward", [&](Model& m) {
        m.forward(x.data(), B, T, Dropout{});
        std::copy(m.acts.logits, m.acts.logits + (size_t)B * T * V, o);
    });
    return out;
}

float loss(PyModel& pm, const IntArray& x, const IntArray& y) {
    check_pair(pm, x, y);
    const int B = (int)x.shape(0), T = (int)x.shape(1);
    return locked(pm, "loss", [&](Model& m) {
        m.forward(x.data(), B, T, Dropout{});
        return m.loss_only(y.data());
    });
}

void zero_grad(PyModel& pm) {
    locked(pm, "zero_grad", [](Model& m) { m.zero_grad(); });
}

// The dropout masks the next forward_backward will use, {site name: mask} (for tests).
py::dict dropout_masks(PyModel& pm, int B, int T) {
    const Config& c = pm.cfg();
    require(B > 0 && T > 0 && T <= c.max_seq_len, "invalid B, T for dropout_masks");
    const Dropout d = locked(pm, "dropout_masks", [](Model& m) { return m.step_dropout(); });
    const size_t BTC = (size_t)B * T * c.embedding_dim;
    py::dict out;
    auto resid = [&](uint64_t site) {
        FloatArray a = empty({B, T, c.embedding_dim});
        float* p = a.mutable_data();
        nogil([&] { dropout_mask(p, BTC, d, site); });
        return a;
    };
    out["emb"] = resid(site_embedding());
    for (int l = 0; l < c.num_layers; l++) {
        const std::string h = "h." + std::to_string(l) + ".";
        FloatArray a = empty({B, c.num_heads, T, T});
        float* p = a.mutable_data();
        nogil([&] { attention_dropout_mask(p, B, T, c.num_heads, d, site_attn(l)); });
        out[py::str(h + "attn")] = a;
        out[py::str(h + "attn_resid")] = resid(site_attn_resid(l));
        out[py::str(h + "mlp_resid")] = resid(site_mlp_resid(l));
    }
    return out;
}

// One token array [n_b] per prompt; with return_logits also one logits array [n_b, V] per prompt. on_step (None or
// a callable (sequences, tokens) -> sequences to stop) runs with the GIL after each step.
py::object generate_tokens(PyModel& pm, const std::vector<IntArray>& prompts, int max_new_tokens, const Sampling& s,
                           const std::vector<uint64_t>& seeds, const IntArray& stop_tokens, py::object on_step,
                           bool return_logits, const std::string& precision) {
    require(precision == "fp32" || precision == "bf16", "precision must be 'fp32' or 'bf16', got '" + precision + "'");
    require(max_new_tokens >= 0, "max_new_tokens must be >= 0");
    require(!prompts.empty() && seeds.size() == prompts.size(), "one seed per prompt, at least one prompt");
    require(stop_tokens.ndim() == 1, "stop_tokens must be a 1-D array of token ids");
    check_ids(stop_tokens, "stop_tokens", pm.cfg().vocab_size);
    std::vector<std::vector<int32_t>> p;
    for (const IntArray& a : prompts) {
        require(a.ndim() == 1, "prompt must be a 1-D array of token ids");
        check_ids(a, "prompt", pm.cfg().vocab_size);
        p.emplace_back(a.data(), a.data() + a.shape(0));
    }
    const std::vector<int32_t> stops(stop_tokens.data(), stop_tokens.data() + stop_tokens.shape(0));
    // After each step, with the GIL: Python's signal handlers (Ctrl-C: SIGINT's KeyboardInterrupt ends the loop and
    // is raised once out), then on_step. A Python exception leaves through the loop as error_already_set.
    struct Interrupted {};
    const StepCallback callback = [&on_step](const std::vector<int>& seqs, const std::vector<int32_t>& tokens) {
        py::gil_scoped_acquire gil;
        if (PyErr_CheckSignals() != 0) throw Interrupted{};
        if (on_step.is_none()) return std::vector<int>{};
        py::object stop = on_step(py::cast(seqs), py::cast(tokens));
        return stop.is_none() ? std::vector<int>{} : stop.cast<std::vector<int>>();
    };
    std::vector<std::vector<float>> logits;
    std::vector<std::vector<int32_t>> out;
    try {
        out = locked(pm, "generate", [&](Model& m) {
            return generate(m, p, max_new_tokens, s, precision == "bf16", seeds, stops, callback,
                            return_logits ? &logits : nullptr);
        });
    } catch (const Interrupted&) {
        throw py::error_already_set();
    }
    py::list toks, lgs;
    for (size_t b = 0; b < out.size(); b++) {
        py::array_t<int32_t> t((py::ssize_t)out[b].size());
        std::copy(out[b].begin(), out[b].end(), t.mutable_data());
        toks.append(t);
        if (!return_logits) continue;
        FloatArray lg = empty({(py::ssize_t)(logits[b].size() / pm.cfg().vocab_size), pm.cfg().vocab_size});
        std::copy(logits[b].begin(), logits[b].end(), lg.mutable_data());
        lgs.append(lg);
    }
    return return_logits ? py::object(py::make_tuple(toks, lgs)) : py::object(toks);
}

void bind_model(py::module_& mod) {
    py::class_<PyModel>(mod, "Model")
        .def(py::init<const Config&, uint64_t>(), py::arg("config"), py::arg("seed"),
             py::call_guard<py::gil_scoped_release>())  // allocating and initialising every weight
        .def_property_readonly("layout", [](const PyModel& pm) { return pm.m.layout; })
        .def("param_views", &param_views)
        .def("grad_views", &grad_views)
        .def("flat_params", &flat_params)
        .def("flat_grads", &flat_grads)
        .def("position_table", &position_table)
        .def_property_readonly("arena_bytes",
                               [](const PyModel& pm) { return pm.m.acts.arena_floats * sizeof(float); })
        .def_property_readonly("decode_storage_floats",  // kept after the first generate(bf16)
                               [](const PyModel& pm) { return pm.m.decode_panels_floats; })
        .def("release_decode_storage",
             [](PyModel& pm) {
                 locked(pm, "release_generation_memory", [](Model& m) {
                     m.decode_panels.reset();
                     m.decode_panels_floats = 0;
                 });
             })
        .def_property(
            "dropout_step", [](const PyModel& pm) { return pm.m.dropout_step; },
            [](PyModel& pm, uint64_t s) { pm.m.dropout_step = s; })
        .def_property(
            "dropout_stream", [](const PyModel& pm) { return pm.m.dropout_stream; },
            [](PyModel& pm, uint64_t s) { pm.m.dropout_stream = s; })
        .def("forward_backward", &forward_backward, py::arg("x"), py::arg("y"), py::arg("accumulate") = false,
             py::arg("grad_scale") = 1.0f, py::arg("label_smoothing") = 0.0f, py::arg("on_grads_ready") = py::none(),
             py::arg("embedding_grad") = py::none())
        .def("forward", &forward, py::arg("x"))
        .def("loss", &loss, py::arg("x"), py::arg("y"))
        .def("zero_grad", &zero_grad)
        .def("dropout_masks", &dropout_masks, py::arg("B"), py::arg("T"))
        .def("generate", &generate_tokens, py::arg("prompts"), py::arg("max_new_tokens"), py::arg("sampling"),
             py::arg("seeds"), py::arg("stop_tokens"), py::arg("on_step"), py::arg("return_logits") = false,
             py::arg("precision") = "fp32")
        .def("exclusive", &exclusive, py::arg("fn"), "fn() holding the model's lock (a running generate ends first)");
}

// ---- config and layout ---------------------------------------------------------------------------
py::list layout_tensors(const ParamLayout& l) {
    py::list out;
    for (auto& t : l.tensors) out.append(py::make_tuple(t.name, t.shape, t.offset, t.size, t.decay));
    return out;
}

// How a config field crosses the boundary: its kind for Python ("int", "float", "bool", "choice"), its choices,
// and the conversion of an enum to and from its name.
template <class T> struct Field;
template <> struct Field<int> { static constexpr const char* kind = "int"; };
template <> struct Field<float> { static constexpr const char* kind = "float"; };
template <> struct Field<bool> { static constexpr const char* kind = "bool"; };
template <class E, size_t N>
struct Choice {
    static constexpr const char* kind = "choice";
    static std::vector<std::string> choices() { return {std::begin(Field<E>::names), std::end(Field<E>::names)}; }
    static std::string to_str(E e) { return Field<E>::names[(int)e]; }
    static E parse(const std::string& field, const std::string& s) {
        for (size_t i = 0; i < N; i++)
            if (s == Field<E>::names[i]) return (E)i;
        std::string all;
        for (auto& n : Field<E>::names) all += (all.empty() ? "'" : ", '") + std::string(n) + "'";
        throw py::value_error(field + " must be one of " + all + ", got '" + s + "'");
    }
};
template <> struct Field<Arch> : Choice<Arch, 2> { static constexpr const char* names[] = {"gpt2", "llama"}; };
template <> struct Field<Pos> : Choice<Pos, 4> {
    static constexpr const char* names[] = {"auto", "learned", "sinusoidal", "rope"};
};

// The default as written in the field list (a float's as its double literal: 1e-5, not 1e-5f's 9.99999975e-06).
template <class T, class V> py::object field_default(V v) {
    if constexpr (std::is_enum_v<T>) return py::str(Field<T>::to_str(v)); else return py::cast(v);
}
template <class T> py::object field_choices() {
    if constexpr (std::is_enum_v<T>) return py::cast(Field<T>::choices()); else return py::none();
}

// An enum field reads and writes as its name; the others as themselves.
template <class T, T Config::*member>
void bind_field(py::class_<Config>& config, const char* name, const char* help) {
    if constexpr (std::is_enum_v<T>)
        config.def_property(
            name, [](const Config& c) { return Field<T>::to_str(c.*member); },
            [name](Config& c, const std::string& s) { c.*member = Field<T>::parse(name, s); }, help);
    else
        config.def_readwrite(name, member, help);
}

void bind_config(py::module_& mod) {
    py::class_<Config> config(mod, "Config");
    config.def(py::init<>()).def_readwrite("bf16", &Config::bf16);
    py::list fields;
#define CLLM_BIND_FIELD(T_, N_, V_, H_)                                                                            \
    bind_field<T_, &Config::N_>(config, #N_, H_);                                                                  \
    fields.append(py::make_tuple(#N_, Field<T_>::kind, field_default<T_>(V_), field_choices<T_>(), H_));
    CLLM_CONFIG_FIELDS(CLLM_BIND_FIELD)
#undef CLLM_BIND_FIELD
    mod.attr("config_fields") = py::tuple(fields);  // (name, kind, default, choices or None, help), in order
    mod.def("resolve_config", &resolve_config, py::arg("config"),
            "the config with its auto choices made, after validate_config's rules (ValueError naming the field)");
    // The parameter layout of a config, without allocating: the one source of names, shapes and offsets.
    py::class_<ParamLayout>(mod, "ParamLayout")
        .def(py::init<const Config&>(), py::arg("config"))
        .def_readonly("total", &ParamLayout::total, "floats in the flat buffer (tensors padded to 16 floats)")
        .def_readonly("parameters", &ParamLayout::parameters, "the tensors' floats, without the padding")
        .def_property_readonly("tensors", &layout_tensors, "[(name, shape, offset, size, decay)] in buffer order");
    mod.def("activation_floats", &activation_floats, py::arg("config"), py::arg("B"), py::arg("T"),
            "floats of the activation arena of a [B, T] training step");
    mod.def("generation_floats", &generation_floats, py::arg("config"), py::arg("batch"), py::arg("max_new_tokens"),
            py::arg("return_logits"), py::arg("bf16") = false,
            "floats generate() allocates (KV caches, scratch, prefill arena, logits; bf16: the weight copies)");
    py::class_<Sampling>(mod, "Sampling")
        .def(py::init<>())
        .def_readwrite("temperature", &Sampling::temperature)
        .def_readwrite("top_k", &Sampling::top_k)
        .def_readwrite("top_p", &Sampling::top_p)
        .def_readwrite("repetition_penalty", &Sampling::repetition_penalty)
        .def_readwrite("frequency_penalty", &Sampling::frequency_penalty)
        .def_readwrite("presence_penalty", &Sampling::presence_penalty)
        .def_readwrite("vocab_limit", &Sampling::vocab_limit);
    mod.def("dropout_mask_floats", &dropout_mask_floats, py::arg("config"), py::arg("B"), py::arg("T"),
            "floats of the masks Model.dropout_masks(B, T) returns");
}

void set_threads(int n) {
    require(n >= 1, "number of threads must be >= 1, got " + std::to_string(n));
    set_num_threads(n);
}

// What runs where: the kernel variants built and the one in use, bf16, OpenMP. For `cllm info` and bug reports.
py::dict build_info() {
    const IsaInfo isa = isa_info();
    py::dict d;
    d["variants_built"] = isa.built;
    d["variants_supported"] = isa.supported;
    d["variant"] = isa.selected.empty() ? py::object(py::none()) : py::object(py::str(isa.selected));
    d["reason"] = isa.reason;
    d["library"] = isa.library;
    d["cpu_features"] = isa.cpu_features;
    // measured: the automatic choice uses AVX512_BF16 only where its dot products beat the fp32 FMAs
    d["bf16_dot_speed"] = has_bf16_dot() ? py::object(py::float_(bf16_dot_speed())) : py::object(py::none());
    if (!isa.selected.empty())
        d["bf16"] = kernels().native_bf16 ? "native (AVX-512 BF16 dot products, fp32 accumulation)"
                                          : "emulated exactly (bf16-rounded inputs, fp32 FMAs)";
    Dl_info omp{};
    const bool found = dladdr(reinterpret_cast<void*>(&omp_get_max_threads), &omp) && omp.dli_fname;
    d["openmp"] = "OpenMP " + std::to_string(_OPENMP) + " (" + (found ? omp.dli_fname : "runtime unknown") + ")";
    d["threads"] = get_num_threads();
    d["compiler"] = __VERSION__;
    return d;
}

void translate_invalid_argument(std::exception_ptr p) {
    try {
        if (p) std::rethrow_exception(p);
    } catch (const std::invalid_argument& e) {
        PyErr_SetString(PyExc_ValueError, e.what());
    }
}

}  // namespace
}  // namespace cllm_py

PYBIND11_MODULE(_core, mod) {
    using namespace cllm_py;
    mod.doc() = "CLLM C++ core";
    py::register_exception_translator(&translate_invalid_argument);
    bind_config(mod);
    bind_model(mod);
    bind_optimizer(mod);
    mod.def("get_num_threads", &cllm::get_num_threads);
    mod.def("set_num_threads", &set_threads);
    mod.def("build_info", &build_info);
    mod.def("select_isa", &select_isa, py::arg("variant"),
            "use another kernel variant from now on (tests); normally chosen once, from $CLLM_ISA or the CPU");
    bind_kernels(mod);
}
