"""Tests for cllm.data: token files, corpus reading, prepare and batch loading."""

import json
import struct
import zlib

import numpy as np
import pytest

from cllm.data import (
    HEADER_SIZE,
    MAGIC,
    NUM_TOKENS_OFFSET,
    BatchLoader,
    TokenFile,
    default_corpus_files,
    eval_batches,
    load_tokens,
    prepare,
    read_corpus,
    write_token_chunks,
    write_tokens,
)
from cllm.errors import CLLMError
from cllm.tokenizer import BPETokenizer, ByteTokenizer, load_tokenizer

# ----------------------------------------------------------------------------
# Token files
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("vocab_size, itemsize", [(256, 2), (65536, 2), (65537, 4), (100_000, 4)])
def test_write_load_round_trip(tmp_path, vocab_size, itemsize):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab_size, size=5000)
    tokens[0] = vocab_size - 1
    path = tmp_path / "t.bin"
    assert write_tokens(path, tokens, vocab_size) == path
    assert path.stat().st_size == HEADER_SIZE + 5000 * itemsize
    tf = load_tokens(path)
    assert isinstance(tf, TokenFile)
    assert isinstance(tf.tokens, np.memmap)
    assert not tf.tokens.flags.writeable
    assert tf.tokens.dtype.itemsize == itemsize
    assert tf.vocab_size == vocab_size and tf.bytes_per_token == itemsize
    assert len(tf) == 5000
    np.testing.assert_array_equal(tf.tokens, tokens)
    assert [p.name for p in tmp_path.iterdir()] == ["t.bin"]  # temp file was renamed


def test_header_layout(tmp_path):
    path = tmp_path / "t.bin"
    write_tokens(path, [1, 2, 3], 300)
    raw = path.read_bytes()
    assert raw[:8] == MAGIC == b"CLLMTOK\0"
    assert struct.unpack_from("<III", raw, 8) == (1, 2, 300)
    assert struct.unpack_from("<Q", raw, NUM_TOKENS_OFFSET) == (3,)
    assert struct.unpack_from("<I", raw, 20) == (1,)  # flags: the checksum is set
    assert struct.unpack_from("<I", raw, 32) == (zlib.crc32(np.array([1, 2, 3], "<u2").tobytes()),)
    assert raw[36:64] == bytes(28)
    assert np.frombuffer(raw[64:], dtype="<u2").tolist() == [1, 2, 3]


def test_write_empty_and_overwrite(tmp_path):
    path = tmp_path / "t.bin"
    write_tokens(path, [], 10)
    assert len(load_tokens(path)) == 0
    write_tokens(path, np.array([9, 0], dtype=np.uint8), 10)
    assert load_tokens(path).tokens.tolist() == [9, 0]


def test_write_validation(tmp_path):
    path = tmp_path / "t.bin"
    with pytest.raises(ValueError, match="out of range"):
        write_tokens(path, [0, 10], 10)
    with pytest.raises(ValueError, match="out of range"):
        write_tokens(path, [-1], 10)
    with pytest.raises(ValueError, match="1-D"):
        write_tokens(path, [[1, 2]], 10)
    with pytest.raises(TypeError):
        write_tokens(path, [0.5], 10)
    with pytest.raises(ValueError, match="vocab_size"):
        write_tokens(path, [0], 0)
    with pytest.raises(FileNotFoundError, match="nodir"):
        write_tokens(tmp_path / "nodir" / "t.bin", [0], 10)
    assert not path.exists() and list(tmp_path.iterdir()) == []


def _valid_file(tmp_path, tokens=(1, 2, 3, 4), vocab_size=300):
    path = tmp_path / "t.bin"
    write_tokens(path, list(tokens), vocab_size)
    return path


def _patch(path, offset, fmt, value):
    raw = bytearray(path.read_bytes())
    struct.pack_into(fmt, raw, offset, value)
    path.write_bytes(bytes(raw))


