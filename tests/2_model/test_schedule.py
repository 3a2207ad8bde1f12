"""The learning-rate schedule: warmup, cosine / linear decay endpoints and midpoints, constant, validation."""
import math

import pytest

from cllm.train.schedule import lr_at

S = dict(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_warmup_is_linear_from_lr_over_warmup_to_lr(kind):
    assert lr_at(0, **S, kind=kind) == pytest.approx(0.1)
    assert lr_at(4, **S, kind=kind) == pytest.approx(0.5)
    assert lr_at(9, **S, kind=kind) == pytest.approx(1.0)
    ramp = [lr_at(s, **S, kind=kind) for s in range(10)]
    assert all(b > a for a, b in zip(ramp, ramp[1:]))


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_decay_endpoints_and_midpoint(kind):
    assert lr_at(10, **S, kind=kind) == pytest.approx(1.0)      # decay starts at lr
    assert lr_at(60, **S, kind=kind) == pytest.approx(0.55)     # halfway: the mean of lr and min_lr
    assert lr_at(110, **S, kind=kind) == pytest.approx(0.1)     # reaches min_lr at max_steps
    assert lr_at(1000, **S, kind=kind) == pytest.approx(0.1)    # and stays there
    decay = [lr_at(s, **S, kind=kind) for s in range(10, 111)]
    assert all(b < a for a, b in zip(decay, decay[1:]))


def test_cosine_and_linear_quarter_points():
    assert lr_at(35, **S, kind="linear") == pytest.approx(0.1 + 0.9 * 0.75)
    assert lr_at(35, **S, kind="cosine") == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_at(85, **S, kind="cosine") == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(3 * math.pi / 4)))


def test_constant_after_warmup():
    for step in (10, 50, 109, 110, 10_000):
        assert lr_at(step, **S, kind="constant") == 1.0


def test_no_warmup_and_warmup_equal_to_horizon():
    assert lr_at(0, lr=2.0, min_lr=0.0, warmup_steps=0, max_steps=4, kind="cosine") == 2.0
    assert lr_at(4, lr=2.0, min_lr=0.0, warmup_steps=0, max_steps=4, kind="linear") == 0.0
    # all warmup, no decay phase: lr at the end of warmup, min_lr afterwards
    assert lr_at(4, lr=2.0, min_lr=0.5, warmup_steps=5, max_steps=5, kind="cosine") == pytest.approx(2.0)
    assert lr_at(5, lr=2.0, min_lr=0.5, warmup_steps=5, max_steps=5, kind="cosine") == pytest.approx(0.5)


@pytest.mark.parametrize("kwargs, exc, words", [
    (dict(kind="exponential"), ValueError, "schedule must be one of"),
    (dict(min_lr=2.0), ValueError, "min_lr"),
    (dict(lr=-1.0, min_lr=0.0), ValueError, "lr must be"),
    (dict(lr=float("nan")), ValueError, "lr must be"),
    (dict(warmup_steps=200), ValueError, "warmup_steps"),
    (dict(warmup_steps=-1), ValueError, "warmup_steps"),
    (dict(max_steps=0), ValueError, "max_steps"),
    (dict(max_steps=10.5), TypeError, "max_steps"),
    (dict(step=-1), ValueError, "step"),
    (dict(step=True), TypeError, "step"),
])
def test_invalid_arguments(kwargs, exc, words):
    args = dict(S, kind="cosine", step=0)
    args.update(kwargs)
    step = args.pop("step")
    with pytest.raises(exc, match=words):
        lr_at(step, **args)
