"""Argument checks at the Python boundary: one set of helpers for every public function of the package.

Each helper returns the value in its canonical type (a Python int, float or bool, or a NumPy array) or raises
a TypeError (wrong kind of value) or ValueError (right kind, bad value) whose message names the argument and
shows the value. The rules are the same everywhere:

- an int is a Python or NumPy integer, never a bool; with ``integral_float=True`` a finite float with an
  integral value (``5.0``) is accepted too;
- a number is a Python or NumPy int or float, never a bool or a string; it must be finite unless
  ``finite=False``;
- a flag is a bool (Python or NumPy) or the int 0 or 1;
- an array of real numbers has a bool, int or float dtype (complex, object, string... are refused, never
  cast), and every dimension fits the core's 32-bit ints; a token array has an integer dtype.

``name`` is what the message calls the argument; a caller may put context in it ("kernels.matmul: argument 1",
"train.bin: vocab_size").
"""
from __future__ import annotations

from typing import Optional

import numpy as np

INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1  # the core counts sizes (B*T, dimensions, token ids) in 32-bit ints
UINT64_MAX = 2**64 - 1  # seeds and RNG positions are uint64 in the core

_BOOLS = (bool, np.bool_)
_INTS = (int, np.integer)
_FLOATS = (float, np.floating)


def _range_error(name: str, value, lo, hi, lo_open: bool = False, hi_open: bool = False) -> ValueError:
    if lo is not None and hi is not None:
        return ValueError(f"{name} must be in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}, "
                          f"got {value}")
    if lo is not None:
        if lo == 0:
            return ValueError(f"{name} must be {'positive' if lo_open else 'non-negative'}, got {value}")
        if lo == 1 and not lo_open and isinstance(value, _INTS):
            return ValueError(f"{name} must be positive, got {value}")
        return ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {value}")
    return ValueError(f"{name} must be {'<' if hi_open else 'at most'} {hi}, got {value}")


def check_int(name: str, value, lo: Optional[int] = None, hi: Optional[int] = None, *,
              integral_float: bool = False) -> int:
    """``value`` as a Python int in [lo, hi] (either bound may be None).

    TypeError if it is not an int (a bool is not); with ``integral_float=True`` a float with an integral value
    is taken, any other float is a ValueError."""
    if isinstance(value, _BOOLS) or not isinstance(value, _INTS + (_FLOATS if integral_float else ())):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if isinstance(value, _FLOATS):
        if not (np.isfinite(value) and float(value).is_integer()):
            raise ValueError(f"{name} must be an int, got {value!r}")
    value = int(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise _range_error(name, value, lo, hi)
    return value


def check_float(name: str, value, lo: Optional[float] = None, hi: Optional[float] = None, *,
                lo_open: bool = False, hi_open: bool = False, finite: bool = True) -> float:
    """``value`` as a Python float within the bounds given (closed unless ``lo_open`` / ``hi_open``).

    TypeError if it is not a real number (bools and strings are not); ValueError if it is NaN or infinite
    (unless ``finite=False``; NaN is then still refused by any bound) or out of bounds."""
    if isinstance(value, _BOOLS) or not isinstance(value, _INTS + _FLOATS):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if finite and not np.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if lo is not None and not (value > lo if lo_open else value >= lo):
        raise _range_error(name, value, lo, hi, lo_open, hi_open)
    if hi is not None and not (value < hi if hi_open else value <= hi):
        raise _range_error(name, value, lo, hi, lo_open, hi_open)
    return value


def check_flag(name: str, value) -> bool:
    """``value`` as a bool: True, False (Python or NumPy) or the int 1 or 0; TypeError otherwise."""
    if isinstance(value, _BOOLS) or (isinstance(value, _INTS) and value in (0, 1)):
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {value!r}")


def _check_dims(name: str, arr: np.ndarray) -> np.ndarray:
    if any(d > INT32_MAX for d in arr.shape):
        raise ValueError(f"{name} has shape {arr.shape}; every dimension must be at most {INT32_MAX:,}")
    return arr


def real_array(name: str, value) -> np.ndarray:
    """``value`` as a NumPy array of real numbers (bool, int or float dtype, not converted) whose dimensions
    fit 32-bit ints; TypeError for any other dtype."""
    arr = np.asarray(value)
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"{name} must be an array of real numbers, got dtype {arr.dtype}")
    return _check_dims(name, arr)


def token_array(name: str, value) -> np.ndarray:
    """``value`` as a NumPy array of token ids: an integer dtype (not converted; bool is not an integer dtype)
    and dimensions that fit 32-bit ints. Only the dtype and shape are looked at, not the values."""
    arr = np.asarray(value)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer array of token ids, got dtype {arr.dtype}")
    return _check_dims(name, arr)


def as_int32_tokens(name: str, arr: np.ndarray) -> np.ndarray:
    """A C-contiguous int32 array of the ids in an integer array (the array itself when it is one already);
    ValueError naming the first id out of the int32 range, before anything wraps around. Whether an id is
    below the vocabulary size is the core's check (it reports the row and position)."""
    if arr.dtype == np.int32:
        return np.ascontiguousarray(arr)
    if arr.size:
        lo, hi = arr.min(), arr.max()
        if lo < INT32_MIN or hi > INT32_MAX:
            raise ValueError(f"{name}: token id {lo if lo < INT32_MIN else hi} is out of range (not an int32)")
    return np.ascontiguousarray(arr, dtype=np.int32)
