"""Text generation: stop strings, EOS, streaming pieces, and `cllm sample` --stream / --num-samples /
--interactive with one-line errors for bad values."""
import io
import sys

import numpy as np
import pytest

import cllm
from cllm import cli
from cllm.infer.generation import _TextStream, generate_text
from cllm.data.tokenizer import ByteTokenizer

CFG = cllm.ModelConfig(vocab_size=256, max_seq_len=32, embedding_dim=32, num_layers=1, num_heads=2, ff_dim=64)
BYTES = ByteTokenizer()


@pytest.fixture(scope="module")
def model(helpers):
    return helpers.add_noise(cllm.Model(CFG, seed=2), seed=1, scale=0.2)


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("gen") / "m.safetensors"
    cllm.save_checkpoint(path, model, None, BYTES)
    return path


def test_stop_strings_cut_the_text_and_streaming_adds_up(model):
    free = generate_text(model, BYTES, ["ab", "x"], 40, temperature=0.0, stop_at_eos=False)
    stop = free[0][5:8]
    pieces = {0: [], 1: []}
    out = generate_text(model, BYTES, ["ab", "x"], 40, temperature=0.0, stop=[stop, "\x00never"],
                        on_text=lambda i, p: pieces[i].append(p))
    for i in (0, 1):
        cut = free[i].find(stop)
        assert out[i] == (free[i] if cut < 0 else free[i][:cut])
        assert "".join(pieces[i]) == out[i]
    assert out[0] == free[0][:free[0].find(stop)]


def test_stream_never_shows_a_stop_string_or_half_a_character():
    class Chars:  # a tokenizer whose tokens are characters, for a hand-made token sequence
        def decode(self, ids):
            return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    s = _TextStream(Chars(), ["END", "ENx"])
    shown = [s.add(b) for b in b"xyEN"]
    assert "".join(shown) == "xy" and s.final is None  # "EN" might start a stop string
    shown += [s.add(b) for b in "é".encode()]  # two bytes: nothing shown after the first
    assert shown[-2:] == ["", "ENé"]
    assert s.add(ord("E")) == "" and s.add(ord("N")) == "" and s.add(ord("D")) == "" and s.final == "xyENé"


def test_generation_ends_at_eos(model, monkeypatch):
    free = model.generate(BYTES.encode("ab"), 30, temperature=0.0)
    eos = int(free[4])
    monkeypatch.setattr(ByteTokenizer, "eos_id", property(lambda self: eos))  # a byte tokenizer with an EOS
    text = generate_text(model, BYTES, ["ab"], 30, temperature=0.0)[0]
    assert text == BYTES.decode(free[:free.tolist().index(eos)])
    assert generate_text(model, BYTES, ["ab"], 30, temperature=0.0, stop_at_eos=False)[0] == BYTES.decode(free)


def run_sample(capsys, monkeypatch, *args, stdin=None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin.encode())))
    try:
        code = cli.main(["sample", *map(str, args)])
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_sample_stream_num_samples_interactive(checkpoint, capsys, monkeypatch):
    common = ["--checkpoint", checkpoint, "--prompt", "ab", "--max-new-tokens", 20, "--seed", 4]
    code, plain, _ = run_sample(capsys, monkeypatch, *common)
    code2, streamed, _ = run_sample(capsys, monkeypatch, *common, "--stream")
    assert code == code2 == 0 and plain == streamed and plain.startswith("ab")
    code, three, _ = run_sample(capsys, monkeypatch, *common, "--num-samples", 3)
    samples = three[:-1].split("\n---\n")
    assert code == 0 and len(samples) == 3 and samples[0] + "\n" == plain and len(set(samples)) > 1
    code, three_streamed, _ = run_sample(capsys, monkeypatch, *common, "--num-samples", 3, "--stream")
    assert three_streamed == three
    code, inter, _ = run_sample(capsys, monkeypatch, *common[:2], *common[4:], "--interactive", "--temperature", 0,
                                stdin="ab\nxy\n")
    greedy = [generate_text(cllm.load_checkpoint(checkpoint).model, BYTES, [p], 20, temperature=0.0)[0]
              for p in ("ab", "xy")]
    assert code == 0 and inter == f"ab{greedy[0]}\nxy{greedy[1]}\n"


@pytest.mark.parametrize("args, words", [
    (["--max-new-tokens", -1], ["--max-new-tokens"]),
    (["--num-samples", 0], ["--num-samples"]),
    (["--temperature", "nan"], ["--temperature"]),
    (["--temperature", -1], ["--temperature"]),
    (["--repetition-penalty", 0], ["--repetition-penalty"]),
    (["--repetition-penalty", "inf"], ["--repetition-penalty"]),
    (["--frequency-penalty", "nan"], ["--frequency-penalty"]),
    (["--presence-penalty", "-inf"], ["--presence-penalty"]),
    (["--stop", ""], ["--stop"]),
    (["--top-k", 0], ["top_k"]),
    (["--top-p", 2], ["top_p"]),
    (["--num-samples", "x"], ["--num-samples", "invalid"]),
])
def test_sample_bad_values_are_one_line(checkpoint, capsys, monkeypatch, args, words):
    code, _, err = run_sample(capsys, monkeypatch, "--checkpoint", checkpoint, *args)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)


MIXED = "plain text, café naïve, 日本語のテキスト, 🙂🚀 and\nnew lines " * 8


@pytest.fixture(scope="module")
def bpe():
    from cllm.data.bpe import BPETokenizer
    return BPETokenizer.train([MIXED], 300)


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_decode_stream_adds_up_to_decode(kind, bpe):
    """A tokenizer's streaming decoder gives, token by token, a prefix of decode() of the tokens so far, and all of
    it unless the last character is incomplete: over real text cut anywhere and over random ids (invalid UTF-8)."""
    tok = BYTES if kind == "byte" else bpe
    rng = np.random.default_rng(0)
    enc = tok.encode(MIXED)
    for trial in range(200):
        if trial % 2:
            ids = rng.integers(0, tok.vocab_size, rng.integers(1, 40))
        else:
            start = int(rng.integers(0, enc.size - 1))
            ids = enc[start:start + int(rng.integers(1, 60))]
        step, streamed = tok.decode_stream(), ""
        for n, t in enumerate(ids, 1):
            streamed += step(int(t))
            full = tok.decode(ids[:n])
            assert full.startswith(streamed), (kind, trial, n)
            assert streamed == full or full.endswith("\ufffd"), (kind, trial, n)


def test_text_stream_streams_as_the_full_decode_does(bpe):
    """_TextStream with the tokenizer's streaming decoder and with decode() alone (a tokenizer without one) ends
    with the same text and stop, and each's pieces add up to its text."""
    class DecodeOnly:
        def decode(self, ids):
            return bpe.decode(ids)

    ids = bpe.encode(MIXED)[:150]
    for stops in ([], ["テキスト"], ["🚀 and\nnew"], ["never there"]):
        results = []
        for tok in (bpe, DecodeOnly()):
            s = _TextStream(tok, stops)
            pieces = [s.add(int(t)) for t in ids if s.final is None]
            pieces.append(s.flush(s.text()))
            assert "".join(pieces) == s.text()
            results.append((s.text(), s.final))
        assert results[0] == results[1], stops
        if stops and stops[0] != "never there":
            assert results[0][1] == bpe.decode(ids)[:bpe.decode(ids).find(stops[0])]
