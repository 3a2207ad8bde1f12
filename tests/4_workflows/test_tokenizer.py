"""Tests for cllm.data.tokenizer and cllm.data.bpe: byte and byte-level BPE tokenizers."""

import json

import numpy as np
import pytest

from cllm.data.bpe import BPETokenizer
from cllm.data.tokenizer import (
    ByteTokenizer,
    Tokenizer,
    load_tokenizer,
    tokenizer_from_json,
)

try:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    HAVE_HYPOTHESIS = True
except ImportError:  # pragma: no cover - hypothesis is a test extra
    HAVE_HYPOTHESIS = False

SAMPLES = [
    "",
    "a",
    " ",
    "hello world",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\n\n\n",
    "héllo wörld — ñ ç ß",
    "日本語のテキスト、中文，한국어",
    "emoji 🎉🚀👩‍👩‍👧‍👦 flags 🇫🇷",
    "combining e\u0301 and zero\u200bwidth",
    "\x00\x01\x1f control \x7f",
    "'s 're 've 'll don't",
    "def f(x):\n    return x ** 2  # comment\n",
    "\ufeffBOM at start",
    "\U0010ffff last code point",
    "numbers 1234567890 3.14159",
    "   \n\t  \n",
]

CORPUS = (
    "def add(a, b):\n    return a + b\n\n"
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n\n"
    "The quick brown fox jumps over the lazy dog. "
    "Ünïcödé tëxt and 日本語 appear here too.\n"
) * 40


@pytest.fixture(scope="module")
def bpe():
    return BPETokenizer.train([CORPUS], vocab_size=400)


# ----------------------------------------------------------------------------
# ByteTokenizer
# ----------------------------------------------------------------------------


def test_byte_encode_is_utf8_bytes():
    tok = ByteTokenizer()
    assert tok.vocab_size == 256
    ids = tok.encode("héllo 🎉")
    assert ids.dtype == np.int32
    assert ids.tolist() == list("héllo 🎉".encode("utf-8"))


@pytest.mark.parametrize("text", SAMPLES)
def test_byte_round_trip(text):
    tok = ByteTokenizer()
    assert tok.decode(tok.encode(text)) == text


def test_byte_empty_string():
    tok = ByteTokenizer()
    ids = tok.encode("")
    assert ids.shape == (0,) and ids.dtype == np.int32
    assert tok.decode(ids) == ""
    assert tok.decode([]) == ""


def test_byte_lone_surrogate_becomes_replacement_char():
    tok = ByteTokenizer()
    ids = tok.encode("a\ud800b\udfff")
    assert tok.decode(ids) == "a\ufffdb\ufffd"


def test_byte_decode_invalid_utf8_is_replaced():
    tok = ByteTokenizer()
    assert tok.decode([0x61, 0xFF, 0x62]) == "a\ufffdb"
    assert tok.decode(np.array([0xE6, 0x97], dtype=np.int64)) == "\ufffd"  # cut character


def test_byte_decode_rejects_bad_ids():
    tok = ByteTokenizer()
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([256])
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([-1])
    with pytest.raises(TypeError):
        tok.decode([1.5])
    with pytest.raises(TypeError):
        tok.encode(b"bytes")


# ----------------------------------------------------------------------------
# BPETokenizer
# ----------------------------------------------------------------------------


def test_bpe_train_vocab_and_compression(bpe):
    assert isinstance(bpe, Tokenizer)
    assert 256 < bpe.vocab_size <= 400
    ids = bpe.encode(CORPUS)
    assert ids.dtype == np.int32
    assert ids.min() >= 0 and ids.max() < bpe.vocab_size
    assert len(ids) < len(CORPUS.encode("utf-8")) / 2  # merges were learnt
    assert bpe.decode(ids) == CORPUS


