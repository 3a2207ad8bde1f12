// pybind11 module cllm._core: converts and validates at the boundary, does no maths. The GIL is released
// around all kernel work. Parameters and gradients are exposed as NumPy views into the model's buffers.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <mutex>
#include <sstream>
#include <stdexcept>

#include "cllm.h"

namespace py = pybind11;
using namespace cllm;

using IntArray = py::array_t<int32_t, py::array::c_style>;
using FloatArray = py::array_t<float, py::array::c_style | py::array::forcecast>;

namespace {

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
    const int32_t* d = a.data();
    for (int64_t i = 0; i < B * T; i++)
        if (d[i] < 0 || d[i] >= vocab_size) {
            std::ostringstream s;
            s << "token id " << d[i] << " out of range for vocab_size " << vocab_size << " (" << what
              << " batch row " << i / T << ", position " << i % T << ")";
            throw py::value_error(s.str());
        }
}

void check_pair(const IntArray& x, const IntArray& y) {
    if (x.ndim() != y.ndim() || x.shape(0) != y.shape(0) || (x.ndim() > 1 && x.shape(1) != y.shape(1)))
        throw py::value_error("inputs and targets must have the same shape");
}

// Wraps a Model with a lock: one call at a time touches its buffers and arena.
struct PyModel {
    Model m;
    std::mutex mu;
    PyModel(const Config& c, uint64_t seed) : m(c, seed) {}
};

std::string shape_str(const py::array& a) {
    std::string s = "(";
    for (py::ssize_t i = 0; i < a.ndim(); i++) s += std::to_string(a.shape(i)) + (a.ndim() == 1 || i + 1 < a.ndim() ? "," : "");
    return s + ")";
}

py::array view(py::object owner, float* ptr, const std::vector<int64_t>& shape) {
    std::vector<py::ssize_t> sh(shape.begin(), shape.end());
    return py::array_t<float>(sh, ptr, owner);  // no copy: a view kept alive by its owner
}

using FlatArray = py::array_t<float, py::array::c_style>;

// A flat buffer of the layout's size (parameters, gradients or optimizer state).
void check_flat(const FlatArray& a, const ParamLayout& layout, const char* what) {
    if (a.ndim() != 1 || (size_t)a.shape(0) != layout.total)
        throw py::value_error(std::string(what) + " must be a flat float32 array of size " +
                              std::to_string(layout.total) + ", got shape " + shape_str(a));
}

FloatArray empty(std::vector<py::ssize_t> shape) { return FloatArray(shape); }

void require(bool ok, const std::string& msg) {
    if (!ok) throw py::value_error(msg);
}

// Floats of the dictionary dropout_masks(B, T) returns: [B,T,C] for the embedding, and per layer [B,H,T,T] for the
// attention probabilities and two [B,T,C] residual masks. Saturates at SIZE_MAX instead of wrapping around.
size_t dropout_mask_floats(const Config& c, int B, int T) {
    using u128 = unsigned __int128;
    const u128 BT = (u128)std::max(0, B) * std::max(0, T), C = c.embedding_dim, H = c.num_heads;
    const u128 total = BT * C + (u128)c.num_layers * (BT * H * std::max(0, T) + 2 * BT * C);
    return total > SIZE_MAX ? SIZE_MAX : (size_t)total;
}

}  // namespace

