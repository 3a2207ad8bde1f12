"""Reading safetensors files: the header checked (CLLM's checkpoints and other tools' weights alike), tensors
memory-mapped and converted to float32 from F32, F16 or BF16 (NumPy has no bfloat16, so safetensors' own NumPy
reader cannot give those). Every problem is a ValueError naming the file and the tensor.

Writing one (`write_float32`) streams the tensors from the caller's arrays: no copy of the whole set is made
(safetensors' own `save` builds the file in memory first, doubling a checkpoint's peak memory)."""
from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import BinaryIO, Dict, Tuple

import numpy as np

from ..errors import MissingFileError

MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header
_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}


def read_header(path: Path, what: str = "safetensors file") -> Tuple[dict, int]:
    """(header, offset of the data section) of a safetensors file, checked: ValueError naming the file (a
    `what`) if it is truncated or its header corrupt, MissingFileError if it does not exist."""
    if not path.is_file():
        raise MissingFileError(2, f"{what} not found", str(path))
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: not a {what}: file is truncated or empty ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n == 0 or n > MAX_HEADER:
            raise ValueError(f"{path}: not a safetensors {what} (corrupt header length {n})")
        if 8 + n > size:
            raise ValueError(f"{path}: {what} is truncated: header needs {8 + n} bytes, file has {size}")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise ValueError(f"{path}: not a safetensors {what} (corrupt header)") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: not a safetensors {what} (header is not a JSON object)")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            lo, hi = (int(v) for v in info["data_offsets"])
        except (TypeError, KeyError, ValueError, OverflowError):
            raise ValueError(f"{path}: corrupt safetensors header (tensor {name!r} has no data_offsets)") from None
        end = max(end, hi)
    if 8 + n + end > size:
        raise ValueError(f"{path}: {what} is truncated: expected {8 + n + end} bytes, file has {size}")
    return header, 8 + n


def read_float32(path: Path) -> Dict[str, np.ndarray]:
    """name -> float32 array of every tensor in a safetensors file (F32 arrays are read-only memory maps)."""
    header, start = read_header(path)
    size = path.stat().st_size
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape = info["dtype"], [int(s) for s in info["shape"]]
            lo, hi = (int(v) for v in info["data_offsets"])
        except (TypeError, KeyError, ValueError):
            raise ValueError(f"{path}: corrupt safetensors header entry for tensor {name!r}") from None
        if dtype not in _DTYPES:
            raise ValueError(f"{path}: tensor {name} has dtype {dtype}; CLLM reads F32, F16 and BF16")
        count = int(np.prod(shape)) if shape else 1
        if hi - lo != count * _DTYPES[dtype].itemsize or lo < 0 or start + hi > size:
            raise ValueError(f"{path}: tensor {name} data ({lo}..{hi}) does not match its shape {shape} and "
                             f"dtype {dtype} or lies past the end of the file ({size} bytes)")
        raw = np.memmap(path, dtype=_DTYPES[dtype], mode="r", offset=start + lo, shape=(count,)) if count else \
            np.zeros(0, _DTYPES[dtype])
        if dtype == "BF16":
            arr = (raw.astype(np.uint32) << 16).view(np.float32)
        else:
            arr = raw.astype(np.float32, copy=False)
        out[name] = arr.reshape(shape)
    return out


def crc32(a: np.ndarray) -> int:
    """CRC-32 of a C-contiguous array's bytes (zlib: about 2 GB/s, no copy)."""
    return zlib.crc32(memoryview(a).cast("B")) if a.size else 0


def write_float32(f: BinaryIO, tensors: Dict[str, np.ndarray], metadata: Dict[str, str]) -> None:
    """A safetensors file of C-contiguous float32 `tensors` (in the given order) and string `metadata`, written
    to the open binary file `f` tensor by tensor."""
    header, offset = {}, 0
    for name, a in tensors.items():
        if a.dtype != np.dtype("<f4") or not a.flags.c_contiguous:
            raise ValueError(f"tensor {name}: expected a C-contiguous float32 array, got {a.dtype}")
        header[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for a in tensors.values():
        if a.size:
            f.write(memoryview(a).cast("B"))
