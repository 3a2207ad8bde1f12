// Config validation, the parameter layout (Hugging Face GPT-2 names), buffers, the activation arena and
// GPT-2 initialisation.
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <omp.h>
#include <stdexcept>

#include <sys/mman.h>

#include "cllm.h"

namespace cllm {

void validate_config(const Config& c) {
    auto positive = [](int v, const char* name) {
        if (v <= 0) throw std::invalid_argument(std::string(name) + " must be positive, got " + std::to_string(v));
    };
    positive(c.vocab_size, "vocab_size");
    positive(c.max_seq_len, "max_seq_len");
    positive(c.embedding_dim, "embedding_dim");
    positive(c.num_layers, "num_layers");
    positive(c.num_heads, "num_heads");
    positive(c.ff_dim, "ff_dim");
    if (c.embedding_dim % c.num_heads != 0)
        throw std::invalid_argument("embedding_dim " + std::to_string(c.embedding_dim) +
                                    " is not divisible by num_heads " + std::to_string(c.num_heads));
    if (!(c.dropout >= 0.0f && c.dropout < 1.0f))
        throw std::invalid_argument("dropout must be in [0, 1), got " + std::to_string(c.dropout));
}

void AlignedFree::operator()(float* p) const { std::free(p); }

FloatBuffer alloc_floats(size_t n) {
    // Big buffers (parameters, gradients, optimizer state, the activation arena) on 2 MiB boundaries and
    // marked for transparent huge pages: the GEMMs walk them by rows far apart, and 4 KiB pages then cost a
    // TLB miss per row.
    constexpr size_t HUGE = 2u << 20;
    const bool huge = n * sizeof(float) >= HUGE;
    const size_t align = huge ? HUGE : 64;
    size_t bytes = ((n * sizeof(float) + align - 1) / align) * align;
    if (bytes == 0) bytes = 64;
    float* p = static_cast<float*>(std::aligned_alloc(align, bytes));
    if (!p) throw std::bad_alloc();
#ifdef MADV_HUGEPAGE
    if (huge) madvise(p, bytes, MADV_HUGEPAGE);  // a hint: no huge pages is fine too
#endif
    std::memset(p, 0, bytes);
    return FloatBuffer(p);
}

static size_t pad16(size_t n) { return (n + 15) / 16 * 16; }  // every tensor/slice 64-byte aligned

ParamLayout::ParamLayout(const Config& c) {
    validate_config(c);
    const int64_t V = c.vocab_size, T = c.max_seq_len, C = c.embedding_dim, F = c.ff_dim;
    auto add = [&](const std::string& name, std::vector<int64_t> shape) {
        size_t n = 1;
        for (auto s : shape) n *= (size_t)s;
        tensors.push_back({name, shape, total, n, shape.size() == 2});
        total += pad16(n);
    };
    add("wte", {V, C});
    if (c.learned_pos) add("wpe", {T, C});
    for (int l = 0; l < c.num_layers; l++) {
        std::string h = "h." + std::to_string(l) + ".";
        add(h + "ln_1.weight", {C});
        add(h + "ln_1.bias", {C});
        add(h + "attn.c_attn.weight", {C, 3 * C});
        add(h + "attn.c_attn.bias", {3 * C});
        add(h + "attn.c_proj.weight", {C, C});
        add(h + "attn.c_proj.bias", {C});
        add(h + "ln_2.weight", {C});
        add(h + "ln_2.bias", {C});
        add(h + "mlp.c_fc.weight", {C, F});
        add(h + "mlp.c_fc.bias", {F});
        add(h + "mlp.c_proj.weight", {F, C});
        add(h + "mlp.c_proj.bias", {C});
    }
    add("ln_f.weight", {C});
    add("ln_f.bias", {C});
}

ModelTensors ParamLayout::bind(float* base) const {
    ModelTensors m;
    size_t i = 0;
    auto next = [&]() { return base + tensors[i++].offset; };
    m.wte = next();
    m.wpe = tensors[1].name == "wpe" ? next() : nullptr;
    size_t per_layer = 12, L = (tensors.size() - i - 2) / per_layer;
    for (size_t l = 0; l < L; l++) {
        LayerTensors t;
        t.ln1_w = next(); t.ln1_b = next(); t.qkv_w = next(); t.qkv_b = next();
        t.attproj_w = next(); t.attproj_b = next(); t.ln2_w = next(); t.ln2_b = next();
        t.fc_w = next(); t.fc_b = next(); t.fcproj_w = next(); t.fcproj_b = next();
        m.layers.push_back(t);
    }
    m.lnf_w = next();
    m.lnf_b = next();
    return m;
}

// The arena's plan: every activation slice with its size in floats, in arena order.
static std::vector<std::pair<float**, size_t>> arena_plan(Activations& a, const Config& c, int B, int T) {
    const size_t BT = (size_t)B * T, C = c.embedding_dim, F = c.ff_dim, V = c.vocab_size, H = c.num_heads;
    std::vector<std::pair<float**, size_t>> plan;
    a.layers.assign(c.num_layers, LayerActs{});
    plan.push_back({&a.encoded, BT * C});
    for (auto& l : a.layers) {
        plan.push_back({&l.ln1_mean, BT});
        plan.push_back({&l.ln1_rstd, BT});
        plan.push_back({&l.qkv, BT * 3 * C});
        plan.push_back({&l.atty, BT * C});
        plan.push_back({&l.att_lse, BT * H});
        plan.push_back({&l.res2, BT * C});
        plan.push_back({&l.ln2_mean, BT});
        plan.push_back({&l.ln2_rstd, BT});
        plan.push_back({&l.fch, BT * F});
        plan.push_back({&l.res3, BT * C});
    }
    plan.push_back({&a.ln_out, BT * C});
    plan.push_back({&a.gelu_out, BT * F});
    plan.push_back({&a.lnf, BT * C});
    plan.push_back({&a.lnf_mean, BT});
    plan.push_back({&a.lnf_rstd, BT});
    plan.push_back({&a.logits, BT * V});
    plan.push_back({&a.losses, BT});
    plan.push_back({&a.dres, BT * C});
    plan.push_back({&a.dln, BT * C});
    plan.push_back({&a.dqkv, BT * 3 * C});
    plan.push_back({&a.datty, BT * C});
    plan.push_back({&a.dfch, BT * F});
    return plan;
}

size_t activation_floats(const Config& c, int B, int T) {
    Activations a;
    size_t total = 0;
    for (auto& s : arena_plan(a, c, B, T)) total += pad16(s.second);
    return total;
}

void Activations::allocate(const Config& c, int B_, int T_) {
    B = B_;
    T = T_;
    auto plan = arena_plan(*this, c, B, T);
    size_t total = 0;
    for (auto& s : plan) total += pad16(s.second);
    arena = alloc_floats(total);
    arena_floats = total;
    float* cur = arena.get();
    for (auto& s : plan) {
        *s.first = cur;
        cur += pad16(s.second);
    }
}

uint64_t mix64(uint64_t x) {  // splitmix64 finaliser
    x += 0x9E3779B97F4A7C15ULL;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
    return x ^ (x >> 31);
}

// Standard normal from a counter: Box-Muller over two hashed uniforms, identical on every platform.
static float normal_at(uint64_t seed, uint64_t stream, uint64_t i) {
    uint64_t a = mix64(seed ^ mix64(stream * 0x100000001B3ULL + 2 * i));
    uint64_t b = mix64(seed ^ mix64(stream * 0x100000001B3ULL + 2 * i + 1));
    double u1 = ((a >> 11) + 1.0) * (1.0 / 9007199254740993.0);  // (0, 1]
    double u2 = (b >> 11) * (1.0 / 9007199254740992.0);
    return (float)(std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2));
}

