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
# causal multi-head self-attention on a packed qkv [B, T, 3C]
# ----------------------------------------------------------------------------------------------------
def _split_heads(a, H):
    B, T, C = a.shape
    return a.reshape(B, T, H, C // H).transpose(0, 2, 1, 3)  # [B, H, T, hs]


def _merge_heads(a):
    B, H, T, hs = a.shape
    return a.transpose(0, 2, 1, 3).reshape(B, T, H * hs)


def attention_forward(qkv, num_heads, mask=None):
    """Returns (out [B, T, C], lse [B, H, T], cache).

    ``lse`` is the log-sum-exp of the scaled, causally masked scores of each query row. ``mask`` is an
    optional pre-scaled dropout mask [B, H, T, T] applied to the probabilities after the softmax.
    """
    qkv = _f64(qkv)
    B, T, C3 = qkv.shape
    C = C3 // 3
    H = num_heads
    assert C % H == 0
    hs = C // H
    q = _split_heads(qkv[..., 0:C], H)
    k = _split_heads(qkv[..., C:2 * C], H)
    v = _split_heads(qkv[..., 2 * C:3 * C], H)
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
    cache = (q, k, v, p, None if mask is None else _f64(mask), scale, H)
    return out, lse, cache


def attention_backward(dout, cache):
    """Returns dqkv [B, T, 3C]."""
    q, k, v, p, mask, scale, H = cache
    dy = _split_heads(_f64(dout), H)  # [B, H, T, hs]
    pd = p if mask is None else p * mask
    dv = pd.transpose(0, 1, 3, 2) @ dy
    dpd = dy @ v.transpose(0, 1, 3, 2)
    dp = dpd if mask is None else dpd * mask
    ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True))  # masked entries have p == 0
    ds = ds * scale
    dq = ds @ k
    dk = ds.transpose(0, 1, 3, 2) @ q
    return np.concatenate([_merge_heads(dq), _merge_heads(dk), _merge_heads(dv)], axis=-1)


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


def param_shapes(cfg) -> dict:
    """Name -> shape, in the order of the Hugging Face GPT-2 state dict."""
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
        if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name == "ln_f.weight":
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


def model_forward(params, cfg, tokens, targets=None, masks=None, label_smoothing=0.0):
    """Returns (logits [B, T, V], loss or None, cache); the loss label-smoothed by eps = label_smoothing."""
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

    loss = None
    ce_c = None
    if targets is not None:
        targets = np.asarray(targets, dtype=np.int64)
        losses, ce_c = cross_entropy_forward(logits.reshape(B * T, -1), targets.reshape(-1), label_smoothing)
        loss = float(losses.mean())
    cache = dict(cfg=cfg, params=P, masks=masks, B=B, T=T, emb=emb_cache, blocks=blocks,
                 lnf=lnf, lnf_c=lnf_c, ce=ce_c)
    return logits, loss, cache


def model_backward(cache, dloss=1.0) -> dict:
    """Gradients (float64) of ``dloss * mean loss`` w.r.t. every parameter, by name."""
    if cache["ce"] is None:
        raise ValueError("model_forward was called without targets")
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
