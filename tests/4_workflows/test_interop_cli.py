"""The command line of interoperability: cllm export (hf, gguf), cllm prepare --tokenizer PATH, cllm train
--init-from (fine-tuning a pretrained model with its tokenizer), and their one-line errors."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import cllm
from cllm.data import load_tokens
from cllm.interop.hf import from_hf
from cllm.train.run_files import read_metrics

FIXTURE = Path(__file__).parent.parent / "fixtures" / "tiny-gpt2"
DOC = 'def greet(name):\n    return f"Hello, {name}!"\n\nclass Counter:\n    def __init__(self):\n'


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "cllm", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    for i in range(24):
        (d / f"doc{i}.py").write_text(DOC * 3 + f"        self.count = {i}\n")
    return d


def one_line_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.mark.slow
def test_prepare_with_an_existing_tokenizer_separates_documents_with_eos(tmp_path, corpus):
    r = cli("prepare", corpus, "--out", tmp_path / "data", "--tokenizer", FIXTURE, "--val-fraction", "0.2")
    assert r.returncode == 0, r.stderr
    _, tok = from_hf(FIXTURE)
    assert cllm.data.tokenizer.load_tokenizer(tmp_path / "data" / "tokenizer.json") == tok
    train = np.asarray(load_tokens(tmp_path / "data" / "train.bin").tokens)
    docs = int((train == tok.eos_id).sum()) + 1
    assert docs == 19 or docs == 20  # 24 files, ~20 % held out; one EOS between two documents
    text = tok.decode(train)
    assert text.count("<|endoftext|>") == docs - 1 and "\n\n\n\nclass" not in text
    one_line_error(cli("prepare", corpus, "--out", tmp_path / "d2", "--tokenizer", tmp_path / "nope.json"),
                   "nope.json")


def test_train_init_from_hf_starts_at_its_loss_and_lowers_it(tmp_path, corpus):
    model, tok = from_hf(FIXTURE)
    cfg = cllm.TrainConfig(init_from=str(FIXTURE), data=(str(corpus),), out_dir=str(tmp_path / "run"),
                           max_steps=40, max_seq_len=32, batch_size=8, eval_interval=20, eval_batches=4,
                           sample_tokens=0, progress=False, max_time=None, lr=3e-3)
    trainer = cllm.Trainer(cfg)
    summary = trainer.fit()
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    start = records[0]
    assert start["step"] == 0 and start["init_from"] == str(FIXTURE)
    expect = float(np.mean([model.loss(x, y) for x, y in trainer.val_batches]))
    assert abs(start["val_loss"] - expect) < 1e-6, (start["val_loss"], expect)
    assert summary["best_val_loss"] < start["val_loss"] - 0.5
    assert trainer.model.config == model.config.replace(dropout=0.0)
    assert trainer.tokenizer == tok
    # the run's checkpoint exports back to Hugging Face with the same tokenizer
    r = cli("export", tmp_path / "run", "--format", "hf", "--out", tmp_path / "hf")
    assert r.returncode == 0, r.stderr
    back, tok2 = from_hf(tmp_path / "hf")
    assert tok2 == tok
    assert np.array_equal(back.parameters()["wte"], cllm.load_checkpoint(tmp_path / "run" / "best.safetensors")
                          .model.parameters()["wte"])


@pytest.mark.slow
def test_train_init_from_checkpoint_and_resume(tmp_path, corpus):
    base = cllm.TrainConfig(data=(str(corpus),), out_dir=str(tmp_path / "a"), max_steps=10, max_seq_len=32,
                            embedding_dim=32, num_layers=1, num_heads=2, batch_size=4, eval_interval=5,
                            sample_tokens=0, progress=False, max_time=None)
    cllm.Trainer(base).fit()
    ft = base.replace(init_from=str(tmp_path / "a" / "last.safetensors"), out_dir=str(tmp_path / "b"),
                      max_seq_len=16, max_steps=6)
    t = cllm.Trainer(ft)
    t.fit()
    assert t.model.config.max_seq_len == 32  # the pretrained model's shape; the run trains on 16 tokens
    shutil.rmtree(tmp_path / "a")  # resuming needs only the run's own checkpoint
    r = cli("train", "--resume", "--out-dir", tmp_path / "b", "--max-steps", "8", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert read_metrics(tmp_path / "b" / "metrics.jsonl")[-1]["step"] == 8


def test_train_init_from_errors(tmp_path, corpus):
    one_line_error(cli("train", "--init-from", tmp_path / "missing", "--data", corpus, "--out-dir",
                       tmp_path / "r1"), "missing")
    one_line_error(cli("train", "--init-from", FIXTURE, "--data", corpus, "--out-dir", tmp_path / "r2",
                       "--max-seq-len", "64"), "max_seq_len 64", "32 positions")


@pytest.mark.parametrize("fmt,out", [("hf", "hfdir"), ("gguf", "m.gguf")])
def test_export_command(tmp_path, fmt, out):
    r = cli("export", FIXTURE, "--format", fmt, "--out", tmp_path / out)
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and (tmp_path / out).exists()


@pytest.mark.slow
def test_export_errors(tmp_path):
    one_line_error(cli("export", tmp_path / "none", "--format", "hf", "--out", tmp_path / "o"), "none")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    one_line_error(cli("export", FIXTURE, "--format", "hf", "--out", tmp_path / "full"), "not an empty directory")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    one_line_error(cli("export", FIXTURE, "--format", "hf", "--out", tmp_path / "o", "--dtype", "f16"), "--dtype")
    (tmp_path / "keep.gguf").write_text("mine")  # never replaced, be it an old export or the checkpoint itself
    one_line_error(cli("export", FIXTURE, "--format", "gguf", "--out", tmp_path / "keep.gguf"), "exists")
    assert (tmp_path / "keep.gguf").read_text() == "mine"
    r = cli("export", FIXTURE, "--format", "onnx", "--out", tmp_path / "o")
    assert r.returncode == 2 and "invalid choice" in r.stderr


def _bad_dir(tmp_path, kind):
    d = tmp_path / kind
    shutil.copytree(FIXTURE, d)
    cfg = json.loads((d / "config.json").read_text())
    if kind == "no-config":
        (d / "config.json").unlink()
    elif kind == "no-weights":
        (d / "model.safetensors").unlink()
    elif kind == "pickle":
        (d / "model.safetensors").rename(d / "pytorch_model.bin")
    elif kind in ("llama", "bert"):
        cfg["model_type"] = kind
    elif kind == "shapes":
        cfg["n_embd"] = 64
    elif kind == "vocab":
        cfg["vocab_size"] = 100
    (d / "config.json").write_text(json.dumps(cfg)) if (d / "config.json").exists() else None
    return d


@pytest.mark.parametrize("kind,needles", [
    ("no-config", ["config.json"]),
    ("no-weights", ["model.safetensors"]),
    ("pickle", ["pytorch_model.bin", "safetensors"]),
    ("llama", ["config.json", "hidden_size"]),  # a GPT-2 config relabelled: a llama field is missing
    ("bert", ["config.json", "model_type"]),
    ("shapes", ["model.safetensors", "has shape"]),
    ("vocab", ["model.safetensors", "has shape"]),
])
@pytest.mark.slow
def test_bad_hf_directories_are_one_line_errors(tmp_path, kind, needles):
    d = _bad_dir(tmp_path, kind)
    one_line_error(cli("sample", "--checkpoint", d, "--max-new-tokens", "2"), *needles)
    one_line_error(cli("export", d, "--format", "gguf", "--out", tmp_path / "x.gguf"), *needles)


def test_gguf_export_without_the_gguf_package(tmp_path):
    """Without the optional package: one line saying what to install, no traceback."""
    code = ("import sys, runpy; sys.modules['gguf'] = None; sys.argv = ['cllm', 'export', sys.argv[1], '--format', "
            "'gguf', '--out', sys.argv[2]]; runpy.run_module('cllm', run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", code, str(FIXTURE), str(tmp_path / "m.gguf")], capture_output=True,
                       text=True, timeout=120)
    one_line_error(r, "gguf package", "cllm[interop]")
    assert not (tmp_path / "m.gguf").exists()
