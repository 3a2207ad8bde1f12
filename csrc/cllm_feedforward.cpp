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
        float x = inp[i];
        float u = kGeluScale * (x + 0.044715f * x * x * x);
        float th = fast_tanh(u);
        float sech2 = 1.0f - th * th;
        float grad = 0.5f * (1.0f + th) + 0.5f * x * sech2 * kGeluScale * (1.0f + 3.0f * 0.044715f * x * x);
        dinp[i] = dout[i] * grad;
    }
}

}  // namespace cllm
