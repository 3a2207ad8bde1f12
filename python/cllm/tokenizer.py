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
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Union

import numpy as np

from .errors import MissingFileError
from .files import atomic_write

__all__ = [
    "Tokenizer",
    "ByteTokenizer",
    "BPETokenizer",
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


def _hf():
    """Import the Hugging Face ``tokenizers`` package with a clear error."""
    try:
        import tokenizers
    except ImportError as e:  # pragma: no cover - dependency of the package
        raise ImportError(
            "BPETokenizer needs the 'tokenizers' package: pip install tokenizers"
        ) from e
    return tokenizers


def _chunk_text(text: str, target: int) -> List[str]:
    """Split ``text`` into pieces of about ``target`` characters for batch encoding.

    Cuts are made only just before a newline whose preceding character is not
    whitespace.  The GPT-2 pre-tokenisation regex used by the ByteLevel
    pre-tokenizer always has a token boundary there and no match looks across
    it, so encoding the pieces separately gives exactly the ids of encoding
    the whole text at once.
    """
    n = len(text)
    if n <= target:
        return [text]
    pieces: List[str] = []
    start = 0
    while n - start > target:
        pos = text.find("\n", start + target)
        while pos != -1 and text[pos - 1].isspace():
            pos = text.find("\n", pos + 1)
        if pos == -1:
            break
        pieces.append(text[start:pos])
        start = pos
    pieces.append(text[start:])
    return pieces


class BPETokenizer(Tokenizer):
    """Byte-level BPE tokenizer backed by a Hugging Face ``tokenizers.Tokenizer``.

    Create one with :meth:`train`, or restore one with
    :func:`tokenizer_from_json` / :func:`load_tokenizer`.
    """

    kind = "bpe"
    #: texts longer than this many characters are cut into pieces (at safe
    #: places, see :func:`_chunk_text`) and encoded in parallel
    chunk_chars: int = 1 << 16

    def __init__(self, hf_tokenizer, special_tokens: Optional[Dict[str, str]] = None) -> None:
        _check_hf_tokenizer(hf_tokenizer)
        self._tok = hf_tokenizer
        self._vocab_size = int(hf_tokenizer.get_vocab_size(with_added_tokens=True))
        self.special_tokens = _check_special_tokens(hf_tokenizer, special_tokens or {})

    @property
    def special_ids(self) -> Dict[str, int]:
        return {role: self._tok.token_to_id(text) for role, text in self.special_tokens.items()}

    @classmethod
    def train(
        cls,
        files_or_texts: Union[str, PathLike, Iterable[Union[str, PathLike]]],
        vocab_size: int,
        *,
        min_frequency: int = 2,
        show_progress: bool = False,
    ) -> "BPETokenizer":
        """Train a byte-level BPE on some text.

        ``files_or_texts``: one item or an iterable of items, where a
        :class:`str` is taken as *text* and a :class:`pathlib.Path` (any
        ``os.PathLike``) as a UTF-8 *file* to read.  ``vocab_size`` (>= 257)
        is the largest vocabulary wanted: the 256 byte tokens plus up to
        ``vocab_size - 256`` merges.  A small corpus may support fewer merges,
        in which case :attr:`vocab_size` of the result is smaller.
        """
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)):
            raise TypeError(f"vocab_size must be an int, got {type(vocab_size).__name__}")
        if vocab_size < _MIN_BPE_VOCAB:
            raise ValueError(
                f"BPE vocab_size must be at least {_MIN_BPE_VOCAB} "
                f"(256 byte tokens + at least one merge), got {vocab_size}"
            )
        if vocab_size > 2**31 - 1:
            raise ValueError(f"BPE vocab_size {vocab_size} is too large")
        if isinstance(min_frequency, bool) or not isinstance(min_frequency, int) or min_frequency < 1:
            raise ValueError(f"min_frequency must be a positive int, got {min_frequency!r}")
        items = [files_or_texts] if isinstance(files_or_texts, (str, os.PathLike)) else files_or_texts
        chars = 0  # read as the trainer goes: an iterator of texts is never held whole

        hf = _hf()
        tok = hf.Tokenizer(hf.models.BPE())
        tok.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = hf.decoders.ByteLevel()
        trainer = hf.trainers.BpeTrainer(
            vocab_size=int(vocab_size),
            min_frequency=min_frequency,
            show_progress=show_progress,
            initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=[],
        )

        def pieces():
            nonlocal chars
            for item in items:
                text = _read_training_item(item)
                chars += len(text)
                yield from _chunk_text(text, cls.chunk_chars)

        tok.train_from_iterator(pieces(), trainer=trainer)
        if not chars:
            raise ValueError("cannot train a BPE tokenizer: the training text is empty")
        return cls(tok)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def hf_tokenizer(self):
        """The underlying ``tokenizers.Tokenizer`` (do not modify it)."""
        return self._tok

    def encode(self, text: str) -> np.ndarray:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> List[np.ndarray]:
        if isinstance(texts, str):
            raise TypeError("encode_batch expects a sequence of str, got a single str")
        pieces: List[str] = []
        counts: List[int] = []
        for text in texts:
            parts = [p for p in _chunk_text(_valid_text(text), self.chunk_chars) if p]
            pieces.extend(parts)
            counts.append(len(parts))
        encodings = self._tok.encode_batch(pieces, add_special_tokens=False) if pieces else []
        out: List[np.ndarray] = []
        i = 0
        for c in counts:
            arrays = [np.asarray(e.ids, dtype=np.int32) for e in encodings[i : i + c]]
            i += c
            out.append(np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int32))
        return out

    def decode(self, ids) -> str:
        arr = _as_id_array(ids, self._vocab_size)
        if arr.size == 0:
            return ""
        return self._tok.decode(arr.tolist(), skip_special_tokens=False)

    def decode_stream(self) -> Optional[Callable[[int], str]]:
        try:  # the tokenizers library's own streaming decoder (tokenizers >= 0.21)
            from tokenizers.decoders import DecodeStream
        except ImportError:
            return None
        stream = DecodeStream(skip_special_tokens=False)
        return lambda token: stream.step(self._tok, int(_as_id_array([token], self._vocab_size)[0])) or ""

    def token_bytes(self) -> np.ndarray:
        if getattr(self, "_token_bytes", None) is None:
            chars = _byte_level_chars()
            added = {t.content for t in self._tok.get_added_tokens_decoder().values()}
            out = np.zeros(self._vocab_size, dtype=np.int64)
            for i in range(self._vocab_size):
                piece = self._tok.id_to_token(i) or ""
                # byte-level pieces spell each byte as one character; an added token is its own text
                plain = piece in added or any(ch not in chars for ch in piece)
                out[i] = len(piece.encode("utf-8")) if plain else len(piece)
            self._token_bytes = out
        return self._token_bytes

    def to_json(self) -> str:
        spec = {"type": "bpe", "tokenizer": self._tok.to_str()}
        if self.special_tokens:
            spec["special_tokens"] = self.special_tokens
        return json.dumps(spec)

    def __eq__(self, other) -> bool:
        return (isinstance(other, BPETokenizer) and self._tok.to_str() == other._tok.to_str()
                and self.special_tokens == other.special_tokens)

    __hash__ = None  # mutable wrapper around a foreign object: not hashable


