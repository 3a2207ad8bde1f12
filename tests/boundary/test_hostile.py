"""A hostile pass over the commands of issues 13, 14 and 17 (issue 18 item 6): `cllm eval`, `cllm info`, `cllm sample`'s
new options and `cllm train`'s new settings given absurd input. Each case: one line on stderr, status 2, no
traceback, no hang, nothing silently ignored. (The cases that already held are in test_eval.py,
test_generation_text.py, test_isa.py and test_trainer_config.py; these are the ones that failed before.)"""
import io
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

import cllm
from cllm import cli
from cllm.infer.evaluation import evaluate_tokens, read_eval_file
from cllm.data.tokenizer import ByteTokenizer
from cllm.train.config import TrainConfig

CFG = cllm.ModelConfig(vocab_size=256, max_seq_len=16, embedding_dim=32, num_layers=1, num_heads=4, ff_dim=64)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("hostile") / "m.safetensors"
    cllm.save_checkpoint(path, cllm.Model(CFG, seed=1), None, ByteTokenizer())
    return path


def run_cli(capsys, *argv):
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_line_error(code, err, *words):
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (code, err)
    for w in words:
        assert w in err, (w, err)


# ---- cllm eval ----------------------------------------------------------------------------------------
GOOD = {"context": "def f(a,", "endings": ["b):", "c):"], "label": 0}


@pytest.mark.parametrize("bad, words", [
    ({"context": "", "endings": ["b", "c"], "label": 0}, ["mc.jsonl:3", "context is empty", "EOS"]),
    ({"context": "a", "endings": ["b" * 40, "c"], "label": 0}, ["mc.jsonl:3", "more than max_seq_len 16"]),
    ('{"context": "a", "endings": ["b", "c"], "label": ' + "9" * 5000 + "}", ["mc.jsonl:3", "not valid JSON"]),
])
def test_eval_choices_errors_name_the_line_before_any_scoring(checkpoint, tmp_path, capsys, monkeypatch, bad, words):
    lines = [json.dumps(GOOD), json.dumps(GOOD), bad if isinstance(bad, str) else json.dumps(bad)]
    (tmp_path / "mc.jsonl").write_text("\n".join(lines) + "\n")

    def no_forward(*args, **kwargs):
        raise AssertionError("scored an example before checking them all")

    monkeypatch.setattr(cllm.Model, "forward", no_forward)
    code, _, err = run_cli(capsys, "eval", checkpoint, "--choices", tmp_path / "mc.jsonl", "--no-progress")
    assert_one_line_error(code, err, *words)


@pytest.mark.parametrize("option", ["--data", "--choices"])
@pytest.mark.parametrize("path", ["dir", "/dev/null"])
def test_eval_of_a_directory_or_device_says_so(checkpoint, tmp_path, capsys, option, path):
    path = tmp_path if path == "dir" else path
    code, _, err = run_cli(capsys, "eval", checkpoint, option, path, "--no-progress")
    assert_one_line_error(code, err, str(path), "not a regular file")


def test_eval_json_is_strict_json_with_non_finite_figures_as_null(tmp_path, capsys):
    """Finite weights whose logits overflow give a NaN loss: --json writes null, never the non-JSON NaN."""
    model = cllm.Model(CFG, seed=1)
    model.parameters()["ln_f.weight"][...] = 3e38
    cllm.save_checkpoint(tmp_path / "huge.safetensors", model, None, ByteTokenizer())
    (tmp_path / "t.txt").write_text("some text to score\n")
    code, out, err = run_cli(capsys, "eval", tmp_path / "huge.safetensors", "--data", tmp_path / "t.txt", "--json",
                             "--no-progress")

    def refuse(constant):
        raise AssertionError(f"{constant} is not JSON")
    figures = json.loads(out, parse_constant=refuse)
    assert code == 0 and figures["loss"] is None and figures["perplexity"] is None and figures["tokens"] == 18, err


def test_eval_choices_lines_may_hold_unicode_line_separators(checkpoint, tmp_path, capsys):
    """U+2028, U+2029 and U+0085 are valid inside JSON strings as they are: only "\\n" ends a JSONL line."""
    examples = [{"context": f"a{sep}b", "endings": [f"c{sep}", "d"], "label": 0} for sep in "\u2028\u2029\x85"]
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in examples),
                                       encoding="utf-8")
    code, out, err = run_cli(capsys, "eval", checkpoint, "--choices", tmp_path / "mc.jsonl", "--json", "--no-progress")
    assert code == 0 and json.loads(out)["examples"] == 3, err


