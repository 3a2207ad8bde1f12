"""Resource errors end in a clear error at the right moment, never in a crash, a corrupt file or the OOM killer.

- an output directory that cannot be written: an error naming it before training starts;
- a full disk at a checkpoint write (ENOSPC, simulated, and for real on a tiny tmpfs where mounting one works):
  an error naming the file at the failing write, the previous checkpoint intact, no half-written file left;
- a model, batch or conversion that cannot fit in memory: InsufficientMemoryError (a MemoryError and a
  CLLMError) naming the size, before anything is allocated.
"""
from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import cllm
from cllm import cli
from cllm.train.checkpoint import load_checkpoint, read_metadata, save_checkpoint
from cllm.data import prepare
from cllm.errors import CLLMError, InsufficientMemoryError
from cllm.core.model import activation_count, memory_estimate, parameter_count
from cllm.core.system import available_memory
from cllm.data.tokenizer import ByteTokenizer
from cllm.train.run_files import read_metrics
from cllm.train.config import TrainConfig
from cllm.train.trainer import Trainer

TINY = dict(max_seq_len=16, embedding_dim=32, num_layers=1, num_heads=4, ff_dim=64, batch_size=4, max_time=None,
            warmup_steps=2, eval_interval=4, eval_batches=2, progress=False, sample_tokens=0, log_interval=1,
            checkpoint_interval=2, threads=1)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    import argparse

    root = tmp_path_factory.mktemp("res_corpus")
    (root / "a.py").write_text(Path(argparse.__file__).read_text(encoding="utf-8")[:20000])
    prepare([root / "a.py"], root / "data", "byte", val_fraction=0.3)
    return root / "data"


def tiny(data_dir, out, **kw):
    return TrainConfig(**{**TINY, "data": str(data_dir), "out_dir": str(out), **kw})


def no_training_happened(monkeypatch):
    """Make any training step fail the test: the error must come before training starts."""
    def forbidden(self):
        raise AssertionError("training started")
    monkeypatch.setattr(Trainer, "train_step", forbidden)


