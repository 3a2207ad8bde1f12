"""The shared boundary helpers: argument checks (cllm.core.checks) and atomic writes (cllm.core.files)."""
import errno
import os

import numpy as np
import pytest

from cllm.core.checks import (INT32_MAX, as_int32_tokens, check_flag, check_float, check_int, real_array,
                         token_array)
from cllm.errors import MissingFileError
from cllm.core.files import atomic_write


def test_check_int():
    assert check_int("n", np.int64(7)) == 7 and type(check_int("n", np.int64(7))) is int
    assert check_int("n", 5.0, integral_float=True) == 5
    for bad, exc, match in ((True, TypeError, "n must be an int, got bool"), (5.0, TypeError, "n must be an int"),
                            ("5", TypeError, "got str"), (0, ValueError, "n must be positive, got 0")):
        with pytest.raises(exc, match=match):
            check_int("n", bad, lo=1)
    with pytest.raises(ValueError, match=r"n must be an int, got 2\.5"):
        check_int("n", 2.5, integral_float=True)
    with pytest.raises(ValueError, match=r"n must be in \[0, 3\], got 4"):
        check_int("n", 4, 0, 3)
    with pytest.raises(ValueError, match="n must be non-negative, got -1"):
        check_int("n", -1, lo=0)


def test_check_float():
    assert check_float("x", np.float32(0.5), 0, 1) == 0.5 and type(check_float("x", 1)) is float
    assert check_float("x", float("inf"), lo=0, finite=False) == float("inf")
    for bad, kw, exc, match in ((True, {}, TypeError, "x must be a number, got bool"),
                                ("1", {}, TypeError, "got str"),
                                (float("nan"), {}, ValueError, "x must be finite"),
                                (float("nan"), dict(lo=0, finite=False), ValueError, "non-negative"),
                                (0.0, dict(lo=0, lo_open=True), ValueError, "x must be positive"),
                                (1.0, dict(lo=0, hi=1, hi_open=True), ValueError, r"x must be in \[0, 1\)")):
        with pytest.raises(exc, match=match):
            check_float("x", bad, **kw)


def test_check_flag_and_arrays():
    assert check_flag("f", np.bool_(True)) is True and check_flag("f", 0) is False
    with pytest.raises(TypeError, match="f must be True or False, got 2"):
        check_flag("f", 2)
    assert real_array("a", [True, False]).dtype == bool  # checked, not converted
    with pytest.raises(TypeError, match="a must be an array of real numbers, got dtype complex"):
        real_array("a", np.zeros(2, complex))
    with pytest.raises(TypeError, match="a must be an integer array of token ids, got dtype float"):
        token_array("a", np.zeros(2))
    with pytest.raises(ValueError, match="every dimension must be at most"):
        token_array("a", np.broadcast_to(np.int8(0), (INT32_MAX + 1,)))
    t = as_int32_tokens("a", np.arange(6, dtype=np.uint64).reshape(2, 3)[:, ::2])
    assert t.dtype == np.int32 and t.flags.c_contiguous and t.tolist() == [[0, 2], [3, 5]]
    with pytest.raises(ValueError, match=r"a: token id 4294967297 is out of range \(not an int32\)"):
        as_int32_tokens("a", np.array([1, 2**32 + 1]))


def test_atomic_writes(tmp_path):
    def write_bytes_atomic(path, chunks):
        def write(f):
            for c in ((chunks,) if isinstance(chunks, bytes) else chunks):
                f.write(c)
        return atomic_write(path, write, what="test file", missing_dir="directory not found")

    p = write_bytes_atomic(tmp_path / "t.json", "héllo\n".encode())
    assert p.read_bytes() == "héllo\n".encode() and (os.stat(p).st_mode & 0o777) == 0o644
    write_bytes_atomic(p, (b"ab", b"cd"))  # chunks, replacing the file
    assert p.read_bytes() == b"abcd"

    def failing():
        yield b"partial"
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError):
        write_bytes_atomic(p, failing())
    assert p.read_bytes() == b"abcd" and sorted(os.listdir(tmp_path)) == ["t.json"]  # old file, no temp left
    with pytest.raises(MissingFileError, match="nodir"):
        write_bytes_atomic(tmp_path / "nodir" / "x.bin", b"")

    def full_disk():
        yield b"partial"
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OSError) as e:
        write_bytes_atomic(p, full_disk())
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(p) and "No space left" in str(e.value)
    assert p.read_bytes() == b"abcd" and sorted(os.listdir(tmp_path)) == ["t.json"]
