// The feed-forward block's nonlinearity: GELU, tanh approximation, forward and backward.
// (The block itself is c_fc -> GELU -> c_proj, composed from linear_* in the model; the training forward
// takes GELU from c_fc's GEMM epilogue, the same gelu() on each finished tile.)
#include <cmath>

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

}  // namespace cllm
