"""The whole C++ model (cllm.Model) against the float64 oracle.

The model keeps its own GPT-2 initialisation; LayerNorm weights/biases and all biases are perturbed
through the parameter views so that their gradients are non-trivial. Tolerances:
logits max |got-ref|/max(1,|ref|) <= 1e-4, loss |got-ref|/max(1,|ref|) <= 1e-5,
every parameter gradient ||got-ref||/||ref|| <= 1e-4.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import oracle_model

pytestmark = pytest.mark.usefixtures("each_variant")  # every kernel variant this CPU runs

LOGITS_TOL = 1e-4
LOSS_TOL = 1e-5
GRAD_TOL = 1e-4

# (config kwargs, B, T)
ODD = dict(vocab_size=67, max_seq_len=16, embedding_dim=48, num_layers=2, num_heads=3, ff_dim=100)
CONFIGS = [
    pytest.param(dict(ODD, pos_encoding="learned"), 2, 13, id="V67-C48-H3-F100-L2-learned-T13"),
    pytest.param(dict(ODD, pos_encoding="sinusoidal"), 2, 16, id="V67-C48-H3-F100-L2-sinusoidal-T16"),
    pytest.param(dict(vocab_size=50, max_seq_len=12, embedding_dim=45, num_layers=1, num_heads=5, ff_dim=64,
                      pos_encoding="sinusoidal"), 3, 11, id="V50-C45odd-H5-L1-sinusoidal-B3-T11"),
    pytest.param(dict(vocab_size=31, max_seq_len=20, embedding_dim=32, num_layers=3, num_heads=1, ff_dim=64,
                      pos_encoding="learned"), 1, 7, id="V31-C32-H1-L3-learned-B1-T7"),
    pytest.param(dict(vocab_size=256, max_seq_len=128, embedding_dim=128, num_layers=4, num_heads=4, ff_dim=512,
                      pos_encoding="learned"), 2, 64, id="default-V256-C128-H4-L4-T64"),
    # 12 rows: the forward's products take their few-rows path (two row groups, ragged column strips, K % 16 != 0)
    pytest.param(dict(vocab_size=50, max_seq_len=12, embedding_dim=45, num_layers=1, num_heads=5, ff_dim=70,
                      pos_encoding="learned"), 1, 12, id="V50-C45odd-F70-B1-T12-fewrows"),
]
# Llama blocks: grouped-query (KV < H), multi-query (KV = 1) and multi-head (KV = H); tied and untied heads; T = 70
# spans two of attention's query blocks
LLAMA = dict(architecture="llama", vocab_size=67, max_seq_len=16, embedding_dim=48, num_layers=2, ff_dim=100)
LLAMA_CONFIGS = [
    pytest.param(dict(LLAMA, num_heads=6, num_kv_heads=2), 2, 13, id="llama-H6-KV2-tied-T13"),
    pytest.param(dict(LLAMA, num_heads=3, tie_embeddings=False), 3, 16, id="llama-H3-KV3-untied-B3-T16"),
    pytest.param(dict(LLAMA, max_seq_len=80, embedding_dim=32, num_layers=1, num_heads=4, num_kv_heads=1,
                      tie_embeddings=False, rope_theta=500000.0, rms_norm_eps=1e-6), 1, 70,
                 id="llama-H4-KV1-untied-theta5e5-T70"),
    # 13 rows: the projections' and the tied head's few-rows path (rows_dots), K = 40 not a multiple of 16
    pytest.param(dict(LLAMA, embedding_dim=40, num_heads=4, num_kv_heads=2), 1, 13, id="llama-C40-KV2-tied-B1-T13-fewrows"),
]
DROPOUT_CONFIGS = [
    pytest.param(dict(ODD, pos_encoding="learned", dropout=0.1), 2, 16, id="dropout0.1-learned"),
    pytest.param(dict(ODD, pos_encoding="sinusoidal", dropout=0.1), 3, 9, id="dropout0.1-sinusoidal-T9"),
    pytest.param(dict(LLAMA, num_heads=6, num_kv_heads=3, tie_embeddings=False, dropout=0.1), 2, 16,
                 id="dropout0.1-llama-H6-KV3"),
]


def make_model(cllm, helpers, rng, kw, seed=0, perturb=True):
    cfg = cllm.ModelConfig(**kw)
    model = cllm.Model(cfg, seed=seed)
    if perturb:
        helpers.perturb_params(model, rng)
    return model, oracle_model.Config(**kw)


def batch(rng, V, B, T):
    return rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T))


def expected_mask_keys(L):
    keys = {"emb"}
    for i in range(L):
        keys |= {f"h.{i}.attn", f"h.{i}.attn_resid", f"h.{i}.mlp_resid"}
    return keys


def check_grads(errs, grads, ref, tol=GRAD_TOL, prefix="grad "):
    assert set(grads) == set(ref), f"gradient names differ: {sorted(set(grads) ^ set(ref))}"
    for name, r in ref.items():
        g = grads[name]
        assert g.shape == r.shape, f"{name}: shape {g.shape} != {r.shape}"
        errs.normwise(prefix + name, g, r, tol)


def loss_err(got, ref):
    return abs(got - ref) / max(1.0, abs(ref))


# ----------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("kw,B,T", CONFIGS + LLAMA_CONFIGS)
def test_model_matches_oracle(cllm, helpers, errs, rng, kw, B, T):
    model, ocfg = make_model(cllm, helpers, rng, kw)
    params = helpers.snapshot(model.parameters())
    shapes = oracle_model.param_shapes(ocfg)
    assert {k: tuple(v.shape) for k, v in params.items()} == shapes
    final_norm = "norm.weight" if model.config.architecture == "llama" else "ln_f.weight"
    assert not np.all(params[final_norm] == 1.0), "perturbation through the views did not reach the model"

    if model.config.architecture == "llama":
        with pytest.raises(ValueError, match="rotary"):
            model.position_table()
    else:
        errs.maxabs("position_table", model.position_table(), oracle_model.position_table(params, ocfg), 1e-6)

    x, y = batch(rng, ocfg.vocab_size, B, T)
    ref_logits, ref_loss, cache = oracle_model.model_forward(params, ocfg, x, y)
    ref_grads = oracle_model.model_backward(cache)

    logits = model.forward(x)
    assert logits.shape == (B, T, ocfg.vocab_size) and logits.dtype == np.float32
    errs.maxabs("logits", logits, ref_logits, LOGITS_TOL)
    errs.record("loss()", loss_err(model.loss(x, y), ref_loss), LOSS_TOL)

    loss = model.forward_backward(x, y)
    errs.record("forward_backward loss", loss_err(loss, ref_loss), LOSS_TOL)
    check_grads(errs, model.gradients(), ref_grads)

    # the parameters must not have been touched by any of the above
    for name, p in model.parameters().items():
        assert np.array_equal(p, params[name].astype(np.float32)), f"{name} changed during forward/backward"
    errs.finish()


@pytest.mark.parametrize("eps", [0.1, 0.7])
def test_label_smoothing_matches_oracle(cllm, helpers, errs, rng, eps):
    """forward_backward's label-smoothed loss and every gradient (the fused kernel in place over the logits)."""
    model, ocfg = make_model(cllm, helpers, rng, dict(ODD, pos_encoding="learned"))
    params = helpers.snapshot(model.parameters())
    x, y = batch(rng, ocfg.vocab_size, 2, 13)
    _, ref_loss, cache = oracle_model.model_forward(params, ocfg, x, y, label_smoothing=eps)
    ref_grads = oracle_model.model_backward(cache, dloss=0.5)
    loss = model.forward_backward(x, y, grad_scale=0.5, label_smoothing=eps)
    errs.record("smoothed loss", loss_err(loss, ref_loss), LOSS_TOL)
    check_grads(errs, model.gradients(), ref_grads)
    errs.record("loss() stays unsmoothed", loss_err(model.loss(x, y), oracle_model.model_forward(params, ocfg, x, y)[1]),
                LOSS_TOL)
    with pytest.raises(ValueError, match="label_smoothing"):
        model.forward_backward(x, y, label_smoothing=1.5)
    errs.finish()


