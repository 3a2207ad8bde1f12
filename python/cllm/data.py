"""Corpus reading, token files and batch loading for CLLM.

Token file format (``.bin``)
----------------------------
A token file is a 64-byte little-endian header followed by the tokens::

    offset  size  field
    ------  ----  ---------------------------------------------------------
         0     8  magic            b"CLLMTOK\\0"
         8     4  version          uint32, currently 1
        12     4  bytes_per_token  uint32: 2 (uint16 tokens) or 4 (uint32 tokens)
        16     4  vocab_size       uint32, every token is < vocab_size
        20     4  reserved         zero
        24     8  num_tokens       uint64
        32    32  reserved         zeros
        64     .  tokens           num_tokens little-endian unsigned integers

Writers use 2 bytes per token when ``vocab_size <= 65536`` and 4 otherwise.
The file size must be exactly ``64 + num_tokens * bytes_per_token``.
:func:`load_tokens` memory-maps the tokens read-only and validates the header,
the size and (in chunks) that every token is below ``vocab_size``.

Corpus and preparation
----------------------
:func:`read_corpus` reads UTF-8 text files and directories,
:func:`default_corpus_files` lists the Python standard library's ``.py`` files
(the built-in corpus used when no data is given), and :func:`prepare`
tokenizes a corpus into ``train.bin``, ``val.bin`` and ``tokenizer.json``.

Batches
-------
:class:`BatchLoader` draws random windows of a token array as ``(x, y)``
int32 batches (``y`` is ``x`` shifted by one token).  All ranks of a
data-parallel job use the same seed and draw the offsets of the *global* batch
from one generator; rank ``r`` keeps rows ``[r*B, (r+1)*B)``.  Hence two ranks
with batch ``B`` see exactly the rows one rank with batch ``2B`` sees.
:func:`eval_batches` gives a fixed, repeatable list of batches for validation.
"""

from __future__ import annotations

import os
import struct
import sysconfig
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from .tokenizer import BPETokenizer, ByteTokenizer, MissingFileError, Tokenizer

__all__ = [
    "MAGIC",
    "FORMAT_VERSION",
    "HEADER_SIZE",
    "TokenFile",
    "write_tokens",
    "load_tokens",
    "default_corpus_files",
    "read_corpus",
    "prepare",
    "BatchLoader",
    "eval_batches",
    "MissingFileError",
]

PathLike = Union[str, "os.PathLike[str]"]

MAGIC = b"CLLMTOK\0"
FORMAT_VERSION = 1
HEADER_SIZE = 64
#: magic, version, bytes_per_token, vocab_size, reserved u32, num_tokens, 32 reserved bytes
_HEADER = struct.Struct("<8sIIIIQ32x")
assert _HEADER.size == HEADER_SIZE
#: offset of the uint64 num_tokens field in the header
NUM_TOKENS_OFFSET = 24

_CHUNK_TOKENS = 1 << 22  # tokens per chunk when writing / range-checking
_DOC_SEPARATOR = "\n\n"  # text placed between documents in a split
_SKIP_DIRS = {"__pycache__", "site-packages", "dist-packages"}


# ----------------------------------------------------------------------------
# Token files
# ----------------------------------------------------------------------------


def _dtype_for(bytes_per_token: int) -> np.dtype:
    return np.dtype("<u2") if bytes_per_token == 2 else np.dtype("<u4")


class TokenFile:
    """A loaded token file: ``tokens`` is a read-only ``np.memmap``."""

    def __init__(self, path: Path, tokens: np.ndarray, vocab_size: int, bytes_per_token: int, version: int):
        self.path = path
        self.tokens = tokens
        self.vocab_size = vocab_size
        self.bytes_per_token = bytes_per_token
        self.version = version

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def __repr__(self) -> str:
        return (
            f"TokenFile({str(self.path)!r}, num_tokens={len(self)}, "
            f"vocab_size={self.vocab_size}, bytes_per_token={self.bytes_per_token})"
        )


