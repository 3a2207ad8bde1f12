"""OMP_NUM_THREADS given absurd values (issue 33 item 1): libgomp reads it once, as the core loads, and keeps an
unsigned long that omp_get_max_threads() cuts to an int (2**32 read as 0 threads: a segfault; 2**31 as a negative
count: an abort). cllm rewrites it before the core loads (cllm/_omp_env.py): counts lowered to MAX_THREADS, a
value that is no count removed, each with a warning naming it; the commands then run."""
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import cllm
from cllm._omp_env import MAX_THREADS, bound_omp_num_threads
from cllm.data.tokenizer import ByteTokenizer

CFG = cllm.ModelConfig(vocab_size=256, max_seq_len=16, embedding_dim=32, num_layers=1, num_heads=4, ff_dim=64)
PYTHONPATH = str(Path(cllm.__file__).parent.parent)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("threads") / "m.safetensors"
    cllm.save_checkpoint(path, cllm.Model(CFG, seed=1), None, ByteTokenizer())
    (path.parent / "t.txt").write_text("hello world, some text to score\n")
    return path


def _run(args, value, code=None):
    env = dict(os.environ, PYTHONPATH=PYTHONPATH, OMP_NUM_THREADS=value, OMP_WAIT_POLICY="passive")
    cmd = [sys.executable, "-c", code] if code else [sys.executable, "-m", "cllm", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.parametrize("value, env_after, warns", [
    ("4294967296", str(MAX_THREADS), True), ("2147483648", str(MAX_THREADS), True), ("99999", str(MAX_THREADS), True),
    ("9" * 5000, str(MAX_THREADS), True), ("2,99999999999", f"2,{MAX_THREADS}", True), (" 3 , 2 ", "3,2", False),
    ("0004", "4", False), ("4", "4", False),
    ("-1", None, True), ("0", None, True), ("abc", None, True), ("4,,2", None, True), ("4,0", None, True),
    ("\u0663", None, True), ("", None, False), ("  ", None, False),
])
def test_omp_num_threads_is_bounded_or_removed_with_a_warning(value, env_after, warns):
    environ = {"OMP_NUM_THREADS": value}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bound_omp_num_threads(environ)
    assert environ.get("OMP_NUM_THREADS") == env_after
    assert len(caught) == warns, [str(w.message) for w in caught]
    if warns:
        assert caught[0].category is RuntimeWarning and f"OMP_NUM_THREADS={value[:20]!r}"[:30] in str(caught[0].message)


@pytest.mark.slow
@pytest.mark.parametrize("value", ["4294967296", "2147483648", "-1", "abc", "4,2", "2,99999999999"])
def test_sample_runs_whatever_omp_num_threads_says(checkpoint, value):
    r = _run(["sample", "--checkpoint", checkpoint, "--max-new-tokens", 3], value)
    assert r.returncode == 0, (r.returncode, r.stderr[-500:])
    assert "Traceback" not in r.stderr and "libgomp" not in r.stderr
    if value not in ("4,2",):
        assert "OMP_NUM_THREADS" in r.stderr and value in r.stderr, r.stderr


@pytest.mark.slow
def test_eval_runs_with_omp_num_threads_of_2_to_the_32(checkpoint):
    r = _run(["eval", checkpoint, "--data", checkpoint.parent / "t.txt", "--json", "--no-progress"], "4294967296")
    assert r.returncode == 0 and '"loss"' in r.stdout, (r.returncode, r.stderr[-500:])


@pytest.mark.slow
def test_a_libgomp_loaded_before_cllm_is_bounded_after_the_load():
    """Another library loaded libgomp first (it read 2**32): the count it reads (0) is set again after the load."""
    code = ("import ctypes; ctypes.CDLL('libgomp.so.1', mode=ctypes.RTLD_GLOBAL)\n"
            "import numpy as np, cllm\n"
            "m = cllm.Model(cllm.ModelConfig(vocab_size=16, max_seq_len=8, num_layers=1, num_heads=1, "
            "embedding_dim=16))\n"
            "print(cllm.get_num_threads(), len(m.generate([1, 2], 3)))")
    r = _run([], "4294967296", code)
    assert r.returncode == 0 and r.stdout.split() == [str(MAX_THREADS), "3"], (r.returncode, r.stderr[-500:])
    assert "thread count reads 0" in r.stderr
