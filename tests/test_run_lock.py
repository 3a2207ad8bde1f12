"""Two runs in one directory: the second stops at once with one line naming the holder, and the first run's
files are untouched; the lock goes with the run (end of fit, or the process)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

import cllm
from cllm.errors import CLLMError
from cllm.run_files import RunLock


def test_a_second_run_in_a_locked_directory_stops(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "best.safetensors").write_bytes(b"the first run's")
    lock = RunLock(out)
    r = subprocess.run([sys.executable, "-m", "cllm", "train", "--out-dir", str(out), "--max-steps", "1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert f"another run is training in this directory (pid {os.getpid()})" in r.stderr
    assert (out / "best.safetensors").read_bytes() == b"the first run's"
    with pytest.raises(CLLMError, match="another run is training"):
        RunLock(out)
    lock.release()
    RunLock(out).release()  # free again


def test_fit_releases_the_lock(tmp_path):
    cfg = cllm.TrainConfig(out_dir=str(tmp_path / "run"), max_steps=2, max_seq_len=16, embedding_dim=16,
                           num_layers=1, num_heads=2, batch_size=2, max_data_bytes=200_000, sample_tokens=0,
                           progress=False, max_time=None)
    cllm.Trainer(cfg).fit()
    cllm.Trainer(cfg.replace(resume=True, max_steps=3)).fit()  # the same directory, one run after the other
    RunLock(tmp_path / "run").release()


def test_lock_file_is_not_followed_through_a_symlink(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    (out / ".lock").symlink_to(victim)
    with pytest.raises(OSError):
        RunLock(out)
    assert victim.read_text() == "keep"


def test_a_fresh_run_never_deletes_a_previous_one(tmp_path):
    out = tmp_path / "run"
    cfg = cllm.TrainConfig(out_dir=str(out), max_steps=2, max_seq_len=16, embedding_dim=16, num_layers=1,
                           num_heads=2, batch_size=2, max_data_bytes=200_000, sample_tokens=0, progress=False,
                           max_time=None, eval_interval=1)
    cllm.Trainer(cfg).fit()
    (out / "last.safetensors").unlink()  # a finished run whose last checkpoint is gone: best and metrics stay
    before = {p.name: p.read_bytes() for p in (out / "best.safetensors", out / "metrics.jsonl")}
    r = subprocess.run([sys.executable, "-m", "cllm", "train", "--out-dir", str(out), "--max-steps", "1",
                        "--max-data-bytes", "200000"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "holds a previous run (best.safetensors, metrics.jsonl" in r.stderr
    assert "--resume" in r.stderr and "--overwrite" in r.stderr
    assert {p: (out / p).read_bytes() for p in before} == before
    cllm.Trainer(cfg.replace(overwrite=True, max_steps=1)).fit()  # deliberate: starts over
    assert len(cllm.run_files.read_metrics(out / "metrics.jsonl")) >= 1
    for bad in ("", "   "):
        r = subprocess.run([sys.executable, "-m", "cllm", "train", "--out-dir", bad], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 2 and "out_dir is empty" in r.stderr


def test_a_run_stopped_on_nonfinite_values_fails(tmp_path):
    """on_nonfinite=stop ends the run with exit status 1 and one line, not a success."""
    r = subprocess.run([sys.executable, "-m", "cllm", "train", "--out-dir", str(tmp_path / "run"), "--max-steps", "20",
                        "--max-seq-len", "16", "--embedding-dim", "16", "--num-layers", "1", "--num-heads", "2",
                        "--batch-size", "2", "--max-data-bytes", "200000", "--lr", "1e30", "--warmup-steps", "0",
                        "--on-nonfinite", "stop", "--sample-tokens", "0", "--no-progress"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, (r.returncode, r.stderr[-500:])
    assert "stopped at step" in r.stderr and "non-finite" in r.stderr
