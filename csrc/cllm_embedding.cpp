// Token embedding + positional encoding (learned table, fixed sinusoidal, or none: rotary), forward and backward.
#include <algorithm>
#include <cmath>

#include "cllm.h"

namespace cllm {

void sinusoidal_table(float* out, int P, int C) {
    for (int p = 0; p < P; p++)
        for (int c = 0; c < C; c++) {
            int pair = c / 2;
            double freq = std::pow(10000.0, -2.0 * pair / C);
            out[(size_t)p * C + c] = (float)(c % 2 == 0 ? std::sin(p * freq) : std::cos(p * freq));
        }
}

void embedding_forward(float* out, const int32_t* tokens, const float* wte, const float* pos, int B, int T, int C) {
    #pragma omp parallel for schedule(static) collapse(2)
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++) {
            float* o = out + ((size_t)b * T + t) * C;
            const float* e = wte + (size_t)tokens[b * T + t] * C;
            if (!pos) {  // rotary positions are applied in attention
                std::copy(e, e + C, o);
                continue;
            }
            const float* q = pos + (size_t)t * C;
            #pragma omp simd
            for (int c = 0; c < C; c++) o[c] = e[c] + q[c];
        }
}

// dwte and dpos accumulate (+=). dpos may be null (fixed table). Channels are split across threads so
// repeated tokens never race and the summation order is fixed.
void embedding_backward(float* dwte, float* dpos, const float* dout, const int32_t* tokens, int B, int T, int C) {
    #pragma omp parallel for schedule(static)
    for (int c0 = 0; c0 < C; c0 += 16) {
        int c1 = c0 + 16 < C ? c0 + 16 : C;
        for (int b = 0; b < B; b++)
            for (int t = 0; t < T; t++) {
                const float* d = dout + ((size_t)b * T + t) * C;
                float* e = dwte + (size_t)tokens[b * T + t] * C;
                for (int c = c0; c < c1; c++) e[c] += d[c];
                if (dpos) {
                    float* q = dpos + (size_t)t * C;
                    for (int c = c0; c < c1; c++) q[c] += d[c];
                }
            }
    }
}

}  // namespace cllm
