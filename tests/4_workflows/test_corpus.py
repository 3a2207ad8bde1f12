"""Tests for cllm.data's corpus reading and prepare: read_corpus, the default corpus, prepare (splits, tokenizers,
determinism, limits, errors) and streaming (bounded memory, the same tokens as encoding whole files)."""

import json

import numpy as np
import pytest

from cllm.data import (
    default_corpus_files,
    load_tokens,
    prepare,
    read_corpus,
)
from cllm.data.tokenizer import ByteTokenizer, load_tokenizer
from cllm.data.bpe import BPETokenizer

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
# Streaming: bounded memory, the same tokens as encoding whole files
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("tokenizer", ["byte", "bpe:400"])
def test_prepare_streams_files_in_pieces_with_the_tokens_of_whole_files(tmp_path, monkeypatch, tokenizer):
    """Blocks and pieces far smaller than the files (a multi-byte character cut by every few blocks, long and
    short lines): the token files hold exactly the tokens of each file encoded whole. (A line over 4 pieces must
    be cut anywhere: exact for bytes only.)"""
    import cllm.data.corpus as corpus

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
    import cllm.data.corpus as corpus

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


@pytest.mark.slow
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


# ----------------------------------------------------------------------------
# BPE training in bounded memory
# ----------------------------------------------------------------------------
def test_bpe_is_trained_on_a_bounded_sample_taken_across_the_corpus(tmp_path, monkeypatch):
    """The trainer holds every distinct word (a 30 MB corpus took 1.7 GB): it gets BPE_SAMPLE_BYTES of the
    training text at most, taken evenly across it, so its memory does not grow with the corpus."""
    import cllm.data.corpus as corpus

    monkeypatch.setattr(corpus, "BPE_SAMPLE_BYTES", 3000)
    monkeypatch.setattr(corpus, "_PIECE_CHARS", 200)
    monkeypatch.setattr(corpus, "_BLOCK", 256)
    for i in range(20):
        (tmp_path / "c").mkdir(exist_ok=True)
        (tmp_path / "c" / f"{i:02d}.txt").write_text("".join(f"doc{i} line {j}\n" for j in range(200)))
    given = []
    real = BPETokenizer.train.__func__

    def spy(cls, texts, vocab_size, **kw):
        texts = list(texts)
        given.extend(texts)
        return real(cls, texts, vocab_size, **kw)

    monkeypatch.setattr(BPETokenizer, "train", classmethod(spy))
    s = prepare([tmp_path / "c"], tmp_path / "out", "bpe:300", val_fraction=0.1)
    assert s["bytes"] > 10 * 3000
    assert 2500 < sum(len(t.encode()) for t in given) <= 3000
    docs = {int(w[3:]) for t in given for w in t.split() if w.startswith("doc")}
    assert len(docs) >= 10  # spread across the files, not the first ones only


def test_bpe_that_cannot_fit_is_refused_before_training(tmp_path, monkeypatch, capsys):
    import cllm.core.system as system
    from cllm import cli

    (tmp_path / "a.txt").write_text("some words here\n" * 65_536)  # 1 MiB: its BPE needs up to 160 MiB
    monkeypatch.setattr(system, "available_memory", lambda: 100 << 20)
    monkeypatch.setattr(BPETokenizer, "train", None)  # never reached
    assert cli.main(["prepare", str(tmp_path / "a.txt"), "--out", str(tmp_path / "out"), "--tokenizer", "bpe"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "training a BPE tokenizer on 1.0 MiB of text needs 160.0 MiB" in err[0], err
    assert "use the byte tokenizer" in err[0] and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_bpe_under_an_address_space_limit_is_refused_not_aborted(tmp_path):
    """`ulimit -v`: the Rust trainer's allocation failed and aborted the process (status 134). The memory check
    counts the room the limit leaves: one line, status 2."""
    import subprocess
    import sys
    from pathlib import Path

    import cllm

    rng = np.random.default_rng(0)
    words = rng.integers(ord("a"), ord("z") + 1, size=(1_000_000, 8), dtype=np.uint8)  # 8 MB of distinct words
    words[:, 7] = ord(" ")
    words[11::12, 7] = ord("\n")
    (tmp_path / "words.txt").write_bytes(words.tobytes())
    code = ("import resource, sys\n"
            "size = int(open('/proc/self/statm').read().split()[0]) * 4096\n"
            "resource.setrlimit(resource.RLIMIT_AS, (size + (400 << 20),) * 2)\n"
            "from cllm.cli import main\n"
            f"sys.exit(main(['prepare', {str(tmp_path / 'words.txt')!r}, '--out', {str(tmp_path / 'out')!r}, "
            "'--tokenizer', 'bpe']))\n")
    env = {"PYTHONPATH": str(Path(cllm.__file__).parent.parent), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", "import cllm.cli\n" + code], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, (r.returncode, r.stderr[-2000:])
    assert "training a BPE tokenizer on 4.0 MiB of text needs 640.0 MiB of memory" in r.stderr