# ----------------------------------------------------------------------------------------------------
# unwritable output directory
# ----------------------------------------------------------------------------------------------------
def test_output_directory_under_a_regular_file(data_dir, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("not a directory")
    out = tmp_path / "file" / "run"
    no_training_happened(monkeypatch)
    with pytest.raises(OSError, match="run directory is not usable") as e:
        Trainer(tiny(data_dir, out, max_steps=3)).fit()
    assert e.value.filename == str(out)


def test_read_only_output_directory_fails_before_training(data_dir, read_only_dir, monkeypatch):
    out = read_only_dir
    no_training_happened(monkeypatch)
    with pytest.raises(OSError, match="run directory is not usable") as e:
        Trainer(tiny(data_dir, out, max_steps=3)).fit()
    assert e.value.filename == str(out) and e.value.errno in (errno.EACCES, errno.EPERM, errno.EROFS)


def test_cli_reports_an_unusable_output_directory_in_one_line(data_dir, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code = cli.main(["train", "--data", str(data_dir), "--out-dir", str(tmp_path / "file" / "run"), "--max-steps",
                     "2", "--no-progress", "--max-time", "none", "--threads", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "run directory is not usable" in err[0] and "file/run" in err[0]


# ----------------------------------------------------------------------------------------------------
# disk full at a checkpoint write
# ----------------------------------------------------------------------------------------------------
def test_disk_full_at_a_checkpoint_write_simulated(data_dir, tmp_path, monkeypatch):
    """ENOSPC in the middle of the second checkpoint: the error names the file, the first checkpoint is intact and
    loadable, no temporary file is left, and the run resumes from the intact checkpoint."""
    import cllm.train.checkpoint as ck

    out = tmp_path / "full"
    real = ck._write_payload
    writes = {"n": 0}

    def full_disk(f, tensors, metadata):
        writes["n"] += 1
        if writes["n"] == 2:
            f.write(b"x" * 1000)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(f, tensors, metadata)

    monkeypatch.setattr(ck, "_write_payload", full_disk)
    with pytest.raises(OSError) as e:
        Trainer(tiny(data_dir, out, max_steps=6, eval_interval=100)).fit()
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(out / "last.safetensors")
    assert "No space left on device" in str(e.value)
    assert not list(out.glob(".*.tmp"))
    assert read_metadata(out / "last.safetensors")["trainer_state"]["step"] == 2  # the previous one, intact
    load_checkpoint(out / "last.safetensors")
    monkeypatch.undo()
    s = Trainer(tiny(data_dir, out, max_steps=6, eval_interval=100, resume=True)).fit()
    assert s["steps"] == 6


def test_disk_full_for_real_on_a_tiny_tmpfs(tiny_tmpfs):
    """A real ENOSPC (256 KiB tmpfs): save_checkpoint raises an OSError naming the file, the previous checkpoint
    stays loadable and no partial file is left behind."""
    small = cllm.Model(cllm.ModelConfig(vocab_size=256, max_seq_len=8, embedding_dim=16, num_layers=1, num_heads=2,
                                        ff_dim=32))
    path = tiny_tmpfs / "last.safetensors"
    save_checkpoint(path, small, cllm.AdamW(small), ByteTokenizer(), {"step": 1})  # ~80 KiB: fits
    before = path.read_bytes()
    big = cllm.Model(cllm.ModelConfig(vocab_size=256, max_seq_len=8, embedding_dim=64, num_layers=2, num_heads=2,
                                      ff_dim=128))
    with pytest.raises(OSError) as e:  # ~1.3 MiB: does not
        save_checkpoint(path, big, cllm.AdamW(big), ByteTokenizer(), {"step": 2})
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(path)
    assert path.read_bytes() == before and load_checkpoint(path).trainer_state == {"step": 1}
    assert [p.name for p in tiny_tmpfs.iterdir()] == ["last.safetensors"]


def test_disk_full_while_logging_metrics(data_dir, tmp_path, monkeypatch):
    """ENOSPC on metrics.jsonl is an OSError out of fit(); the last checkpoint stays loadable and a resumed run
    rewrites the metrics from it."""
    out = tmp_path / "m"
    real = Trainer._log
    calls = {"n": 0}

    def failing(self, record):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.metrics_path))
        real(self, record)

    monkeypatch.setattr(Trainer, "_log", failing)
    with pytest.raises(OSError, match="No space left"):
        Trainer(tiny(data_dir, out, max_steps=8, decay_steps=8)).fit()
    load_checkpoint(out / "last.safetensors")
    monkeypatch.undo()
    Trainer(tiny(data_dir, out, max_steps=8, decay_steps=8, resume=True)).fit()
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl") if "train_loss" in r]
    assert steps == list(range(1, 9))


def test_full_disk_on_metrics_jsonl_names_it(tmp_path):
    from cllm.train.run_files import MetricsLog

    log = MetricsLog(tmp_path / "metrics.jsonl")

    class FullDisk:
        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def close(self):
            pass

    log._file.close()
    log._file = FullDisk()
    with pytest.raises(OSError) as e:
        log.append({"step": 1})
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "metrics.jsonl")
    assert cli._one_line(e.value) == f"{tmp_path / 'metrics.jsonl'}: cannot write the metrics log: No space left on device"


def test_full_disk_at_metrics_jsonl_for_real_is_one_line_naming_it(data_dir, tiny_tmpfs, capsys):
    """A real ENOSPC at the first metrics line (the tmpfs full but for the lock's page): the refused line stayed
    in the file's buffer, closing it failed again, and that second error, naming no file, was the one shown."""
    run = tiny_tmpfs / "run"
    run.mkdir()
    (tiny_tmpfs / "reserve").write_bytes(bytes(4096))
    with open(tiny_tmpfs / "fill", "wb", buffering=0) as f:
        with pytest.raises(OSError):
            while True:
                f.write(bytes(4096))
    (tiny_tmpfs / "reserve").unlink()
    argv = ["train", "--data", str(data_dir), "--out-dir", str(run), "--max-steps", "2", "--max-seq-len", "16",
            "--embedding-dim", "32", "--num-layers", "1", "--num-heads", "4", "--ff-dim", "64", "--batch-size", "4",
            "--no-progress", "--sample-tokens", "0", "--log-interval", "1", "--threads", "1"]
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"cllm train: error: {run / 'metrics.jsonl'}: cannot write the metrics log: No space left on "
                   f"device"], err


# ----------------------------------------------------------------------------------------------------
# memory
# ----------------------------------------------------------------------------------------------------
def _cgroup_tree(tmp_path, proc: str, files: dict):
    (tmp_path / "proc").write_text(proc)
    for rel, text in files.items():
        f = tmp_path / "cg" / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    return str(tmp_path / "proc"), str(tmp_path / "cg")


