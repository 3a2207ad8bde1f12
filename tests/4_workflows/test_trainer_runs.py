"""The trainer on tiny models: gradient accumulation, bit-exact resume, early stopping, the non-finite guard,
metrics / plot / checkpoints, data caching and the data-parallel hook; resuming from damaged or edited files; the
training extras (EMA, SGD, label smoothing, samples during training). Its configuration (TrainConfig) is tested in
test_trainer_config.py."""
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import cllm
from cllm.train.checkpoint import load_checkpoint, read_metadata
from cllm.data import load_tokens, prepare, write_tokens
from cllm.train.run_files import read_metrics
from cllm.train.config import TrainConfig
from cllm.train.trainer import Trainer

TINY = dict(max_seq_len=16, embedding_dim=32, num_layers=1, num_heads=4, ff_dim=64, batch_size=4, max_time=None,
            warmup_steps=2, eval_interval=4, eval_batches=2, progress=False, sample_tokens=0, log_interval=1,
            checkpoint_interval=5, threads=1)


def corpus_files(root: Path) -> Path:
    """A small Python-like corpus: slices of a few standard-library modules."""
    import argparse
    import email.message
    import json as json_mod
    import typing

    src = root / "src"
    src.mkdir(parents=True, exist_ok=True)
    for mod in (argparse, email.message, json_mod, typing):
        name = mod.__name__.replace(".", "_") + ".py"
        (src / name).write_text(Path(mod.__file__).read_text(encoding="utf-8")[:12000], encoding="utf-8")
    return src


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    out = root / "data"
    prepare([corpus_files(root)], out, "byte", val_fraction=0.3)
    return out


def tiny(data_dir, out_dir, **kw):
    return TrainConfig(**{**TINY, "data": str(data_dir), "out_dir": str(out_dir), **kw})


def train_losses(out_dir):
    return [(r["step"], r["train_loss"]) for r in read_metrics(Path(out_dir) / "metrics.jsonl") if "train_loss" in r]


def val_losses(out_dir):
    return [(r["step"], r["val_loss"]) for r in read_metrics(Path(out_dir) / "metrics.jsonl")
            if r.get("val_loss") is not None and not r.get("final_eval")]


