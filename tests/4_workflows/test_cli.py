"""The command line: train / sample / prepare end to end through `python -m cllm`, config files and flags,
--resume, and one-line errors with exit status 2 for bad input."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cllm import cli
from cllm.train.checkpoint import read_metadata

TINY_FLAGS = ["--max-seq-len", "16", "--embedding-dim", "32", "--num-layers", "1", "--num-heads", "4",
              "--ff-dim", "64", "--batch-size", "4", "--eval-interval", "5", "--eval-batches", "2",
              "--warmup-steps", "2", "--no-progress", "--threads", "1", "--max-time", "none"]


def run_cllm(*args, timeout=120):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "cllm", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_corpus")
    import argparse
    import typing

    for mod in (argparse, typing):
        (root / (mod.__name__ + ".py")).write_text(Path(mod.__file__).read_text(encoding="utf-8")[:15000])
    return root


@pytest.fixture(scope="module")
def trained_run(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli_run")
    r = run_cllm("train", "--data", corpus, "--out-dir", out, "--max-steps", 5, "--sample-tokens", 20,
                 "--val-fraction", 0.4, *TINY_FLAGS)
    assert r.returncode == 0, r.stderr
    return out, r


def one_line_error(r, *words):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])


@pytest.mark.slow
def test_train_then_sample(trained_run):
    out, r = trained_run
    for name in ("last.safetensors", "best.safetensors", "metrics.jsonl", "loss.png", "data/train.bin"):
        assert (out / name).is_file(), name
    assert "--- sample from" in r.stdout and "step 5: val loss" in r.stdout
    state = read_metadata(out / "last.safetensors")["trainer_state"]
    assert state["step"] == 5 and state["train_config"]["embedding_dim"] == 32

    s = run_cllm("sample", "--checkpoint", out / "last.safetensors", "--prompt", "def ", "--max-new-tokens", 30,
                 "--seed", 3, "--top-k", 20, "--top-p", 0.9)
    assert s.returncode == 0, s.stderr
    assert s.stdout.startswith("def ") and len(s.stdout) > 4
    again = run_cllm("sample", "--checkpoint", out, "--prompt", "def ", "--max-new-tokens", 30, "--seed", 3,
                     "--top-k", 20, "--top-p", 0.9, "--temperature", 0)
    assert again.returncode == 0, again.stderr  # a run directory works too (its best.safetensors)
    bf16 = run_cllm("sample", "--checkpoint", out, "--prompt", "def ", "--max-new-tokens", 30, "--seed", 3,
                    "--temperature", 0, "--precision", "bf16")
    assert bf16.returncode == 0 and bf16.stdout.startswith("def "), bf16.stderr
    one_line_error(run_cllm("sample", "--checkpoint", out, "--precision", "fp16"), "--precision", "fp16")


@pytest.mark.slow
def test_train_llama_then_sample_and_export(corpus, tmp_path):
    """--architecture llama end to end: the llama defaults (rope, SwiGLU 8C/3 rounded to 32), grouped-query
    attention, a checkpoint that samples and exports."""
    out = tmp_path / "llama"
    r = run_cllm("train", "--architecture", "llama", "--num-kv-heads", 2, "--no-tie-embeddings", "--data", corpus,
                 "--out-dir", out, "--max-steps", 5, "--sample-tokens", 10, "--val-fraction", 0.4, *TINY_FLAGS[:8],
                 *TINY_FLAGS[10:])  # without --ff-dim: the llama default
    assert r.returncode == 0, r.stderr
    cfg = read_metadata(out / "last.safetensors")["config"]
    assert (cfg["architecture"], cfg["pos_encoding"], cfg["num_kv_heads"], cfg["ff_dim"], cfg["tie_embeddings"]) == \
        ("llama", "rope", 2, 96, False)
    s = run_cllm("sample", "--checkpoint", out, "--prompt", "def ", "--max-new-tokens", 10, "--temperature", 0)
    assert s.returncode == 0 and s.stdout.startswith("def "), s.stderr
    e = run_cllm("export", out, "--format", "hf", "--out", tmp_path / "hf")
    assert e.returncode == 0, e.stderr
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "llama"


@pytest.mark.slow
def test_resume_uses_the_runs_own_settings(trained_run, tmp_path):
    out, _ = trained_run
    import shutil

    run = tmp_path / "run"
    shutil.copytree(out, run)
    r = run_cllm("train", "--out-dir", run, "--resume", "--max-steps", 8, "--sample-tokens", 0)
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stdout
    state = read_metadata(run / "last.safetensors")["trainer_state"]
    assert state["step"] == 8 and state["train_config"]["embedding_dim"] == 32


def test_config_file_and_flags_override_it(corpus, tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'data = "{corpus.as_posix()}"\nval_fraction = 0.4\nmax_steps = 3\nlr = 0.002\n'
                   'embedding_dim = 32\nnum_layers = 1\nmax_seq_len = 16\nbatch_size = 4\n'
                   'eval_batches = 2\nsample_tokens = 0\nprogress = false\nmax_time = 60\n')
    out = tmp_path / "out"
    r = cli.main(["train", "--config", str(cfg), "--out-dir", str(out), "--lr", "0.001", "--threads", "1"])
    assert r == 0
    tc = read_metadata(out / "last.safetensors")["trainer_state"]["train_config"]
    assert tc["lr"] == 0.001 and tc["max_steps"] == 3 and tc["embedding_dim"] == 32 and tc["max_time"] == 60.0


def test_prepare_command(corpus, tmp_path):
    out = tmp_path / "prep"
    r = cli.main(["prepare", str(corpus), "--out", str(out), "--val-fraction", "0.4"])
    assert r == 0
    assert all((out / n).is_file() for n in ("train.bin", "val.bin", "tokenizer.json"))
    assert json.loads((out / "tokenizer.json").read_text()) == {"type": "byte"}


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--max-steps", "--lr", "--betas", "--resume", "--config", "--patience", "--on-nonfinite",
                 "--optimizer", "--momentum", "--label-smoothing", "--ema-decay", "--sample-every"):
        assert flag in text, flag
    assert "(default: 1500)" in text and "(default: 0.003)" in text and "(default: 'runs/cllm')" in text
    assert "(default: 'adamw')" in text and "(default: 0.0)" in text
    for command, flags in (("sample", ("--stream", "--num-samples", "--interactive", "--stop", "--repetition-penalty",
                                       "--frequency-penalty", "--presence-penalty", "--ignore-eos")),
                           ("eval", ("--data", "--choices", "--stride", "--json", "--batch-size", "--progress"))):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        text = capsys.readouterr().out
        for flag in flags:
            assert flag in text, (command, flag)


def test_bad_input_subprocess(tmp_path):
    one_line_error(run_cllm("sample", "--checkpoint", tmp_path / "absent.safetensors"), "absent.safetensors")
    one_line_error(run_cllm("train", "--lr", "fast"), "--lr", "fast")


@pytest.mark.parametrize("argv, words", [
    (["train", "--batch-size", "0"], ["batch_size must be positive"]),
    (["train", "--schedule", "step"], ["--schedule", "invalid choice"]),
    (["train", "--max-steps", "1.5"], ["--max-steps"]),
    (["train", "--optimizer", "adam"], ["--optimizer", "invalid choice"]),
    (["train", "--momentum", "1"], ["momentum must be in [0, 1)"]),
    (["train", "--label-smoothing", "-0.1"], ["label_smoothing must be in [0, 1]"]),
    (["train", "--label-smoothing", "nan"], ["label_smoothing must be a finite number"]),
    (["train", "--ema-decay", "1"], ["ema_decay must be in (0, 1)"]),
    (["train", "--ema-decay", "x"], ["--ema-decay", "invalid"]),
    (["train", "--sample-every", "0"], ["sample_every must be positive"]),
    (["train", "--grad-dtype", "fp16"], ["--grad-dtype", "invalid choice"]),
    (["train", "--zero", "--optimizer", "sgd"], ["zero shards AdamW's moments"]),
    (["train", "--bucket-mb", "-2"], ["bucket_mb must be in [0, 1024] MiB"]),
    (["train", "--sample-every", "1.5"], ["--sample-every", "invalid"]),
    (["train", "--config", "{tmp}/absent.toml"], ["absent.toml"]),
    (["train", "--config", "{tmp}/bad.toml"], ["bad.toml", "unknown setting learning_rate"]),
    (["train", "--resume", "--out-dir", "{tmp}/nothing"], ["cannot resume", "last.safetensors"]),
    (["sample", "--checkpoint", "{tmp}/junk.safetensors"], ["junk.safetensors"]),
    (["sample", "--checkpoint", "{tmp}"], ["no best.safetensors or last.safetensors"]),
    (["prepare", "{tmp}/missing_dir", "--out", "{tmp}/o"], ["missing_dir"]),
    (["prepare", "--out", "{tmp}/o", "--val-fraction", "0.9"], ["val_fraction"]),
    (["frobnicate"], ["invalid choice"]),
    (["train", "--num-kv-heads", "2", "--out-dir", "{tmp}/o"], ["num_kv_heads 2 needs architecture 'llama'"]),
    (["train", "--architecture", "llama", "--pos-encoding", "learned", "--out-dir", "{tmp}/o"],
     ["pos_encoding of a llama model"]),
])
def test_bad_input_one_line_exit_2(tmp_path, capsys, argv, words):
    (tmp_path / "bad.toml").write_text("learning_rate = 1\n")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00garbage" * 50)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in lines[0], (w, lines[0])


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_ctrl_c_stops_after_the_step_with_a_consistent_checkpoint(corpus, tmp_path):
    import signal
    import time

    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, "-m", "cllm", "train", "--data", str(corpus), "--out-dir", str(out),
                          "--max-steps", "100000", "--val-fraction", "0.4", "--log-interval", "1", *TINY_FLAGS],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and (not metrics.is_file() or metrics.read_text().count("\n") < 12):
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == 130, stderr
    assert "Traceback" not in stderr
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    state = read_metadata(out / "last.safetensors")["trainer_state"]
    assert state["step"] == steps[-1] >= 12 and "stopped (interrupted)" in stdout