@pytest.mark.parametrize("text", SAMPLES)
def test_bpe_round_trip_fixed(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


def test_bpe_lone_surrogate_and_bad_ids(bpe):
    assert bpe.decode(bpe.encode("x\udc80y")) == "x\ufffdy"
    with pytest.raises(ValueError, match="out of range"):
        bpe.decode([bpe.vocab_size])
    with pytest.raises(TypeError):
        bpe.encode(None)


def test_bpe_chunked_encoding_matches_whole_text(bpe):
    # Long texts are cut into pieces and batch-encoded; the ids must be those
    # of encoding the whole text in one go.
    text = "".join(SAMPLES) * 30 + CORPUS
    whole = bpe.hf_tokenizer.encode(text, add_special_tokens=False).ids
    small = BPETokenizer(bpe.hf_tokenizer)
    small.chunk_chars = 37
    assert small.encode(text).tolist() == whole
    batch = small.encode_batch(["", text, "abc"])
    assert batch[1].tolist() == whole
    assert batch[0].shape == (0,)
    assert bpe.decode(batch[2]) == "abc"


def test_bpe_train_from_files_and_texts(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text(CORPUS, encoding="utf-8")
    tok = BPETokenizer.train([f, "extra text " * 20], vocab_size=300)
    assert 256 < tok.vocab_size <= 300
    assert tok.decode(tok.encode(CORPUS)) == CORPUS


def test_bpe_train_validation(tmp_path):
    with pytest.raises(ValueError, match="at least 257"):
        BPETokenizer.train([CORPUS], vocab_size=256)
    with pytest.raises(TypeError):
        BPETokenizer.train([CORPUS], vocab_size="300")
    with pytest.raises(ValueError, match="empty"):
        BPETokenizer.train([""], vocab_size=300)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        BPETokenizer.train([tmp_path / "missing.txt"], vocab_size=300)
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt"):
        BPETokenizer.train([bad], vocab_size=300)
    with pytest.raises(TypeError):
        BPETokenizer.train([123], vocab_size=300)


if HAVE_HYPOTHESIS:

    @pytest.mark.slow
    @settings(max_examples=200, deadline=None)
    @given(st.text())
    def test_byte_round_trip_property(text):
        tok = ByteTokenizer()
        assert tok.decode(tok.encode(text)) == text

    @settings(max_examples=200, deadline=None)
    @given(st.text(max_size=200))  # the default alphabet has no lone surrogates
    def test_bpe_round_trip_property(text):
        tok = _property_bpe()
        assert tok.decode(tok.encode(text)) == text

    @settings(max_examples=100, deadline=None)
    @given(st.text(alphabet=st.sampled_from(list("ab \n\t\r.'é日🎉")), max_size=300), st.integers(1, 20))
    def test_bpe_chunking_property(text, chunk):
        tok = _property_bpe()
        small = BPETokenizer(tok.hf_tokenizer)
        small.chunk_chars = chunk
        assert small.encode(text).tolist() == tok.hf_tokenizer.encode(text).ids


_BPE_CACHE = []


def _property_bpe():
    if not _BPE_CACHE:
        _BPE_CACHE.append(BPETokenizer.train([CORPUS], vocab_size=400))
    return _BPE_CACHE[0]


# ----------------------------------------------------------------------------
# Serialisation
# ----------------------------------------------------------------------------


def test_byte_json_round_trip(tmp_path):
    tok = ByteTokenizer()
    assert json.loads(tok.to_json()) == {"type": "byte"}
    again = tokenizer_from_json(tok.to_json())
    assert isinstance(again, ByteTokenizer) and again == tok
    path = tmp_path / "tok.json"
    tok.save(path)
    assert isinstance(load_tokenizer(path), ByteTokenizer)


def test_bpe_json_round_trip(bpe, tmp_path):
    spec = json.loads(bpe.to_json())
    assert spec["type"] == "bpe" and isinstance(spec["tokenizer"], str)
    again = tokenizer_from_json(bpe.to_json())
    assert isinstance(again, BPETokenizer)
    assert again == bpe
    assert again.vocab_size == bpe.vocab_size
    for text in SAMPLES + [CORPUS]:
        assert again.encode(text).tolist() == bpe.encode(text).tolist()

    path = tmp_path / "sub" / "tokenizer.json"
    path.parent.mkdir()
    bpe.save(path)
    loaded = load_tokenizer(str(path))
    assert isinstance(loaded, BPETokenizer)
    assert loaded.encode(CORPUS).tolist() == bpe.encode(CORPUS).tolist()
    assert [p.name for p in path.parent.iterdir()] == ["tokenizer.json"]  # no temp files left


@pytest.mark.parametrize(
    "text, message",
    [
        ("not json at all", "not valid JSON"),
        ("[1, 2]", "must be an object"),
        ("{}", "no 'type'"),
        ('{"type": "wordpiece"}', "unknown tokenizer type"),
        ('{"type": "bpe"}', "'tokenizer' field"),
        ('{"type": "bpe", "tokenizer": "{}"}', "could not be parsed"),
        ('{"type": "bpe", "tokenizer": "garbage"}', "could not be parsed"),
    ],
)
def test_corrupt_json(text, message):
    with pytest.raises(ValueError, match=message):
        tokenizer_from_json(text)


def test_foreign_hf_tokenizer_rejected(bpe):
    inner = json.loads(bpe.hf_tokenizer.to_str())
    inner["decoder"] = None
    with pytest.raises(ValueError, match="decoder"):
        tokenizer_from_json(json.dumps({"type": "bpe", "tokenizer": json.dumps(inner)}))


def test_from_json_type_error():
    with pytest.raises(TypeError):
        tokenizer_from_json(42)


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_tokenizer(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{ truncated", encoding="utf-8")
    with pytest.raises(ValueError, match="bad.json.*not valid JSON"):
        load_tokenizer(bad)
    with pytest.raises(FileNotFoundError, match="nodir"):
        ByteTokenizer().save(tmp_path / "nodir" / "tok.json")
    binary = tmp_path / "bin.json"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match="bin.json"):
        load_tokenizer(binary)