@pytest.mark.parametrize("kw,B,T", DROPOUT_CONFIGS)
def test_dropout_matches_oracle(cllm, helpers, errs, rng, kw, B, T):
    model, ocfg = make_model(cllm, helpers, rng, kw)
    params = helpers.snapshot(model.parameters())
    x, y = batch(rng, ocfg.vocab_size, B, T)
    p = kw["dropout"]
    C, H, L = ocfg.embedding_dim, ocfg.num_heads, ocfg.num_layers

    masks = {k: np.array(v, copy=True) for k, v in model.dropout_masks(B, T).items()}
    again = model.dropout_masks(B, T)
    assert set(masks) == expected_mask_keys(L)
    for k, m in masks.items():
        shape = (B, H, T, T) if k.endswith(".attn") else (B, T, C)
        assert m.shape == shape, f"mask {k}: shape {m.shape} != {shape}"
        vals = np.unique(m)
        assert np.all(np.isclose(vals, 0.0) | np.isclose(vals, 1.0 / (1.0 - p), rtol=1e-6)), f"mask {k}: values {vals}"
        np.testing.assert_array_equal(again[k], m, err_msg=f"dropout_masks({B},{T}) is not repeatable for {k}")
    # attention masks: entries above the diagonal multiply probabilities that are 0 anyway, so only the
    # causal part (j <= t) counts
    causal = np.tril(np.ones((T, T), dtype=bool))
    dropped = np.mean(np.concatenate([(m[..., causal] if k.endswith(".attn") else m).ravel() == 0
                                      for k, m in masks.items()]))
    assert abs(dropped - p) < 0.03, f"dropped fraction {dropped:.3f} for p={p}"

    # forward() and loss() use no dropout
    ref_logits, ref_loss_nodrop, _ = oracle_model.model_forward(params, ocfg, x, y)
    errs.maxabs("logits (no dropout)", model.forward(x), ref_logits, LOGITS_TOL)
    errs.record("loss() (no dropout)", loss_err(model.loss(x, y), ref_loss_nodrop), LOSS_TOL)

    _, ref_loss, cache = oracle_model.model_forward(params, ocfg, x, y, masks)
    ref_grads = oracle_model.model_backward(cache)
    assert abs(ref_loss - ref_loss_nodrop) > 1e-6  # the masks matter
    loss = model.forward_backward(x, y)
    errs.record("forward_backward loss (dropout)", loss_err(loss, ref_loss), LOSS_TOL)
    check_grads(errs, model.gradients(), ref_grads)

    nxt = model.dropout_masks(B, T)
    assert any(not np.array_equal(nxt[k], masks[k]) for k in masks), "dropout masks did not advance after a step"
    errs.finish()


# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,B,T", [CONFIGS[0], CONFIGS[2], LLAMA_CONFIGS[0]])
@pytest.mark.parametrize("first_accumulates", [True, False], ids=["zero_grad+acc+acc", "noacc+acc"])
def test_accumulation_equals_concatenated_batch(cllm, helpers, errs, rng, kw, B, T, first_accumulates):
    model, ocfg = make_model(cllm, helpers, rng, kw)
    x1, y1 = batch(rng, ocfg.vocab_size, B, T)
    x2, y2 = batch(rng, ocfg.vocab_size, B, T)
    x, y = np.concatenate([x1, x2]), np.concatenate([y1, y2])

    full = model.forward_backward(x, y)
    g_full = helpers.snapshot(model.gradients())

    model.forward_backward(x2, y1)  # leave stale gradients behind
    if first_accumulates:
        model.zero_grad()
        assert all(np.all(g == 0) for g in model.gradients().values()), "zero_grad left nonzero gradients"
    l1 = model.forward_backward(x1, y1, accumulate=first_accumulates, grad_scale=0.5)
    l2 = model.forward_backward(x2, y2, accumulate=True, grad_scale=0.5)
    errs.record("mean of micro-batch losses", loss_err(0.5 * (l1 + l2), full), LOSS_TOL)
    check_grads(errs, model.gradients(), g_full, tol=1e-5, prefix="accumulated ")

    # grad_scale alone scales the gradient, not the returned loss
    l3 = model.forward_backward(x, y, grad_scale=0.25)
    errs.record("loss with grad_scale", loss_err(l3, full), LOSS_TOL)
    check_grads(errs, model.gradients(), {k: 0.25 * g for k, g in g_full.items()}, tol=1e-6, prefix="scaled ")
    errs.finish()


