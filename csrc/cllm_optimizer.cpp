// AdamW and SGD with momentum over the flat buffers, and the global gradient norm for clipping.
// Weight decay touches only 2-D weights (TensorInfo::decay), as is customary.
#include <algorithm>
#include <cmath>

#include "cllm.h"

namespace cllm {

double grad_norm(const float* g, size_t n) {
    double s = 0.0;
    #pragma omp parallel for simd reduction(+ : s) schedule(static)
    for (size_t i = 0; i < n; i++) s += (double)g[i] * g[i];
    return std::sqrt(s);
}

void scale_inplace(float* x, size_t n, float s) {
    #pragma omp parallel for simd schedule(static)
    for (size_t i = 0; i < n; i++) x[i] *= s;
}

// One pass per tensor: decoupled decay, moment updates, bias-corrected step (PyTorch AdamW semantics).
void adamw_step(float* params, const float* grads, float* m, float* v, const ParamLayout& layout, float lr,
                double beta1_d, double beta2_d, float eps, float weight_decay, int64_t step, size_t lo, size_t hi) {
    // coefficients formed in double: float(1 - 0.999) differs from 1 - float(0.999) by 1e-5 relative
    const float beta1 = (float)beta1_d, beta2 = (float)beta2_d;
    const float one_minus_b1 = (float)(1.0 - beta1_d), one_minus_b2 = (float)(1.0 - beta2_d);
    const float bc1 = (float)(1.0 - std::pow(beta1_d, (double)step));
    const float bc2 = (float)(1.0 - std::pow(beta2_d, (double)step));
    const float step_size = lr / bc1;
    const float bc2_sqrt = std::sqrt(bc2);
    for (const TensorInfo& t : layout.tensors) {
        const size_t begin = std::max(t.offset, lo), end = std::min(t.offset + t.size, hi);  // its part in range
        if (begin >= end) continue;
        float* p = params + begin;
        const float* g = grads + begin;
        float* mt = m + (begin - lo);
        float* vt = v + (begin - lo);
        const float decay = t.decay ? 1.0f - lr * weight_decay : 1.0f;
        #pragma omp parallel for simd schedule(static)
        for (size_t i = 0; i < end - begin; i++) {
            float gi = g[i];
            float mi = beta1 * mt[i] + one_minus_b1 * gi;
            float vi = beta2 * vt[i] + one_minus_b2 * gi * gi;
            mt[i] = mi;
            vt[i] = vi;
            p[i] = p[i] * decay - step_size * mi / (std::sqrt(vi) / bc2_sqrt + eps);
        }
    }
}

// PyTorch SGD semantics: g += wd * p (2-D weights), buf = g (first step) or momentum * buf + g,
// p -= lr * (nesterov ? g + momentum * buf : buf).
void sgd_step(float* params, const float* grads, float* buf, const ParamLayout& layout, float lr, float momentum,
              float weight_decay, bool nesterov, bool first_step) {
    for (const TensorInfo& t : layout.tensors) {
        float* p = params + t.offset;
        const float* g = grads + t.offset;
        float* b = buf + t.offset;
        const float wd = t.decay ? weight_decay : 0.0f;
        #pragma omp parallel for simd schedule(static)
        for (size_t i = 0; i < t.size; i++) {
            float gi = g[i] + wd * p[i];
            if (momentum != 0.0f) {
                float bi = first_step ? gi : momentum * b[i] + gi;
                b[i] = bi;
                gi = nesterov ? gi + momentum * bi : bi;
            }
            p[i] -= lr * gi;
        }
    }
}

}  // namespace cllm