def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        load_tokens(tmp_path / "nope.bin")
    with pytest.raises(CLLMError, match="nope.bin"):  # also a CLLMError
        load_tokens(tmp_path / "nope.bin")


def test_load_foreign_file(tmp_path):
    path = tmp_path / "foreign.bin"
    path.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(ValueError, match=r"foreign\.bin.*not a CLLM token file"):
        load_tokens(path)
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="not a CLLM token file"):
        load_tokens(path)


def test_load_truncated_header(tmp_path):
    path = _valid_file(tmp_path)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ValueError, match="t.bin.*truncated"):
        load_tokens(path)


def test_load_bad_version(tmp_path):
    path = _valid_file(tmp_path)
    _patch(path, 8, "<I", 7)
    with pytest.raises(ValueError, match="t.bin.*version 7"):
        load_tokens(path)


@pytest.mark.parametrize("bpt", [0, 1, 3, 8])
def test_load_bad_bytes_per_token(tmp_path, bpt):
    path = _valid_file(tmp_path)
    _patch(path, 12, "<I", bpt)
    with pytest.raises(ValueError, match=f"t.bin.*bytes_per_token {bpt}"):
        load_tokens(path)


def test_load_vocab_too_big_for_uint16(tmp_path):
    path = _valid_file(tmp_path)
    _patch(path, 16, "<I", 70000)
    with pytest.raises(ValueError, match="does not fit"):
        load_tokens(path)


def test_load_truncated_and_trailing(tmp_path):
    path = _valid_file(tmp_path)
    good = path.read_bytes()
    path.write_bytes(good[:-1])
    with pytest.raises(ValueError, match=r"t\.bin.*size mismatch.*truncated.*4 tokens"):
        load_tokens(path)
    path.write_bytes(good + b"\0\0")
    with pytest.raises(ValueError, match="size mismatch.*trailing"):
        load_tokens(path)
    path.write_bytes(good)
    _patch(path, NUM_TOKENS_OFFSET, "<Q", 1000)
    with pytest.raises(ValueError, match="size mismatch"):
        load_tokens(path)


def test_load_token_out_of_vocab(tmp_path):
    path = _valid_file(tmp_path, tokens=(1, 2, 250, 4), vocab_size=300)
    _patch(path, 16, "<I", 100)  # now token 250 >= vocab_size 100
    with pytest.raises(ValueError, match=r"t\.bin.*token 250 at index 2 is >= vocab_size 100"):
        load_tokens(path)
    assert len(load_tokens(path, check_range=False)) == 4


def test_damaged_token_file_is_detected(tmp_path):
    path = _valid_file(tmp_path, tokens=(1, 2, 250, 4), vocab_size=300)
    raw = bytearray(path.read_bytes())
    raw[HEADER_SIZE + 2] ^= 0x04  # token 2 becomes 6: in range, but not what was written
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"t\.bin: token file is damaged \(checksum mismatch\)"):
        load_tokens(path)


def test_token_file_without_checksum_loads_with_a_warning(tmp_path):
    path = _valid_file(tmp_path, tokens=(1, 2, 3), vocab_size=300)
    _patch(path, 20, "<I", 0)  # the flags of an older file
    with pytest.warns(RuntimeWarning, match=r"t\.bin: token file has no checksum"):
        assert load_tokens(path).tokens.tolist() == [1, 2, 3]
    _patch(path, 20, "<I", 6)
    with pytest.raises(ValueError, match="invalid flags 6"):
        load_tokens(path)


