// The block's MLP, forward and backward: GPT-2's c_fc -> GELU (tanh approximation) -> c_proj, or Llama's SwiGLU
// down_proj(silu(gate_proj x) * up_proj x); and the two activations themselves.
// GPT-2's forward takes GELU from c_fc's GEMM epilogue (each finished tile while still in cache) and keeps only the
// pre-activation; SwiGLU keeps gate | up. The backward recomputes the activation from them rather than keeping F
// floats per token per layer.
#include "cllm.h"

namespace cllm {

void gelu_forward(float* out, const float* inp, size_t n) {
    #pragma omp parallel for simd schedule(static)
    for (size_t i = 0; i < n; i++) out[i] = gelu(inp[i]);
}

void gelu_backward(float* dinp, const float* dout, const float* inp, size_t n) {
    #pragma omp parallel for simd schedule(static)
    for (size_t i = 0; i < n; i++) {
        // with s = sigmoid(2u): 0.5 (1 + tanh u) = s and 1 - tanh^2 u = 4 s (1 - s)
        const float x = inp[i];
        const float s = gelu_sigmoid(x);
        const float grad = s + 2.0f * x * s * (1.0f - s) * kGeluScale * (1.0f + 3.0f * 0.044715f * x * x);
        dinp[i] = dout[i] * grad;
    }
}

#pragma omp declare simd
static inline float sigmoid(float x) { return 1.0f / (1.0f + fast_exp(-x)); }

void swiglu_forward(float* out, const float* gu, int N, int F) {
    #pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const float* g = gu + (size_t)n * 2 * F;
        const float* u = g + F;
        float* o = out + (size_t)n * F;
        #pragma omp simd
        for (int i = 0; i < F; i++) o[i] = g[i] * sigmoid(g[i]) * u[i];
    }
}

// d gate = dout * up * silu'(gate), silu'(x) = s (1 + x (1 - s)) with s = sigmoid(x); d up = dout * silu(gate)
void swiglu_backward(float* dgu, const float* dout, const float* gu, int N, int F) {
    #pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const float* g = gu + (size_t)n * 2 * F;
        const float* u = g + F;
        const float* d = dout + (size_t)n * F;
        float* dg = dgu + (size_t)n * 2 * F;
        float* du = dg + F;
        #pragma omp simd
        for (int i = 0; i < F; i++) {
            const float s = sigmoid(g[i]);
            dg[i] = d[i] * u[i] * s * (1.0f + g[i] * (1.0f - s));
            du[i] = d[i] * g[i] * s;
        }
    }
}

void feedforward_forward(float* out, float* fch, float* act_out, const float* inp, const FeedForward& ff, int N) {
    const int C = ff.C, F = ff.F;
    if (ff.swiglu()) {
        projection_forward(fch, 2 * F, inp, C, ff.gate_w, N, C, F, ff.bf16);
        projection_forward(fch + F, 2 * F, inp, C, ff.up_w, N, C, F, ff.bf16);
        swiglu_forward(act_out, fch, N, F);
        projection_forward(out, C, act_out, F, ff.down_w, N, F, C, ff.bf16);
        return;
    }
    linear_forward(fch, inp, ff.fc_w, ff.fc_b, N, C, F, ff.bf16, act_out);
    linear_forward(out, act_out, ff.proj_w, ff.proj_b, N, F, C, ff.bf16);
}

void feedforward_backward(float* dinp, const FeedForwardGrads& g, const float* dout, const float* inp,
                          const float* fch, float* act_scratch, float* dfch, const FeedForward& ff, int N) {
    const int C = ff.C, F = ff.F;
    if (ff.swiglu()) {
        swiglu_forward(act_scratch, fch, N, F);
        // down_proj's weight gradient reads act; then act's gradient takes its place
        projection_backward(nullptr, F, g.down_w, dout, C, act_scratch, ff.down_w, N, F, C, false, ff.bf16);
        projection_backward(act_scratch, F, nullptr, dout, C, act_scratch, ff.down_w, N, F, C, false, ff.bf16);
        swiglu_backward(dfch, act_scratch, fch, N, F);
        projection_backward(dinp, C, g.gate_w, dfch, 2 * F, inp, ff.gate_w, N, C, F, false, ff.bf16);
        projection_backward(dinp, C, g.up_w, dfch + F, 2 * F, inp, ff.up_w, N, C, F, true, ff.bf16);
        return;
    }
    const size_t NF = (size_t)N * F;
    gelu_forward(act_scratch, fch, NF);
    linear_backward(dfch, g.proj_w, g.proj_b, dout, act_scratch, ff.proj_w, N, F, C, false, ff.bf16);
    gelu_backward(dfch, dfch, fch, NF);
    linear_backward(dinp, g.fc_w, g.fc_b, dfch, inp, ff.fc_w, N, C, F, false, ff.bf16);
}

}  // namespace cllm
