"""Corpus reading and preparation: text files in, token files out.

:func:`read_corpus` reads UTF-8 text files and directories,
:func:`default_corpus_files` lists the Python standard library's ``.py`` files
(the built-in corpus used when no data is given), and :func:`prepare`
tokenizes a corpus into ``train.bin``, ``val.bin`` and ``tokenizer.json``.

:func:`prepare` holds no more than a few MiB of text and tokens at a time, however
large the corpus: files are read in blocks (`_text_pieces`), cut where the
tokenizer's result cannot change (`tokenizer._chunk_text`), encoded a piece at
a time and the tokens written as they come (`write_token_chunks`).
:func:`source_fingerprint` records the inputs (size, mtime, CRC-32 of each file)
so that a cache of prepared data can tell when they changed.
"""

from __future__ import annotations

import codecs
import contextlib
import os
import sysconfig
import tempfile
import zlib
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..core.checks import check_float, check_int
from ..core.system import check_memory, format_bytes
from .tokenfile import write_token_chunks
from ..errors import InsufficientMemoryError, MissingFileError
from ..core.files import DirLock
from .tokenizer import ByteTokenizer, Tokenizer
from .bpe import BPETokenizer, _chunk_text

__all__ = ["default_corpus_files", "read_corpus", "prepare", "source_fingerprint"]

PathLike = Union[str, "os.PathLike[str]"]

_DOC_SEPARATOR = "\n\n"  # text placed between documents in a split
_SKIP_DIRS = {"__pycache__", "site-packages", "dist-packages"}
_BLOCK = 1 << 20           # bytes read from a file at a time
_PIECE_CHARS = 1 << 20     # text handed to the tokenizer per piece (cut at a safe place)
_TOKEN_CHUNK = 1 << 22     # tokens copied at a time between files
# A BPE is trained on at most this much of the training text, taken evenly across it: the trainer (Hugging Face
# tokenizers) holds every distinct word with its pairs, up to ~130 bytes per byte of text (random words; code
# ~10), so the whole of a 30 MB corpus took 1.7 GB. Its memory is checked against this bound before it starts.
BPE_SAMPLE_BYTES = 4 << 20
BPE_MEMORY_PER_BYTE = 160


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
            for root, dirs, names in os.walk(p, onerror=_unreadable):
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


def _unreadable(e: OSError) -> None:
    """os.walk's onerror: a directory that cannot be listed is an error naming it, not silently skipped."""
    raise OSError(e.errno, f"cannot read corpus directory: {e.strerror}", e.filename) from None


def _text_pieces(path: Path, limit: Optional[int] = None) -> Iterator[str]:
    """The text of a file in pieces of about _PIECE_CHARS characters, read a block at a time and cut only where
    tokenizing the pieces gives the ids of the whole (`_chunk_text`; a line longer than 4 pieces is cut where it
    must). ValueError naming the file if it holds a NUL byte or invalid UTF-8. With `limit` only the first
    `limit` bytes are read, and a character they cut is dropped."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    carry, offset = "", 0
    with open(path, "rb") as f:
        while limit is None or offset < limit:
            block = f.read(_BLOCK if limit is None else min(_BLOCK, limit - offset))
            if not block:
                break
            nul = block.find(b"\0")
            if nul != -1:
                raise ValueError(f"{path}: not a text file (NUL byte at offset {offset + nul})")
            pending = len(decoder.getstate()[0])
            try:
                carry += decoder.decode(block)
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}: not valid UTF-8 text (invalid byte at offset "
                                 f"{offset - pending + e.start})") from None
            offset += len(block)
            if len(carry) > _PIECE_CHARS:
                pieces = _chunk_text(carry, _PIECE_CHARS)
                if len(pieces) == 1 and len(carry) > 4 * _PIECE_CHARS:
                    pieces = [carry[:_PIECE_CHARS], carry[_PIECE_CHARS:]]
                yield from pieces[:-1]
                carry = pieces[-1]
    if limit is None:
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not valid UTF-8 text (invalid byte at offset "
                             f"{offset - len(decoder.getstate()[0]) + e.start})") from None
    if carry:
        yield carry


def _scan_docs(files: Sequence[Path], skip_undecodable: bool,
               max_bytes: Optional[int] = None) -> Tuple[List[Tuple[Path, int]], int]:
    """The documents of `files`, in order, as ``([(path, bytes used)], skipped)``, each file read through once to
    check that it is text. Empty files are left out. With ``max_bytes`` reading stops once that many bytes are
    taken; the last file is cut at a character boundary to fit."""
    docs: List[Tuple[Path, int]] = []
    skipped = total = 0
    for f in files:
        if max_bytes is not None and total >= max_bytes:
            break
        limit = None if max_bytes is None else max_bytes - total
        try:
            used = sum(len(piece.encode("utf-8")) for piece in _text_pieces(f, limit))
        except ValueError:
            if skip_undecodable:
                skipped += 1
                continue
            raise
        if used:
            docs.append((f, used))
            total += used
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
    docs, _ = _scan_docs(files, skip_undecodable)
    if not docs:
        raise ValueError(f"no non-empty text files found in {_describe(plist)}")
    return [(f, "".join(_text_pieces(f))) for f, _ in docs]


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


def _token_stream(tok: Tokenizer, docs: Sequence[Tuple[Path, int]]) -> Iterator[np.ndarray]:
    """The tokens of the documents, in order, a piece at a time, joined by the tokenizer's end-of-text
    token or, without one, the separator's tokens."""
    eos = tok.eos_id
    sep = np.array([eos], np.int32) if eos is not None else tok.encode(_DOC_SEPARATOR).astype(np.int32)
    for i, (path, used) in enumerate(docs):
        if i:
            yield sep
        for piece in _text_pieces(path, used):
            yield tok.encode(piece)  # a BPE encodes a piece's 64K-character chunks in parallel


