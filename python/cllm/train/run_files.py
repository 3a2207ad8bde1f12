"""A training run's files besides its checkpoints, and its terminal: the run directory (locked while a run
trains in it, never taken over from another run unasked), its prepared data (data/, with prepare.json recording
how it was prepared), metrics.jsonl, loss.png; the session's clock, the messages and progress bar it prints, and
Ctrl-C asking it to stop.

metrics.jsonl holds one JSON object per logged step, appended and flushed as the run goes; a resumed run first
cuts it back to its checkpoint's step (`truncate_metrics`) so that it never holds a step twice. loss.png plots
it (`plot_losses`). Only rank 0 of a data-parallel run writes these files or prints.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import signal
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

from ..data import prepare, source_fingerprint
from ..errors import CLLMError
from ..core.files import DirLock, atomic_write


def write_json_atomic(path: Path, obj) -> None:
    """`obj` as indented JSON in `path`, written atomically."""
    text = json.dumps(obj, indent=1).encode("utf-8")
    atomic_write(path, lambda f: f.write(text), what="file", missing_dir="directory not found")


# ----------------------------------------------------------------------------------------------------
# the run directory and its prepared data
# ----------------------------------------------------------------------------------------------------
class RunLock(DirLock):
    """The lock of a run directory, held while a run trains there: a second run (or a `cllm prepare` into it)
    stops at once with an error naming the holder, instead of the two overwriting each other's checkpoints and
    logs."""

    def __init__(self, out_dir: Path):
        super().__init__(out_dir, "another run is training", "--out-dir")


def open_run_dir(out_dir: Path) -> RunLock:
    """Create the run directory, make sure that files can be written in it (an unusable directory is an error
    now, not at the first checkpoint) and lock it for this run; then remove the temporary files of checkpoint
    writes that a crash cut short (never valid; another run's live ones are safe behind the lock)."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out_dir, prefix=".write-test.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OSError(e.errno, f"run directory is not usable: {e.strerror}", str(out_dir)) from None
    lock = RunLock(out_dir)
    for stale in out_dir.glob(".*.safetensors.*.tmp"):
        stale.unlink(missing_ok=True)
    return lock


def claim_run_dir(out_dir: Path, overwrite: bool, say: Callable[[str], None]) -> None:
    """A fresh run never mixes with, nor silently deletes, another run's files: they are an error, or with
    overwrite deleted first."""
    old = [out_dir / n for n in ("last.safetensors", "best.safetensors", "metrics.jsonl", "loss.png")
           if (out_dir / n).exists() or (out_dir / n).is_symlink()]  # a link, dangling or not, is never written through
    if old and not overwrite:
        raise CLLMError(f"{out_dir}: holds a previous run ({', '.join(p.name for p in old)}); continue it with "
                        f"--resume, or start over with --overwrite (which deletes them)")
    for p in old:
        p.unlink()
    if old:
        say(f"overwrite: deleted {', '.join(p.name for p in old)} in {out_dir}")


def is_prepared_data(path: Path) -> bool:
    """Whether `path` is a directory of prepared token files (train.bin and val.bin)."""
    return path.is_dir() and (path / "train.bin").is_file() and (path / "val.bin").is_file()


def prepare_data_once(data_dir: Path, inputs: Optional[Sequence[str]], tokenizer, *, val_fraction: float,
                      seed: int, max_bytes: Optional[int], say: Callable[[str], None]) -> None:
    """Prepare `inputs` (None: the Python standard library) into data_dir (see data.prepare), unless its
    prepare.json records this very preparation, of the inputs as they are now (each file's size, mtime and
    CRC-32, see source_fingerprint), and the files it made are those there now (another preparation into
    data_dir, a `cllm prepare --out` say, leaves the stamp of this one). Says why it prepares again."""
    spec = {
        "inputs": None if inputs is None else [os.path.abspath(p) for p in inputs],
        "tokenizer": tokenizer if isinstance(tokenizer, str) else
        "sha256:" + hashlib.sha256(tokenizer.to_json().encode()).hexdigest(),
        "val_fraction": val_fraction, "seed": seed, "max_bytes": max_bytes,
    }
    if inputs is None:
        import sysconfig
        spec["stdlib"] = sysconfig.get_paths()["stdlib"]
    if data_dir.is_symlink():
        raise CLLMError(f"{data_dir}: is a symbolic link; a run writes its prepared data only inside its directory "
                        f"(give prepared data with --data instead)")
    sources = source_fingerprint(None if inputs is None else list(inputs))  # before reading: an edit during
    stamp = data_dir / "prepare.json"                                         # preparation shows next time
    why = _out_of_date(stamp, spec, sources, _prepared_files(data_dir))
    if why is None:
        say(f"using prepared data in {data_dir}")
        return
    say(f"preparing data in {data_dir}{f' ({why})' if why else ''} ...")
    summary = prepare(None if inputs is None else list(inputs), data_dir, tokenizer, val_fraction=val_fraction,
                      seed=seed, max_bytes=max_bytes)
    write_json_atomic(stamp, {"spec": spec, "sources": sources, "summary": summary,
                              "outputs": _prepared_files(data_dir)})
    say(f"  {summary['files']} files, {summary['bytes']:,} bytes -> {summary['train_tokens']:,} train / "
        f"{summary['val_tokens']:,} val tokens ({summary['tokenizer']}, vocab {summary['vocab_size']})")


_PREPARED = ("train.bin", "val.bin", "tokenizer.json")


def _prepared_files(data_dir: Path) -> dict:
    """What the prepared files are now: each token file's header (its count and checksum), tokenizer.json's
    SHA-256; None for a missing file."""
    out = {}
    for name in _PREPARED:
        try:
            with open(data_dir / name, "rb") as f:
                out[name] = f.read(64).hex() if name.endswith(".bin") else hashlib.sha256(f.read()).hexdigest()
        except OSError:
            out[name] = None
    return out


def _out_of_date(stamp: Path, spec: dict, sources: List[dict], outputs: dict) -> Optional[str]:
    """Why the data that `stamp` describes is not the data asked for, or not the files there (None: it is
    both; "" with no stamp)."""
    try:
        old = json.loads(stamp.read_text())
        old_spec, old_sources, old_outputs = old["spec"], {f["path"]: f for f in old["sources"]}, old["outputs"]
    except (OSError, ValueError, KeyError, TypeError):
        return "" if not stamp.exists() else f"{stamp.name} is unreadable or from an older CLLM"
    if None in outputs.values():
        return f"{', '.join(n for n, v in outputs.items() if v is None)} missing"
    if old_outputs != outputs:
        return f"its files are not the ones {stamp.name} records: another preparation replaced them"
    if old_spec != spec:
        changed = sorted(k for k in set(spec) | set(old_spec) if spec.get(k) != old_spec.get(k))
        return f"settings changed: {', '.join(changed)}"
    now = {f["path"]: f for f in sources}
    for path, f in now.items():
        if path not in old_sources:
            return f"{path} was added"
        if f != old_sources[path]:
            was = old_sources[path]
            what = "size" if f["size"] != was.get("size") else "content" if f["crc32"] != was.get("crc32") else "mtime"
            return f"{path} changed ({what})"
    for path in old_sources:
        if path not in now:
            return f"{path} was removed"
    if list(now) != list(old_sources):
        return "the order of the input files changed"
    return None


# ----------------------------------------------------------------------------------------------------
# metrics.jsonl
# ----------------------------------------------------------------------------------------------------
class MetricsLog:
    """metrics.jsonl open for appending: `append(record)` writes one JSON line straight to the file."""

    def __init__(self, path: Path):
        self.path = Path(path)
        # never through a symbolic link planted in the run directory (to append to a file outside it)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        # unbuffered: a buffered file keeps a line a full disk refused and writes it again when closed, and that
        # second error (naming no file) replaced the first
        self._file = os.fdopen(fd, "ab", buffering=0)

    def append(self, record: dict) -> None:
        data = (json.dumps(record) + "\n").encode("utf-8")
        try:
            while data:
                data = data[self._file.write(data):]
        except OSError as e:  # a full disk: the error names no file by itself
            if e.filename is not None or e.errno is None:
                raise
            raise OSError(e.errno, f"cannot write the metrics log: {e.strerror}", str(self.path)) from e

    def close(self) -> None:
        self._file.close()


def read_metrics(path) -> List[dict]:
    """The records of a metrics.jsonl file."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                out.append(json.loads(line))
    return out


def truncate_metrics(path: Path, step: int) -> None:
    """Keep only the records up to `step` (a resumed run rewrites what came after its checkpoint). A damaged
    line (cut short by a crash, not JSON, not a record with an integer step) is dropped with a warning naming
    the file and the line: the log is a report, the checkpoint holds the run's state."""
    if not path.is_file():
        return
    kept, damaged = [], []
    for number, raw in enumerate(path.read_bytes().splitlines(), 1):
        try:
            record = json.loads(raw.decode("utf-8"))
            ok = isinstance(record, dict) and type(record.get("step")) is int
        except (UnicodeDecodeError, ValueError, RecursionError):
            ok = False
        if not ok:
            if raw.strip():
                damaged.append(number)
        elif record["step"] <= step:
            kept.append(raw + b"\n")
    if damaged:
        shown = ", ".join(map(str, damaged[:5])) + (f" and {len(damaged) - 5} more" if len(damaged) > 5 else "")
        warnings.warn(f"{path}: dropped damaged line{'s' if len(damaged) > 1 else ''} {shown}", RuntimeWarning,
                      stacklevel=3)
    text = b"".join(kept)
    atomic_write(path, lambda f: f.write(text), what="file", missing_dir="run directory not found")


# ----------------------------------------------------------------------------------------------------
# loss.png
# ----------------------------------------------------------------------------------------------------
def plot_losses(metrics_path, png_path) -> Optional[str]:
    """Train (averaged over each log interval) and validation loss curves from metrics.jsonl into a PNG;
    None, with a warning, when there is nothing to read or no matplotlib. Lines it cannot plot (damaged, or
    written by something else) are skipped with a warning: the plot only reports, a finished run never fails
    for it."""
    try:
        raw = Path(metrics_path).read_bytes().splitlines()
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except (OSError, ImportError) as e:
        warnings.warn(f"no loss plot: {e}", RuntimeWarning)
        return None
    train, val, skipped = [], [], 0
    for line in filter(bytes.strip, raw):
        points = _plot_points(line)
        if points is None:
            skipped += 1
            continue
        step, t, v = points
        train += [(step, t)] if t is not None else []
        val += [(step, v)] if v is not None else []
    if skipped:
        warnings.warn(f"{metrics_path}: the loss plot skips {skipped} line{'s' if skipped > 1 else ''} it cannot "
                      f"plot", RuntimeWarning)
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
    atomic_write(png_path, lambda f: fig.savefig(f, format="png"), what="loss plot",
                 missing_dir="run directory not found")
    return str(png_path)


def _plot_points(line: bytes) -> Optional[Tuple[int, Optional[float], Optional[float]]]:
    """(step, train loss, validation loss) of a metrics line, a loss None where the record has none; None for a
    line that is not a record of integer step and finite-number (or null) losses."""
    try:
        r = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(r, dict) or type(r.get("step")) is not int:
        return None
    losses = [r.get("train_loss_avg"), r.get("train_loss"), r.get("val_loss")]
    if not all(x is None or (type(x) in (int, float) and math.isfinite(x)) for x in losses):
        return None
    return r["step"], losses[0] if losses[0] is not None else losses[1], losses[2]


# ----------------------------------------------------------------------------------------------------
# the terminal: messages, the progress bar, Ctrl-C
# ----------------------------------------------------------------------------------------------------
class Console:
    """What a run prints: messages on stdout and, while `progress_bar` is active, a tqdm bar on stderr (the
    messages then go through the bar, which stays below them). Prints nothing unless `enabled` (rank 0)."""

    def __init__(self, enabled: bool, progress: bool):
        self.enabled = enabled
        self.progress = progress and enabled
        self._bar = None

    def say(self, msg: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(msg, file=sys.stdout)
        else:
            print(msg, flush=True)

    @contextlib.contextmanager
    def progress_bar(self, total: int, initial: int):
        """A bar of `total` steps starting at `initial`, when progress was asked for and tqdm is installed."""
        self._bar = _tqdm(total, initial) if self.progress else None
        try:
            yield self
        finally:
            if self._bar is not None:
                self._bar.close()
                self._bar = None

    def logged_step(self, step: int, loss: float, lr: float, norm: float, tokens_per_sec: float) -> None:
        """A logged step: the bar's figures, or a line without a bar."""
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_sec:,.0f}", refresh=False)
        else:
            self.say(f"step {step:6d} | loss {loss:.4f} | lr {lr:.2e} | norm {norm:.3f} | {tokens_per_sec:,.0f} tok/s")

    def advance(self) -> None:
        """One more step done."""
        if self._bar is not None:
            self._bar.update(1)


class InterruptFlag:
    """While active, the first Ctrl-C (SIGINT) or SIGTERM only asks the loop to stop after the current step (so
    that the run ends with a consistent checkpoint, as `kill` or a job scheduler's time limit expects); a second
    one acts at once (KeyboardInterrupt, or the termination)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self._set = False
        self._old = {}

    def is_set(self) -> bool:
        return self._set

    def _handler(self, signum, frame):
        self._set = True
        self._restore()
        name = "interrupt" if signum == signal.SIGINT else "SIGTERM"
        print(f"\n{name}: stopping after this step (again to abort)", file=sys.stderr, flush=True)

    def _restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._old[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        self._restore()
        return False


@dataclass
class Session:
    """What one call of Trainer.fit() keeps from step to step: its clock, the last loss, why it stops, and the window
    of steps since the last logged one (their finite losses and their time)."""

    start_step: int
    started: float = field(default_factory=time.perf_counter)
    interrupt: InterruptFlag = field(default_factory=InterruptFlag)
    stop_reason: Optional[str] = None
    loss: Optional[float] = None
    last_eval_step: Optional[int] = None
    window_loss: float = 0.0
    window_steps: int = 0
    window_time: float = 0.0

    def seconds(self) -> float:
        return time.perf_counter() - self.started

    def end_window(self, tokens_per_step: int) -> Tuple[Optional[float], float]:
        """(mean finite loss or None, tokens per second) of the window; the next window starts empty."""
        mean = self.window_loss / self.window_steps if self.window_steps else None
        tok_s = self.window_steps * tokens_per_step / self.window_time if self.window_time > 0 else 0.0
        self.window_loss, self.window_steps, self.window_time = 0.0, 0, 0.0
        return mean, tok_s


def _tqdm(total: int, initial: int):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr)


__all__ = ["open_run_dir", "claim_run_dir", "RunLock", "Session", "is_prepared_data", "prepare_data_once",
           "MetricsLog", "read_metrics", "truncate_metrics", "plot_losses", "write_json_atomic", "Console",
           "InterruptFlag"]
