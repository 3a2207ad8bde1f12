"""The training loop: data, model, AdamW, lr schedule, evaluation, early stopping, checkpoints, logs.

    from cllm import TrainConfig, Trainer
    summary = Trainer(TrainConfig(max_steps=1000, out_dir="runs/demo")).fit()

One optimizer step = `grad_accum` micro-batches of `batch_size` sequences of `max_seq_len` tokens (per rank).
The lr depends on the step number only, every random choice is seeded and its state is saved in the
checkpoints, so a run resumed from `out_dir/last.safetensors` continues exactly, bit for bit, as if it had
never stopped (with the same settings; `decay_steps` fixes the schedule's horizon when max_steps changes).

Files in out_dir: data/ (prepared token files, re-used), last.safetensors, best.safetensors, metrics.jsonl
(one JSON object per logged step), loss.png.

Data parallelism plugs in through `comm` (see `SingleProcess`): each rank draws its own rows of the global
batch, gradients and losses are averaged by `comm`, and only rank 0 writes files or prints.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from . import _core
from .checkpoint import load_checkpoint, restore_optimizer, save_checkpoint
from .config import POS_ENCODINGS, ModelConfig
from .data import BatchLoader, eval_batches, load_tokens, prepare
from .model import MAX_THREADS, PRECISIONS, Model, check_memory, check_num_threads, memory_estimate, parameter_count
from .optim import AdamW, clip_grad_norm, grad_norm
from .schedule import SCHEDULES, check_schedule, lr_at
from .tokenizer import MissingFileError, Tokenizer, load_tokenizer

# Unclipped gradients above this norm overflow the float32 squares in AdamW's second moment (sqrt(3.4e38)
# ~ 1.8e19), leaving Inf moments: such a step is treated as non-finite too.
MAX_UNCLIPPED_GRAD_NORM = 1e19
PREPARED_DATA_SEED = 0  # data split seed used when the trainer prepares the corpus itself
EVAL_SEED = 1234        # the fixed validation batches do not depend on the training seed


def set_num_threads(n: int) -> None:
    _core.set_num_threads(check_num_threads(n))


def get_num_threads() -> int:
    return int(_core.get_num_threads())


# ----------------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------------
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
    max_seq_len: int = _f(128, "context length T (tokens per training sequence)", "int")
    embedding_dim: int = _f(128, "embedding dimension C", "int")
    num_layers: int = _f(4, "transformer blocks L", "int")
    num_heads: int = _f(4, "attention heads H", "int")
    ff_dim: Optional[int] = _f(None, "feed-forward hidden size (none: 4 * embedding_dim)", "opt_int")
    dropout: float = _f(0.0, "dropout probability", "float")
    pos_encoding: str = _f("learned", "positional encoding", "choice", POS_ENCODINGS)
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
    weight_decay: float = _f(0.1, "AdamW weight decay (2-D weights only)", "float")
    betas: Tuple[float, float] = _f((0.9, 0.95), "AdamW betas", "betas")
    eps: float = _f(1e-8, "AdamW epsilon", "float")
    grad_clip: Optional[float] = _f(1.0, "clip the global gradient norm to this (none or 0: off)", "opt_float")
    on_nonfinite: str = _f("skip", "on a NaN/Inf loss or gradient: skip the step, or stop the run", "choice",
                           ("skip", "stop"))
    # evaluation and early stopping
    eval_interval: int = _f(100, "evaluate on the validation set every this many steps", "int")
    eval_batches: int = _f(16, "validation batches averaged per evaluation", "int")
    patience: Optional[int] = _f(None, "stop after this many evaluations without improvement (none: off)",
                                 "opt_int")
    min_delta: float = _f(0.0, "an evaluation improves if it beats the best by more than this", "float")
    # checkpoints, logs, misc
    checkpoint_interval: int = _f(500, "write last.safetensors every this many steps (and at the end)", "int")
    resume: bool = _f(False, "continue exactly from out_dir/last.safetensors", "bool")
    log_interval: int = _f(10, "append to metrics.jsonl every this many steps", "int")
    progress: bool = _f(True, "show a progress bar (otherwise print log lines)", "bool")
    seed: int = _f(0, "seed of the model init, dropout and batch sampling", "int")
    threads: Optional[int] = _f(None, "CPU threads of the kernels (none: OpenMP default)", "opt_int")
    sample_tokens: int = _f(300, "tokens of the sample printed at the end (0: none)", "int")
    prompt: str = _f("def ", "prompt of the final sample", "str")
    sample_temperature: float = _f(0.8, "temperature of the final sample (0: greedy)", "float")

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
        d = {str(k).replace("-", "_"): v for k, v in d.items()}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{source}: unknown setting{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}")
        return cls(**d)

    @classmethod
    def from_file(cls, path, **overrides) -> "TrainConfig":
        """Read settings from a .toml or .json file (flat keys named like the fields); `overrides` win.
        Errors are ValueError/TypeError naming the file."""
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
        return ModelConfig(vocab_size=int(vocab_size), max_seq_len=self.max_seq_len,
                           embedding_dim=self.embedding_dim, num_layers=self.num_layers, num_heads=self.num_heads,
                           ff_dim=self.ff_dim or 4 * self.embedding_dim, dropout=self.dropout,
                           pos_encoding=self.pos_encoding)

    @property
    def schedule_horizon(self) -> int:
        return self.decay_steps if self.decay_steps is not None else self.max_steps


def read_config_file(path) -> dict:
    """The settings table of a TOML (.toml) or JSON (.json) file; ValueError naming the file otherwise."""
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
    return d


def _coerce(name: str, value, kind: str, choices):
    """Check a setting's type, converting the harmless cases (int -> float, list -> tuple)."""
    def bad(expected):
        return ValueError(f"{name} must be {expected}, got {value!r}")

    if kind in ("opt_int", "opt_float") and value is None:
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

    for name in ("bpe_vocab_size", "max_seq_len", "embedding_dim", "num_layers", "num_heads", "batch_size",
                 "grad_accum", "max_steps", "eval_interval", "eval_batches", "checkpoint_interval", "log_interval"):
        need(getattr(c, name) > 0, f"{name} must be positive, got {getattr(c, name)}")
    for name in ("ff_dim", "threads", "patience", "max_data_bytes"):
        v = getattr(c, name)
        need(v is None or v > 0, f"{name} must be positive or none, got {v}")
    need(c.threads is None or c.threads <= MAX_THREADS, f"threads must be at most {MAX_THREADS}, got {c.threads}")
    need(c.bpe_vocab_size >= 257, f"bpe_vocab_size must be at least 257, got {c.bpe_vocab_size}")
    need(0.0 < c.val_fraction <= 0.5, f"val_fraction must be in (0, 0.5], got {c.val_fraction}")
    need(c.embedding_dim % c.num_heads == 0,
         f"embedding_dim {c.embedding_dim} is not divisible by num_heads {c.num_heads}")
    need(0.0 <= c.dropout < 1.0, f"dropout must be in [0, 1), got {c.dropout}")
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
    need(c.sample_temperature >= 0, f"sample_temperature must be non-negative, got {c.sample_temperature}")


