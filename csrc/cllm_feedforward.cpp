// The block's MLP, c_fc -> GELU -> c_proj, and GELU itself (tanh approximation), forward and backward.
// The forward takes GELU from c_fc's GEMM epilogue (each finished tile while still in cache) and keeps only the
// pre-activation; the backward recomputes GELU from it rather than keeping F floats per token per layer.
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

void feedforward_forward(float* out, float* fch, float* gelu_out, const float* inp, const FeedForward& ff, int N) {
    linear_forward(fch, inp, ff.fc_w, ff.fc_b, N, ff.C, ff.F, ff.bf16, gelu_out);
    linear_forward(out, gelu_out, ff.proj_w, ff.proj_b, N, ff.F, ff.C, ff.bf16);
}

void feedforward_backward(float* dinp, const FeedForwardGrads& g, const float* dout, const float* inp,
                          const float* fch, float* gelu_scratch, float* dfch, const FeedForward& ff, int N) {
    const size_t NF = (size_t)N * ff.F;
    gelu_forward(gelu_scratch, fch, NF);
    linear_backward(dfch, g.proj_w, g.proj_b, dout, gelu_scratch, ff.proj_w, N, ff.F, ff.C, false, ff.bf16);
    gelu_backward(dfch, dfch, fch, NF);
    linear_backward(dinp, g.fc_w, g.fc_b, dfch, inp, ff.fc_w, N, ff.C, ff.F, false, ff.bf16);
}

}  // namespace cllm