def test_the_tightest_cgroup_limit_up_the_hierarchy_counts(tmp_path):
    """A limit on an ancestor of this process's cgroup (a Slurm job around its step, a systemd slice), v2 and v1,
    with reclaimable page cache not counted as used."""
    from cllm.core.system import _cgroup_room

    mib = 1 << 20
    proc, root = _cgroup_tree(tmp_path, "4:memory:/a/b\n0::/slurm/job/step\n", {
        "memory.max": "max", "memory.current": str(900 * mib),
        "slurm/job/memory.max": str(1024 * mib), "slurm/job/memory.current": str(300 * mib),
        "slurm/job/memory.stat": f"anon 1\ninactive_file {100 * mib}\n",
        "slurm/job/step/memory.max": "max", "slurm/job/step/memory.current": str(300 * mib),
        "memory/memory.limit_in_bytes": "9223372036854771712", "memory/memory.usage_in_bytes": "1",
        "memory/a/memory.limit_in_bytes": str(2048 * mib), "memory/a/memory.usage_in_bytes": str(100 * mib),
        "memory/a/b/memory.limit_in_bytes": "9223372036854771712", "memory/a/b/memory.usage_in_bytes": "5"})
    assert _cgroup_room(proc, root) == (1024 - 200) * mib  # the job's limit: tighter than v1's 2 GiB - 100 MiB
    os.unlink(os.path.join(root, "slurm/job/memory.max"))
    assert _cgroup_room(proc, root) == (2048 - 100) * mib
    assert _cgroup_room(str(tmp_path / "missing"), root) is None  # no path known: the roots hold no limit


def test_out_of_memory_anywhere_in_the_cli_is_one_line(monkeypatch, capsys):
    """A MemoryError the checks did not foresee (a C++ std::bad_alloc, a NumPy allocation) ends the command with
    one line and status 2, not a traceback."""
    def no_memory(args):
        raise MemoryError("std::bad_alloc")

    monkeypatch.setitem(cli.COMMANDS, "prepare", (*cli.COMMANDS["prepare"][:2], no_memory))
    assert cli.main(["prepare", "x", "--out", "y"]) == 2
    err = capsys.readouterr().err
    assert err == "cllm prepare: error: out of memory: std::bad_alloc\n"
def test_available_memory_is_known_here():
    avail = available_memory()
    assert avail is None or avail > 0


def test_estimates_match_the_core():
    for kw in (dict(vocab_size=50, max_seq_len=8, embedding_dim=16, num_layers=1, num_heads=2, ff_dim=32),
               dict(vocab_size=257, max_seq_len=13, embedding_dim=24, num_layers=3, num_heads=3, ff_dim=50,
                    pos_encoding="sinusoidal")):
        c = cllm.ModelConfig(**kw)
        m = cllm.Model(c)
        assert m.layout.total == parameter_count(c)
        assert m.num_parameters == parameter_count(c, padded=False)
        for B, T in ((1, 1), (3, 5), (2, c.max_seq_len)):
            m.loss(np.zeros((B, T), int), np.zeros((B, T), int))
            assert m.activation_bytes == 4 * activation_count(c, B, T)


@pytest.mark.parametrize("kw", [dict(vocab_size=10**9), dict(embedding_dim=2**20, num_heads=1, ff_dim=1),
                                dict(num_layers=10**6), dict(vocab_size=2**31)])
@pytest.mark.slow
def test_model_that_cannot_fit_is_refused_before_allocating(kw):
    with pytest.raises((InsufficientMemoryError, ValueError)) as e:  # the config, or the model
        cllm.Model(cllm.ModelConfig(**{**dict(vocab_size=256, max_seq_len=64, embedding_dim=128, num_heads=4), **kw}))
    msg = str(e.value)
    if isinstance(e.value, InsufficientMemoryError):  # does not fit here
        assert isinstance(e.value, MemoryError) and isinstance(e.value, CLLMError)
        assert "needs" in msg and "available" in msg, msg
    else:  # does not fit the core's 32-bit sizes anywhere
        assert type(e.value) is ValueError and "too large" in msg, msg


def test_memory_check_uses_the_available_memory(monkeypatch):
    cfg = cllm.ModelConfig(vocab_size=50_000, max_seq_len=16, embedding_dim=64, num_layers=2, num_heads=2,
                           ff_dim=128)
    monkeypatch.setattr(cllm.core.system, "available_memory", lambda: 100_000)
    with pytest.raises(MemoryError, match=r"needs 24\.\d MiB of memory, but only 100,000 bytes is available"):
        cllm.Model(cfg)
    monkeypatch.setenv("CLLM_MEMORY_CHECK", "0")  # the escape hatch
    cllm.Model(cfg)