def test_token_chunks_are_written_as_they_come(tmp_path):
    """write_token_chunks takes a generator: each chunk is checked and written, never the whole stream."""
    seen = []

    def chunks():
        for i in range(5):
            seen.append(i)
            yield np.full(1000, i, dtype=np.int64)

    path = write_token_chunks(tmp_path / "s.bin", chunks(), 70000)
    tf = load_tokens(path)
    assert seen == list(range(5)) and tf.bytes_per_token == 4
    assert np.array_equal(tf.tokens, np.repeat(np.arange(5), 1000))

    def bad():
        yield np.zeros(3, np.int32)
        yield np.array([70000])

    with pytest.raises(ValueError, match=r"b\.bin: token value 70000 is out of range"):
        write_token_chunks(tmp_path / "b.bin", bad(), 70000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.bin"]  # no partial file, no temporary left


def test_full_disk_on_a_token_file_names_it(tmp_path):
    import errno
    import os

    def full_disk():  # the write of the second chunk fails as on a full disk
        yield np.arange(10)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OSError) as e:
        write_token_chunks(tmp_path / "train.bin", full_disk(), 300)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "train.bin")
    assert "cannot write the token file" in str(e.value) and list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------
# Corpus
# ----------------------------------------------------------------------------


def test_default_corpus_files():
    files = default_corpus_files()
    assert len(files) > 100
    assert all(f.suffix == ".py" and f.is_file() for f in files)
    assert not any(p in ("site-packages", "dist-packages") for f in files for p in f.parts)
    assert files == default_corpus_files()
    assert any(f.name == "os.py" for f in files)


def _make_corpus(root, n=8):
    root.mkdir(parents=True, exist_ok=True)
    docs = {}
    for i in range(n):
        text = f"document {i}: " + ("lorem ipsum dolor sit amet é 🎉 " * (5 + 7 * i)) + "\n"
        path = root / f"doc{i:02d}.txt"
        path.write_text(text, encoding="utf-8")
        docs[path.name] = text
    return docs


def test_read_corpus_files_and_dirs(tmp_path):
    docs = _make_corpus(tmp_path / "c")
    sub = tmp_path / "c" / "sub"
    sub.mkdir()
    (sub / "inner.md").write_text("inner text\n", encoding="utf-8")
    (sub / "empty.txt").write_text("", encoding="utf-8")
    hidden = tmp_path / "c" / ".git"
    hidden.mkdir()
    (hidden / "objects").write_bytes(b"\0\1\2")
    (tmp_path / "c" / "__pycache__").mkdir()
    (tmp_path / "c" / "__pycache__" / "x.pyc").write_bytes(b"\0\0")
    extra = tmp_path / "extra.txt"
    extra.write_text("extra\n", encoding="utf-8")

    out = read_corpus([tmp_path / "c", str(extra)])
    names = [p.name for p, _ in out]
    assert names == sorted(docs) + ["inner.md", "extra.txt"]  # empty file left out
    assert {p.name: t for p, t in out if p.name in docs} == docs
    assert read_corpus(extra)[0][1] == "extra\n"


def test_read_corpus_errors(tmp_path):
    binary = tmp_path / "b" / "image.png"
    binary.parent.mkdir()
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR")
    with pytest.raises(ValueError, match=r"image\.png.*NUL"):
        read_corpus([tmp_path / "b"])

    latin = tmp_path / "l" / "latin1.txt"
    latin.parent.mkdir()
    latin.write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt.*UTF-8"):
        read_corpus([latin])

    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(ValueError, match="no input files"):
        read_corpus([empty_dir])
    (empty_dir / "blank.txt").write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="no non-empty text files"):
        read_corpus([empty_dir])
    with pytest.raises(ValueError, match="no input files"):
        read_corpus([])
    with pytest.raises(FileNotFoundError, match="missing"):
        read_corpus([tmp_path / "missing"])


def test_read_corpus_skip_undecodable(tmp_path):
    d = tmp_path / "mixed"
    d.mkdir()
    (d / "a.txt").write_text("good text\n", encoding="utf-8")
    (d / "b.bin").write_bytes(b"\0\1\2")
    (d / "c.txt").write_bytes(b"\xff\xfe bad")
    out = read_corpus([d], skip_undecodable=True)
    assert [p.name for p, _ in out] == ["a.txt"]
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "b.bin").write_bytes(b"\0")
    with pytest.raises(ValueError, match="no non-empty text files"):
        read_corpus([only_bad], skip_undecodable=True)


