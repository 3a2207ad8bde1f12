// Fused softmax + cross-entropy over the vocabulary. The backward needs only softmax - target distribution, so
// the fused version overwrites the logits with their gradient: no separate probability buffer.
// Label smoothing eps (PyTorch's label_smoothing) takes the target distribution (1 - eps) onehot + eps / V:
// loss = lse - (1 - eps) x[target] - eps mean(x), the gradient softmax - (1 - eps) onehot - eps / V.
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

// The logit the loss subtracts from lse: (1 - eps) x[target] + eps mean(x).
inline float target_logit(const float* x, int32_t target, int V, float eps) {
    if (eps == 0.0f) return x[target];
    float s = 0.0f;
    #pragma omp simd reduction(+ : s)
    for (int i = 0; i < V; i++) s += x[i];
    return (1.0f - eps) * x[target] + eps * (s / V);
}

// d = (softmax(x) - (1 - eps) onehot(target) - eps / V) * scale; returns log-sum-exp(x). One exp per element (the
// exps are stored, then scaled by scale / sum): the exp is the costly part of this loop, it is compute-bound.
inline float softmax_grad_row(float* d, const float* x, int32_t target, int V, float scale, float eps) {
    const float mx = row_max(x, V);
    float s = 0.0f;
    #pragma omp simd reduction(+ : s)
    for (int i = 0; i < V; i++) {
        d[i] = fast_exp(x[i] - mx);
        s += d[i];
    }
    const float f = scale / s, spread = scale * eps / V;
    #pragma omp simd
    for (int i = 0; i < V; i++) d[i] = d[i] * f - spread;
    d[target] -= scale * (1.0f - eps);
    return mx + std::log(s);
}
}  // namespace

void cross_entropy_forward(float* losses, const float* logits, const int32_t* targets, int N, int V, float eps) {
    #pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const float* x = logits + (size_t)n * V;
        losses[n] = row_lse(x, V) - target_logit(x, targets[n], V, eps);
    }
}

void cross_entropy_backward(float* dlogits, const float* logits, const int32_t* targets, int N, int V,
                            float scale, float eps) {
    #pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++)
        softmax_grad_row(dlogits + (size_t)n * V, logits + (size_t)n * V, targets[n], V, scale, eps);
}

void cross_entropy_fused(float* losses, float* logits, const int32_t* targets, int N, int V, float scale,
                         float eps) {
    #pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        float* x = logits + (size_t)n * V;
        const float t = target_logit(x, targets[n], V, eps);  // read before the row is overwritten in place
        losses[n] = softmax_grad_row(x, x, targets[n], V, scale, eps) - t;
    }
}

}  // namespace cllm