@pytest.mark.parametrize("kw,B,T", [CONFIGS[0], CONFIGS[1], LLAMA_CONFIGS[0], LLAMA_CONFIGS[2]])
def test_every_parameter_matters(cllm, helpers, errs, rng, kw, B, T):
    """No tensor is dead weight (a constant loss would go unnoticed otherwise): every tensor gets a nonzero
    gradient and perturbing any single tensor changes the loss (by what the oracle says it should)."""
    model, ocfg = make_model(cllm, helpers, rng, kw)
    x, y = batch(rng, ocfg.vocab_size, B, T)
    base = model.forward_backward(x, y)
    for name, g in model.gradients().items():
        assert np.all(np.isfinite(g)), f"{name}: non-finite gradient"
        assert np.linalg.norm(g) > 0, f"{name}: gradient is identically zero"

    views = model.parameters()
    params = helpers.snapshot(views)
    base_ref = oracle_model.model_loss(params, ocfg, x, y)
    unchanged = []
    for name in views:
        saved = np.array(views[name], copy=True)
        # 1-D tensors (LayerNorm, biases) act through small GPT-2-initialised weights: perturb them more
        noise = (1.0 if saved.ndim == 1 else 0.1) * rng.standard_normal(saved.shape)
        views[name] += noise.astype(np.float32)
        pert = dict(params)
        pert[name] = np.asarray(views[name], dtype=np.float64)
        got = model.loss(x, y)
        ref = oracle_model.model_loss(pert, ocfg, x, y)
        errs.record(f"loss after perturbing {name}", loss_err(got, ref), LOSS_TOL)
        # the change must be well above float32 noise in the loss and of the size the oracle predicts
        if abs(got - base) <= 5e-6 or abs((got - base) - (ref - base_ref)) > max(0.1 * abs(ref - base_ref), 2e-6):
            unchanged.append(f"{name} (delta {got - base:.3e}, oracle delta {ref - base_ref:.3e})")
        views[name][...] = saved
    assert model.loss(x, y) == pytest.approx(base, abs=1e-6)
    assert not unchanged, "perturbing these tensors did not change the loss as the oracle says: " + ", ".join(unchanged)
    errs.finish()


# ----------------------------------------------------------------------------------------------------
def test_views_and_determinism(cllm, helpers, errs, rng):
    kw = dict(CONFIGS[0].values[0])
    model, ocfg = make_model(cllm, helpers, rng, kw)
    x, y = batch(rng, ocfg.vocab_size, 2, 9)

    # parameters() and gradients() are views: writes go to the model, later calls see updates
    views = model.parameters()
    again = model.parameters()
    for name in views:
        assert np.shares_memory(views[name], again[name]), f"parameters()[{name!r}] is not a view"
    grads_before = model.gradients()
    l1 = model.forward_backward(x, y)
    g1 = helpers.snapshot(model.gradients())
    for name in g1:
        assert np.array_equal(grads_before[name], g1[name].astype(np.float32)), f"gradients()[{name!r}] is not a view"
    saved = views["ln_f.bias"].copy()
    views["ln_f.bias"][0] += 1.0
    assert model.loss(x, y) != l1, "writing into a parameter view did not change the model"
    views["ln_f.bias"][...] = saved

    # the same call twice gives bit-identical results
    l2 = model.forward_backward(x, y)
    assert l2 == l1
    for name, g in model.gradients().items():
        assert np.array_equal(g, g1[name].astype(np.float32)), f"{name}: gradient not deterministic"

    # the same seed gives the same model, bit for bit; another seed does not
    a = cllm.Model(cllm.ModelConfig(**kw), seed=7).parameters()
    b = cllm.Model(cllm.ModelConfig(**kw), seed=7).parameters()
    c = cllm.Model(cllm.ModelConfig(**kw), seed=8).parameters()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["wte"], c["wte"])


@pytest.mark.parametrize("kw", [dict(CONFIGS[4].values[0]),
                                dict(LLAMA, max_seq_len=128, embedding_dim=128, num_heads=4, num_kv_heads=2)],
                         ids=["gpt2", "llama-KV2"])