# ----------------------------------------------------------------------------
# prepare
# ----------------------------------------------------------------------------


def test_prepare_byte(tmp_path):
    docs = _make_corpus(tmp_path / "c", n=12)
    out = tmp_path / "out"
    summary = prepare([tmp_path / "c"], out, ByteTokenizer(), val_fraction=0.2, seed=3)
    json.dumps(summary)  # JSON-serialisable
    assert summary["files"] == 12
    assert summary["split"] == "files"
    assert summary["train_files"] + summary["val_files"] == 12 and summary["val_files"] >= 1
    total = sum(len(t.encode("utf-8")) for t in docs.values())
    assert summary["bytes"] == total
    # byte tokens: every byte plus a 2-byte separator between documents of a split
    assert summary["train_tokens"] + summary["val_tokens"] == total + 2 * (12 - 2)
    val_bytes = summary["val_tokens"] - 2 * (summary["val_files"] - 1)
    assert 0 < val_bytes <= 0.2 * total

    tok = load_tokenizer(out / "tokenizer.json")
    assert isinstance(tok, ByteTokenizer)
    train, val = load_tokens(out / "train.bin"), load_tokens(out / "val.bin")
    assert (len(train), len(val)) == (summary["train_tokens"], summary["val_tokens"])
    train_text, val_text = tok.decode(train.tokens), tok.decode(val.tokens)
    for text in docs.values():
        assert (text in train_text) != (text in val_text)  # each document in exactly one split
    assert len(train_text) + len(val_text) == sum(len(t) for t in docs.values()) + 2 * 10