# ----------------------------------------------------------------------------------------------------
# data parallelism hook
# ----------------------------------------------------------------------------------------------------
class SingleProcess:
    """The communicator of a one-process run: every collective is the identity.

    A data-parallel communicator (e.g. over MPI) provides the same members: `rank`, `world_size`,
    `allreduce_mean_(buf)` averaging a float32 array across ranks in place (the flat gradient buffer),
    `allreduce_mean(x)` averaging a float (losses) and `barrier()`."""

    rank = 0
    world_size = 1

    def allreduce_mean_(self, buf: np.ndarray) -> None:
        pass

    def allreduce_mean(self, value: float) -> float:
        return float(value)

    def barrier(self) -> None:
        pass


# ----------------------------------------------------------------------------------------------------
# sampling
# ----------------------------------------------------------------------------------------------------
def sample_text(model: Model, tokenizer: Tokenizer, prompt: str, max_new_tokens: int = 100,
                temperature: float = 1.0, top_k=None, top_p=None, seed: int = 0) -> str:
    """The decoded continuation of `prompt` (the prompt itself is not included). An empty prompt starts
    from a newline; a prompt longer than the context keeps its last max_seq_len tokens."""
    ids = tokenizer.encode(prompt)
    if ids.size == 0:
        ids = tokenizer.encode("\n")
    ids = ids[-model.config.max_seq_len:]
    new = model.generate(ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                         top_p=top_p, seed=seed)
    return tokenizer.decode(np.asarray(new))