Model::Model(const Config& c, uint64_t seed) : cfg(c), layout(c) {
    params = alloc_floats(layout.total);
    grads = alloc_floats(layout.total);
    p = layout.bind(params.get());
    g = layout.bind(grads.get());
    dropout_seed = mix64(seed ^ 0xD1B54A32D192ED03ULL);
    if (!cfg.learned_pos) {
        pos_table.resize((size_t)cfg.max_seq_len * cfg.embedding_dim);
        sinusoidal_table(pos_table.data(), cfg.max_seq_len, cfg.embedding_dim);
    }
    // GPT-2 init: weights N(0, 0.02), residual projections N(0, 0.02/sqrt(2L)), biases 0, LayerNorm 1/0.
    const float resid_std = 0.02f / std::sqrt(2.0f * cfg.num_layers);
    for (size_t t = 0; t < layout.tensors.size(); t++) {
        const TensorInfo& ti = layout.tensors[t];
        float* w = params.get() + ti.offset;
        const std::string& n = ti.name;
        auto ends_with = [&](const char* s) {
            size_t k = std::strlen(s);
            return n.size() >= k && n.compare(n.size() - k, k, s) == 0;
        };
        if (ends_with("ln_1.weight") || ends_with("ln_2.weight") || n == "ln_f.weight") {
            for (size_t i = 0; i < ti.size; i++) w[i] = 1.0f;
        } else if (ti.shape.size() == 2) {
            float std = (ends_with("c_proj.weight")) ? resid_std : 0.02f;
            #pragma omp parallel for schedule(static)
            for (size_t i = 0; i < ti.size; i++) w[i] = std * normal_at(seed, t, i);
        }  // biases and LayerNorm biases stay 0
    }
}

Dropout Model::step_dropout() const {
    Dropout d;
    d.p = cfg.dropout;
    const uint64_t base = dropout_stream == 0 ? dropout_seed : mix64(dropout_seed ^ mix64(dropout_stream));
    d.seed = mix64(base + dropout_step);
    return d;
}

void Model::zero_grad() { std::memset(grads.get(), 0, layout.total * sizeof(float)); }

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

int get_num_threads() { return omp_get_max_threads(); }
void set_num_threads(int n) { omp_set_num_threads(n); }

}  // namespace cllm
