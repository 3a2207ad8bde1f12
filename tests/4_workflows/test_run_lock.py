"""Two runs in one directory: the second stops at once with one line naming the holder, and the first run's
files are untouched; the lock goes with the run (end of fit, or the process)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

import cllm
from cllm.errors import CLLMError
from cllm.train.run_files import RunLock


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


@pytest.mark.slow
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


@pytest.mark.slow
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
    assert len(cllm.train.run_files.read_metrics(out / "metrics.jsonl")) >= 1
    for bad in ("", "   "):
        r = subprocess.run([sys.executable, "-m", "cllm", "train", "--out-dir", bad], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 2 and "out_dir is empty" in r.stderr


@pytest.mark.slow
def test_a_run_stopped_on_nonfinite_values_fails(tmp_path):
    """on_nonfinite=stop ends the run with exit status 1 and one line, not a success."""
    r = subprocess.run([sys.executable, "-m", "cllm", "train", "--out-dir", str(tmp_path / "run"), "--max-steps", "20",
                        "--max-seq-len", "16", "--embedding-dim", "16", "--num-layers", "1", "--num-heads", "2",
                        "--batch-size", "2", "--max-data-bytes", "200000", "--lr", "1e30", "--warmup-steps", "0",
                        "--on-nonfinite", "stop", "--sample-tokens", "0", "--no-progress"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, (r.returncode, r.stderr[-500:])
    assert "stopped at step" in r.stderr and "non-finite" in r.stderr


RUN = dict(max_steps=2, max_seq_len=16, embedding_dim=16, num_layers=1, num_heads=2, batch_size=2,
           max_data_bytes=200_000, sample_tokens=0, progress=False, max_time=None, eval_interval=1)


def test_symlinks_planted_in_the_run_directory_are_never_written_through(tmp_path):
    """Links in the run directory to files outside it, dangling or not: a fresh run refuses them like another
    run's files (--overwrite removes the links, never their targets); a resumed run replaces each file it writes
    (checkpoints, metrics.jsonl, loss.png) instead of writing through the link; metrics.jsonl is opened without
    following one; a linked data/ is refused."""
    out, outside = tmp_path / "run", tmp_path / "outside"
    out.mkdir()
    outside.mkdir()
    names = ("last.safetensors", "best.safetensors", "metrics.jsonl", "loss.png")
    for n in names:
        (out / n).symlink_to(outside / n)  # dangling: a plain exists() does not see them
    cfg = cllm.TrainConfig(out_dir=str(out), **RUN)
    with pytest.raises(CLLMError, match="holds a previous run"):
        cllm.Trainer(cfg).fit()
    cllm.Trainer(cfg.replace(overwrite=True)).fit()
    assert list(outside.iterdir()) == []
    assert not any((out / n).is_symlink() for n in names) and (out / "loss.png").stat().st_size > 1000
    for n in names[1:]:  # now links to existing files outside, while the run resumes
        (outside / n).write_text("keep")
        (out / n).unlink()
        (out / n).symlink_to(outside / n)
    cllm.Trainer(cfg.replace(resume=True, max_steps=4)).fit()
    assert all((outside / n).read_text() == "keep" for n in names[1:])
    assert not any((out / n).is_symlink() for n in names)


def test_metrics_log_does_not_follow_a_symlink(tmp_path):
    from cllm.train.run_files import MetricsLog

    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    (tmp_path / "metrics.jsonl").symlink_to(victim)
    with pytest.raises(OSError) as e:
        MetricsLog(tmp_path / "metrics.jsonl")
    assert e.value.filename == str(tmp_path / "metrics.jsonl") and victim.read_text() == "keep"


def test_a_linked_data_directory_is_refused(tmp_path):
    out, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / "data").symlink_to(elsewhere)
    with pytest.raises(CLLMError, match="data: is a symbolic link"):
        cllm.Trainer(cllm.TrainConfig(out_dir=str(out), **RUN)).fit()
    assert list(elsewhere.iterdir()) == []


def _prepare(out, *extra):
    corpus = out.parent / "corpus.txt"
    corpus.write_text("some text to tokenize\n" * 50)
    return subprocess.run([sys.executable, "-m", "cllm", "prepare", str(corpus), "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_prepare_stops_while_another_process_writes_the_directory(tmp_path):
    """Two preparations into one directory would leave one's train.bin beside the other's tokenizer: the second
    stops at once with one line naming the holder; a prepare into a training run's directory stops the same way,
    and a run does not start in a directory being prepared. The lock goes with the preparation."""
    from cllm.core.files import DirLock

    out = tmp_path / "data"
    assert _prepare(out).returncode == 0, "a first preparation"
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.name != ".lock"}
    held = DirLock(out, "another process is preparing data", "output directory")
    r = _prepare(out, "--tokenizer", "bpe", "--vocab-size", "300")
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert f"another process is preparing data in this directory (pid {os.getpid()})" in r.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != ".lock"} == before  # untouched
    r = subprocess.run([sys.executable, "-m", "cllm", "train", "--out-dir", str(out), "--max-steps", "1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "another process is preparing data in this directory" in r.stderr, r.stderr
    held.release()

    run = tmp_path / "run"
    run.mkdir()
    lock = RunLock(run)
    r = _prepare(run)
    assert r.returncode == 2 and f"another run is training in this directory (pid {os.getpid()})" in r.stderr
    assert not (run / "train.bin").exists()
    lock.release()
    assert _prepare(out, "--tokenizer", "bpe", "--vocab-size", "300").returncode == 0  # free again