SPECIAL_ROLES = ("bos", "eos", "pad", "unk")


def _check_special_tokens(tok, special_tokens) -> Dict[str, str]:
    """role -> token text, each role known and each token in the vocabulary."""
    if not isinstance(special_tokens, dict):
        raise ValueError(f"special_tokens must be a mapping role -> token, got {type(special_tokens).__name__}")
    for role, text in special_tokens.items():
        if role not in SPECIAL_ROLES:
            raise ValueError(f"unknown special token role {role!r} (expected one of {', '.join(SPECIAL_ROLES)})")
        if not isinstance(text, str) or tok.token_to_id(text) is None:
            raise ValueError(f"special token {role}={text!r} is not in the tokenizer's vocabulary")
    return dict(special_tokens)


def _byte_level_chars() -> set:
    """The 256 characters a byte-level BPE spells the bytes with (GPT-2's bytes_to_unicode)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    return {chr(b) for b in printable} | {chr(256 + n) for n in range(256 - len(printable))}


def _read_training_item(item) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, os.PathLike):
        path = Path(item)
        if not path.is_file():
            raise MissingFileError(2, "BPE training file not found", str(path))
        data = path.read_bytes()
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(
                f"{path}: BPE training file is not valid UTF-8 (byte offset {e.start})"
            ) from None
    raise TypeError(
        "BPE training items must be str (text) or os.PathLike (file), "
        f"got {type(item).__name__}"
    )


def _check_hf_tokenizer(tok) -> None:
    """Check that a Hugging Face tokenizer is a lossless byte-level BPE."""
    hf = _hf()
    if not isinstance(tok, hf.Tokenizer):
        raise TypeError(f"expected a tokenizers.Tokenizer, got {type(tok).__name__}")
    # Token ids must be exactly 0..n-1: checked before to_str(), which walks every id up to the largest one
    # (a corrupt file with one id near 2**31 would hang it), and so that every id fits the model's vocab.
    vocab = tok.get_vocab(with_added_tokens=True)
    ids = sorted(vocab.values())
    if ids != list(range(len(ids))):
        raise ValueError(f"BPE tokenizer vocabulary ids are not 0..{len(ids) - 1}: they range from "
                         f"{ids[0] if ids else None} to {ids[-1] if ids else None} with gaps or repeats")
    missing = [c for c in hf.pre_tokenizers.ByteLevel.alphabet() if c not in vocab]
    if missing:
        raise ValueError(f"BPE tokenizer vocabulary lacks {len(missing)} of the 256 byte-level symbols; CLLM "
                         "needs all of them so that encoding is lossless")
    spec = json.loads(tok.to_str())
    model = (spec.get("model") or {}).get("type")
    if model != "BPE":
        raise ValueError(f"BPE tokenizer JSON has model type {model!r}, expected 'BPE'")
    for part in ("pre_tokenizer", "decoder"):
        kind = (spec.get(part) or {}).get("type")
        if kind != "ByteLevel":
            raise ValueError(
                f"BPE tokenizer JSON has {part} {kind!r}; CLLM needs 'ByteLevel' "
                "so that encoding is lossless"
            )
    if spec.get("normalizer") is not None:
        raise ValueError("BPE tokenizer JSON has a normalizer; CLLM needs none (lossless encoding)")
    for option in ("continuing_subword_prefix", "end_of_word_suffix", "dropout"):
        if spec["model"].get(option):
            raise ValueError(f"BPE tokenizer JSON sets model {option} {spec['model'][option]!r}; CLLM needs none "
                             "(lossless, deterministic encoding)")
    # whatever else a foreign or corrupt file sets, encoding must be lossless: check it on every byte value and
    # a few kinds of text
    try:
        enc = tok.encode(_LOSSLESS_PROBE, add_special_tokens=False)
        back = tok.decode(enc.ids, skip_special_tokens=False)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # a Rust error or panic
        raise ValueError(f"BPE tokenizer fails to encode text: {e}") from None
    if back != _LOSSLESS_PROBE or any(not 0 <= i < len(ids) for i in enc.ids):
        raise ValueError("BPE tokenizer is not lossless: decoding its encoding does not give the text back")


_LOSSLESS_PROBE = ("".join(chr(i) for i in range(1, 256))
                   + " def f(x):\n    return x * 2  # note\n\n\tclass A: pass\r\n"
                   "  héllo wörld ✓ 日本語 🙂 \u200b x")


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
