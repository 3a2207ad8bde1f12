// The transformer block's parts for each architecture. Model::forward, Model::backward and the cached decode
// (cllm_inference.cpp) wire the same block, x += attn(norm_1(x)); x += mlp(norm_2(x)), from these parts:
//   GPT2:  LayerNorm; c_attn (bias) -> qkv; c_proj (bias); c_fc -> GELU -> c_proj    weights [in, out]
//   LLAMA: RMSNorm; q/k/v_proj -> qkv, RoPE on q and k; o_proj; SwiGLU               weights [out, in], no biases
#include "cllm.h"

namespace cllm {

void Model::norm_forward(float* out, float* mean, float* rstd, const float* x, const float* w, const float* b,
                         int N) const {
    if (cfg.llama())
        rmsnorm_forward(out, rstd, x, w, N, cfg.embedding_dim, cfg.rms_norm_eps);
    else
        layernorm_forward(out, mean, rstd, x, w, b, N, cfg.embedding_dim);
}

void Model::norm_backward(float* dinp, float* dw, float* db, const float* dout, const float* x, const float* w,
                          const float* mean, const float* rstd, int N) const {
    if (cfg.llama())
        rmsnorm_backward(dinp, dw, dout, x, w, rstd, N, cfg.embedding_dim);
    else
        layernorm_backward(dinp, dw, db, dout, x, w, mean, rstd, N, cfg.embedding_dim);
}

void Model::qkv_project(int l, float* qkv, const float* x, int N, bool bf16) const {
    const int C = cfg.embedding_dim;
    const LayerTensors& w = p.layers[l];
    if (!cfg.llama()) return linear_forward(qkv, x, w.qkv_w, w.qkv_b, N, C, 3 * C, bf16);
    const int W = cfg.qkv_width(), H = cfg.num_heads, KV = cfg.kv_heads(), hs = cfg.head_dim();
    projection_forward(qkv, W, x, C, w.q_w, N, C, H * hs, bf16);
    projection_forward(qkv + H * hs, W, x, C, w.k_w, N, C, KV * hs, bf16);
    projection_forward(qkv + (H + KV) * hs, W, x, C, w.v_w, N, C, KV * hs, bf16);
}

void Model::rope_qk(float* qkv, int B, int T, int pos0) const {
    if (!cfg.llama()) return;
    const int W = cfg.qkv_width(), H = cfg.num_heads, KV = cfg.kv_heads(), hs = cfg.head_dim();
    const size_t at = (size_t)pos0 * (hs / 2);
    rope_forward(qkv, W, H + KV, hs, B, T, rope_cos.data() + at, rope_sin.data() + at);  // q and k are adjacent
}

void Model::qkv_forward(int l, float* qkv, const float* x, int B, int T, int pos0, bool bf16) const {
    qkv_project(l, qkv, x, B * T, bf16);
    rope_qk(qkv, B, T, pos0);
}

void Model::qkv_backward(int l, float* dx, float* dqkv, const float* x, int B, int T, bool bf16) {
    const int C = cfg.embedding_dim, N = B * T;
    const LayerTensors &w = p.layers[l], &gw = g.layers[l];
    if (!cfg.llama()) return linear_backward(dx, gw.qkv_w, gw.qkv_b, dqkv, x, w.qkv_w, N, C, 3 * C, false, bf16);
    const int W = cfg.qkv_width(), H = cfg.num_heads, KV = cfg.kv_heads(), hs = cfg.head_dim();
    rope_backward(dqkv, W, H + KV, hs, B, T, rope_cos.data(), rope_sin.data());
    projection_backward(dx, C, gw.q_w, dqkv, W, x, w.q_w, N, C, H * hs, false, bf16);
    projection_backward(dx, C, gw.k_w, dqkv + H * hs, W, x, w.k_w, N, C, KV * hs, true, bf16);
    projection_backward(dx, C, gw.v_w, dqkv + (H + KV) * hs, W, x, w.v_w, N, C, KV * hs, true, bf16);
}

void Model::attn_out_forward(int l, float* out, const float* att, int N, bool bf16) const {
    const int C = cfg.embedding_dim;
    const LayerTensors& w = p.layers[l];
    if (cfg.llama())
        projection_forward(out, C, att, C, w.o_w, N, C, C, bf16);
    else
        linear_forward(out, att, w.attproj_w, w.attproj_b, N, C, C, bf16);
}

void Model::attn_out_backward(int l, float* datt, const float* dout, const float* att, int N, bool bf16) {
    const int C = cfg.embedding_dim;
    const LayerTensors &w = p.layers[l], &gw = g.layers[l];
    if (cfg.llama())
        projection_backward(datt, C, gw.o_w, dout, C, att, w.o_w, N, C, C, false, bf16);
    else
        linear_backward(datt, gw.attproj_w, gw.attproj_b, dout, att, w.attproj_w, N, C, C, false, bf16);
}

FeedForward Model::mlp(int layer) const {
    const LayerTensors& w = p.layers[layer];
    return {.fc_w = w.fc_w, .fc_b = w.fc_b, .proj_w = w.fcproj_w, .proj_b = w.fcproj_b, .gate_w = w.gate_w,
            .up_w = w.up_w, .down_w = w.down_w, .C = cfg.embedding_dim, .F = cfg.ff_dim, .bf16 = cfg.bf16};
}

FeedForwardGrads Model::mlp_grads(int layer) const {
    const LayerTensors& w = g.layers[layer];
    return {.fc_w = w.fc_w, .fc_b = w.fc_b, .proj_w = w.fcproj_w, .proj_b = w.fcproj_b, .gate_w = w.gate_w,
            .up_w = w.up_w, .down_w = w.down_w};
}

}  // namespace cllm