# ----------------------------------------------------------------------------------------------------
# the trainer
# ----------------------------------------------------------------------------------------------------
class Trainer:
    """Trainer(config).fit() -> summary dict. See the module docstring."""

    def __init__(self, config: Optional[TrainConfig] = None, comm=None):
        if config is None:
            config = TrainConfig()
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a cllm.TrainConfig, got {type(config).__name__}")
        self.config = config
        self.comm = comm if comm is not None else SingleProcess()
        self.main = self.comm.rank == 0
        self.out_dir = Path(config.out_dir)
        self.last_path = self.out_dir / "last.safetensors"
        self.best_path = self.out_dir / "best.safetensors"
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self.plot_path = self.out_dir / "loss.png"
        self._bar = None

    # -- setup --------------------------------------------------------------------------------
    def _prepare_data(self) -> Path:
        """The directory holding train.bin, val.bin and tokenizer.json (prepared here if needed)."""
        c = self.config
        if c.data is not None and len(c.data) == 1:
            d = Path(c.data[0])
            if d.is_dir() and (d / "train.bin").is_file() and (d / "val.bin").is_file():
                return d  # already prepared
        data_dir = self.out_dir / "data"
        spec = {
            "inputs": None if c.data is None else [os.path.abspath(p) for p in c.data],
            "tokenizer": "byte" if c.tokenizer == "byte" else f"bpe:{c.bpe_vocab_size}",
            "val_fraction": c.val_fraction, "seed": PREPARED_DATA_SEED, "max_bytes": c.max_data_bytes,
        }
        if c.data is None:
            import sysconfig
            spec["stdlib"] = sysconfig.get_paths()["stdlib"]
        if self.main:
            stamp = data_dir / "prepare.json"
            try:
                cached = json.loads(stamp.read_text())["spec"] == spec
            except (OSError, ValueError, KeyError, TypeError):
                cached = False
            if not all((data_dir / f).is_file() for f in ("train.bin", "val.bin", "tokenizer.json")):
                cached = False
            if cached:
                self._say(f"using prepared data in {data_dir}")
            else:
                self._say(f"preparing data in {data_dir} ...")
                summary = prepare(None if c.data is None else list(c.data), data_dir, spec["tokenizer"],
                                  val_fraction=c.val_fraction, seed=PREPARED_DATA_SEED, max_bytes=c.max_data_bytes)
                _write_json_atomic(stamp, {"spec": spec, "summary": summary})
                self._say(f"  {summary['files']} files, {summary['bytes']:,} bytes -> {summary['train_tokens']:,} "
                          f"train / {summary['val_tokens']:,} val tokens ({summary['tokenizer']}, "
                          f"vocab {summary['vocab_size']})")
        self.comm.barrier()
        return data_dir

    def _setup(self) -> None:
        c = self.config
        if c.threads:
            set_num_threads(c.threads)
        if self.main:
            try:  # an unusable run directory is an error now, not at the first checkpoint
                self.out_dir.mkdir(parents=True, exist_ok=True)
                fd, probe = tempfile.mkstemp(dir=self.out_dir, prefix=".write-test.", suffix=".tmp")
                os.close(fd)
                os.unlink(probe)
            except OSError as e:
                raise OSError(e.errno, f"run directory is not usable: {e.strerror}", str(self.out_dir)) from None
            for stale in self.out_dir.glob(".*.safetensors.*.tmp"):  # left by a crash mid-write; never valid
                stale.unlink(missing_ok=True)
        self.comm.barrier()
        data_dir = self._prepare_data()
        self.tokenizer = load_tokenizer(data_dir / "tokenizer.json")
        train = load_tokens(data_dir / "train.bin")
        val = load_tokens(data_dir / "val.bin")
        if train.vocab_size != self.tokenizer.vocab_size or val.vocab_size != self.tokenizer.vocab_size:
            raise ValueError(f"{data_dir}: token files (vocab {train.vocab_size}/{val.vocab_size}) do not match "
                             f"tokenizer.json (vocab {self.tokenizer.vocab_size})")
        self.model_config = c.model_config(self.tokenizer.vocab_size)
        # weights, gradients, AdamW moments and a step's activations, before any of them is allocated
        check_memory(memory_estimate(self.model_config, c.batch_size, c.max_seq_len),
                     f"training a model of {parameter_count(self.model_config, padded=False):,} parameters on "
                     f"batches of {c.batch_size} x {c.max_seq_len} tokens")
        self.model = Model(self.model_config, seed=c.seed, precision=c.precision)
        self.model.dropout_stream = self.comm.rank  # each rank's rows get their own dropout masks
        self.optimizer = AdamW(self.model, lr=c.lr, betas=c.betas, eps=c.eps, weight_decay=c.weight_decay)
        # each step draws batch_size * grad_accum rows per rank; the micro-batches are slices of it, so
        # accumulation (and data parallelism) sees exactly the rows of one big batch
        try:
            self.loader = BatchLoader(train, c.batch_size * c.grad_accum, c.max_seq_len, seed=c.seed,
                                      rank=self.comm.rank, world_size=self.comm.world_size)
        except ValueError as e:
            raise ValueError(f"{train.path}: {e}") from None
        try:
            self.val_batches = eval_batches(val, c.batch_size, c.max_seq_len, c.eval_batches, seed=EVAL_SEED,
                                            rank=self.comm.rank, world_size=self.comm.world_size)
        except ValueError as e:
            raise ValueError(f"{val.path}: {e}") from None
        self.tokens_per_step = c.batch_size * c.grad_accum * c.max_seq_len * self.comm.world_size
        # the state that a checkpoint carries besides weights and moments
        self.step = 0
        self.best_val_loss = None
        self.best_step = None
        self.evals_since_best = 0
        self.last_val_loss = None
        self.nonfinite_steps = 0
        self.elapsed_before = 0.0  # seconds spent in earlier sessions of this run
        if c.resume:
            self._resume()
        elif self.main:
            if self.last_path.is_file():
                self._say(f"starting a fresh run in {self.out_dir} (resume=True would continue the old one)")
            for old in (self.best_path, self.metrics_path):  # a fresh run must not mix with an old one
                old.unlink(missing_ok=True)

    def _resume(self) -> None:
        c = self.config
        if not self.last_path.is_file():
            raise MissingFileError(2, "cannot resume: no checkpoint", str(self.last_path))
        ckpt = load_checkpoint(self.last_path)
        if ckpt.config != self.model_config:
            diff = [f"{k} {v} (now {getattr(self.model_config, k)})" for k, v in ckpt.config.to_dict().items()
                    if getattr(self.model_config, k) != v]
            raise ValueError(f"{self.last_path}: cannot resume, the checkpoint's model differs: {', '.join(diff)}")
        if ckpt.tokenizer != self.tokenizer:
            raise ValueError(f"{self.last_path}: cannot resume, the checkpoint's tokenizer differs from the data's")
        st = ckpt.trainer_state
        try:
            self.model.load_parameters(ckpt.model.parameters())
            self.model.dropout_step = int(st["dropout_step"])
            restore_optimizer(self.optimizer, ckpt.optimizer_state)
            self.loader.load_state_dict(st["loader"])
            self.step = int(st["step"])
            self.best_val_loss = st["best_val_loss"]
            self.best_step = st["best_step"]
            self.evals_since_best = int(st["evals_since_best"])
            self.last_val_loss = st.get("last_val_loss")
            self.nonfinite_steps = int(st.get("nonfinite_steps", 0))
            self.elapsed_before = float(st.get("elapsed", 0.0))
        except KeyError as e:
            raise ValueError(f"{self.last_path}: cannot resume, trainer_state lacks {e}") from None
        except ValueError as e:
            raise ValueError(f"{self.last_path}: cannot resume: {e}") from None
        old = st.get("train_config", {})
        # (batch_size, grad_accum and the number of ranks may change if their product, the global batch,
        # does not: the loader refuses anything else; the same rows then give the same step up to round-off)
        changed = [k for k in ("lr", "min_lr", "warmup_steps", "schedule", "decay_steps", "weight_decay",
                               "grad_clip", "seed")
                   if k in old and old[k] != getattr(c, k)]
        if old.get("decay_steps") is None and c.decay_steps is None and old.get("max_steps") != c.max_steps:
            changed.append("max_steps (the schedule's horizon; set decay_steps to keep it)")
        if changed:
            self._warn(f"resuming with changed settings: {', '.join(changed)}; the run will not match an "
                       "uninterrupted one")
        if self.main:
            _truncate_metrics(self.metrics_path, self.step)
        self._say(f"resumed from {self.last_path} at step {self.step}")

    # -- pieces of the loop ---------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        c = self.config
        horizon = c.schedule_horizon
        return lr_at(step, lr=c.lr, min_lr=c.min_lr, warmup_steps=min(c.warmup_steps, horizon),
                     max_steps=horizon, kind=c.schedule)

    def train_step(self) -> Tuple[float, float]:
        """Gradients of one optimizer step's batch (grad_accum micro-batches, averaged over ranks), clipped.
        Returns (mean loss, gradient norm before clipping). Does not update the weights."""
        c = self.config
        x, y = self.loader.next_batch()  # [batch_size * grad_accum, T] rows of this rank
        loss = 0.0
        for i in range(c.grad_accum):
            rows = slice(i * c.batch_size, (i + 1) * c.batch_size)
            loss += self.model.forward_backward(x[rows], y[rows], accumulate=i > 0, grad_scale=1.0 / c.grad_accum)
        loss = self.comm.allreduce_mean(loss / c.grad_accum)
        self.comm.allreduce_mean_(self.model.flat_gradients())
        if c.grad_clip:
            norm = clip_grad_norm(self.model, c.grad_clip)
        else:
            norm = grad_norm(self.model)
        return loss, norm

    def evaluate(self) -> float:
        """Mean validation loss over the fixed validation batches (no dropout)."""
        losses = [self.model.loss(x, y) for x, y in self.val_batches]
        return self.comm.allreduce_mean(float(np.mean(losses)))

    def trainer_state(self, elapsed: float) -> Dict[str, Any]:
        return {
            "step": self.step, "optimizer_step": self.optimizer.step_count,
            "train_config": self.config.to_dict(), "loader": self.loader.state_dict(),
            "dropout_step": self.model.dropout_step, "best_val_loss": self.best_val_loss,
            "best_step": self.best_step, "evals_since_best": self.evals_since_best,
            "last_val_loss": self.last_val_loss, "nonfinite_steps": self.nonfinite_steps,
            "elapsed": elapsed, "world_size": self.comm.world_size,
            "lr": self.lr_at(self.step),
        }

    def save(self, path: Path, elapsed: float) -> bool:
        """Write a checkpoint (rank 0); never one with non-finite weights or optimizer moments (warns and
        returns False)."""
        if not self.main:
            return True
        for what, buf in (("weights", self.model.flat_parameters()), ("optimizer moments", self.optimizer.exp_avg),
                          ("optimizer moments", self.optimizer.exp_avg_sq)):
            if not np.isfinite(buf).all():
                self._warn(f"step {self.step}: {what} are not finite, not writing {path.name}")
                return False
        save_checkpoint(path, self.model, self.optimizer, self.tokenizer, self.trainer_state(elapsed))
        return True

    # -- output ---------------------------------------------------------------------------------
    def _say(self, msg: str) -> None:
        if not self.main:
            return
        if self._bar is not None:
            self._bar.write(msg, file=sys.stdout)
        else:
            print(msg, flush=True)

    def _warn(self, msg: str) -> None:
        if self.main:
            warnings.warn(msg, RuntimeWarning, stacklevel=3)

    def _log(self, record: dict) -> None:
        if self.main:
            self._metrics.write(json.dumps(record) + "\n")
            self._metrics.flush()

    # -- the loop -------------------------------------------------------------------------------
    def fit(self) -> Dict[str, Any]:
        """Train until max_steps, max_time, early stopping or Ctrl-C; returns a summary dict."""
        threads = get_num_threads()
        try:
            return self._fit()
        finally:
            if self.config.threads:
                set_num_threads(threads)  # `threads` holds for this run only

    def _fit(self) -> Dict[str, Any]:
        c = self.config
        self._setup()
        model, opt = self.model, self.optimizer
        if self.main:
            self._metrics = open(self.metrics_path, "a", encoding="utf-8")
            self._say(f"model: {model.num_parameters:,} parameters {self.model_config}; "
                      f"{self.tokens_per_step:,} tokens per step")
        start_step = self.step
        t0 = time.perf_counter()
        elapsed = lambda: self.elapsed_before + time.perf_counter() - t0  # noqa: E731
        stop_reason, loss, last_eval_step = None, None, None
        window_loss, window_steps, window_time = 0.0, 0, 0.0
        interrupted = _InterruptFlag()
        check_replicas = getattr(self.comm, "check_replicas", None)  # optional: see cllm.distributed
        self._bar = _progress_bar(c.progress and self.main, total=c.max_steps, initial=self.step)
        try:
            with interrupted:
                while self.step < c.max_steps:
                    stop = [c.max_time is not None and time.perf_counter() - t0 >= c.max_time, interrupted.is_set()]
                    if self.comm.world_size > 1:  # ranks stop together: one stopping alone would hang the others
                        stop = np.array(stop, dtype=np.float32)
                        self.comm.allreduce_mean_(stop)
                        stop = stop > 0
                    if stop[0]:
                        stop_reason = "max_time"
                        break
                    if stop[1]:
                        stop_reason = "interrupted"
                        break

                    # one optimizer step: gradients, clipping, lr from the schedule, update
                    lr = self.lr_at(self.step)
                    t_step = time.perf_counter()
                    loss, norm = self.train_step()
                    finite = math.isfinite(loss) and math.isfinite(norm) and (
                        bool(c.grad_clip) or norm < MAX_UNCLIPPED_GRAD_NORM)
                    if finite:
                        opt.lr = lr
                        opt.step()
                    self.step += 1
                    t_step = time.perf_counter() - t_step
                    window_time += t_step
                    record = {"step": self.step, "train_loss": _num(loss), "lr": lr, "grad_norm": _num(norm)}

                    if not finite:  # the weights were left untouched
                        self.nonfinite_steps += 1
                        overflow = " (overflows AdamW's float32 moments)" if math.isfinite(norm) else ""
                        self._warn(f"step {self.step}: non-finite loss {loss} or grad norm {norm}{overflow}, "
                                   f"step {'skipped' if c.on_nonfinite == 'skip' else 'skipped; stopping'}")
                        record["event"] = "nonfinite"
                        if c.on_nonfinite == "stop":
                            stop_reason = "nonfinite"
                    else:
                        window_loss += loss
                        window_steps += 1

                    # evaluation and early stopping
                    if self.step % c.eval_interval == 0:
                        val = self.evaluate()
                        self.last_val_loss, last_eval_step = _num(val), self.step
                        record["val_loss"] = _num(val)
                        improved = math.isfinite(val) and (self.best_val_loss is None
                                                           or val < self.best_val_loss - c.min_delta)
                        if improved:
                            self.best_val_loss, self.best_step, self.evals_since_best = val, self.step, 0
                            self.save(self.best_path, elapsed())
                        else:
                            self.evals_since_best += 1
                        self._say(f"step {self.step}: val loss {val:.4f}"
                                  + (" (best)" if improved else f" (best {_fmt(self.best_val_loss)} at step "
                                                                f"{self.best_step})"))
                        if c.patience is not None and self.evals_since_best >= c.patience:
                            self._say(f"early stopping: no improvement in {c.patience} evaluations")
                            stop_reason = "early_stop"

                    # logs and progress
                    if self.step % c.log_interval == 0 or "val_loss" in record or not finite or stop_reason \
                            or self.step == c.max_steps:
                        tok_s = window_steps * self.tokens_per_step / window_time if window_time > 0 else 0.0
                        record.update(train_loss_avg=_num(window_loss / window_steps) if window_steps else None,
                                      tokens_per_sec=round(tok_s, 1), elapsed=round(elapsed(), 3))
                        self._log(record)
                        if self._bar is not None:
                            self._bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}",
                                                  refresh=False)
                        elif self.main:
                            self._say(f"step {self.step:6d} | loss {loss:.4f} | lr {lr:.2e} | norm {norm:.3f} | "
                                      f"{tok_s:,.0f} tok/s")
                        window_loss, window_steps, window_time = 0.0, 0, 0.0
                    if self._bar is not None:
                        self._bar.update(1)

                    if check_replicas is not None:  # data parallel: are the ranks' weights still equal?
                        check_replicas(model, self.step)
                    if self.step % c.checkpoint_interval == 0:
                        self.save(self.last_path, elapsed())
                    if stop_reason:
                        break
        except BaseException:
            if self.main:
                self._metrics.close()
            raise
        finally:
            if self._bar is not None:
                self._bar.close()
                self._bar = None
        session_time = time.perf_counter() - t0
        stop_reason = stop_reason or "max_steps"

        # the end: last checkpoint, a final evaluation if the last step had none, curves, a sample
        if check_replicas is not None:
            check_replicas(model, self.step, final=True)
        self.save(self.last_path, elapsed())
        final_val = self.last_val_loss
        if self.step > 0 and last_eval_step != self.step and stop_reason not in ("nonfinite", "interrupted"):
            final_val = self.evaluate()  # reported only: early stopping sees the regular evaluations alone
            self._log({"step": self.step, "val_loss": _num(final_val), "final_eval": True})
        if self.main:
            self._metrics.close()
        steps_done = self.step - start_step
        summary = {
            "steps": self.step, "steps_this_session": steps_done, "stop_reason": stop_reason,
            "train_loss": _num(loss) if loss is not None else None, "val_loss": _num(final_val),
            "best_val_loss": self.best_val_loss, "best_step": self.best_step,
            "nonfinite_steps": self.nonfinite_steps, "time": session_time, "elapsed": elapsed(),
            "tokens_per_sec": steps_done * self.tokens_per_step / session_time if session_time > 0 else 0.0,
            "out_dir": str(self.out_dir), "last_checkpoint": str(self.last_path),
            "best_checkpoint": str(self.best_path) if self.best_path.is_file() else None,
            "metrics": str(self.metrics_path), "plot": None, "sample": None,
        }
        if self.main:
            self._say(f"stopped ({stop_reason}) at step {self.step} after {session_time:.1f} s: "
                      f"val loss {_fmt(final_val)}, best {_fmt(self.best_val_loss)} at step {self.best_step}")
            summary["plot"] = plot_losses(self.metrics_path, self.plot_path)
            if c.sample_tokens > 0 and stop_reason != "interrupted":
                summary["sample"] = self._final_sample()
        self.comm.barrier()
        return summary

    def _final_sample(self) -> str:
        c = self.config
        model, where = self.model, f"the model at step {self.step}"
        if self.best_path.is_file():
            model, where = load_checkpoint(self.best_path).model, f"{self.best_path} (step {self.best_step})"
        text = sample_text(model, self.tokenizer, c.prompt, c.sample_tokens, temperature=c.sample_temperature,
                           seed=c.seed)
        print(f"--- sample from {where} ---\n{c.prompt}{text}\n---", flush=True)
        return text


