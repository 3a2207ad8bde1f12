// KV-cached generation and sampling, for a batch of prompts of any lengths. Each prompt is prefilled alone with
// the training forward (one batched pass over its tokens) and its qkv rows become its own cache. Each step then
// runs the live sequences' new tokens together through every layer, B rows at a time through the training parts
// (whose products take their few-rows path: each weight read once per step for all B rows), each row at its own
// position and attending to its own cache. With bf16 (DecodeWeights) the step's products read bf16 copies of the
// weights and the cache holds k | v in bf16: half the bytes of the weights, a third of the cache's.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <stdexcept>
#include <vector>

#include "cllm.h"

namespace cllm {

namespace {

// A cache of `positions` rows. fp32: the qkv rows; bf16: the k | v rows in bf16 (2 KV hs values, half as many floats)
size_t cache_floats_per_layer(const Config& c, int positions, bool bf16) {
    return (size_t)positions * (bf16 ? c.kv_heads() * c.head_dim() : c.qkv_width());
}
// per row of a decode step: x, ln, att, proj [C], qkv [qkv_width], fch [mlp_width], act [F], logits [V], the
// norm's mean and rstd
size_t row_floats(const Config& c) {
    return 4 * (size_t)c.embedding_dim + c.qkv_width() + c.mlp_width() + c.ff_dim + c.vocab_size + 2;
}
// per sequence besides its cache: its pending logits [V] and the penalties' token counts [V] (int32)
size_t sequence_floats(const Config& c) { return 2 * (size_t)c.vocab_size; }

// One prompt's state: the tokens in its cache (kept to prefill again when the context is full), the cache of
// every layer, its output so far and the logits of its next token. The cache (fp32) holds the qkv rows
// [positions, qkv_width] in the training layout (q, then the K/V heads' k and v; LLAMA: q and k rotated at their
// positions), or (bf16) the k | v rows [positions, 2 KV hs] in bf16; positions = min(max_seq_len, prompt + new).
struct Sequence {
    std::vector<int32_t> ctx, out;
    std::vector<FloatBuffer> cache;
    std::vector<int32_t> counts;  // occurrences of each token in the prompt (<0 marks) and the output, for penalties
    std::vector<int32_t> seen;    // the distinct tokens of prompt and output, in first-seen order
    FloatBuffer logits;
    int len = 0;
    bool done = false;
    uint16_t* kv(int l) { return (uint16_t*)cache[l].get(); }  // the bf16 cache of layer l
};

// The bf16 copies of the weights a decode step reads (generate with bf16), packed anew by each generate call (the
// weights may have changed) into the model's decode_panels, which the first call allocates and the next ones reuse.
// They lie in huge pages: a step streams all of them, and the hardware prefetchers stop at every 4 KiB page
// (GPT-2-124M: 106-116 steps/s on 4 KiB pages, 150-166 on 2 MiB ones); faulting in fresh huge pages can take a
// second here (a VM backing its memory lazily), which reusing the storage pays once per model. A layer's
// q | k | v and LLAMA's gate | up are one packed weight each, so that they take one product.
struct DecodeWeights {
    struct Layer {
        PackedBF16 qkv, out, up, down;
    };
    std::vector<Layer> layers;
    PackedBF16 head;

