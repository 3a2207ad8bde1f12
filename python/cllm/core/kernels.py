"""Single kernels on float32 NumPy arrays (the C++ core's `_core.kernels`), behind a check of their arguments.

Every function takes and returns what `cllm._core.kernels` does. Before the call, the arguments are checked (with
the helpers of cllm.core.checks) so that bad input ends in a clear TypeError / ValueError / MemoryError instead of a
silent cast or a crash:

- float arrays must hold real numbers (bool, int or float dtypes are converted to float32; complex, object,
  string, ... arrays are refused, never silently cast),
- token arrays (`tokens`, `targets`) must be integer arrays with values in the int32 range,
- every dimension and integer argument must fit the core's 32-bit ints,
- a conversion or an output larger than the memory available is refused before it is made.
"""
from __future__ import annotations

import functools
from typing import Callable, Dict

import numpy as np

from .. import _core
from .checks import INT32_MAX, INT32_MIN, as_int32_tokens, check_flag, check_float, check_int, real_array, token_array
from .system import check_memory

_raw = _core.kernels
_F32, _I32 = np.dtype(np.float32), np.dtype(np.int32)

# argument kinds: f float array, t int32 token array, i int, b bool flag, x float scalar
_SPEC: Dict[str, str] = {
    "sinusoidal_table": "ii",
    "embedding_forward": "tff",
    "embedding_backward": "ftii",
    "layernorm_forward": "fff",
    "layernorm_backward": "fffff",
    "linear_forward": "fff",
    "linear_backward": "fff",
    "matmul": "ffbbb",
    "gelu_forward": "f",
    "gelu_backward": "ff",
    "attention_forward": "fii",
    "attention_backward": "ffffii",
    "rmsnorm_forward": "ffx",
    "rmsnorm_backward": "ffff",
    "rope_forward": "fx",
    "rope_backward": "fx",
    "swiglu_forward": "f",
    "swiglu_backward": "ff",
    "feedforward_forward": "fffff",
    "feedforward_backward": "ffffff",
    "cross_entropy_forward": "ftx",
    "cross_entropy_backward": "ftxx",
}
_KEYWORDS: Dict[str, tuple] = {"matmul": ("a", "b", "trans_a", "trans_b", "bf16")}


def _dim(a, i: int, default: int = 0) -> int:
    shape = getattr(a, "shape", ())
    return int(shape[i]) if -len(shape) <= i < len(shape) else default


def _matmul_out(a, b, trans_a=False, trans_b=False, bf16=False) -> int:
    return _dim(a, 1 if trans_a else 0) * _dim(b, 0 if trans_b else 1)


# floats a kernel allocates (outputs and temporaries) where that can be much more than its inputs
_OUTPUT_FLOATS: Dict[str, Callable[..., int]] = {
    "sinusoidal_table": lambda P, C: P * C,
    "embedding_forward": lambda tok, wte, pos: _dim(tok, 0) * _dim(tok, 1) * _dim(wte, 1),
    "embedding_backward": lambda dout, tok, V, P: (max(V, 0) + max(P, 0)) * _dim(dout, 2),
    # up to 16 rows (ROWS_MAX) also take rows_forward's partial sums: a row of N per 64 rows of w and row of x
    "linear_forward": lambda x, w, b: _dim(x, 0) * _dim(w, 1) * (1 + ((_dim(w, 0) + 63) // 64 if _dim(x, 0) <= 16
                                                                      else 0)),
    "matmul": _matmul_out,
    "feedforward_forward": lambda x, wfc, *r: _dim(x, 0) * (2 * _dim(wfc, 1) + _dim(x, 1)),
    "feedforward_backward": lambda dout, x, wfc, *r: _dim(x, 0) * (3 * _dim(wfc, 1) + 2 * _dim(x, 1)),
}


def _as_float32(name: str, arr: np.ndarray) -> np.ndarray:
    return arr if arr.dtype == _F32 and arr.flags.c_contiguous else np.asarray(arr, dtype=np.float32, order="C")


# argument kind -> (check, conversion just before the call); `name` is "kernels.<function>: <argument>"
_CHECK = {
    "f": real_array,
    "t": token_array,
    "i": lambda name, v: check_int(name, v, INT32_MIN, INT32_MAX),
    "b": check_flag,
    "x": lambda name, v: check_float(name, v, finite=False),
}
_CONVERT = {"f": _as_float32, "t": as_int32_tokens}


def _wrap(fname: str, spec: str) -> Callable:
    raw = getattr(_raw, fname)
    names = _KEYWORDS.get(fname, ())

    @functools.wraps(raw)
    def kernel(*args, **kwargs):
        unknown = [k for k in kwargs if k not in names]
        if unknown or len(args) > len(spec):
            # let the core produce its own "incompatible function arguments" TypeError
            return raw(*args, **kwargs)
        kinds = dict(zip(names, spec))
        args = [_CHECK[kind](f"kernels.{fname}: argument {i + 1}", a) for i, (kind, a) in enumerate(zip(spec, args))]
        for k, v in kwargs.items():
            kwargs[k] = _CHECK[kinds[k]](f"kernels.{fname}: {k}", v)
        # memory for the float32/int32 copies and the outputs, checked before any of them is made
        arrays = [a for a in list(args) + list(kwargs.values()) if isinstance(a, np.ndarray)]
        copies = sum(a.size for a in arrays if not ((a.dtype == _F32 or a.dtype == _I32) and a.flags.c_contiguous))
        try:
            out = _OUTPUT_FLOATS[fname](*args, **kwargs) if fname in _OUTPUT_FLOATS else sum(a.size for a in arrays)
        except TypeError:  # missing arguments: the core reports them
            out = 0
        if copies + max(out, 0) > 0:
            check_memory(4 * (copies + max(out, 0)), f"kernels.{fname} ({copies + max(out, 0):,} floats of "
                                                     f"conversions and outputs)")
        args = [_CONVERT[k](f"kernels.{fname}: argument {i + 1}", a) if k in _CONVERT else a
                for i, (k, a) in enumerate(zip(spec, args))]
        kwargs = {k: _CONVERT[kinds[k]](f"kernels.{fname}: {k}", v) if kinds[k] in _CONVERT else v
                  for k, v in kwargs.items()}
        return raw(*args, **kwargs)

    kernel.__doc__ = raw.__doc__
    return kernel


for _name, _spec in _SPEC.items():
    globals()[_name] = _wrap(_name, _spec)

__all__ = list(_SPEC)
