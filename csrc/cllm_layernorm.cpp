// The pre-norms over the channel dimension, forward and backward: GPT-2's LayerNorm (eps 1e-5, biased variance)
// and Llama's RMSNorm (no mean, no bias).
#include <algorithm>
#include <cmath>
#include <vector>

#include "cllm.h"

namespace cllm {

static void norm_param_grads(float* dw, float* db, const float* dout, const float* inp, const float* mean,
                             const float* rstd, int N, int C);

void layernorm_forward(float* out, float* mean, float* rstd, const float* inp, const float* w, const float* b,
                       int N, int C) {
    #pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const float* x = inp + (size_t)n * C;
        float s = 0.0f;
        #pragma omp simd reduction(+ : s)
        for (int c = 0; c < C; c++) s += x[c];
        float m = s / C;
        float v = 0.0f;
        #pragma omp simd reduction(+ : v)
        for (int c = 0; c < C; c++) v += (x[c] - m) * (x[c] - m);
        float r = 1.0f / std::sqrt(v / C + 1e-5f);
        float* o = out + (size_t)n * C;
        #pragma omp simd
        for (int c = 0; c < C; c++) o[c] = (x[c] - m) * r * w[c] + b[c];
        mean[n] = m;
        rstd[n] = r;
    }
}

// dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), dxhat = dout * w.
void layernorm_backward(float* dinp, float* dw, float* db, const float* dout, const float* inp, const float* w,
                        const float* mean, const float* rstd, int N, int C) {
    #pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const float* x = inp + (size_t)n * C;
        const float* d = dout + (size_t)n * C;
        const float m = mean[n], r = rstd[n];
        float s1 = 0.0f, s2 = 0.0f;
        #pragma omp simd reduction(+ : s1, s2)
        for (int c = 0; c < C; c++) {
            float dxh = d[c] * w[c];
            s1 += dxh;
            s2 += dxh * (x[c] - m) * r;
        }
        s1 /= C;
        s2 /= C;
        float* dx = dinp + (size_t)n * C;
        #pragma omp simd
        for (int c = 0; c < C; c++) {
            float xh = (x[c] - m) * r;
            dx[c] += r * (d[c] * w[c] - s1 - xh * s2);
        }
    }
    norm_param_grads(dw, db, dout, inp, mean, rstd, N, C);
}

// The parameter gradient of a norm: channels split across threads, rows summed in order (deterministic).
// dw += sum_n dout * xhat with xhat = (x - mean) * rstd (mean null: 0); db += sum_n dout when db is given.
static void norm_param_grads(float* dw, float* db, const float* dout, const float* inp, const float* mean,
                             const float* rstd, int N, int C) {
    #pragma omp parallel for schedule(static)
    for (int c0 = 0; c0 < C; c0 += 16) {
        int c1 = std::min(C, c0 + 16);
        for (int n = 0; n < N; n++) {
            const float* x = inp + (size_t)n * C;
            const float* d = dout + (size_t)n * C;
            const float m = mean ? mean[n] : 0.0f;
            for (int c = c0; c < c1; c++) dw[c] += d[c] * (x[c] - m) * rstd[n];
            if (db)
                for (int c = c0; c < c1; c++) db[c] += d[c];
        }
    }
}

void rmsnorm_forward(float* out, float* rstd, const float* inp, const float* w, int N, int C, float eps) {
    #pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const float* x = inp + (size_t)n * C;
        float ss = 0.0f;
        #pragma omp simd reduction(+ : ss)
        for (int c = 0; c < C; c++) ss += x[c] * x[c];
        const float r = 1.0f / std::sqrt(ss / C + eps);
        float* o = out + (size_t)n * C;
        #pragma omp simd
        for (int c = 0; c < C; c++) o[c] = x[c] * r * w[c];
        rstd[n] = r;
    }
}

// dx = rstd * (dxhat - xhat * mean(dxhat * xhat)), dxhat = dout * w, xhat = x * rstd.
void rmsnorm_backward(float* dinp, float* dw, const float* dout, const float* inp, const float* w, const float* rstd,
                      int N, int C) {
    #pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const float* x = inp + (size_t)n * C;
        const float* d = dout + (size_t)n * C;
        const float r = rstd[n];
        float s = 0.0f;
        #pragma omp simd reduction(+ : s)
        for (int c = 0; c < C; c++) s += d[c] * w[c] * x[c] * r;
        s /= C;
        float* dx = dinp + (size_t)n * C;
        #pragma omp simd
        for (int c = 0; c < C; c++) dx[c] += r * (d[c] * w[c] - x[c] * r * s);
    }
    norm_param_grads(dw, nullptr, dout, inp, nullptr, rstd, N, C);
}

}  // namespace cllm
