// The whole-model training forward: every layer in order, keeping the activations the backward needs. One block
// wiring for both architectures; the parts differ (cllm_block.cpp):
//   x = drop(wte[tokens] + pos); per block: x += drop(attn(norm_1(x))); x += drop(mlp(norm_2(x)));
//   logits = norm_f(x) @ head^T     (pos: none for LLAMA, whose positions rotate q and k; head: wte or lm_head)
#include "cllm.h"

namespace cllm {

void Model::forward(const int32_t* tokens, int B, int T, const Dropout& d) {
    if (acts.B != B || acts.T != T) acts.allocate(cfg, B, T);
    const int C = cfg.embedding_dim, V = cfg.vocab_size, H = cfg.num_heads, KV = cfg.kv_heads();
    const int N = B * T;
    const size_t NC = (size_t)N * C;

    embedding_forward(acts.encoded, tokens, p.wte, positions(), B, T, C);
    dropout_forward(acts.encoded, NC, d, site_embedding());
    const float* x = acts.encoded;
    for (int l = 0; l < cfg.num_layers; l++) {
        const LayerTensors& w = p.layers[l];
        LayerActs& a = acts.layers[l];
        norm_forward(acts.ln_out, a.ln1_mean, a.ln1_rstd, x, w.ln1_w, w.ln1_b, N);
        qkv_forward(l, a.qkv, acts.ln_out, B, T, 0, cfg.bf16);
        attention_forward(a.atty, a.att_lse, a.qkv, B, T, C, H, KV, d, site_attn(l), cfg.bf16);
        attn_out_forward(l, a.res2, a.atty, N, cfg.bf16);
        dropout_forward(a.res2, NC, d, site_attn_resid(l));
        #pragma omp parallel for simd schedule(static)
        for (size_t i = 0; i < NC; i++) a.res2[i] += x[i];
        norm_forward(acts.ln_out, a.ln2_mean, a.ln2_rstd, a.res2, w.ln2_w, w.ln2_b, N);
        feedforward_forward(a.res3, a.fch, acts.act_out, acts.ln_out, mlp(l), N);
        dropout_forward(a.res3, NC, d, site_mlp_resid(l));
        #pragma omp parallel for simd schedule(static)
        for (size_t i = 0; i < NC; i++) a.res3[i] += a.res2[i];
        x = a.res3;
    }
    norm_forward(acts.lnf, acts.lnf_mean, acts.lnf_rstd, x, p.lnf_w, p.lnf_b, N);
    projection_forward(acts.logits, V, acts.lnf, C, p.head(), N, C, V, cfg.bf16);  // logits = lnf head^T
}

float Model::loss_only(const int32_t* targets) {
    const int N = acts.B * acts.T;
    cross_entropy_forward(acts.losses, acts.logits, targets, N, cfg.vocab_size);
    double s = 0.0;
    for (int i = 0; i < N; i++) s += acts.losses[i];
    return (float)(s / N);
}

float Model::loss_and_dlogits(const int32_t* targets, float grad_scale, float eps) {
    const int N = acts.B * acts.T;
    cross_entropy_fused(acts.losses, acts.logits, targets, N, cfg.vocab_size, grad_scale / N, eps);
    double s = 0.0;
    for (int i = 0; i < N; i++) s += acts.losses[i];
    return (float)(s / N);
}

float Model::forward_backward(const int32_t* tokens, const int32_t* targets, int B, int T, bool accumulate,
                              float grad_scale, float label_smoothing, const GradsReady& ready, float* demb) {
    Dropout d = step_dropout();
    dropout_step++;
    forward(tokens, B, T, d);
    float loss = loss_and_dlogits(targets, grad_scale, label_smoothing);
    if (!accumulate) zero_grad();
    backward(tokens, d, ready, demb);
    return loss;
}

}  // namespace cllm
