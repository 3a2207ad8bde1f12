"""How a run starts and what its checkpoints carry: the pretrained start (`init_from`), the model config it
implies, the trainer's state written beside the weights (`trainer_state`, `save_run`) and read back by `--resume`
(`resume_run`: the run continues exactly, bit for bit)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Optional

import numpy as np

from ..core.config import ModelConfig
from ..data.tokenizer import tokenizer_from_json
from ..errors import MissingFileError
from ..interop.pretrained import load_pretrained
from .checkpoint import TrainerStateReader, load_checkpoint, read_metadata, restore_optimizer, save_checkpoint
from .run_files import truncate_metrics

if TYPE_CHECKING:
    from .trainer import Trainer


def pretrained_start(trainer: "Trainer") -> tuple:
    """(model, tokenizer) of init_from; when resuming, only (its config, tokenizer) as the run's last
    checkpoint holds them (the weights come from the checkpoint; init_from need not exist any more)."""
    if not trainer.config.resume:
        return load_pretrained(trainer.config.init_from)
    meta = read_metadata(trainer.last_path)  # the header only: resume_run reads the tensors
    try:
        return ModelConfig.from_dict(meta.get("config")), tokenizer_from_json(meta.get("tokenizer", ""))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{trainer.last_path}: cannot resume: {e}") from None


def model_config_for(trainer: "Trainer", pretrained: Optional[ModelConfig]) -> ModelConfig:
    """The model's shape: from the settings, or from the pretrained model (with this run's dropout)."""
    c = trainer.config
    if pretrained is None:
        return c.model_config(trainer.tokenizer.vocab_size)
    if c.max_seq_len > pretrained.max_seq_len:
        raise ValueError(f"max_seq_len {c.max_seq_len} exceeds the context of {c.init_from} "
                         f"({pretrained.max_seq_len} positions)")
    if trainer.tokenizer.vocab_size > pretrained.vocab_size:
        raise ValueError(f"the data's tokenizer has {trainer.tokenizer.vocab_size} tokens, more than the "
                         f"vocab_size {pretrained.vocab_size} of {c.init_from}")
    return pretrained.replace(dropout=c.dropout)


def resume_run(trainer: "Trainer") -> None:
    c = trainer.config
    if not trainer.last_path.is_file():
        raise MissingFileError(2, "cannot resume: no checkpoint", str(trainer.last_path))
    ckpt = load_checkpoint(trainer.last_path)
    if ckpt.config != trainer.model_config:
        diff = [f"{k} {v} (now {getattr(trainer.model_config, k)})" for k, v in ckpt.config.to_dict().items()
                if getattr(trainer.model_config, k) != v]
        raise ValueError(f"{trainer.last_path}: cannot resume, the checkpoint's model differs: {', '.join(diff)}")
    if ckpt.tokenizer != trainer.tokenizer:
        raise ValueError(f"{trainer.last_path}: cannot resume, the checkpoint's tokenizer differs from the data's")
    st = ckpt.trainer_state
    was = st.get("data")  # absent in checkpoints of older CLLMs
    if was is not None and was != trainer.data_fingerprint:
        changed = [n for n, f in trainer.data_fingerprint.items() if not isinstance(was, dict) or was.get(n) != f]
        changed = changed or list(trainer.data_fingerprint)
        verb = "hold" if len(changed) > 1 else "holds"
        raise ValueError(f"{trainer.last_path}: cannot resume, the data changed since this checkpoint "
                         f"({' and '.join(changed)} in {trainer.data_dir} {verb} other tokens); resuming exactly "
                         f"needs the data the run trained on (restore it, or start over with --overwrite)")
    field = TrainerStateReader(trainer.last_path, st)
    try:
        trainer.model.load_parameters(ckpt.model.parameters())
        trainer.model.dropout_step = field("dropout_step", "count")
        restore_optimizer(trainer.optimizer, ckpt.optimizer_state)
        if not isinstance(st.get("loader"), dict):
            raise ValueError(f"trainer_state field 'loader' must be a JSON object, got {st.get('loader')!r}")
        if trainer.ema is not None and not trainer.ema.restore(ckpt.ema):
            trainer._warn(f"{trainer.last_path} holds no EMA weights: the average starts from the current weights")
        try:
            trainer.loader.load_state_dict(st["loader"])
        except (ValueError, TypeError, KeyError) as e:
            raise ValueError(f"trainer_state field 'loader' is not a state of this run's loader: {e}") from None
        trainer.step = field("step", "count")
        trainer.best_val_loss = field("best_val_loss", "loss")
        trainer.best_step = field("best_step", "count", none=True)
        trainer.evals_since_best = field("evals_since_best", "count")
        trainer.last_val_loss = field("last_val_loss", "loss", default=None)
        trainer.nonfinite_steps = field("nonfinite_steps", "count", default=0)
        trainer.elapsed_before = field("elapsed", "seconds", default=0.0)
    except (ValueError, TypeError, KeyError) as e:
        if str(e).startswith(str(trainer.last_path)):
            raise
        raise ValueError(f"{trainer.last_path}: cannot resume: {e}") from None
    changed = c.changes_breaking_resume(st.get("train_config", {}))
    if changed:
        trainer._warn(f"resuming with changed settings: {', '.join(changed)}; the run will not match an "
                   "uninterrupted one")
    if trainer.main:
        truncate_metrics(trainer.metrics_path, trainer.step)
    trainer.console.say(f"resumed from {trainer.last_path} at step {trainer.step}")


def trainer_state(trainer: "Trainer", elapsed: float) -> Dict[str, Any]:
    return {
        "step": trainer.step, "optimizer_step": trainer.optimizer.step_count,
        "train_config": trainer.config.to_dict(), "loader": trainer.loader.state_dict(),
        "data": trainer.data_fingerprint,
        "dropout_step": trainer.model.dropout_step, "best_val_loss": trainer.best_val_loss,
        "best_step": trainer.best_step, "evals_since_best": trainer.evals_since_best,
        "last_val_loss": trainer.last_val_loss, "nonfinite_steps": trainer.nonfinite_steps,
        "elapsed": elapsed, "world_size": trainer.comm.world_size,
        "lr": trainer.lr_at(trainer.step),
    }


def save_run(trainer: "Trainer", path: Path, elapsed: float) -> bool:
    """Write a checkpoint (rank 0); never one with non-finite weights or optimizer moments (warns and
    returns False)."""
    optimizer = trainer.optimizer
    if trainer.shards:  # one file all the same: rank 0 gathers the moments' shards (collective)
        whole = [trainer.comm.gather_shards(m, trainer.shards) for m in (optimizer.exp_avg, optimizer.exp_avg_sq)]
        optimizer = optimizer.with_moments(*whole) if trainer.main else None
    if not trainer.main:
        return True
    state = optimizer.state()
    buffers = [("weights", trainer.model.flat_parameters())]
    buffers += [("optimizer moments", v) for slot, views in state.items() if slot != "step" for v in views.values()]
    buffers += [("EMA weights", trainer.ema.shadow)] if trainer.ema is not None else []
    for what, buf in buffers:
        if not _all_finite(buf):
            trainer._warn(f"step {trainer.step}: {what} are not finite, not writing {path.name}")
            return False
    save_checkpoint(path, trainer.model, optimizer, trainer.tokenizer, trainer_state(trainer, elapsed), ema=trainer.ema)
    return True


def _all_finite(buf: np.ndarray, chunk: int = 1 << 20) -> bool:
    """Whether a flat buffer holds no NaN/Inf, checked in chunks (no temporary the size of the buffer)."""
    return all(np.isfinite(buf[i:i + chunk]).all() for i in range(0, buf.size, chunk))
