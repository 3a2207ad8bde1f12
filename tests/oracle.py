"""NumPy float64 reference model for CLLM (the test oracle): its parts.

An independent, deliberately plain implementation of the model specified in docs/design.md (section 1,
"The model"): every part is a pair ``X_forward`` / ``X_backward`` with hand-written gradients (no autodiff),
all arithmetic in float64. Inputs may be float32; they are upcast. The whole model built from these parts
(GPT-2 and Llama, ``model_forward`` / ``model_backward``) is in oracle_model.py, the reference optimizers in
oracle_optim.py. The tests that use them, from the oracle's own finite-difference checks up to whole-model
training, are listed in docs/design.md, section 7.

Conventions
-----------
* ``X_forward(...)`` returns ``(out, cache)``; ``layernorm_forward`` returns ``(out, mean, rstd, cache)``
  and ``attention_forward`` returns ``(out, lse, cache)``.
* ``X_backward(dout, cache)`` returns the input gradients (a tuple when there are several).
* Linear weights are stored ``[in, out]``: ``y = x @ W + b``.
* Dropout masks are given pre-scaled (values 0 or 1/(1-p)) and are multiplied in elementwise.
"""

from __future__ import annotations

import math

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
# bfloat16 rounding
# ----------------------------------------------------------------------------------------------------
def bf16_round(a):
    """Round float32 to the nearest bfloat16 (ties to even), returned as float32."""
    u = np.ascontiguousarray(a, np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16 << 16
    return u.astype(np.uint32).view(np.float32)
