"""Shared fixtures and error-measuring helpers for the CLLM tests.

Tests measure errors through the ``errs`` fixture, which records every measured error (printed in a table
at the end of the run, see ``pytest_terminal_summary``) and fails the test listing *all* quantities over
tolerance, not only the first one.

    def test_x(errs):
        errs.maxabs("logits", got, ref, tol=1e-4)      # max |got-ref| / max(1, |ref|)
        errs.normwise("dW", got, ref, tol=1e-4)        # ||got-ref|| / ||ref||
        errs.finish()                                  # raises if anything was over tolerance

Set CLLM_TEST_ERRORS=all to print every measured quantity instead of the worst per test.

The folders are the rungs of the oracle ladder (docs/design.md §7), each trusting the one below: 0_oracle,
1_kernels, 2_model, 3_references (PyTorch, transformers, llama.cpp), 4_workflows, 5_distributed; boundary/ holds
the bad-input, fuzzing and hostile tests beside them. Markers (pyproject.toml): `slow` (the quick loop is
`pytest -m "not slow"`), and `torch`, `mpi`, `amx`, which skip, printing why, where the machine lacks them.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
import zlib
from types import SimpleNamespace

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # so that `import oracle` always works

_RECORDS: list = []  # (nodeid, what, err, tol)


def normwise_rel_err(got, ref) -> float:
    """||got - ref|| / ||ref|| in float64 (absolute when ||ref|| == 0)."""
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape, f"shape {got.shape} != reference shape {ref.shape}"
    num = float(np.linalg.norm((got - ref).ravel()))
    den = float(np.linalg.norm(ref.ravel()))
    return num / den if den > 0 else num


def max_scaled_abs_err(got, ref) -> float:
    """max |got - ref| / max(1, |ref|): absolute for values of order one, relative for large ones."""
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape, f"shape {got.shape} != reference shape {ref.shape}"
    if got.size == 0:
        return 0.0
    return float(np.max(np.abs(got - ref) / np.maximum(1.0, np.abs(ref))))


class ErrorLog:
    def __init__(self, nodeid):
        self.nodeid = nodeid
        self.failures = []
        self.finished = False

    def record(self, what, err, tol):
        err = float(err)
        _RECORDS.append((self.nodeid, what, err, tol))
        if not (err <= tol):  # NaN fails too
            self.failures.append(f"{what}: error {err:.3e} > tol {tol:.1e}")
        return err

    def normwise(self, what, got, ref, tol):
        return self.record(what, normwise_rel_err(got, ref), tol)

    def maxabs(self, what, got, ref, tol):
        return self.record(what, max_scaled_abs_err(got, ref), tol)

    def finish(self):
        self.finished = True
        if self.failures:
            pytest.fail(f"{len(self.failures)} quantities over tolerance:\n  " + "\n  ".join(self.failures),
                        pytrace=False)


@pytest.fixture
def errs(request):
    log = ErrorLog(request.node.nodeid)
    yield log
    if not log.finished and log.failures:  # a test that forgot finish() still must not pass silently
        pytest.fail("unreported failures:\n  " + "\n  ".join(log.failures), pytrace=False)


@pytest.fixture
def rng(request):
    """A NumPy Generator seeded from the test id, so every test is reproducible on its own; the kernel variant is
    left out of the id (each_variant), so that every variant gets the same data."""
    nodeid = request.node.nodeid
    variant = getattr(getattr(request.node, "callspec", None), "params", {}).get("each_variant")
    if variant:
        nodeid = nodeid.replace(f"[{variant}-", "[").replace(f"[{variant}]", "")
    return np.random.default_rng(zlib.crc32(nodeid.encode()))


# ----------------------------------------------------------------------------------------------------
# markers: what a test needs of the machine, and why it is skipped without it
# ----------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _missing(need: str) -> str:
    if need == "torch":
        return "" if importlib.util.find_spec("torch") else "needs torch (CI installs its CPU build: torch==2.13.0)"
    if need == "mpi":
        if importlib.util.find_spec("mpi4py") is None:
            return "needs mpi4py (pip install 'cllm[mpi]')"
        from cllm.parallel.mpi import mpirun_command
        try:
            mpirun_command(2)
        except FileNotFoundError:
            return "needs mpirun or mpiexec (pip install 'cllm[mpi]')"
        return ""
    if need == "amx":
        try:
            flags = open("/proc/cpuinfo").read().split()
        except OSError:
            flags = []
        return "" if "amx_tile" in flags else "needs a CPU with AMX (no amx_tile in /proc/cpuinfo)"
    raise AssertionError(need)


def pytest_runtest_setup(item):
    for need in ("torch", "mpi", "amx"):
        if item.get_closest_marker(need) is not None and _missing(need):
            pytest.skip(_missing(need))


# ----------------------------------------------------------------------------------------------------
# the engine under test
# ----------------------------------------------------------------------------------------------------
def _import_engine():
    """Import cllm; skip (not fail) only when the package is not installed at all."""
    try:
        import cllm
    except ModuleNotFoundError as e:
        if e.name == "cllm":
            pytest.skip("the cllm package is not installed (build it with `pip install -e .`)")
        raise
    return cllm


@pytest.fixture(scope="session")
def cllm():
    return _import_engine()


def _runnable_variants() -> list:
    try:
        import cllm
    except ModuleNotFoundError:
        return ["auto"]
    return cllm.build_info()["variants_supported"] or ["auto"]


@pytest.fixture(params=_runnable_variants())
def each_variant(request):
    """Runs a test once per kernel variant this CPU runs (avx512bf16, avx512, avx2, baseline on an AVX-512 BF16
    machine), then goes back to the automatic choice: `pytest.mark.usefixtures("each_variant")` on the oracle
    tests."""
    from cllm.core.isa import use_variant
    use_variant(request.param)
    yield request.param
    use_variant("auto")


@pytest.fixture(scope="session")
def kernels(cllm):
    from cllm import kernels as k
    return k


def f32(a):
    return np.ascontiguousarray(a, dtype=np.float32)


def snapshot(arrays: dict) -> dict:
    """float64 copies of a dict of arrays (e.g. model.parameters() views)."""
    return {k: np.array(v, dtype=np.float64, copy=True) for k, v in arrays.items()}


def perturb_params(model, rng, ln_scale=0.1, bias_scale=0.05):
    """Add noise, through the views, to LayerNorm/RMSNorm weights, LayerNorm biases and all biases (zero/one at
    initialisation), so that their gradients are non-trivial."""
    for name, p in model.parameters().items():
        if name.endswith(("ln_1.weight", "ln_2.weight", "norm.weight")) or name == "ln_f.weight":
            p += (ln_scale * rng.standard_normal(p.shape)).astype(np.float32)
        elif name.endswith(".bias"):
            p += (bias_scale * rng.standard_normal(p.shape)).astype(np.float32)


@pytest.fixture
def tmpfs(tmp_path):
    """mount(name, options): a fresh tmpfs at tmp_path/name ("size=256k", "ro,size=64k"), unmounted after the test;
    None where mounting is not allowed."""
    import subprocess

    mounted = []

    def mount(name: str, options: str):
        d = tmp_path / name
        d.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(d)], capture_output=True).returncode:
            return None
        mounted.append(d)
        return d

    yield mount
    for d in mounted:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


@pytest.fixture
def tiny_tmpfs(tmpfs):
    """A 256 KiB tmpfs (a disk that fills up for real), or a skip where mounting one is not allowed."""
    d = tmpfs("tmpfs", "size=256k")
    if d is None:
        pytest.skip("cannot mount a tmpfs here")
    return d


@pytest.fixture
def read_only_dir(tmp_path, tmpfs):
    """A directory this process cannot write into, even as root (chmod does not stop root: the immutable attribute
    or a read-only tmpfs, whichever works here)."""
    import shutil
    import subprocess

    d = tmp_path / "ro"
    d.mkdir()
    if os.geteuid() != 0:
        d.chmod(0o500)
        yield d
        d.chmod(0o700)
        return
    if shutil.which("chattr") and subprocess.run(["chattr", "+i", str(d)], capture_output=True).returncode == 0:
        yield d
        subprocess.run(["chattr", "-i", str(d)], capture_output=True)
        return
    ro = tmpfs("ro-tmpfs", "ro,size=64k")
    if ro is None:
        pytest.skip("no way to make a directory read-only for root here")
    yield ro


def add_noise(model, seed: int, scale: float):
    """The model with N(0, scale) noise added to every parameter, in layout order (a non-trivial model to
    generate or evaluate with); returns it."""
    rng = np.random.default_rng(seed)
    for v in model.parameters().values():
        v += rng.normal(0, scale, v.shape).astype(np.float32)
    return model


@pytest.fixture(scope="session")
def helpers():
    """Small shared helpers: helpers.f32, helpers.snapshot, helpers.perturb_params, helpers.add_noise."""
    return SimpleNamespace(f32=f32, snapshot=snapshot, perturb_params=perturb_params, add_noise=add_noise)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _RECORDS:
        return
    tr = terminalreporter
    show_all = os.environ.get("CLLM_TEST_ERRORS", "") == "all"
    tr.write_sep("=", "measured errors" + (" (all)" if show_all else " (worst quantity per test, err/tol)"))
    if show_all:
        for nodeid, what, err, tol in _RECORDS:
            flag = "" if err <= tol else "  <-- OVER"
            tr.write_line(f"{nodeid} | {what}: {err:.3e} (tol {tol:.0e}){flag}")
        return
    worst = {}
    count = {}
    for nodeid, what, err, tol in _RECORDS:
        ratio = err / tol if tol > 0 else float("inf")
        count[nodeid] = count.get(nodeid, 0) + 1
        if nodeid not in worst or not (ratio <= worst[nodeid][0]):
            worst[nodeid] = (ratio, what, err, tol)
    for nodeid, (ratio, what, err, tol) in worst.items():
        flag = "" if err <= tol else "  <-- OVER"
        tr.write_line(f"{nodeid} | {count[nodeid]} checked, worst {what}: {err:.3e} (tol {tol:.0e}){flag}")
