"""NumPy float64 reference model for CLLM (the test oracle).

An independent, deliberately plain implementation of the model specified in docs/design.md (section 1,
"The model"): every part is a pair ``X_forward`` / ``X_backward`` with hand-written gradients (no autodiff),
all arithmetic in float64. Inputs may be float32; they are upcast. The tests that use it, from this file's own
finite-difference check up to whole-model training, are listed in docs/design.md, section 7.

Conventions
-----------
* ``X_forward(...)`` returns ``(out, cache)``; ``layernorm_forward`` returns ``(out, mean, rstd, cache)``
  and ``attention_forward`` returns ``(out, lse, cache)``.
* ``X_backward(dout, cache)`` returns the input gradients (a tuple when there are several).
* Linear weights are stored ``[in, out]``: ``y = x @ W + b``.
* Dropout masks are given pre-scaled (values 0 or 1/(1-p)) and are multiplied in elementwise.

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

import math
from dataclasses import dataclass

import numpy as np

LN_EPS = 1e-5
_GELU_K = math.sqrt(2.0 / math.pi)


def _f64(a):
    return np.asarray(a, dtype=np.float64)


# ----------------------------------------------------------------------------------------------------
# positional table
# ----------------------------------------------------------------------------------------------------
def sinusoidal_table(P: int, C: int) -> np.ndarray:
    """PE[p, 2i] = sin(p / 10000^(2i/C)), PE[p, 2i+1] = cos(p / 10000^(2i/C)); odd C: last column is sin."""
    pe = np.zeros((P, C), dtype=np.float64)
    pos = np.arange(P, dtype=np.float64)[:, None]
    even = np.arange(0, C, 2, dtype=np.float64)  # the 2i of each column pair
    angle = pos / np.power(10000.0, even / C)[None, :]
    pe[:, 0::2] = np.sin(angle)
    n_odd = C // 2
    pe[:, 1::2] = np.cos(angle[:, :n_odd])
    return pe


# ----------------------------------------------------------------------------------------------------
# embedding
# ----------------------------------------------------------------------------------------------------
def embedding_forward(tokens, wte, pos):
    """out[b, t] = wte[tokens[b, t]] + pos[t]; ``pos`` is the [P, C] table, P >= T."""
    tokens = np.asarray(tokens, dtype=np.int64)
    wte = _f64(wte)
    pos = _f64(pos)
    B, T = tokens.shape
    assert T <= pos.shape[0]
    out = wte[tokens] + pos[None, :T, :]
    cache = (tokens, wte.shape[0], pos.shape[0])
    return out, cache


def embedding_backward(dout, cache):
    """Returns (dwte [V, C], dpos [P, C])."""
    tokens, V, P = cache
    dout = _f64(dout)
    B, T, C = dout.shape
    dwte = np.zeros((V, C))
    np.add.at(dwte, tokens.reshape(-1), dout.reshape(-1, C))
    dpos = np.zeros((P, C))
    dpos[:T] = dout.sum(axis=0)
    return dwte, dpos


# ----------------------------------------------------------------------------------------------------
# layernorm (over the last axis)
# ----------------------------------------------------------------------------------------------------
def layernorm_forward(x, w, b, eps=LN_EPS):
    """Returns (out, mean, rstd, cache); mean/rstd have the shape of x without its last axis."""
    x = _f64(x)
    w = _f64(w)
    b = _f64(b)
    mean = x.mean(axis=-1)
    xc = x - mean[..., None]
    var = (xc * xc).mean(axis=-1)  # biased variance
    rstd = 1.0 / np.sqrt(var + eps)
    xhat = xc * rstd[..., None]
    out = xhat * w + b
    cache = (xhat, rstd, w)
    return out, mean, rstd, cache


def layernorm_backward(dout, cache):
    """Returns (dx, dw, db)."""
    xhat, rstd, w = cache
    dout = _f64(dout)
    C = xhat.shape[-1]
    red = tuple(range(dout.ndim - 1))
    dw = (dout * xhat).sum(axis=red)
    db = dout.sum(axis=red)
    dxhat = dout * w
    # dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
    m1 = dxhat.sum(axis=-1, keepdims=True) / C
    m2 = (dxhat * xhat).sum(axis=-1, keepdims=True) / C
    dx = rstd[..., None] * (dxhat - m1 - xhat * m2)
    return dx, dw, db


# ----------------------------------------------------------------------------------------------------
# RMSNorm (over the last axis)
# ----------------------------------------------------------------------------------------------------
def rmsnorm_forward(x, w, eps):
    """Returns (out, rstd, cache): out = x * rstd * w, rstd = 1/sqrt(mean(x^2) + eps)."""
    x = _f64(x)
    w = _f64(w)
    rstd = 1.0 / np.sqrt((x * x).mean(axis=-1) + eps)
    xhat = x * rstd[..., None]
    return xhat * w, rstd, (xhat, rstd, w)


def rmsnorm_backward(dout, cache):
    """Returns (dx, dw)."""
    xhat, rstd, w = cache
    dout = _f64(dout)
    C = xhat.shape[-1]
    dw = (dout * xhat).sum(axis=tuple(range(dout.ndim - 1)))
    dxhat = dout * w
    # dx = rstd * (dxhat - xhat * mean(dxhat * xhat))
    dx = rstd[..., None] * (dxhat - xhat * (dxhat * xhat).sum(axis=-1, keepdims=True) / C)
    return dx, dw


# ----------------------------------------------------------------------------------------------------
# rotary position embedding, Hugging Face's rotate_half convention, on x [B, T, heads, hs]
# ----------------------------------------------------------------------------------------------------
def rope_tables(P, hs, theta):
    """(cos, sin) [P, hs/2] of the angles p * theta^(-2i/hs)."""
    angle = np.arange(P, dtype=np.float64)[:, None] * np.power(float(theta), -2.0 * np.arange(hs // 2) / hs)[None, :]
    return np.cos(angle), np.sin(angle)


def rope_forward(x, theta, sign=1.0):
    """Head halves x1, x2 at position t become x1 cos - x2 sin and x2 cos + x1 sin (sign -1: the inverse)."""
    x = _f64(x)
    B, T, heads, hs = x.shape
    cos, sin = rope_tables(T, hs, theta)
    cos, sin = cos[None, :, None, :], sign * sin[None, :, None, :]
    x1, x2 = x[..., :hs // 2], x[..., hs // 2:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def rope_backward(dout, theta):
    """The rotation is orthogonal: its gradient is the inverse rotation."""
    return rope_forward(dout, theta, sign=-1.0)


# ----------------------------------------------------------------------------------------------------
# linear: y = x @ W + b, W [K, M]
# ----------------------------------------------------------------------------------------------------
def linear_forward(x, w, b=None):
    x = _f64(x)
    w = _f64(w)
    out = x @ w
    if b is not None:
        out = out + _f64(b)
    return out, (x, w)


def linear_backward(dout, cache):
    """Returns (dx, dw, db)."""
    x, w = cache
    dout = _f64(dout)
    K, M = w.shape
    x2 = x.reshape(-1, K)
    d2 = dout.reshape(-1, M)
    dx = (d2 @ w.T).reshape(x.shape)
    dw = x2.T @ d2
    db = d2.sum(axis=0)
    return dx, dw, db


# ----------------------------------------------------------------------------------------------------
# GELU, tanh approximation
# ----------------------------------------------------------------------------------------------------
def gelu_forward(x):
    x = _f64(x)
    u = _GELU_K * (x + 0.044715 * x ** 3)
    th = np.tanh(u)
    out = 0.5 * x * (1.0 + th)
    return out, (x, th)


def gelu_backward(dout, cache):
    x, th = cache
    du_dx = _GELU_K * (1.0 + 3.0 * 0.044715 * x * x)
    grad = 0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * du_dx
    return _f64(dout) * grad


# ----------------------------------------------------------------------------------------------------
# SwiGLU: silu(gate) * up over gu [..., 2F] = gate | up
# ----------------------------------------------------------------------------------------------------
def swiglu_forward(gu):
    gu = _f64(gu)
    F = gu.shape[-1] // 2
    g, u = gu[..., :F], gu[..., F:]
    s = 1.0 / (1.0 + np.exp(-g))
    return g * s * u, (g, u, s)


def swiglu_backward(dout, cache):
    """Returns dgu [..., 2F]: silu'(g) = s (1 + g (1 - s))."""
    g, u, s = cache
    dout = _f64(dout)
    return np.concatenate([dout * u * s * (1.0 + g * (1.0 - s)), dout * g * s], axis=-1)


