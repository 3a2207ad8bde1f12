"""Evaluation: `cllm eval` figures against a NumPy computation from Model.forward, sliding windows, scoring of
continuations and multiple choice, and one-line errors for bad input."""
import json
import math

import numpy as np
import pytest

import cllm
from cllm import cli
from cllm.infer.evaluation import evaluate_choices, evaluate_files, score, windows
from cllm.data.tokenizer import ByteTokenizer
from cllm.data.bpe import BPETokenizer

CFG = cllm.ModelConfig(vocab_size=256, max_seq_len=16, embedding_dim=32, num_layers=2, num_heads=4, ff_dim=64)
TEXT = "def add(a, b):\n    return a + b  # sum\n\nclass Point:\n    x = 1\n    y = 2\n" * 2


@pytest.fixture(scope="module")
def model(helpers):
    return helpers.add_noise(cllm.Model(CFG, seed=3), seed=0, scale=0.1)


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("eval") / "model.safetensors"
    cllm.save_checkpoint(path, model, None, ByteTokenizer())
    return path


def numpy_figures(model, tokens, T):
    """Non-overlapping windows (stride T), computed from forward's logits in float64 by hand."""
    nll, correct, top5, n = [], 0, 0, 0
    for b in range(0, len(tokens) - 1, T):
        x = tokens[b:b + T + 1]
        logits = model.forward(x[None, :-1])[0].astype(np.float64)
        y = x[1:]
        for z, t in zip(logits, y):
            lse = math.log(np.exp(z - z.max()).sum()) + z.max()
            nll.append(lse - z[t])
            correct += int(np.argmax(z) == t)
            top5 += int(t in np.argsort(-z, kind="stable")[:5])
            n += 1
    return float(np.mean(nll)), correct / n, top5 / n, n


def test_windows_score_every_token_once_with_enough_context():
    for n in (2, 3, 16, 17, 40, 101):
        for T in (1, 4, 16):
            for S in range(1, T + 1):
                scored = []
                for b, e, first in windows(n, T, S):
                    assert 0 <= first < e - b <= T
                    for pos in range(first, e - b):
                        scored.append(b + pos + 1)  # the token index predicted
                        assert b == 0 or pos + 1 >= T - S  # context at least T - S after the first window
                assert scored == list(range(1, n)), (n, T, S)


def test_file_figures_equal_numpy(model, tmp_path):
    f = tmp_path / "a.txt"
    f.write_text(TEXT)
    tokens = ByteTokenizer().encode(TEXT)
    figures = evaluate_files(model, ByteTokenizer(), [f], stride=CFG.max_seq_len)
    loss, acc, top5, n = numpy_figures(model, tokens, CFG.max_seq_len)
    assert figures["tokens"] == n == len(tokens) - 1 and figures["bytes"] == n
    assert abs(figures["loss"] - loss) < 1e-5
    assert figures["accuracy"] == acc and figures["top5_accuracy"] == top5
    assert abs(figures["perplexity"] - math.exp(loss)) < 1e-4 * math.exp(loss)
    assert abs(figures["bits_per_byte"] - figures["loss"] / math.log(2)) < 1e-12  # byte tokenizer


def test_overlapping_windows_and_several_files(model, tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(TEXT)
    b.write_text(TEXT[:23])
    tok = ByteTokenizer()
    pooled = evaluate_files(model, tok, [a, b], stride=5, batch_size=3)
    each = [evaluate_files(model, tok, [p], stride=5, batch_size=1) for p in (a, b)]
    assert pooled["tokens"] == sum(e["tokens"] for e in each) == len(TEXT) - 1 + 22
    mean = sum(e["loss"] * e["tokens"] for e in each) / pooled["tokens"]
    # float32 round-off only: a batch of up to 16 tokens takes the few-rows products (decode's), whose sums are
    # ordered differently from the GEMM's that a larger batch takes
    assert abs(pooled["loss"] - mean) < 1e-6 * mean
    # a token file gives the figures of its text (the same batches: the same bits)
    cllm.data.write_tokens(tmp_path / "a.bin", tok.encode(TEXT), 256)
    assert evaluate_files(model, tok, [tmp_path / "a.bin"], stride=5, batch_size=1) == each[0]


def test_bits_per_byte_counts_the_bytes_of_bpe_tokens(model, tmp_path):
    bpe = BPETokenizer.train(TEXT * 3 + "héllo ✓", 280)
    m = cllm.Model(CFG.replace(vocab_size=bpe.vocab_size), seed=0)
    text = "héllo ✓ " + TEXT
    f = tmp_path / "u.txt"
    f.write_text(text)
    figures = evaluate_files(m, bpe, [f])
    first = bpe.encode(text)[0]
    assert figures["bytes"] == len(text.encode()) - bpe.token_bytes()[first]  # all but the first token's
    assert abs(figures["bits_per_byte"] - figures["loss"] * figures["tokens"] / figures["bytes"] / math.log(2)) < 1e-9


def test_score_is_the_summed_log_softmax_of_the_continuation(model):
    tok = ByteTokenizer()
    (ll, n), (ll2, n2) = score(model, tok, "def add(a,", [" b):", "c"])
    assert (n, n2) == (4, 1)
    seq = tok.encode("def add(a, b):")
    z = model.forward(seq[None, :-1])[0].astype(np.float64)
    logp = z - (np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1))[:, None]
    expected = sum(logp[i, seq[i + 1]] for i in range(len(seq) - 5, len(seq) - 1))
    assert abs(ll - expected) < 1e-5
    # trailing spaces of the context move to the continuation (lm-evaluation-harness)
    assert score(model, tok, "def add(a,", [" b):"])[0] == pytest.approx(score(model, tok, "def add(a, ", ["b):"])[0])
    # a long context keeps its newest tokens
    assert score(model, tok, "x" * 100 + "def add(a,", [" b):"])[0][1] == 4
    with pytest.raises(ValueError, match="EOS"):
        score(model, tok, "", ["a"])
    with pytest.raises(ValueError, match="no tokens"):
        score(model, tok, "a", [""])


