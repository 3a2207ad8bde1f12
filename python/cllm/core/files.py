"""Writing a file so that a crash never leaves a partial one under its name: the one way CLLM writes its files
(checkpoints, tokenizers, a run's JSON files); and locking a directory that one process writes at a time.

    atomic_write(path, lambda f: f.write(data), what="checkpoint", missing_dir="checkpoint directory does not exist")
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Union

from ..errors import CLLMError, MissingFileError

PathLike = Union[str, "os.PathLike[str]"]


def atomic_write(path: PathLike, write: Callable[[BinaryIO], object], *, what: str, missing_dir: str) -> Path:
    """Write `path` through a temporary file (".<name>.<random>.tmp") in the same directory: `write(f)` fills
    the file (opened in binary mode), which is then flushed, fsynced, made readable by all (0644) and renamed over
    `path`; last, the directory is fsynced. At any moment the name holds the old file or the new one, whole;
    the temporary file is removed on any error.

    Errors: a missing directory is a MissingFileError with the message `missing_dir`; a write error that names
    no file (e.g. ENOSPC) is re-raised as an OSError naming `path` ("cannot write the <what>: ...")."""
    path = Path(path)
    directory = path.parent
    if not directory.is_dir():
        raise MissingFileError(2, missing_dir, str(directory))
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:  # a read-only directory: named by the file asked for, not the temporary one
        raise OSError(e.errno, f"cannot write the {what}: {e.strerror}", str(path)) from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
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
            raise OSError(e.errno, f"cannot write the {what}: {e.strerror}", str(path)) from e
        raise
    _fsync_dir(directory)
    return path


def _fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable (skipped where directories cannot be opened, e.g. Windows: the
    rename itself is still atomic)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_json_object(path: Path, error=ValueError) -> dict:
    """The JSON object in a file; MissingFileError if absent, `error` naming the file if it is not a JSON object."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(2, "file not found", str(path))
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise error(f"{path}: not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise error(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


class DirLock:
    """An exclusive lock on a directory (flock on DIR/.lock), held while one process writes it: a second writer
    stops at once with an error naming the holder and what it is doing, instead of the two mixing their files.
    `doing` says what this holder does ("another run is training"), `option` how to choose another directory.
    The kernel drops the lock when the process ends, however it ends."""

    def __init__(self, directory: Path, doing: str, option: str):
        import fcntl

        self._fd = None
        fd = os.open(Path(directory) / ".lock", os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            pid, _, holder = os.pread(fd, 200, 0).decode(errors="replace").strip().partition(" ")
            os.close(fd)
            raise CLLMError(f"{directory}: {holder or 'another process is writing'} in this directory (pid "
                            f"{pid or 'unknown'}); wait for it to finish or choose another {option}") from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {doing}\n".encode(), 0)
        except OSError as e:  # a full disk: named by the lock file, which names the directory
            os.close(fd)
            raise OSError(e.errno, f"cannot write the lock file: {e.strerror}", str(Path(directory) / ".lock")) from None
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    __del__ = release


__all__ = ["DirLock", "atomic_write", "read_json_object"]
