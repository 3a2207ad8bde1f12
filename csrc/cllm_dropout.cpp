// The counter-based RNG and dropout. A mask element is a pure function of (seed, site, index), so the backward
// regenerates the mask instead of storing it, and masks do not depend on the thread count.
#include <algorithm>
#include <cstdint>

#include "cllm.h"

namespace cllm {

uint64_t mix64(uint64_t x) {  // splitmix64 finaliser
    x += 0x9E3779B97F4A7C15ULL;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
    return x ^ (x >> 31);
}

Dropout Model::step_dropout() const {
    Dropout d;
    d.p = cfg.dropout;
    const uint64_t base = dropout_stream == 0 ? dropout_seed : mix64(dropout_seed ^ mix64(dropout_stream));
    d.seed = mix64(base + dropout_step);
    return d;
}

void dropout_forward(float* x, size_t n, const Dropout& d, uint64_t site) {
    if (!d.active()) return;
    const uint32_t th = dropout_threshold(d.p);
    const float scale = 1.0f / (1.0f - d.p);
    #pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) x[i] = dropout_keep(d.seed, site, i, th) ? x[i] * scale : 0.0f;
}

void dropout_backward(float* dx, size_t n, const Dropout& d, uint64_t site) { dropout_forward(dx, n, d, site); }

void dropout_mask(float* out, size_t n, const Dropout& d, uint64_t site) {
    for (size_t i = 0; i < n; i++) out[i] = 1.0f;
    if (d.active()) dropout_forward(out, n, d, site);
}

// Floats of every dropout mask of a [B, T] step: the [B,T,C] embedding mask, then per layer the [B,H,T,T]
// attention probabilities' and two [B,T,C] residual masks. Saturates at SIZE_MAX instead of wrapping around.
size_t dropout_mask_floats(const Config& c, int B, int T) {
    using u128 = unsigned __int128;
    const u128 BT = (u128)std::max(0, B) * std::max(0, T), C = c.embedding_dim, H = c.num_heads;
    const u128 total = BT * C + (u128)c.num_layers * (BT * H * std::max(0, T) + 2 * BT * C);
    return total > SIZE_MAX ? SIZE_MAX : (size_t)total;
}

}  // namespace cllm
