"""Crash safety and the non-finite guard: the package never corrupts a checkpoint and never trains on garbage.

- A tiny `python -m cllm train` is killed with SIGKILL at random (seeded) moments, and on purpose in the middle
  of checkpoint writes (made slow, and detected by their temporary file); after every kill the last checkpoint
  loads, and resuming to the end gives exactly the uninterrupted run's losses (and weights), bit for bit.
- A NaN/Inf loss or gradient norm is caught before the optimizer step: the step is skipped with a warning (or the
  run stops, on_nonfinite="stop"), the event is logged in metrics.jsonl, and no checkpoint holding a non-finite
  value is ever written; a checkpoint holding one is refused when loading unless explicitly allowed.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import cllm
from cllm.train.checkpoint import EXP_AVG_SQ, load_checkpoint, read_metadata
from cllm.data import prepare
from cllm.train.run_files import read_metrics
from cllm.train.config import TrainConfig
from cllm.train.trainer import Trainer

FLAGS = ["--max-seq-len", "16", "--embedding-dim", "32", "--num-layers", "1", "--num-heads", "4", "--ff-dim", "64",
         "--batch-size", "4", "--eval-interval", "7", "--eval-batches", "2", "--warmup-steps", "3", "--no-progress",
         "--threads", "1", "--max-time", "none", "--checkpoint-interval", "1", "--log-interval", "1",
         "--sample-tokens", "0", "--dropout", "0.1"]
STEPS = 120

# `python -m cllm` with checkpoint writes (half the bytes, fsync, a pause, the rest) or training steps slowed down,
# so that a kill can land in the middle of one; the numbers are untouched
SLOW_CLI = r'''
import io, os, sys, time
import cllm.train.checkpoint as ck
import cllm.train.trainer as tr
_step = tr.Trainer.train_step
def _slow_step(self):
    time.sleep(float(os.environ.get("SLOW_STEP_S", "0")))
    return _step(self)
tr.Trainer.train_step = _slow_step
_write = ck._write_payload
def _slow(f, tensors, metadata):
    buf = io.BytesIO(); _write(buf, tensors, metadata); data = buf.getvalue()
    half = len(data) // 2
    f.write(data[:half]); f.flush(); os.fsync(f.fileno())
    time.sleep(float(os.environ.get("SLOW_WRITE_S", "0")))
    f.write(data[half:])
ck._write_payload = _slow
from cllm.cli import main
sys.exit(main(sys.argv[1:]))
'''


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    import argparse
    import json as json_mod

    root = tmp_path_factory.mktemp("crash_corpus")
    src = root / "src"
    src.mkdir()
    for mod in (argparse, json_mod):
        (src / (mod.__name__ + ".py")).write_text(Path(mod.__file__).read_text(encoding="utf-8")[:15000])
    prepare([src], root / "data", "byte", val_fraction=0.3)
    return root / "data"


def start(script: Path, data_dir: Path, out: Path, resume: bool, slow_write=0.0, slow_step=0.0) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", SLOW_WRITE_S=str(slow_write), SLOW_STEP_S=str(slow_step))
    argv = [sys.executable, str(script), "train", "--data", str(data_dir), "--out-dir", str(out),
            "--max-steps", str(STEPS), *FLAGS] + (["--resume"] if resume else ["--overwrite"])
    return subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1


def temp_files(out: Path):
    return sorted(out.glob(".*.safetensors.*.tmp"))


def train_losses(out: Path):
    return [(r["step"], r["train_loss"]) for r in read_metrics(out / "metrics.jsonl") if "train_loss" in r]


@pytest.mark.slow
def test_sigkill_at_random_moments_and_mid_write_then_exact_resume(data_dir, tmp_path):
    script = tmp_path / "slow_cllm.py"
    script.write_text(SLOW_CLI)
    ref, out = tmp_path / "ref", tmp_path / "killed"
    r = start(script, data_dir, ref, resume=False)
    assert r.wait(timeout=120) == 0, r.stderr.read().decode()

    rng = random.Random(20240611)
    kills, mid_write, last_step, progress = 0, 0, 0, []
    modes = ["mid_write", "random", "random", "mid_write"] * 3
    for mode in modes:
        resume = (out / "last.safetensors").is_file()
        # slow writes (0.15 s) when aiming at a write; otherwise slower steps (10 ms), so that random kills land
        # anywhere: in steps, checkpoint writes, evaluations, metrics appends
        if mode == "mid_write":
            p = start(script, data_dir, out, resume=resume, slow_write=0.15)
        else:
            p = start(script, data_dir, out, resume=resume, slow_step=0.01)
        landed_mid_write = False
        if mode == "random":  # a random moment once the session is under way (metrics.jsonl changed)
            before = size(out / "metrics.jsonl")
            deadline = time.monotonic() + 30
            while p.poll() is None and time.monotonic() < deadline and size(out / "metrics.jsonl") == before:
                time.sleep(0.002)
            time.sleep(rng.uniform(0.0, 0.35))
        else:  # wait until a checkpoint write is under way (its temporary file exists), then kill
            deadline = time.monotonic() + 30
            while p.poll() is None and time.monotonic() < deadline:
                if temp_files(out):
                    time.sleep(rng.uniform(0.0, 0.1))  # somewhere inside the slow write
                    break
                time.sleep(0.002)
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            kills += 1
            landed_mid_write = bool(temp_files(out))  # the process died before renaming its temporary file
            mid_write += landed_mid_write
        code = p.wait(timeout=60)
        assert code in (0, -signal.SIGKILL), p.stderr.read().decode()
        p.stderr.close()
        # the last good checkpoint (and the best one) is always loadable; progress never goes backwards
        for name in ("last.safetensors", "best.safetensors"):
            if (out / name).is_file():
                ck = load_checkpoint(out / name)
                assert np.isfinite(ck.model.flat_parameters()).all()
        if (out / "last.safetensors").is_file():
            step = read_metadata(out / "last.safetensors")["trainer_state"]["step"]
            assert step >= last_step
            last_step = step
        progress.append((mode, code, landed_mid_write, last_step))
        names = {f.name for f in out.glob("*.safetensors")}
        assert names <= {"last.safetensors", "best.safetensors"}, names
        if code == 0:
            break

    print(f"{kills} kills, {mid_write} of them in the middle of a checkpoint write; (mode, exit, mid-write, step): "
          f"{progress}")
    assert kills >= 9, f"only {kills} kills landed"
    assert mid_write >= 1, "no kill landed in the middle of a checkpoint write"
    p = start(script, data_dir, out, resume=True)  # resume to the end
    assert p.wait(timeout=120) == 0, p.stderr.read().decode()
    p.stderr.close()

    assert train_losses(out) == train_losses(ref)  # exact equality, step by step
    assert [s for s, _ in train_losses(out)] == list(range(1, STEPS + 1))
    a, b = load_checkpoint(ref / "last.safetensors"), load_checkpoint(out / "last.safetensors")
    assert np.array_equal(a.model.flat_parameters(), b.model.flat_parameters())
    for k in ("exp_avg", "exp_avg_sq"):
        for name in a.optimizer_state[k]:
            assert np.array_equal(a.optimizer_state[k][name], b.optimizer_state[k][name])
    assert not temp_files(out)  # stale temporary files were cleaned up by the resumed run


def test_resume_ignores_a_stale_temporary_file(data_dir, tmp_path):
    """A kill mid-write leaves `.last.safetensors.*.tmp`: it is never taken for a checkpoint, and removed."""
    out = tmp_path / "run"
    Trainer(tiny(data_dir, out, max_steps=3, decay_steps=5)).fit()
    stale = out / ".last.safetensors.abc123.tmp"
    stale.write_bytes((out / "last.safetensors").read_bytes()[:1000])  # half a checkpoint
    s = Trainer(tiny(data_dir, out, max_steps=5, decay_steps=5, resume=True)).fit()
    assert s["steps"] == 5 and not stale.exists()


# ----------------------------------------------------------------------------------------------------
# the non-finite guard
# ----------------------------------------------------------------------------------------------------
TINY = dict(max_seq_len=16, embedding_dim=32, num_layers=1, num_heads=4, ff_dim=64, batch_size=4, max_time=None,
            warmup_steps=2, eval_interval=4, eval_batches=2, progress=False, sample_tokens=0, log_interval=1,
            checkpoint_interval=1, threads=1)


def tiny(data_dir, out, **kw):
    return TrainConfig(**{**TINY, "data": str(data_dir), "out_dir": str(out), **kw})


def events(out):
    return [r["step"] for r in read_metrics(Path(out) / "metrics.jsonl") if r.get("event") == "nonfinite"]


def every_checkpoint_is_finite(out):
    for f in Path(out).glob("*.safetensors"):
        ck = load_checkpoint(f)  # refuses NaN/Inf anywhere (weights and moments)
        assert np.isfinite(ck.model.flat_parameters()).all()


@pytest.mark.parametrize("mode", ["skip", "stop"])
def test_poisoned_weight_is_never_checkpointed(data_dir, tmp_path, monkeypatch, mode):
    """A NaN written into a parameter (through its view) at step 4 makes every later loss NaN: no optimizer step
    runs on it, the events are logged, and last.safetensors stays the step-3 checkpoint."""
    real = Trainer.train_step

    def poisoning(self):
        if self.step == 3:
            self.model.parameters()["h.0.mlp.c_fc.weight"][1, 2] = np.nan
        return real(self)

    monkeypatch.setattr(Trainer, "train_step", poisoning)
    out = tmp_path / mode
    t = Trainer(tiny(data_dir, out, max_steps=8, on_nonfinite=mode))
    with pytest.warns(RuntimeWarning) as warned:
        s = t.fit()
    text = " ".join(str(w.message) for w in warned)
    assert "step 4: non-finite loss nan" in text and "weights are not finite, not writing last.safetensors" in text
    if mode == "skip":
        assert s["stop_reason"] == "max_steps" and events(out) == [4, 5, 6, 7, 8] and s["nonfinite_steps"] == 5
    else:
        assert s["stop_reason"] == "nonfinite" and events(out) == [4] and s["nonfinite_steps"] == 1
    assert t.optimizer.step_count == 3  # the optimizer never ran on a non-finite loss
    assert load_checkpoint(out / "last.safetensors").trainer_state["step"] == 3
    every_checkpoint_is_finite(out)


@pytest.mark.parametrize("value", [np.inf, -np.inf, np.nan])
def test_nonfinite_gradient_with_finite_loss_skips_the_step(data_dir, tmp_path, monkeypatch, value):
    real = cllm.Model.forward_backward
    calls = {"n": 0}
    stepped = []

    def bad_grad(self, x, y, accumulate=False, grad_scale=1.0, **kw):
        calls["n"] += 1
        loss = real(self, x, y, accumulate=accumulate, grad_scale=grad_scale, **kw)
        if calls["n"] == 3:
            self.gradients()["ln_f.bias"][0] = value
        return loss

    real_step = cllm.AdamW.step

    def recording_step(self):
        stepped.append(self.model.flat_parameters().copy())
        real_step(self)

    monkeypatch.setattr(cllm.Model, "forward_backward", bad_grad)
    monkeypatch.setattr(cllm.AdamW, "step", recording_step)
    out = tmp_path / "g"
    t = Trainer(tiny(data_dir, out, max_steps=6))
    with pytest.warns(RuntimeWarning, match="step 3: non-finite loss [0-9.]+ or grad norm (nan|inf)"):
        s = t.fit()
    assert events(out) == [3] and s["nonfinite_steps"] == 1 and len(stepped) == 5
    rec = [r for r in read_metrics(out / "metrics.jsonl") if r.get("event")][0]
    assert rec["grad_norm"] is None and rec["train_loss"] is not None  # metrics stay standard JSON
    assert np.isfinite(t.model.flat_parameters()).all() and np.isfinite(t.optimizer.exp_avg_sq).all()
    every_checkpoint_is_finite(out)


def test_gradient_overflowing_adam_moments_is_skipped_without_clipping(data_dir, tmp_path, monkeypatch):
    """With grad_clip off, a finite gradient of 1e20 squares to Inf in AdamW's second moment: the step is treated
    as non-finite (skipped), instead of leaving Inf moments that no checkpoint could hold."""
    real = cllm.Model.forward_backward
    calls = {"n": 0}

    def huge_grad(self, x, y, accumulate=False, grad_scale=1.0, **kw):
        calls["n"] += 1
        loss = real(self, x, y, accumulate=accumulate, grad_scale=grad_scale, **kw)
        if calls["n"] == 3:
            self.gradients()["wte"][0, :] = 1e20
        return loss

    monkeypatch.setattr(cllm.Model, "forward_backward", huge_grad)
    out = tmp_path / "o"
    t = Trainer(tiny(data_dir, out, max_steps=6, grad_clip=None))
    with pytest.warns(RuntimeWarning, match="step 3: non-finite .*overflows AdamW"):
        s = t.fit()
    assert s["stop_reason"] == "max_steps" and events(out) == [3]
    assert np.isfinite(t.optimizer.exp_avg_sq).all()
    assert load_checkpoint(out / "last.safetensors").trainer_state["step"] == 6
    every_checkpoint_is_finite(out)


def test_checkpoint_with_nonfinite_moments_is_refused_unless_allowed(data_dir, tmp_path):
    from safetensors.numpy import load, save

    out = tmp_path / "r"
    Trainer(tiny(data_dir, out, max_steps=2)).fit()
    path = out / "last.safetensors"
    blob = path.read_bytes()
    tensors = load(blob)
    tensors[EXP_AVG_SQ + "wte"][3, 1] = np.inf
    meta = {k: v for k, v in read_metadata_raw(blob).items() if not k.endswith("_crc32")}  # an unsealed file
    path.write_bytes(save(tensors, metadata=meta))
    with pytest.raises(ValueError, match=r"non-finite values \(1 NaN/Inf in optimizer.exp_avg_sq.wte\)"):
        load_checkpoint(path)
    with pytest.raises(ValueError, match="non-finite"):  # and so is resuming from it
        Trainer(tiny(data_dir, out, max_steps=4, resume=True)).fit()
    ck = load_checkpoint(path, allow_nonfinite=True)
    assert np.isinf(ck.optimizer_state["exp_avg_sq"]["wte"][3, 1])


def read_metadata_raw(blob: bytes) -> dict:
    import json
    import struct

    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + n])["__metadata__"]
