"""Checks of the NumPy float64 oracle itself (no C++ engine involved): finite differences.

Every hand-written backward (each part and the whole model, every parameter tensor, GPT-2 and Llama, with and
without dropout masks) against central finite differences in float64, relative error <= 1e-6; beside the parts'
gradients, a few of their forwards (grouped-query attention as repeated heads, RoPE and SwiGLU from their formulas,
label smoothing as PyTorch's). The forwards against plain loops and the reference optimizers are checked in
test_oracle_restated.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import oracle
import oracle_model
from oracle_cases import TINY, _random_masks

FD_TOL = 1e-6
FD_H = 1e-5


# ----------------------------------------------------------------------------------------------------
# finite-difference helpers
# ----------------------------------------------------------------------------------------------------
def fd_grad(f, x, idx, h=FD_H):
    """Central differences of scalar f() w.r.t. the flat entries ``idx`` of array x (modified in place)."""
    flat = x.reshape(-1)
    out = np.empty(len(idx))
    for n, i in enumerate(idx):
        old = flat[i]
        flat[i] = old + h
        fp = f()
        flat[i] = old - h
        fm = f()
        flat[i] = old
        out[n] = (fp - fm) / (2 * h)
    return out


def fd_check(errs, what, f, x, analytic, rng, max_entries=None):
    """Compare analytic gradient of f w.r.t. x against FD on all (or a random subset of) entries."""
    n = x.size
    if max_entries is None or n <= max_entries:
        idx = np.arange(n)
    else:
        idx = rng.choice(n, size=max_entries, replace=False)
    fd = fd_grad(f, x, idx)
    an = np.asarray(analytic, dtype=np.float64).reshape(-1)[idx]
    assert np.linalg.norm(an) > 0, f"{what}: analytic gradient is zero on the checked entries"
    errs.normwise(what, an, fd, FD_TOL)


def scalarize(out, dout):
    return float(np.sum(out * dout))


# ----------------------------------------------------------------------------------------------------
# parts: backward vs finite differences
# ----------------------------------------------------------------------------------------------------
def test_fd_embedding(errs, rng):
    B, T, V, P, C = 2, 5, 7, 6, 4
    tokens = rng.integers(0, V, (B, T))
    tokens[0, :2] = 3  # repeated token: gradients must accumulate
    wte = rng.standard_normal((V, C))
    pos = rng.standard_normal((P, C))
    dout = rng.standard_normal((B, T, C))
    out, cache = oracle.embedding_forward(tokens, wte, pos)
    dwte, dpos = oracle.embedding_backward(dout, cache)
    f = lambda: scalarize(oracle.embedding_forward(tokens, wte, pos)[0], dout)
    fd_check(errs, "dwte", f, wte, dwte, rng)
    fd_check(errs, "dpos", f, pos, dpos, rng)
    assert np.all(dpos[T:] == 0)
    errs.finish()


@pytest.mark.parametrize("shape", [(5, 7), (2, 3, 6)], ids=["2d", "3d"])
def test_fd_layernorm(errs, rng, shape):
    C = shape[-1]
    x = rng.standard_normal(shape) * 2 + 0.5
    w = 1 + 0.3 * rng.standard_normal(C)
    b = 0.3 * rng.standard_normal(C)
    dout = rng.standard_normal(shape)
    out, mean, rstd, cache = oracle.layernorm_forward(x, w, b)
    dx, dw, db = oracle.layernorm_backward(dout, cache)
    f = lambda: scalarize(oracle.layernorm_forward(x, w, b)[0], dout)
    fd_check(errs, "dx", f, x, dx, rng)
    fd_check(errs, "dw", f, w, dw, rng)
    fd_check(errs, "db", f, b, db, rng)
    errs.finish()


@pytest.mark.parametrize("shape", [(5, 4, 3), (2, 3, 4, 5)], ids=["2d", "3d"])
def test_fd_linear(errs, rng, shape):
    *lead, K, M = shape
    x = rng.standard_normal((*lead, K))
    w = rng.standard_normal((K, M))
    b = rng.standard_normal(M)
    dout = rng.standard_normal((*lead, M))
    _, cache = oracle.linear_forward(x, w, b)
    dx, dw, db = oracle.linear_backward(dout, cache)
    f = lambda: scalarize(oracle.linear_forward(x, w, b)[0], dout)
    fd_check(errs, "dx", f, x, dx, rng)
    fd_check(errs, "dw", f, w, dw, rng)
    fd_check(errs, "db", f, b, db, rng)
    errs.finish()


def test_fd_gelu(errs, rng):
    x = rng.standard_normal((6, 7)) * 2.5
    dout = rng.standard_normal(x.shape)
    _, cache = oracle.gelu_forward(x)
    dx = oracle.gelu_backward(dout, cache)
    fd_check(errs, "dx", lambda: scalarize(oracle.gelu_forward(x)[0], dout), x, dx, rng)
    errs.finish()


@pytest.mark.parametrize("H,dropout", [(1, False), (2, False), (3, True)], ids=["H1", "H2", "H3-dropout"])
def test_fd_attention(errs, rng, H, dropout):
    B, T, C = 2, 5, 6
    qkv = rng.standard_normal((B, T, 3 * C))
    mask = None
    if dropout:
        keep = rng.random((B, H, T, T)) >= 0.3
        mask = keep / 0.7
    dout = rng.standard_normal((B, T, C))
    _, _, cache = oracle.attention_forward(qkv, H, mask)
    dqkv = oracle.attention_backward(dout, cache)
    f = lambda: scalarize(oracle.attention_forward(qkv, H, mask)[0], dout)
    fd_check(errs, "dqkv", f, qkv, dqkv, rng)
    errs.finish()


@pytest.mark.parametrize("H,KV,dropout", [(4, 2, False), (3, 1, False), (4, 2, True)],
                         ids=["H4-KV2", "H3-KV1", "H4-KV2-dropout"])
def test_fd_grouped_query_attention(errs, rng, H, KV, dropout):
    B, T, hs = 2, 5, 3
    qkv = rng.standard_normal((B, T, (H + 2 * KV) * hs))
    mask = (rng.random((B, H, T, T)) >= 0.3) / 0.7 if dropout else None
    dout = rng.standard_normal((B, T, H * hs))
    _, _, cache = oracle.attention_forward(qkv, H, mask, KV)
    dqkv = oracle.attention_backward(dout, cache)
    f = lambda: scalarize(oracle.attention_forward(qkv, H, mask, KV)[0], dout)
    fd_check(errs, "dqkv", f, qkv, dqkv, rng)
    errs.finish()


def test_grouped_query_attention_is_repeated_heads(errs, rng):
    """KV < H equals multi-head attention with each K/V head copied to the query heads of its group."""
    B, T, H, KV, hs = 2, 6, 6, 2, 4
    qkv = rng.standard_normal((B, T, (H + 2 * KV) * hs))
    q, k, v = np.split(qkv, [H * hs, (H + KV) * hs], axis=-1)
    rep = lambda a: np.repeat(a.reshape(B, T, KV, hs), H // KV, axis=2).reshape(B, T, H * hs)
    got = oracle.attention_forward(qkv, H, None, KV)[0]
    ref = oracle.attention_forward(np.concatenate([q, rep(k), rep(v)], axis=-1), H)[0]
    errs.maxabs("out", got, ref, 1e-12)
    errs.finish()


@pytest.mark.parametrize("shape", [(5, 7), (2, 3, 6)], ids=["2d", "3d"])
def test_fd_rmsnorm(errs, rng, shape):
    x = rng.standard_normal(shape) * 2 + 0.5
    w = 1 + 0.3 * rng.standard_normal(shape[-1])
    dout = rng.standard_normal(shape)
    _, _, cache = oracle.rmsnorm_forward(x, w, 1e-5)
    dx, dw = oracle.rmsnorm_backward(dout, cache)
    f = lambda: scalarize(oracle.rmsnorm_forward(x, w, 1e-5)[0], dout)
    fd_check(errs, "dx", f, x, dx, rng)
    fd_check(errs, "dw", f, w, dw, rng)
    errs.finish()


def test_rope_formula_and_gradient(errs, rng):
    """rope_forward against the rotate_half formula written per element, and its backward against FD."""
    B, T, heads, hs, theta = 2, 5, 3, 6, 100.0
    x = rng.standard_normal((B, T, heads, hs))
    out = oracle.rope_forward(x, theta)
    ref = np.empty_like(x)
    for t in range(T):
        for i in range(hs):
            j = i % (hs // 2)
            a = t * theta ** (-2.0 * j / hs)
            rot = -x[:, t, :, i + hs // 2] if i < hs // 2 else x[:, t, :, i - hs // 2]  # rotate_half(x)[i]
            ref[:, t, :, i] = x[:, t, :, i] * math.cos(a) + rot * math.sin(a)
    errs.maxabs("rope vs formula", out, ref, 1e-12)
    errs.maxabs("backward(forward(x)) = x", oracle.rope_backward(out, theta), x, 1e-12)
    dout = rng.standard_normal(x.shape)
    fd_check(errs, "dx", lambda: scalarize(oracle.rope_forward(x, theta), dout), x,
             oracle.rope_backward(dout, theta), rng)
    errs.finish()


def test_fd_swiglu(errs, rng):
    gu = rng.standard_normal((4, 10)) * 3
    dout = rng.standard_normal((4, 5))
    out, cache = oracle.swiglu_forward(gu)
    g, u = gu[:, :5], gu[:, 5:]
    errs.maxabs("silu(g) * u", out, g / (1 + np.exp(-g)) * u, 1e-12)
    fd_check(errs, "dgu", lambda: scalarize(oracle.swiglu_forward(gu)[0], dout), gu,
             oracle.swiglu_backward(dout, cache), rng)
    errs.finish()


def test_fd_feedforward(errs, rng):
    N, C, F = 4, 5, 7
    x = rng.standard_normal((N, C))
    w_fc, b_fc = rng.standard_normal((C, F)) * 0.7, rng.standard_normal(F) * 0.5
    w_proj, b_proj = rng.standard_normal((F, C)) * 0.7, rng.standard_normal(C) * 0.5
    dout = rng.standard_normal((N, C))
    _, cache = oracle.feedforward_forward(x, w_fc, b_fc, w_proj, b_proj)
    grads = oracle.feedforward_backward(dout, cache)
    f = lambda: scalarize(oracle.feedforward_forward(x, w_fc, b_fc, w_proj, b_proj)[0], dout)
    for name, arr, g in zip(["dx", "dw_fc", "db_fc", "dw_proj", "db_proj"], [x, w_fc, b_fc, w_proj, b_proj], grads):
        fd_check(errs, name, f, arr, g, rng)
    errs.finish()


@pytest.mark.parametrize("eps", [0.0, 0.1, 1.0], ids=["plain", "smoothed0.1", "smoothed1"])
@pytest.mark.parametrize("scale", [None, 0.37, "rows"], ids=["mean", "scalar", "per-row"])
def test_fd_cross_entropy(errs, rng, scale, eps):
    N, V = 6, 9
    logits = rng.standard_normal((N, V)) * 3
    targets = rng.integers(0, V, N)
    if scale == "rows":
        scale = rng.standard_normal(N)
    _, cache = oracle.cross_entropy_forward(logits, targets, eps)
    dlogits = oracle.cross_entropy_backward(cache, scale)
    w = np.full(N, 1.0 / N) if scale is None else np.broadcast_to(np.asarray(scale, float), (N,))
    f = lambda: float(np.sum(w * oracle.cross_entropy_forward(logits, targets, eps)[0]))
    fd_check(errs, "dlogits", f, logits, dlogits, rng)
    errs.finish()


@pytest.mark.slow
@pytest.mark.torch
def test_label_smoothing_is_pytorchs(errs, rng):
    """The smoothed loss restated per row: -sum_j q_j log p_j with q = (1 - eps) onehot + eps / V, and as
    torch.nn.functional.cross_entropy(label_smoothing=eps) computes it."""
    import torch
    N, V, eps = 5, 7, 0.2
    logits = rng.standard_normal((N, V)) * 2
    targets = rng.integers(0, V, N)
    losses = oracle.cross_entropy_forward(logits, targets, eps)[0]
    for n in range(N):
        logp = logits[n] - np.log(np.exp(logits[n]).sum())
        q = np.full(V, eps / V)
        q[targets[n]] += 1 - eps
        errs.record(f"row {n}", abs(losses[n] + (q * logp).sum()), 1e-12)
    ref = torch.nn.functional.cross_entropy(torch.tensor(logits), torch.tensor(targets), label_smoothing=eps,
                                            reduction="none").numpy()
    errs.maxabs("torch", losses, ref, 1e-12)
    errs.finish()


# ----------------------------------------------------------------------------------------------------
# whole model: every parameter tensor vs finite differences
# ----------------------------------------------------------------------------------------------------
def _fd_every_parameter(errs, rng, cfg, dropout) -> dict:
    """Finite differences of the oracle's loss against model_backward, for every parameter of cfg's model (with
    random dropout masks if dropout); returns the parameters."""
    B, T = 2, 5
    params = oracle_model.init_params(cfg, rng, scale=0.3)
    tokens = rng.integers(0, cfg.vocab_size, (B, T))
    targets = rng.integers(0, cfg.vocab_size, (B, T))
    masks = _random_masks(cfg, B, T, 0.2, rng) if dropout else None
    _, loss, cache = oracle_model.model_forward(params, cfg, tokens, targets, masks)
    grads = oracle_model.model_backward(cache)
    assert set(grads) == set(params)
    f = lambda: oracle_model.model_loss(params, cfg, tokens, targets, masks)
    assert abs(f() - loss) == 0.0
    for name, p in params.items():
        assert grads[name].shape == p.shape
        fd_check(errs, name, f, p, grads[name], rng, max_entries=80)
    errs.finish()
    return params


@pytest.mark.parametrize(
    "pos_encoding,max_seq_len,dropout",
    [("learned", 7, False), ("sinusoidal", 5, False), ("learned", 5, True), ("sinusoidal", 6, True)],
    ids=["learned", "sinusoidal", "learned-dropout", "sinusoidal-dropout"],
)
@pytest.mark.slow
def test_fd_model_all_parameters(errs, rng, pos_encoding, max_seq_len, dropout):
    cfg = oracle_model.Config(max_seq_len=max_seq_len, pos_encoding=pos_encoding, **TINY)
    params = _fd_every_parameter(errs, rng, cfg, dropout)
    assert ("wpe" in params) == (pos_encoding == "learned")


@pytest.mark.parametrize("tie,dropout", [(True, False), (False, False), (False, True)],
                         ids=["tied", "untied", "untied-dropout"])
@pytest.mark.slow
def test_fd_llama_all_parameters(errs, rng, tie, dropout):
    cfg = oracle_model.Config(architecture="llama", max_seq_len=6, num_kv_heads=2, rope_theta=50.0, rms_norm_eps=1e-5,
                        tie_embeddings=tie, **dict(TINY, embedding_dim=16, num_heads=4))
    params = _fd_every_parameter(errs, rng, cfg, dropout)
    assert ("lm_head.weight" in params) == (not tie)


def test_model_backward_dloss_scales(errs, rng):
    cfg = oracle_model.Config(**TINY)
    params = oracle_model.init_params(cfg, rng, scale=0.3)
    tokens = rng.integers(0, cfg.vocab_size, (2, 4))
    targets = rng.integers(0, cfg.vocab_size, (2, 4))
    _, _, cache = oracle_model.model_forward(params, cfg, tokens, targets)
    g1 = oracle_model.model_backward(cache)
    g2 = oracle_model.model_backward(cache, dloss=0.5)
    for name in g1:
        errs.normwise(name, g2[name], 0.5 * g1[name], 1e-14)
    errs.finish()