def write_tokens(path: PathLike, tokens, vocab_size: int) -> Path:
    """Write ``tokens`` (1-D, integers in ``[0, vocab_size)``) as a token file.

    The file is written to a temporary file in the same directory and moved
    into place with :func:`os.replace`, so readers never see a partial file.
    Returns the path.
    """
    path = Path(path)
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)):
        raise TypeError(f"{path}: vocab_size must be an int, got {type(vocab_size).__name__}")
    vocab_size = int(vocab_size)
    if not 1 <= vocab_size <= 0xFFFFFFFF:
        raise ValueError(f"{path}: vocab_size must be in [1, 2**32 - 1], got {vocab_size}")
    arr = tokens if isinstance(tokens, np.ndarray) else np.asarray(tokens)
    if arr.size == 0:
        arr = np.zeros(0, dtype=np.int64)
    if arr.ndim != 1:
        raise ValueError(f"{path}: tokens must be a 1-D array, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{path}: tokens must be integers, got dtype {arr.dtype}")
    bytes_per_token = 2 if vocab_size <= 65536 else 4
    dtype = _dtype_for(bytes_per_token)
    n = int(arr.shape[0])

    # Validate everything before creating any file.
    for start in range(0, n, _CHUNK_TOKENS):
        chunk = arr[start : start + _CHUNK_TOKENS]
        lo, hi = int(chunk.min()), int(chunk.max())
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{path}: token value {bad} is out of range for vocab_size {vocab_size}")

    header = _HEADER.pack(MAGIC, FORMAT_VERSION, bytes_per_token, vocab_size, 0, n)
    directory = path.parent
    if not directory.is_dir():
        raise MissingFileError(2, "directory for the token file not found", str(directory))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(header)
            for start in range(0, n, _CHUNK_TOKENS):
                f.write(arr[start : start + _CHUNK_TOKENS].astype(dtype).tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def load_tokens(path: PathLike, *, check_range: bool = True) -> TokenFile:
    """Open a token file written by :func:`write_tokens`.

    Raises :class:`MissingFileError` (a ``FileNotFoundError`` and a
    ``ValueError``) when the file does not exist and :class:`ValueError`
    naming the file and the problem when it is not a valid token file.
    ``check_range=False`` skips the full scan that checks every token is
    below ``vocab_size``.
    """
    path = Path(path)
    if not path.is_file():
        if path.exists():
            raise ValueError(f"{path}: not a regular file")
        raise MissingFileError(2, "token file not found", str(path))
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(HEADER_SIZE)
    if len(head) < len(MAGIC) or head[: len(MAGIC)] != MAGIC:
        raise ValueError(f"{path}: not a CLLM token file (bad magic {head[:8]!r}, expected {MAGIC!r})")
    if len(head) < HEADER_SIZE:
        raise ValueError(f"{path}: truncated token file ({size} bytes, header alone is {HEADER_SIZE})")
    _, version, bytes_per_token, vocab_size, _, n = _HEADER.unpack(head)
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{path}: unsupported token file version {version} (this CLLM reads version {FORMAT_VERSION})"
        )
    if bytes_per_token not in (2, 4):
        raise ValueError(f"{path}: invalid bytes_per_token {bytes_per_token} in header (expected 2 or 4)")
    if vocab_size == 0:
        raise ValueError(f"{path}: invalid vocab_size 0 in header")
    if bytes_per_token == 2 and vocab_size > 65536:
        raise ValueError(f"{path}: vocab_size {vocab_size} does not fit 2-byte tokens")
    expected = HEADER_SIZE + n * bytes_per_token
    if size != expected:
        what = "truncated" if size < expected else "has trailing data"
        raise ValueError(
            f"{path}: size mismatch, file {what}: header says {n} tokens of {bytes_per_token} bytes "
            f"({expected} bytes in all) but the file has {size} bytes"
        )
    dtype = _dtype_for(bytes_per_token)
    if n == 0:
        tokens = np.zeros(0, dtype=dtype)
        tokens.flags.writeable = False
    else:
        tokens = np.memmap(path, dtype=dtype, mode="r", offset=HEADER_SIZE, shape=(n,))
    if check_range and vocab_size < (1 << (8 * bytes_per_token)):
        for start in range(0, n, _CHUNK_TOKENS):
            chunk = np.asarray(tokens[start : start + _CHUNK_TOKENS])
            if int(chunk.max()) >= vocab_size:
                i = int(np.argmax(chunk >= vocab_size))
                raise ValueError(
                    f"{path}: token {int(chunk[i])} at index {start + i} is >= vocab_size {vocab_size}"
                )
    return TokenFile(path, tokens, int(vocab_size), int(bytes_per_token), int(version))


