"""AdamW and SGD given hostile state and hyperparameters (issue 33 items 2 and 3): a state buffer the core would
update in a temporary copy (a list, a strided or float64 array) is refused, never silently left unchanged; a
hyperparameter that is not finite or out of range is refused at construction and when set (`opt.lr = ...`)."""
import numpy as np
import pytest

import cllm

CFG = cllm.ModelConfig(vocab_size=32, max_seq_len=8, embedding_dim=16, num_layers=1, num_heads=2, ff_dim=32)


@pytest.fixture()
def model():
    m = cllm.Model(CFG, seed=0)
    x = np.array([[1, 2, 3, 4]])
    m.forward_backward(x, x)
    return m


def _bad_buffers(n):
    big = np.zeros(2 * n, dtype=np.float32)
    frozen = np.zeros(n, dtype=np.float32)
    frozen.flags.writeable = False
    return {"strided": big[::2], "reversed": np.zeros(n, np.float32)[::-1], "list": [0.0] * n,
            "float64": np.zeros(n), "short": np.zeros(n - 1, np.float32), "2-D": np.zeros((1, n), np.float32),
            "read-only": frozen}


@pytest.mark.parametrize("kind", ["strided", "reversed", "list", "float64", "short", "2-D", "read-only"])
def test_adamw_moments_that_would_be_copied_are_refused(model, kind):
    n = model.layout.total
    opt = cllm.AdamW(model)
    bad = _bad_buffers(n)[kind]
    with pytest.raises((TypeError, ValueError), match="exp_avg"):
        opt.with_moments(bad, np.zeros(n, np.float32))
    with pytest.raises((TypeError, ValueError), match="exp_avg_sq"):
        opt.with_moments(np.zeros(n, np.float32), bad)
    with pytest.raises((TypeError, ValueError), match="exp_avg"):
        opt.exp_avg = bad
    sgd = cllm.SGD(model, momentum=0.9)
    with pytest.raises((TypeError, ValueError), match="momentum_buffer"):
        sgd.momentum_buffer = bad


def test_moments_given_are_the_ones_updated(model):
    n = model.layout.total
    m, v = np.zeros(n, np.float32), np.zeros(n, np.float32)
    cllm.AdamW(model).with_moments(m, v).step()
    assert np.abs(m).max() > 0 and np.abs(v).max() > 0
    sgd = cllm.SGD(model, momentum=0.9)
    buf = np.zeros(n, np.float32)
    sgd.momentum_buffer = buf
    sgd.step()
    assert np.abs(buf).max() > 0


def test_the_core_refuses_a_buffer_it_would_copy(model):
    """The binding takes in-place buffers as they are (noconvert): a strided one is a TypeError, not a lost copy."""
    n = model.layout.total
    with pytest.raises(TypeError):
        cllm._core.adamw_step(model.layout, model.flat_parameters(), model.flat_gradients(),
                              np.zeros(2 * n, np.float32)[::2], np.zeros(n, np.float32), 1e-3, 0.9, 0.95, 1e-8, 0.0, 1)
    with pytest.raises(TypeError):
        cllm._core.sgd_step(model.layout, model.flat_parameters(), model.flat_gradients(), [0.0] * n, 1e-3, 0.9, 0.0,
                            False, True)


INF, NAN = float("inf"), float("nan")


@pytest.mark.parametrize("opt, name, value", [
    ("adamw", "lr", INF), ("adamw", "lr", NAN), ("adamw", "lr", -1e-3), ("adamw", "eps", INF), ("adamw", "eps", 0.0),
    ("adamw", "weight_decay", INF), ("adamw", "weight_decay", -0.1), ("adamw", "betas", (0.9, INF)),
    ("adamw", "betas", (NAN, 0.9)), ("adamw", "betas", (0.9, 1.0)), ("adamw", "betas", "ab"),
    ("sgd", "lr", INF), ("sgd", "momentum", INF), ("sgd", "momentum", NAN), ("sgd", "momentum", -0.5),
    ("sgd", "weight_decay", INF), ("sgd", "weight_decay", -0.1),
])
def test_hyperparameters_not_finite_or_out_of_range_are_refused(model, opt, name, value):
    make = cllm.AdamW if opt == "adamw" else cllm.SGD
    with pytest.raises(ValueError, match=name):
        make(model, **{name: value})
    o = make(model)
    before = getattr(o, name)
    with pytest.raises(ValueError, match=name):
        setattr(o, name, value)  # a schedule's `opt.lr = ...`
    assert getattr(o, name) == before
    o.step()
    assert np.isfinite(model.flat_parameters()).all()


def test_hyperparameters_set_in_range_are_used(model):
    opt = cllm.AdamW(model, lr=1e-3)
    opt.lr = np.float32(2e-3)
    assert opt.lr == pytest.approx(2e-3) and type(opt.lr) is float
    assert opt.hyperparameters()["lr"] == pytest.approx(2e-3)
    with pytest.raises(TypeError, match="lr"):
        opt.lr = "0.1"


@pytest.mark.parametrize("alias", ["other-moment", "parameters", "gradients"])
def test_moments_sharing_memory_with_another_buffer_are_refused(model, alias):
    """A moment that is the other moment, the weights or the gradients would be overwritten by the update (the
    weights given as exp_avg were wrecked in one step)."""
    opt = cllm.AdamW(model, lr=1e-3)
    other = {"other-moment": opt.exp_avg_sq, "parameters": model.flat_parameters(),
             "gradients": model.flat_gradients()}[alias]
    with pytest.raises(ValueError, match="exp_avg shares its memory with"):
        opt.exp_avg = other
    with pytest.raises(ValueError, match="shares its memory"):
        opt.with_moments(opt.exp_avg, opt.exp_avg)
    with pytest.raises(ValueError, match="momentum_buffer shares its memory with"):
        cllm.SGD(model, lr=1e-3).momentum_buffer = model.flat_parameters()


def test_loaded_moments_must_be_finite_and_the_step_bounded(model):
    """load_state of NaN moments, a negative second moment or a step past the core's int64 count is one clear
    error (NaN moments were taken silently; a step of 2**70 failed later inside the core's call)."""
    opt = cllm.AdamW(model, lr=1e-3)
    state = opt.state()
    good = {k: np.zeros_like(v) for k, v in state["exp_avg"].items()}
    nan = {k: np.full_like(v, np.nan) for k, v in good.items()}
    negative = {k: np.full_like(v, -1.0) for k, v in good.items()}
    with pytest.raises(ValueError, match="exp_avg.* holds NaN or Inf"):
        opt.load_state(1, nan, good)
    with pytest.raises(ValueError, match="exp_avg_sq.* holds negative values"):
        opt.load_state(1, good, negative)
    with pytest.raises(ValueError, match="optimizer step"):
        opt.load_state(2**70, good, good)
    with pytest.raises(ValueError, match="momentum_buffer.* holds NaN or Inf"):
        cllm.SGD(model, lr=1e-3).load_state(1, nan)
    opt.load_state(5, good, good)
    opt.step()
    assert opt.step_count == 6
