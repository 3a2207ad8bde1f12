"""cllm.AdamW, cllm.SGD and cllm.clip_grad_norm against the float64 reference optimizers in oracle_optim.py.

The reference starts from the model's float32 parameters (upcast) and, at every step, is fed the same
float32 gradients that the engine's optimizer sees (read from model.gradients() after forward_backward).
After 3 steps every tensor must agree to ||got - ref|| / ||ref|| <= 1e-6.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import oracle_optim

pytestmark = pytest.mark.usefixtures("each_variant")  # every kernel variant this CPU runs

OPT_TOL = 1e-6
CLIP_TOL = 1e-5
KW = dict(vocab_size=67, max_seq_len=16, embedding_dim=48, num_layers=2, num_heads=3, ff_dim=100)


def setup(cllm, helpers, rng, pos_encoding="learned"):
    model = cllm.Model(cllm.ModelConfig(**KW, pos_encoding=pos_encoding), seed=0)
    helpers.perturb_params(model, rng)
    x = rng.integers(0, KW["vocab_size"], (2, 12))
    y = rng.integers(0, KW["vocab_size"], (2, 12))
    return model, x, y


def is_2d(name, p):
    return np.ndim(p) >= 2


# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "lr,betas,eps,wd,pos",
    [(1e-2, (0.9, 0.95), 1e-8, 0.1, "learned"),
     (3e-4, (0.9, 0.999), 1e-8, 0.0, "learned"),
     (5e-3, (0.8, 0.9), 1e-6, 0.5, "sinusoidal")],
    ids=["lr1e-2-wd0.1", "lr3e-4-wd0", "lr5e-3-wd0.5-eps1e-6-sinusoidal"],
)
@pytest.mark.slow
def test_adamw_vs_reference(cllm, helpers, errs, rng, lr, betas, eps, wd, pos):
    model, x, y = setup(cllm, helpers, rng, pos)
    opt = cllm.AdamW(model, lr=lr, betas=betas, eps=eps, weight_decay=wd)
    ref = helpers.snapshot(model.parameters())
    start = helpers.snapshot(model.parameters())
    m, v = {}, {}
    steps = 3
    for step in range(1, steps + 1):
        model.forward_backward(x, y)
        grads = helpers.snapshot(model.gradients())  # exactly the float32 values the optimizer reads
        opt.step()
        oracle_optim.adamw_step(ref, grads, m, v, step, lr, betas, eps, wd)

    params = model.parameters()
    for name, r in ref.items():
        errs.normwise(name, params[name], r, OPT_TOL)
        # the update itself, looser: it is a difference of float32 numbers
        errs.normwise("update " + name, np.asarray(params[name], np.float64) - start[name], r - start[name], 1e-3)
    state = opt.state()
    assert int(state["step"]) == steps
    for name in ref:
        errs.normwise("exp_avg " + name, state["exp_avg"][name], m[name], OPT_TOL)
        errs.normwise("exp_avg_sq " + name, state["exp_avg_sq"][name], v[name], OPT_TOL)
    errs.finish()


def test_adamw_decay_only_2d(cllm, helpers, errs, rng):
    """With zero gradients an AdamW step is pure decoupled decay: 2-D tensors shrink by (1 - lr*wd),
    1-D tensors (biases, LayerNorm) stay exactly as they were."""
    model, x, y = setup(cllm, helpers, rng)
    lr, wd = 0.05, 0.2
    opt = cllm.AdamW(model, lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=wd)
    before = helpers.snapshot(model.parameters())
    model.zero_grad()
    opt.step()
    for name, p in model.parameters().items():
        if is_2d(name, p):
            errs.normwise(name, p, before[name] * (1 - lr * wd), OPT_TOL)
        else:
            assert np.array_equal(p, before[name].astype(np.float32)), f"1-D tensor {name} was decayed"
    errs.finish()


# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "lr,momentum,wd,nesterov",
    [(0.05, 0.0, 0.0, False), (0.05, 0.9, 0.0, False), (0.05, 0.9, 0.01, False), (0.1, 0.9, 0.05, True),
     (0.1, 0.0, 0.1, False)],
    ids=["plain", "momentum", "momentum-wd", "nesterov-wd", "wd-no-momentum"],
)
def test_sgd_vs_reference(cllm, helpers, errs, rng, lr, momentum, wd, nesterov):
    model, x, y = setup(cllm, helpers, rng)
    opt = cllm.SGD(model, lr=lr, momentum=momentum, weight_decay=wd, nesterov=nesterov)
    ref = helpers.snapshot(model.parameters())
    buf = {}
    for _ in range(3):
        model.forward_backward(x, y)
        grads = helpers.snapshot(model.gradients())
        opt.step()
        oracle_optim.sgd_step(ref, grads, buf, lr, momentum, wd, nesterov)
    params = model.parameters()
    for name, r in ref.items():
        errs.normwise(name, params[name], r, OPT_TOL)
    errs.finish()


def test_sgd_decay_only_2d(cllm, helpers, errs, rng):
    model, x, y = setup(cllm, helpers, rng)
    lr, wd = 0.1, 0.3
    opt = cllm.SGD(model, lr=lr, momentum=0.0, weight_decay=wd)
    before = helpers.snapshot(model.parameters())
    model.zero_grad()
    opt.step()
    for name, p in model.parameters().items():
        if is_2d(name, p):
            errs.normwise(name, p, before[name] * (1 - lr * wd), OPT_TOL)
        else:
            assert np.array_equal(p, before[name].astype(np.float32)), f"1-D tensor {name} was decayed"
    errs.finish()


# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("factor", [0.25, 0.999, 1.5, 100.0], ids=["clips-hard", "clips-barely", "no-clip", "no-clip-far"])
def test_clip_grad_norm(cllm, helpers, errs, rng, factor):
    model, x, y = setup(cllm, helpers, rng)
    model.forward_backward(x, y)
    grads = helpers.snapshot(model.gradients())
    norm = math.sqrt(sum(float(np.sum(g * g)) for g in grads.values()))
    max_norm = factor * norm
    got = cllm.clip_grad_norm(model, max_norm)
    errs.record("returned norm", abs(got - norm) / norm, CLIP_TOL)
    expected = {k: g.copy() for k, g in grads.items()}
    oracle_optim.clip_grad_norm(expected, max_norm)
    after = model.gradients()
    for name, r in expected.items():
        if factor > 1:  # not clipping: the gradients must be left bit-for-bit as they were
            assert np.array_equal(after[name], grads[name].astype(np.float32)), f"{name} changed without clipping"
        else:
            errs.normwise(name, after[name], r, CLIP_TOL)
    if factor < 1:
        new_norm = math.sqrt(sum(float(np.sum(np.asarray(g, np.float64) ** 2)) for g in after.values()))
        errs.record("norm after clipping / max_norm - 1", abs(new_norm / max_norm - 1), CLIP_TOL)
    errs.finish()


# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("opt_name", ["AdamW", "SGD"])
def test_training_reduces_loss(cllm, helpers, rng, opt_name):
    """End-to-end sanity: a few steps on one batch must drive its loss well down (a model whose loss stays
    constant, e.g. with a parameter that no gradient reaches, fails here)."""
    model, x, y = setup(cllm, helpers, rng)
    opt = cllm.AdamW(model, lr=1e-2, weight_decay=0.0) if opt_name == "AdamW" else cllm.SGD(model, lr=0.5, momentum=0.9)
    first = model.loss(x, y)
    losses = []
    for _ in range(15):
        losses.append(model.forward_backward(x, y))
        cllm.clip_grad_norm(model, 1.0)
        opt.step()
    last = model.loss(x, y)
    assert all(np.isfinite(losses))
    assert losses[0] == pytest.approx(first, abs=1e-5)
    assert last < 0.7 * first, f"{opt_name}: loss went {first:.4f} -> {last:.4f} in 15 steps: {losses}"


# ----------------------------------------------------------------------------------------------------
# ZeRO-1: AdamW over a shard of the flat buffers
def test_sharded_adamw_equals_the_whole_update_bit_for_bit(cllm, helpers, rng):
    """Shards cutting through tensors (and padding), each updated by its own AdamW holding only its moments, give
    the whole AdamW's parameters and moments bit for bit: the update is element-wise."""
    from cllm.parallel.reducer import shard_ranges

    model, x, y = setup(cllm, helpers, rng)
    twin = cllm.Model(model.config, seed=0)
    twin.load_parameters(model.parameters())
    total = model.layout.total
    shards = [(0, 1000), (1000, 1001), (1001, 7777), (7777, total)]
    whole = cllm.AdamW(model, lr=1e-2, weight_decay=0.1)
    parts = [cllm.AdamW(twin, lr=1e-2, weight_decay=0.1, shard=s) for s in shards]
    assert [p.exp_avg.size for p in parts] == [hi - lo for lo, hi in shards]
    for _ in range(3):
        model.forward_backward(x, y)
        twin.forward_backward(x, y)
        whole.step()
        for p in parts:
            p.step()
    np.testing.assert_array_equal(twin.flat_parameters(), model.flat_parameters())
    gathered = whole.with_moments(np.concatenate([p.exp_avg for p in parts]),
                                  np.concatenate([p.exp_avg_sq for p in parts]))
    for slot in ("exp_avg", "exp_avg_sq"):
        for name, v in whole.state()[slot].items():
            np.testing.assert_array_equal(gathered.state()[slot][name], v)
    # a shard loads its part of the whole (saved) moments
    state = whole.state()
    fresh = cllm.AdamW(twin, shard=shards[2])
    fresh.load_state(state["step"], state["exp_avg"], state["exp_avg_sq"])
    np.testing.assert_array_equal(fresh.exp_avg, whole.exp_avg[1001:7777])
    assert fresh.step_count == 3
    with pytest.raises(ValueError, match="sharded AdamW holds part of the moments"):
        fresh.state()
    with pytest.raises(ValueError, match=rf"shard must be \(lo, hi\) with 0 <= lo <= hi <= {total}"):
        cllm.AdamW(model, shard=(5, total + 1))
    with pytest.raises(ValueError, match=rf"exp_avg must be a flat float32 array of {total} floats \(the range\)"):
        cllm._core.adamw_step(model.layout, model.flat_parameters(), model.flat_gradients(), fresh.exp_avg,
                              fresh.exp_avg_sq, 1e-3, 0.9, 0.95, 1e-8, 0.0, 1)
    with pytest.raises(ValueError, match=r"adamw_step: the range \[10, 5\) is not inside"):
        cllm._core.adamw_step(model.layout, model.flat_parameters(), model.flat_gradients(), fresh.exp_avg,
                              fresh.exp_avg_sq, 1e-3, 0.9, 0.95, 1e-8, 0.0, 1, 10, 5)

    # rank r's shard: contiguous, in order, covering the buffer, cut on 16-float boundaries, ~total / R each
    for R in (1, 2, 3, 4, 7):
        ranges = shard_ranges(total, R)
        assert ranges[0][0] == 0 and ranges[-1][1] == total
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert all(lo % 16 == 0 for lo, _ in ranges)
        assert max(hi - lo for lo, hi in ranges) <= total // R + 16