def _write_tail_split(out_dir: Path, tok: Tokenizer, docs, val_fraction: float, where: str) -> Tuple[int, int]:
    """One token stream of all documents, its last val_fraction written to val.bin and the rest to train.bin
    (through a temporary file, as the split point is known only at the end). Returns (train, val) counts."""
    dtype = np.dtype("<u2") if tok.vocab_size <= 65536 else np.dtype("<u4")
    with tempfile.TemporaryFile(dir=out_dir, prefix=".stream.") as raw:
        n = 0
        try:
            for ids in _token_stream(tok, docs):
                raw.write(np.asarray(ids).astype(dtype).tobytes())
                n += len(ids)
            raw.flush()
        except OSError as e:  # a full disk: the stream is the temporary file in out_dir, which names nothing
            if e.filename is not None or e.errno is None:
                raise
            raise OSError(e.errno, f"cannot write the token stream before the split: {e.strerror}",
                          str(out_dir)) from None
        n_val = max(1, int(round(n * val_fraction))) if n > 1 else 0
        if n - n_val == 0 or n_val == 0:
            raise ValueError(f"corpus in {where} is too small to split: {n - n_val} train and {n_val} "
                             f"validation tokens (val_fraction={val_fraction})")

        def part(lo, hi):  # read, not memory-mapped: a mapping would count against an address-space limit
            raw.seek(lo * dtype.itemsize)
            for i in range(lo, hi, _TOKEN_CHUNK):
                yield np.frombuffer(raw.read((min(i + _TOKEN_CHUNK, hi) - i) * dtype.itemsize), dtype)

        write_token_chunks(out_dir / "train.bin", part(0, n - n_val), tok.vocab_size)
        write_token_chunks(out_dir / "val.bin", part(n - n_val, n), tok.vocab_size)
    return n - n_val, n_val


def _bpe_sample(docs: Sequence[Tuple[Path, int]], total: int, budget: int) -> Iterator[str]:
    """About `budget` of the `total` bytes of text of the documents, in pieces taken evenly across them (all of
    it when budget == total; the last piece taken cut to fit)."""
    seen = kept = 0
    for path, used in docs:
        for piece in _text_pieces(path, used):
            size = len(piece.encode("utf-8"))
            seen += size
            if kept < budget and kept * total < seen * budget:  # behind the even share of what was read
                if kept + size > budget:
                    piece = piece.encode("utf-8")[:budget - kept].decode("utf-8", "ignore")
                    size = budget - kept
                kept += size
                yield piece


class _Counted:
    """An iterator of token arrays that counts the tokens it passes on."""

    def __init__(self, chunks: Iterator[np.ndarray]):
        self.chunks, self.n = chunks, 0

    def __iter__(self):
        for c in self.chunks:
            self.n += len(c)
            yield c


def _corpus_files(inputs) -> Tuple[List[Path], bool, str]:
    """(files, skip_undecodable, where): the files of ``inputs`` (None: the standard library, whose
    undecodable files are skipped) and how to name them in messages."""
    if inputs is None:
        return default_corpus_files(), True, f"the standard library ({sysconfig.get_paths()['stdlib']})"
    plist = _as_path_list(inputs)
    files = _expand(plist)
    where = _describe(plist)
    if not files:
        raise ValueError(f"no input files found in {where}")
    return files, False, where


def source_fingerprint(inputs) -> List[Dict[str, Any]]:
    """What the corpus of ``inputs`` is now (None: the standard library): for each file that :func:`prepare`
    would read, in its order, ``{"path", "size", "mtime_ns", "crc32"}`` (the CRC-32 of its bytes, read a block
    at a time). A directory's file list is thereby part of it."""
    out = []
    for f in _corpus_files(inputs)[0]:
        st = f.stat()
        crc = 0
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(_BLOCK), b""):
                crc = zlib.crc32(block, crc)
        out.append({"path": os.path.abspath(f), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "crc32": crc})
    return out


