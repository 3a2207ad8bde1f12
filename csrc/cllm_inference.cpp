// KV-cached generation and sampling. The prompt is prefilled with the training forward (one batched pass),
// its keys/values copied into the cache; each new token then costs one row through every layer.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <stdexcept>
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

// out[OC] = x[IC] @ w[IC,OC] + b, columns split across threads
void row_linear(float* out, const float* x, const float* w, const float* b, int IC, int OC) {
    #pragma omp parallel for schedule(static)
    for (int j0 = 0; j0 < OC; j0 += 64) {
        int j1 = std::min(OC, j0 + 64);
        float acc[64];
        for (int j = j0; j < j1; j++) acc[j - j0] = b ? b[j] : 0.0f;
        for (int i = 0; i < IC; i++) {
            const float xi = x[i];
            const float* wr = w + (size_t)i * OC;
            #pragma omp simd
            for (int j = j0; j < j1; j++) acc[j - j0] += xi * wr[j];
        }
        std::memcpy(out + j0, acc, (j1 - j0) * sizeof(float));
    }
}

struct Cache {
    int len = 0;
    std::vector<std::vector<float>> k, v;  // per layer [max_seq_len, C]
};

size_t cache_floats_per_layer(const Config& c) { return (size_t)c.max_seq_len * c.embedding_dim; }  // of k or v

// Append one token at position cache.len; logits [V] of the next token.
void decode_step(Model& m, Cache& cache, int32_t token, float* logits) {
    const Config& c = m.cfg;
    const int C = c.embedding_dim, F = c.ff_dim, H = c.num_heads, hs = C / H, t = cache.len;
    std::vector<float> x(C), ln(C), qkv(3 * C), att(C), h(F), tmp(C), scores(t + 1);
    float mean, rstd;
    const float* pos = m.positions() + (size_t)t * C;
    for (int i = 0; i < C; i++) x[i] = m.p.wte[(size_t)token * C + i] + pos[i];
    const float scale = 1.0f / std::sqrt((float)hs);
    for (int l = 0; l < c.num_layers; l++) {
        const LayerTensors& w = m.p.layers[l];
        layernorm_forward(ln.data(), &mean, &rstd, x.data(), w.ln1_w, w.ln1_b, 1, C);
        row_linear(qkv.data(), ln.data(), w.qkv_w, w.qkv_b, C, 3 * C);
        std::memcpy(cache.k[l].data() + (size_t)t * C, qkv.data() + C, C * sizeof(float));
        std::memcpy(cache.v[l].data() + (size_t)t * C, qkv.data() + 2 * C, C * sizeof(float));
        for (int hh = 0; hh < H; hh++) {
            const float* q = qkv.data() + hh * hs;
            float mx = -INFINITY;
            for (int j = 0; j <= t; j++) {
                scores[j] = dot(q, cache.k[l].data() + (size_t)j * C + hh * hs, hs) * scale;
                mx = std::max(mx, scores[j]);
            }
            float sum = 0.0f;
            for (int j = 0; j <= t; j++) sum += (scores[j] = std::exp(scores[j] - mx));
            float* o = att.data() + hh * hs;
            std::fill(o, o + hs, 0.0f);
            for (int j = 0; j <= t; j++) {
                const float pj = scores[j] / sum;
                const float* vj = cache.v[l].data() + (size_t)j * C + hh * hs;
                for (int i = 0; i < hs; i++) o[i] += pj * vj[i];
            }
        }
        row_linear(tmp.data(), att.data(), w.attproj_w, w.attproj_b, C, C);
        for (int i = 0; i < C; i++) x[i] += tmp[i];
        layernorm_forward(ln.data(), &mean, &rstd, x.data(), w.ln2_w, w.ln2_b, 1, C);
        row_linear(h.data(), ln.data(), w.fc_w, w.fc_b, C, F);
        gelu_forward(h.data(), h.data(), F);
        row_linear(tmp.data(), h.data(), w.fcproj_w, w.fcproj_b, F, C);
        for (int i = 0; i < C; i++) x[i] += tmp[i];
    }
    layernorm_forward(ln.data(), &mean, &rstd, x.data(), m.p.lnf_w, m.p.lnf_b, 1, C);
    #pragma omp parallel for schedule(static)
    for (int v = 0; v < c.vocab_size; v++) logits[v] = dot(m.p.wte + (size_t)v * C, ln.data(), C);
    cache.len++;
}