# ----------------------------------------------------------------------------
# Corpus
# ----------------------------------------------------------------------------


def default_corpus_files() -> List[Path]:
    """The ``.py`` files of the running interpreter's standard library, sorted.

    Third-party packages (``site-packages`` / ``dist-packages``) and
    ``__pycache__`` are excluded.  The list is deterministic for a given
    Python installation.
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    if not stdlib.is_dir():
        raise MissingFileError(2, "standard library directory not found", str(stdlib))
    files: List[Path] = []
    for root, dirs, names in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
        files.extend(Path(root, name) for name in names if name.endswith(".py"))
    files.sort(key=lambda p: p.relative_to(stdlib).as_posix())
    if not files:
        raise ValueError(f"no .py files found in the standard library directory {stdlib}")
    return files


def _as_path_list(paths) -> List[Path]:
    if isinstance(paths, (str, os.PathLike)):
        return [Path(paths)]
    if paths is None:
        raise TypeError("paths must be a path or an iterable of paths, got None")
    out = []
    for p in paths:
        if not isinstance(p, (str, os.PathLike)):
            raise TypeError(f"corpus paths must be str or os.PathLike, got {type(p).__name__}")
        out.append(Path(p))
    return out


def _expand(paths) -> List[Path]:
    """Files named by ``paths``: files as given, directories walked (sorted).

    Hidden files and directories (name starting with ".") and ``__pycache__``
    are skipped inside directories.  Duplicates are dropped (first one kept).
    """
    files: List[Path] = []
    for p in _as_path_list(paths):
        if p.is_dir():
            for root, dirs, names in os.walk(p):
                dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__")
                for name in sorted(names):
                    if not name.startswith("."):
                        f = Path(root, name)
                        if f.is_file():
                            files.append(f)
        elif p.is_file():
            files.append(p)
        elif p.exists():
            raise ValueError(f"{p}: corpus input is neither a file nor a directory")
        else:
            raise MissingFileError(2, "corpus input not found", str(p))
    seen = set()
    unique = []
    for f in files:
        key = os.path.realpath(f)
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique


def _decode_file(path: Path, data: bytes) -> str:
    """Decode a text file's bytes; ValueError naming the file if not text."""
    nul = data.find(b"\0")
    if nul != -1:
        raise ValueError(f"{path}: not a text file (NUL byte at offset {nul})")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid UTF-8 text (invalid byte at offset {e.start})") from None


def _read_docs(
    files: Sequence[Path], skip_undecodable: bool, max_bytes: Optional[int] = None
) -> Tuple[List[Tuple[Path, str]], int]:
    """Read files in order; returns ``([(path, text)], skipped)``.

    Empty files are left out.  With ``max_bytes`` reading stops once that many
    bytes are read; the last file is cut at a character boundary to fit.
    """
    docs: List[Tuple[Path, str]] = []
    skipped = 0
    total = 0
    for f in files:
        if max_bytes is not None and total >= max_bytes:
            break
        data = f.read_bytes()
        try:
            text = _decode_file(f, data)
        except ValueError:
            if skip_undecodable:
                skipped += 1
                continue
            raise
        if max_bytes is not None and total + len(data) > max_bytes:
            data = data[: max_bytes - total]
            text = data.decode("utf-8", errors="ignore")  # drop a cut character
            data = text.encode("utf-8")
        if not text:
            continue
        docs.append((f, text))
        total += len(data)
    return docs, skipped


def read_corpus(paths, skip_undecodable: bool = False) -> List[Tuple[Path, str]]:
    """Read text files as ``[(path, text)]``.

    ``paths`` is a path or an iterable of paths to files or directories
    (walked recursively in sorted order, skipping hidden entries and
    ``__pycache__``).  A file containing NUL bytes or invalid UTF-8 raises
    :class:`ValueError` naming it, unless ``skip_undecodable`` is true, in
    which case it is skipped.  Empty files are left out; if nothing is left,
    :class:`ValueError` is raised.
    """
    plist = _as_path_list(paths)
    files = _expand(plist)
    if not files:
        raise ValueError(f"no input files found in {_describe(plist)}")
    docs, _ = _read_docs(files, skip_undecodable)
    if not docs:
        raise ValueError(f"no non-empty text files found in {_describe(plist)}")
    return docs


