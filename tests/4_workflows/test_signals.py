"""Signals: Ctrl-C stops `cllm sample` (the C++ generation loop checks for it every few tokens), `cllm eval` and
`cllm prepare` (its BPE training too) promptly, with one line and status 130; SIGTERM ends training like Ctrl-C,
with a checkpoint from which --resume continues exactly."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import cllm
from cllm.train.checkpoint import read_metadata, save_checkpoint
from cllm.data.tokenizer import ByteTokenizer

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(cllm.__file__).parent.parent))


def _interrupt_after(cmd, ready, sig=signal.SIGINT, settle=0.0, timeout=60):
    """Run cmd, send `sig` `settle` seconds after ready() holds, return (status, stderr, seconds from the signal
    to the exit)."""
    # the child hears SIGINT even when this run inherited it ignored (pytest started as a shell's background job)
    default_sigint = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                          preexec_fn=default_sigint) as p:
        try:
            deadline = time.time() + timeout
            while time.time() < deadline and not ready() and p.poll() is None:
                time.sleep(0.05)
            time.sleep(settle)
            assert p.poll() is None, p.communicate()
            sent = time.time()
            p.send_signal(sig)
            _, stderr = p.communicate(timeout=timeout)
        finally:
            p.kill()  # a run that ignored the signal must not outlive the test (no-op once it has exited)
    return p.returncode, stderr, time.time() - sent


@pytest.mark.slow
def test_ctrl_c_stops_a_long_sample_promptly(tmp_path):
    model = cllm.Model(cllm.ModelConfig(vocab_size=256, max_seq_len=64, embedding_dim=32, num_layers=1,
                                        num_heads=2, ff_dim=64), seed=0)
    ckpt = save_checkpoint(tmp_path / "m.safetensors", model, None, ByteTokenizer())
    started = tmp_path / "started"
    # a sample of 10**8 tokens (minutes); the marker file is written just before the C++ call
    code = (f"import sys, cllm.infer.generation as g\n"
            f"real = g.Model.generate\n"
            f"def gen(*a, **k):\n    open({str(started)!r}, 'w').close()\n    return real(*a, **k)\n"
            f"g.Model.generate = gen\n"
            f"from cllm.cli import main\nsys.exit(main(['sample', '--checkpoint', {str(ckpt)!r}, "
            f"'--max-new-tokens', '100000000']))\n")
    status, stderr, waited = _interrupt_after([sys.executable, "-c", code], started.exists, settle=0.5)  # in C++
    assert status == 130 and stderr == "cllm sample: interrupted\n", stderr
    assert waited < 5


@pytest.mark.slow
def test_ctrl_c_stops_prepare_and_leaves_no_partial_file(tmp_path):
    corpus = tmp_path / "corpus.txt"
    line = ("all work and no play makes jack a dull boy " * 20 + "\n").encode()
    with open(corpus, "wb") as f:
        for _ in range(60):
            f.write(line * ((4 << 20) // len(line)))  # 240 MiB: seconds to prepare
    out = tmp_path / "out"
    status, stderr, waited = _interrupt_after(
        [sys.executable, "-m", "cllm", "prepare", str(corpus), "--out", str(out)],
        lambda: out.is_dir() and any(out.iterdir()))
    assert status == 130 and stderr == "cllm prepare: interrupted\n", stderr
    assert waited < 5
    assert not out.exists() or list(out.iterdir()) == []  # temporaries removed, no token file half written


@pytest.mark.slow
def test_ctrl_c_during_bpe_training_stops_prepare_promptly(tmp_path):
    """The Rust BPE trainer looks at no signals: once it had all its text, Ctrl-C waited for the merges (25 s on a
    187 MB corpus). Training runs in a thread the main thread waits for, so Ctrl-C acts at once."""
    rng = np.random.default_rng(0)
    words = rng.integers(ord("a"), ord("z") + 1, size=(600_000, 8), dtype=np.uint8)  # distinct words: slow merges
    words[:, 7] = ord(" ")
    words[11::12, 7] = ord("\n")
    (tmp_path / "words.txt").write_bytes(words.tobytes())
    out, fed = tmp_path / "out", tmp_path / "fed"
    code = (f"import sys, cllm.data.corpus as c\n"
            f"real = c._bpe_sample\n"
            f"def sample(*a):\n    yield from real(*a)\n    open({str(fed)!r}, 'w').close()\n"
            f"c._bpe_sample = sample\n"
            f"from cllm.cli import main\nsys.exit(main(['prepare', {str(tmp_path / 'words.txt')!r}, '--out', "
            f"{str(out)!r}, '--tokenizer', 'bpe', '--vocab-size', '8192']))\n")
    status, stderr, waited = _interrupt_after([sys.executable, "-c", code], fed.exists, settle=0.5)  # merging
    assert status == 130 and stderr == "cllm prepare: interrupted\n", stderr
    assert waited < 3
    assert not out.exists() or list(out.iterdir()) == []


@pytest.mark.slow
def test_ctrl_c_stops_a_long_eval_promptly(tmp_path):
    model = cllm.Model(cllm.ModelConfig(vocab_size=256, max_seq_len=16, embedding_dim=32, num_layers=1,
                                        num_heads=2, ff_dim=64), seed=0)
    ckpt = save_checkpoint(tmp_path / "m.safetensors", model, None, ByteTokenizer())
    text = tmp_path / "long.txt"
    text.write_text("all work and no play makes jack a dull boy\n" * 50000)  # 2 MB: minutes of windows
    started = tmp_path / "started"
    # the marker file is written at the first forward
    code = (f"import sys, cllm.infer.evaluation as e\n"
            f"real = e.Model.forward\n"
            f"def forward(*a, **k):\n    open({str(started)!r}, 'w').close()\n    return real(*a, **k)\n"
            f"e.Model.forward = forward\n"
            f"from cllm.cli import main\nsys.exit(main(['eval', {str(ckpt)!r}, '--data', {str(text)!r}, "
            f"'--no-progress']))\n")
    status, stderr, waited = _interrupt_after([sys.executable, "-c", code], started.exists, settle=0.5)
    assert status == 130 and stderr == "cllm eval: interrupted\n", stderr
    assert waited < 5


TINY = ["--max-seq-len", "16", "--embedding-dim", "32", "--num-layers", "1", "--num-heads", "4", "--ff-dim", "64",
        "--batch-size", "4", "--eval-interval", "7", "--eval-batches", "2", "--warmup-steps", "3", "--no-progress",
        "--threads", "1", "--max-time", "none", "--checkpoint-interval", "1000", "--log-interval", "1",
        "--sample-tokens", "0", "--dropout", "0.1", "--decay-steps", "400", "--max-data-bytes", "200000"]


@pytest.mark.slow
def test_sigterm_ends_training_with_a_checkpoint_and_resume_is_exact(tmp_path):
    out, ref = tmp_path / "run", tmp_path / "ref"
    metrics = out / "metrics.jsonl"
    status, stderr, _ = _interrupt_after(
        [sys.executable, "-m", "cllm", "train", "--out-dir", str(out), "--max-steps", "100000", *TINY],
        lambda: metrics.is_file() and metrics.read_text().count("\n") >= 20, sig=signal.SIGTERM)
    assert status == 130 and "SIGTERM: stopping after this step" in stderr and "Traceback" not in stderr, stderr
    stopped = read_metadata(out / "last.safetensors")["trainer_state"]["step"]  # written at the stop
    assert stopped >= 20
    end = stopped + 10
    for d, extra in ((out, ["--resume"]), (ref, [])):
        r = subprocess.run([sys.executable, "-m", "cllm", "train", "--out-dir", str(d), "--max-steps", str(end),
                            *TINY, *extra], capture_output=True, text=True, env=ENV, timeout=300)
        assert r.returncode == 0, r.stderr

    def losses(d):
        return [(r["step"], r["train_loss"]) for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
                if "train_loss" in r]

    assert losses(out) == losses(ref) and losses(out)[-1][0] == end
    a, b = (cllm.load_checkpoint(d / "last.safetensors").model.flat_parameters() for d in (out, ref))
    assert np.array_equal(a, b)