// Fill the cache from a batched forward over ctx; logits of the last position.
void prefill(Model& m, Cache& cache, const std::vector<int32_t>& ctx, float* logits) {
    const int T = (int)ctx.size(), C = m.cfg.embedding_dim, V = m.cfg.vocab_size;
    m.forward(ctx.data(), 1, T, Dropout{});
    for (int l = 0; l < m.cfg.num_layers; l++) {
        const float* qkv = m.acts.layers[l].qkv;
        for (int t = 0; t < T; t++) {
            std::memcpy(cache.k[l].data() + (size_t)t * C, qkv + (size_t)t * 3 * C + C, C * sizeof(float));
            std::memcpy(cache.v[l].data() + (size_t)t * C, qkv + (size_t)t * 3 * C + 2 * C, C * sizeof(float));
        }
    }
    std::memcpy(logits, m.acts.logits + (size_t)(T - 1) * V, V * sizeof(float));
    cache.len = T;
}

}  // namespace

int32_t sample_token(float* logits, int V, float temperature, int top_k, float top_p, uint64_t seed, uint64_t step) {
    if (temperature <= 0.0f)  // greedy
        return (int32_t)(std::max_element(logits, logits + V) - logits);
    std::vector<int32_t> idx(V);
    std::iota(idx.begin(), idx.end(), 0);
    int keep = (top_k > 0 && top_k < V) ? top_k : V;
    // candidates by descending logit (stable on ties, so results are reproducible)
    std::partial_sort(idx.begin(), idx.begin() + keep, idx.end(),
                      [&](int32_t a, int32_t b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); });
    std::vector<double> p(keep);
    const double mx = logits[idx[0]];
    double sum = 0.0;
    for (int i = 0; i < keep; i++) sum += (p[i] = std::exp((logits[idx[i]] - mx) / temperature));
    if (top_p > 0.0f && top_p < 1.0f) {  // smallest prefix whose probability reaches top_p
        double cum = 0.0;
        int n = 0;
        while (n < keep) {
            cum += p[n++] / sum;
            if (cum >= top_p) break;
        }
        keep = n;
        sum = 0.0;
        for (int i = 0; i < keep; i++) sum += p[i];
    }
    const double u = (mix64(seed ^ mix64(step)) >> 11) * (1.0 / 9007199254740992.0) * sum;
    double cum = 0.0;
    for (int i = 0; i < keep; i++) {
        cum += p[i];
        if (u < cum) return idx[i];
    }
    return idx[keep - 1];
}

std::vector<int32_t> generate(Model& m, const std::vector<int32_t>& prompt, int max_new_tokens, float temperature,
                              int top_k, float top_p, uint64_t seed, std::vector<float>* all_logits) {
    const int Tmax = m.cfg.max_seq_len, V = m.cfg.vocab_size;
    if (prompt.empty()) throw std::invalid_argument("prompt is empty");
    if ((int)prompt.size() > Tmax)
        throw std::invalid_argument("prompt length " + std::to_string(prompt.size()) + " exceeds max_seq_len " +
                                    std::to_string(Tmax));
    Cache cache;
    cache.k.assign(m.cfg.num_layers, std::vector<float>(cache_floats_per_layer(m.cfg)));
    cache.v.assign(m.cfg.num_layers, std::vector<float>(cache_floats_per_layer(m.cfg)));
    std::vector<int32_t> ctx = prompt, out;
    std::vector<float> logits(V);
    prefill(m, cache, ctx, logits.data());
    for (int i = 0; i < max_new_tokens; i++) {
        if (all_logits) all_logits->insert(all_logits->end(), logits.begin(), logits.end());
        int32_t tok = sample_token(logits.data(), V, temperature, top_k, top_p, seed, (uint64_t)i);
        out.push_back(tok);
        ctx.push_back(tok);
        if (i + 1 == max_new_tokens) break;
        if (cache.len == Tmax) {
            // Context full: keep the most recent half and prefill again (positions are absolute).
            ctx.erase(ctx.begin(), ctx.end() - std::max(1, Tmax / 2));
            prefill(m, cache, ctx, logits.data());
        } else {
            decode_step(m, cache, tok, logits.data());
        }
    }
    return out;
}

size_t generation_floats(const Config& c, int max_new_tokens, bool return_logits) {
    using u128 = unsigned __int128;
    const u128 total = (u128)2 * c.num_layers * cache_floats_per_layer(c) + activation_floats(c, 1, c.max_seq_len) +
                       (return_logits ? (u128)std::max(0, max_new_tokens) * c.vocab_size : 0);
    return total > SIZE_MAX ? SIZE_MAX : (size_t)total;
}

}  // namespace cllm
