"""Averaging the flat gradient buffer across ranks: GradientReducer (buckets exchanged while the backward runs,
fp32 or bf16 on the wire, the tied embedding's rows exchanged compactly), ZeRO-1's shards, and the bf16 conversions.
See docs/distributed.md."""
from __future__ import annotations

import queue
import threading
import time
from typing import TYPE_CHECKING, List, Optional

if TYPE_CHECKING:
    from .mpi import MPICommunicator

import numpy as np

from ..errors import MPISetupError

__all__ = ["GradientReducer", "shard_ranges", "to_bf16", "from_bf16", "GRAD_DTYPES"]

#: how gradients travel between ranks: float32, or bfloat16 (halves the bytes; sums accumulated in float32)
GRAD_DTYPES = ("fp32", "bf16")
#: seconds between two progress polls of the in-flight bucket while the backward runs
POLL_S = 2e-4

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
        from ..core import kernels

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