# ----------------------------------------------------------------------------------------------------
# causal grouped-query self-attention on a packed qkv [B, T, (H + 2KV) hs] (KV = H: GPT-2's [B, T, 3C])
# ----------------------------------------------------------------------------------------------------
def _split_heads(a, H):
    B, T, C = a.shape
    return a.reshape(B, T, H, C // H).transpose(0, 2, 1, 3)  # [B, H, T, hs]


def _merge_heads(a):
    B, H, T, hs = a.shape
    return a.transpose(0, 2, 1, 3).reshape(B, T, H * hs)


def attention_forward(qkv, num_heads, mask=None, num_kv_heads=None):
    """Returns (out [B, T, C], lse [B, H, T], cache).

    ``lse`` is the log-sum-exp of the scaled, causally masked scores of each query row. ``mask`` is an
    optional pre-scaled dropout mask [B, H, T, T] applied to the probabilities after the softmax. Query head h
    uses K/V head h // (H / KV) (``num_kv_heads`` None: KV = H).
    """
    qkv = _f64(qkv)
    H = num_heads
    KV = H if num_kv_heads is None else num_kv_heads
    assert H % KV == 0
    B, T, W = qkv.shape
    hs = W // (H + 2 * KV)
    assert W == (H + 2 * KV) * hs
    C = H * hs
    q = _split_heads(qkv[..., 0:C], H)
    # each K/V head repeated for the query heads of its group
    k = np.repeat(_split_heads(qkv[..., C:C + KV * hs], KV), H // KV, axis=1)
    v = np.repeat(_split_heads(qkv[..., C + KV * hs:], KV), H // KV, axis=1)
    scale = 1.0 / math.sqrt(hs)
    s = (q @ k.transpose(0, 1, 3, 2)) * scale  # [B, H, T, T]
    causal = np.tril(np.ones((T, T), dtype=bool))
    s = np.where(causal, s, -np.inf)
    smax = s.max(axis=-1, keepdims=True)
    e = np.exp(s - smax)
    z = e.sum(axis=-1, keepdims=True)
    p = e / z
    lse = (smax + np.log(z))[..., 0]
    pd = p if mask is None else p * _f64(mask)
    y = pd @ v  # [B, H, T, hs]
    out = _merge_heads(y)
    cache = (q, k, v, p, None if mask is None else _f64(mask), scale, H, KV)
    return out, lse, cache


def attention_backward(dout, cache):
    """Returns dqkv [B, T, (H + 2KV) hs]."""
    q, k, v, p, mask, scale, H, KV = cache
    dy = _split_heads(_f64(dout), H)  # [B, H, T, hs]
    pd = p if mask is None else p * mask
    dv = pd.transpose(0, 1, 3, 2) @ dy
    dpd = dy @ v.transpose(0, 1, 3, 2)
    dp = dpd if mask is None else dpd * mask
    ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True))  # masked entries have p == 0
    ds = ds * scale
    dq = ds @ k
    dk = ds.transpose(0, 1, 3, 2) @ q

    def group_sum(d):  # a K/V head's gradient sums over the query heads of its group
        B, _, T, hs = d.shape
        return d.reshape(B, KV, H // KV, T, hs).sum(axis=2)

    return np.concatenate([_merge_heads(dq), _merge_heads(group_sum(dk)), _merge_heads(group_sum(dv))], axis=-1)


# ----------------------------------------------------------------------------------------------------
# feed-forward: c_fc -> GELU -> c_proj
# ----------------------------------------------------------------------------------------------------
def feedforward_forward(x, w_fc, b_fc, w_proj, b_proj):
    h, c1 = linear_forward(x, w_fc, b_fc)
    a, c2 = gelu_forward(h)
    out, c3 = linear_forward(a, w_proj, b_proj)
    return out, (c1, c2, c3)


def feedforward_backward(dout, cache):
    """Returns (dx, dw_fc, db_fc, dw_proj, db_proj)."""
    c1, c2, c3 = cache
    da, dw_proj, db_proj = linear_backward(dout, c3)
    dh = gelu_backward(da, c2)
    dx, dw_fc, db_fc = linear_backward(dh, c1)
    return dx, dw_fc, db_fc, dw_proj, db_proj


# ----------------------------------------------------------------------------------------------------
# cross-entropy over rows of logits [N, V]
# ----------------------------------------------------------------------------------------------------
def cross_entropy_forward(logits, targets, label_smoothing=0.0):
    """Returns (losses [N], cache): the cross-entropy against the target distribution q = (1 - eps) onehot + eps/V
    (PyTorch's label_smoothing eps), losses[n] = -sum_j q_j log p_j = (1 - eps) nll + eps mean_j(-log p_j)."""
    logits = _f64(logits)
    targets = np.asarray(targets, dtype=np.int64)
    N, V = logits.shape
    m = logits.max(axis=-1, keepdims=True)
    e = np.exp(logits - m)
    z = e.sum(axis=-1, keepdims=True)
    logp = logits - (m + np.log(z))
    eps = float(label_smoothing)
    losses = -(1.0 - eps) * logp[np.arange(N), targets] - eps * logp.mean(axis=-1)
    probs = e / z
    return losses, (probs, targets, eps)


def cross_entropy_backward(cache, scale=None):
    """Gradient of ``scale * sum(losses)``; scale=None means 1/N, i.e. the gradient of the mean loss.

    ``scale`` may also be an array [N] (a per-row upstream gradient).
    """
    probs, targets, eps = cache
    N, V = probs.shape
    if scale is None:
        scale = 1.0 / N
    d = probs - eps / V  # p - q
    d[np.arange(N), targets] -= 1.0 - eps
    scale = np.asarray(scale, dtype=np.float64)
    if scale.ndim == 1:
        scale = scale[:, None]
    return d * scale


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


# ----------------------------------------------------------------------------------------------------
# reference optimizers (PyTorch semantics) on dicts of float64 arrays, updated in place
# ----------------------------------------------------------------------------------------------------
def decays(p) -> bool:
    """Weight decay applies to 2-D tensors (matrices and embeddings) only."""
    return np.ndim(p) >= 2


def adamw_step(params, grads, m, v, step, lr, betas, eps, weight_decay):
    """One torch.optim.AdamW step (step is 1-based). ``m``/``v`` are dicts, missing entries start at 0."""
    b1, b2 = betas
    bc1 = 1.0 - b1 ** step
    bc2 = 1.0 - b2 ** step
    for name, p in params.items():
        g = _f64(grads[name])
        if name not in m:
            m[name] = np.zeros_like(p, dtype=np.float64)
            v[name] = np.zeros_like(p, dtype=np.float64)
        if weight_decay != 0.0 and decays(p):
            p *= 1.0 - lr * weight_decay
        m[name] = b1 * m[name] + (1.0 - b1) * g
        v[name] = b2 * v[name] + (1.0 - b2) * g * g
        mhat = m[name] / bc1
        vhat = v[name] / bc2
        p -= lr * mhat / (np.sqrt(vhat) + eps)
    return params, m, v


def sgd_step(params, grads, buf, lr, momentum, weight_decay, nesterov=False):
    """One torch.optim.SGD step (dampening 0). ``buf`` is a dict; a missing entry means first step."""
    for name, p in params.items():
        g = _f64(grads[name]).copy()
        if weight_decay != 0.0 and decays(p):
            g += weight_decay * p
        if momentum != 0.0:
            if name not in buf:
                buf[name] = g.copy()
            else:
                buf[name] = momentum * buf[name] + g
            g = g + momentum * buf[name] if nesterov else buf[name]
        p -= lr * g
    return params, buf


def clip_grad_norm(grads, max_norm) -> float:
    """torch.nn.utils.clip_grad_norm_: global L2 norm; scale all grads in place when it exceeds max_norm."""
    total = math.sqrt(sum(float(np.sum(_f64(g) ** 2)) for g in grads.values()))
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        for g in grads.values():
            g *= coef
    return total
