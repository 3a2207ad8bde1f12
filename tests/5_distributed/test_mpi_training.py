"""Data parallelism over MPI (cllm.parallel.mpi): 2 ranks x batch B train exactly like 1 rank x batch 2B, resume
works under mpirun, diverged replicas are caught, and a rank that raises or is killed ends the whole job
(non-zero exit, the rank named) instead of hanging it.

The multi-process tests (marked `mpi`) launch `mpirun -n 2` (1 OpenMP thread per rank) and are skipped, with the
reason, only when mpi4py cannot be imported or no mpirun/mpiexec is found (pip install 'cllm[mpi]'; conftest.py).
The pieces of data parallelism checked without MPI, in the pytest process, are in test_without_mpi.py."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from cllm.train.checkpoint import load_checkpoint
from cllm.data import prepare
from cllm.parallel.mpi import mpirun_command
from cllm.parallel.reducer import shard_ranges
from netns_hosts import NamespaceHosts, namespace_hosts_missing
from cllm.train.run_files import read_metrics
from cllm.train.config import TrainConfig
from cllm.train.trainer import Trainer

JOB_TIMEOUT = 60  # seconds: no job here may take longer; a hang fails the test instead of blocking the suite
STEPS = 20
B = 4  # rows per rank; the one-rank reference uses 2 * B

# tiny model and run: a 20-step job takes about a second per rank
SETTINGS = dict(max_seq_len=32, embedding_dim=32, num_layers=2, num_heads=2, ff_dim=64, lr=1e-3, min_lr=1e-4,
                warmup_steps=2, decay_steps=STEPS, max_steps=STEPS, eval_interval=10, eval_batches=2,
                checkpoint_interval=5, log_interval=1, progress=False, sample_tokens=0, max_time=None, threads=1,
                seed=3)




def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMIX_", "PMI_", "PRTE_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", CLLM_REPLICA_CHECK_INTERVAL="5")
    return env


def run_mpi(n, args, cwd, timeout=JOB_TIMEOUT, env=None, launcher=None):
    """Run `mpirun -n n <python> args...` (or `launcher <python> args...`); returns (exit status, stdout + stderr,
    seconds). Never hangs: on timeout the whole process group is killed and the test fails."""
    cmd = (launcher or mpirun_command(n)) + [sys.executable] + [str(a) for a in args]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env or _env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"mpirun job did not end within {timeout} s (hung?):\n{' '.join(cmd)}\n{out[-4000:]}")
    return proc.returncode, out, time.monotonic() - t0


def cli_flags(settings: dict) -> list:
    flags = []
    for k, v in settings.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            flags.append(flag if v else "--no-" + k.replace("_", "-"))
        else:
            flags += [flag, "none" if v is None else str(v)]
    return flags


def params(path) -> np.ndarray:
    return np.array(load_checkpoint(path).model.flat_parameters())


def train_losses(out_dir):
    return [r["train_loss"] for r in read_metrics(Path(out_dir) / "metrics.jsonl") if "train_loss" in r]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    import argparse
    import json as json_mod
    import typing

    root = tmp_path_factory.mktemp("mpi_corpus")
    src = root / "src"
    src.mkdir()
    for mod in (argparse, json_mod, typing):
        (src / (mod.__name__ + ".py")).write_text(Path(mod.__file__).read_text(encoding="utf-8")[:20000])
    prepare([src], root / "data", "byte", val_fraction=0.2)
    return root / "data"


@pytest.fixture(scope="module")
def two_ranks(data_dir, tmp_path_factory):
    """`mpirun -n 2 cllm train` with batch B per rank for 20 steps."""
    out = tmp_path_factory.mktemp("two_ranks") / "run"
    code, log, _ = run_mpi(2, ["-m", "cllm", "train", "--data", data_dir, "--out-dir", out, "--batch-size", B]
                           + cli_flags(SETTINGS), cwd=out.parent)
    assert code == 0, log
    return out, log


@pytest.fixture(scope="module")
def one_rank(data_dir, tmp_path_factory):
    """The reference: one process, batch 2B, the same 20 steps."""
    out = tmp_path_factory.mktemp("one_rank") / "run"
    summary = Trainer(TrainConfig(data=str(data_dir), out_dir=str(out), batch_size=2 * B, **SETTINGS)).fit()
    assert summary["steps"] == STEPS
    return out


# ------------------------------------------------------------------------------------------------------
# training under mpirun
# ------------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.mpi
def test_two_ranks_match_one_rank_with_twice_the_batch(two_ranks, one_rank):
    out, log = two_ranks
    got, ref = params(out / "last.safetensors"), params(one_rank / "last.safetensors")
    assert np.abs(ref).max() > 0.1
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4, err_msg="2 ranks x B vs 1 rank x 2B after 20 steps")
    np.testing.assert_allclose(train_losses(out), train_losses(one_rank), rtol=1e-5, atol=1e-5)
    # averaged over ranks: the validation losses are those of the whole validation set
    val = lambda d: [r["val_loss"] for r in read_metrics(d / "metrics.jsonl") if "val_loss" in r]  # noqa: E731
    np.testing.assert_allclose(val(out), val(one_rank), rtol=1e-5)
    # rank 0 alone writes: one metrics record per step, one final line, the checkpoint knows the world size
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl") if "train_loss" in r]
    assert steps == list(range(1, STEPS + 1))
    assert log.count("stopped (max_steps) at step 20") == 1, log
    ckpt = load_checkpoint(out / "last.safetensors")
    assert ckpt.trainer_state["world_size"] == 2 and ckpt.trainer_state["step"] == STEPS


@pytest.mark.slow
@pytest.mark.mpi
@pytest.mark.skipif(bool(namespace_hosts_missing()), reason=namespace_hosts_missing() or "root")
def test_two_hosts_match_one_host_and_one_process(two_ranks, one_rank, data_dir, tmp_path):
    """Two "hosts" (network namespaces on a bridge, each link shaped to 1 Gbit/s by tc tbf), one rank each,
    Open MPI over TCP between their addresses only: the same training as on one host."""
    out = tmp_path / "run"
    with NamespaceHosts(2, rate="1gbit") as hosts:
        sent0 = hosts.bytes_sent()
        code, log, _ = run_mpi(2, ["-m", "cllm", "train", "--data", data_dir, "--out-dir", out, "--batch-size", B]
                               + cli_flags(SETTINGS), cwd=tmp_path, launcher=hosts.mpirun_command(1))
        sent = [b - a for a, b in zip(sent0, hosts.bytes_sent())]
    assert code == 0, log
    got = params(out / "last.safetensors")
    # every step's gradients crossed the link: each rank sends at least the buffer's bytes (ring: 2 halves)
    assert min(sent) >= STEPS * got.nbytes, (sent, got.nbytes)
    # a + b is a + b over shared memory or TCP: bit for bit the one-host run, and the one-process run's result
    np.testing.assert_array_equal(got, params(two_ranks[0] / "last.safetensors"))
    np.testing.assert_allclose(got, params(one_rank / "last.safetensors"), rtol=0, atol=1e-4)
    assert train_losses(out) == train_losses(two_ranks[0])


def _namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


@pytest.mark.skipif(bool(namespace_hosts_missing()), reason=namespace_hosts_missing() or "root")
def test_namespace_hosts_are_removed_even_after_an_error():
    with pytest.raises(RuntimeError, match="inside"):
        with NamespaceHosts(3) as hosts:
            names = hosts.namespaces + [hosts.switch]
            assert all(n in _namespaces() for n in names)
            raise RuntimeError("inside")
    assert not any(n in _namespaces() for n in names)
    assert hosts.agent is None


def test_namespace_hosts_arguments_are_checked():
    with pytest.raises(ValueError, match="2 to 200 hosts, got 1"):
        NamespaceHosts(1)
    with pytest.raises(ValueError, match="rate must be a tc rate such as '1gbit'.*got 'fast'"):
        NamespaceHosts(2, rate="fast")


@pytest.mark.slow
@pytest.mark.mpi
@pytest.mark.filterwarnings("error:resuming with changed settings")  # 2 ranks x B and 1 x 2B: the same batch
def test_resume_under_mpi_continues_exactly(two_ranks, one_rank, data_dir, tmp_path):
    out, single = tmp_path / "resumed", tmp_path / "single"
    code, log, _ = run_mpi(2, ["-m", "cllm", "train", "--data", data_dir, "--out-dir", out, "--batch-size", B]
                           + cli_flags({**SETTINGS, "max_steps": 10}), cwd=tmp_path)
    assert code == 0, log
    assert load_checkpoint(out / "last.safetensors").trainer_state["step"] == 10
    shutil.copytree(out, single)
    code, log, _ = run_mpi(2, ["-m", "cllm", "train", "--out-dir", out, "--resume", "--max-steps", STEPS],
                           cwd=tmp_path)
    assert code == 0, log
    assert log.count("resumed from") == 1, log
    # every rank loaded the same checkpoint and the global loader state: bit for bit the uninterrupted run
    np.testing.assert_array_equal(params(out / "last.safetensors"), params(two_ranks[0] / "last.safetensors"))
    assert train_losses(out) == train_losses(two_ranks[0])

    # a checkpoint of 2 ranks x B resumes in one process with 2B too (the global batch is what counts)
    Trainer(TrainConfig(data=str(data_dir), out_dir=str(single), batch_size=2 * B, resume=True,
                        **SETTINGS)).fit()
    np.testing.assert_allclose(params(single / "last.safetensors"), params(one_rank / "last.safetensors"),
                               rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------------------------------
# the gradient exchange: buckets, overlap with the backward, bf16
# ------------------------------------------------------------------------------------------------------
SMALL_BUCKETS = ["--bucket-mb", "0.01"]  # 2621 floats: the tiny model's ~36k gradients in 14 buckets


@pytest.mark.slow
@pytest.mark.mpi
def test_overlapped_buckets_equal_the_exchange_after_the_backward(two_ranks, data_dir, tmp_path):
    """Overlap on or off does the same collectives on the same buckets, and every gradient is summed in rank
    order whatever the buckets: bit for bit the same parameters with 3 ranks, and with 2 ranks small overlapped
    buckets equal the default (1 MiB: one bucket for this model) run."""
    runs = {}
    for name, n, extra in (("3 overlap", 3, SMALL_BUCKETS), ("3 after", 3, SMALL_BUCKETS + ["--no-overlap"]),
                           ("2 overlap", 2, SMALL_BUCKETS)):
        out = tmp_path / name.replace(" ", "_")
        code, log, _ = run_mpi(n, ["-m", "cllm", "train", "--data", data_dir, "--out-dir", out, "--batch-size", B]
                               + cli_flags(SETTINGS) + extra, cwd=tmp_path)
        assert code == 0, log
        runs[name] = params(out / "last.safetensors")
    np.testing.assert_array_equal(runs["3 overlap"], runs["3 after"])
    np.testing.assert_array_equal(runs["2 overlap"], params(two_ranks[0] / "last.safetensors"))


# Under mpirun: a tied model's gradients averaged with the embedding's part exchanged compactly (the rows of the
# union of the ranks' tokens), overlapped and after the backward, against the whole buffer exchanged densely.
COMPACT_SCRIPT = textwrap.dedent("""
    import numpy as np
    from cllm.parallel import MPICommunicator, shard_ranges
    from cllm.core.model import Model, ModelConfig

    comm = MPICommunicator()
    R, rank = comm.world_size, comm.rank
    for arch in ("gpt2", "llama"):
        extra = dict(architecture="llama", pos_encoding=None) if arch == "llama" else {}
        cfg = ModelConfig(vocab_size=96, max_seq_len=16, embedding_dim=32, num_layers=2, num_heads=2, ff_dim=64,
                          dropout=0.1, **extra)
        rng = np.random.default_rng(10 + rank)  # each rank its own tokens: 0..47 only on rank 0, so the union
        x = rng.integers(0, 48 if rank == 0 else 96, (2, 3, 16)).astype(np.int32)  # is no rank's own set

        def grads(model=None, overlap=False, dtype="fp32", shards=None):
            m = Model(cfg, seed=1)
            m.dropout_stream = rank
            red = comm.gradient_reducer(m.flat_gradients(), 300, overlap, dtype, shards, model=m if model else None)
            m.forward_backward(x[0], x[0])  # an earlier micro-batch: the dense path
            red.start(x[1])
            m.forward_backward(x[1], x[1], accumulate=True, on_grads_ready=red.ready if overlap else None,
                               embedding_grad=red.embedding_grad)
            red.finish()
            out = (m.flat_gradients().copy(), red.bytes_sent, red.embedding_grad is not None)
            red.close()
            return out

        dense, dense_sent, split = grads()
        assert not split
        for dtype in ("fp32", "bf16"):
            over, sent, split = grads(True, True, dtype)
            after, _, _ = grads(True, False, dtype)
            assert split
            np.testing.assert_array_equal(over, after)  # the same additions, overlapped or not
            tol = 1e-6 if dtype == "fp32" else 1e-2
            np.testing.assert_allclose(over, dense, rtol=0, atol=tol * np.abs(dense).max(), err_msg=arch + dtype)
        assert sent > dense_sent // 2  # bf16: the dense half plus the compact rows
        assert np.abs(dense).max() > 1e-3
        shards = shard_ranges(dense.size, R)
        lo, hi = shards[rank]
        zero, _, _ = grads(True, True, "fp32", shards)
        np.testing.assert_allclose(zero[lo:hi], dense[lo:hi], rtol=0, atol=1e-6 * np.abs(dense).max())
        red = comm.gradient_reducer(dense, 300, model=Model(cfg, seed=1))
        wte = next(t for t in Model(cfg).tensor_info if t["name"] in ("wte", "embed_tokens.weight"))
        end = wte["offset"] + wte["size"]
        assert all(e <= end or s >= end for s, e in red.buckets)  # no bucket straddles wte's end
        try:
            red.start(x[1].astype(np.float32))
            raise SystemExit("float tokens were accepted")
        except ValueError as e:
            assert "tokens must be an integer [B, T] array" in str(e), e
        try:  # (start() failed above, so this step never began: nothing would be reduced)
            red.finish()
            raise SystemExit("finish() without start() was accepted")
        except RuntimeError as e:
            assert "finish() without start()" in str(e), e
        try:  # tokens on one rank only: every rank refuses (none is left waiting in a collective)
            red.start(x[1] if rank == 0 else None)
            raise SystemExit("tokens on some ranks only were accepted")
        except ValueError as e:
            assert "some ranks gave their tokens and others none" in str(e), e
        red.close()
        # the ranks' T differ: with wpe (its first T rows are summed) every rank refuses; without, it works
        xt = x[1][:, :8 if rank == 0 else 16]

        def step(compact):
            m = Model(cfg, seed=1)
            red = comm.gradient_reducer(m.flat_gradients(), 300, model=m if compact else None)
            red.start(xt if compact else None)
            m.forward_backward(xt, xt, embedding_grad=red.embedding_grad)
            red.finish()
            red.close()
            return m.flat_gradients().copy()
        try:
            got = step(True)
            assert arch == "llama", "different T on the ranks was accepted with wpe"
            want = step(False)
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * np.abs(want).max())
        except ValueError as e:
            assert arch == "gpt2" and "different sequence lengths T [8, 16]" in str(e), e
    print("compact ok", rank, flush=True)
