"""Learning-rate schedules: linear warmup, then cosine / linear decay to min_lr (or constant).

The learning rate depends on the step number only, so a resumed run follows the same schedule.

    lr_at(step, lr=1e-3, min_lr=1e-4, warmup_steps=100, max_steps=1000, kind="cosine")

* warmup (step < warmup_steps): lr * (step + 1) / warmup_steps, rising from lr / warmup_steps at step 0
  to lr at step warmup_steps - 1;
* decay (warmup_steps <= step <= max_steps): ratio = (step - warmup_steps) / (max_steps - warmup_steps)
  goes from 0 to 1 and the rate from lr to min_lr, along half a cosine ("cosine") or a straight line
  ("linear"); "constant" stays at lr;
* after max_steps: min_lr ("cosine", "linear") or lr ("constant").
"""
from __future__ import annotations

import math
import numbers

SCHEDULES = ("cosine", "linear", "constant")


def _check_number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite non-negative number, got {value}")
    return value


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_schedule(*, lr, min_lr, warmup_steps, max_steps, kind) -> None:
    """Raise ValueError / TypeError if the schedule's arguments are inconsistent."""
    lr = _check_number("lr", lr)
    min_lr = _check_number("min_lr", min_lr)
    warmup_steps = _check_int("warmup_steps", warmup_steps, 0)
    max_steps = _check_int("max_steps", max_steps, 1)
    if kind not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {kind!r}")
    if min_lr > lr:
        raise ValueError(f"min_lr ({min_lr}) must not exceed lr ({lr})")
    if warmup_steps > max_steps:
        raise ValueError(f"warmup_steps ({warmup_steps}) must not exceed max_steps ({max_steps})")


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, max_steps: int,
          kind: str = "cosine") -> float:
    """The learning rate for (0-based) optimizer step `step`."""
    check_schedule(lr=lr, min_lr=min_lr, warmup_steps=warmup_steps, max_steps=max_steps, kind=kind)
    step = _check_int("step", step, 0)
    lr, min_lr = float(lr), float(min_lr)
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if kind == "constant":
        return lr
    if step >= max_steps:
        return min_lr
    ratio = (step - warmup_steps) / (max_steps - warmup_steps)  # in [0, 1); max_steps > warmup_steps here
    if kind == "cosine":
        coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))
    else:  # linear
        coeff = 1.0 - ratio
    return min_lr + coeff * (lr - min_lr)


__all__ = ["lr_at", "check_schedule", "SCHEDULES"]
