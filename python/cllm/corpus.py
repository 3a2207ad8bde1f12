"""Corpus reading and preparation: text files in, token files out.

:func:`read_corpus` reads UTF-8 text files and directories,
:func:`default_corpus_files` lists the Python standard library's ``.py`` files
(the built-in corpus used when no data is given), and :func:`prepare`
tokenizes a corpus into ``train.bin``, ``val.bin`` and ``tokenizer.json``.
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .checks import check_float, check_int
from .tokenfile import write_tokens
from .errors import MissingFileError
from .tokenizer import BPETokenizer, ByteTokenizer, Tokenizer

__all__ = ["default_corpus_files", "read_corpus", "prepare"]

PathLike = Union[str, "os.PathLike[str]"]

_DOC_SEPARATOR = "\n\n"  # text placed between documents in a split
_SKIP_DIRS = {"__pycache__", "site-packages", "dist-packages"}


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
    """Encode documents and join them with the tokenizer's end-of-text token, or without one the separator's
    tokens."""
    if not texts:
        return np.zeros(0, dtype=np.int32)
    encoded = tokenizer.encode_batch(list(texts))
    eos = tokenizer.eos_id
    sep = np.array([eos], np.int32) if eos is not None else tokenizer.encode(_DOC_SEPARATOR).astype(np.int32)
    parts: List[np.ndarray] = []
    for i, ids in enumerate(encoded):
        if i:
            parts.append(sep)
        parts.append(np.asarray(ids, dtype=np.int32))
    return np.concatenate(parts)


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


def _encode_split(tok: Tokenizer, texts: Sequence[str], val_idx: Sequence[int],
                  val_fraction: float) -> Tuple[np.ndarray, np.ndarray]:
    """(train, val) token streams: the documents of ``val_idx`` in validation, or (without any) the last
    ``val_fraction`` of the whole stream."""
    if val_idx:
        is_val = set(val_idx)
        return (_join(tok, [t for i, t in enumerate(texts) if i not in is_val]),
                _join(tok, [texts[i] for i in val_idx]))
    stream = _join(tok, texts)
    n_val = int(round(len(stream) * val_fraction))
    n_val = max(1, n_val) if len(stream) > 1 else 0
    return stream[: len(stream) - n_val], stream[len(stream) - n_val :]


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
    val_fraction = check_float("val_fraction", val_fraction, 0, 0.5, lo_open=True)
    if max_bytes is not None:
        max_bytes = check_int("max_bytes", max_bytes, lo=1)
    seed = check_int("seed", seed, lo=0)
    tok, bpe_vocab = _resolve_tokenizer(tokenizer)
    out_dir = Path(out_dir)

    files, skip, where = _corpus_files(inputs)
    order = np.random.Generator(np.random.PCG64(seed)).permutation(len(files))
    docs, skipped = _read_docs([files[i] for i in order], skip, max_bytes)
    if not docs:
        raise ValueError(f"no non-empty text files found in {where}")
    texts = [text for _, text in docs]
    sizes = [len(text.encode("utf-8")) for text in texts]
    val_idx = _validation_files(sizes, val_fraction)
    if tok is None:
        # with a tail split the BPE also sees the last val_fraction of the text;
        # acceptable for a small single-document corpus
        is_val = set(val_idx)
        tok = BPETokenizer.train([t for i, t in enumerate(texts) if i not in is_val], bpe_vocab)
    train, val = _encode_split(tok, texts, val_idx, val_fraction)
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
        "train_files": len(docs) - len(val_idx),
        "val_files": len(val_idx),
        "skipped_files": skipped,
        "bytes": int(sum(sizes)),
        "split": "files" if val_idx else "tail",
        "tokenizer": tok.kind,
        "vocab_size": int(tok.vocab_size),
        "train_tokens": int(len(train)),
        "val_tokens": int(len(val)),
        "seed": int(seed),
        "val_fraction": val_fraction,
        "max_bytes": None if max_bytes is None else int(max_bytes),
    }
