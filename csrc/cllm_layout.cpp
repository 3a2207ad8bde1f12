// The architecture's shapes: config validation, the parameter layout (Hugging Face GPT-2 names and order) and
// the activation arena's plan for a (B, T) step. Everything that sizes or binds a buffer reads them from here.
#include <stdexcept>

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

namespace {

size_t pad16(size_t n) { return (n + 15) / 16 * 16; }  // every tensor/slice 64-byte aligned

// The arena's plan: every activation slice with its size in floats, in arena order.
using ArenaPlan = std::vector<std::pair<float**, size_t>>;

ArenaPlan arena_plan(Activations& a, const Config& c, int B, int T) {
    const size_t BT = (size_t)B * T, C = c.embedding_dim, F = c.ff_dim, V = c.vocab_size, H = c.num_heads;
    ArenaPlan plan{{&a.encoded, BT * C}};
    a.layers.assign(c.num_layers, LayerActs{});
    for (auto& l : a.layers)
        plan.insert(plan.end(), {{&l.ln1_mean, BT}, {&l.ln1_rstd, BT}, {&l.qkv, BT * 3 * C}, {&l.atty, BT * C},
                                 {&l.att_lse, BT * H}, {&l.res2, BT * C}, {&l.ln2_mean, BT}, {&l.ln2_rstd, BT},
                                 {&l.fch, BT * F}, {&l.res3, BT * C}});
    plan.insert(plan.end(), {{&a.ln_out, BT * C}, {&a.gelu_out, BT * F}, {&a.lnf, BT * C}, {&a.lnf_mean, BT},
                             {&a.lnf_rstd, BT}, {&a.logits, BT * V}, {&a.losses, BT}});
    // backward scratch
    plan.insert(plan.end(), {{&a.dres, BT * C}, {&a.dln, BT * C}, {&a.dqkv, BT * 3 * C}, {&a.datty, BT * C},
                             {&a.dfch, BT * F}});
    return plan;
}

size_t plan_floats(const ArenaPlan& plan) {
    size_t total = 0;
    for (auto& s : plan) total += pad16(s.second);
    return total;
}

}  // namespace

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

size_t activation_floats(const Config& c, int B, int T) {
    Activations a;
    return plan_floats(arena_plan(a, c, B, T));
}

void Activations::allocate(const Config& c, int B_, int T_) {
    B = B_;
    T = T_;
    const ArenaPlan plan = arena_plan(*this, c, B, T);
    arena_floats = plan_floats(plan);
    arena = alloc_floats(arena_floats);
    float* cur = arena.get();
    for (auto& s : plan) {
        *s.first = cur;
        cur += pad16(s.second);
    }
}

}  // namespace cllm
