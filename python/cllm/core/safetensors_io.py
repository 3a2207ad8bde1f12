"""Reading safetensors files: the header checked (CLLM's checkpoints and other tools' weights alike), tensors
memory-mapped and converted to float32 from F32, F16 or BF16 (NumPy has no bfloat16, so safetensors' own NumPy
reader cannot give those). Every problem is a ValueError naming the file and the tensor.

Writing one (`write_float32`) streams the tensors from the caller's arrays: no copy of the whole set is made
(safetensors' own `save` builds the file in memory first, doubling a checkpoint's peak memory)."""
from __future__ import annotations

import json
import math
import struct
import zlib
from pathlib import Path
from typing import BinaryIO, Dict, Tuple

import numpy as np

from ..errors import MissingFileError

MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header
_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}
_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
          "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}  # bytes per element of safetensors' dtypes


def read_header(path: Path, what: str = "safetensors file") -> Tuple[dict, int]:
    """(header, offset of the data section) of a safetensors file, checked: ValueError naming the file (a
    `what`) if it is truncated or its header corrupt, MissingFileError if it does not exist. Every tensor's entry
    is checked as safetensors itself checks it: a string dtype, a shape of non-negative integers, data offsets
    inside the data section whose size is the shape's element count times the dtype's size, and no two tensors
    sharing a byte (an overlap would read one tensor's bytes as another's weights)."""
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
    spans = sorted((_check_entry(path, name, info), name) for name, info in header.items() if name != "__metadata__")
    end = max((hi for (_, hi), _ in spans), default=0)
    if 8 + n + end > size:
        raise ValueError(f"{path}: {what} is truncated: expected {8 + n + end} bytes, file has {size}")
    for ((lo0, hi0), name0), ((lo, hi), name) in zip(spans, spans[1:]):
        if lo < hi0:
            raise ValueError(f"{path}: corrupt safetensors header: tensors {name0} (bytes {lo0}..{hi0}) and {name} "
                             f"(bytes {lo}..{hi}) overlap")
    return header, 8 + n


def _shown(v) -> str:
    text = repr(v)  # a hostile header's value may be megabytes long: the error stays one short line
    return text if len(text) <= 80 else text[:77] + "..."


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _check_entry(path: Path, name: str, info) -> Tuple[int, int]:
    """The [begin, end) data offsets of one header entry, the entry checked (ValueError naming file and tensor)."""
    bad = f"{path}: corrupt safetensors header: tensor {name}"
    if not isinstance(info, dict):
        raise ValueError(f"{bad}: its entry is not a JSON object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str):
        raise ValueError(f"{bad}: dtype {_shown(dtype)} is not a string")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise ValueError(f"{bad}: shape {_shown(shape)} is not a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(v) for v in offsets) \
            or offsets[0] > offsets[1]:
        raise ValueError(f"{bad}: data_offsets {_shown(offsets)} are not [begin, end] with 0 <= begin <= end")
    lo, hi = offsets
    if dtype in _SIZES and _nbytes(shape, _SIZES[dtype], hi - lo) != hi - lo:  # unknown dtypes: read_float32 refuses
        raise ValueError(f"{bad}: data_offsets {offsets} hold {hi - lo} bytes, not what its shape {_shown(shape)} "
                         f"and dtype {dtype} need")
    return lo, hi


def _nbytes(shape, itemsize: int, limit: int) -> int:
    """Bytes of a tensor of `shape`, or limit + 1 once past `limit` (a hostile shape's product could have millions
    of digits)."""
    if 0 in shape:
        return 0
    n = itemsize
    for d in shape:
        n *= d
        if n > limit:
            return limit + 1
    return n


def read_float32(path: Path) -> Dict[str, np.ndarray]:
    """name -> float32 array of every tensor in a safetensors file (F32 arrays are read-only memory maps)."""
    header, start = read_header(path)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, (lo, _) = info["dtype"], info["shape"], info["data_offsets"]  # checked by read_header
        if dtype not in _DTYPES:
            raise ValueError(f"{path}: tensor {name} has dtype {dtype}; CLLM reads F32, F16 and BF16")
        count = math.prod(shape)
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
