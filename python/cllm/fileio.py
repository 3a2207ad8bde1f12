"""Atomic file writes: a reader sees the old file or the whole new one, never a partial file.

The data goes to a temporary file in the target's directory, is flushed to disk (fsync), and is then renamed
over the target (os.replace, atomic on POSIX and Windows); the directory is synced too, so that the rename
survives a crash. On any error the temporary file is removed and the target is left as it was.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable, Union

from .errors import MissingFileError

PathLike = Union[str, "os.PathLike[str]"]

__all__ = ["write_bytes_atomic", "write_text_atomic"]


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open directories; the rename itself is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes_atomic(path: PathLike, data: Union[bytes, Iterable[bytes]]) -> Path:
    """Write `data` to `path` atomically; returns the path. `data` is bytes, or an iterable of bytes chunks
    (written in order, so that a large file need not be held in memory at once). The file gets mode 0o644.

    MissingFileError (a FileNotFoundError) if the directory does not exist; an OSError of the write itself
    (a full disk: ENOSPC) names `path`."""
    path = Path(path)
    directory = path.parent
    if not directory.is_dir():
        raise MissingFileError(2, f"directory to write {path.name} in not found", str(directory))
    chunks = (data,) if isinstance(data, (bytes, bytearray, memoryview)) else data
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError) and e.filename is None and e.errno is not None:
            raise OSError(e.errno, f"cannot write {path.name}: {e.strerror}", str(path)) from e
        raise
    _fsync_dir(directory)
    return path


def write_text_atomic(path: PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write `text` to `path` atomically (encoded as `encoding`, no newline translation); returns the path."""
    return write_bytes_atomic(path, text.encode(encoding))