def test_prepare_deterministic(tmp_path):
    _make_corpus(tmp_path / "c", n=12)
    a = prepare([tmp_path / "c"], tmp_path / "a", ByteTokenizer(), val_fraction=0.2, seed=5)
    b = prepare([tmp_path / "c"], tmp_path / "b", ByteTokenizer(), val_fraction=0.2, seed=5)
    assert {k: v for k, v in a.items() if k != "out_dir"} == {k: v for k, v in b.items() if k != "out_dir"}
    for name in ("train.bin", "val.bin", "tokenizer.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    vals = set()
    for seed in range(6):
        prepare([tmp_path / "c"], tmp_path / "s", ByteTokenizer(), val_fraction=0.2, seed=seed)
        vals.add((tmp_path / "s" / "val.bin").read_bytes())
    assert len(vals) > 1  # the seed changes the split


def test_prepare_single_file_tail_split(tmp_path):
    text = "".join(f"line {i} with some text\n" for i in range(200))
    f = tmp_path / "one.txt"
    f.write_text(text, encoding="utf-8")
    summary = prepare([f], tmp_path / "out", ByteTokenizer(), val_fraction=0.1)
    assert summary["split"] == "tail"
    n = len(text.encode("utf-8"))
    assert summary["train_tokens"] + summary["val_tokens"] == n
    assert summary["val_tokens"] == round(0.1 * n)
    tok = ByteTokenizer()
    train = load_tokens(tmp_path / "out" / "train.bin").tokens
    val = load_tokens(tmp_path / "out" / "val.bin").tokens
    assert tok.decode(np.concatenate([train, val])) == text


def test_prepare_bpe(tmp_path):
    docs = _make_corpus(tmp_path / "c", n=10)
    texts = list(docs.values())
    bpe = BPETokenizer.train(texts, vocab_size=320)
    summary = prepare([tmp_path / "c"], tmp_path / "out", bpe, val_fraction=0.25)
    assert summary["tokenizer"] == "bpe" and summary["vocab_size"] == bpe.vocab_size
    tok = load_tokenizer(tmp_path / "out" / "tokenizer.json")
    assert tok == bpe
    train = load_tokens(tmp_path / "out" / "train.bin")
    val = load_tokens(tmp_path / "out" / "val.bin")
    assert train.vocab_size == bpe.vocab_size
    assert len(train) + len(val) < summary["bytes"]  # BPE compresses
    joined = tok.decode(train.tokens) + "\x00" + tok.decode(val.tokens)
    assert all(t in joined for t in texts)


def test_prepare_bpe_spec(tmp_path):
    _make_corpus(tmp_path / "c", n=10)
    summary = prepare([tmp_path / "c"], tmp_path / "out", "bpe:300", val_fraction=0.25)
    tok = load_tokenizer(tmp_path / "out" / "tokenizer.json")
    assert isinstance(tok, BPETokenizer) and 256 < tok.vocab_size <= 300
    assert summary["vocab_size"] == tok.vocab_size
    with pytest.raises(ValueError, match="tokenizer spec"):
        prepare([tmp_path / "c"], tmp_path / "out", "bpe:12")
    with pytest.raises(ValueError, match="tokenizer spec"):
        prepare([tmp_path / "c"], tmp_path / "out", "sentencepiece")


def test_prepare_max_bytes_and_default_corpus(tmp_path):
    summary = prepare(None, tmp_path / "out", ByteTokenizer(), max_bytes=100_000, seed=1)
    assert 0 < summary["bytes"] <= 100_000
    assert summary["files"] >= 1
    again = prepare(None, tmp_path / "out2", ByteTokenizer(), max_bytes=100_000, seed=1)
    assert (tmp_path / "out" / "train.bin").read_bytes() == (tmp_path / "out2" / "train.bin").read_bytes()
    assert summary["bytes"] == again["bytes"]


def test_prepare_max_bytes_cuts_file(tmp_path):
    f = tmp_path / "one.txt"
    f.write_text("é" * 1000, encoding="utf-8")  # 2000 bytes
    summary = prepare([f], tmp_path / "out", ByteTokenizer(), max_bytes=501)
    assert summary["bytes"] == 500  # cut at a character boundary


def test_prepare_errors(tmp_path):
    _make_corpus(tmp_path / "c", n=3)
    for bad in (0.0, 0.6, -0.1):
        with pytest.raises(ValueError, match="val_fraction"):
            prepare([tmp_path / "c"], tmp_path / "out", ByteTokenizer(), val_fraction=bad)
    with pytest.raises(ValueError, match="max_bytes"):
        prepare([tmp_path / "c"], tmp_path / "out", ByteTokenizer(), max_bytes=0)
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("a", encoding="utf-8")
    with pytest.raises(ValueError, match="too small to split"):
        prepare([tiny], tmp_path / "out", ByteTokenizer())
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no input files"):
        prepare([empty], tmp_path / "out", ByteTokenizer())
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------
# BatchLoader / eval_batches
# ----------------------------------------------------------------------------


@pytest.fixture
def token_file(tmp_path):
    # tokens 0..N-1 (mod vocab) make every window easy to recognise
    tokens = np.arange(5000) % 60000
    write_tokens(tmp_path / "train.bin", tokens, 60000)
    return load_tokens(tmp_path / "train.bin")


def test_batches_shape_shift_and_range(token_file):
    B, T = 4, 16
    loader = BatchLoader(token_file.tokens, B, T, seed=0)
    assert loader.tokens is token_file.tokens  # the memmap is used, not copied
    for _ in range(20):
        x, y = loader.next_batch()
        assert x.shape == y.shape == (B, T)
        assert x.dtype == y.dtype == np.int32
        assert x.flags.c_contiguous and y.flags.c_contiguous
        assert type(x) is np.ndarray
        np.testing.assert_array_equal(y, x + 1)  # y is x shifted by one token
        np.testing.assert_array_equal(x, x[:, :1] + np.arange(T))  # contiguous windows
        assert x[:, 0].min() >= 0 and y[:, -1].max() <= 4999


def test_batches_cover_both_ends():
    tokens = np.arange(10, dtype=np.uint16)
    loader = BatchLoader(tokens, 8, 8, seed=0)  # offsets can only be 0 or 1
    starts = set()
    for _ in range(10):
        x, y = loader.next_batch()
        starts.update(x[:, 0].tolist())
        assert y[:, -1].max() <= 9
    assert starts == {0, 1}
    x, y = BatchLoader(tokens[:9], 2, 8).next_batch()  # exactly seq_len + 1 tokens
    assert x.tolist() == [list(range(8))] * 2 and y.tolist() == [list(range(1, 9))] * 2


def test_batches_deterministic(token_file):
    a = BatchLoader(token_file, 3, 8, seed=42)  # a TokenFile is accepted too
    b = BatchLoader(token_file.tokens, 3, 8, seed=42)
    c = BatchLoader(token_file.tokens, 3, 8, seed=43)
    batches_a = [a.next_batch() for _ in range(5)]
    batches_b = [b.next_batch() for _ in range(5)]
    batches_c = [c.next_batch() for _ in range(5)]
    for (xa, ya), (xb, yb) in zip(batches_a, batches_b):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    assert any(not np.array_equal(xa, xc) for (xa, _), (xc, _) in zip(batches_a, batches_c))


def test_state_dict_resume(token_file):
    loader = BatchLoader(token_file.tokens, 4, 8, seed=7)
    for _ in range(3):
        loader.next_batch()
    state = json.loads(json.dumps(loader.state_dict()))  # survives JSON
    assert state["step"] == 3
    expected = [loader.next_batch() for _ in range(3)]

    resumed = BatchLoader(token_file.tokens, 4, 8, seed=999)
    resumed.load_state_dict(state)
    got = [resumed.next_batch() for _ in range(3)]
    for (xe, ye), (xg, yg) in zip(expected, got):
        np.testing.assert_array_equal(xe, xg)
        np.testing.assert_array_equal(ye, yg)
    assert resumed.step == 6 and resumed.seed == 7


def test_state_dict_mismatch(token_file):
    state = BatchLoader(token_file.tokens, 4, 8).state_dict()
    with pytest.raises(ValueError, match="seq_len"):
        BatchLoader(token_file.tokens, 4, 9).load_state_dict(state)
    with pytest.raises(ValueError, match="global batch"):
        BatchLoader(token_file.tokens, 5, 8).load_state_dict(state)
    with pytest.raises(ValueError, match="num_tokens"):
        BatchLoader(token_file.tokens[:100], 4, 8).load_state_dict(state)
    with pytest.raises(ValueError, match="missing"):
        BatchLoader(token_file.tokens, 4, 8).load_state_dict({"step": 1})
    # same global batch split over two ranks is fine
    BatchLoader(token_file.tokens, 2, 8, rank=1, world_size=2).load_state_dict(state)


def test_rank_sharding(token_file):
    B, T = 3, 8
    single = BatchLoader(token_file.tokens, 2 * B, T, seed=11)
    ranks = [BatchLoader(token_file.tokens, B, T, seed=11, rank=r, world_size=2) for r in range(2)]
    for _ in range(5):
        x, y = single.next_batch()
        parts = [r.next_batch() for r in ranks]
        np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), x)
        np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), y)


