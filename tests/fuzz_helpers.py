"""Shared by the fuzz tests (tests/boundary/test_fuzz_readers.py and test_fuzz_api.py): the Hypothesis settings of
the normal and the long run, the check that an exception is a clean one, and odd JSON values.

A clear exception is exactly a ValueError, TypeError, FileNotFoundError (cllm's MissingFileError) or MemoryError
(cllm's InsufficientMemoryError, NumPy's) with a message, naming the file for the file readers. A crash, a hang, or
any other exception type (IndexError, KeyError, OverflowError, RecursionError, struct.error, a UnicodeDecodeError or
JSONDecodeError leaking from inside, a Rust panic, SystemError, ...) fails the test, which prints the input.
"""
from __future__ import annotations

import os
import warnings

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from cllm.errors import InsufficientMemoryError, MissingFileError

LONG = int(os.environ.get("CLLM_FUZZ_EXAMPLES", "0") or 0)


def fuzz(n: int):
    """Hypothesis settings: 3n examples (deterministic) in the normal run, CLLM_FUZZ_EXAMPLES (random) in a long one."""
    return settings(max_examples=LONG or 3 * n, deadline=None, derandomize=not LONG, database=None,
                    suppress_health_check=list(HealthCheck), print_blob=bool(LONG))


# the exception types a malformed input may end in (exact types: subclasses such as UnicodeDecodeError or
# JSONDecodeError are ValueErrors leaking from inside and fail)
CLEAN = (ValueError, TypeError, FileNotFoundError, MissingFileError, MemoryError, InsufficientMemoryError)


def check_clean(e: BaseException, path=None) -> None:
    t = type(e)
    if not (t in CLEAN or isinstance(e, MemoryError)):
        raise AssertionError(f"unexpected exception {t.__module__}.{t.__qualname__}: {e}") from e
    msg = str(e).strip()
    assert msg, f"{t.__name__} without a message"
    if path is not None and not isinstance(e, MissingFileError):
        assert str(path) in msg, f"the message does not name the file {path}: {msg}"


def attempt(fn, *args, path=None, **kwargs):
    """(True, result) or (False, exception) after checking that the exception is a clean one."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return True, fn(*args, **kwargs)
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # a Rust panic is a BaseException: it must not leak either
        check_clean(e, path)
        return False, e


# odd JSON values: wrong types, huge and negative numbers, non-finite floats, deep nesting
ODD_SCALARS = st.sampled_from([None, True, False, 0, 1, -1, 2, 3, 7, 255, 256, 2**31 - 1, 2**31, 2**32 + 1, 2**63,
                               2**64, 10**30, -(2**63), 0.5, -0.0, 1e300, float("inf"), float("nan"), "", "x",
                               "F32", "learned", "byte", "bpe", "1", "é\u0000"])
JSON_VALUES = st.recursive(ODD_SCALARS | st.integers() | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                        max_size=3),
                           max_leaves=6)
