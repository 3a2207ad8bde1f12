"""best.safetensors: the final evaluation of a run (stopped by max_time, or at max_steps between evaluations) is
an evaluation like the others: a better model becomes the best, best.safetensors and the last checkpoint say so,
and the final sample comes from it (issue 32)."""
from pathlib import Path

import pytest

from cllm.data import prepare
from cllm.train.checkpoint import read_metadata
from cllm.train.config import TrainConfig
from cllm.train.run_files import read_metrics
from cllm.train.trainer import Trainer

TINY = dict(max_seq_len=16, embedding_dim=32, num_layers=1, num_heads=4, ff_dim=64, batch_size=4, max_time=None,
            warmup_steps=2, eval_interval=4, eval_batches=2, progress=False, sample_tokens=4, log_interval=1,
            checkpoint_interval=5, threads=1, lr=3e-3)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    import argparse

    root = tmp_path_factory.mktemp("best")
    (root / "a.py").write_text(Path(argparse.__file__).read_text(encoding="utf-8")[:30000])
    prepare([root / "a.py"], root / "data", "byte", val_fraction=0.3)
    return root / "data"


@pytest.mark.slow
def test_a_max_time_stop_whose_final_evaluation_is_best_updates_best(data_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real = Trainer._stop_requested

    def max_time_at_step_7(self, s):  # max_time, deterministically: after step 7 (evaluations at 4 only)
        if self.step == 7:
            s.stop_reason = "max_time"
            return True
        return real(self, s)

    monkeypatch.setattr(Trainer, "_stop_requested", max_time_at_step_7)
    s = Trainer(TrainConfig(**TINY, data=str(data_dir), out_dir=str(out), max_steps=100)).fit()
    vals = {r["step"]: r["val_loss"] for r in read_metrics(out / "metrics.jsonl") if r.get("val_loss") is not None}
    assert s["stop_reason"] == "max_time" and sorted(vals) == [4, 7] and vals[7] < vals[4]
    assert s["best_step"] == 7 and s["best_val_loss"] == vals[7] == s["val_loss"]
    assert read_metadata(out / "best.safetensors")["trainer_state"]["step"] == 7
    last = read_metadata(out / "last.safetensors")["trainer_state"]
    assert last["best_step"] == 7 and last["best_val_loss"] == vals[7] and last["evals_since_best"] == 0
    printed = capsys.readouterr().out
    assert f"best {vals[7]:.4f} at step 7" in printed and "(step 7) ---" in printed  # the sample: the new best


def test_a_final_evaluation_that_is_no_better_keeps_best_and_patience(data_dir, tmp_path):
    """Not better: best stays, and patience counts the regular evaluations alone."""
    out = tmp_path / "flat"
    cfg = TrainConfig(**{**TINY, "lr": 0.0, "min_lr": 0.0}, data=str(data_dir), out_dir=str(out), max_steps=6)
    s = Trainer(cfg).fit()
    assert s["best_step"] == 4
    last = read_metadata(out / "last.safetensors")["trainer_state"]
    assert last["best_step"] == 4 and last["evals_since_best"] == 0
