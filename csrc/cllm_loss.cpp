// Fused softmax + cross-entropy over the vocabulary. The backward needs only softmax - onehot, so the
// fused version overwrites the logits with their gradient: no separate probability buffer.
#include <cmath>

#include "cllm.h"

namespace cllm {

namespace {
// log-sum-exp of a row
inline float row_lse(const float* x, int V) {
    float mx = -INFINITY;
    #pragma omp simd reduction(max : mx)
    for (int i = 0; i < V; i++) mx = x[i] > mx ? x[i] : mx;
    float s = 0.0f;
    #pragma omp simd reduction(+ : s)
    for (int i = 0; i < V; i++) s += fast_exp(x[i] - mx);
    return mx + std::log(s);
}
}  // namespace

void cross_entropy_forward(float* losses, const float* logits, const int32_t* targets, int N, int V) {
    #pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const float* x = logits + (size_t)n * V;
        losses[n] = row_lse(x, V) - x[targets[n]];
    }
}

void cross_entropy_backward(float* dlogits, const float* logits, const int32_t* targets, int N, int V,
                            float scale) {
    #pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const float* x = logits + (size_t)n * V;
        float* d = dlogits + (size_t)n * V;
        const float l = row_lse(x, V);
        #pragma omp simd
        for (int i = 0; i < V; i++) d[i] = fast_exp(x[i] - l) * scale;
        d[targets[n]] -= scale;
    }
}

void cross_entropy_fused(float* losses, float* logits, const int32_t* targets, int N, int V, float scale) {
    #pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        float* x = logits + (size_t)n * V;
        const float l = row_lse(x, V);
        losses[n] = l - x[targets[n]];
        #pragma omp simd
        for (int i = 0; i < V; i++) x[i] = fast_exp(x[i] - l) * scale;
        x[targets[n]] -= scale;
    }
}

}  // namespace cllm