def test_eval_batches(token_file):
    a = eval_batches(token_file.tokens, 4, 8, num_batches=3)
    b = eval_batches(token_file.tokens, 4, 8, num_batches=3)
    assert len(a) == 3
    for (xa, ya), (xb, yb) in zip(a, b):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
        np.testing.assert_array_equal(ya, xa + 1)
    whole = eval_batches(token_file.tokens, 4, 8, num_batches=2, seed=5)
    halves = [eval_batches(token_file.tokens, 2, 8, num_batches=2, seed=5, rank=r, world_size=2) for r in range(2)]
    for i in range(2):
        np.testing.assert_array_equal(np.concatenate([halves[0][i][0], halves[1][i][0]]), whole[i][0])
    with pytest.raises(ValueError, match="num_batches"):
        eval_batches(token_file.tokens, 4, 8, num_batches=0)


def test_eval_batches_are_drawn_as_they_are_read(token_file):
    """A million validation batches cost nothing until read (they were a list built up front, outside the
    memory check)."""
    import tracemalloc

    tracemalloc.start()
    many = eval_batches(token_file.tokens, 64, 64, num_batches=1_000_000)
    assert len(many) == 1_000_000 and tracemalloc.get_traced_memory()[1] < 1 << 20
    tracemalloc.stop()
    first = [b for _, b in zip(range(2), many)]
    again = [b for _, b in zip(range(2), many)]
    for (x, y), (x2, y2) in zip(first, again):
        assert np.array_equal(x, x2) and np.array_equal(y, y2)
    assert np.array_equal(many[1][0], first[1][0])