def test_multiple_choice_accuracy_equals_a_hand_computation(model, tmp_path):
    tok = ByteTokenizer()
    rows = [{"context": "def add(a,", "endings": ["b):", "bbbbbbbbbbbb):"], "label": 0},
            {"context": "class", "endings": ["Point:", "x", "Point: y"], "label": 2},
            {"context": "return a", "endings": ["+ b", "- b"], "label": 1}]
    path = tmp_path / "mc.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    right = right_norm = 0
    for r in rows:
        lls = [score(model, tok, r["context"], [" " + e])[0][0] for e in r["endings"]]
        right += int(np.argmax(lls) == r["label"])
        right_norm += int(np.argmax([ll / len(e) for ll, e in zip(lls, r["endings"])]) == r["label"])
    got = evaluate_choices(model, tok, path)
    assert got == {"accuracy": right / 3, "acc_norm": right_norm / 3, "examples": 3}


def test_cli_eval_json_and_text(checkpoint, tmp_path, capsys, model):
    f = tmp_path / "a.txt"
    f.write_text(TEXT)
    assert cli.main(["eval", str(checkpoint), "--data", str(f), "--json", "--no-progress", "--stride", "16"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"loss", "perplexity", "bits_per_byte", "accuracy", "top5_accuracy", "tokens", "bytes"}
    assert abs(out["loss"] - numpy_figures(model, ByteTokenizer().encode(TEXT), 16)[0]) < 1e-5
    assert cli.main(["eval", str(checkpoint), "--data", str(f), "--no-progress"]) == 0
    assert "bits/byte" in capsys.readouterr().out
    mc = tmp_path / "mc.jsonl"
    mc.write_text(json.dumps({"context": "a", "endings": ["b", "c"], "label": 1}))
    assert cli.main(["eval", str(checkpoint), "--choices", str(mc), "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {"accuracy", "acc_norm", "examples"}


@pytest.mark.parametrize("args, words", [
    (["--data", "{missing}"], ["missing.txt"]),
    (["--data", "{short}"], ["short.txt", "at least 2"]),
    (["--data", "{binary}"], ["binary.txt", "UTF-8"]),
    (["--data", "{text}", "--stride", "0"], ["--stride", "0"]),
    (["--data", "{text}", "--stride", "17"], ["--stride", "17"]),
    (["--data", "{text}", "--batch-size", "0"], ["--batch-size"]),
    (["--data", "{text}", "--threads", "0"], ["threads"]),
    (["--choices", "{bad_json}"], ["bad.jsonl:2", "JSON"]),
    (["--choices", "{no_label}"], ["nolabel.jsonl:1", "label"]),
    (["--choices", "{one_ending}"], ["one.jsonl:1", "endings"]),
    (["--choices", "{empty}"], ["empty.jsonl", "no examples"]),
    ([], ["--data", "--choices"]),
    (["--data", "{text}", "--choices", "{empty}"], ["not allowed"]),
])
def test_cli_eval_bad_input_is_one_line(checkpoint, tmp_path, capsys, args, words):
    files = {"missing": tmp_path / "missing.txt", "short": tmp_path / "short.txt", "binary": tmp_path / "binary.txt",
             "text": tmp_path / "t.txt", "bad_json": tmp_path / "bad.jsonl", "no_label": tmp_path / "nolabel.jsonl",
             "one_ending": tmp_path / "one.jsonl", "empty": tmp_path / "empty.jsonl"}
    files["short"].write_text("a")
    files["binary"].write_bytes(b"ab\xff\xfe")
    files["text"].write_text(TEXT)
    files["bad_json"].write_text('{"context": "a", "endings": ["b", "c"], "label": 0}\n{oops\n')
    files["no_label"].write_text('{"context": "a", "endings": ["b", "c"]}\n')
    files["one_ending"].write_text('{"context": "a", "endings": ["b"], "label": 0}\n')
    files["empty"].write_text("\n")
    argv = ["eval", str(checkpoint)] + [a.format(**files) for a in args]
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)


def test_figures_of_huge_or_non_finite_losses_are_not_made_up():
    """A loss above 709 nats has an infinite perplexity (it was capped at exp(709)); rows whose logits are NaN or
    Inf rank nothing, so they count against accuracy and top-5 (NaN compared false everywhere: top-5 was 1.0)."""
    from cllm.infer.evaluation import Totals

    big = Totals()
    big.add(np.array([[0.0, 1e4, 0.0]]), np.array([0]), np.ones(3, np.int64))
    figures = big.figures()
    assert figures["loss"] > 709 and figures["perplexity"] == math.inf
    bad = Totals()
    bad.add(np.array([[np.nan, 0.0, 0.0, 0.0], [0.0, 5.0, 0.0, 0.0]]), np.array([1, 1]), np.ones(4, np.int64))
    figures = bad.figures()
    assert figures["accuracy"] == 0.5 and figures["top5_accuracy"] == 0.5
    assert math.isnan(figures["loss"]) and math.isnan(figures["perplexity"])
