"""Tokenizers for CLLM: a raw byte tokenizer and a trainable byte-level BPE.

Two tokenizers share one small interface (:class:`Tokenizer`):

* :class:`ByteTokenizer` maps text to the ids of its UTF-8 bytes (vocabulary
  of 256).  It needs no training and is the default.
* :class:`BPETokenizer` is a byte-level BPE built with the Hugging Face
  ``tokenizers`` library (ByteLevel pre-tokenizer and decoder, no normaliser,
  no special tokens), so that it too is lossless for any text.

Both encode to ``np.int32`` arrays.  ``decode(encode(s)) == s`` holds for every
Python string ``s`` that is valid Unicode; a string holding lone surrogates
(which cannot be written as UTF-8) is encoded as if each lone surrogate were
U+FFFD REPLACEMENT CHARACTER.

Serialisation: ``tok.to_json()`` returns a JSON object of the form
``{"type": "byte"}`` or ``{"type": "bpe", "tokenizer": "<HF tokenizer JSON>"}``
and :func:`tokenizer_from_json` restores the right class from it;
``tok.save(path)`` / :func:`load_tokenizer` do the same through a file.
Malformed or foreign JSON raises :class:`ValueError` naming the problem.
"""

from __future__ import annotations

import codecs
import json
import os
import re
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

import numpy as np

from ..errors import MissingFileError
from ..core.files import atomic_write

__all__ = [
    "Tokenizer",
    "ByteTokenizer",
    "tokenizer_from_json",
    "load_tokenizer",
]

PathLike = Union[str, "os.PathLike[str]"]

_SURROGATES = re.compile("[\ud800-\udfff]")
_MIN_BPE_VOCAB = 257


def _utf8(text: str) -> bytes:
    """UTF-8 bytes of ``text``; lone surrogates become U+FFFD."""
    if not isinstance(text, str):
        raise TypeError(f"expected text of type str, got {type(text).__name__}")
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return _SURROGATES.sub("\ufffd", text).encode("utf-8")


def _valid_text(text: str) -> str:
    """``text`` with lone surrogates replaced by U+FFFD (usually ``text`` itself)."""
    if not isinstance(text, str):
        raise TypeError(f"expected text of type str, got {type(text).__name__}")
    if _SURROGATES.search(text) is None:
        return text
    return _SURROGATES.sub("\ufffd", text)


def _as_id_array(ids, vocab_size: int) -> np.ndarray:
    """Validate a sequence of token ids and return it as a 1-D int64 array."""
    arr = np.asarray(ids)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.ndim != 1:
        raise ValueError(f"token ids must be a 1-D sequence, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"token ids must be integers, got dtype {arr.dtype}")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"token id {bad} is out of range for a vocabulary of {vocab_size}")
    return arr.astype(np.int64, copy=False)


class Tokenizer:
    """Interface shared by the CLLM tokenizers."""

    #: short name stored in the JSON form ("byte" or "bpe")
    kind: str = ""

    @property
    def vocab_size(self) -> int:
        """Number of distinct token ids; every id is in ``[0, vocab_size)``."""
        raise NotImplementedError

    def encode(self, text: str) -> np.ndarray:
        """Token ids of ``text`` as a 1-D ``np.int32`` array."""
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> List[np.ndarray]:
        """Encode several texts; same result as ``[encode(t) for t in texts]``."""
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        """Text of a sequence of token ids (invalid UTF-8 becomes U+FFFD)."""
        raise NotImplementedError

    def decode_stream(self) -> Optional[Callable[[int], str]]:
        """A decoder of one sequence's ids as they come, for streaming generation: step(id) returns the text that
        id completes ("" while a character is incomplete); the steps add up to `decode` of the ids, but for a
        character still incomplete at the end. None (the default): no such decoder, decode everything again."""
        return None

    def to_json(self) -> str:
        """Serialise to a JSON string readable by :func:`tokenizer_from_json`."""
        raise NotImplementedError

    #: role ("bos", "eos", "pad", "unk") -> the special token's text; empty for tokenizers without any
    special_tokens: Dict[str, str] = {}

    @property
    def special_ids(self) -> Dict[str, int]:
        """role -> token id of the special tokens (e.g. {"eos": 50256} for GPT-2's tokenizer)."""
        return {}

    @property
    def eos_id(self) -> Optional[int]:
        """The end-of-text token's id, or None."""
        return self.special_ids.get("eos")

    def token_bytes(self) -> np.ndarray:
        """[vocab_size] int64: the UTF-8 bytes each token stands for (a special token: its text's), so that the
        bytes of a token sequence are the sum over it (bits per byte compares models across tokenizers)."""
        raise NotImplementedError

    def save(self, path: PathLike) -> None:
        """Write :meth:`to_json` to ``path`` atomically."""
        data = self.to_json().encode("utf-8")
        atomic_write(path, lambda f: f.write(data), what="tokenizer",
                     missing_dir="directory to save the tokenizer in not found")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"


class ByteTokenizer(Tokenizer):
    """One token per UTF-8 byte: ids 0..255, no training, lossless."""

    kind = "byte"

    @property
    def vocab_size(self) -> int:
        return 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(_utf8(text), dtype=np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        arr = _as_id_array(ids, 256)
        return arr.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def decode_stream(self) -> Callable[[int], str]:
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")  # holds an incomplete character back
        return lambda token: utf8.decode(bytes(_as_id_array([token], 256).astype(np.uint8)))

    def token_bytes(self) -> np.ndarray:
        return np.ones(256, dtype=np.int64)

    def to_json(self) -> str:
        return json.dumps({"type": "byte"})

    def __eq__(self, other) -> bool:
        return isinstance(other, ByteTokenizer)

    def __hash__(self) -> int:
        return hash("ByteTokenizer")


def tokenizer_from_json(s: str) -> Tokenizer:
    """Restore a tokenizer from the string made by :meth:`Tokenizer.to_json`."""
    if isinstance(s, (bytes, bytearray)):
        s = bytes(s).decode("utf-8", errors="replace")
    if not isinstance(s, str):
        raise TypeError(f"tokenizer JSON must be a str, got {type(s).__name__}")
    try:
        spec = json.loads(s)
    except (json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"tokenizer JSON is not valid JSON: {e}") from None
    if not isinstance(spec, dict):
        raise ValueError(f"tokenizer JSON must be an object, got {type(spec).__name__}")
    kind = spec.get("type")
    if kind is None:
        raise ValueError("tokenizer JSON has no 'type' field (is this a CLLM tokenizer file?)")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        from .bpe import BPETokenizer, _hf
        inner = spec.get("tokenizer")
        if not isinstance(inner, str):
            raise ValueError("BPE tokenizer JSON needs a 'tokenizer' field holding the HF tokenizer JSON string")
        hf = _hf()
        try:
            hf_tok = hf.Tokenizer.from_str(inner)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # the Rust side raises a plain Exception, or a PanicException (BaseException)
            raise ValueError(f"BPE tokenizer JSON could not be parsed by 'tokenizers': {e}") from None
        return BPETokenizer(hf_tok, spec.get("special_tokens") or {})
    raise ValueError(f"unknown tokenizer type {kind!r} (expected 'byte' or 'bpe')")


def load_tokenizer(path: PathLike) -> Tokenizer:
    """Load a tokenizer saved with :meth:`Tokenizer.save`."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(2, "tokenizer file not found", str(path))
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: tokenizer file is not UTF-8 text") from None
    try:
        return tokenizer_from_json(text)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