""")


@pytest.mark.slow
@pytest.mark.mpi
@pytest.mark.parametrize("ranks", [2, 3])
def test_compact_embedding_exchange_equals_the_dense_one(ranks, tmp_path):
    """The embedding's rows exchanged compactly (union of the ranks' tokens) give the dense exchange's averaged
    gradients to float32 order noise (1e-6 of the largest; bf16 to its rounding), bit for bit the same with and
    without overlap, with an earlier micro-batch on the dense path, for GPT-2 (learned wpe) and a tied Llama,
    and under ZeRO-1 on each rank's shard; no bucket straddles wte's end; float tokens and tokens on some ranks
    only are refused; ranks with different sequence lengths are refused with wpe and exchange correctly without."""
    script = tmp_path / "compact.py"
    script.write_text(COMPACT_SCRIPT)
    code, log, _ = run_mpi(ranks, [script], cwd=tmp_path)
    assert code == 0, log
    assert log.count("compact ok") == ranks, log


@pytest.mark.slow
@pytest.mark.mpi
@pytest.mark.skipif(bool(namespace_hosts_missing()), reason=namespace_hosts_missing() or "root")
def test_bf16_gradients_halve_the_bytes_between_hosts(two_ranks, data_dir, tmp_path):
    """Two namespace hosts: --grad-dtype bf16 sends about half the bytes of fp32 over the link, the replicas
    stay equal (the run's replica checks pass), and the losses stay close to the fp32 run's."""
    sent, outs = {}, {}
    for dtype in ("fp32", "bf16"):
        out = outs[dtype] = tmp_path / dtype
        with NamespaceHosts(2) as hosts:
            before = hosts.bytes_sent()
            code, log, _ = run_mpi(2, ["-m", "cllm", "train", "--data", data_dir, "--out-dir", out, "--batch-size",
                                       B, "--grad-dtype", dtype] + cli_flags(SETTINGS) + SMALL_BUCKETS,
                                   cwd=tmp_path, launcher=hosts.mpirun_command(1))
            sent[dtype] = sum(hosts.bytes_sent()) - sum(before)
        assert code == 0, log
    ratio = sent["bf16"] / sent["fp32"]
    assert 0.4 < ratio < 0.6, sent  # measured 0.52; the rest: losses, checks, start-up, TCP/IP headers
    np.testing.assert_array_equal(params(outs["fp32"] / "last.safetensors"),
                                  params(two_ranks[0] / "last.safetensors"))
    fp32, bf16 = train_losses(outs["fp32"]), train_losses(outs["bf16"])
    assert fp32 != bf16
    np.testing.assert_allclose(bf16, fp32, rtol=2e-3)


# ------------------------------------------------------------------------------------------------------
# ZeRO-1: the AdamW moments sharded across ranks
# ------------------------------------------------------------------------------------------------------
def moments(path) -> np.ndarray:
    state = load_checkpoint(path).optimizer_state
    return np.concatenate([state[slot][name].ravel() for slot in ("exp_avg", "exp_avg_sq")
                           for name in sorted(state[slot])])


@pytest.mark.slow
@pytest.mark.mpi
def test_zero1_equals_plain_data_parallelism_and_resumes_with_other_rank_counts(two_ranks, one_rank, data_dir,
                                                                                  tmp_path):
    """--zero: the same parameters as plain data parallelism (the only difference: the global gradient norm is
    summed from the shards' in another order, which may move the clipping factor by a float32 rounding); one
    checkpoint file with the whole moments; resumed by 4 ranks x B/2 and by one process x 2B."""
    def train(out, n, batch, extra):
        code, log, _ = run_mpi(n, ["-m", "cllm", "train", "--data", data_dir, "--out-dir", out, "--batch-size",
                                   batch, "--zero"] + cli_flags(SETTINGS) + SMALL_BUCKETS + extra, cwd=tmp_path)
        assert code == 0, log
        return log

    full = tmp_path / "zero"
    log = train(full, 2, B, [])
    total = load_checkpoint(two_ranks[0] / "last.safetensors").model.layout.total
    share = shard_ranges(total, 2)[0][1]  # rank 0's: about half, cut on a 16-float boundary
    assert abs(share - total / 2) <= 16
    assert f"the optimizer moments are sharded, {share:,} of {total:,} floats each on rank 0 (of 2" in log, log
    plain = two_ranks[0] / "last.safetensors"
    np.testing.assert_allclose(params(full / "last.safetensors"), params(plain), rtol=0, atol=1e-6)
    np.testing.assert_allclose(moments(full / "last.safetensors"), moments(plain), rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(train_losses(full), train_losses(two_ranks[0]), rtol=1e-6)

    half = tmp_path / "half"
    train(half, 2, B, ["--max-steps", "10"])
    single = tmp_path / "single"
    shutil.copytree(half, single)
    code, log, _ = run_mpi(4, ["-m", "cllm", "train", "--out-dir", half, "--resume", "--batch-size", B // 2,
                               "--max-steps", STEPS],
                           cwd=tmp_path)
    assert code == 0, log
    np.testing.assert_allclose(params(half / "last.safetensors"), params(full / "last.safetensors"), rtol=0,
                               atol=1e-4)
    Trainer(TrainConfig(data=str(data_dir), out_dir=str(single), batch_size=2 * B, resume=True, zero=True,
                        **SETTINGS)).fit()
    np.testing.assert_allclose(params(single / "last.safetensors"), params(full / "last.safetensors"), rtol=0,
                               atol=1e-4)


# ------------------------------------------------------------------------------------------------------
# divergence and failures
# ------------------------------------------------------------------------------------------------------
FAULT_SCRIPT = textwrap.dedent("""
    import json, os, signal, sys
    import cllm.train.trainer
    from cllm.parallel.mpi import auto_communicator

    mode, entry, settings = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    rank = int(os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("PMI_RANK", "0")))
    original = cllm.train.trainer.Trainer.train_step

    def train_step(self):
        if self.step == 7 and rank == 1:
            if mode == "perturb":
                self.model.flat_parameters()[0] += 1e-3  # rank 1's replica drifts away
            elif mode == "raise":
                raise ValueError("injected failure on this rank")
            elif mode == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
        return original(self)

    cllm.train.trainer.Trainer.train_step = train_step
    if entry == "cli":  # the command line, whose error handler would otherwise return 2 and hang the others
        from cllm.cli import main
        flags = []
        for k, v in settings.items():
            flags += ["--" + k.replace("_", "-")] if v is True else \\
                     ["--no-" + k.replace("_", "-")] if v is False else ["--" + k.replace("_", "-"), str(v)]
        sys.exit(main(["train"] + flags))
    else:  # a user's script: an uncaught exception
        cllm.train.trainer.Trainer(cllm.TrainConfig(**settings), comm=auto_communicator()).fit()
""")


def run_fault(mode, entry, data_dir, tmp_path):
    script = tmp_path / "fault.py"
    script.write_text(FAULT_SCRIPT)
    settings = {**SETTINGS, "data": str(data_dir), "out_dir": str(tmp_path / "run"), "batch_size": B}
    code, log, seconds = run_mpi(2, [script, mode, entry, json.dumps(settings)], cwd=tmp_path)
    assert code != 0, log
    assert seconds < JOB_TIMEOUT
    return log


@pytest.mark.slow
@pytest.mark.mpi
def test_diverged_replicas_raise_a_clear_error(data_dir, tmp_path):
    log = run_fault("perturb", "script", data_dir, tmp_path)
    # rank 1 was perturbed during step 8; the check every 5 steps (CLLM_REPLICA_CHECK_INTERVAL) sees it at step 10
    assert "ReplicaDivergenceError" in log, log
    assert "model parameters diverged across ranks at step 10: rank 1 differs from rank 0" in log, log


@pytest.mark.slow
@pytest.mark.mpi
@pytest.mark.parametrize("entry", ["script", "cli"])
def test_exception_on_one_rank_ends_the_job(entry, data_dir, tmp_path):
    log = run_fault("raise", entry, data_dir, tmp_path)
    assert re.search(r"rank 1 of 2 failed: ValueError: injected failure on this rank", log), log


@pytest.mark.slow
@pytest.mark.mpi
def test_killed_rank_ends_the_job(data_dir, tmp_path):
    log = run_fault("kill", "script", data_dir, tmp_path)
    assert re.search(r"signal 9|killed", log, re.IGNORECASE), log  # the launcher reports the death
    if "prterun" in log or "Open MPI" in log:  # Open MPI also names the rank (MPICH's hydra gives its PID)
        assert re.search(r"rank 1\b", log), log