PYBIND11_MODULE(_core, mod) {
    mod.doc() = "CLLM C++ core";
    py::register_exception_translator([](std::exception_ptr p) {
        try {
            if (p) std::rethrow_exception(p);
        } catch (const std::invalid_argument& e) {
            PyErr_SetString(PyExc_ValueError, e.what());
        }
    });

    py::class_<Config>(mod, "Config")
        .def(py::init<>())
        .def_readwrite("vocab_size", &Config::vocab_size)
        .def_readwrite("max_seq_len", &Config::max_seq_len)
        .def_readwrite("embedding_dim", &Config::embedding_dim)
        .def_readwrite("num_layers", &Config::num_layers)
        .def_readwrite("num_heads", &Config::num_heads)
        .def_readwrite("ff_dim", &Config::ff_dim)
        .def_readwrite("dropout", &Config::dropout)
        .def_readwrite("learned_pos", &Config::learned_pos)
        .def_readwrite("bf16", &Config::bf16);

    // The parameter layout of a config, without allocating: the one source of names, shapes and offsets.
    py::class_<ParamLayout>(mod, "ParamLayout")
        .def(py::init<const Config&>(), py::arg("config"))
        .def_readonly("total", &ParamLayout::total, "floats in the flat buffer (tensors padded to 16 floats)")
        .def_property_readonly(
            "tensors",
            [](const ParamLayout& l) {
                py::list out;
                for (auto& t : l.tensors) out.append(py::make_tuple(t.name, t.shape, t.offset, t.size, t.decay));
                return out;
            },
            "[(name, shape, offset, size, decay)] in buffer order");
    mod.def("activation_floats", &activation_floats, py::arg("config"), py::arg("B"), py::arg("T"),
            "floats of the activation arena of a [B, T] training step");
    mod.def("generation_floats", &generation_floats, py::arg("config"), py::arg("max_new_tokens"),
            py::arg("return_logits"), "floats generate() allocates (KV cache, prefill arena, returned logits)");
    mod.def("dropout_mask_floats", &dropout_mask_floats, py::arg("config"), py::arg("B"), py::arg("T"),
            "floats of the masks Model.dropout_masks(B, T) returns");

    py::class_<PyModel>(mod, "Model")
        .def(py::init<const Config&, uint64_t>(), py::arg("config"), py::arg("seed"))
        .def_property_readonly("layout", [](const PyModel& pm) { return pm.m.layout; })
        .def("param_views",
             [](py::object self) {
                 PyModel& pm = self.cast<PyModel&>();
                 py::dict out;
                 for (auto& t : pm.m.layout.tensors) out[py::str(t.name)] = view(self, pm.m.params.get() + t.offset, t.shape);
                 return out;
             })
        .def("grad_views",
             [](py::object self) {
                 PyModel& pm = self.cast<PyModel&>();
                 py::dict out;
                 for (auto& t : pm.m.layout.tensors) out[py::str(t.name)] = view(self, pm.m.grads.get() + t.offset, t.shape);
                 return out;
             })
        .def("flat_params",
             [](py::object self) {
                 PyModel& pm = self.cast<PyModel&>();
                 return view(self, pm.m.params.get(), {(int64_t)pm.m.layout.total});
             })
        .def("flat_grads",
             [](py::object self) {
                 PyModel& pm = self.cast<PyModel&>();
                 return view(self, pm.m.grads.get(), {(int64_t)pm.m.layout.total});
             })
        .def("position_table",
             [](PyModel& pm) {
                 const Config& c = pm.m.cfg;
                 FloatArray out = empty({c.max_seq_len, c.embedding_dim});
                 std::copy(pm.m.positions(), pm.m.positions() + (size_t)c.max_seq_len * c.embedding_dim,
                           out.mutable_data());
                 return out;
             })
        .def_property_readonly("arena_bytes",
                               [](const PyModel& pm) { return pm.m.acts.arena_floats * sizeof(float); })
        .def_property(
            "dropout_step", [](const PyModel& pm) { return pm.m.dropout_step; },
            [](PyModel& pm, uint64_t s) { pm.m.dropout_step = s; })
        .def_property(
            "dropout_stream", [](const PyModel& pm) { return pm.m.dropout_stream; },
            [](PyModel& pm, uint64_t s) { pm.m.dropout_stream = s; })
        .def(
            "forward_backward",
            [](PyModel& pm, const IntArray& x, const IntArray& y, bool accumulate, float grad_scale) {
                check_pair(x, y);
                check_tokens(x, "inputs", pm.m.cfg.vocab_size, pm.m.cfg.max_seq_len);
                check_tokens(y, "targets", pm.m.cfg.vocab_size, pm.m.cfg.max_seq_len);
                py::gil_scoped_release nogil;
                std::lock_guard<std::mutex> lock(pm.mu);
                return pm.m.forward_backward(x.data(), y.data(), (int)x.shape(0), (int)x.shape(1), accumulate,
                                             grad_scale);
            },
            py::arg("x"), py::arg("y"), py::arg("accumulate") = false, py::arg("grad_scale") = 1.0f)
        .def(
            "forward",
            [](PyModel& pm, const IntArray& x) {
                check_tokens(x, "inputs", pm.m.cfg.vocab_size, pm.m.cfg.max_seq_len);
                const int B = (int)x.shape(0), T = (int)x.shape(1), V = pm.m.cfg.vocab_size;
                FloatArray out = empty({B, T, V});
                float* o = out.mutable_data();
                {
                    py::gil_scoped_release nogil;
                    std::lock_guard<std::mutex> lock(pm.mu);
                    pm.m.forward(x.data(), B, T, Dropout{});
                    std::copy(pm.m.acts.logits, pm.m.acts.logits + (size_t)B * T * V, o);
                }
                return out;
            },
            py::arg("x"))
        .def(
            "loss",
            [](PyModel& pm, const IntArray& x, const IntArray& y) {
                check_pair(x, y);
                check_tokens(x, "inputs", pm.m.cfg.vocab_size, pm.m.cfg.max_seq_len);
                check_tokens(y, "targets", pm.m.cfg.vocab_size, pm.m.cfg.max_seq_len);
                py::gil_scoped_release nogil;
                std::lock_guard<std::mutex> lock(pm.mu);
                pm.m.forward(x.data(), (int)x.shape(0), (int)x.shape(1), Dropout{});
                return pm.m.loss_only(y.data());
            },
            py::arg("x"), py::arg("y"))
        .def("zero_grad",
             [](PyModel& pm) {
                 std::lock_guard<std::mutex> lock(pm.mu);
                 pm.m.zero_grad();
             })
        .def(
            "dropout_masks",
            [](PyModel& pm, int B, int T) {
                const Config& c = pm.m.cfg;
                require(B > 0 && T > 0 && T <= c.max_seq_len, "invalid B, T for dropout_masks");
                Dropout d = pm.m.step_dropout();
                const int C = c.embedding_dim, H = c.num_heads;
                py::dict out;
                auto resid = [&](uint64_t site) {
                    FloatArray a = empty({B, T, C});
                    dropout_mask(a.mutable_data(), (size_t)B * T * C, d, site);
                    return a;
                };
                out["emb"] = resid(site_embedding());
                for (int l = 0; l < c.num_layers; l++) {
                    std::string h = "h." + std::to_string(l) + ".";
                    FloatArray a = empty({B, H, T, T});
                    attention_dropout_mask(a.mutable_data(), B, T, H, d, site_attn(l));
                    out[py::str(h + "attn")] = a;
                    out[py::str(h + "attn_resid")] = resid(site_attn_resid(l));
                    out[py::str(h + "mlp_resid")] = resid(site_mlp_resid(l));
                }
                return out;
            },
            py::arg("B"), py::arg("T"))
        .def(
            "generate",
            [](PyModel& pm, const IntArray& prompt, int max_new_tokens, float temperature, int top_k, float top_p,
               uint64_t seed, bool return_logits) {
                require(prompt.ndim() == 1, "prompt must be a 1-D array of token ids");
                require(max_new_tokens >= 0, "max_new_tokens must be >= 0");
                const Config& c = pm.m.cfg;
                const int32_t* d = prompt.data();
                for (py::ssize_t i = 0; i < prompt.shape(0); i++)
                    if (d[i] < 0 || d[i] >= c.vocab_size)
                        throw py::value_error("token id " + std::to_string(d[i]) + " out of range for vocab_size " +
                                              std::to_string(c.vocab_size) + " (prompt position " + std::to_string(i) + ")");
                std::vector<int32_t> p(d, d + prompt.shape(0)), out;
                std::vector<float> logits;
                {
                    py::gil_scoped_release nogil;
                    std::lock_guard<std::mutex> lock(pm.mu);
                    out = generate(pm.m, p, max_new_tokens, temperature, top_k, top_p, seed,
                                   return_logits ? &logits : nullptr);
                }
                py::array_t<int32_t> toks((py::ssize_t)out.size());
                std::copy(out.begin(), out.end(), toks.mutable_data());
                if (!return_logits) return py::object(toks);
                FloatArray lg = empty({(py::ssize_t)out.size(), c.vocab_size});
                std::copy(logits.begin(), logits.end(), lg.mutable_data());
                return py::object(py::make_tuple(toks, lg));
            },
            py::arg("prompt"), py::arg("max_new_tokens"), py::arg("temperature"), py::arg("top_k"), py::arg("top_p"),
            py::arg("seed"), py::arg("return_logits") = false);

    // ---- optimizer -----------------------------------------------------------------------------
    // ---- optimizer: kernels over flat buffers laid out by a ParamLayout -------------------------
    mod.def(
        "adamw_step",
        [](const ParamLayout& layout, FlatArray params, const FlatArray& grads, FlatArray m, FlatArray v, float lr,
           double beta1, double beta2, float eps, float weight_decay, int64_t step) {
            check_flat(params, layout, "params");
            check_flat(grads, layout, "grads");
            check_flat(m, layout, "exp_avg");
            check_flat(v, layout, "exp_avg_sq");
            require(step >= 1, "step must be >= 1");
            float *pp = params.mutable_data(), *mp = m.mutable_data(), *vp = v.mutable_data();
            const float* gp = grads.data();
            py::gil_scoped_release nogil;
            adamw_step(pp, gp, mp, vp, layout, lr, beta1, beta2, eps, weight_decay, step);
        },
        py::arg("layout"), py::arg("params"), py::arg("grads"), py::arg("exp_avg"), py::arg("exp_avg_sq"),
        py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"), py::arg("step"));
    mod.def(
        "sgd_step",
        [](const ParamLayout& layout, FlatArray params, const FlatArray& grads, FlatArray buf, float lr,
           float momentum, float weight_decay, bool nesterov, bool first_step) {
            check_flat(params, layout, "params");
            check_flat(grads, layout, "grads");
            check_flat(buf, layout, "momentum buffer");
            float *pp = params.mutable_data(), *bp = buf.mutable_data();
            const float* gp = grads.data();
            py::gil_scoped_release nogil;
            sgd_step(pp, gp, bp, layout, lr, momentum, weight_decay, nesterov, first_step);
        },
        py::arg("layout"), py::arg("params"), py::arg("grads"), py::arg("momentum_buffer"), py::arg("lr"),
        py::arg("momentum"), py::arg("weight_decay"), py::arg("nesterov"), py::arg("first_step"));
    mod.def(
        "grad_norm",
        [](const FlatArray& g) {
            require(g.ndim() == 1, "grads must be a flat float32 array");
            const float* p = g.data();
            const size_t n = (size_t)g.size();
            py::gil_scoped_release nogil;
            return grad_norm(p, n);
        },
        py::arg("grads"), "global L2 norm (accumulated in double)");
    mod.def(
        "scale_",
        [](FlatArray x, float s) {
            require(x.ndim() == 1, "x must be a flat float32 array");
            float* p = x.mutable_data();
            const size_t n = (size_t)x.size();
            py::gil_scoped_release nogil;
            scale_inplace(p, n, s);
        },
        py::arg("x"), py::arg("s"), "x *= s in place");
    mod.def("get_num_threads", &get_num_threads);
    mod.def("set_num_threads", [](int n) {
        require(n >= 1, "number of threads must be >= 1, got " + std::to_string(n));
        set_num_threads(n);
    });

    // ---- per-part kernels on NumPy arrays (used by the oracle tests and benchmarks) -----------------
    py::module_ k = mod.def_submodule("kernels", "Single kernels on float32 NumPy arrays");
    auto dims = [](const FloatArray& a, int nd, const char* what) {
        if (a.ndim() != nd)
            throw py::value_error(std::string(what) + " must be " + std::to_string(nd) + "-D");
    };
    k.def("sinusoidal_table", [](int P, int C) {
        require(P > 0 && C > 0, "P and C must be positive");
        FloatArray out = empty({P, C});
        sinusoidal_table(out.mutable_data(), P, C);
        return out;
    });
    k.def("embedding_forward", [dims](IntArray tokens, FloatArray wte, FloatArray pos) {
        dims(wte, 2, "wte");
        dims(pos, 2, "pos");
        require(tokens.ndim() == 2, "tokens must be 2-D");
        const int B = tokens.shape(0), T = tokens.shape(1), C = wte.shape(1);
        require(pos.shape(1) == C && pos.shape(0) >= T, "pos must be [P>=T, C]");
        check_tokens(tokens, "tokens", wte.shape(0), pos.shape(0));
        FloatArray out = empty({B, T, C});
        embedding_forward(out.mutable_data(), tokens.data(), wte.data(), pos.data(), B, T, C);
        return out;
    });
    k.def("embedding_backward", [dims](FloatArray dout, IntArray tokens, int V, int P) {
        dims(dout, 3, "dout");
        const int B = dout.shape(0), T = dout.shape(1), C = dout.shape(2);
        require(tokens.ndim() == 2 && tokens.shape(0) == B && tokens.shape(1) == T, "tokens must be [B,T]");
        check_tokens(tokens, "tokens", V, P);
        FloatArray dwte = empty({V, C}), dpos = empty({P, C});
        std::fill(dwte.mutable_data(), dwte.mutable_data() + (size_t)V * C, 0.0f);
        std::fill(dpos.mutable_data(), dpos.mutable_data() + (size_t)P * C, 0.0f);
        embedding_backward(dwte.mutable_data(), dpos.mutable_data(), dout.data(), tokens.data(), B, T, C);
        return py::make_tuple(dwte, dpos);
    });
    k.def("layernorm_forward", [dims](FloatArray x, FloatArray w, FloatArray b) {
        dims(x, 2, "x");
        const int N = x.shape(0), C = x.shape(1);
        require(w.size() == C && b.size() == C, "w and b must have C elements");
        FloatArray out = empty({N, C}), mean = empty({N}), rstd = empty({N});
        layernorm_forward(out.mutable_data(), mean.mutable_data(), rstd.mutable_data(), x.data(), w.data(), b.data(), N, C);
        return py::make_tuple(out, mean, rstd);
    });
    k.def("layernorm_backward", [dims](FloatArray dout, FloatArray x, FloatArray w, FloatArray mean, FloatArray rstd) {
        dims(x, 2, "x");
        const int N = x.shape(0), C = x.shape(1);
        require(dout.size() == (py::ssize_t)N * C && w.size() == C && mean.size() == N && rstd.size() == N,
                "shape mismatch");
        FloatArray dx = empty({N, C}), dw = empty({C}), db = empty({C});
        std::fill(dx.mutable_data(), dx.mutable_data() + (size_t)N * C, 0.0f);
        std::fill(dw.mutable_data(), dw.mutable_data() + C, 0.0f);
        std::fill(db.mutable_data(), db.mutable_data() + C, 0.0f);
        layernorm_backward(dx.mutable_data(), dw.mutable_data(), db.mutable_data(), dout.data(), x.data(), w.data(),
                           mean.data(), rstd.data(), N, C);
        return py::make_tuple(dx, dw, db);
    });
    k.def("linear_forward", [dims](FloatArray x, FloatArray w, FloatArray b) {
        dims(x, 2, "x");
        dims(w, 2, "w");
        const int N = x.shape(0), IC = x.shape(1), OC = w.shape(1);
        require(w.shape(0) == IC && b.size() == OC, "shape mismatch");
        FloatArray out = empty({N, OC});
        linear_forward(out.mutable_data(), x.data(), w.data(), b.data(), N, IC, OC);
        return out;
    });
    k.def("linear_backward", [dims](FloatArray dout, FloatArray x, FloatArray w) {
        dims(x, 2, "x");
        dims(w, 2, "w");
        const int N = x.shape(0), IC = x.shape(1), OC = w.shape(1);
        require(w.shape(0) == IC && dout.size() == (py::ssize_t)N * OC, "shape mismatch");
        FloatArray dx = empty({N, IC}), dw = empty({IC, OC}), db = empty({OC});
        std::fill(dw.mutable_data(), dw.mutable_data() + (size_t)IC * OC, 0.0f);
        std::fill(db.mutable_data(), db.mutable_data() + OC, 0.0f);
        linear_backward(dx.mutable_data(), dw.mutable_data(), db.mutable_data(), dout.data(), x.data(), w.data(), N, IC,
                        OC, false);
        return py::make_tuple(dx, dw, db);
    });
    k.def(
        "matmul",
        [dims](FloatArray a, FloatArray b, bool trans_a, bool trans_b, bool bf16) {
            dims(a, 2, "a");
            dims(b, 2, "b");
            const int M = trans_a ? a.shape(1) : a.shape(0), K = trans_a ? a.shape(0) : a.shape(1);
            const int N = trans_b ? b.shape(0) : b.shape(1), Kb = trans_b ? b.shape(1) : b.shape(0);
            require(K == Kb, "inner dimensions differ");
            FloatArray out = empty({M, N});
            {
                py::gil_scoped_release nogil;
                matmul(out.mutable_data(), a.data(), b.data(), M, N, K, trans_a, trans_b, false, bf16);
            }
            return out;
        },
        py::arg("a"), py::arg("b"), py::arg("trans_a") = false, py::arg("trans_b") = false, py::arg("bf16") = false);
    k.def("gelu_forward", [](FloatArray x) {
        FloatArray out(std::vector<py::ssize_t>(x.shape(), x.shape() + x.ndim()));
        gelu_forward(out.mutable_data(), x.data(), x.size());
        return out;
    });
    k.def("gelu_backward", [](FloatArray dout, FloatArray x) {
        require(dout.size() == x.size(), "shape mismatch");
        FloatArray out(std::vector<py::ssize_t>(x.shape(), x.shape() + x.ndim()));
        gelu_backward(out.mutable_data(), dout.data(), x.data(), x.size());
        return out;
    });
    k.def("attention_forward", [dims](FloatArray qkv, int H) {
        dims(qkv, 3, "qkv");
        const int B = qkv.shape(0), T = qkv.shape(1), C = qkv.shape(2) / 3;
        require(qkv.shape(2) % 3 == 0 && H > 0 && C % H == 0, "qkv last dim must be 3C with C % H == 0");
        FloatArray out = empty({B, T, C}), lse = empty({B, H, T});
        attention_forward(out.mutable_data(), lse.mutable_data(), qkv.data(), B, T, C, H, Dropout{}, 0);
        return py::make_tuple(out, lse);
    });
    k.def("attention_backward", [dims](FloatArray dout, FloatArray qkv, FloatArray out, FloatArray lse, int H) {
        dims(qkv, 3, "qkv");
        const int B = qkv.shape(0), T = qkv.shape(1), C = qkv.shape(2) / 3;
        require(qkv.shape(2) % 3 == 0 && H > 0 && C % H == 0, "qkv last dim must be 3C with C % H == 0");
        require(dout.size() == (py::ssize_t)B * T * C && out.size() == dout.size() && lse.size() == (py::ssize_t)B * H * T,
                "shape mismatch");
        FloatArray dqkv = empty({B, T, 3 * C});
        attention_backward(dqkv.mutable_data(), dout.data(), qkv.data(), out.data(), lse.data(), B, T, C, H, Dropout{}, 0);
        return dqkv;
    });
    k.def("feedforward_forward", [dims](FloatArray x, FloatArray wfc, FloatArray bfc, FloatArray wproj, FloatArray bproj) {
        dims(x, 2, "x");
        dims(wfc, 2, "w_fc");
        const int N = x.shape(0), C = x.shape(1), F = wfc.shape(1);
        require(wfc.shape(0) == C && bfc.size() == F && wproj.size() == (py::ssize_t)F * C && bproj.size() == C,
                "shape mismatch");
        std::vector<float> h((size_t)N * F), hg((size_t)N * F);
        FloatArray out = empty({N, C});
        linear_forward(h.data(), x.data(), wfc.data(), bfc.data(), N, C, F, false, hg.data());  // GELU epilogue
        linear_forward(out.mutable_data(), hg.data(), wproj.data(), bproj.data(), N, F, C);
        return out;
    });
    k.def("feedforward_backward", [dims](FloatArray dout, FloatArray x, FloatArray wfc, FloatArray bfc, FloatArray wproj,
                                         FloatArray bproj) {
        dims(x, 2, "x");
        dims(wfc, 2, "w_fc");
        const int N = x.shape(0), C = x.shape(1), F = wfc.shape(1);
        require(wfc.shape(0) == C && bfc.size() == F && wproj.size() == (py::ssize_t)F * C && bproj.size() == C &&
                    dout.size() == (py::ssize_t)N * C,
                "shape mismatch");
        std::vector<float> h((size_t)N * F), hg((size_t)N * F), dh((size_t)N * F);
        linear_forward(h.data(), x.data(), wfc.data(), bfc.data(), N, C, F);
        gelu_forward(hg.data(), h.data(), h.size());
        FloatArray dx = empty({N, C}), dwfc = empty({C, F}), dbfc = empty({F}), dwp = empty({F, C}), dbp = empty({C});
        for (FloatArray* a : {&dwfc, &dbfc, &dwp, &dbp}) std::fill(a->mutable_data(), a->mutable_data() + a->size(), 0.0f);
        linear_backward(dh.data(), dwp.mutable_data(), dbp.mutable_data(), dout.data(), hg.data(), wproj.data(), N, F, C,
                        false);
        gelu_backward(dh.data(), dh.data(), h.data(), dh.size());
        linear_backward(dx.mutable_data(), dwfc.mutable_data(), dbfc.mutable_data(), dh.data(), x.data(), wfc.data(), N,
                        C, F, false);
        return py::make_tuple(dx, dwfc, dbfc, dwp, dbp);
    });
    k.def("cross_entropy_forward", [dims](FloatArray logits, IntArray targets) {
        dims(logits, 2, "logits");
        const int N = logits.shape(0), V = logits.shape(1);
        require(targets.ndim() == 1 && targets.shape(0) == N, "targets must be [N]");
        for (int i = 0; i < N; i++) require(targets.data()[i] >= 0 && targets.data()[i] < V, "target out of range");
        FloatArray out = empty({N});
        cross_entropy_forward(out.mutable_data(), logits.data(), targets.data(), N, V);
        return out;
    });
    k.def("cross_entropy_backward", [dims](FloatArray logits, IntArray targets, float scale) {
        dims(logits, 2, "logits");
        const int N = logits.shape(0), V = logits.shape(1);
        require(targets.ndim() == 1 && targets.shape(0) == N, "targets must be [N]");
        for (int i = 0; i < N; i++) require(targets.data()[i] >= 0 && targets.data()[i] < V, "target out of range");
        FloatArray out = empty({N, V});
        cross_entropy_backward(out.mutable_data(), logits.data(), targets.data(), N, V, scale);
        return out;
    });
}