def _describe(paths: Sequence[Path]) -> str:
    if not paths:
        return "an empty list of paths"
    shown = ", ".join(str(p) for p in paths[:3])
    return shown + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")


def _resolve_tokenizer(tokenizer) -> Tuple[Optional[Tokenizer], Optional[int]]:
    """A Tokenizer instance, or a spec "byte" / "bpe:<vocab_size>"."""
    if isinstance(tokenizer, Tokenizer):
        return tokenizer, None
    if isinstance(tokenizer, str):
        spec = tokenizer.strip().lower()
        if spec == "byte":
            return ByteTokenizer(), None
        if spec.startswith("bpe:"):
            try:
                size = int(spec[4:])
            except ValueError:
                raise ValueError(f"bad tokenizer spec {tokenizer!r}: expected 'bpe:<vocab_size>'") from None
            if size < 257:
                raise ValueError(f"bad tokenizer spec {tokenizer!r}: BPE vocab_size must be at least 257")
            return None, size
        raise ValueError(f"unknown tokenizer spec {tokenizer!r} (expected 'byte' or 'bpe:<vocab_size>')")
    raise TypeError(f"tokenizer must be a Tokenizer or a spec string, got {type(tokenizer).__name__}")


def _join(tokenizer: Tokenizer, texts: Sequence[str]) -> np.ndarray:
    """Encode documents and join them with the separator's tokens."""
    if not texts:
        return np.zeros(0, dtype=np.int32)
    encoded = tokenizer.encode_batch(list(texts))
    sep = tokenizer.encode(_DOC_SEPARATOR).astype(np.int32)
    parts: List[np.ndarray] = []
    for i, ids in enumerate(encoded):
        if i:
            parts.append(sep)
        parts.append(np.asarray(ids, dtype=np.int32))
    return np.concatenate(parts)


