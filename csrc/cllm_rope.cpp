// Rotary position embedding (RoPE) in Hugging Face's rotate_half convention, as LlamaForCausalLM applies it to
// q and k: pair i of a head joins element i of the first half with element i of the second, rotated by the
// angle p * theta^(-2i/hs) at position p. A rotation is orthogonal, so the backward is the inverse rotation.
#include <cmath>

#include "cllm.h"

namespace cllm {

void rope_table(float* cos, float* sin, int P, int hs, float theta) {
    const int half = hs / 2;
    for (int p = 0; p < P; p++)
        for (int i = 0; i < half; i++) {
            const double angle = p * std::pow((double)theta, -2.0 * i / hs);
            cos[(size_t)p * half + i] = (float)std::cos(angle);
            sin[(size_t)p * half + i] = (float)std::sin(angle);
        }
}

namespace {
// sign +1: the forward rotation; -1: its inverse
void rotate(float* x, int ld, int heads, int hs, int B, int T, const float* cos, const float* sin, float sign) {
    const int half = hs / 2;
    #pragma omp parallel for schedule(static) collapse(2)
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++) {
            const float* c = cos + (size_t)t * half;
            const float* s = sin + (size_t)t * half;
            float* row = x + ((size_t)b * T + t) * ld;
            for (int h = 0; h < heads; h++) {
                float* x1 = row + (size_t)h * hs;
                float* x2 = x1 + half;
                #pragma omp simd
                for (int i = 0; i < half; i++) {
                    const float a = x1[i], e = x2[i], si = sign * s[i];
                    x1[i] = a * c[i] - e * si;
                    x2[i] = e * c[i] + a * si;
                }
            }
        }
}
}  // namespace

void rope_forward(float* x, int ld, int heads, int hs, int B, int T, const float* cos, const float* sin) {
    rotate(x, ld, heads, hs, B, T, cos, sin, 1.0f);
}

void rope_backward(float* dx, int ld, int heads, int hs, int B, int T, const float* cos, const float* sin) {
    rotate(dx, ld, heads, hs, B, T, cos, sin, -1.0f);
}

}  // namespace cllm