def test_batch_that_cannot_fit_is_refused_before_allocating():
    m = cllm.Model(cllm.ModelConfig(vocab_size=50, max_seq_len=8, embedding_dim=16, num_layers=1, num_heads=2,
                                    ff_dim=32))
    x = np.broadcast_to(np.int64(1), (2**27, 8))  # 1e9 tokens, ~1 TB of activations; the input itself is free
    for call in (lambda: m.forward(x), lambda: m.forward_backward(x, x), lambda: m.loss(x, x)):
        with pytest.raises(InsufficientMemoryError, match=r"a batch of 134217728 x 8 tokens needs .* TiB"):
            call()
    with pytest.raises(InsufficientMemoryError, match="generating"):
        m.generate([1], 2**31 - 1, return_logits=True)  # 2**31 rows of logits
    with pytest.raises(InsufficientMemoryError, match="dropout masks"):
        m.dropout_masks(2**30, 8)
    assert m.loss(np.ones((2, 8), int), np.ones((2, 8), int)) > 0  # and the model still works


def test_kernel_outputs_that_cannot_fit_are_refused():
    k = cllm.kernels
    with pytest.raises(InsufficientMemoryError):
        k.sinusoidal_table(2**31 - 1, 2**31 - 1)
    with pytest.raises(InsufficientMemoryError):
        k.matmul(np.zeros((2**20, 1), np.float32), np.zeros((1, 2**20), np.float32))  # 4 TiB out of 8 MiB in
    with pytest.raises(InsufficientMemoryError):
        k.embedding_backward(np.zeros((1, 1, 2**10), np.float32), np.zeros((1, 1), np.int32), 2**31 - 1, 1)


def test_trainer_refuses_a_run_that_cannot_fit_before_training(data_dir, tmp_path, monkeypatch):
    """Weights + gradients + AdamW moments + activations are checked together before the model exists, so a model
    that would fit alone but not with its optimizer and batch is refused too."""
    no_training_happened(monkeypatch)
    cfg = tiny(data_dir, tmp_path / "big", batch_size=2**26, max_steps=2)
    est = memory_estimate(cfg.model_config(256), cfg.batch_size, cfg.max_seq_len)
    assert est > 2**40
    with pytest.raises(InsufficientMemoryError, match="training a model of 17,312 parameters on batches of"):
        Trainer(cfg).fit()
    wide = tiny(data_dir, tmp_path / "tight", max_steps=2, embedding_dim=512, ff_dim=2048, num_layers=2)
    params = parameter_count(wide.model_config(256))  # 6.4M: 51 MB of weights + gradients
    monkeypatch.setattr(cllm.core.system, "available_memory", lambda: 8 * params + 1)
    cllm.Model(wide.model_config(256))  # the model alone fits
    with pytest.raises(InsufficientMemoryError, match="training a model of"):  # with its optimizer and batch not
        Trainer(wide).fit()


