"""Token files (``.bin``): the format, :func:`write_tokens` and :func:`load_tokens`.

A token file is a 64-byte little-endian header followed by the tokens::

    offset  size  field
    ------  ----  ---------------------------------------------------------
         0     8  magic            b"CLLMTOK\\0"
         8     4  version          uint32, currently 1
        12     4  bytes_per_token  uint32: 2 (uint16 tokens) or 4 (uint32 tokens)
        16     4  vocab_size       uint32, every token is < vocab_size
        20     4  flags            uint32: 1 = tokens_crc32 holds the tokens' CRC-32 (0 in older files)
        24     8  num_tokens       uint64
        32     4  tokens_crc32     uint32, CRC-32 of the token bytes (zlib.crc32)
        36    28  reserved         zeros
        64     .  tokens           num_tokens little-endian unsigned integers

Writers use 2 bytes per token when ``vocab_size <= 65536`` and 4 otherwise.
The file size must be exactly ``64 + num_tokens * bytes_per_token``.
:func:`load_tokens` memory-maps the tokens read-only and validates the header,
the size and (in chunks) that every token is below ``vocab_size`` and that the
tokens match their checksum (a file without one loads with a warning).
:func:`write_token_chunks` writes a stream of token arrays without holding it whole.
"""

from __future__ import annotations

import os
import struct
import warnings
import zlib
from pathlib import Path
from typing import Iterable, Union

import numpy as np

from ..core.checks import check_int
from ..errors import MissingFileError
from ..core.files import atomic_write

__all__ = ["MAGIC", "FORMAT_VERSION", "HEADER_SIZE", "NUM_TOKENS_OFFSET", "TokenFile", "write_tokens",
           "write_token_chunks", "load_tokens"]

PathLike = Union[str, "os.PathLike[str]"]

MAGIC = b"CLLMTOK\0"
FORMAT_VERSION = 1
HEADER_SIZE = 64
#: magic, version, bytes_per_token, vocab_size, flags, num_tokens, tokens_crc32, 28 reserved bytes
_HEADER = struct.Struct("<8sIIIIQI28x")
HAS_CRC32 = 1  # the flag saying that tokens_crc32 is set
assert _HEADER.size == HEADER_SIZE
#: offset of the uint64 num_tokens field in the header
NUM_TOKENS_OFFSET = 24

_CHUNK_TOKENS = 1 << 22  # tokens per chunk when writing / range-checking


def _dtype_for(bytes_per_token: int) -> np.dtype:
    return np.dtype("<u2") if bytes_per_token == 2 else np.dtype("<u4")


class TokenFile:
    """A loaded token file: ``tokens`` is a read-only ``np.memmap``; ``crc32`` the tokens' checksum from the
    header (None in an older file)."""

    def __init__(self, path: Path, tokens: np.ndarray, vocab_size: int, bytes_per_token: int, version: int,
                 crc32=None):
        self.path = path
        self.tokens = tokens
        self.vocab_size = vocab_size
        self.bytes_per_token = bytes_per_token
        self.version = version
        self.crc32 = crc32

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def __repr__(self) -> str:
        return (
            f"TokenFile({str(self.path)!r}, num_tokens={len(self)}, "
            f"vocab_size={self.vocab_size}, bytes_per_token={self.bytes_per_token})"
        )


def write_tokens(path: PathLike, tokens, vocab_size: int) -> Path:
    """Write ``tokens`` (1-D, integers in ``[0, vocab_size)``) as a token file.

    Every token is checked before any file is created; the file is then written atomically
    (:func:`cllm.core.files.atomic_write`), so readers never see a partial file. Returns the path.
    """
    path = Path(path)
    vocab_size = check_int(f"{path}: vocab_size", vocab_size, 1, 0xFFFFFFFF)
    arr = tokens if isinstance(tokens, np.ndarray) else np.asarray(tokens)
    if arr.size == 0:
        arr = np.zeros(0, dtype=np.int64)
    if arr.ndim != 1:
        raise ValueError(f"{path}: tokens must be a 1-D array, got shape {arr.shape}")
    chunks = [arr[start : start + _CHUNK_TOKENS] for start in range(0, arr.shape[0], _CHUNK_TOKENS)]
    for chunk in chunks:
        _check_chunk(path, chunk, vocab_size)
    return write_token_chunks(path, chunks, vocab_size)


