"""NumPy float64 reference model for CLLM (the test oracle): the whole model.

The GPT-2 and Llama models of docs/design.md (section 1, "The model") assembled from the parts in oracle.py,
with the same conventions (float64, hand-written backward): ``param_shapes`` / ``init_params`` by Hugging Face
name, ``model_forward`` (logits, mean loss, cache), ``model_backward`` (the gradient of every parameter) and
``model_loss``.

The model (GPT-2, pre-LayerNorm, LM head tied to ``wte``)::

    x = wte[tokens] + pos[:T]            (dropout "emb")
    per block i:
        x = x + drop_resid(c_proj(attn(c_attn(ln_1(x)))))       attn probs use mask "h.{i}.attn"
        x = x + drop_resid(c_proj(gelu(c_fc(ln_2(x)))))
    logits = ln_f(x) @ wte.T
    loss = mean cross-entropy(logits, targets)

The Llama model (``cfg.architecture == "llama"``; LlamaForCausalLM's names without ``model.``, nn.Linear
weights ``[out, in]``: ``y = x @ W.T``, no biases)::

    x = embed_tokens[tokens]              (dropout "emb")
    per block i:
        q, k, v = x' @ Wq.T, x' @ Wk.T, x' @ Wv.T with x' = rmsnorm(x; input_layernorm)
        q, k = rope(q), rope(k)            (rotate_half convention, angle t * theta^(-2j/hs))
        x = x + drop_resid(o_proj(attn(q, k, v)))      K/V head h // (H/KV) serves query head h
        x = x + drop_resid(down_proj(silu(gate_proj(x'')) * up_proj(x'')))   x'' = rmsnorm(x; post_attention_layernorm)
    logits = rmsnorm(x; norm) @ head.T    (head: lm_head.weight, or embed_tokens.weight when tied)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from oracle import (_f64, attention_backward, attention_forward, cross_entropy_backward, cross_entropy_forward,
                    embedding_backward, embedding_forward, feedforward_backward, feedforward_forward,
                    layernorm_backward, layernorm_forward, linear_backward, linear_forward, rmsnorm_backward,
                    rmsnorm_forward, rope_backward, rope_forward, sinusoidal_table, swiglu_backward, swiglu_forward)


# ----------------------------------------------------------------------------------------------------
# the whole model
# ----------------------------------------------------------------------------------------------------
@dataclass
class Config:
    """Model hyper-parameters; any object with these attributes (e.g. cllm.ModelConfig) works too."""
    vocab_size: int = 11
    max_seq_len: int = 6
    embedding_dim: int = 8
    num_layers: int = 2
    num_heads: int = 2
    ff_dim: int = 12
    dropout: float = 0.0
    pos_encoding: str = "learned"
    architecture: str = "gpt2"
    num_kv_heads: int = None  # None: num_heads
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = True


def _llama(cfg) -> bool:
    return getattr(cfg, "architecture", "gpt2") == "llama"


def _kv_heads(cfg) -> int:
    return getattr(cfg, "num_kv_heads", None) or cfg.num_heads


def _llama_param_shapes(cfg) -> dict:
    """Name -> shape of LlamaForCausalLM's state dict without "model." (nn.Linear weights [out, in])."""
    V, C, F = cfg.vocab_size, cfg.embedding_dim, cfg.ff_dim
    KVD = _kv_heads(cfg) * (C // cfg.num_heads)
    shapes = {"embed_tokens.weight": (V, C)}
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        shapes.update({p + "input_layernorm.weight": (C,), p + "self_attn.q_proj.weight": (C, C),
                       p + "self_attn.k_proj.weight": (KVD, C), p + "self_attn.v_proj.weight": (KVD, C),
                       p + "self_attn.o_proj.weight": (C, C), p + "post_attention_layernorm.weight": (C,),
                       p + "mlp.gate_proj.weight": (F, C), p + "mlp.up_proj.weight": (F, C),
                       p + "mlp.down_proj.weight": (C, F)})
    shapes["norm.weight"] = (C,)
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (V, C)
    return shapes


def param_shapes(cfg) -> dict:
    """Name -> shape, in the order of the Hugging Face GPT-2 state dict (or Llama's, see _llama_param_shapes)."""
    if _llama(cfg):
        return _llama_param_shapes(cfg)
    V, C, F, L = cfg.vocab_size, cfg.embedding_dim, cfg.ff_dim, cfg.num_layers
    shapes = {"wte": (V, C)}
    if cfg.pos_encoding == "learned":
        shapes["wpe"] = (cfg.max_seq_len, C)
    for i in range(L):
        p = f"h.{i}."
        shapes[p + "ln_1.weight"] = (C,)
        shapes[p + "ln_1.bias"] = (C,)
        shapes[p + "attn.c_attn.weight"] = (C, 3 * C)
        shapes[p + "attn.c_attn.bias"] = (3 * C,)
        shapes[p + "attn.c_proj.weight"] = (C, C)
        shapes[p + "attn.c_proj.bias"] = (C,)
        shapes[p + "ln_2.weight"] = (C,)
        shapes[p + "ln_2.bias"] = (C,)
        shapes[p + "mlp.c_fc.weight"] = (C, F)
        shapes[p + "mlp.c_fc.bias"] = (F,)
        shapes[p + "mlp.c_proj.weight"] = (F, C)
        shapes[p + "mlp.c_proj.bias"] = (C,)
    shapes["ln_f.weight"] = (C,)
    shapes["ln_f.bias"] = (C,)
    return shapes


def init_params(cfg, rng, scale=0.02) -> dict:
    """GPT-2-like random float64 parameters (for oracle-only tests). LN weights near 1, biases nonzero
    so that every gradient is non-trivial."""
    params = {}
    for name, shape in param_shapes(cfg).items():
        if name.endswith(("ln_1.weight", "ln_2.weight", "norm.weight")) or name == "ln_f.weight":
            params[name] = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name.endswith(".bias"):
            params[name] = 0.1 * rng.standard_normal(shape)
        else:
            params[name] = scale * rng.standard_normal(shape)
    return params


def position_table(params, cfg) -> np.ndarray:
    if cfg.pos_encoding == "learned":
        return _f64(params["wpe"])
    if cfg.pos_encoding == "sinusoidal":
        return sinusoidal_table(cfg.max_seq_len, cfg.embedding_dim)
    raise ValueError(f"unknown pos_encoding {cfg.pos_encoding!r}")


def _apply_mask(x, masks, key):
    if masks is None:
        return x
    return x * _f64(masks[key])


def _head_loss(logits, targets, B, T, label_smoothing=0.0):
    if targets is None:
        return None, None
    targets = np.asarray(targets, dtype=np.int64)
    losses, ce_c = cross_entropy_forward(logits.reshape(B * T, -1), targets.reshape(-1), label_smoothing)
    return float(losses.mean()), ce_c


def model_forward(params, cfg, tokens, targets=None, masks=None, label_smoothing=0.0):
    """Returns (logits [B, T, V], loss or None, cache); the loss label-smoothed by eps = label_smoothing."""
    if _llama(cfg):
        return _llama_forward(params, cfg, tokens, targets, masks, label_smoothing)
    tokens = np.asarray(tokens, dtype=np.int64)
    B, T = tokens.shape
    assert T <= cfg.max_seq_len
    H = cfg.num_heads
    P = {k: _f64(v) for k, v in params.items()}
    pos = position_table(P, cfg)

    x, emb_cache = embedding_forward(tokens, P["wte"], pos)
    x = _apply_mask(x, masks, "emb")
    blocks = []
    for i in range(cfg.num_layers):
        p = f"h.{i}."
        ln1, _, _, ln1_c = layernorm_forward(x, P[p + "ln_1.weight"], P[p + "ln_1.bias"])
        qkv, qkv_c = linear_forward(ln1, P[p + "attn.c_attn.weight"], P[p + "attn.c_attn.bias"])
        att, _, att_c = attention_forward(qkv, H, None if masks is None else masks[p + "attn"])
        ao, ao_c = linear_forward(att, P[p + "attn.c_proj.weight"], P[p + "attn.c_proj.bias"])
        x = x + _apply_mask(ao, masks, p + "attn_resid")
        ln2, _, _, ln2_c = layernorm_forward(x, P[p + "ln_2.weight"], P[p + "ln_2.bias"])
        fo, ff_c = feedforward_forward(ln2, P[p + "mlp.c_fc.weight"], P[p + "mlp.c_fc.bias"],
                                       P[p + "mlp.c_proj.weight"], P[p + "mlp.c_proj.bias"])
        x = x + _apply_mask(fo, masks, p + "mlp_resid")
        blocks.append((ln1_c, qkv_c, att_c, ao_c, ln2_c, ff_c))
    lnf, _, _, lnf_c = layernorm_forward(x, P["ln_f.weight"], P["ln_f.bias"])
    logits = lnf @ P["wte"].T

    loss, ce_c = _head_loss(logits, targets, B, T, label_smoothing)
    cache = dict(cfg=cfg, params=P, masks=masks, B=B, T=T, emb=emb_cache, blocks=blocks,
                 lnf=lnf, lnf_c=lnf_c, ce=ce_c)
    return logits, loss, cache


def model_backward(cache, dloss=1.0) -> dict:
    """Gradients (float64) of ``dloss * mean loss`` w.r.t. every parameter, by name."""
    if cache["ce"] is None:
        raise ValueError("model_forward was called without targets")
    if _llama(cache["cfg"]):
        return _llama_backward(cache, dloss)
    cfg, P, masks = cache["cfg"], cache["params"], cache["masks"]
    B, T = cache["B"], cache["T"]
    C = cfg.embedding_dim
    grads = {}

    dlogits = cross_entropy_backward(cache["ce"], dloss / (B * T)).reshape(B, T, -1)
    lnf = cache["lnf"]
    dwte_head = dlogits.reshape(B * T, -1).T @ lnf.reshape(B * T, C)  # [V, C]
    dlnf = dlogits @ P["wte"]
    dx, grads["ln_f.weight"], grads["ln_f.bias"] = layernorm_backward(dlnf, cache["lnf_c"])

    for i in reversed(range(cfg.num_layers)):
        p = f"h.{i}."
        ln1_c, qkv_c, att_c, ao_c, ln2_c, ff_c = cache["blocks"][i]
        # x = x + drop(mlp(ln_2(x)))
        dfo = _apply_mask(dx, masks, p + "mlp_resid")
        (dln2, grads[p + "mlp.c_fc.weight"], grads[p + "mlp.c_fc.bias"],
         grads[p + "mlp.c_proj.weight"], grads[p + "mlp.c_proj.bias"]) = feedforward_backward(dfo, ff_c)
        d, grads[p + "ln_2.weight"], grads[p + "ln_2.bias"] = layernorm_backward(dln2, ln2_c)
        dx = dx + d
        # x = x + drop(c_proj(attn(c_attn(ln_1(x)))))
        dao = _apply_mask(dx, masks, p + "attn_resid")
        datt, grads[p + "attn.c_proj.weight"], grads[p + "attn.c_proj.bias"] = linear_backward(dao, ao_c)
        dqkv = attention_backward(datt, att_c)
        dln1, grads[p + "attn.c_attn.weight"], grads[p + "attn.c_attn.bias"] = linear_backward(dqkv, qkv_c)
        d, grads[p + "ln_1.weight"], grads[p + "ln_1.bias"] = layernorm_backward(dln1, ln1_c)
        dx = dx + d

    dx = _apply_mask(dx, masks, "emb")
    dwte_emb, dpos = embedding_backward(dx, cache["emb"])
    grads["wte"] = dwte_emb + dwte_head
    if cfg.pos_encoding == "learned":
        grads["wpe"] = dpos
    return {name: grads[name] for name in param_shapes(cfg)}


def model_loss(params, cfg, tokens, targets, masks=None) -> float:
    return model_forward(params, cfg, tokens, targets, masks)[1]


def _proj_forward(x, w):
    """nn.Linear without bias: x @ w.T, w [out, in]."""
    return linear_forward(x, _f64(w).T)


def _proj_backward(dout, cache):
    """Returns (dx, dw [out, in])."""
    dx, dw, _ = linear_backward(dout, cache)
    return dx, dw.T


def _llama_forward(params, cfg, tokens, targets, masks, label_smoothing=0.0):
    tokens = np.asarray(tokens, dtype=np.int64)
    B, T = tokens.shape
    assert T <= cfg.max_seq_len
    H, KV, C = cfg.num_heads, _kv_heads(cfg), cfg.embedding_dim
    hs = C // H
    P = {k: _f64(v) for k, v in params.items()}
    eps, theta = cfg.rms_norm_eps, cfg.rope_theta

    x = P["embed_tokens.weight"][tokens]
    x = _apply_mask(x, masks, "emb")
    blocks = []
    for i in range(cfg.num_layers):
        p, m = f"layers.{i}.", f"h.{i}."  # parameter names, dropout mask names
        n1, _, n1_c = rmsnorm_forward(x, P[p + "input_layernorm.weight"], eps)
        q, q_c = _proj_forward(n1, P[p + "self_attn.q_proj.weight"])
        k, k_c = _proj_forward(n1, P[p + "self_attn.k_proj.weight"])
        v, v_c = _proj_forward(n1, P[p + "self_attn.v_proj.weight"])
        q = rope_forward(q.reshape(B, T, H, hs), theta).reshape(B, T, H * hs)
        k = rope_forward(k.reshape(B, T, KV, hs), theta).reshape(B, T, KV * hs)
        att, _, att_c = attention_forward(np.concatenate([q, k, v], axis=-1), H,
                                          None if masks is None else masks[m + "attn"], KV)
        ao, ao_c = _proj_forward(att, P[p + "self_attn.o_proj.weight"])
        x = x + _apply_mask(ao, masks, m + "attn_resid")
        n2, _, n2_c = rmsnorm_forward(x, P[p + "post_attention_layernorm.weight"], eps)
        g, g_c = _proj_forward(n2, P[p + "mlp.gate_proj.weight"])
        u, u_c = _proj_forward(n2, P[p + "mlp.up_proj.weight"])
        a, sw_c = swiglu_forward(np.concatenate([g, u], axis=-1))
        fo, d_c = _proj_forward(a, P[p + "mlp.down_proj.weight"])
        x = x + _apply_mask(fo, masks, m + "mlp_resid")
        blocks.append((n1_c, q_c, k_c, v_c, att_c, ao_c, n2_c, g_c, u_c, sw_c, d_c))
    nf, _, nf_c = rmsnorm_forward(x, P["norm.weight"], eps)
    head = P["embed_tokens.weight"] if cfg.tie_embeddings else P["lm_head.weight"]
    logits = nf @ head.T
    loss, ce_c = _head_loss(logits, targets, B, T, label_smoothing)
    cache = dict(cfg=cfg, params=P, masks=masks, B=B, T=T, tokens=tokens, blocks=blocks, lnf=nf, lnf_c=nf_c,
                 ce=ce_c, head=head)
    return logits, loss, cache


def _llama_backward(cache, dloss):
    cfg, P, masks = cache["cfg"], cache["params"], cache["masks"]
    B, T = cache["B"], cache["T"]
    H, KV, C = cfg.num_heads, _kv_heads(cfg), cfg.embedding_dim
    hs = C // H
    theta = cfg.rope_theta
    grads = {}

    dlogits = cross_entropy_backward(cache["ce"], dloss / (B * T)).reshape(B, T, -1)
    dhead = dlogits.reshape(B * T, -1).T @ cache["lnf"].reshape(B * T, C)
    dx, grads["norm.weight"] = rmsnorm_backward(dlogits @ cache["head"], cache["lnf_c"])
    for i in reversed(range(cfg.num_layers)):
        p, m = f"layers.{i}.", f"h.{i}."
        n1_c, q_c, k_c, v_c, att_c, ao_c, n2_c, g_c, u_c, sw_c, d_c = cache["blocks"][i]
        dfo = _apply_mask(dx, masks, m + "mlp_resid")
        da, grads[p + "mlp.down_proj.weight"] = _proj_backward(dfo, d_c)
        dgu = swiglu_backward(da, sw_c)
        F = dgu.shape[-1] // 2
        dn2, grads[p + "mlp.gate_proj.weight"] = _proj_backward(dgu[..., :F], g_c)
        dn2u, grads[p + "mlp.up_proj.weight"] = _proj_backward(dgu[..., F:], u_c)
        d, grads[p + "post_attention_layernorm.weight"] = rmsnorm_backward(dn2 + dn2u, n2_c)
        dx = dx + d
        dao = _apply_mask(dx, masks, m + "attn_resid")
        datt, grads[p + "self_attn.o_proj.weight"] = _proj_backward(dao, ao_c)
        dqkv = attention_backward(datt, att_c)
        dq = rope_backward(dqkv[..., :C].reshape(B, T, H, hs), theta).reshape(B, T, C)
        dk = rope_backward(dqkv[..., C:C + KV * hs].reshape(B, T, KV, hs), theta).reshape(B, T, KV * hs)
        dv = dqkv[..., C + KV * hs:]
        dn1, grads[p + "self_attn.q_proj.weight"] = _proj_backward(dq, q_c)
        dn1k, grads[p + "self_attn.k_proj.weight"] = _proj_backward(dk, k_c)
        dn1v, grads[p + "self_attn.v_proj.weight"] = _proj_backward(dv, v_c)
        d, grads[p + "input_layernorm.weight"] = rmsnorm_backward(dn1 + dn1k + dn1v, n1_c)
        dx = dx + d
    dx = _apply_mask(dx, masks, "emb")
    demb = np.zeros_like(P["embed_tokens.weight"])
    np.add.at(demb, cache["tokens"].reshape(-1), dx.reshape(-1, C))
    if cfg.tie_embeddings:
        grads["embed_tokens.weight"] = demb + dhead
    else:
        grads["embed_tokens.weight"], grads["lm_head.weight"] = demb, dhead
    return {name: grads[name] for name in param_shapes(cfg)}
