// The whole-model backward: from dlogits (left in acts.logits by the fused loss) back through every layer,
// accumulating into the gradient buffer. Mirrors Model::forward in reverse.
#include <cstring>

#include "cllm.h"

namespace cllm {

void Model::backward(const int32_t* tokens, const Dropout& d) {
    const int B = acts.B, T = acts.T;
    const int C = cfg.embedding_dim, V = cfg.vocab_size, H = cfg.num_heads;
    const int N = B * T;
    const size_t NC = (size_t)N * C;
    const float* dlogits = acts.logits;
    float* dres = acts.dres;  // gradient w.r.t. the residual stream, carried down the layers
    // The gradient entering a residual branch: dres itself, or with dropout a masked copy (in acts.dln, which
    // the branch overwrites only after its last read).
    auto branch_grad = [&](const float* dr, uint64_t site) -> const float* {
        if (!d.active()) return dr;
        std::memcpy(acts.dln, dr, NC * sizeof(float));
        dropout_backward(acts.dln, NC, d, site);
        return acts.dln;
    };

    // tied LM head: logits = lnf @ wte^T
    gemm({.c = acts.dln, .ldc = C, .a = {dlogits, V}, .b = {p.wte, C}, .m = N, .n = C, .k = V,
          .bf16 = cfg.bf16});  // dlnf = dlogits wte
    gemm({.c = g.wte, .ldc = C, .a = {dlogits, V, true}, .b = {acts.lnf, C}, .m = V, .n = C, .k = N,
          .accumulate = true, .bf16 = cfg.bf16});  // dwte += dlogits^T lnf
    const float* x_last = cfg.num_layers > 0 ? acts.layers[cfg.num_layers - 1].res3 : acts.encoded;
    std::memset(dres, 0, NC * sizeof(float));
    layernorm_backward(dres, g.lnf_w, g.lnf_b, acts.dln, x_last, p.lnf_w, acts.lnf_mean, acts.lnf_rstd, N, C);

    for (int l = cfg.num_layers - 1; l >= 0; l--) {
        const LayerTensors& w = p.layers[l];
        const LayerTensors& gw = g.layers[l];
        const LayerActs& a = acts.layers[l];
        const float* x_in = l == 0 ? acts.encoded : acts.layers[l - 1].res3;

        // res3 = res2 + drop(fcproj(gelu(fc(ln2(res2))))): dres flows to res2 unchanged, plus the MLP branch
        const float* dmlp = branch_grad(dres, site_mlp_resid(l));
        layernorm_forward(acts.ln_out, a.ln2_mean, a.ln2_rstd, a.res2, w.ln2_w, w.ln2_b, N, C);  // recompute
        feedforward_backward(acts.dln, mlp_grads(l), dmlp, acts.ln_out, a.fch, acts.gelu_out, acts.dfch, mlp(l), N);
        layernorm_backward(dres, gw.ln2_w, gw.ln2_b, acts.dln, a.res2, w.ln2_w, a.ln2_mean, a.ln2_rstd, N, C);

        // res2 = x_in + drop(attproj(attn(qkv(ln1(x_in)))))
        const float* dattn = branch_grad(dres, site_attn_resid(l));
        linear_backward(acts.datty, gw.attproj_w, gw.attproj_b, dattn, a.atty, w.attproj_w, N, C, C, false, cfg.bf16);
        attention_backward(acts.dqkv, acts.datty, a.qkv, a.atty, a.att_lse, B, T, C, H, d, site_attn(l), cfg.bf16);
        layernorm_forward(acts.ln_out, a.ln1_mean, a.ln1_rstd, x_in, w.ln1_w, w.ln1_b, N, C);  // recompute
        linear_backward(acts.dln, gw.qkv_w, gw.qkv_b, acts.dqkv, acts.ln_out, w.qkv_w, N, C, 3 * C, false, cfg.bf16);
        layernorm_backward(dres, gw.ln1_w, gw.ln1_b, acts.dln, x_in, w.ln1_w, a.ln1_mean, a.ln1_rstd, N, C);
    }

    dropout_backward(dres, NC, d, site_embedding());
    embedding_backward(g.wte, g.wpe, dres, tokens, B, T, C);  // g.wpe is null for the fixed table
}

}  // namespace cllm
