"""The trainable byte-level BPE tokenizer (Hugging Face ``tokenizers``: ByteLevel pre-tokenizer and decoder, no
normaliser), checked lossless on construction; and the safe cut points for encoding long texts in pieces."""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Union

import numpy as np

from ..errors import MissingFileError
from .tokenizer import PathLike, Tokenizer, _MIN_BPE_VOCAB, _as_id_array, _valid_text

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

        stop = threading.Event()  # set when the caller gave up: the feeding ends, so does the training

        def pieces():
            nonlocal chars
            for item in items:
                if stop.is_set():
                    return
                text = _read_training_item(item)
                chars += len(text)
                yield from _chunk_text(text, cls.chunk_chars)

        _abandonable(lambda: tok.train_from_iterator(pieces(), trainer=trainer), stop)
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


def _abandonable(work: Callable[[], None], stop: threading.Event) -> None:
    """work() in a thread while the main thread waits where Ctrl-C reaches it: the Rust trainer looks at no
    signals (one on a 187 MB corpus noticed Ctrl-C 25 s late). Interrupted, the wait sets `stop` and lets the
    thread finish in the background, its result dropped."""
    if threading.current_thread() is not threading.main_thread():
        return work()  # signals go to the main thread alone
    failed = []

    def run():
        try:
            work()
        except BaseException as e:  # handed to the caller
            failed.append(e)

    worker = threading.Thread(target=run, name="cllm-bpe-train", daemon=True)
    worker.start()
    try:
        while worker.is_alive():
            worker.join(0.1)
    except BaseException:
        stop.set()
        raise
    if failed:
        raise failed[0]


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
