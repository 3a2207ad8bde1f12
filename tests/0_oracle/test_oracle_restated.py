"""Checks of the NumPy float64 oracle itself (no C++ engine involved): restatements.

* the forwards (the parts, and the whole model) against plain per-element loop implementations written from the
  formulas, and the parameter names and shapes;
* the reference optimizers against scalar re-statements of the PyTorch update rules.

The backwards against finite differences are checked in test_oracle_gradients.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import oracle
import oracle_model
import oracle_optim
from oracle_cases import TINY, _random_masks


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
    cfg = oracle_model.Config(max_seq_len=6, pos_encoding=pos_encoding, **TINY)
    params = oracle_model.init_params(cfg, rng, scale=0.3)
    tokens = rng.integers(0, cfg.vocab_size, (2, 5))
    targets = rng.integers(0, cfg.vocab_size, (2, 5))
    logits, loss, _ = oracle_model.model_forward(params, cfg, tokens, targets)
    ref = np.stack([_loop_model_logits(params, cfg, list(s)) for s in tokens])
    errs.maxabs("logits", logits, ref, 1e-12)
    ref_losses = [math.log(np.exp(ref[b, t]).sum()) - ref[b, t, targets[b, t]] for b in range(2) for t in range(5)]
    errs.record("loss", abs(loss - np.mean(ref_losses)), 1e-12)
    # no targets -> no loss; identity masks == no dropout
    assert oracle_model.model_forward(params, cfg, tokens)[1] is None
    ones = {k: np.ones_like(v) for k, v in _random_masks(cfg, 2, 5, 0.5, rng).items()}
    errs.record("loss(ones masks)", abs(oracle_model.model_loss(params, cfg, tokens, targets, ones) - loss), 1e-14)
    errs.finish()


def test_param_names_and_shapes():
    cfg = oracle_model.Config(vocab_size=13, max_seq_len=9, embedding_dim=6, num_layers=1, num_heads=3, ff_dim=10)
    shapes = oracle_model.param_shapes(cfg)
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
    assert "wpe" not in oracle_model.param_shapes(cfg)


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
        oracle_optim.adamw_step(params, grads, m, v, step, lr, (b1, b2), eps, wd)
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
        oracle_optim.sgd_step(params, grads, buf, lr, momentum, wd, nesterov)
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
    got = oracle_optim.clip_grad_norm(grads, max_norm)
    errs.record("norm", abs(got - norm) / norm, 1e-14)
    coef = min(1.0, max_norm / (norm + 1e-6))
    for k in grads:
        errs.maxabs(k, grads[k], orig[k] * coef, 1e-14)
    errs.finish()
