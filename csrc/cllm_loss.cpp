// Fused softmax + cross-entropy over the vocabulary. The backward needs only softmax - onehot, so the
// fused version overwrites the logits with their gradient: no separate probability buffer.
#include <cmath>

#include "cllm.h"

namespace cllm {

namespace {
inline float row_max(const float* x, int V) {
    float mx = -INFINITY;
    #pragma omp simd reduction(max : mx)
    for (int i = 0; i < V; i++) mx = x[i] > mx ? x[i] : mx;
    return mx;
}

// log-sum-exp of a row
inline float row_lse(const float* x, int V) {
    const float mx = row_max(x, V);
    float s = 0.0f;
    #pragma omp simd reduction(+ : s)
    for (int i = 0; i < V; i++) s += fast_exp(x[i] - mx);
    return mx + std::log(s);
}

// d = softmax(x) * scale - onehot(target) * scale; returns log-sum-exp(x). One exp per element (the exps
// are stored, then scaled by scale / sum): the exp is the costly part of this loop, it is compute-bound.
inline float softmax_grad_row(float* d, const float* x, int32_t target, int V, float scale) {
    const float mx = row_max(x, V);
    float s = 0.0f;
    #pragma omp simd reduction(+ : s)
    for (int i = 0; i < V; i++) {
        d[i] = fast_exp(x[i] - mx);
        s += d[i];
    }
    const float f = scale / s;
    #pragma omp simd
    for (int i = 0; i < V; i++) d[i] *= f;
    d[target] -= scale;
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
    for (int n = 0; n < N; n++)
        softmax_grad_row(dlogits + (size_t)n * V, logits + (size_t)n * V, targets[n], V, scale);
}

void cross_entropy_fused(float* losses, float* logits, const int32_t* targets, int N, int V, float scale) {
    #pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        float* x = logits + (size_t)n * V;
        const float target_logit = x[targets[n]];  // read before the row is overwritten in place
        losses[n] = softmax_grad_row(x, x, targets[n], V, scale) - target_logit;
    }
}

}  // namespace cllm
