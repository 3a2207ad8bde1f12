"""Optimizers over the model's flat buffers (the maths is in C++): AdamW, SGD, global-norm clipping; and the
exponential moving average of the weights (EMA).

Every hyperparameter is checked whenever it is set (at construction and by `opt.lr = ...`, a schedule's way):
finite, and in its range. The state buffers (exp_avg, exp_avg_sq, momentum_buffer) are updated in place by the
core, so one that is set must be a C-contiguous, writeable float32 array of the right size: any other (a list, a
strided view, float64) would be copied on each step and its updates lost, and is refused."""
from __future__ import annotations

import contextlib
import math

import numpy as np

from .. import _core
from ..core.checks import check_float, check_int
from ..core.model import Model


def _check_model(model) -> None:
    if not isinstance(model, Model):
        raise TypeError(f"expected a cllm.Model, got {type(model).__name__}")


def _views(model: Model, flat: np.ndarray) -> dict:
    return {t["name"]: flat[t["offset"]:t["offset"] + t["size"]].reshape(t["shape"]) for t in model.tensor_info}


class _Checked:
    """An attribute checked by `check(optimizer, name, value)` each time it is set."""

    def __init__(self, check):
        self.check = check

    def __set_name__(self, owner, name):
        self.name, self.slot = name, "_" + name

    def __get__(self, obj, owner=None):
        return self if obj is None else getattr(obj, self.slot)

    def __set__(self, obj, value):
        setattr(obj, self.slot, self.check(obj, self.name, value))


def _non_negative(opt, name, value) -> float:
    return check_float(name, value, lo=0)


def _positive(opt, name, value) -> float:
    return check_float(name, value, lo=0, lo_open=True)


def _betas(opt, name, value) -> tuple:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
        raise ValueError(f"betas must be two numbers in [0, 1), got {value!r:.60}")
    return tuple(check_float(f"betas[{i}]", b, 0, 1, hi_open=True) for i, b in enumerate(value))


def _state_buffer(opt, name, value) -> np.ndarray:
    """A state buffer the core updates in place: the array itself, never a copy."""
    n = opt._state_size()
    if not isinstance(value, np.ndarray) or value.dtype != np.float32:
        got = f"dtype {value.dtype}" if isinstance(value, np.ndarray) else type(value).__name__
        raise TypeError(f"{name} must be a float32 NumPy array of {n} floats (updated in place), got {got}")
    if value.shape != (n,):
        raise ValueError(f"{name} must be a flat array of {n} floats, got shape {value.shape}")
    if not value.flags.c_contiguous or not value.flags.writeable:
        raise ValueError(f"{name} must be C-contiguous and writeable: the optimizer updates it in place (a strided "
                         f"or read-only array would be copied at each step and its updates lost)")
    others = {"the model's parameters": opt.model.flat_parameters(), "the model's gradients": opt.model.flat_gradients()}
    others.update({slot: getattr(opt, "_" + slot) for slot, d in vars(type(opt)).items()
                   if isinstance(d, _Checked) and d.check is _state_buffer and slot != name and hasattr(opt, "_" + slot)})
    for what, buf in others.items():
        if np.may_share_memory(value, buf):  # (contiguous arrays: exactly when they overlap)
            raise ValueError(f"{name} shares its memory with {what}: the optimizer would overwrite one with the other")
    return value


