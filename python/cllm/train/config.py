"""The settings of a training run: the TrainConfig schema (every field with its default, help text and kind),
the checks of their types and ranges, and reading them from a TOML or JSON file.

    TrainConfig(max_steps=1000, lr=1e-3)                  # unknown names and bad values: ValueError / TypeError
    TrainConfig.from_file("run.toml", out_dir="runs/x")   # keyword arguments override the file

A field's metadata ("help", "kind", "choices") is what the command line builds its flags from (cli.py): one
source for the setting, its default, its help and its check.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from ..core.config import ARCHITECTURES, POS_ENCODINGS, ModelConfig
from ..parallel.reducer import GRAD_DTYPES
from ..errors import MissingFileError
from ..core.model import PRECISIONS
from ..core.system import MAX_THREADS
from .schedule import SCHEDULES, check_schedule


OPTIMIZERS = ("adamw", "sgd")


def _f(default, help: str, kind: str, choices=None):
    return dataclasses.field(default=default, metadata={"help": help, "kind": kind, "choices": choices})


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run, with defaults that train a small byte-level model on the Python
    standard library in under three minutes on two cores. Read one from TOML/JSON with `from_file`."""

    # data
    data: Optional[Tuple[str, ...]] = _f(None, "a prepared data dir (train.bin, val.bin, tokenizer.json) or text "
                                               "files/dirs to prepare; none: the Python stdlib .py files", "paths")
    out_dir: str = _f("runs/cllm", "run directory: checkpoints, metrics.jsonl, loss.png, prepared data", "str")
    tokenizer: str = _f("byte", "tokenizer used when preparing data", "choice", ("byte", "bpe"))
    bpe_vocab_size: int = _f(1024, "vocabulary size of a BPE tokenizer", "int")
    val_fraction: float = _f(0.05, "fraction of the corpus held out for validation when preparing", "float")
    max_data_bytes: Optional[int] = _f(None, "use only this many bytes of the corpus when preparing", "opt_int")
    # model
    init_from: Optional[str] = _f(None, "start from a pretrained model and its tokenizer: a CLLM checkpoint or run "
                                        "dir, or a Hugging Face GPT-2 dir; its shape replaces the model settings "
                                        "(max_seq_len may be shorter) and the data is encoded with its tokenizer",
                                  "opt_path")
    architecture: str = _f("gpt2", "the blocks: gpt2 (LayerNorm, GELU, biases) or llama (RMSNorm, rotary "
                                   "positions, SwiGLU, grouped-query attention, no biases)", "choice", ARCHITECTURES)
    max_seq_len: int = _f(128, "context length T (tokens per training sequence)", "int")
    embedding_dim: int = _f(128, "embedding dimension C", "int")
    num_layers: int = _f(4, "transformer blocks L", "int")
    num_heads: int = _f(4, "attention heads H", "int")
    num_kv_heads: Optional[int] = _f(None, "llama: K/V heads of the grouped-query attention, dividing num_heads "
                                           "(none: num_heads)", "opt_int")
    ff_dim: Optional[int] = _f(None, "feed-forward hidden size (none: 4 * embedding_dim for gpt2; for llama's SwiGLU "
                                     "8/3 * embedding_dim rounded up to a multiple of 32)", "opt_int")
    tie_embeddings: bool = _f(True, "llama: the LM head is the token embedding (--no-tie-embeddings: a separate "
                                    "lm_head; gpt2's is always tied)", "bool")
    dropout: float = _f(0.0, "dropout probability", "float")
    pos_encoding: str = _f("auto", "positional encoding (auto: learned for gpt2, rope for llama)", "choice",
                           ("auto",) + POS_ENCODINGS)
    precision: str = _f("fp32", "matmul precision: fp32, or bf16 (bfloat16 inputs, fp32 accumulation, fp32 "
                                "weights and optimizer)", "choice", PRECISIONS)
    # optimisation
    batch_size: int = _f(16, "sequences per micro-batch (per rank)", "int")
    grad_accum: int = _f(1, "micro-batches per optimizer step", "int")
    max_steps: int = _f(1500, "stop after this many optimizer steps", "int")
    max_time: Optional[float] = _f(165.0, "stop after this many seconds of this session (none: no limit)",
                                   "opt_float")
    lr: float = _f(3e-3, "peak learning rate", "float")
    min_lr: float = _f(3e-4, "learning rate at the end of the decay", "float")
    warmup_steps: int = _f(50, "linear warmup steps (capped at the schedule horizon)", "int")
    schedule: str = _f("cosine", "decay after warmup", "choice", SCHEDULES)
    decay_steps: Optional[int] = _f(None, "step at which the lr reaches min_lr (none: max_steps)", "opt_int")
    optimizer: str = _f("adamw", "optimizer: adamw, or sgd (with momentum)", "choice", OPTIMIZERS)
    weight_decay: float = _f(0.1, "weight decay of the 2-D weights (AdamW: decoupled; SGD: L2)", "float")
    betas: Tuple[float, float] = _f((0.9, 0.95), "AdamW betas", "betas")
    eps: float = _f(1e-8, "AdamW epsilon", "float")
    momentum: float = _f(0.9, "SGD momentum (0: plain SGD)", "float")
    label_smoothing: float = _f(0.0, "label smoothing of the training loss, PyTorch's: targets (1 - x) onehot + "
                                     "x / vocab_size (the validation loss is not smoothed)", "float")
    ema_decay: Optional[float] = _f(None, "keep an exponential moving average of the weights with this decay in "
                                          "(0, 1), saved in the checkpoints and used for evaluation and samples "
                                          "(none: off)", "opt_float")
    bucket_mb: float = _f(1.0, "MPI: gradients are averaged across ranks in buckets of this many MiB (0: one "
                               "bucket)", "float")
    overlap: bool = _f(True, "MPI: send each bucket while the backward still computes the earlier layers "
                             "(bit for bit the same result as --no-overlap)", "bool")
    grad_dtype: str = _f("fp32", "MPI: gradients travel as fp32, or bf16 (half the bytes, sums accumulated in "
                                 "fp32)", "choice", GRAD_DTYPES)
    zero: bool = _f(False, "MPI: ZeRO stage 1, the AdamW moments sharded across ranks (optimizer memory / ranks; "
                           "gradients reduce-scattered, parameters all-gathered)", "bool")
    grad_clip: Optional[float] = _f(1.0, "clip the global gradient norm to this (none or 0: off)", "opt_float")
    on_nonfinite: str = _f("skip", "on a NaN/Inf loss or gradient: skip the step, or stop the run", "choice",
                           ("skip", "stop"))
    # evaluation and early stopping
    eval_interval: int = _f(100, "evaluate on the validation set every this many steps", "int")
    eval_batches: int = _f(16, "validation batches averaged per evaluation (at most what draws each window of "
                              "val.bin once on average, or 16)", "int")
    patience: Optional[int] = _f(None, "stop after this many evaluations without improvement (none: off)",
                                 "opt_int")
    min_delta: float = _f(0.0, "an evaluation improves if it beats the best by more than this", "float")
    # checkpoints, logs, misc
    checkpoint_interval: int = _f(500, "write last.safetensors every this many steps (and at the end)", "int")
    resume: bool = _f(False, "continue exactly from out_dir/last.safetensors", "bool")
    overwrite: bool = _f(False, "start afresh in an out_dir holding another run's checkpoints and metrics, deleting "
                                "them (without it, that is an error)", "bool")
    log_interval: int = _f(10, "append to metrics.jsonl every this many steps", "int")
    progress: bool = _f(True, "show a progress bar (otherwise print log lines)", "bool")
    seed: int = _f(0, "seed of the model init, dropout and batch sampling", "int")
    threads: Optional[int] = _f(None, "CPU threads of the kernels (none: OpenMP default)", "opt_int")
    sample_tokens: int = _f(300, "tokens of the sample printed at the end (0: none)", "int")
    prompt: str = _f("def ", "prompt of the final sample", "str")
    sample_temperature: float = _f(0.8, "temperature of the samples (0: greedy)", "float")
    sample_every: Optional[int] = _f(None, "also print a sample of sample_tokens tokens every this many steps "
                                           "(none: only at the end)", "opt_int")

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = _coerce(f.name, getattr(self, f.name), f.metadata["kind"], f.metadata["choices"])
            object.__setattr__(self, f.name, value)
        _check_ranges(self)

    # -- conversions --------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        d["data"] = None if self.data is None else list(self.data)
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "TrainConfig":
        if not isinstance(d, dict):
            raise ValueError(f"{source}: expected a table of settings, got {type(d).__name__}")
        d = _field_names(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{source}: unknown setting{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}")
        return cls(**d)

    @classmethod
    def from_file(cls, path, **overrides) -> "TrainConfig":
        """Read settings from a .toml or .json file (flat keys named like the fields); `overrides` win.
        Errors: MissingFileError, or ValueError/TypeError naming the file."""
        settings = {**read_config_file(path), **overrides}
        try:
            return cls.from_dict(settings, source=str(path))
        except (TypeError, ValueError) as e:
            if str(e).startswith(str(path)):
                raise
            raise (ValueError if isinstance(e, ValueError) else TypeError)(f"{path}: {e}") from None

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def model_config(self, vocab_size: int) -> ModelConfig:
        llama = self.architecture == "llama"
        C = self.embedding_dim
        ff_default = -(-8 * C // (3 * 32)) * 32 if llama else 4 * C  # llama: 8C/3 up to a multiple of 32
        return ModelConfig(vocab_size=int(vocab_size), max_seq_len=self.max_seq_len, embedding_dim=C,
                           num_layers=self.num_layers, num_heads=self.num_heads, ff_dim=self.ff_dim or ff_default,
                           dropout=self.dropout, architecture=self.architecture, num_kv_heads=self.num_kv_heads,
                           tie_embeddings=self.tie_embeddings,
                           pos_encoding=None if self.pos_encoding == "auto" else self.pos_encoding)

    @property
    def schedule_horizon(self) -> int:
        return self.decay_steps if self.decay_steps is not None else self.max_steps

    def changes_breaking_resume(self, old: dict) -> List[str]:
        """The settings in which this config differs from `old` (the to_dict() of the run's config) such that a
        resumed run will not match an uninterrupted one. (batch_size, grad_accum and the number of ranks may
        change if their product, the global batch, does not: the loader refuses anything else; the same rows
        then give the same step up to round-off.)"""
        changed = [k for k in ("lr", "min_lr", "warmup_steps", "schedule", "decay_steps", "weight_decay",
                               "grad_clip", "seed", "label_smoothing", "momentum", "ema_decay", "grad_dtype")
                   if k in old and old[k] != getattr(self, k)]
        if old.get("decay_steps") is None and self.decay_steps is None and old.get("max_steps") != self.max_steps:
            changed.append("max_steps (the schedule's horizon; set decay_steps to keep it)")
        return changed


def read_config_file(path) -> dict:
    """The settings table of a TOML (.toml) or JSON (.json) file, keys spelled like the fields ("max-steps" is
    max_steps); MissingFileError, or ValueError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(2, "config file not found", str(path))
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            d = json.loads(path.read_text(encoding="utf-8"))
        elif suffix == ".toml":
            try:
                import tomllib
            except ImportError:  # Python < 3.11
                import tomli as tomllib
            d = tomllib.loads(path.read_text(encoding="utf-8"))
        else:
            raise ValueError(f"{path}: unknown config file type {suffix!r} (use .toml or .json)")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: config file is not UTF-8 text") from None
    except RecursionError:
        raise ValueError(f"{path}: cannot parse config: nested too deeply") from None
    except ValueError as e:  # json.JSONDecodeError and tomllib.TOMLDecodeError are ValueErrors
        if str(e).startswith(str(path)):
            raise
        raise ValueError(f"{path}: cannot parse config: {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: config must be a table/object of settings, got {type(d).__name__}")
    return _field_names(d)


def _field_names(settings: dict) -> dict:
    """The settings with their keys spelled like TrainConfig's fields ("max-steps" -> "max_steps")."""
    return {str(k).replace("-", "_"): v for k, v in settings.items()}


def _coerce(name: str, value, kind: str, choices):
    """Check a setting's type, converting the harmless cases (int -> float, list -> tuple)."""
    def bad(expected):
        return ValueError(f"{name} must be {expected}, got {value!r}")

    if kind in ("opt_int", "opt_float", "opt_path") and value is None:
        return None
    if kind in ("int", "opt_int"):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise bad("an int" + (" or none" if kind == "opt_int" else ""))
        return int(value)
    if kind in ("float", "opt_float"):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise bad("a number" + (" or none" if kind == "opt_float" else ""))
        value = float(value)
        if not math.isfinite(value):
            raise bad("a finite number")
        return value
    if kind == "bool":
        if not isinstance(value, (bool, np.bool_)):
            raise bad("true or false")
        return bool(value)
    if kind in ("str", "choice"):
        if not isinstance(value, str):
            raise bad("a string")
        if choices is not None and value not in choices:
            raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
        return value
    if kind == "opt_path":
        if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
            raise bad("a path or none")
        return os.fspath(value)
    if kind == "paths":
        if value is None:
            return None
        if isinstance(value, (str, os.PathLike)):
            value = [value]
        if not isinstance(value, (list, tuple)) or not value or \
                not all(isinstance(v, (str, os.PathLike)) for v in value):
            raise bad("a path, a list of paths, or none")
        return tuple(os.fspath(v) for v in value)
    if kind == "betas":
        if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
            raise bad("two numbers")
        return tuple(_coerce(name, v, "float", None) for v in value)
    raise AssertionError(kind)


def _check_ranges(c: TrainConfig) -> None:
    def need(ok, msg):
        if not ok:
            raise ValueError(msg)

    need(c.out_dir.strip() != "", "out_dir is empty (an unset variable?): name the run directory")
    need(not (c.resume and c.overwrite), "resume and overwrite exclude each other")
    for name in ("bpe_vocab_size", "batch_size", "grad_accum", "max_steps", "eval_interval", "eval_batches",
                 "checkpoint_interval", "log_interval"):
        need(getattr(c, name) > 0, f"{name} must be positive, got {getattr(c, name)}")
    for name in ("ff_dim", "num_kv_heads", "threads", "patience", "max_data_bytes", "sample_every"):
        v = getattr(c, name)
        need(v is None or v > 0, f"{name} must be positive or none, got {v}")
    need(c.threads is None or c.threads <= MAX_THREADS, f"threads must be at most {MAX_THREADS}, got {c.threads}")
    need(c.bpe_vocab_size >= 257, f"bpe_vocab_size must be at least 257, got {c.bpe_vocab_size}")
    need(0.0 < c.val_fraction <= 0.5, f"val_fraction must be in (0, 0.5], got {c.val_fraction}")
    need(c.max_time is None or c.max_time >= 0, f"max_time must be non-negative or none, got {c.max_time}")
    need(c.grad_clip is None or c.grad_clip >= 0, f"grad_clip must be non-negative or none, got {c.grad_clip}")
    need(c.decay_steps is None or c.decay_steps > 0, f"decay_steps must be positive or none, got {c.decay_steps}")
    need(c.warmup_steps >= 0, f"warmup_steps must be non-negative, got {c.warmup_steps}")
    check_schedule(lr=c.lr, min_lr=c.min_lr, warmup_steps=min(c.warmup_steps, c.schedule_horizon),
                   max_steps=c.schedule_horizon, kind=c.schedule)
    need(all(0.0 <= b < 1.0 for b in c.betas), f"betas must be in [0, 1), got {list(c.betas)}")
    need(c.eps > 0, f"eps must be positive, got {c.eps}")
    need(c.weight_decay >= 0, f"weight_decay must be non-negative, got {c.weight_decay}")
    need(c.min_delta >= 0, f"min_delta must be non-negative, got {c.min_delta}")
    need(c.seed >= 0, f"seed must be non-negative, got {c.seed}")
    need(c.sample_tokens >= 0, f"sample_tokens must be non-negative, got {c.sample_tokens}")
    c.model_config(vocab_size=256)  # the model's fields: the core's rules (sizes, heads, dropout, architecture)
    need(c.sample_temperature >= 0, f"sample_temperature must be non-negative, got {c.sample_temperature}")
    need(0.0 <= c.momentum < 1.0, f"momentum must be in [0, 1), got {c.momentum}")
    need(math.isfinite(c.bucket_mb) and 0.0 <= c.bucket_mb <= 1024.0,
         f"bucket_mb must be in [0, 1024] MiB (0: one bucket), got {c.bucket_mb}")
    need(not c.zero or c.optimizer == "adamw", f"zero shards AdamW's moments: it needs optimizer adamw, got "
                                               f"{c.optimizer}")
    need(not c.zero or c.grad_dtype == "fp32", "zero with grad_dtype bf16 is not supported: use grad_dtype fp32")
    need(0.0 <= c.label_smoothing <= 1.0, f"label_smoothing must be in [0, 1], got {c.label_smoothing}")
    need(c.ema_decay is None or 0.0 < c.ema_decay < 1.0, f"ema_decay must be in (0, 1) or none, got {c.ema_decay}")
    need(c.sample_every is None or c.sample_tokens > 0, "sample_every needs sample_tokens > 0 (the samples' length)")
    # a setting of the optimizer not chosen would be ignored without a word
    for name in {"adamw": ("momentum",), "sgd": ("betas", "eps")}[c.optimizer]:
        need(getattr(c, name) == _DEFAULTS[name],
             f"{name} is not a setting of optimizer {c.optimizer} (leave it at its default, {_DEFAULTS[name]})")


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}


__all__ = ["TrainConfig", "read_config_file"]
