// The whole-model backward: from dlogits (left in acts.logits by the fused loss) back through every layer,
// accumulating into the gradient buffer. Mirrors Model::forward in reverse.
#include <cstring>
#include <stdexcept>

#include "cllm.h"

namespace cllm {

void Model::backward(const int32_t* tokens, const Dropout& d, const GradsReady& ready, float* demb) {
    if (demb && !cfg.tie_embeddings) throw std::invalid_argument("backward: demb needs a tied head (wte)");
    const int B = acts.B, T = acts.T;
    const int C = cfg.embedding_dim, V = cfg.vocab_size, H = cfg.num_heads, KV = cfg.kv_heads();
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

    // LM head: logits = lnf @ head^T (head = wte when tied)
    gemm({.c = acts.dln, .ldc = C, .a = {dlogits, V}, .b = {p.head(), C}, .m = N, .n = C, .k = V,
          .bf16 = cfg.bf16});  // dlnf = dlogits head
    gemm({.c = g.head(), .ldc = C, .a = {dlogits, V, true}, .b = {acts.lnf, C}, .m = V, .n = C, .k = N,
          .accumulate = true, .bf16 = cfg.bf16});  // dhead += dlogits^T lnf
    const size_t total = layout.total;
    auto offset = [&](const float* t) { return (size_t)(t - grads.get()); };
    // with demb the head's part is all this backward adds to wte: final already
    if (demb && ready) ready(offset(g.wte), offset(g.wte) + (size_t)V * C);
    const float* x_last = cfg.num_layers > 0 ? acts.layers[cfg.num_layers - 1].res3 : acts.encoded;
    std::memset(dres, 0, NC * sizeof(float));
    norm_backward(dres, g.lnf_w, g.lnf_b, acts.dln, x_last, p.lnf_w, acts.lnf_mean, acts.lnf_rstd, N);
    // The final norm's tensors begin the layout's tail (an untied head after them is done too), each layer's
    // begin with its ln1_w and its MLP half with ln2_w; only the embeddings at the front wait for the end (with
    // demb, only wpe).
    auto done_from = [&](const float* first) {
        if (ready) ready(offset(first), total);
    };
    done_from(g.lnf_w);

    for (int l = cfg.num_layers - 1; l >= 0; l--) {
        const LayerTensors& w = p.layers[l];
        const LayerTensors& gw = g.layers[l];
        const LayerActs& a = acts.layers[l];
        const float* x_in = l == 0 ? acts.encoded : acts.layers[l - 1].res3;

        // res3 = res2 + drop(mlp(norm_2(res2))): dres flows to res2 unchanged, plus the MLP branch
        const float* dmlp = branch_grad(dres, site_mlp_resid(l));
        norm_forward(acts.ln_out, a.ln2_mean, a.ln2_rstd, a.res2, w.ln2_w, w.ln2_b, N);  // recompute
        feedforward_backward(acts.dln, mlp_grads(l), dmlp, acts.ln_out, a.fch, acts.act_out, acts.dfch, mlp(l), N);
        norm_backward(dres, gw.ln2_w, gw.ln2_b, acts.dln, a.res2, w.ln2_w, a.ln2_mean, a.ln2_rstd, N);
        done_from(gw.ln2_w);  // the MLP half (ln2 and the MLP, 2/3 of the layer) goes while attention computes

        // res2 = x_in + drop(attn_out(attn(qkv(norm_1(x_in)))))
        const float* dattn = branch_grad(dres, site_attn_resid(l));
        attn_out_backward(l, acts.datty, dattn, a.atty, N, cfg.bf16);
        attention_backward(acts.dqkv, acts.datty, a.qkv, a.atty, a.att_lse, B, T, C, H, KV, d, site_attn(l),
                           cfg.bf16);
        norm_forward(acts.ln_out, a.ln1_mean, a.ln1_rstd, x_in, w.ln1_w, w.ln1_b, N);  // recompute
        qkv_backward(l, acts.dln, acts.dqkv, acts.ln_out, B, T, cfg.bf16);
        norm_backward(dres, gw.ln1_w, gw.ln1_b, acts.dln, x_in, w.ln1_w, a.ln1_mean, a.ln1_rstd, N);
        done_from(gw.ln1_w);
    }

    dropout_backward(dres, NC, d, site_embedding());
    if (demb)
        std::memcpy(demb, dres, NC * sizeof(float));
    else
        embedding_backward(g.wte, g.wpe, dres, tokens, B, T, C);  // g.wpe is null without a learned table
    done_from(grads.get());
}

}  // namespace cllm
