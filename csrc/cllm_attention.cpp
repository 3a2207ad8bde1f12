// Causal multi-head self-attention, scale 1/sqrt(head_dim), over qkv [B,T,3C] laid out as GPT-2's c_attn
// output: q = [:, :, 0:C], k = [C:2C], v = [2C:3C], head h in columns h*hs:(h+1)*hs.
// The forward keeps only each row's log-sum-exp; the backward recomputes the probabilities from it, so
// activation memory is O(B*H*T), not O(B*H*T*T). Attention dropout regenerates its mask from the counter RNG.
#include <cmath>
#include <cstring>
#include <vector>

#include "cllm.h"

namespace cllm {

namespace {
inline float dot(const float* a, const float* b, int n) {
    float s = 0.0f;
    #pragma omp simd reduction(+ : s)
    for (int i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}
inline void axpy(float* y, float a, const float* x, int n) {
    #pragma omp simd
    for (int i = 0; i < n; i++) y[i] += a * x[i];
}
inline size_t drop_index(int b, int h, int t, int j, int H, int T) {
    return (((size_t)b * H + h) * T + t) * T + j;
}
}  // namespace

void attention_forward(float* out, float* lse, const float* qkv, int B, int T, int C, int H, const Dropout& d,
                       uint64_t site) {
    const int hs = C / H;
    const float scale = 1.0f / std::sqrt((float)hs);
    const uint32_t th = dropout_threshold(d.p);
    const float keep_scale = d.active() ? 1.0f / (1.0f - d.p) : 1.0f;
    #pragma omp parallel
    {
        std::vector<float> s(T);
        #pragma omp for schedule(dynamic, 4) collapse(3)
        for (int b = 0; b < B; b++)
            for (int h = 0; h < H; h++)
                for (int t = 0; t < T; t++) {
                    const float* q = qkv + ((size_t)b * T + t) * 3 * C + h * hs;
                    float mx = -INFINITY;
                    for (int j = 0; j <= t; j++) {
                        const float* k = qkv + ((size_t)b * T + j) * 3 * C + C + h * hs;
                        s[j] = dot(q, k, hs) * scale;
                        mx = s[j] > mx ? s[j] : mx;
                    }
                    float sum = 0.0f;
                    for (int j = 0; j <= t; j++) {
                        s[j] = std::exp(s[j] - mx);
                        sum += s[j];
                    }
                    const float inv = 1.0f / sum;
                    float* o = out + ((size_t)b * T + t) * C + h * hs;
                    std::memset(o, 0, hs * sizeof(float));
                    for (int j = 0; j <= t; j++) {
                        float pj = s[j] * inv;
                        if (d.active())
                            pj = dropout_keep(d.seed, site, drop_index(b, h, t, j, H, T), th) ? pj * keep_scale : 0.0f;
                        axpy(o, pj, qkv + ((size_t)b * T + j) * 3 * C + 2 * C + h * hs, hs);
                    }
                    lse[((size_t)b * H + h) * T + t] = mx + std::log(sum);
                }
    }
}

void attention_backward(float* dqkv, const float* dout, const float* qkv, const float* out, const float* lse,
                        int B, int T, int C, int H, const Dropout& d, uint64_t site) {
    const int hs = C / H;
    const float scale = 1.0f / std::sqrt((float)hs);
    const uint32_t th = dropout_threshold(d.p);
    const float keep_scale = d.active() ? 1.0f / (1.0f - d.p) : 1.0f;
    // Each (b, h) owns its q/k/v columns of dqkv: no races, fixed summation order.
    #pragma omp parallel for schedule(dynamic, 1) collapse(2)
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++) {
            for (int t = 0; t < T; t++) {
                float* dq = dqkv + ((size_t)b * T + t) * 3 * C + h * hs;
                std::memset(dq, 0, hs * sizeof(float));
                std::memset(dq + C, 0, hs * sizeof(float));
                std::memset(dq + 2 * C, 0, hs * sizeof(float));
            }
            for (int t = 0; t < T; t++) {
                const float* q = qkv + ((size_t)b * T + t) * 3 * C + h * hs;
                const float* go = dout + ((size_t)b * T + t) * C + h * hs;
                const float* o = out + ((size_t)b * T + t) * C + h * hs;
                float* dq = dqkv + ((size_t)b * T + t) * 3 * C + h * hs;
                const float l = lse[((size_t)b * H + h) * T + t];
                const float D = dot(go, o, hs);  // sum_j p_j * dp_j
                for (int j = 0; j <= t; j++) {
                    const float* k = qkv + ((size_t)b * T + j) * 3 * C + C + h * hs;
                    const float* v = k + C;
                    float p = std::exp(dot(q, k, hs) * scale - l);
                    float m = 1.0f;
                    if (d.active()) m = dropout_keep(d.seed, site, drop_index(b, h, t, j, H, T), th) ? keep_scale : 0.0f;
                    float dp = m * dot(go, v, hs);
                    float ds = p * (dp - D) * scale;
                    float* dk = dqkv + ((size_t)b * T + j) * 3 * C + C + h * hs;
                    axpy(dq, ds, k, hs);
                    axpy(dk, ds, q, hs);
                    axpy(dk + C, p * m, go, hs);
                }
            }
        }
}

void attention_dropout_mask(float* out, int B, int T, int H, const Dropout& d, uint64_t site) {
    const uint32_t th = dropout_threshold(d.p);
    const float keep_scale = d.active() ? 1.0f / (1.0f - d.p) : 1.0f;
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++)
            for (int t = 0; t < T; t++)
                for (int j = 0; j < T; j++) {
                    size_t i = drop_index(b, h, t, j, H, T);
                    float m = 0.0f;
                    if (j <= t) m = !d.active() ? 1.0f : (dropout_keep(d.seed, site, i, th) ? keep_scale : 0.0f);
                    out[i] = m;
                }
}

}  // namespace cllm
