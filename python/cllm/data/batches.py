"""Batches of a token array for training and evaluation.

:class:`BatchLoader` draws random windows of a token array as ``(x, y)``
int32 batches (``y`` is ``x`` shifted by one token).  All ranks of a
data-parallel job use the same seed and draw the offsets of the *global* batch
from one generator; rank ``r`` keeps rows ``[r*B, (r+1)*B)``.  Hence two ranks
with batch ``B`` see exactly the rows one rank with batch ``2B`` sees.
:func:`eval_batches` gives a fixed, repeatable sequence of batches for validation,
drawn anew on each pass, so that its memory does not grow with their number;
:func:`check_eval_batches` bounds their number by the validation split's size.
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, Tuple

import numpy as np

from ..core.checks import check_int
from .tokenfile import TokenFile

__all__ = ["BatchLoader", "EvalBatches", "check_eval_batches", "eval_batches"]


class BatchLoader:
    """Random ``(x, y)`` windows of a token array, deterministic and shardable.

    Each :meth:`next_batch` draws ``batch_size * world_size`` offsets ``o`` in
    ``[0, len(tokens) - seq_len - 1]`` from one ``np.random.Generator(PCG64(seed))``;
    rank ``r`` keeps offsets ``[r*batch_size, (r+1)*batch_size)`` and returns
    ``x = tokens[o:o+seq_len]``, ``y = tokens[o+1:o+seq_len+1]`` as C-contiguous
    ``int32`` arrays of shape ``[batch_size, seq_len]``.  Only the windows are
    read; a memory-mapped token array is never copied whole.
    """

    def __init__(self, tokens, batch_size: int, seq_len: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        if isinstance(tokens, TokenFile):
            tokens = tokens.tokens
        if not isinstance(tokens, np.ndarray):
            tokens = np.asarray(tokens)
        if tokens.ndim != 1:
            raise ValueError(f"tokens must be a 1-D array, got shape {tokens.shape}")
        if tokens.size and not np.issubdtype(tokens.dtype, np.integer):
            raise TypeError(f"tokens must be integers, got dtype {tokens.dtype}")
        self.batch_size = check_int("batch_size", batch_size, lo=1)
        self.seq_len = check_int("seq_len", seq_len, lo=1)
        self.world_size = check_int("world_size", world_size, lo=1)
        self.rank = check_int("rank", rank, 0, self.world_size - 1)
        n = int(tokens.shape[0])
        if n < self.seq_len + 1:
            raise ValueError(
                f"token split too small for one batch: {n} tokens, but seq_len={self.seq_len} "
                f"needs at least {self.seq_len + 1}"
            )
        self.tokens = tokens
        self.seed = check_int("seed", seed, lo=0)
        self.step = 0
        self._rng = np.random.Generator(np.random.PCG64(self.seed))
        self._window = np.arange(self.seq_len + 1, dtype=np.int64)

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    def next_batch(self) -> Tuple[np.ndarray, np.ndarray]:
        """The next ``(x, y)`` batch for this rank."""
        global_batch = self.batch_size * self.world_size
        offsets = self._rng.integers(0, self.num_tokens - self.seq_len, size=global_batch, dtype=np.int64)
        self.step += 1
        mine = offsets[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        windows = np.array(self.tokens[mine[:, None] + self._window], dtype=np.int32)
        return np.ascontiguousarray(windows[:, :-1]), np.ascontiguousarray(windows[:, 1:])

    def __iter__(self) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
        return self

    def __next__(self) -> Tuple[np.ndarray, np.ndarray]:
        return self.next_batch()

    def state_dict(self) -> Dict[str, Any]:
        """JSON-serialisable state; every rank's state is the same."""
        return {
            "version": 1,
            "seed": self.seed,
            "step": self.step,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "world_size": self.world_size,
            "num_tokens": self.num_tokens,
            "rng": self._rng.bit_generator.state,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore :meth:`state_dict` so the following batches repeat exactly.

        The global batch (``batch_size * world_size``), ``seq_len`` and the
        number of tokens must match; the split across ranks may differ.
        """
        if not isinstance(state, dict):
            raise TypeError(f"loader state must be a dict, got {type(state).__name__}")
        missing = [k for k in ("version", "step", "batch_size", "seq_len", "world_size", "num_tokens", "rng") if k not in state]
        if missing:
            raise ValueError(f"loader state is missing {', '.join(missing)}")
        if state["version"] != 1:
            raise ValueError(f"unsupported loader state version {state['version']!r}")
        mismatches = []
        if state["batch_size"] * state["world_size"] != self.batch_size * self.world_size:
            mismatches.append(
                f"global batch {state['batch_size']}x{state['world_size']} vs {self.batch_size}x{self.world_size}"
            )
        if state["seq_len"] != self.seq_len:
            mismatches.append(f"seq_len {state['seq_len']} vs {self.seq_len}")
        if state["num_tokens"] != self.num_tokens:
            mismatches.append(f"num_tokens {state['num_tokens']} vs {self.num_tokens}")
        if mismatches:
            raise ValueError("loader state does not match this loader: " + "; ".join(mismatches))
        rng_state = state["rng"]
        if not isinstance(rng_state, dict) or rng_state.get("bit_generator") != "PCG64":
            raise ValueError("loader state has no PCG64 generator state")
        step = check_int("loader state step", state["step"], lo=0)
        seed = check_int("loader state seed", state.get("seed", self.seed), lo=0)
        rng = np.random.Generator(np.random.PCG64())
        try:
            rng.bit_generator.state = rng_state
        except (TypeError, ValueError, KeyError, OverflowError) as e:  # OverflowError: a number outside uint64/128
            raise ValueError(f"loader state has an invalid generator state: {e}") from None
        self._rng = rng
        self.step, self.seed = step, seed


class EvalBatches:
    """``num_batches`` fixed ``(x, y)`` batches: a sequence whose every pass yields the same batches, drawn as
    it goes from a fresh :class:`BatchLoader` (one batch in memory at a time)."""

    def __init__(self, tokens, batch_size: int, seq_len: int, num_batches: int, seed: int, rank: int,
                 world_size: int):
        self.num_batches = check_int("num_batches", num_batches, lo=1)
        self._args = (tokens, batch_size, seq_len, seed, rank, world_size)
        self._loader()  # checks the arguments now

    def _loader(self) -> BatchLoader:
        tokens, batch_size, seq_len, seed, rank, world_size = self._args
        return BatchLoader(tokens, batch_size, seq_len, seed=seed, rank=rank, world_size=world_size)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
        loader = self._loader()
        for _ in range(self.num_batches):
            yield loader.next_batch()

    def __getitem__(self, i: int) -> Tuple[np.ndarray, np.ndarray]:
        if not -self.num_batches <= i < self.num_batches:
            raise IndexError(f"batch {i} of {self.num_batches}")
        for j, batch in enumerate(self):
            if j == i % self.num_batches:
                return batch


#: validation batches up to this many (the trainer's default) are allowed on any validation split
ALWAYS_USEFUL_EVAL_BATCHES = 16


def check_eval_batches(tokens: TokenFile, num_batches: int, batch_size: int, seq_len: int, world_size: int = 1,
                       name: str = "eval_batches") -> None:
    """ValueError naming the setting when `num_batches` validation batches of `tokens` are more than can be of
    use: past what draws each window once on average (or ALWAYS_USEFUL_EVAL_BATCHES) they repeat windows, adding
    time and nothing else (a billion never let a run's setup finish)."""
    rows = batch_size * world_size
    windows = len(tokens) - seq_len  # the distinct windows (too few for one: the loader says so)
    limit = max(ALWAYS_USEFUL_EVAL_BATCHES, -(-windows // rows))
    if windows > 0 and num_batches > limit:
        raise ValueError(f"{name} {num_batches:,} is more than {tokens.path} can use: batches of {rows} windows, "
                         f"and its {len(tokens):,} tokens hold {windows:,} windows of {seq_len} tokens; use at "
                         f"most {limit:,}")


def eval_batches(
    tokens,
    batch_size: int,
    seq_len: int,
    num_batches: int,
    seed: int = 1234,
    rank: int = 0,
    world_size: int = 1,
) -> EvalBatches:
    """A fixed sequence of ``num_batches`` ``(x, y)`` batches, the same on every pass (see :class:`EvalBatches`).

    Drawn like :class:`BatchLoader` with its own ``seed`` and sliced by rank
    the same way, so validation losses are comparable across evaluations.
    """
    return EvalBatches(tokens, batch_size, seq_len, num_batches, seed, rank, world_size)
