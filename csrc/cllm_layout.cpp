// The architectures' shapes: config validation, the parameter layout (Hugging Face GPT-2 or Llama names and
// shapes) and the activation arena's plan for a (B, T) step. Everything that sizes or binds a buffer reads them from here.
#include <cstdio>
#include <stdexcept>

#include "cllm.h"

namespace cllm {

// Every rule a model config must satisfy; Python's ModelConfig raises these messages as they are.
void validate_config(const Config& c) {
    auto fail = [](const std::string& msg) { throw std::invalid_argument(msg); };
    auto str = [](float v) {  // as Python prints it: 0.5, 500000.0, 1e-05, nan
        char buf[32];
        std::snprintf(buf, sizeof buf, "%g", v);
        std::string s(buf);
        return s.find_first_of(".en") == std::string::npos ? s + ".0" : s;
    };
    auto num = [](int64_t v) {  // with thousands separators, as Python's {:,} (v >= 0)
        const std::string digits = std::to_string(v);
        std::string s;
        for (size_t i = 0; i < digits.size(); i++) {
            if (i > 0 && (digits.size() - i) % 3 == 0) s += ',';
            s += digits[i];
        }
        return s;
    };
    const std::pair<int, const char*> sizes[] = {{c.vocab_size, "vocab_size"},   {c.max_seq_len, "max_seq_len"},
                                                 {c.embedding_dim, "embedding_dim"}, {c.num_layers, "num_layers"},
                                                 {c.num_heads, "num_heads"},     {c.ff_dim, "ff_dim"}};
    for (auto& [v, name] : sizes)
        if (v <= 0) fail(std::string(name) + " must be positive, got " + std::to_string(v));
    const int64_t INT32_LIMIT = 2147483647;
    if (3 * (int64_t)c.embedding_dim > INT32_LIMIT)  // the width of the qkv projection
        fail("embedding_dim " + num(c.embedding_dim) + " is too large (at most " + num(INT32_LIMIT / 3) + ")");
    if (c.llama() && 2 * (int64_t)c.ff_dim > INT32_LIMIT)  // the width of SwiGLU's gate | up
        fail("ff_dim " + num(c.ff_dim) + " is too large for llama (at most " + num(INT32_LIMIT / 2) + ")");
    if (c.embedding_dim % c.num_heads != 0)
        fail("embedding_dim " + std::to_string(c.embedding_dim) + " is not divisible by num_heads " +
             std::to_string(c.num_heads));
    if (!(c.dropout >= 0.0f && c.dropout < 1.0f)) fail("dropout must be in [0, 1), got " + str(c.dropout));
    if (c.num_kv_heads < 0) fail("num_kv_heads must be positive, got " + std::to_string(c.num_kv_heads));
    if (!(c.rope_theta > 1.0f && c.rope_theta < 1e30f))
        fail("rope_theta must be > 1 and finite, got " + str(c.rope_theta));
    if (!(c.rms_norm_eps > 0.0f && c.rms_norm_eps < 1.0f))
        fail("rms_norm_eps must be in (0, 1), got " + str(c.rms_norm_eps));
    if (!c.llama()) {
        if (c.pos_encoding == Pos::ROPE)
            fail("pos_encoding of a gpt2 model must be one of ('learned', 'sinusoidal'), got 'rope'");
        if (c.kv_heads() != c.num_heads)
            fail("num_kv_heads " + std::to_string(c.num_kv_heads) + " needs architecture 'llama' (gpt2 has " +
                 "num_kv_heads = num_heads " + std::to_string(c.num_heads) + ")");
        if (!c.tie_embeddings) fail("tie_embeddings=False needs architecture 'llama' (gpt2's LM head is tied to wte)");
        const Config defaults;  // llama's settings keep their defaults in a gpt2
        if (c.rope_theta != defaults.rope_theta)
            fail("rope_theta " + str(c.rope_theta) + " needs architecture 'llama' (gpt2 has none)");
        if (c.rms_norm_eps != defaults.rms_norm_eps)
            fail("rms_norm_eps " + str(c.rms_norm_eps) + " needs architecture 'llama' (gpt2 has none)");
        return;
    }
    if (c.pos_encoding == Pos::LEARNED || c.pos_encoding == Pos::SINUSOIDAL)
        fail(std::string("pos_encoding of a llama model must be one of ('rope',), got '") +
             (c.pos_encoding == Pos::LEARNED ? "learned'" : "sinusoidal'"));
    if (c.num_heads % c.kv_heads() != 0)
        fail("num_kv_heads " + std::to_string(c.kv_heads()) + " does not divide num_heads " +
             std::to_string(c.num_heads));
    if (c.head_dim() % 2 != 0)
        fail("llama's rotary embedding needs an even head size: embedding_dim " + std::to_string(c.embedding_dim) +
             " / num_heads " + std::to_string(c.num_heads) + " = " + std::to_string(c.head_dim()));
}

Config resolve_config(Config c) {
    validate_config(c);
    if (c.pos_encoding == Pos::AUTO) c.pos_encoding = c.llama() ? Pos::ROPE : Pos::LEARNED;
    c.num_kv_heads = c.kv_heads();
    return c;
}

namespace {

size_t pad16(size_t n) { return (n + 15) / 16 * 16; }  // every tensor/slice 64-byte aligned

// The arena's plan: every activation slice with its size in floats, in arena order.
using ArenaPlan = std::vector<std::pair<float**, size_t>>;

ArenaPlan arena_plan(Activations& a, const Config& c, int B, int T) {
    const size_t BT = (size_t)B * T, C = c.embedding_dim, F = c.ff_dim, V = c.vocab_size, H = c.num_heads;
    const size_t QKV = c.qkv_width(), FCH = c.mlp_width();
    const size_t MEAN = c.llama() ? 0 : BT;  // RMSNorm keeps no mean
    ArenaPlan plan{{&a.encoded, BT * C}};
    a.layers.assign(c.num_layers, LayerActs{});
    for (auto& l : a.layers)
        plan.insert(plan.end(), {{&l.ln1_mean, MEAN}, {&l.ln1_rstd, BT}, {&l.qkv, BT * QKV}, {&l.atty, BT * C},
                                 {&l.att_lse, BT * H}, {&l.res2, BT * C}, {&l.ln2_mean, MEAN}, {&l.ln2_rstd, BT},
                                 {&l.fch, BT * FCH}, {&l.res3, BT * C}});
    plan.insert(plan.end(), {{&a.ln_out, BT * C}, {&a.act_out, BT * F}, {&a.lnf, BT * C}, {&a.lnf_mean, MEAN},
                             {&a.lnf_rstd, BT}, {&a.logits, BT * V}, {&a.losses, BT}});
    // backward scratch
    plan.insert(plan.end(), {{&a.dres, BT * C}, {&a.dln, BT * C}, {&a.dqkv, BT * QKV}, {&a.datty, BT * C},
                             {&a.dfch, BT * FCH}});
    return plan;
}

size_t plan_floats(const ArenaPlan& plan) {
    size_t total = 0;
    for (auto& s : plan) total += pad16(s.second);
    return total;
}

}  // namespace

ParamLayout::ParamLayout(const Config& c) : num_layers(c.num_layers) {
    validate_config(c);
    const int64_t V = c.vocab_size, T = c.max_seq_len, C = c.embedding_dim, F = c.ff_dim;
    const int64_t KVD = (int64_t)c.kv_heads() * c.head_dim();  // K/V width
    int layer = -1;  // the layer of the tensors being added, -1 outside the blocks
    auto add = [&](const std::string& name, std::vector<int64_t> shape, float* ModelTensors::*top,
                   float* LayerTensors::*field = nullptr) {
        size_t n = 1;
        for (auto s : shape) n *= (size_t)s;
        tensors.push_back({name, shape, total, n, shape.size() == 2});
        slots.push_back({top, layer, field});
        total += pad16(n);
        parameters += n;
    };
    using L = LayerTensors;
    if (c.llama()) {  // LlamaForCausalLM's state-dict names without "model."; nn.Linear weights [out, in]
        add("embed_tokens.weight", {V, C}, &ModelTensors::wte);
        for (layer = 0; layer < c.num_layers; layer++) {
            const std::string h = "layers." + std::to_string(layer) + ".";
            add(h + "input_layernorm.weight", {C}, nullptr, &L::ln1_w);
            add(h + "self_attn.q_proj.weight", {C, C}, nullptr, &L::q_w);
            add(h + "self_attn.k_proj.weight", {KVD, C}, nullptr, &L::k_w);
            add(h + "self_attn.v_proj.weight", {KVD, C}, nullptr, &L::v_w);
            add(h + "self_attn.o_proj.weight", {C, C}, nullptr, &L::o_w);
            add(h + "post_attention_layernorm.weight", {C}, nullptr, &L::ln2_w);
            add(h + "mlp.gate_proj.weight", {F, C}, nullptr, &L::gate_w);
            add(h + "mlp.up_proj.weight", {F, C}, nullptr, &L::up_w);
            add(h + "mlp.down_proj.weight", {C, F}, nullptr, &L::down_w);
        }
        layer = -1;
        add("norm.weight", {C}, &ModelTensors::lnf_w);
        if (!c.tie_embeddings) add("lm_head.weight", {V, C}, &ModelTensors::lm_head);
        return;
    }
    // GPT-2's state-dict names without "transformer."; Conv1D weights [in, out]
    add("wte", {V, C}, &ModelTensors::wte);
    if (c.learned_pos()) add("wpe", {T, C}, &ModelTensors::wpe);
    for (layer = 0; layer < c.num_layers; layer++) {
        const std::string h = "h." + std::to_string(layer) + ".";
        add(h + "ln_1.weight", {C}, nullptr, &L::ln1_w);
        add(h + "ln_1.bias", {C}, nullptr, &L::ln1_b);
        add(h + "attn.c_attn.weight", {C, 3 * C}, nullptr, &L::qkv_w);
        add(h + "attn.c_attn.bias", {3 * C}, nullptr, &L::qkv_b);
        add(h + "attn.c_proj.weight", {C, C}, nullptr, &L::attproj_w);
        add(h + "attn.c_proj.bias", {C}, nullptr, &L::attproj_b);
        add(h + "ln_2.weight", {C}, nullptr, &L::ln2_w);
        add(h + "ln_2.bias", {C}, nullptr, &L::ln2_b);
        add(h + "mlp.c_fc.weight", {C, F}, nullptr, &L::fc_w);
        add(h + "mlp.c_fc.bias", {F}, nullptr, &L::fc_b);
        add(h + "mlp.c_proj.weight", {F, C}, nullptr, &L::fcproj_w);
        add(h + "mlp.c_proj.bias", {C}, nullptr, &L::fcproj_b);
    }
    layer = -1;
    add("ln_f.weight", {C}, &ModelTensors::lnf_w);
    add("ln_f.bias", {C}, &ModelTensors::lnf_b);
}

ModelTensors ParamLayout::bind(float* base) const {
    ModelTensors m;
    m.layers.resize(num_layers);
    for (size_t i = 0; i < tensors.size(); i++) {
        float* ptr = base + tensors[i].offset;
        const Slot& s = slots[i];
        if (s.layer >= 0)
            m.layers[s.layer].*s.field = ptr;
        else
            m.*s.top = ptr;
    }
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