def test_loader_validation(token_file):
    small = np.arange(8)
    with pytest.raises(ValueError, match=r"too small for one batch: 8 tokens.*seq_len=8.*9"):
        BatchLoader(small, 1, 8)
    with pytest.raises(ValueError, match="too small"):
        eval_batches(small, 1, 16, num_batches=1)
    with pytest.raises(ValueError, match="batch_size"):
        BatchLoader(token_file.tokens, 0, 8)
    with pytest.raises(ValueError, match="seq_len"):
        BatchLoader(token_file.tokens, 2, -1)
    with pytest.raises(ValueError, match="rank"):
        BatchLoader(token_file.tokens, 2, 8, rank=2, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        BatchLoader(token_file.tokens, 2, 8, rank=-1)
    with pytest.raises(ValueError, match="world_size"):
        BatchLoader(token_file.tokens, 2, 8, world_size=0)
    with pytest.raises(ValueError, match="1-D"):
        BatchLoader(np.zeros((10, 10), dtype=np.int32), 2, 4)


# ----------------------------------------------------------------------------
# Streaming: bounded memory, the same tokens as encoding whole files
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("tokenizer", ["byte", "bpe:400"])
def test_prepare_streams_files_in_pieces_with_the_tokens_of_whole_files(tmp_path, monkeypatch, tokenizer):
    """Blocks and pieces far smaller than the files (a multi-byte character cut by every few blocks, long and
    short lines): the token files hold exactly the tokens of each file encoded whole. (A line over 4 pieces must
    be cut anywhere: exact for bytes only.)"""
    import cllm.corpus as corpus

    monkeypatch.setattr(corpus, "_BLOCK", 1000)
    monkeypatch.setattr(corpus, "_PIECE_CHARS", 700)
    rng = np.random.default_rng(0)
    words = ["déjà", "vu", "x", "    ", "\n", "\n\n", "€uro", "def", "(a, b):", "  \n", "🙂"]
    long_line = "z" * 5000 if tokenizer == "byte" else ""
    texts = ["".join(rng.choice(words, 3000)) + long_line for _ in range(3)]
    for i, t in enumerate(texts):
        (tmp_path / f"{i}.txt").write_text(t, encoding="utf-8")
    s = prepare([tmp_path / f"{i}.txt" for i in range(3)], tmp_path / "out", tokenizer, val_fraction=0.4)
    tok = load_tokenizer(tmp_path / "out" / "tokenizer.json")
    order = np.random.Generator(np.random.PCG64(0)).permutation(3)
    sep = tok.encode("\n\n")
    val = [order[0]]  # the first file in shuffled order fits in 40%
    assert s["val_files"] == 1
    train = [i for i in order if i not in val]
    expect_train = np.concatenate([tok.encode(texts[train[0]]), sep, tok.encode(texts[train[1]])])
    assert np.array_equal(load_tokens(tmp_path / "out" / "train.bin").tokens, expect_train)
    assert np.array_equal(load_tokens(tmp_path / "out" / "val.bin").tokens, tok.encode(texts[val[0]]))


def test_read_corpus_names_an_invalid_byte_past_the_first_block(tmp_path, monkeypatch):
    import cllm.corpus as corpus

    monkeypatch.setattr(corpus, "_BLOCK", 64)
    f = tmp_path / "a.txt"
    f.write_bytes("é".encode() * 100 + b"\xff" + b"abc")
    with pytest.raises(ValueError, match=r"a.txt: not valid UTF-8 text \(invalid byte at offset 200\)"):
        read_corpus(f)
    f.write_bytes(b"x" * 130 + b"\0")
    with pytest.raises(ValueError, match=r"a.txt: not a text file \(NUL byte at offset 130\)"):
        read_corpus(f)
    f.write_bytes("é".encode() * 40 + b"\xc3")  # cut in the middle of a character at the end
    with pytest.raises(ValueError, match=r"invalid byte at offset 80"):
        read_corpus(f)


def test_prepare_names_an_unreadable_directory(tmp_path, monkeypatch):
    """A subdirectory that cannot be listed is an error naming it, not skipped (tests run as root, so the
    permission error is simulated)."""
    import os

    (tmp_path / "c" / "secret").mkdir(parents=True)
    (tmp_path / "c" / "a.txt").write_text("hello " * 100)
    (tmp_path / "c" / "secret" / "b.txt").write_text("world " * 100)
    real = os.scandir

    def scandir(path="."):
        if str(path).endswith("secret"):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(PermissionError, match="cannot read corpus directory") as e:
        prepare([tmp_path / "c"], tmp_path / "out", "byte")
    assert e.value.filename == str(tmp_path / "c" / "secret")


PREPARE_UNDER_LIMIT = r"""
import resource, sys
limit = int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
from cllm.data import prepare
s = prepare([sys.argv[1]], sys.argv[2], "byte", val_fraction=0.01)
print(s["train_tokens"] + s["val_tokens"])
"""


def test_prepare_runs_in_memory_smaller_than_the_corpus(tmp_path):
    """A corpus file four times the headroom that RLIMIT_AS leaves above the interpreter prepares under that limit
    (as one stream, split at its tail through a temporary file): memory does not grow with the corpus. Reading the
    whole file, as prepare did, fails at once."""
    import subprocess
    import sys

    import cllm

    env = {"PYTHONPATH": str(__import__("pathlib").Path(cllm.__file__).parent.parent), "OMP_NUM_THREADS": "1",
           "CLLM_MEMORY_CHECK": "0"}
    probe = subprocess.run([sys.executable, "-c", "import cllm.data, resource; "
                            "print(open('/proc/self/statm').read().split()[0])"],
                           capture_output=True, text=True, env=env, check=True)
    base = int(probe.stdout) * 4096  # the interpreter's address space after the imports
    headroom = 72 << 20  # prepare's own peak is ~55 MiB of pieces and token arrays, whatever the corpus
    corpus = tmp_path / "big"
    corpus.mkdir()
    line = ("the quick brown fox jumps over the lazy dog " * 20 + "\n").encode()
    block = line * ((8 << 20) // len(line))
    with open(corpus / "one.txt", "wb") as f:
        for _ in range(4 * headroom // len(block)):
            f.write(block)
    size = (corpus / "one.txt").stat().st_size
    assert size >= 4 * headroom - len(block)
    r = subprocess.run([sys.executable, "-c", PREPARE_UNDER_LIMIT, str(corpus), str(tmp_path / "out"),
                        str(base + headroom)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert int(r.stdout) == size
