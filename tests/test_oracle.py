"""Checks of the NumPy float64 oracle itself (no C++ engine involved).

* every hand-written backward (each part and the whole model, every parameter tensor) against central
  finite differences in float64, relative error <= 1e-6;
* the forwards against plain per-element loop implementations written from the formulas;
* the reference optimizers against scalar re-statements of the PyTorch update rules.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import oracle

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


def test_label_smoothing_is_pytorchs(errs, rng):
    """The smoothed loss restated per row: -sum_j q_j log p_j with q = (1 - eps) onehot + eps / V, and as
    torch.nn.functional.cross_entropy(label_smoothing=eps) computes it."""
    torch = pytest.importorskip("torch")
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
TINY = dict(vocab_size=11, embedding_dim=8, num_heads=2, ff_dim=12, num_layers=2)


def _random_masks(cfg, B, T, p, rng):
    def m(shape):
        return (rng.random(shape) >= p) / (1.0 - p)
    C, H = cfg.embedding_dim, cfg.num_heads
    masks = {"emb": m((B, T, C))}
    for i in range(cfg.num_layers):
        masks[f"h.{i}.attn"] = m((B, H, T, T))
        masks[f"h.{i}.attn_resid"] = m((B, T, C))
        masks[f"h.{i}.mlp_resid"] = m((B, T, C))
    return masks


def _fd_every_parameter(errs, rng, cfg, dropout) -> dict:
    """Finite differences of the oracle's loss against model_backward, for every parameter of cfg's model (with
    random dropout masks if dropout); returns the parameters."""
    B, T = 2, 5
    params = oracle.init_params(cfg, rng, scale=0.3)
    tokens = rng.integers(0, cfg.vocab_size, (B, T))
    targets = rng.integers(0, cfg.vocab_size, (B, T))
    masks = _random_masks(cfg, B, T, 0.2, rng) if dropout else None
    _, loss, cache = oracle.model_forward(params, cfg, tokens, targets, masks)
    grads = oracle.model_backward(cache)
    assert set(grads) == set(params)
    f = lambda: oracle.model_loss(params, cfg, tokens, targets, masks)
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
def test_fd_model_all_parameters(errs, rng, pos_encoding, max_seq_len, dropout):
    cfg = oracle.Config(max_seq_len=max_seq_len, pos_encoding=pos_encoding, **TINY)
    params = _fd_every_parameter(errs, rng, cfg, dropout)
    assert ("wpe" in params) == (pos_encoding == "learned")


@pytest.mark.parametrize("tie,dropout", [(True, False), (False, False), (False, True)],
                         ids=["tied", "untied", "untied-dropout"])
def test_fd_llama_all_parameters(errs, rng, tie, dropout):
    cfg = oracle.Config(architecture="llama", max_seq_len=6, num_kv_heads=2, rope_theta=50.0, rms_norm_eps=1e-5,
                        tie_embeddings=tie, **dict(TINY, embedding_dim=16, num_heads=4))
    params = _fd_every_parameter(errs, rng, cfg, dropout)
    assert ("lm_head.weight" in params) == (not tie)


def test_model_backward_dloss_scales(errs, rng):
    cfg = oracle.Config(**TINY)
    params = oracle.init_params(cfg, rng, scale=0.3)
    tokens = rng.integers(0, cfg.vocab_size, (2, 4))
    targets = rng.integers(0, cfg.vocab_size, (2, 4))
    _, _, cache = oracle.model_forward(params, cfg, tokens, targets)
    g1 = oracle.model_backward(cache)
    g2 = oracle.model_backward(cache, dloss=0.5)
    for name in g1:
        errs.normwise(name, g2[name], 0.5 * g1[name], 1e-14)
    errs.finish()


# ----------------------------------------------------------------------------------------------------
# forwards against plain loops written from the formulas
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("P,C", [(9, 8), (7, 5), (3, 1)], ids=["even-C", "odd-C", "C1"])
def test_sinusoidal_table_formula(errs, P, C):
    ref = np.zeros((P, C))
    for p in range(P):
        for c in range(C):
            two_i = c - (c % 2)
            angle = p / 10000.0 ** (two_i / C)
            ref[p, c] = math.sin(angle) if c % 2 == 0 else math.cos(angle)
    errs.maxabs("table", oracle.sinusoidal_table(P, C), ref, 1e-14)
    errs.finish()


def _loop_layernorm(v, w, b):
    mu = sum(v) / len(v)
    var = sum((a - mu) ** 2 for a in v) / len(v)
    return [(a - mu) / math.sqrt(var + 1e-5) * w[i] + b[i] for i, a in enumerate(v)]


def _loop_gelu(a):
    return 0.5 * a * (1 + math.tanh(math.sqrt(2 / math.pi) * (a + 0.044715 * a ** 3)))


def _loop_attention(qkv, H):
    """qkv [T, 3C] (one sequence) -> out [T, C], lse [H, T]."""
    T, C3 = qkv.shape
    C = C3 // 3
    hs = C // H
    out = np.zeros((T, C))
    lse = np.zeros((H, T))
    for h in range(H):
        cols = slice(h * hs, (h + 1) * hs)
        for t in range(T):
            q = qkv[t, 0:C][cols]
            scores = [float(q @ qkv[s, C:2 * C][cols]) / math.sqrt(hs) for s in range(t + 1)]
            mx = max(scores)
            z = sum(math.exp(a - mx) for a in scores)
            lse[h, t] = mx + math.log(z)
            for s in range(t + 1):
                out[t, cols] += math.exp(scores[s] - lse[h, t]) * qkv[s, 2 * C:3 * C][cols]
    return out, lse


def test_part_forwards_vs_loops(errs, rng):
    # layernorm
    x = rng.standard_normal((4, 7)) * 2 + 1
    w, b = rng.standard_normal(7), rng.standard_normal(7)
    out, mean, rstd, _ = oracle.layernorm_forward(x, w, b)
    errs.maxabs("layernorm", out, np.array([_loop_layernorm(list(r), w, b) for r in x]), 1e-12)
    errs.maxabs("layernorm.mean", mean, x.mean(1), 1e-12)
    errs.maxabs("layernorm.rstd", rstd, 1 / np.sqrt(x.var(1) + 1e-5), 1e-12)
    # gelu
    g = rng.standard_normal(20) * 3
    errs.maxabs("gelu", oracle.gelu_forward(g)[0], np.array([_loop_gelu(a) for a in g]), 1e-12)
    # linear
    xl, wl, bl = rng.standard_normal((3, 4)), rng.standard_normal((4, 5)), rng.standard_normal(5)
    ref = np.array([[sum(xl[n, k] * wl[k, m] for k in range(4)) + bl[m] for m in range(5)] for n in range(3)])
    errs.maxabs("linear", oracle.linear_forward(xl, wl, bl)[0], ref, 1e-12)
    # attention
    for H in (1, 2, 3):
        qkv = rng.standard_normal((2, 5, 18)) * 1.5
        out, lse, _ = oracle.attention_forward(qkv, H)
        for bi in range(2):
            o_ref, l_ref = _loop_attention(qkv[bi], H)
            errs.maxabs(f"attention.H{H}", out[bi], o_ref, 1e-12)
            errs.maxabs(f"attention.lse.H{H}", lse[bi], l_ref, 1e-12)
    # cross-entropy
    lg = rng.standard_normal((5, 6)) * 4
    tg = rng.integers(0, 6, 5)
    ref = [math.log(sum(math.exp(a) for a in lg[n])) - lg[n, tg[n]] for n in range(5)]
    errs.maxabs("cross_entropy", oracle.cross_entropy_forward(lg, tg)[0], np.array(ref), 1e-12)
    errs.finish()


def _loop_model_logits(params, cfg, seq):
    """One sequence through the model with plain per-position loops (no batching, no caches)."""
    C, H = cfg.embedding_dim, cfg.num_heads
    T = len(seq)
    pos = params["wpe"] if cfg.pos_encoding == "learned" else oracle.sinusoidal_table(cfg.max_seq_len, C)
    x = np.array([params["wte"][tok] + pos[t] for t, tok in enumerate(seq)])
    for i in range(cfg.num_layers):
        p = lambda n: params[f"h.{i}.{n}"]
        ln1 = np.array([_loop_layernorm(list(x[t]), p("ln_1.weight"), p("ln_1.bias")) for t in range(T)])
        qkv = np.array([ln1[t] @ p("attn.c_attn.weight") + p("attn.c_attn.bias") for t in range(T)])
        att, _ = _loop_attention(qkv, H)
        x = x + np.array([att[t] @ p("attn.c_proj.weight") + p("attn.c_proj.bias") for t in range(T)])
        ln2 = np.array([_loop_layernorm(list(x[t]), p("ln_2.weight"), p("ln_2.bias")) for t in range(T)])
        for t in range(T):
            hid = [_loop_gelu(a) for a in ln2[t] @ p("mlp.c_fc.weight") + p("mlp.c_fc.bias")]
            x[t] = x[t] + np.array(hid) @ p("mlp.c_proj.weight") + p("mlp.c_proj.bias")
    lnf = np.array([_loop_layernorm(list(x[t]), params["ln_f.weight"], params["ln_f.bias"]) for t in range(T)])
    return np.array([[lnf[t] @ params["wte"][v] for v in range(cfg.vocab_size)] for t in range(T)])


@pytest.mark.parametrize("pos_encoding", ["learned", "sinusoidal"])
def test_model_forward_vs_loops(errs, rng, pos_encoding):
    cfg = oracle.Config(max_seq_len=6, pos_encoding=pos_encoding, **TINY)
    params = oracle.init_params(cfg, rng, scale=0.3)
    tokens = rng.integers(0, cfg.vocab_size, (2, 5))
    targets = rng.integers(0, cfg.vocab_size, (2, 5))
    logits, loss, _ = oracle.model_forward(params, cfg, tokens, targets)
    ref = np.stack([_loop_model_logits(params, cfg, list(s)) for s in tokens])
    errs.maxabs("logits", logits, ref, 1e-12)
    ref_losses = [math.log(np.exp(ref[b, t]).sum()) - ref[b, t, targets[b, t]] for b in range(2) for t in range(5)]
    errs.record("loss", abs(loss - np.mean(ref_losses)), 1e-12)
    # no targets -> no loss; identity masks == no dropout
    assert oracle.model_forward(params, cfg, tokens)[1] is None
    ones = {k: np.ones_like(v) for k, v in _random_masks(cfg, 2, 5, 0.5, rng).items()}
    errs.record("loss(ones masks)", abs(oracle.model_loss(params, cfg, tokens, targets, ones) - loss), 1e-14)
    errs.finish()


def test_param_names_and_shapes():
    cfg = oracle.Config(vocab_size=13, max_seq_len=9, embedding_dim=6, num_layers=1, num_heads=3, ff_dim=10)
    shapes = oracle.param_shapes(cfg)
    assert shapes == {
        "wte": (13, 6), "wpe": (9, 6),
        "h.0.ln_1.weight": (6,), "h.0.ln_1.bias": (6,),
        "h.0.attn.c_attn.weight": (6, 18), "h.0.attn.c_attn.bias": (18,),
        "h.0.attn.c_proj.weight": (6, 6), "h.0.attn.c_proj.bias": (6,),
        "h.0.ln_2.weight": (6,), "h.0.ln_2.bias": (6,),
        "h.0.mlp.c_fc.weight": (6, 10), "h.0.mlp.c_fc.bias": (10,),
        "h.0.mlp.c_proj.weight": (10, 6), "h.0.mlp.c_proj.bias": (6,),
        "ln_f.weight": (6,), "ln_f.bias": (6,),
    }
    cfg.pos_encoding = "sinusoidal"
    assert "wpe" not in oracle.param_shapes(cfg)


# ----------------------------------------------------------------------------------------------------
# reference optimizers vs scalar statements of the PyTorch algorithms
# ----------------------------------------------------------------------------------------------------
def _toy_params(rng):
    return {"w": rng.standard_normal((3, 4)), "b": rng.standard_normal(4), "e": rng.standard_normal((2, 3))}


def test_adamw_reference(errs, rng):
    lr, (b1, b2), eps, wd = 1e-2, (0.9, 0.95), 1e-8, 0.1
    params = _toy_params(rng)
    scalar = {k: [float(a) for a in v.ravel()] for k, v in params.items()}
    m, v = {}, {}
    sm = {k: [0.0] * len(a) for k, a in scalar.items()}
    sv = {k: [0.0] * len(a) for k, a in scalar.items()}
    for step in range(1, 5):
        grads = {k: rng.standard_normal(p.shape) for k, p in params.items()}
        oracle.adamw_step(params, grads, m, v, step, lr, (b1, b2), eps, wd)
        for k in scalar:  # torch.optim.AdamW, single-tensor path, written per element
            decay = params[k].ndim >= 2
            for i, g in enumerate(grads[k].ravel()):
                p = scalar[k][i]
                if decay:
                    p = p * (1 - lr * wd)
                sm[k][i] = sm[k][i] * b1 + (1 - b1) * g
                sv[k][i] = sv[k][i] * b2 + (1 - b2) * g * g
                step_size = lr / (1 - b1 ** step)
                denom = math.sqrt(sv[k][i]) / math.sqrt(1 - b2 ** step) + eps
                scalar[k][i] = p - step_size * sm[k][i] / denom
    for k in params:
        errs.maxabs(k, params[k].ravel(), np.array(scalar[k]), 1e-13)
        errs.maxabs(k + ".exp_avg", m[k].ravel(), np.array(sm[k]), 1e-13)
        errs.maxabs(k + ".exp_avg_sq", v[k].ravel(), np.array(sv[k]), 1e-13)
    errs.finish()


@pytest.mark.parametrize("momentum,nesterov,wd", [(0.0, False, 0.0), (0.9, False, 0.01), (0.9, True, 0.05)],
                         ids=["plain", "momentum-wd", "nesterov-wd"])
def test_sgd_reference(errs, rng, momentum, nesterov, wd):
    lr = 0.1
    params = _toy_params(rng)
    scalar = {k: [float(a) for a in v.ravel()] for k, v in params.items()}
    sbuf = {k: [None] * len(a) for k, a in scalar.items()}
    buf = {}
    for _ in range(4):
        grads = {k: rng.standard_normal(p.shape) for k, p in params.items()}
        decay = {k: p.ndim >= 2 for k, p in params.items()}
        oracle.sgd_step(params, grads, buf, lr, momentum, wd, nesterov)
        for k in scalar:
            for i, g in enumerate(grads[k].ravel()):
                p = scalar[k][i]
                if decay[k]:
                    g = g + wd * p
                if momentum != 0:
                    sbuf[k][i] = g if sbuf[k][i] is None else momentum * sbuf[k][i] + g
                    g = g + momentum * sbuf[k][i] if nesterov else sbuf[k][i]
                scalar[k][i] = p - lr * g
    for k in params:
        errs.maxabs(k, params[k].ravel(), np.array(scalar[k]), 1e-13)
    errs.finish()


@pytest.mark.parametrize("factor", [0.5, 3.0], ids=["clips", "no-clip"])
def test_clip_grad_norm_reference(errs, rng, factor):
    grads = {"a": rng.standard_normal((3, 4)), "b": rng.standard_normal(5)}
    orig = {k: g.copy() for k, g in grads.items()}
    norm = math.sqrt(sum(float((g ** 2).sum()) for g in orig.values()))
    max_norm = factor * norm
    got = oracle.clip_grad_norm(grads, max_norm)
    errs.record("norm", abs(got - norm) / norm, 1e-14)
    coef = min(1.0, max_norm / (norm + 1e-6))
    for k in grads:
        errs.maxabs(k, grads[k], orig[k] * coef, 1e-14)
    errs.finish()