def _validation_files(sizes: Sequence[int], val_fraction: float) -> List[int]:
    """Indices of the documents put in validation: first fit in order, as long as they keep it within
    ``val_fraction`` of the bytes (none for a single document)."""
    val_idx: List[int] = []
    if len(sizes) > 1:
        budget = val_fraction * sum(sizes)
        used = 0
        for i, size in enumerate(sizes):
            if used + size <= budget:
                val_idx.append(i)
                used += size
    return val_idx


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
    ``tokenizer``: a :class:`~cllm.data.Tokenizer`, or the spec string
    ``"byte"`` or ``"bpe:<vocab_size>"`` (a BPE trained here on the train
    split only, on at most ``BPE_SAMPLE_BYTES`` of it taken evenly across it,
    its memory checked first).

    The file list is shuffled with ``seed``.  ``max_bytes`` keeps only the
    first ``max_bytes`` bytes of text of the shuffled list.  Whole files are
    then put in validation, first fit in shuffled order, as long as they keep
    it within ``val_fraction`` of the bytes; when there is one file (or no file
    is small enough) the last ``val_fraction`` of the token stream is used for
    validation instead.  Documents within a split are joined with the tokens
    of ``"\\n\\n"``.  Returns a JSON-serialisable summary.
    """
    val_fraction = check_float("val_fraction", val_fraction, 0, 0.5, lo_open=True)
    if max_bytes is not None:
        max_bytes = check_int("max_bytes", max_bytes, lo=1)
    seed = check_int("seed", seed, lo=0)
    tok, bpe_vocab = _resolve_tokenizer(tokenizer)
    out_dir = Path(out_dir)
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    # one preparation at a time, from reading the corpus on: two at once would leave one's train.bin beside the
    # other's tokenizer.json
    lock = DirLock(out_dir, "another process is preparing data", "output directory")
    try:
        return _prepare_into(out_dir, inputs, tok, bpe_vocab, val_fraction, seed, max_bytes)
    except BaseException:
        if created:  # leave no empty directory behind (one holding files stays)
            with contextlib.suppress(OSError):
                (out_dir / ".lock").unlink()
                out_dir.rmdir()
        raise
    finally:
        lock.release()


def _prepare_into(out_dir: Path, inputs, tok: Optional[Tokenizer], bpe_vocab: Optional[int], val_fraction: float,
                  seed: int, max_bytes: Optional[int]) -> Dict[str, Any]:
    """prepare's work, in its locked output directory (tok None: train a BPE of bpe_vocab tokens)."""
    files, skip, where = _corpus_files(inputs)
    order = np.random.Generator(np.random.PCG64(seed)).permutation(len(files))
    docs, skipped = _scan_docs([files[i] for i in order], skip, max_bytes)
    if not docs:
        raise ValueError(f"no non-empty text files found in {where}")
    sizes = [used for _, used in docs]
    val_idx = _validation_files(sizes, val_fraction)
    is_val = set(val_idx)
    train_docs = [d for i, d in enumerate(docs) if i not in is_val]
    if tok is None:
        # with a tail split the BPE also sees the last val_fraction of the text;
        # acceptable for a small single-document corpus
        train_bytes = sum(used for _, used in train_docs)
        sample = min(train_bytes, BPE_SAMPLE_BYTES)
        try:
            check_memory(sample * BPE_MEMORY_PER_BYTE, f"training a BPE tokenizer on {format_bytes(sample)} of text")
        except InsufficientMemoryError as e:
            raise InsufficientMemoryError(f"{e}: use the byte tokenizer, or less text (max_bytes)") from None
        tok = BPETokenizer.train(_bpe_sample(train_docs, train_bytes, sample), bpe_vocab)
    if val_idx:  # whole files: neither split can be empty (see _validation_files)
        train = _Counted(_token_stream(tok, train_docs))
        val = _Counted(_token_stream(tok, [docs[i] for i in val_idx]))
        write_token_chunks(out_dir / "train.bin", train, tok.vocab_size)
        write_token_chunks(out_dir / "val.bin", val, tok.vocab_size)
        n_train, n_val = train.n, val.n
    else:
        n_train, n_val = _write_tail_split(out_dir, tok, docs, val_fraction, where)
    tok.save(out_dir / "tokenizer.json")
    return {
        "out_dir": str(out_dir),
        "files": len(docs),
        "train_files": len(docs) - len(val_idx),
        "val_files": len(val_idx),
        "skipped_files": skipped,
        "bytes": int(sum(sizes)),
        "split": "files" if val_idx else "tail",
        "tokenizer": tok.kind,
        "vocab_size": int(tok.vocab_size),
        "train_tokens": int(n_train),
        "val_tokens": int(n_val),
        "seed": int(seed),
        "val_fraction": val_fraction,
        "max_bytes": None if max_bytes is None else int(max_bytes),
    }
