// _core.kernels: each part's forward and backward on float32 NumPy arrays, for the oracle tests and benchmarks; and
// the optimizer functions of _core (bind_optimizer) over flat buffers. Shapes are checked and outputs allocated with
// the GIL held; the kernel itself runs without it.
#include <algorithm>
#include <vector>

#include "bindings.h"
#include "cllm.h"

namespace cllm_py {

using namespace cllm;

namespace {

void dims(const FloatArray& a, int nd, const char* what) {
    if (a.ndim() != nd) throw py::value_error(std::string(what) + " must be " + std::to_string(nd) + "-D");
}

FloatArray like(const FloatArray& x) { return FloatArray(std::vector<py::ssize_t>(x.shape(), x.shape() + x.ndim())); }

// qkv [B, T, (H + 2KV) hs], C = H hs; KV 0 means H
void qkv_dims(const FloatArray& qkv, int H, int& KV, int& B, int& T, int& C) {
    dims(qkv, 3, "qkv");
    if (KV == 0) KV = H;
    require(H > 0 && KV > 0 && H % KV == 0, "KV must divide H");
    B = qkv.shape(0), T = qkv.shape(1);
    const int64_t heads = (int64_t)H + 2 * (int64_t)KV, hs = qkv.shape(2) / heads;
    require(hs > 0 && qkv.shape(2) == heads * hs, "qkv last dim must be (H + 2KV) * head size");
    C = (int)(H * hs);
}

// logits [N, V] and targets [N] in [0, V)
void logits_dims(const FloatArray& logits, const IntArray& targets, int& N, int& V) {
    dims(logits, 2, "logits");
    N = logits.shape(0), V = logits.shape(1);
    require(targets.ndim() == 1 && targets.shape(0) == N, "targets must be [N]");
    for (int i = 0; i < N; i++) require(targets.data()[i] >= 0 && targets.data()[i] < V, "target out of range");
}

FloatArray sinusoidal(int P, int C) {
    require(P > 0 && C > 0, "P and C must be positive");
    FloatArray out = empty({P, C});
    float* o = out.mutable_data();
    nogil([&] { sinusoidal_table(o, P, C); });
    return out;
}

FloatArray embedding_fwd(IntArray tokens, FloatArray wte, FloatArray pos) {
    dims(wte, 2, "wte");
    dims(pos, 2, "pos");
    require(tokens.ndim() == 2, "tokens must be 2-D");
    const int B = tokens.shape(0), T = tokens.shape(1), C = wte.shape(1);
    require(pos.shape(1) == C && pos.shape(0) >= T, "pos must be [P>=T, C]");
    check_tokens(tokens, "tokens", wte.shape(0), pos.shape(0));
    FloatArray out = empty({B, T, C});
    float* o = out.mutable_data();
    nogil([&] { embedding_forward(o, tokens.data(), wte.data(), pos.data(), B, T, C); });
    return out;
}

py::tuple embedding_bwd(FloatArray dout, IntArray tokens, int V, int P) {
    dims(dout, 3, "dout");
    const int B = dout.shape(0), T = dout.shape(1), C = dout.shape(2);
    require(tokens.ndim() == 2 && tokens.shape(0) == B && tokens.shape(1) == T, "tokens must be [B,T]");
    check_tokens(tokens, "tokens", V, P);
    FloatArray dwte = zeros({V, C}), dpos = zeros({P, C});
    float *dw = dwte.mutable_data(), *dp = dpos.mutable_data();
    nogil([&] { embedding_backward(dw, dp, dout.data(), tokens.data(), B, T, C); });
    return py::make_tuple(dwte, dpos);
}

py::tuple layernorm_fwd(FloatArray x, FloatArray w, FloatArray b) {
    dims(x, 2, "x");
    const int N = x.shape(0), C = x.shape(1);
    require(w.size() == C && b.size() == C, "w and b must have C elements");
    FloatArray out = empty({N, C}), mean = empty({N}), rstd = empty({N});
    float *o = out.mutable_data(), *m = mean.mutable_data(), *r = rstd.mutable_data();
    nogil([&] { layernorm_forward(o, m, r, x.data(), w.data(), b.data(), N, C); });
    return py::make_tuple(out, mean, rstd);
}

py::tuple layernorm_bwd(FloatArray dout, FloatArray x, FloatArray w, FloatArray mean, FloatArray rstd) {
    dims(x, 2, "x");
    const int N = x.shape(0), C = x.shape(1);
    require(dout.size() == (py::ssize_t)N * C && w.size() == C && mean.size() == N && rstd.size() == N,
            "shape mismatch");
    FloatArray dx = zeros({N, C}), dw = zeros({C}), db = zeros({C});
    float *dxp = dx.mutable_data(), *dwp = dw.mutable_data(), *dbp = db.mutable_data();
    nogil([&] {
        layernorm_backward(dxp, dwp, dbp, dout.data(), x.data(), w.data(), mean.data(), rstd.data(), N, C);
    });
    return py::make_tuple(dx, dw, db);
}

FloatArray linear_fwd(FloatArray x, FloatArray w, FloatArray b) {
    dims(x, 2, "x");
    dims(w, 2, "w");
    const int N = x.shape(0), IC = x.shape(1), OC = w.shape(1);
    require(w.shape(0) == IC && b.size() == OC, "shape mismatch");
    FloatArray out = empty({N, OC});
    float* o = out.mutable_data();
    nogil([&] { linear_forward(o, x.data(), w.data(), b.data(), N, IC, OC); });
    return out;
}

py::tuple linear_bwd(FloatArray dout, FloatArray x, FloatArray w) {
    dims(x, 2, "x");
    dims(w, 2, "w");
    const int N = x.shape(0), IC = x.shape(1), OC = w.shape(1);
    require(w.shape(0) == IC && dout.size() == (py::ssize_t)N * OC, "shape mismatch");
    FloatArray dx = empty({N, IC}), dw = zeros({IC, OC}), db = zeros({OC});
    float *dxp = dx.mutable_data(), *dwp = dw.mutable_data(), *dbp = db.mutable_data();
    nogil([&] { linear_backward(dxp, dwp, dbp, dout.data(), x.data(), w.data(), N, IC, OC, false); });
    return py::make_tuple(dx, dw, db);
}

FloatArray gelu_fwd(FloatArray x) {
    FloatArray out = like(x);
    float* o = out.mutable_data();
    nogil([&] { gelu_forward(o, x.data(), x.size()); });
    return out;
}

FloatArray gelu_bwd(FloatArray dout, FloatArray x) {
    require(dout.size() == x.size(), "shape mismatch");
    FloatArray out = like(x);
    float* o = out.mutable_data();
    nogil([&] { gelu_backward(o, dout.data(), x.data(), x.size()); });
    return out;
}

py::tuple attention_fwd(FloatArray qkv, int H, int KV) {
    int B, T, C;
    qkv_dims(qkv, H, KV, B, T, C);
    FloatArray out = empty({B, T, C}), lse = empty({B, H, T});
    float *o = out.mutable_data(), *l = lse.mutable_data();
    nogil([&] { attention_forward(o, l, qkv.data(), B, T, C, H, KV, Dropout{}, 0); });
    return py::make_tuple(out, lse);
}

FloatArray attention_bwd(FloatArray dout, FloatArray qkv, FloatArray out, FloatArray lse, int H, int KV) {
    int B, T, C;
    qkv_dims(qkv, H, KV, B, T, C);
    require(dout.size() == (py::ssize_t)B * T * C && out.size() == dout.size() && lse.size() == (py::ssize_t)B * H * T,
            "shape mismatch");
    FloatArray dqkv = like(qkv);
    float* d = dqkv.mutable_data();
    nogil([&] {
        attention_backward(d, dout.data(), qkv.data(), out.data(), lse.data(), B, T, C, H, KV, Dropout{}, 0);
    });
    return dqkv;
}

py::tuple rmsnorm_fwd(FloatArray x, FloatArray w, float eps) {
    dims(x, 2, "x");
    const int N = x.shape(0), C = x.shape(1);
    require(w.size() == C, "w must have C elements");
    FloatArray out = empty({N, C}), rstd = empty({N});
    float *o = out.mutable_data(), *r = rstd.mutable_data();
    nogil([&] { rmsnorm_forward(o, r, x.data(), w.data(), N, C, eps); });
    return py::make_tuple(out, rstd);
}

py::tuple rmsnorm_bwd(FloatArray dout, FloatArray x, FloatArray w, FloatArray rstd) {
    dims(x, 2, "x");
    const int N = x.shape(0), C = x.shape(1);
    require(dout.size() == (py::ssize_t)N * C && w.size() == C && rstd.size() == N, "shape mismatch");
    FloatArray dx = zeros({N, C}), dw = zeros({C});
    float *dxp = dx.mutable_data(), *dwp = dw.mutable_data();
    nogil([&] { rmsnorm_backward(dxp, dwp, dout.data(), x.data(), w.data(), rstd.data(), N, C); });
    return py::make_tuple(dx, dw);
}

// x [B, T, heads, hs] rotated by position t (forward) or back (backward); a copy
FloatArray rope(FloatArray x, float theta, bool backward) {
    dims(x, 4, "x");
    const int B = x.shape(0), T = x.shape(1), heads = x.shape(2), hs = x.shape(3);
    require(hs % 2 == 0, "the head size must be even");
    FloatArray out = like(x);
    float* o = out.mutable_data();
    nogil([&] {
        std::vector<float> cos((size_t)T * (hs / 2)), sin(cos.size());
        rope_table(cos.data(), sin.data(), T, hs, theta);
        std::copy(x.data(), x.data() + x.size(), o);
        (backward ? rope_backward : rope_forward)(o, heads * hs, heads, hs, B, T, cos.data(), sin.data());
    });
    return out;
}
FloatArray rope_fwd(FloatArray x, float theta) { return rope(x, theta, false); }
FloatArray rope_bwd(FloatArray dx, float theta) { return rope(dx, theta, true); }

// gu [N, 2F] = gate | up
FloatArray swiglu_fwd(FloatArray gu) {
    dims(gu, 2, "gu");
    const int N = gu.shape(0), F = gu.shape(1) / 2;
    require(gu.shape(1) % 2 == 0, "gu must be [N, 2F]");
    FloatArray out = empty({N, F});
    float* o = out.mutable_data();
    nogil([&] { swiglu_forward(o, gu.data(), N, F); });
    return out;
}

FloatArray swiglu_bwd(FloatArray dout, FloatArray gu) {
    dims(gu, 2, "gu");
    const int N = gu.shape(0), F = gu.shape(1) / 2;
    require(gu.shape(1) % 2 == 0 && dout.size() == (py::ssize_t)N * F, "shape mismatch");
    FloatArray dgu = like(gu);
    float* d = dgu.mutable_data();
    nogil([&] { swiglu_backward(d, dout.data(), gu.data(), N, F); });
    return dgu;
}

// The MLP's weights from x [N, C], w_fc [C, F], b_fc [F], w_proj [F, C], b_proj [C]
FeedForward mlp_args(const FloatArray& x, const FloatArray& wfc, const FloatArray& bfc, const FloatArray& wproj,
                     const FloatArray& bproj) {
    dims(x, 2, "x");
    dims(wfc, 2, "w_fc");
    const int C = x.shape(1), F = wfc.shape(1);
    require(wfc.shape(0) == C && bfc.size() == F && wproj.size() == (py::ssize_t)F * C && bproj.size() == C,
            "shape mismatch");
    return {.fc_w = wfc.data(), .fc_b = bfc.data(), .proj_w = wproj.data(), .proj_b = bproj.data(), .C = C, .F = F};
}

FloatArray feedforward_fwd(FloatArray x, FloatArray wfc, FloatArray bfc, FloatArray wproj, FloatArray bproj) {
    const FeedForward ff = mlp_args(x, wfc, bfc, wproj, bproj);
    const int N = x.shape(0);
    FloatArray out = empty({N, ff.C});
    float* o = out.mutable_data();
    nogil([&] {
        std::vector<float> fch((size_t)N * ff.F), act((size_t)N * ff.F);
        feedforward_forward(o, fch.data(), act.data(), x.data(), ff, N);
    });
    return out;
}

py::tuple feedforward_bwd(FloatArray dout, FloatArray x, FloatArray wfc, FloatArray bfc, FloatArray wproj,
                          FloatArray bproj) {
    const FeedForward ff = mlp_args(x, wfc, bfc, wproj, bproj);
    const int N = x.shape(0), C = ff.C, F = ff.F;
    require(dout.size() == (py::ssize_t)N * C, "shape mismatch");
    FloatArray dx = empty({N, C}), dwfc = zeros({C, F}), dbfc = zeros({F}), dwp = zeros({F, C}), dbp = zeros({C});
    float* dxp = dx.mutable_data();
    const FeedForwardGrads g{.fc_w = dwfc.mutable_data(), .fc_b = dbfc.mutable_data(), .proj_w = dwp.mutable_data(),
                             .proj_b = dbp.mutable_data()};
    nogil([&] {
        std::vector<float> out((size_t)N * C), fch((size_t)N * F), act((size_t)N * F), dfch((size_t)N * F);
        feedforward_forward(out.data(), fch.data(), act.data(), x.data(), ff, N);
        feedforward_backward(dxp, g, dout.data(), x.data(), fch.data(), act.data(), dfch.data(), ff, N);
    });
    return py::make_tuple(dx, dwfc, dbfc, dwp, dbp);
}

void check_smoothing(float eps) { require(eps >= 0.0f && eps <= 1.0f, "label_smoothing must be in [0, 1]"); }

FloatArray cross_entropy_fwd(FloatArray logits, IntArray targets, float eps) {
    int N, V;
    logits_dims(logits, targets, N, V);
    check_smoothing(eps);
    FloatArray out = empty({N});
    float* o = out.mutable_data();
    nogil([&] { cross_entropy_forward(o, logits.data(), targets.data(), N, V, eps); });
    return out;
}

FloatArray cross_entropy_bwd(FloatArray logits, IntArray targets, float scale, float eps) {
    int N, V;
    logits_dims(logits, targets, N, V);
    check_smoothing(eps);
    FloatArray out = empty({N, V});
    float* o = out.mutable_data();
    nogil([&] { cross_entropy_backward(o, logits.data(), targets.data(), N, V, scale, eps); });
    return out;
}

}  // namespace

// C = op(a) op(b), op the transpose where asked
FloatArray matmul_kernel(FloatArray a, FloatArray b, bool trans_a, bool trans_b, bool bf16) {
    dims(a, 2, "a");
    dims(b, 2, "b");
    const int M = trans_a ? a.shape(1) : a.shape(0), K = trans_a ? a.shape(0) : a.shape(1);
    const int N = trans_b ? b.shape(0) : b.shape(1), Kb = trans_b ? b.shape(1) : b.shape(0);
    require(K == Kb, "inner dimensions differ");
    FloatArray out = empty({M, N});
    float* c = out.mutable_data();
    nogil([&] {
        gemm({.c = c, .ldc = N, .a = {a.data(), (int)a.shape(1), trans_a}, .b = {b.data(), (int)b.shape(1), trans_b},
              .m = M, .n = N, .k = K, .bf16 = bf16});
    });
    return out;
}

void bind_kernels(py::module_& mod) {
    py::module_ k = mod.def_submodule("kernels", "Single kernels on float32 NumPy arrays");
    // each part's forward and backward
    k.def("sinusoidal_table", &sinusoidal);
    k.def("embedding_forward", &embedding_fwd).def("embedding_backward", &embedding_bwd);
    k.def("layernorm_forward", &layernorm_fwd).def("layernorm_backward", &layernorm_bwd);
    k.def("linear_forward", &linear_fwd).def("linear_backward", &linear_bwd);
    k.def("matmul", &matmul_kernel, py::arg("a"), py::arg("b"), py::arg("trans_a") = false, py::arg("trans_b") = false,
          py::arg("bf16") = false);
    k.def("gelu_forward", &gelu_fwd).def("gelu_backward", &gelu_bwd);
    k.def("attention_forward", &attention_fwd, py::arg("qkv"), py::arg("H"), py::arg("KV") = 0)
        .def("attention_backward", &attention_bwd, py::arg("dout"), py::arg("qkv"), py::arg("out"), py::arg("lse"),
             py::arg("H"), py::arg("KV") = 0);
    k.def("rmsnorm_forward", &rmsnorm_fwd).def("rmsnorm_backward", &rmsnorm_bwd);
    k.def("rope_forward", &rope_fwd).def("rope_backward", &rope_bwd);
    k.def("swiglu_forward", &swiglu_fwd).def("swiglu_backward", &swiglu_bwd);
    k.def("feedforward_forward", &feedforward_fwd).def("feedforward_backward", &feedforward_bwd);
    k.def("cross_entropy_forward", &cross_entropy_fwd, py::arg("logits"), py::arg("targets"),
          py::arg("label_smoothing") = 0.0f);
    k.def("cross_entropy_backward", &cross_entropy_bwd, py::arg("logits"), py::arg("targets"), py::arg("scale"),
          py::arg("label_smoothing") = 0.0f);
}

// ---- optimizer: kernels over flat buffers laid out by a ParamLayout -------------------------------
namespace {

using FlatArray = py::array_t<float, py::array::c_style>;

std::string shape_str(const py::array& a) {
    std::string s = "(";
    for (py::ssize_t i = 0; i < a.ndim(); i++)
        s += std::to_string(a.shape(i)) + (a.ndim() == 1 || i + 1 < a.ndim() ? "," : "");
    return s + ")";
}

// A flat buffer of the layout's size (parameters, gradients or optimizer state).
void check_flat(const FlatArray& a, const ParamLayout& layout, const char* what) {
    if (a.ndim() != 1 || (size_t)a.shape(0) != layout.total)
        throw py::value_error(std::string(what) + " must be a flat float32 array of size " +
                              std::to_string(layout.total) + ", got shape " + shape_str(a));
}

// lo, hi: update only the parameters [lo, hi) (hi < 0: to the end), with moments of hi - lo floats (a ZeRO shard)
void adamw(const ParamLayout& layout, FlatArray params, const FlatArray& grads, FlatArray m, FlatArray v, float lr,
           double beta1, double beta2, float eps, float weight_decay, int64_t step, int64_t lo, int64_t hi) {
    check_flat(params, layout, "params");
    check_flat(grads, layout, "grads");
    if (hi < 0) hi = (int64_t)layout.total;
    require(0 <= lo && lo <= hi && hi <= (int64_t)layout.total,
            "adamw_step: the range [" + std::to_string(lo) + ", " + std::to_string(hi) + ") is not inside [0, " +
                std::to_string(layout.total) + ")");
    for (auto [a, name] : {std::pair{&m, "exp_avg"}, std::pair{&v, "exp_avg_sq"}})
        require(a->ndim() == 1 && a->shape(0) == hi - lo,
                std::string(name) + " must be a flat float32 array of " + std::to_string(hi - lo) +
                    " floats (the range)");
    require(step >= 1, "step must be >= 1");
    float *pp = params.mutable_data(), *mp = m.mutable_data(), *vp = v.mutable_data();
    const float* gp = grads.data();
    nogil([&] { adamw_step(pp, gp, mp, vp, layout, lr, beta1, beta2, eps, weight_decay, step, lo, hi); });
}

void sgd(const ParamLayout& layout, FlatArray params, const FlatArray& grads, FlatArray buf, float lr, float momentum,
         float weight_decay, bool nesterov, bool first_step) {
    check_flat(params, layout, "params");
    check_flat(grads, layout, "grads");
    check_flat(buf, layout, "momentum buffer");
    float *pp = params.mutable_data(), *bp = buf.mutable_data();
    const float* gp = grads.data();
    nogil([&] { sgd_step(pp, gp, bp, layout, lr, momentum, weight_decay, nesterov, first_step); });
}

double global_norm(const FlatArray& g) {
    require(g.ndim() == 1, "grads must be a flat float32 array");
    const float* p = g.data();
    const size_t n = (size_t)g.size();
    double norm = 0.0;
    nogil([&] { norm = grad_norm(p, n); });
    return norm;
}

void scale(FlatArray x, float s) {
    require(x.ndim() == 1, "x must be a flat float32 array");
    float* p = x.mutable_data();
    const size_t n = (size_t)x.size();
    nogil([&] { scale_inplace(p, n, s); });
}

}  // namespace

// The buffers written in place are noconvert(): a list, a strided or a float64 array would be converted into a
// temporary copy whose updates are lost (TypeError instead).
void bind_optimizer(py::module_& mod) {
    mod.def("adamw_step", &adamw, py::arg("layout"), py::arg("params").noconvert(), py::arg("grads"),
            py::arg("exp_avg").noconvert(), py::arg("exp_avg_sq").noconvert(), py::arg("lr"), py::arg("beta1"),
            py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"), py::arg("step"), py::arg("lo") = 0,
            py::arg("hi") = -1);
    mod.def("sgd_step", &sgd, py::arg("layout"), py::arg("params").noconvert(), py::arg("grads"),
            py::arg("momentum_buffer").noconvert(), py::arg("lr"), py::arg("momentum"), py::arg("weight_decay"),
            py::arg("nesterov"), py::arg("first_step"));
    mod.def("grad_norm", &global_norm, py::arg("grads"), "global L2 norm (accumulated in double)");
    mod.def("scale_", &scale, py::arg("x").noconvert(), py::arg("s"), "x *= s in place");
}

}  // namespace cllm_py
