// The architectures' shapes: config validation, the parameter layout (Hugging Face GPT-2 or Llama names and
// shapes) and the activation arena's plan for a (B, T) step. Everything that sizes or binds a buffer reads them from here.
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
    if (c.num_kv_heads < 0 || c.num_heads % c.kv_heads() != 0)
        throw std::invalid_argument("num_kv_heads " + std::to_string(c.num_kv_heads) + " must divide num_heads " +
                                    std::to_string(c.num_heads));
    if (!c.llama()) {
        if (c.kv_heads() != c.num_heads)
            throw std::invalid_argument("gpt2 has num_kv_heads = num_heads, got " + std::to_string(c.num_kv_heads));
        if (!c.tie_embeddings) throw std::invalid_argument("gpt2's LM head is tied to wte (tie_embeddings)");
        return;
    }
    if (c.learned_pos) throw std::invalid_argument("llama's positions are rotary: learned_pos must be false");
    if (c.head_dim() % 2 != 0)
        throw std::invalid_argument("llama's rotary embedding needs an even head size, got " +
                                    std::to_string(c.head_dim()));
    if (!(c.rope_theta > 1.0f && c.rope_theta < 1e30f))
        throw std::invalid_argument("rope_theta must be > 1 and finite, got " + std::to_string(c.rope_theta));
    if (!(c.rms_norm_eps > 0.0f && c.rms_norm_eps < 1.0f))
        throw std::invalid_argument("rms_norm_eps must be in (0, 1), got " + std::to_string(c.rms_norm_eps));
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
    if (c.learned_pos) add("wpe", {T, C}, &ModelTensors::wpe);
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