# ----------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------
def _num(x):
    """A float for JSON, None when missing or non-finite (metrics stay standard JSON)."""
    return float(x) if x is not None and math.isfinite(x) else None


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep only the records up to `step` (a resumed run rewrites what came after its checkpoint)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    os.replace(tmp, path)


def read_metrics(path) -> List[dict]:
    """The records of a metrics.jsonl file."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                out.append(json.loads(line))
    return out


def plot_losses(metrics_path, png_path) -> Optional[str]:
    """Train (averaged over each log interval) and validation loss curves from metrics.jsonl into a PNG."""
    try:
        records = read_metrics(metrics_path)
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except (OSError, ValueError, ImportError) as e:
        warnings.warn(f"no loss plot: {e}", RuntimeWarning)
        return None
    train = [(r["step"], r.get("train_loss_avg") or r.get("train_loss")) for r in records
             if (r.get("train_loss_avg") or r.get("train_loss")) is not None]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    fig = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1.0)
    if val:
        ax.plot(*zip(*val), label="validation", marker="o", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.grid(True, alpha=0.3)
    if train or val:
        ax.legend()
    fig.tight_layout()
    fig.savefig(str(png_path))
    return str(png_path)


def _progress_bar(enabled: bool, total: int, initial: int):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr)


class _InterruptFlag:
    """While active, the first Ctrl-C only asks the loop to stop after the current step (so that the last
    checkpoint is consistent); a second one interrupts at once."""

    def __init__(self):
        self._set = False
        self._old = None

    def is_set(self) -> bool:
        return self._set

    def _handler(self, signum, frame):
        self._set = True
        signal.signal(signal.SIGINT, self._old or signal.default_int_handler)
        print("\ninterrupt: stopping after this step (Ctrl-C again to abort)", file=sys.stderr, flush=True)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False


__all__ = ["TrainConfig", "Trainer", "SingleProcess", "sample_text", "read_config_file", "read_metrics",
           "plot_losses"]