def prepare(
    inputs,
    out_dir: PathLike,
    tokenizer: Union[Tokenizer, str],
    val_fraction: float = 0.05,
    seed: int = 0,
    max_bytes: Optional[int] = None,
) -> Dict[str, Any]:
    """Tokenize a corpus into ``out_dir/{train.bin,val.bin,tokenizer.json}``.

    ``inputs``: files/directories as for :func:`read_corpus`, or ``None`` for
    :func:`default_corpus_files` (undecodable files skipped).
    ``tokenizer``: a :class:`~cllm.tokenizer.Tokenizer`, or the spec string
    ``"byte"`` or ``"bpe:<vocab_size>"`` (a BPE trained here on the train
    split only).

    The file list is shuffled with ``seed``.  ``max_bytes`` keeps only the
    first ``max_bytes`` bytes of text of the shuffled list.  Whole files are
    then put in validation, first fit in shuffled order, as long as they keep
    it within ``val_fraction`` of the bytes; when there is one file (or no file
    is small enough) the last ``val_fraction`` of the token stream is used for
    validation instead.  Documents within a split are joined with the tokens
    of ``"\\n\\n"``.  Returns a JSON-serialisable summary.
    """
    try:
        val_fraction = float(val_fraction)
    except (TypeError, ValueError):
        raise TypeError(f"val_fraction must be a number, got {val_fraction!r}") from None
    if not 0.0 < val_fraction <= 0.5:
        raise ValueError(f"val_fraction must be in (0, 0.5], got {val_fraction}")
    if max_bytes is not None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, (int, np.integer)):
            raise TypeError(f"max_bytes must be an int or None, got {type(max_bytes).__name__}")
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    seed = _check_seed(seed)
    tok, bpe_vocab = _resolve_tokenizer(tokenizer)
    out_dir = Path(out_dir)

    if inputs is None:
        files = default_corpus_files()
        skip = True
        where = f"the standard library ({sysconfig.get_paths()['stdlib']})"
    else:
        plist = _as_path_list(inputs)
        files = _expand(plist)
        skip = False
        where = _describe(plist)
        if not files:
            raise ValueError(f"no input files found in {where}")

    rng = np.random.Generator(np.random.PCG64(seed))
    order = rng.permutation(len(files))
    shuffled = [files[i] for i in order]
    docs, skipped = _read_docs(shuffled, skip, max_bytes)
    if not docs:
        raise ValueError(f"no non-empty text files found in {where}")
    sizes = [len(text.encode("utf-8")) for _, text in docs]
    total_bytes = int(sum(sizes))

    # File-level split: first fit in shuffled order within the byte budget.
    val_idx: List[int] = []
    if len(docs) > 1:
        budget = val_fraction * total_bytes
        used = 0
        for i, size in enumerate(sizes):
            if used + size <= budget:
                val_idx.append(i)
                used += size
    is_val = set(val_idx)
    train_texts = [docs[i][1] for i in range(len(docs)) if i not in is_val]
    val_texts = [docs[i][1] for i in val_idx]
    split_mode = "files" if val_idx else "tail"

    if tok is None:
        tok = BPETokenizer.train(train_texts if val_idx else [d[1] for d in docs], bpe_vocab)
        # with a tail split the BPE also sees the last val_fraction of the text;
        # acceptable for a small single-document corpus

    if split_mode == "files":
        train = _join(tok, train_texts)
        val = _join(tok, val_texts)
    else:
        stream = _join(tok, [d[1] for d in docs])
        n_val = int(round(len(stream) * val_fraction))
        n_val = max(1, n_val) if len(stream) > 1 else 0
        train, val = stream[: len(stream) - n_val], stream[len(stream) - n_val :]
    if len(train) == 0 or len(val) == 0:
        raise ValueError(
            f"corpus in {where} is too small to split: {len(train)} train and {len(val)} "
            f"validation tokens (val_fraction={val_fraction})"
        )

    out_dir.mkdir(parents=True, exist_ok=True)
    write_tokens(out_dir / "train.bin", train, tok.vocab_size)
    write_tokens(out_dir / "val.bin", val, tok.vocab_size)
    tok.save(out_dir / "tokenizer.json")
    return {
        "out_dir": str(out_dir),
        "files": len(docs),
        "train_files": len(docs) - len(val_idx) if split_mode == "files" else len(docs),
        "val_files": len(val_idx),
        "skipped_files": skipped,
        "bytes": total_bytes,
        "split": split_mode,
        "tokenizer": tok.kind,
        "vocab_size": int(tok.vocab_size),
        "train_tokens": int(len(train)),
        "val_tokens": int(len(val)),
        "seed": int(seed),
        "val_fraction": val_fraction,
        "max_bytes": None if max_bytes is None else int(max_bytes),
    }


# ----------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    return int(seed)


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return int(value)


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
        self.batch_size = _check_positive_int("batch_size", batch_size)
        self.seq_len = _check_positive_int("seq_len", seq_len)
        self.world_size = _check_positive_int("world_size", world_size)
        if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)):
            raise TypeError(f"rank must be an int, got {type(rank).__name__}")
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {rank}")
        self.rank = int(rank)
        n = int(tokens.shape[0])
        if n < self.seq_len + 1:
            raise ValueError(
                f"token split too small for one batch: {n} tokens, but seq_len={self.seq_len} "
                f"needs at least {self.seq_len + 1}"
            )
        self.tokens = tokens
        self.seed = _check_seed(seed)
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
        rng = np.random.Generator(np.random.PCG64())
        try:
            rng.bit_generator.state = rng_state
        except (TypeError, ValueError, KeyError) as e:
            raise ValueError(f"loader state has an invalid generator state: {e}") from None
        self._rng = rng
        self.step = int(state["step"])
        self.seed = int(state.get("seed", self.seed))


def eval_batches(
    tokens,
    batch_size: int,
    seq_len: int,
    num_batches: int,
    seed: int = 1234,
    rank: int = 0,
    world_size: int = 1,
) -> List[Tuple[np.ndarray, np.ndarray]]:
    """A fixed list of ``num_batches`` ``(x, y)`` batches, the same on every call.

    Drawn like :class:`BatchLoader` with its own ``seed`` and sliced by rank
    the same way, so validation losses are comparable across evaluations.
    """
    num_batches = _check_positive_int("num_batches", num_batches)
    loader = BatchLoader(tokens, batch_size, seq_len, seed=seed, rank=rank, world_size=world_size)
    return [loader.next_batch() for _ in range(num_batches)]