# ---- cllm info: CLLM_ISA ------------------------------------------------------------------------------
def cllm_info(isa):
    env = dict(os.environ, CLLM_ISA=isa, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "cllm", "info"], capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize("isa, shown", [
    (" avx2", "CLLM_ISA=' avx2': unknown kernel variant"),
    ("", None),  # empty: auto
    ("AVX2", "CLLM_ISA=AVX2: unknown kernel variant"),
    ("avx2\nbaseline", "CLLM_ISA='avx2\\x0abaseline': unknown kernel variant"),
    ("x" * 100000, "CLLM_ISA='" + "x" * 40 + "'... (100000 bytes): unknown kernel variant"),
])
def test_odd_cllm_isa_values_are_one_readable_line(isa, shown):
    r = cllm_info(isa)
    if shown is None:
        reason = f"reason: {cllm.build_info()['reason']}"  # auto's: the best variant, bf16 by its measured speed
        assert r.returncode == 0 and r.stderr == "" and reason.split(" (")[0][:40] in r.stdout, r.stdout + r.stderr
        return
    assert r.returncode == 2 and r.stderr == f"cllm info: error: {shown}; use auto or one of: " \
        f"{', '.join(cllm.build_info()['variants_built'])}\n", r.stderr
    assert f"reason: {shown}" in r.stdout and len(r.stdout) < 2000  # the report, its reason on one line too


# ---- cllm sample -------------------------------------------------------------------------------------
@pytest.mark.parametrize("n, words", [(10 ** 15, ["number of prompts", "2147483647"]),
                                      (2 ** 31 - 1, ["2,147,483,647 prompt(s) needs", "of memory"])])
def test_a_huge_num_samples_fails_at_once(checkpoint, capsys, n, words):
    start = time.perf_counter()
    code, out, err = run_cli(capsys, "sample", "--checkpoint", checkpoint, "--num-samples", n)
    assert time.perf_counter() - start < 20 and out == ""
    assert_one_line_error(code, err, *words)


def test_interactive_stdin_not_utf8_is_one_line_naming_the_line(checkpoint, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"ab\nc\xff\xfed\n"), encoding="utf-8",
                                                      errors="surrogateescape"))
    code, out, err = run_cli(capsys, "sample", "--checkpoint", checkpoint, "--interactive", "--max-new-tokens", 3)
    assert out.startswith("ab")  # the first prompt was answered
    assert_one_line_error(code, err, "stdin line 2: not UTF-8 text (byte 1)")


def test_interactive_with_end_of_input_at_once_prints_nothing(checkpoint, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"")))
    assert run_cli(capsys, "sample", "--checkpoint", checkpoint, "--interactive") == (0, "", "")


# ---- cllm train: settings that would be ignored ----------------------------------------------------------
@pytest.mark.parametrize("kw, words", [
    (dict(optimizer="sgd", betas=(0.5, 0.5)), "betas is not a setting of optimizer sgd"),
    (dict(optimizer="sgd", eps=1e-6), "eps is not a setting of optimizer sgd"),
    (dict(optimizer="adamw", momentum=0.5), "momentum is not a setting of optimizer adamw"),
    (dict(sample_every=10, sample_tokens=0), "sample_every needs sample_tokens > 0"),
])
def test_settings_that_would_be_ignored_are_errors(capsys, kw, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(")):
        TrainConfig(**kw)
    flags = [f"--{k.replace('_', '-')}" if i == 0 else v for k, v in kw.items() for i, v in
             enumerate([None] + (list(v) if isinstance(v, tuple) else [v]))]
    code, _, err = run_cli(capsys, "train", *flags)
    assert_one_line_error(code, err, words)


# ---- options that would be ignored -------------------------------------------------------------------
@pytest.mark.parametrize("args, words", [
    (["eval", "{ck}", "--choices", "{mc}", "--stride", "4"], "--stride and --batch-size apply to --data only"),
    (["eval", "{ck}", "--choices", "{mc}", "--batch-size", "2"], "--stride and --batch-size apply to --data only"),
    (["sample", "--checkpoint", "{ck}", "--interactive", "--prompt", "x"], "--prompt is not used with --interactive"),
])
def test_options_that_would_be_ignored_are_errors(checkpoint, tmp_path, capsys, args, words):
    (tmp_path / "mc.jsonl").write_text(json.dumps(GOOD))
    code, _, err = run_cli(capsys, *[a.format(ck=checkpoint, mc=tmp_path / "mc.jsonl") for a in args])
    assert_one_line_error(code, err, words)


def test_eval_reads_a_token_file_as_it_scores(checkpoint, tmp_path):
    """A token file is scored from its memory map (memory independent of its size), with the same figures."""
    tokens = np.random.default_rng(0).integers(0, 256, 300)
    cllm.data.write_tokens(tmp_path / "a.bin", tokens, 256)
    read = read_eval_file(tmp_path / "a.bin", ByteTokenizer())
    assert isinstance(read, np.memmap) and read.dtype == np.uint16
    model = cllm.load_checkpoint(checkpoint).model
    token_bytes = ByteTokenizer().token_bytes()
    assert evaluate_tokens(model, read, token_bytes).figures() == \
        evaluate_tokens(model, tokens.astype(np.int32), token_bytes).figures()