def test_zero_divides_the_optimizer_state_of_the_estimate_by_the_ranks(data_dir, tmp_path, monkeypatch):
    """memory_estimate(shards=R): each rank holds the AdamW moments of its shard only (the largest of
    shard_ranges), the rest whole; the trainer passes its rank count with zero, 1 without."""
    from cllm.parallel import SingleProcess, shard_ranges

    mc = tiny(data_dir, tmp_path / "z").model_config(256)
    total, whole = parameter_count(mc), memory_estimate(mc, 4, 32)
    assert memory_estimate(mc, 4, 32, shards=1) == whole
    for r in (2, 3, 7):
        shard = max(hi - lo for lo, hi in shard_ranges(total, r))
        assert shard < total / r + 16
        assert memory_estimate(mc, 4, 32, shards=r) == whole - 4 * 2 * (total - shard)
    # SGD's momentum is never sharded (--zero needs AdamW)
    assert memory_estimate(mc, 4, 32, optimizer="sgd", shards=2) == memory_estimate(mc, 4, 32, optimizer="sgd")
    assert memory_estimate(mc, 4, 32, optimizer=None, shards=2) == memory_estimate(mc, 4, 32, optimizer=None)
    with pytest.raises(ValueError, match="shards"):
        memory_estimate(mc, 4, 32, shards=0)

    class TwoRanks(SingleProcess):  # what the trainer asks of a 2-rank communicator before it builds anything
        world_size = 2

    asked = []

    def estimate(*args, **kw):
        asked.append(kw["shards"])
        raise InsufficientMemoryError("stop here")

    monkeypatch.setattr("cllm.train.trainer.memory_estimate", estimate)
    no_training_happened(monkeypatch)
    for zero in (True, False):
        with pytest.raises(InsufficientMemoryError, match="stop here"):
            Trainer(tiny(data_dir, tmp_path / f"zero{zero}", zero=zero), comm=TwoRanks()).fit()
    assert asked == [2, 1]
    # rank 0 also holds the whole moments it gathers to write a checkpoint under zero
    needs = []

    def check(need, what):
        needs.append(need)
        raise InsufficientMemoryError("stop here")

    monkeypatch.setattr("cllm.train.trainer.memory_estimate", lambda *a, **kw: 0)
    monkeypatch.setattr("cllm.train.trainer.check_memory", check)
    for zero in (True, False):
        with pytest.raises(InsufficientMemoryError, match="stop here"):
            Trainer(tiny(data_dir, tmp_path / f"gather{zero}", zero=zero), comm=TwoRanks()).fit()
    assert needs == [2 * 4 * total, 0]


def test_a_resume_counts_loading_its_checkpoint(data_dir, tmp_path, monkeypatch):
    """Resuming holds the checkpoint's model and tensors beside the run's own while it loads them: counted."""
    cfg = tiny(data_dir, tmp_path / "r", max_steps=2, embedding_dim=256, ff_dim=1024, num_layers=2)
    Trainer(cfg).fit()
    need = memory_estimate(cfg.model_config(256), cfg.batch_size, cfg.max_seq_len)
    monkeypatch.setattr(cllm.core.system, "available_memory", lambda: need + 4 * parameter_count(cfg.model_config(256)))
    with pytest.raises(InsufficientMemoryError, match=r"training a model of .* tokens \(resumed\) needs"):
        Trainer(cfg.replace(resume=True, max_steps=3)).fit()


def test_cli_reports_a_model_too_large_in_one_line(data_dir, tmp_path, capsys):
    code = cli.main(["train", "--data", str(data_dir), "--out-dir", str(tmp_path / "r"), "--embedding-dim",
                     "1048576", "--num-heads", "1", "--no-progress", "--max-time", "none"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "needs" in err[0] and "of memory" in err[0], err


def test_huge_model_in_a_subprocess_is_an_error_not_the_oom_killer(tmp_path):
    """End to end in a fresh interpreter: exit status 1 with a MemoryError, not a signal."""
    code = ("import cllm; cllm.Model(cllm.ModelConfig(vocab_size=10**9, max_seq_len=1024, embedding_dim=1024, "
            "num_heads=16, ff_dim=4096))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "InsufficientMemoryError" in r.stderr and "TiB" in r.stderr, r.stderr[-500:]


# ----------------------------------------------------------------------------------------------------
# threads
# ----------------------------------------------------------------------------------------------------
def test_absurd_thread_counts_are_refused(data_dir, tmp_path, capsys):
    """100 000 OpenMP threads crash the process (libgomp cannot create them): refused from the API, the config and
    the command line, and bounded when asked for through OMP_NUM_THREADS."""
    from cllm.core.system import MAX_THREADS

    before = cllm.get_num_threads()
    for n in (0, -1, MAX_THREADS + 1, 10**5):
        with pytest.raises(ValueError, match="threads"):
            cllm.set_num_threads(n)
    with pytest.raises(TypeError, match="threads"):
        cllm.set_num_threads(2.5)
    assert cllm.get_num_threads() == before
    with pytest.raises(ValueError, match="threads must be at most"):
        TrainConfig(threads=10**5)
    assert cli.main(["train", "--data", str(data_dir), "--out-dir", str(tmp_path / "t"), "--threads", "100000"]) == 2
    assert "threads must be at most" in capsys.readouterr().err
    code = "import cllm; print(cllm.get_num_threads())"  # (not starting MAX_THREADS threads here)
    r = subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, OMP_NUM_THREADS="100000"))
    assert r.returncode == 0 and r.stdout.strip() == str(MAX_THREADS), r.stderr[-300:]
    assert "OMP_NUM_THREADS" in r.stderr