# ------------------------------------------------------------------------------------------------------
# the loop
# ------------------------------------------------------------------------------------------------------
def test_fit_writes_metrics_plot_checkpoints(data_dir, tmp_path):
    out = tmp_path / "run"
    s = Trainer(tiny(data_dir, out, max_steps=10, sample_tokens=12)).fit()
    assert s["steps"] == 10 and s["stop_reason"] == "max_steps" and s["nonfinite_steps"] == 0
    assert len(s["sample"]) > 0
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = read_metrics(out / "metrics.jsonl")
    steps = [r for r in records if "train_loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 11))
    for key in ("train_loss", "lr", "grad_norm", "tokens_per_sec", "elapsed"):
        assert all(isinstance(r[key], float) for r in steps), key
    assert [r["step"] for r in records if r.get("val_loss") is not None] == [4, 8, 10]  # + final evaluation
    for r in records:  # bits per byte beside each validation loss: loss / ln 2 for the byte tokenizer
        if r.get("val_loss") is not None:
            assert abs(r["val_bpb"] - r["val_loss"] / np.log(2)) < 1e-12
    assert steps[-1]["train_loss"] < steps[0]["train_loss"]
    # the lr follows the schedule
    t = Trainer(tiny(data_dir, out, max_steps=10))
    assert [r["lr"] for r in steps] == [t.lr_at(i) for i in range(10)]
    last = load_checkpoint(out / "last.safetensors")
    assert last.trainer_state["step"] == 10 and last.optimizer_state["step"] == 10
    best = load_checkpoint(out / "best.safetensors")
    assert best.trainer_state["step"] == 10 == s["best_step"]  # the final evaluation beat step 8's: a new best
    assert s["best_val_loss"] == best.trainer_state["best_val_loss"]


def test_grad_accumulation_matches_one_big_batch(data_dir, tmp_path):
    params = {}
    for B, A in ((4, 1), (2, 2), (1, 4)):
        t = Trainer(tiny(data_dir, tmp_path / f"b{B}", batch_size=B, grad_accum=A, max_steps=1, eval_interval=50))
        t.fit()
        params[B, A] = t.model.flat_parameters().copy()
    ref = params[4, 1]
    for key, p in params.items():
        rel = np.linalg.norm(p - ref) / np.linalg.norm(ref)
        assert rel < 1e-6, (key, rel)


def test_bf16_precision_trains_like_fp32(data_dir, tmp_path):
    runs = {}
    for precision in ("fp32", "bf16"):
        t = Trainer(tiny(data_dir, tmp_path / precision, precision=precision, max_steps=10, eval_interval=50))
        t.fit()
        assert t.model.precision == precision
        runs[precision] = [loss for _, loss in train_losses(tmp_path / precision)]
    assert len(runs["bf16"]) == len(runs["fp32"]) == 10
    rel = max(abs(b - f) / f for b, f in zip(runs["bf16"], runs["fp32"]))
    assert rel < 0.02, rel  # bf16 inputs, fp32 accumulation: the same run within bf16 round-off
    assert runs["bf16"][-1] < runs["bf16"][0]
    with pytest.raises(ValueError, match="precision"):
        tiny(data_dir, tmp_path / "x", precision="fp16")


@pytest.mark.parametrize("extra", [dict(dropout=0.0), dict(dropout=0.2),
                                   dict(ema_decay=0.9, optimizer="sgd", label_smoothing=0.1, lr=0.05, min_lr=0.01)],
                         ids=["plain", "dropout", "ema-sgd-smoothing"])
def test_resume_is_bit_exact(data_dir, tmp_path, extra):
    kw = dict(extra, decay_steps=12, patience=5)
    full = Trainer(tiny(data_dir, tmp_path / "full", max_steps=12, **kw)).fit()
    s1 = Trainer(tiny(data_dir, tmp_path / "cut", max_steps=6, **kw)).fit()
    assert s1["steps"] == 6
    s2 = Trainer(tiny(data_dir, tmp_path / "cut", max_steps=12, resume=True, **kw)).fit()
    assert s2["steps"] == 12 and s2["steps_this_session"] == 6
    a, b = train_losses(tmp_path / "full"), train_losses(tmp_path / "cut")
    assert [s for s, _ in a] == list(range(1, 13))
    assert a == b  # exact float equality, every step
    assert val_losses(tmp_path / "full") == val_losses(tmp_path / "cut")
    assert full["best_val_loss"] == s2["best_val_loss"] and full["best_step"] == s2["best_step"]
    x, y = load_checkpoint(tmp_path / "full" / "last.safetensors"), load_checkpoint(tmp_path / "cut" / "last.safetensors")
    assert np.array_equal(x.model.flat_parameters(), y.model.flat_parameters())
    for k in ("exp_avg", "exp_avg_sq", "momentum_buffer"):
        for name in x.optimizer_state.get(k, {}):
            assert np.array_equal(x.optimizer_state[k][name], y.optimizer_state[k][name])
    assert (x.ema is None) == (y.ema is None) == ("ema_decay" not in extra)
    for name in x.ema or {}:
        assert np.array_equal(x.ema[name], y.ema[name])
    for k in ("step", "optimizer_step", "dropout_step", "loader", "evals_since_best", "best_val_loss"):
        assert x.trainer_state[k] == y.trainer_state[k], k


def test_resume_after_crash_between_checkpoints(data_dir, tmp_path, monkeypatch):
    """A run dies at step 8 (last checkpoint at step 5): resuming redoes steps 6.. exactly, and metrics.jsonl
    forgets the lost steps."""
    kw = dict(dropout=0.1, decay_steps=12)
    Trainer(tiny(data_dir, tmp_path / "full", max_steps=12, **kw)).fit()
    calls = {"n": 0}
    real = Trainer.train_step

    def dying(self):
        calls["n"] += 1
        if calls["n"] == 8:
            raise RuntimeError("killed")
        return real(self)

    monkeypatch.setattr(Trainer, "train_step", dying)
    with pytest.raises(RuntimeError, match="killed"):
        Trainer(tiny(data_dir, tmp_path / "cut", max_steps=12, **kw)).fit()
    monkeypatch.undo()
    assert read_metadata(tmp_path / "cut" / "last.safetensors")["trainer_state"]["step"] == 5
    assert train_losses(tmp_path / "cut")[-1][0] == 7
    Trainer(tiny(data_dir, tmp_path / "cut", max_steps=12, resume=True, **kw)).fit()
    assert train_losses(tmp_path / "full") == train_losses(tmp_path / "cut")


def test_resume_errors(data_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="last.safetensors"):
        Trainer(tiny(data_dir, tmp_path / "none", resume=True)).fit()
    Trainer(tiny(data_dir, tmp_path / "r", max_steps=2)).fit()
    with pytest.raises(ValueError, match="model differs: embedding_dim 32"):
        Trainer(tiny(data_dir, tmp_path / "r", max_steps=4, embedding_dim=64, resume=True)).fit()


@pytest.mark.parametrize("how", ["lr0", "min_delta"])
def test_early_stopping(data_dir, tmp_path, how):
    kw = dict(lr=0.0, min_lr=0.0) if how == "lr0" else dict(min_delta=100.0)
    out = tmp_path / how
    s = Trainer(tiny(data_dir, out, max_steps=100, eval_interval=3, patience=2, **kw)).fit()
    assert s["stop_reason"] == "early_stop"
    assert s["steps"] == 9  # evaluations at 3 (best), 6 and 9 (no improvement twice)
    assert s["best_step"] == 3 and (out / "best.safetensors").is_file()
    assert load_checkpoint(out / "best.safetensors").trainer_state["step"] == 3
    assert load_checkpoint(out / "last.safetensors").trainer_state["evals_since_best"] == 2


@pytest.mark.parametrize("mode", ["skip", "stop"])
def test_nonfinite_guard(data_dir, tmp_path, monkeypatch, mode):
    real = cllm.Model.forward_backward
    calls = {"n": 0}

    def flaky(self, x, y, accumulate=False, grad_scale=1.0, **kw):
        calls["n"] += 1
        loss = real(self, x, y, accumulate=accumulate, grad_scale=grad_scale, **kw)
        if calls["n"] == 3:
            self.gradients()["wte"][0, 0] = np.nan
            return float("nan")
        return loss

    monkeypatch.setattr(cllm.Model, "forward_backward", flaky)
    out = tmp_path / mode
    t = Trainer(tiny(data_dir, out, max_steps=6, on_nonfinite=mode))
    with pytest.warns(RuntimeWarning, match="step 3: non-finite"):
        s = t.fit()
    assert s["nonfinite_steps"] == 1
    events = [r for r in read_metrics(out / "metrics.jsonl") if r.get("event") == "nonfinite"]
    assert [r["step"] for r in events] == [3] and events[0]["train_loss"] is None
    assert np.isfinite(t.model.flat_parameters()).all()
    if mode == "skip":
        assert s["steps"] == 6 and t.optimizer.step_count == 5 and s["stop_reason"] == "max_steps"
    else:
        assert s["steps"] == 3 and t.optimizer.step_count == 2 and s["stop_reason"] == "nonfinite"
    ck = load_checkpoint(out / "last.safetensors")  # finite, loadable
    assert ck.trainer_state["nonfinite_steps"] == 1


def test_max_time_stops_and_checkpoints(data_dir, tmp_path):
    s = Trainer(tiny(data_dir, tmp_path / "t", max_steps=10_000, max_time=0.3)).fit()
    assert s["stop_reason"] == "max_time" and 0 < s["steps"] < 10_000
    assert load_checkpoint(tmp_path / "t" / "last.safetensors").trainer_state["step"] == s["steps"]


def test_prepares_text_inputs_once_and_reuses(tmp_path):
    src = corpus_files(tmp_path)
    out = tmp_path / "run"
    cfg = TrainConfig(**{**TINY, "data": str(src), "out_dir": str(out), "max_steps": 1, "val_fraction": 0.3})
    Trainer(cfg).fit()
    stamp = out / "data" / "prepare.json"
    assert (out / "data" / "train.bin").is_file() and stamp.is_file()
    mtime = (out / "data" / "train.bin").stat().st_mtime_ns
    cfg = cfg.replace(overwrite=True)  # the same directory again: a fresh run on purpose
    Trainer(cfg).fit()
    assert (out / "data" / "train.bin").stat().st_mtime_ns == mtime  # reused
    Trainer(cfg.replace(val_fraction=0.25)).fit()
    assert json.loads(stamp.read_text())["spec"]["val_fraction"] == 0.25  # different request: prepared again


@pytest.mark.slow
def test_an_edited_input_is_prepared_again_saying_which(tmp_path, capsys):
    """The prepared data tracks its sources: an edit that keeps the size and the mtime, a grown file, a new and
    a removed file each prepare again, naming the file; an untouched corpus is reused."""
    src = corpus_files(tmp_path)
    cfg = TrainConfig(**{**TINY, "data": str(src), "out_dir": str(tmp_path / "run"), "max_steps": 1,
                         "val_fraction": 0.3, "overwrite": True})
    train_bin = tmp_path / "run" / "data" / "train.bin"

    def run():
        capsys.readouterr()
        Trainer(cfg).fit()
        return capsys.readouterr().out

    run()
    assert "using prepared data" in run()
    f = src / "typing.py"
    st = f.stat()
    text = f.read_text()
    f.write_text(text.replace("def ", "fed ", 1))  # same size
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # same mtime
    before = load_tokens(train_bin).tokens.copy()
    out = run()
    assert f"preparing data in {tmp_path / 'run' / 'data'} ({f} changed (content))" in out
    assert not np.array_equal(load_tokens(train_bin).tokens, before)
    f.write_text(text + "# more\n")
    assert f"({f} changed (size))" in run()
    (src / "new.py").write_text("x = 1\n" * 100)
    assert f"({src / 'new.py'} was added)" in run()
    (src / "json.py").unlink()
    assert f"({src / 'json.py'} was removed)" in run()
    assert "using prepared data" in run()


@pytest.mark.slow
def test_resume_on_changed_data_is_refused(data_dir, tmp_path):
    """A same-size edit of the corpus gives as many tokens, which the loader's check let through: the resume
    trained on other data. The checkpoints record the token files' counts and checksums, and a resume compares
    them: refused, then resumed once the corpus is restored. The same for prepared data given with --data."""
    src = corpus_files(tmp_path)
    cfg = TrainConfig(**{**TINY, "data": str(src), "out_dir": str(tmp_path / "run"), "max_steps": 2,
                         "decay_steps": 4, "val_fraction": 0.3})
    Trainer(cfg).fit()
    f = src / "typing.py"
    st, text = f.stat(), f.read_text()
    f.write_text(text.replace("def ", "fed ", 1))  # same size, same mtime
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(ValueError, match=r"last.safetensors: cannot resume, the data changed since this checkpoint "
                                         r"\((train|val).bin in .*data holds other tokens\)"):
        Trainer(cfg.replace(max_steps=4, resume=True)).fit()
    f.write_text(text)
    assert Trainer(cfg.replace(max_steps=4, resume=True)).fit()["steps"] == 4
    mine = tmp_path / "mine"
    shutil.copytree(data_dir, mine)
    Trainer(tiny(mine, tmp_path / "r2", max_steps=2, decay_steps=4)).fit()
    tokens = load_tokens(mine / "val.bin").tokens.copy()
    write_tokens(mine / "val.bin", tokens[::-1], 256)
    with pytest.raises(ValueError, match=r"\(val.bin in .*mine holds other tokens\)"):
        Trainer(tiny(mine, tmp_path / "r2", max_steps=4, decay_steps=4, resume=True)).fit()


class CountingComm(cllm.SingleProcess):
    """A one-rank stand-in for a data-parallel communicator that records the collectives it is asked for."""

    def __init__(self):
        self.calls = []

    def allreduce_mean_(self, buf):
        assert buf.dtype == np.float32 and buf.ndim == 1 and buf.size >= 17_000
        self.calls.append("grads")

    def allreduce_mean(self, value):
        self.calls.append("scalar")
        return value

    def barrier(self):
        self.calls.append("barrier")


def test_communicator_hook(data_dir, tmp_path):
    comm = CountingComm()
    Trainer(tiny(data_dir, tmp_path / "c", max_steps=4, eval_interval=2), comm=comm).fit()
    assert comm.calls.count("grads") == 4
    assert comm.calls.count("scalar") == 4 + 2 + 1  # a loss per step, a val loss per evaluation, the val bytes/token
    assert "barrier" in comm.calls


@pytest.mark.filterwarnings("error:resuming with changed settings")
def test_resume_keeps_the_global_batch_not_its_split(data_dir, tmp_path):
    out = tmp_path / "r"
    Trainer(tiny(data_dir, out, max_steps=4, batch_size=4, decay_steps=10)).fit()
    # 4 rows as 2 x 2 micro-batches, then as 2 ranks x 1 x 2: the same global batch, no warning
    Trainer(tiny(data_dir, out, max_steps=5, batch_size=2, grad_accum=2, decay_steps=10, resume=True)).fit()

    class FirstOfTwoRanks(cllm.SingleProcess):  # rank 0 of 2 (the collectives are one-process stand-ins)
        rank, world_size = 0, 2

    Trainer(tiny(data_dir, out, max_steps=6, batch_size=1, grad_accum=2, decay_steps=10,
                 resume=True), comm=FirstOfTwoRanks()).fit()
    with pytest.raises(ValueError, match=r"last.safetensors: cannot resume: .*global batch"):
        Trainer(tiny(data_dir, out, max_steps=7, batch_size=8, decay_steps=10, resume=True)).fit()


def test_ranks_draw_their_own_dropout_masks(data_dir, tmp_path):
    cfg = cllm.ModelConfig(vocab_size=32, max_seq_len=8, embedding_dim=16, num_layers=1, num_heads=2, ff_dim=32,
                           dropout=0.3)
    m = cllm.Model(cfg, seed=0)
    base = m.dropout_masks(2, 8)
    m.dropout_stream = 1
    other = m.dropout_masks(2, 8)
    assert all(not np.array_equal(base[k], other[k]) for k in base)  # every site: other masks
    m.dropout_stream = 0
    assert all(np.array_equal(base[k], v) for k, v in m.dropout_masks(2, 8).items())  # stream 0 unchanged

    class SecondRank(cllm.SingleProcess):  # rank 1 of 2 (the collectives are one-process stand-ins)
        rank, world_size = 1, 2

    t = Trainer(tiny(data_dir, tmp_path / "r1", max_steps=1, dropout=0.1), comm=SecondRank())
    t.fit()
    assert t.model.dropout_stream == 1


def test_nonfinite_validation_loss_is_never_best(data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(Trainer, "evaluate", lambda self: float("nan"))
    out = tmp_path / "nanval"
    s = Trainer(tiny(data_dir, out, max_steps=8, patience=2)).fit()
    assert s["stop_reason"] == "early_stop" and s["steps"] == 8
    assert s["best_val_loss"] is None and not (out / "best.safetensors").exists()
    assert (out / "last.safetensors").is_file()


# ----------------------------------------------------------------------------------------------------
# resuming from damaged or edited files
# ----------------------------------------------------------------------------------------------------
def test_resume_drops_damaged_metrics_lines_with_a_warning(data_dir, tmp_path):
    """A metrics.jsonl line cut short by a crash, binary garbage, a record without an integer step: dropped with
    a warning naming the file and the lines; the resumed log is clean and complete."""
    out = tmp_path / "m"
    Trainer(tiny(data_dir, out, max_steps=5, decay_steps=8)).fit()
    with open(out / "metrics.jsonl", "ab") as f:
        f.write(b'\xff\xfe garbage\n{"step": "3"}\n[1, 2]\n{"step": 9, "train_loss": 1')
    with pytest.warns(RuntimeWarning, match=r"metrics.jsonl: dropped damaged lines \d+, \d+, \d+, \d+$"):
        Trainer(tiny(data_dir, out, max_steps=8, decay_steps=8, resume=True)).fit()
    assert [s for s, _ in train_losses(out)] == list(range(1, 9))


def _with_trainer_state(path: Path, **changes) -> None:
    """Rewrite a checkpoint with trainer_state fields changed (and its checksums made to match: an edit, not
    damage)."""
    import struct

    from cllm.train import checkpoint as ck

    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    meta = header["__metadata__"]
    meta["trainer_state"] = json.dumps({**json.loads(meta["trainer_state"]), **changes})
    meta["metadata_crc32"] = str(ck._metadata_crc32(meta))
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


@pytest.mark.parametrize("field,value", [("step", "3"), ("step", -1), ("step", [3]), ("step", 2.5),
                                         ("best_val_loss", "low"), ("elapsed", -5), ("evals_since_best", None),
                                         ("loader", [1]), ("dropout_step", True)])
def test_resume_with_wrongly_typed_trainer_state_is_one_line(data_dir, tmp_path, capsys, field, value):
    from cllm import cli

    out = tmp_path / "t"
    Trainer(tiny(data_dir, out, max_steps=2)).fit()
    _with_trainer_state(out / "last.safetensors", **{field: value})
    capsys.readouterr()
    assert cli.main(["train", "--resume", "--out-dir", str(out), "--max-steps", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{out / 'last.safetensors'}: cannot resume" in err[0] and repr(field) in err[0], err


# ------------------------------------------------------------------------------------------------------
# training extras: EMA, SGD, label smoothing, samples during training
# ------------------------------------------------------------------------------------------------------
def test_ema_is_the_average_used_for_evaluation_and_sampling(data_dir, tmp_path):
    out = tmp_path / "ema"
    t = Trainer(tiny(data_dir, out, max_steps=8, ema_decay=0.8, eval_interval=100))
    t._setup()
    ema = t.model.flat_parameters().copy()
    for _ in range(3):  # the average restated: ema += (1 - d) (weights - ema) after each update
        t._optimizer_step(cllm.train.run_files.Session(start_step=t.step))
        w = t.model.flat_parameters()
        ema = ema + np.float32(0.2) * (w - ema)
        assert np.array_equal(t.ema.shadow, ema)
    trained = t.model.flat_parameters().copy()
    with t.ema.applied() as m:
        ema_loss = float(np.mean([m.loss(x, y) for x, y in t.val_batches]))
    assert t.evaluate() == ema_loss and np.array_equal(t.model.flat_parameters(), trained)  # restored exactly
    cllm.train.resume.save_run(t, out / "last.safetensors", 0.0)
    t._lock.release()
    ck = load_checkpoint(out / "last.safetensors")
    assert ck.ema_decay == 0.8 and np.array_equal(ck.model.flat_parameters(), trained)
    model, _ = cllm.interop.pretrained.load_pretrained(out / "last.safetensors")  # sampling and cllm eval: the EMA
    assert all(np.array_equal(model.parameters()[n], t.ema.parameters()[n]) for n in ck.ema)


def test_ema_added_on_resume_starts_from_the_weights_with_a_warning(data_dir, tmp_path):
    out = tmp_path / "ema-late"
    Trainer(tiny(data_dir, out, max_steps=3)).fit()  # no EMA so far
    t = Trainer(tiny(data_dir, out, max_steps=5, resume=True, ema_decay=0.5))
    with pytest.warns(RuntimeWarning, match="holds no EMA weights: the average starts from the current weights"):
        t._setup()
    t._lock.release()
    assert t.step == 3 and np.array_equal(t.ema.shadow, t.model.flat_parameters())
    assert t.ema.restore(t.ema.parameters()) is True  # a checkpoint's EMA weights load as they are


def test_sgd_label_smoothing_and_samples_during_training(data_dir, tmp_path, capsys):
    out = tmp_path / "sgd"
    s = Trainer(tiny(data_dir, out, max_steps=6, optimizer="sgd", lr=0.1, min_lr=0.01, momentum=0.8,
                     label_smoothing=0.2, sample_every=3, sample_tokens=5)).fit()
    assert s["steps"] == 6
    printed = capsys.readouterr().out
    assert "--- sample at step 3 ---" in printed and "--- sample at step 6 ---" in printed
    ck = load_checkpoint(out / "last.safetensors")
    assert ck.optimizer_state["type"] == "SGD" and ck.optimizer_state["momentum"] == pytest.approx(0.8)
    assert set(ck.optimizer_state["momentum_buffer"]) == set(ck.model.parameters())
    with pytest.raises(ValueError, match="holds SGD state, not AdamW's"):
        Trainer(tiny(data_dir, out, max_steps=8, resume=True)).fit()