def _check_chunk(path: Path, chunk: np.ndarray, vocab_size: int) -> None:
    if chunk.ndim != 1:
        raise ValueError(f"{path}: tokens must be a 1-D array, got shape {chunk.shape}")
    if not np.issubdtype(chunk.dtype, np.integer):
        raise TypeError(f"{path}: tokens must be integers, got dtype {chunk.dtype}")
    if chunk.size:
        lo, hi = int(chunk.min()), int(chunk.max())
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"{path}: token value {lo if lo < 0 else hi} is out of range for vocab_size {vocab_size}")


def write_token_chunks(path: PathLike, chunks: Iterable[np.ndarray], vocab_size: int) -> Path:
    """Write the concatenation of ``chunks`` (1-D integer arrays, each checked as it comes) as a token file,
    atomically, holding one chunk at a time: the header, with the count and the checksum, is written last."""
    path = Path(path)
    vocab_size = check_int(f"{path}: vocab_size", vocab_size, 1, 0xFFFFFFFF)
    bytes_per_token = 2 if vocab_size <= 65536 else 4
    dtype = _dtype_for(bytes_per_token)

    def write(f):
        f.write(bytes(HEADER_SIZE))
        n, crc = 0, 0
        for chunk in chunks:
            chunk = np.asarray(chunk)
            _check_chunk(path, chunk, vocab_size)
            data = memoryview(np.ascontiguousarray(chunk, dtype=dtype)).cast("B")
            crc = zlib.crc32(data, crc)
            n += chunk.shape[0]
            f.write(data)
        f.seek(0)
        f.write(_HEADER.pack(MAGIC, FORMAT_VERSION, bytes_per_token, vocab_size, HAS_CRC32, n, crc))

    return atomic_write(path, write, what="token file", missing_dir="directory to write the token file in not found")


def load_tokens(path: PathLike, *, check_range: bool = True) -> TokenFile:
    """Open a token file written by :func:`write_tokens`.

    Raises :class:`MissingFileError` (a ``FileNotFoundError`` and a
    ``ValueError``) when the file does not exist and :class:`ValueError`
    naming the file and the problem when it is not a valid token file.
    ``check_range=False`` skips the full scan that checks every token is
    below ``vocab_size`` and matches the file's checksum.
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
    _, version, bytes_per_token, vocab_size, flags, n, crc = _HEADER.unpack(head)
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{path}: unsupported token file version {version} (this CLLM reads version {FORMAT_VERSION})"
        )
    if bytes_per_token not in (2, 4):
        raise ValueError(f"{path}: invalid bytes_per_token {bytes_per_token} in header (expected 2 or 4)")
    if vocab_size == 0:
        raise ValueError(f"{path}: invalid vocab_size 0 in header")
    if flags not in (0, HAS_CRC32):
        raise ValueError(f"{path}: invalid flags {flags} in header (expected 0 or {HAS_CRC32})")
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
    if check_range:
        _check_tokens(path, tokens, vocab_size, crc if flags & HAS_CRC32 else None)
    return TokenFile(path, tokens, int(vocab_size), int(bytes_per_token), int(version),
                     int(crc) if flags & HAS_CRC32 else None)


def _check_tokens(path: Path, tokens: np.ndarray, vocab_size: int, crc) -> None:
    """Every token below vocab_size and (unless crc is None: warn) the tokens' CRC-32 equal to `crc`, in one
    chunked pass."""
    if crc is None:
        warnings.warn(f"{path}: token file has no checksum (written by an older CLLM); damage to it cannot be "
                      f"detected", RuntimeWarning, stacklevel=3)
    check_range = vocab_size < (1 << (8 * tokens.dtype.itemsize))
    actual = 0
    for start in range(0, tokens.shape[0], _CHUNK_TOKENS):
        chunk = np.asarray(tokens[start : start + _CHUNK_TOKENS])
        if crc is not None:
            actual = zlib.crc32(memoryview(chunk).cast("B"), actual)
        if check_range and int(chunk.max()) >= vocab_size:
            i = int(np.argmax(chunk >= vocab_size))
            raise ValueError(f"{path}: token {int(chunk[i])} at index {start + i} is >= vocab_size {vocab_size}")
    if crc is not None and actual != crc:
        raise ValueError(f"{path}: token file is damaged (checksum mismatch)")
