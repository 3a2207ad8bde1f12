"""NumPy float64 reference optimizers for CLLM (part of the test oracle).

torch.optim.AdamW, torch.optim.SGD and torch.nn.utils.clip_grad_norm_ restated on dicts of float64 arrays
(PyTorch semantics), updated in place; the model itself is in oracle.py and oracle_model.py.
"""

from __future__ import annotations

import math

import numpy as np

from oracle import _f64


# ----------------------------------------------------------------------------------------------------
# reference optimizers (PyTorch semantics) on dicts of float64 arrays, updated in place
# ----------------------------------------------------------------------------------------------------
def decays(p) -> bool:
    """Weight decay applies to 2-D tensors (matrices and embeddings) only."""
    return np.ndim(p) >= 2


def adamw_step(params, grads, m, v, step, lr, betas, eps, weight_decay):
    """One torch.optim.AdamW step (step is 1-based). ``m``/``v`` are dicts, missing entries start at 0."""
    b1, b2 = betas
    bc1 = 1.0 - b1 ** step
    bc2 = 1.0 - b2 ** step
    for name, p in params.items():
        g = _f64(grads[name])
        if name not in m:
            m[name] = np.zeros_like(p, dtype=np.float64)
            v[name] = np.zeros_like(p, dtype=np.float64)
        if weight_decay != 0.0 and decays(p):
            p *= 1.0 - lr * weight_decay
        m[name] = b1 * m[name] + (1.0 - b1) * g
        v[name] = b2 * v[name] + (1.0 - b2) * g * g
        mhat = m[name] / bc1
        vhat = v[name] / bc2
        p -= lr * mhat / (np.sqrt(vhat) + eps)
    return params, m, v


def sgd_step(params, grads, buf, lr, momentum, weight_decay, nesterov=False):
    """One torch.optim.SGD step (dampening 0). ``buf`` is a dict; a missing entry means first step."""
    for name, p in params.items():
        g = _f64(grads[name]).copy()
        if weight_decay != 0.0 and decays(p):
            g += weight_decay * p
        if momentum != 0.0:
            if name not in buf:
                buf[name] = g.copy()
            else:
                buf[name] = momentum * buf[name] + g
            g = g + momentum * buf[name] if nesterov else buf[name]
        p -= lr * g
    return params, buf


def clip_grad_norm(grads, max_norm) -> float:
    """torch.nn.utils.clip_grad_norm_: global L2 norm; scale all grads in place when it exceeds max_norm."""
    total = math.sqrt(sum(float(np.sum(_f64(g) ** 2)) for g in grads.values()))
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        for g in grads.values():
            g *= coef
    return total