@pytest.mark.slow
def test_thread_count_does_not_change_results(cllm, helpers, errs, rng, kw):
    model, ocfg = make_model(cllm, helpers, rng, kw)
    x, y = batch(rng, ocfg.vocab_size, 2, 32)
    orig = cllm.get_num_threads()
    try:
        results = {}
        for n in (1, 2, 3):
            cllm.set_num_threads(n)
            assert cllm.get_num_threads() == n
            loss = model.forward_backward(x, y)
            results[n] = (loss, helpers.snapshot(model.gradients()), np.array(model.forward(x)))
    finally:
        cllm.set_num_threads(orig)
    for n in (2, 3):
        errs.record(f"loss threads=1 vs {n}", loss_err(results[n][0], results[1][0]), 1e-6)
        errs.maxabs(f"logits threads=1 vs {n}", results[n][2], results[1][2], 1e-5)
        check_grads(errs, results[n][1], results[1][1], tol=1e-5, prefix=f"threads=1 vs {n} ")
    errs.finish()


@pytest.mark.slow
def test_gpt2_initialisation(cllm, errs):
    kw = dict(CONFIGS[4].values[0])
    L = kw["num_layers"]
    model = cllm.Model(cllm.ModelConfig(**kw), seed=0)
    for name, p in model.parameters().items():
        if name.endswith(("ln_1.weight", "ln_2.weight")) or name == "ln_f.weight":
            assert np.all(p == 1.0), f"{name} must start at 1"
        elif name.endswith(".bias"):
            assert np.all(p == 0.0), f"{name} must start at 0"
        else:
            std = 0.02 / math.sqrt(2 * L) if name.endswith("c_proj.weight") else 0.02
            errs.record(f"std({name}) rel. to {std:.4g}", abs(float(np.std(p)) / std - 1.0), 0.05)
            errs.record(f"mean({name}) / std", abs(float(np.mean(p))) / std, 0.05)
    # tiny logits at init: the loss is close to ln(V)
    rng = np.random.default_rng(0)
    x, y = batch(rng, kw["vocab_size"], 2, 32)
    errs.record("loss at init vs ln(V)", abs(model.loss(x, y) - math.log(kw["vocab_size"])), 0.05)
    errs.finish()


@pytest.mark.slow
def test_llama_initialisation(cllm, errs):
    """The same scheme as GPT-2's: RMSNorm weights 1, weights N(0, 0.02), o_proj and down_proj (into the residual
    stream) N(0, 0.02/sqrt(2L)); an untied head like the embedding."""
    L = 3
    cfg = cllm.ModelConfig(architecture="llama", vocab_size=256, embedding_dim=128, num_layers=L, num_heads=4,
                           num_kv_heads=2, ff_dim=256, tie_embeddings=False)
    model = cllm.Model(cfg, seed=0)
    for name, p in model.parameters().items():
        if name.endswith("norm.weight"):
            assert np.all(p == 1.0), f"{name} must start at 1"
        else:
            std = 0.02 / math.sqrt(2 * L) if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
            errs.record(f"std({name}) rel. to {std:.4g}", abs(float(np.std(p)) / std - 1.0), 0.05)
    rng = np.random.default_rng(0)
    x, y = batch(rng, 256, 2, 32)
    errs.record("loss at init vs ln(V)", abs(model.loss(x, y) - math.log(256)), 0.05)
    errs.finish()


@pytest.mark.parametrize("case", ["token>=V", "negative token", "T>max_seq_len", "target>=V"])
def test_bad_input_raises_value_error(cllm, case):
    kw = dict(CONFIGS[3].values[0])
    model = cllm.Model(cllm.ModelConfig(**kw), seed=0)
    V, maxT = kw["vocab_size"], kw["max_seq_len"]
    x = np.zeros((1, 4), dtype=np.int64)
    y = np.zeros((1, 4), dtype=np.int64)
    if case == "token>=V":
        x[0, 2] = V
    elif case == "negative token":
        x[0, 1] = -1
    elif case == "T>max_seq_len":
        x = np.zeros((1, maxT + 1), dtype=np.int64)
        y = np.zeros((1, maxT + 1), dtype=np.int64)
    elif case == "target>=V":
        y[0, 3] = V + 5
    with pytest.raises(ValueError):
        model.forward_backward(x, y)
    if case != "target>=V":
        with pytest.raises(ValueError):
            model.forward(x)