class AdamW:
    """AdamW (decoupled weight decay on 2-D weights only, bias-corrected moments), PyTorch semantics.

    `shard` (lo, hi): keep the moments of the flat buffer's floats [lo, hi) only and update only those
    parameters (ZeRO stage 1: each rank its own shard; the ranks then all-gather the parameters). The state
    of a sharded AdamW is gathered into one unsharded AdamW (`with_moments`) to be saved; `load_state` takes
    the whole moments and keeps its shard of them."""

    lr, betas, eps, weight_decay = (_Checked(_non_negative), _Checked(_betas), _Checked(_positive),
                                    _Checked(_non_negative))
    exp_avg, exp_avg_sq = _Checked(_state_buffer), _Checked(_state_buffer)

    def __init__(self, model: Model, lr: float = 3e-4, betas=(0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.1, shard=None):
        _check_model(model)
        self.model = model
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        n = model.layout.total
        lo, hi = (0, n) if shard is None else shard
        if isinstance(lo, bool) or isinstance(hi, bool) or not (0 <= int(lo) <= int(hi) <= n):
            raise ValueError(f"shard must be (lo, hi) with 0 <= lo <= hi <= {n} (the parameter buffer), got {shard!r}")
        self.shard = (int(lo), int(hi))
        self.exp_avg = np.zeros(self.shard[1] - self.shard[0], dtype=np.float32)
        self.exp_avg_sq = np.zeros_like(self.exp_avg)
        self.step_count = 0

    @property
    def sharded(self) -> bool:
        return self.shard != (0, self.model.layout.total)

    def _state_size(self) -> int:
        return self.shard[1] - self.shard[0]

    def step(self) -> None:
        m = self.model
        step = self.step_count + 1
        m.exclusive(lambda: _core.adamw_step(m.layout, m.flat_parameters(), m.flat_gradients(), self.exp_avg,
                                             self.exp_avg_sq, self.lr, self.betas[0], self.betas[1], self.eps,
                                             self.weight_decay, step, *self.shard))  # after a running generate
        self.step_count = step

    def state(self) -> dict:
        if self.sharded:
            raise ValueError("a sharded AdamW holds part of the moments: gather them into with_moments() to save")
        return {"step": self.step_count, "exp_avg": _views(self.model, self.exp_avg),
                "exp_avg_sq": _views(self.model, self.exp_avg_sq)}

    def with_moments(self, exp_avg: np.ndarray, exp_avg_sq: np.ndarray) -> "AdamW":
        """An unsharded AdamW like this one (hyperparameters, step) holding these whole flat moments (not copied:
        C-contiguous, writeable float32 arrays of the buffer's size)."""
        whole = AdamW(self.model, self.lr, self.betas, self.eps, self.weight_decay, shard=(0, 0))
        whole.shard = (0, self.model.layout.total)
        whole.exp_avg, whole.exp_avg_sq = exp_avg, exp_avg_sq
        whole.step_count = self.step_count
        return whole

    def hyperparameters(self) -> dict:
        return {"lr": float(self.lr), "betas": list(self.betas), "eps": float(self.eps),
                "weight_decay": float(self.weight_decay)}

    def load_state(self, step: int, exp_avg: dict, exp_avg_sq: dict) -> None:
        lo, hi = self.shard
        for flat, src, name in ((self.exp_avg, exp_avg, "exp_avg"), (self.exp_avg_sq, exp_avg_sq, "exp_avg_sq")):
            whole = flat if not self.sharded else np.zeros(self.model.layout.total, dtype=np.float32)
            _load_flat(self.model, whole, src, f"optimizer state {name}", non_negative=name == "exp_avg_sq")
            if self.sharded:
                flat[...] = whole[lo:hi]
        self.step_count = check_int("optimizer step", step, 0, MAX_STEP, integral_float=True)


MAX_STEP = 2**62  # the core counts steps in int64 (bias corrections: beta ** step)


def _load_flat(model: Model, flat: np.ndarray, src: dict, what: str, non_negative: bool = False) -> None:
    """Copy name -> array into the flat buffer laid out like the model's parameters; every value finite (and >= 0
    for a second moment, whose square root the update takes)."""
    views = _views(model, flat)
    if set(views) != set(src):
        raise ValueError(f"{what} names do not match the model")
    for name, v in views.items():
        a = np.asarray(src[name])
        if a.shape != v.shape:
            raise ValueError(f"{what}.{name}: shape {a.shape} != {v.shape}")
        v[...] = a
        if not np.isfinite(v).all() or (non_negative and (v < 0).any()):
            raise ValueError(f"{what}.{name} holds {'NaN or Inf' if not np.isfinite(v).all() else 'negative values'}")


class SGD:
    """SGD with momentum (optionally Nesterov) and L2 weight decay on 2-D weights, PyTorch semantics."""

    lr, momentum, weight_decay = _Checked(_non_negative), _Checked(_non_negative), _Checked(_non_negative)
    momentum_buffer = _Checked(_state_buffer)

    def __init__(self, model: Model, lr: float = 0.01, momentum: float = 0.0, weight_decay: float = 0.0,
                 nesterov: bool = False):
        _check_model(model)
        self.model = model
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.nesterov = bool(nesterov)
        if self.nesterov and self.momentum <= 0:
            raise ValueError("nesterov momentum requires momentum > 0")
        self.momentum_buffer = np.zeros(model.layout.total, dtype=np.float32)
        self.step_count = 0

    def _state_size(self) -> int:
        return self.model.layout.total

    def step(self) -> None:
        m = self.model
        if self.nesterov and self.momentum <= 0:  # momentum set to 0 since
            raise ValueError("nesterov momentum requires momentum > 0")
        m.exclusive(lambda: _core.sgd_step(m.layout, m.flat_parameters(), m.flat_gradients(), self.momentum_buffer,
                                           self.lr, self.momentum, self.weight_decay, self.nesterov,
                                           self.step_count == 0))  # after a running generate
        self.step_count += 1

    def state(self) -> dict:
        return {"step": self.step_count, "momentum_buffer": _views(self.model, self.momentum_buffer)}

    def hyperparameters(self) -> dict:
        return {"lr": float(self.lr), "momentum": float(self.momentum), "weight_decay": float(self.weight_decay),
                "nesterov": self.nesterov}

    def load_state(self, step: int, momentum_buffer: dict) -> None:
        _load_flat(self.model, self.momentum_buffer, momentum_buffer, "optimizer state momentum_buffer")
        self.step_count = check_int("optimizer step", step, 0, MAX_STEP, integral_float=True)


class EMA:
    """Exponential moving average of a model's weights: after each update, ema += (1 - decay) * (weights - ema),
    in float32 over the flat buffer. `applied()` swaps the averaged weights into the model for a while
    (evaluation, sampling) and restores the trained ones bit for bit."""

    def __init__(self, model: Model, decay: float):
        _check_model(model)
        self.model = model
        self.decay = check_float("ema_decay", decay, 0, 1, lo_open=True, hi_open=True)
        self.shadow = model.flat_parameters().copy()  # starts at the weights
        self._scratch = np.empty_like(self.shadow)

    def update(self) -> None:
        np.subtract(self.model.flat_parameters(), self.shadow, out=self._scratch)
        self._scratch *= np.float32(1.0 - self.decay)
        self.shadow += self._scratch

    def parameters(self) -> dict:
        """name -> view of the averaged weights."""
        return _views(self.model, self.shadow)

    def load(self, params: dict) -> None:
        _load_flat(self.model, self.shadow, params, "EMA weights")

    def restore(self, params) -> bool:
        """Resume the average from a checkpoint's EMA weights (Checkpoint.ema); a checkpoint of a run that had no
        EMA (None) restarts it from the model's weights now. Returns whether there were weights to restore."""
        if params is None:
            np.copyto(self.shadow, self.model.flat_parameters())
            return False
        self.load(params)
        return True

    @contextlib.contextmanager
    def applied(self):
        weights = self.model.flat_parameters()
        self.model.exclusive(lambda: (np.copyto(self._scratch, weights), np.copyto(weights, self.shadow)))
        try:
            yield self.model
        finally:
            self.model.exclusive(lambda: np.copyto(weights, self._scratch))


def grad_norm(model: Model) -> float:
    """Global L2 norm of all gradients."""
    _check_model(model)
    return float(_core.grad_norm(model.flat_gradients()))


def clip_shard_grad_norm(model: Model, max_norm, shard, comm) -> float:
    """clip_grad_norm under ZeRO-1, where a rank holds the averaged gradients of its shard (lo, hi) only: the
    squared norms of the shards are summed over the ranks (comm.allreduce_sum) and each rank scales its own.
    max_norm None or 0: the norm only. Returns the global norm before clipping."""
    part = model.flat_gradients()[shard[0]:shard[1]]
    norm = math.sqrt(comm.allreduce_sum(float(_core.grad_norm(part)) ** 2))
    if max_norm:
        coef = check_float("max_norm", max_norm, lo=0, lo_open=True, finite=False) / (norm + 1e-6)
        if coef < 1.0:
            _core.scale_(part, coef)
    return norm


def clip_grad_norm(model: Model, max_norm: float) -> float:
    """Scale all gradients so their global L2 norm is at most max_norm; returns the norm before clipping."""
    _check_model(model)
    max_norm = check_float("max_norm", max_norm, lo=0, lo_open=True, finite=False)
    norm = float(_core.grad_norm(model.flat_gradients()))
    coef = max_norm / (norm + 1e-6)
    if coef < 1.0:
        _core.scale_(model.flat_gradients(), coef)
    return norm
