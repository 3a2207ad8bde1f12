"""The training loop: data, model, AdamW or SGD, lr schedule, EMA, evaluation, early stopping, checkpoints, logs.

    from cllm import TrainConfig, Trainer
    summary = Trainer(TrainConfig(max_steps=1000, out_dir="runs/demo")).fit()

One optimizer step = `grad_accum` micro-batches of `batch_size` sequences of `max_seq_len` tokens (per rank).
The lr depends on the step number only, every random choice is seeded and its state is saved in the
checkpoints, so a run resumed from `out_dir/last.safetensors` continues exactly, bit for bit, as if it had
never stopped (with the same settings; `decay_steps` fixes the schedule's horizon when max_steps changes).

Files in out_dir: data/ (prepared token files, re-used), last.safetensors, best.safetensors, metrics.jsonl
(one JSON object per logged step), loss.png (see run_files.py).

Data parallelism plugs in through `comm` (see `cllm.parallel.SingleProcess`): each rank draws its own rows
of the global batch, gradients and losses are averaged by `comm`, and only rank 0 writes files or prints.
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np

from ..core.config import ModelConfig
from ..data import BatchLoader, eval_batches, load_tokens
from ..data.batches import check_eval_batches
from ..parallel.mpi import SingleProcess
from ..parallel.reducer import shard_ranges
from ..infer.generation import sample_text
from ..core.model import Model, memory_estimate, parameter_count
from .optim import EMA, SGD, AdamW, clip_grad_norm, clip_shard_grad_norm, grad_norm
from .resume import model_config_for, pretrained_start, resume_run, save_run
from .run_files import (Console, MetricsLog, RunLock, Session, claim_run_dir, is_prepared_data, open_run_dir,
                        plot_losses, prepare_data_once)
from ..interop.pretrained import load_pretrained
from .schedule import lr_at
from ..core.system import check_memory, get_num_threads, set_num_threads
from ..data.tokenizer import Tokenizer, load_tokenizer
from .config import TrainConfig

# Unclipped gradients above this norm overflow the float32 squares in AdamW's second moment (sqrt(3.4e38)
# ~ 1.8e19), leaving Inf moments: such a step is treated as non-finite too.
MAX_UNCLIPPED_GRAD_NORM = 1e19
PREPARED_DATA_SEED = 0  # data split seed used when the trainer prepares the corpus itself
EVAL_SEED = 1234        # the fixed validation batches do not depend on the training seed


# ----------------------------------------------------------------------------------------------------
# the trainer
# ----------------------------------------------------------------------------------------------------
@dataclass
class _Step:
    """One optimizer step as it was taken: its loss, gradient norm and lr, whether the weights were updated
    (finite), and its metrics record."""

    loss: float
    norm: float
    lr: float
    finite: bool
    record: Dict[str, Any]


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
        self.console = Console(enabled=self.main, progress=config.progress)
        self._metrics: Optional[MetricsLog] = None
        self._lock: Optional[RunLock] = None  # held from setup to the end of fit (rank 0)
        self.reducer = None  # the gradients' exchange across ranks (its thread lives until the end of fit)
        self.shards = None  # ZeRO-1: each rank's (lo, hi) of the flat buffers

    # -- setup --------------------------------------------------------------------------------
    def _setup(self) -> None:
        c = self.config
        if c.threads:
            set_num_threads(c.threads)
        if self.main:
            self._lock = open_run_dir(self.out_dir)
            if not c.resume:
                claim_run_dir(self.out_dir, c.overwrite, self.console.say)
        self.comm.barrier()
        init = pretrained_start(self) if c.init_from else None  # (model or its config, tokenizer)
        data_dir = self._data_dir(init[1] if init else None)
        self.tokenizer = load_tokenizer(data_dir / "tokenizer.json")
        if init and self.tokenizer != init[1]:
            raise ValueError(f"{data_dir}: its tokenizer.json is not the tokenizer of {c.init_from} (prepare the data "
                             f"with --tokenizer {c.init_from}, or give the text files)")
        train = load_tokens(data_dir / "train.bin")
        val = load_tokens(data_dir / "val.bin")
        if train.vocab_size != self.tokenizer.vocab_size or val.vocab_size != self.tokenizer.vocab_size:
            raise ValueError(f"{data_dir}: token files (vocab {train.vocab_size}/{val.vocab_size}) do not match "
                             f"tokenizer.json (vocab {self.tokenizer.vocab_size})")
        self.data_dir = data_dir  # the checkpoints record which data (a resume needs the same)
        self.data_fingerprint = {f.path.name: [len(f), f.crc32] for f in (train, val)}
        check_eval_batches(val, c.eval_batches, c.batch_size, c.max_seq_len, self.comm.world_size)
        pretrained = None if init is None else init[0] if isinstance(init[0], ModelConfig) else init[0].config
        self.model_config = model_config_for(self, pretrained)
        # weights, gradients, optimizer state, EMA and a step's activations, before any of them is allocated; a
        # resume also holds the checkpoint's model (weights, gradients) and its tensor sets while it loads them;
        # under --zero, rank 0 gathers the whole moments to save a checkpoint. (Saving streams the tensors.)
        n = parameter_count(self.model_config)
        resume_peak = 5 * 4 * n if c.resume else 0
        gather_peak = 2 * 4 * n if c.zero and self.main and self.comm.world_size > 1 else 0
        check_memory(memory_estimate(self.model_config, c.batch_size, c.max_seq_len, optimizer=c.optimizer,
                                     ema=bool(c.ema_decay), shards=self.comm.world_size if c.zero else 1)
                     + max(resume_peak, gather_peak),
                     f"training a model of {parameter_count(self.model_config, padded=False):,} parameters on "
                     f"batches of {c.batch_size} x {c.max_seq_len} tokens{' (resumed)' if c.resume else ''}")
        self.model = Model(self.model_config, seed=c.seed, precision=c.precision)
        if init and isinstance(init[0], Model):
            self.model.load_parameters(init[0].parameters())
        del init
        self.model.dropout_stream = self.comm.rank  # each rank's rows get their own dropout masks
        make_reducer = getattr(self.comm, "gradient_reducer", None)
        multi = self.comm.world_size > 1 and make_reducer is not None
        # ZeRO-1: rank r keeps the moments of its shard of the flat buffers only (one process: no shards)
        self.shards = shard_ranges(self.model.layout.total, self.comm.world_size) if c.zero and multi else None
        if c.optimizer == "sgd":
            self.optimizer = SGD(self.model, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)
        else:
            self.optimizer = AdamW(self.model, lr=c.lr, betas=c.betas, eps=c.eps, weight_decay=c.weight_decay,
                                   shard=self.shards[self.comm.rank] if self.shards else None)
        self.ema = EMA(self.model, c.ema_decay) if c.ema_decay else None
        if multi:
            self.reducer = make_reducer(self.model.flat_gradients(), int(c.bucket_mb * 2**20) // 4, c.overlap,
                                        c.grad_dtype, self.shards, model=self.model)
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
        token_bytes = self.tokenizer.token_bytes()  # bits per byte = val loss / ln 2 / bytes per target token
        self.val_bytes_per_token = self.comm.allreduce_mean(float(np.mean([token_bytes[y].mean()
                                                                             for _, y in self.val_batches])))
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
            resume_run(self)

    def _data_dir(self, tokenizer: Optional[Tokenizer]) -> Path:
        """The directory holding train.bin, val.bin and tokenizer.json: config.data if it is one, else
        out_dir/data, where rank 0 prepares config.data (or the stdlib) unless it already did, with
        `tokenizer` (a pretrained model's) or the one the settings name."""
        c = self.config
        if c.data is not None and len(c.data) == 1 and is_prepared_data(Path(c.data[0])):
            return Path(c.data[0])
        data_dir = self.out_dir / "data"
        if self.main:
            if tokenizer is None:
                tokenizer = "byte" if c.tokenizer == "byte" else f"bpe:{c.bpe_vocab_size}"
            prepare_data_once(data_dir, c.data, tokenizer, val_fraction=c.val_fraction, seed=PREPARED_DATA_SEED,
                              max_bytes=c.max_data_bytes, say=self.console.say)
        self.comm.barrier()
        return data_dir

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
        reducer = self.reducer
        hook = reducer.ready if reducer is not None and reducer.overlap else None
        for i in range(c.grad_accum):
            rows = slice(i * c.batch_size, (i + 1) * c.batch_size)
            last = i == c.grad_accum - 1  # its backward finishes the gradients: their exchange may begin
            if last and reducer is not None:
                reducer.start(x[rows])  # a tied head's embedding part is left to the reducer (embedding_grad)
            loss += self.model.forward_backward(x[rows], y[rows], accumulate=i > 0, grad_scale=1.0 / c.grad_accum,
                                                label_smoothing=c.label_smoothing,
                                                on_grads_ready=hook if last else None,
                                                embedding_grad=reducer.embedding_grad if last and reducer else None)
        if reducer is not None:
            reducer.finish()
        else:
            self.comm.allreduce_mean_(self.model.flat_gradients())
        loss = self.comm.allreduce_mean(loss / c.grad_accum)
        if self.shards:  # this rank holds its shard's averaged gradients only
            norm = clip_shard_grad_norm(self.model, c.grad_clip, self.optimizer.shard, self.comm)
        elif c.grad_clip:
            norm = clip_grad_norm(self.model, c.grad_clip)
        else:
            norm = grad_norm(self.model)
        return loss, norm

    def evaluate(self) -> float:
        """Mean validation loss over the fixed validation batches (no dropout), of the EMA weights if kept."""
        with self._eval_weights() as model:
            losses = [model.loss(x, y) for x, y in self.val_batches]
        return self.comm.allreduce_mean(float(np.mean(losses)))

    def _eval_weights(self):
        """The model with the weights to evaluate and sample from: the EMA's while kept (restored after)."""
        return self.ema.applied() if self.ema is not None else contextlib.nullcontext(self.model)

    def bits_per_byte(self, val_loss: float) -> float:
        """A validation loss (nats per token) as bits per byte of the validation text."""
        return val_loss / math.log(2) / self.val_bytes_per_token

    # -- output ---------------------------------------------------------------------------------
    def _warn(self, msg: str) -> None:
        if self.main:
            warnings.warn(msg, RuntimeWarning, stacklevel=3)

    def _log(self, record: dict) -> None:
        """Append a record to metrics.jsonl (rank 0)."""
        if self.main:
            self._metrics.append(record)

    def _close_metrics(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None

    # -- the loop -------------------------------------------------------------------------------
    def fit(self) -> Dict[str, Any]:
        """Train until max_steps, max_time, early stopping or Ctrl-C; returns a summary dict."""
        threads = get_num_threads()
        try:
            return self._fit()
        finally:
            if self.reducer is not None:  # not waiting for its collectives while an error ends the job
                self.reducer.close(wait=sys.exc_info()[0] is None)
                self.reducer = None
            if self._lock is not None:
                self._lock.release()
                self._lock = None
            if self.config.threads:
                set_num_threads(threads)  # `threads` holds for this run only

    def _fit(self) -> Dict[str, Any]:
        self._setup()
        with self._session() as s:
            while self.step < self.config.max_steps:
                if self._stop_requested(s):  # max_time or Ctrl-C, before the step
                    break
                step = self._optimizer_step(s)
                self._maybe_evaluate(step, s)
                self._log_step(step, s)
                self._check_replicas()
                self._maybe_checkpoint(s)
                self._maybe_sample()
                if s.stop_reason:  # early stopping, or a non-finite step with on_nonfinite="stop"
                    break
        return self._finish(s)

    @contextlib.contextmanager
    def _session(self):
        """The span of the loop: metrics.jsonl open (rank 0), Ctrl-C asking the loop to stop after the current
        step, the progress bar. A failing loop closes metrics.jsonl; otherwise _finish does."""
        if self.main:
            self._metrics = MetricsLog(self.metrics_path)
        self.console.say(f"model: {self.model.num_parameters:,} parameters {self.model_config}; "
                         f"{self.tokens_per_step:,} tokens per step")
        if self.shards:
            lo, hi = self.shards[0]
            self.console.say(f"zero: the optimizer moments are sharded, {hi - lo:,} of {self.model.layout.total:,} "
                             f"floats each on rank 0 (of {len(self.shards)} ranks)")
        s = Session(start_step=self.step)
        if self.config.init_from and self.step == 0:
            self._evaluate_start(s)
        try:
            with s.interrupt, self.console.progress_bar(total=self.config.max_steps, initial=self.step):
                yield s
        except BaseException:
            self._close_metrics()
            raise

    def _evaluate_start(self, s: Session) -> None:
        """A pretrained start: the model's validation loss before any step (step 0 of metrics.jsonl)."""
        val = self.evaluate()
        self.last_val_loss, s.last_eval_step = _num(val), 0
        self._log({"step": 0, "val_loss": _num(val), "val_bpb": _num(self.bits_per_byte(val)),
                   "init_from": str(self.config.init_from)})
        self.console.say(f"step 0: val loss {val:.4f}, {self.bits_per_byte(val):.4f} bits/byte "
                         f"({self.config.init_from})")

    def _elapsed(self, s: Session) -> float:
        """Seconds of training of this run, earlier sessions included."""
        return self.elapsed_before + s.seconds()

    def _stop_requested(self, s: Session) -> bool:
        """Whether max_time has passed or Ctrl-C was pressed (on any rank: the ranks stop together, as one
        stopping alone would hang the others); sets s.stop_reason."""
        c = self.config
        stop = [c.max_time is not None and s.seconds() >= c.max_time, s.interrupt.is_set()]
        if self.comm.world_size > 1:
            stop = np.array(stop, dtype=np.float32)
            self.comm.allreduce_mean_(stop)
            stop = stop > 0
        if stop[0]:
            s.stop_reason = "max_time"
        elif stop[1]:
            s.stop_reason = "interrupted"
        return s.stop_reason is not None

    def _optimizer_step(self, s: Session) -> _Step:
        """One optimizer step at the schedule's lr: gradients, clipping, the update, unless the loss or the
        gradient norm is not finite (then the weights stay as they were)."""
        c = self.config
        lr = self.lr_at(self.step)
        started = time.perf_counter()
        loss, norm = self.train_step()
        finite = math.isfinite(loss) and math.isfinite(norm) and (bool(c.grad_clip) or norm < MAX_UNCLIPPED_GRAD_NORM)
        if finite:
            self.optimizer.lr = lr
            self.optimizer.step()
            if self.shards:  # each rank updated its shard: everyone gets all of them
                self.comm.allgather_shards_(self.model.flat_parameters(), self.shards)
            if self.ema is not None:
                self.ema.update()
        self.step += 1
        s.window_time += time.perf_counter() - started
        s.loss = loss
        step = _Step(loss, norm, lr, finite,
                     {"step": self.step, "train_loss": _num(loss), "lr": lr, "grad_norm": _num(norm)})
        if finite:
            s.window_loss += loss
            s.window_steps += 1
        else:
            self._skipped_nonfinite(step, s)
        return step

    def _skipped_nonfinite(self, step: _Step, s: Session) -> None:
        """Count, warn about and mark a step skipped for a non-finite loss or norm; on_nonfinite="stop" stops."""
        c = self.config
        self.nonfinite_steps += 1
        overflow = " (overflows AdamW's float32 moments)" if math.isfinite(step.norm) else ""
        self._warn(f"step {self.step}: non-finite loss {step.loss} or grad norm {step.norm}{overflow}, "
                   f"step {'skipped' if c.on_nonfinite == 'skip' else 'skipped; stopping'}")
        step.record["event"] = "nonfinite"
        if c.on_nonfinite == "stop":
            s.stop_reason = "nonfinite"

    def _maybe_evaluate(self, step: _Step, s: Session) -> None:
        """Every eval_interval steps: the validation loss, best.safetensors when it improves, early stopping."""
        c = self.config
        if self.step % c.eval_interval != 0:
            return
        val = self.evaluate()
        self.last_val_loss, s.last_eval_step = _num(val), self.step
        step.record.update(val_loss=_num(val), val_bpb=_num(self.bits_per_byte(val)))
        improved = self._keep_if_best(val, s)
        if not improved:
            self.evals_since_best += 1
        best = "best" if improved else f"best {_fmt(self.best_val_loss)} at step {self.best_step}"
        self.console.say(f"step {self.step}: val loss {val:.4f}, {self.bits_per_byte(val):.4f} bits/byte ({best})")
        if c.patience is not None and self.evals_since_best >= c.patience:
            self.console.say(f"early stopping: no improvement in {c.patience} evaluations")
            s.stop_reason = "early_stop"

    def _keep_if_best(self, val: float, s: Session) -> bool:
        """Whether `val` beats the best by more than min_delta: then it is the best, saved as best.safetensors."""
        best = self.best_val_loss
        improved = math.isfinite(val) and (best is None or val < best - self.config.min_delta)
        if improved:
            self.best_val_loss, self.best_step, self.evals_since_best = val, self.step, 0
            save_run(self, self.best_path, self._elapsed(s))
        return improved

    def _log_step(self, step: _Step, s: Session) -> None:
        """Every log_interval steps, and at evaluations, non-finite steps and the last step: the record, with the
        window's mean loss and throughput, into metrics.jsonl, and onto the progress bar or as a line."""
        c = self.config
        if (self.step % c.log_interval == 0 or "val_loss" in step.record or not step.finite or s.stop_reason
                or self.step == c.max_steps):
            mean_loss, tok_s = s.end_window(self.tokens_per_step)
            step.record.update(train_loss_avg=_num(mean_loss), tokens_per_sec=round(tok_s, 1),
                               elapsed=round(self._elapsed(s), 3))
            self._log(step.record)
            self.console.logged_step(self.step, step.loss, step.lr, step.norm, tok_s)
        self.console.advance()

    def _check_replicas(self, final: bool = False) -> None:
        """Data parallel: are the ranks' weights still equal? (an optional member of the communicator)"""
        check = getattr(self.comm, "check_replicas", None)
        if check is not None:
            check(self.model, self.step, final=final)

    def _maybe_checkpoint(self, s: Session) -> None:
        if self.step % self.config.checkpoint_interval == 0:
            save_run(self, self.last_path, self._elapsed(s))

    def _maybe_sample(self) -> None:
        c = self.config
        if c.sample_every and self.step % c.sample_every == 0 and self.main:
            with self._eval_weights() as model:
                self.console.say(self._sample(model, f"at step {self.step}")[1])

    def _sample(self, model: Model, where: str) -> Tuple[str, str]:
        """(the continuation of the prompt, the text to print) of a sample with the run's settings."""
        c = self.config
        text = sample_text(model, self.tokenizer, c.prompt, c.sample_tokens, temperature=c.sample_temperature,
                           seed=c.seed)
        return text, f"--- sample {where} ---\n{c.prompt}{text}\n---"

    def _finish(self, s: Session) -> Dict[str, Any]:
        """The end of a session: the last checkpoint, a final evaluation if the last step had none (a new best like
        any other), then (rank 0) the loss curves and a sample from the best. Returns the summary."""
        session_time = s.seconds()
        s.stop_reason = s.stop_reason or "max_steps"
        self._check_replicas(final=True)
        save_run(self, self.last_path, self._elapsed(s))
        final_val = self.last_val_loss
        if self.step > 0 and s.last_eval_step != self.step and s.stop_reason not in ("nonfinite", "interrupted"):
            final_val = self.evaluate()
            self._log({"step": self.step, "val_loss": _num(final_val), "val_bpb": _num(self.bits_per_byte(final_val)),
                       "final_eval": True})
            # the best if better, as at any evaluation (patience counts the regular ones); last.safetensors says so
            if self._keep_if_best(final_val, s):
                save_run(self, self.last_path, self._elapsed(s))
        self._close_metrics()
        summary = self._summary(s, session_time, final_val)
        if self.main:
            self.console.say(f"stopped ({s.stop_reason}) at step {self.step} after {session_time:.1f} s: "
                             f"val loss {_fmt(final_val)}, best {_fmt(self.best_val_loss)} at step {self.best_step}")
            summary["plot"] = plot_losses(self.metrics_path, self.plot_path)
            if self.config.sample_tokens > 0 and s.stop_reason != "interrupted":
                summary["sample"] = self._final_sample()
        self.comm.barrier()
        return summary

    def _summary(self, s: Session, session_time: float, final_val: Optional[float]) -> Dict[str, Any]:
        steps_done = self.step - s.start_step
        return {
            "steps": self.step, "steps_this_session": steps_done, "stop_reason": s.stop_reason,
            "train_loss": _num(s.loss), "val_loss": _num(final_val),
            "best_val_loss": self.best_val_loss, "best_step": self.best_step,
            "nonfinite_steps": self.nonfinite_steps, "time": session_time, "elapsed": self._elapsed(s),
            "tokens_per_sec": steps_done * self.tokens_per_step / session_time if session_time > 0 else 0.0,
            "out_dir": str(self.out_dir), "last_checkpoint": str(self.last_path),
            "best_checkpoint": str(self.best_path) if self.best_path.is_file() else None,
            "metrics": str(self.metrics_path), "plot": None, "sample": None,
        }

    def _final_sample(self) -> str:
        if self.best_path.is_file():
            where = f"{self.best_path} (step {self.best_step})"
            weights = contextlib.nullcontext(load_pretrained(self.best_path)[0])  # its EMA weights if kept
        else:
            where, weights = f"the model at step {self.step}", self._eval_weights()
        with weights as model:
            text, shown = self._sample(model, f"from {where}")
        print(shown, flush=True)
        return text


# ----------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------
def _num(x):
    """A float for JSON, None when missing or non-finite (metrics stay standard JSON)."""
    return float(x) if x is not None and math.isfinite(x) else None


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"


__all__ = ["Trainer"]