    explicit DecodeWeights(Model& m) {
        const Config& c = m.cfg;
        const int C = c.embedding_dim, F = c.ff_dim, H = c.num_heads, KV = c.kv_heads(), hs = c.head_dim();
        if (m.decode_panels_floats < floats(c)) {
            m.decode_panels.reset();  // not both copies at once
            m.decode_panels = alloc_floats(floats(c));
            m.decode_panels_floats = floats(c);
        }
        float* at = m.decode_panels.get();
        auto pack = [&](int K, const std::vector<WeightPart>& parts) {
            const PackedBF16 w = pack_bf16(K, parts, at);
            at += packed_bf16_floats(K, w.N);
            return w;
        };
        for (const LayerTensors& w : m.p.layers) {
            if (c.llama())  // nn.Linear's [out, in]: op(w) = w^T
                layers.push_back({pack(C, {{{w.q_w, C, true}, H * hs}, {{w.k_w, C, true}, KV * hs},
                                           {{w.v_w, C, true}, KV * hs}}),
                                  pack(C, {{{w.o_w, C, true}, C}}),
                                  pack(C, {{{w.gate_w, C, true}, F}, {{w.up_w, C, true}, F}}),
                                  pack(F, {{{w.down_w, F, true}, C}})});
            else  // [in, out]
                layers.push_back({pack(C, {{{w.qkv_w, 3 * C}, 3 * C}}), pack(C, {{{w.attproj_w, C}, C}}),
                                  pack(C, {{{w.fc_w, F}, F}}), pack(F, {{{w.fcproj_w, C}, C}})});
        }
        head = pack(C, {{{m.p.head(), C, true}, c.vocab_size}});
    }
    // floats the copies take for this config, without packing
    static size_t floats(const Config& c) {
        const int C = c.embedding_dim, F = c.ff_dim;
        const size_t layer = packed_bf16_floats(C, c.qkv_width()) + packed_bf16_floats(C, C) +
                             packed_bf16_floats(C, c.mlp_width()) + packed_bf16_floats(F, C);
        return c.num_layers * layer + packed_bf16_floats(C, c.vocab_size);
    }
};

// One decode step's rows: scratch for up to B sequences at once.
struct Rows {
    FloatBuffer x, ln, att, proj, qkv, fch, act, logits, mean, rstd;
    Rows(const Config& c, int B) {
        const size_t C = c.embedding_dim;
        for (FloatBuffer* b : {&x, &ln, &att, &proj}) *b = alloc_floats(B * C);
        qkv = alloc_floats((size_t)B * c.qkv_width());
        fch = alloc_floats((size_t)B * c.mlp_width());
        act = alloc_floats((size_t)B * c.ff_dim);
        logits = alloc_floats((size_t)B * c.vocab_size);
        for (FloatBuffer* b : {&mean, &rstd}) *b = alloc_floats(B);
    }
};

void add_inplace(float* x, const float* y, size_t n) {
    #pragma omp simd
    for (size_t i = 0; i < n; i++) x[i] += y[i];
}

// Row t of a bf16 cache: the k | v columns of a qkv row, rounded to bf16.
void store_kv(uint16_t* cache, int t, const float* qkv_row, const Config& c) {
    const int H = c.num_heads, n = 2 * c.kv_heads() * c.head_dim();
    const float* kv = qkv_row + (size_t)H * c.head_dim();
    uint16_t* dst = cache + (size_t)t * n;
    #pragma omp simd
    for (int i = 0; i < n; i++) dst[i] = (uint16_t)to_bf16(kv[i]);
}

// Fill a sequence's cache from a batched forward over its ctx; its logits are those of the last position.
void prefill(Model& m, Sequence& s, bool bf16) {
    const int T = (int)s.ctx.size(), V = m.cfg.vocab_size, W = m.cfg.qkv_width();
    m.forward(s.ctx.data(), 1, T, Dropout{});
    for (int l = 0; l < m.cfg.num_layers; l++) {
        const float* qkv = m.acts.layers[l].qkv;
        if (!bf16) {
            std::memcpy(s.cache[l].get(), qkv, (size_t)T * W * sizeof(float));
            continue;
        }
        for (int t = 0; t < T; t++) store_kv(s.kv(l), t, qkv + (size_t)t * W, m.cfg);
    }
    std::memcpy(s.logits.get(), m.acts.logits + (size_t)(T - 1) * V, V * sizeof(float));
    s.len = T;
}

// The decode step's products, from the fp32 weights through the training parts (dw null) or from their bf16
// copies: qkv, the attention's output projection, the MLP, the head.
void project_qkv(const Model& m, const DecodeWeights* dw, int l, float* qkv, const float* ln, int B) {
    if (!dw) return m.qkv_project(l, qkv, ln, B, false);
    bf16_product(qkv, m.cfg.qkv_width(), ln, m.cfg.embedding_dim, B, dw->layers[l].qkv, m.p.layers[l].qkv_b);
}

void project_out(const Model& m, const DecodeWeights* dw, int l, float* out, const float* att, int B) {
    if (!dw) return m.attn_out_forward(l, out, att, B, false);
    const int C = m.cfg.embedding_dim;
    bf16_product(out, C, att, C, B, dw->layers[l].out, m.p.layers[l].attproj_b);
}

void mlp_rows(const Model& m, const DecodeWeights* dw, int l, float* out, Rows& r, const float* ln, int B) {
    FeedForward ff = m.mlp(l);
    if (!dw) {
        ff.bf16 = false;
        return feedforward_forward(out, r.fch.get(), r.act.get(), ln, ff, B);
    }
    const DecodeWeights::Layer& w = dw->layers[l];
    const int C = ff.C, F = ff.F;
    if (ff.swiglu()) {
        bf16_product(r.fch.get(), 2 * F, ln, C, B, w.up, nullptr);
        swiglu_forward(r.act.get(), r.fch.get(), B, F);
    } else {
        bf16_product(r.fch.get(), F, ln, C, B, w.up, ff.fc_b, r.act.get());
    }
    bf16_product(out, C, r.act.get(), F, B, w.down, ff.proj_b);
}

void head_rows(const Model& m, const DecodeWeights* dw, float* logits, const float* ln, int B) {
    const int C = m.cfg.embedding_dim, V = m.cfg.vocab_size;
    if (dw) return bf16_product(logits, V, ln, C, B, dw->head, nullptr);
    projection_forward(logits, V, ln, C, m.p.head(), B, C, V);  // the head [V, C]: nn.Linear's layout
}

// Append each sequence's last token at its position s.len; their logits land in s.logits. Runs in fp32 whatever
// the model's precision (a few rows are bound by reading the weights, not by the products), or with dw on the bf16
// weights and caches. The block is Model::forward's, on B rows, from the same parts (cllm_block.cpp).
void decode_step(Model& m, Rows& r, const std::vector<Sequence*>& seqs, const DecodeWeights* dw) {
    const Config& c = m.cfg;
    const int C = c.embedding_dim, V = c.vocab_size, W = c.qkv_width(), B = (int)seqs.size();
    float *x = r.x.get(), *ln = r.ln.get(), *att = r.att.get(), *proj = r.proj.get(), *qkv = r.qkv.get();
    float *mean = r.mean.get(), *rstd = r.rstd.get();
    const float* pos = m.positions();  // null for LLAMA (RoPE)
    for (int b = 0; b < B; b++)
        embedding_forward(x + (size_t)b * C, &seqs[b]->ctx.back(), m.p.wte,
                          pos ? pos + (size_t)seqs[b]->len * C : nullptr, 1, 1, C);
    for (int l = 0; l < c.num_layers; l++) {
        const LayerTensors& w = m.p.layers[l];
        m.norm_forward(ln, mean, rstd, x, w.ln1_w, w.ln1_b, B);
        project_qkv(m, dw, l, qkv, ln, B);
        for (int b = 0; b < B; b++) {  // each row at its own position into its own cache, then attends to it
            float* row = qkv + (size_t)b * W;
            Sequence& s = *seqs[b];
            const int t = s.len;
            m.rope_qk(row, 1, 1, t);
            if (dw) {
                store_kv(s.kv(l), t, row, c);
                attention_decode_bf16(att + (size_t)b * C, row, s.kv(l), t, C, c.num_heads, c.kv_heads());
            } else {
                std::memcpy(s.cache[l].get() + (size_t)t * W, row, W * sizeof(float));
                attention_decode(att + (size_t)b * C, s.cache[l].get(), t, C, c.num_heads, c.kv_heads());
            }
        }
        project_out(m, dw, l, proj, att, B);
        add_inplace(x, proj, (size_t)B * C);
        m.norm_forward(ln, mean, rstd, x, w.ln2_w, w.ln2_b, B);
        mlp_rows(m, dw, l, proj, r, ln, B);
        add_inplace(x, proj, (size_t)B * C);
    }
    m.norm_forward(ln, mean, rstd, x, m.p.lnf_w, m.p.lnf_b, B);
    float* logits = r.logits.get();
    head_rows(m, dw, logits, ln, B);
    for (int b = 0; b < B; b++) {
        std::memcpy(seqs[b]->logits.get(), logits + (size_t)b * V, V * sizeof(float));
        seqs[b]->len++;
    }
}

// Repetition penalty (transformers' RepetitionPenaltyLogitsProcessor: a seen token's logit is divided by the
// penalty if positive, multiplied if negative), then frequency and presence penalties over the output.
void apply_penalties(float* logits, const Sequence& s, const Sampling& p) {
    for (int32_t t : s.seen) {
        float& z = logits[t];
        if (p.repetition_penalty != 1.0f) z = z < 0.0f ? z * p.repetition_penalty : z / p.repetition_penalty;
        const int n = std::max(0, s.counts[t]);  // occurrences in the output
        if (n > 0) z -= (float)n * p.frequency_penalty + p.presence_penalty;
    }
}

void note_token(Sequence& s, int32_t t, bool output) {
    int32_t& n = s.counts[t];
    if (n == 0) s.seen.push_back(t);
    if (output) n = std::max(0, n) + 1;
    else if (n == 0) n = -1;  // in the prompt only
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

std::vector<std::vector<int32_t>> generate(Model& m, const std::vector<std::vector<int32_t>>& prompts,
                                           int max_new_tokens, const Sampling& sampling, bool bf16,
                                           const std::vector<uint64_t>& seeds, const std::vector<int32_t>& stop_tokens,
                                           const StepCallback& on_step, std::vector<std::vector<float>>* all_logits) {
    const Config& c = m.cfg;
    const int Tmax = c.max_seq_len, V = c.vocab_size, B = (int)prompts.size();
    if (seeds.size() != prompts.size()) throw std::invalid_argument("one seed per prompt is needed");
    for (int b = 0; b < B; b++) {
        if (prompts[b].empty()) throw std::invalid_argument("prompt " + std::to_string(b) + " is empty");
        if ((int)prompts[b].size() > Tmax)
            throw std::invalid_argument("prompt " + std::to_string(b) + " length " + std::to_string(prompts[b].size()) +
                                        " exceeds max_seq_len " + std::to_string(Tmax));
    }
    if (sampling.vocab_limit < 0 || sampling.vocab_limit > V)
        throw std::invalid_argument("vocab_limit must be in [0, vocab_size = " + std::to_string(V) + "], got " +
                                    std::to_string(sampling.vocab_limit));
    const int drawn = sampling.vocab_limit > 0 ? sampling.vocab_limit : V;  // the ids a token may be drawn from
    std::vector<char> is_stop(V, 0);
    for (int32_t t : stop_tokens) is_stop.at(t) = 1;
    std::vector<Sequence> seqs(B);
    for (int b = 0; b < B && max_new_tokens > 0; b++) {
        Sequence& s = seqs[b];
        s.ctx = prompts[b];
        // the positions this call can fill (the whole context once it may slide): a short call allocates little
        const int positions = (int)std::min<int64_t>(Tmax, (int64_t)s.ctx.size() + max_new_tokens);
        for (int l = 0; l < c.num_layers; l++)
            s.cache.push_back(alloc_floats(cache_floats_per_layer(c, positions, bf16), false));  // read in order
        s.logits = alloc_floats(V);
        s.counts.assign(V, 0);
        for (int32_t t : prompts[b]) note_token(s, t, false);
        prefill(m, s, bf16);
    }
    // the bf16 weights, when a step will read them
    const std::unique_ptr<DecodeWeights> dw(bf16 && max_new_tokens > 1 ? new DecodeWeights(m) : nullptr);
    if (all_logits) all_logits->assign(B, {});
    Rows rows(c, std::max(1, B));
    std::vector<Sequence*> step;  // the sequences decoded together this step
    for (int i = 0; i < max_new_tokens; i++) {
        std::vector<int> drew;
        std::vector<int32_t> tokens;
        for (int b = 0; b < B; b++) {
            Sequence& s = seqs[b];
            if (s.done) continue;
            float* logits = s.logits.get();
            if (all_logits) (*all_logits)[b].insert((*all_logits)[b].end(), logits, logits + V);
            apply_penalties(logits, s, sampling);
            const int32_t t =
                sample_token(logits, drawn, sampling.temperature, sampling.top_k, sampling.top_p, seeds[b], i);
            if (is_stop[t]) {  // a stop token ends the sequence and is not part of it
                s.done = true;
                continue;
            }
            s.out.push_back(t);
            s.ctx.push_back(t);
            note_token(s, t, true);
            drew.push_back(b);
            tokens.push_back(t);
        }
        if (on_step && !drew.empty())
            for (int b : on_step(drew, tokens)) seqs.at(b).done = true;
        if (i + 1 == max_new_tokens) break;
        step.clear();
        for (int b = 0; b < B; b++) {
            Sequence& s = seqs[b];
            if (s.done) continue;
            if (s.len == Tmax) {
                // Context full: keep the most recent half and prefill again (positions are absolute).
                s.ctx.erase(s.ctx.begin(), s.ctx.end() - std::max(1, Tmax / 2));
                prefill(m, s, bf16);
            } else {
                step.push_back(&s);
            }
        }
        if (!step.empty()) decode_step(m, rows, step, dw.get());
        if (std::all_of(seqs.begin(), seqs.end(), [](const Sequence& s) { return s.done; })) break;
    }
    std::vector<std::vector<int32_t>> out(B);
    for (int b = 0; b < B; b++) out[b] = std::move(seqs[b].out);
    return out;
}

size_t generation_floats(const Config& c, int batch, int max_new_tokens, bool return_logits, bool bf16) {
    using u128 = unsigned __int128;
    const u128 B = (u128)std::max(1, batch);
    const u128 per_sequence =
        (u128)c.num_layers * cache_floats_per_layer(c, c.max_seq_len, bf16) + row_floats(c) + sequence_floats(c);
    const u128 total = B * per_sequence + activation_floats(c, 1, c.max_seq_len) +
                       (bf16 ? DecodeWeights::floats(c) : 0) +
                       (return_logits ? B * (u128)std::max(0, max_new_tokens) * c.vocab_size : 0);
    return total > SIZE_MAX ? SIZE_MAX : (size_t)total;
}

}  // namespace cllm
