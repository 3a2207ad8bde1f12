// KV-cached generation and sampling. The prompt is prefilled with the training forward (one batched pass) and
// its qkv rows become the cache; each new token then runs one row through every layer on the training kernels
// (linear_forward takes its one-row path), its qkv row appended to the cache.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <stdexcept>
#include <vector>

#include "cllm.h"

namespace cllm {

namespace {

size_t cache_floats_per_layer(const Config& c) { return (size_t)c.max_seq_len * c.qkv_width(); }
size_t scratch_floats(const Config& c) {
    return 4 * (size_t)c.embedding_dim + (size_t)c.mlp_width() + (size_t)c.ff_dim;
}

// Per layer the qkv rows of the context [max_seq_len, qkv_width] (q, then k and v of the num_kv_heads K/V heads,
// the training layout, q and k rotated at their positions), and one token's scratch.
struct Cache {
    int len = 0;
    std::vector<FloatBuffer> qkv;
    FloatBuffer x, ln, att, proj, fch, act;  // scratch_floats(c) in all
    explicit Cache(const Config& c) {
        for (int l = 0; l < c.num_layers; l++) qkv.push_back(alloc_floats(cache_floats_per_layer(c)));
        for (FloatBuffer* b : {&x, &ln, &att, &proj}) *b = alloc_floats(c.embedding_dim);
        fch = alloc_floats(c.mlp_width());
        act = alloc_floats(c.ff_dim);
    }
};

void add_inplace(float* x, const float* y, int n) {
    #pragma omp simd
    for (int i = 0; i < n; i++) x[i] += y[i];
}

// Append one token at position cache.len; logits [V] of the next token. Runs in fp32 whatever the model's
// precision (one row is bound by reading the weights, not by the products).
// The block is Model::forward's, on one row, from the same parts (cllm_block.cpp).
void decode_step(Model& m, Cache& cache, int32_t token, float* logits) {
    const Config& c = m.cfg;
    const int C = c.embedding_dim, t = cache.len;
    float *x = cache.x.get(), *ln = cache.ln.get(), *att = cache.att.get(), *proj = cache.proj.get();
    float mean, rstd;
    const float* pos = m.positions();
    embedding_forward(x, &token, m.p.wte, pos ? pos + (size_t)t * C : nullptr, 1, 1, C);
    for (int l = 0; l < c.num_layers; l++) {
        const LayerTensors& w = m.p.layers[l];
        float* qkv = cache.qkv[l].get();
        m.norm_forward(ln, &mean, &rstd, x, w.ln1_w, w.ln1_b, 1);
        m.qkv_forward(l, qkv + (size_t)t * c.qkv_width(), ln, 1, 1, t, false);
        attention_decode(att, qkv, t, C, c.num_heads, c.kv_heads());
        m.attn_out_forward(l, proj, att, 1, false);
        add_inplace(x, proj, C);
        m.norm_forward(ln, &mean, &rstd, x, w.ln2_w, w.ln2_b, 1);
        FeedForward ff = m.mlp(l);
        ff.bf16 = false;
        feedforward_forward(proj, cache.fch.get(), cache.act.get(), ln, ff, 1);
        add_inplace(x, proj, C);
    }
    m.norm_forward(ln, &mean, &rstd, x, m.p.lnf_w, m.p.lnf_b, 1);
    // the head, one row: the training forward's GEMM would pack all of it
    const float* head = m.p.head();
    #pragma omp parallel for schedule(static)
    for (int v = 0; v < c.vocab_size; v++) logits[v] = dot(head + (size_t)v * C, ln, C);
    cache.len++;
}

// Fill the cache from a batched forward over ctx; logits of the last position.
void prefill(Model& m, Cache& cache, const std::vector<int32_t>& ctx, float* logits) {
    const int T = (int)ctx.size(), V = m.cfg.vocab_size;
    m.forward(ctx.data(), 1, T, Dropout{});
    for (int l = 0; l < m.cfg.num_layers; l++)
        std::memcpy(cache.qkv[l].get(), m.acts.layers[l].qkv, (size_t)T * m.cfg.qkv_width() * sizeof(float));
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
                              int top_k, float top_p, uint64_t seed, std::vector<float>* all_logits,
                              const std::function<void()>& poll) {
    const int Tmax = m.cfg.max_seq_len, V = m.cfg.vocab_size;
    if (prompt.empty()) throw std::invalid_argument("prompt is empty");
    if ((int)prompt.size() > Tmax)
        throw std::invalid_argument("prompt length " + std::to_string(prompt.size()) + " exceeds max_seq_len " +
                                    std::to_string(Tmax));
    Cache cache(m.cfg);
    std::vector<int32_t> ctx = prompt, out;
    std::vector<float> logits(V);
    prefill(m, cache, ctx, logits.data());
    for (int i = 0; i < max_new_tokens; i++) {
        if (all_logits) all_logits->insert(all_logits->end(), logits.begin(), logits.end());
        int32_t tok = sample_token(logits.data(), V, temperature, top_k, top_p, seed, (uint64_t)i);
        out.push_back(tok);
        ctx.push_back(tok);
        if (i + 1 == max_new_tokens) break;
        if (poll && (i + 1) % POLL_TOKENS == 0) poll();
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
    const u128 total = (u128)c.num_layers * cache_floats_per_layer(c) + scratch_floats(c) +
                       activation_floats(c, 1, c.max_seq_len) +
                       (return_logits ? (u128)std::max(0, max_new_tokens) * c.vocab_size : 0);
    return total > SIZE_MAX ? SIZE_MAX : (size_t)total;
}

}  // namespace cllm
