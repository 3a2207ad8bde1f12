"""PNG charts of saved benchmark results (`python benchmarks/bench_train.py --plot DIR FILE.json ...`).

Each file is either a training run written by `bench_train.py --json` or a generation run written by
`bench_generate.py --json`; the training runs are pooled (separate runs of tiny, small and gpt2 make one chart).
Charts, written to DIR:
  train_tokens_per_s.png   tokens/s by config and engine (the runs' largest thread count)
  long_context.png         tokens/s against T for small, small-t1024, small-t2048 (B*T = 2048), per engine
  generation.png           generation tokens/s by batch and engine, with the weight bandwidth of CLLM's engines
"""
from __future__ import annotations

import json
from pathlib import Path

LONG_CONTEXT = ("small", "small-t1024", "small-t2048")


def _figure(width=8.0, height=4.5):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=90)
    FigureCanvasAgg(fig)
    return fig


def _bars(ax, groups, series, values, ylabel):
    """Grouped bars: one group per item of `groups`, one bar per series; values[(group, series)] (missing: none)."""
    width = 0.8 / max(1, len(series))
    for i, s in enumerate(series):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        ys = [values.get((grp, s), 0.0) for grp in groups]
        bars = ax.bar(xs, ys, width, label=s)
        ax.bar_label(bars, labels=[f"{y:.0f}" if y else "" for y in ys], fontsize=7, rotation=90, padding=2)
    ax.set_xticks(range(len(groups)), [str(g) for g in groups])
    ax.set_ylabel(ylabel)
    ax.margins(y=0.15)
    ax.legend(fontsize=8)


def train_chart(results: list, path: Path) -> Path:
    ok = [r for r in results if "tokens_per_s" in r]
    threads = max(r["threads"] for r in ok)
    ok = [r for r in ok if r["threads"] == threads]
    from bench_common import CONFIGS

    order = list(CONFIGS)  # tiny, small, gpt2, ...: by size
    configs = sorted(dict.fromkeys(r["config"] for r in ok), key=lambda c: order.index(c) if c in order else len(order))
    engines = list(dict.fromkeys(r["engine"] for r in ok))
    fig = _figure(max(8.0, 1.6 * len(configs)))
    ax = fig.add_subplot()
    _bars(ax, configs, engines, {(r["config"], r["engine"]): r["tokens_per_s"] for r in ok}, "tokens/s")
    ax.set_yscale("log")
    ax.set_title(f"Training tokens/s by config and engine ({threads} threads)")
    fig.savefig(path)
    return path


def long_context_chart(results: list, path: Path) -> Path:
    from bench_common import CONFIGS

    ok = [r for r in results if "tokens_per_s" in r and r["config"] in LONG_CONTEXT]
    threads = max(r["threads"] for r in ok)
    fig = _figure()
    ax = fig.add_subplot()
    for engine in dict.fromkeys(r["engine"] for r in ok):
        pts = sorted((CONFIGS[r["config"]]["T"], r["tokens_per_s"]) for r in ok
                     if r["engine"] == engine and r["threads"] == threads)
        ax.plot([t for t, _ in pts], [v for _, v in pts], marker="o", label=engine)
    ax.set_xscale("log", base=2)
    ax.set_xticks([256, 1024, 2048], ["256", "1024", "2048"])
    ax.set_xlabel("sequence length T (B*T = 2048 tokens per step, C = 384, L = 6)")
    ax.set_ylabel("tokens/s")
    ax.set_ylim(bottom=0)
    ax.set_title(f"Training tokens/s against context length ({threads} threads)")
    ax.legend(fontsize=8)
    fig.savefig(path)
    return path


def generation_chart(result: dict, path: Path) -> Path:
    from bench_generate import summary

    rows = summary(result)
    batches = sorted({r["batch"] for r in rows})
    engines = list(dict.fromkeys(r["engine"] for r in rows))
    fig = _figure()
    ax = fig.add_subplot()
    _bars(ax, [f"batch {b}" for b in batches], engines,
          {(f"batch {r['batch']}", r["engine"]): r["tokens_per_s"] for r in rows}, "tokens/s")
    ax.set_title(f"Generation, {result['config']} shape ({result['parameters'] / 1e6:.0f} M parameters), "
                 f"{result['threads']} threads, greedy")
    fig.savefig(path)
    return path


def pooled_training(runs: list) -> list:
    """The results of several training runs as one list: a (config, threads, engine) that a later run measured
    again replaces the earlier one."""
    pooled = {}
    for results in runs:
        for r in results:
            pooled[(r["config"], r["threads"], r["engine"])] = r
    return list(pooled.values())


def plot(out_dir: str, files: list) -> list:
    """Writes the charts the files allow; returns their paths. ValueError naming a file that is not a result."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written, train_runs = [], []
    for f in files:
        try:
            data = json.loads(Path(f).read_text(encoding="utf-8"))
            if isinstance(data, dict) and data.get("what") == "generation":
                written.append(generation_chart(data, out / "generation.png"))
            elif isinstance(data, dict) and data.get("mode") == "train":
                train_runs.append(pooled_training([data["results"]]))  # a result without its keys: this file
            else:
                raise ValueError("neither a bench_train.py --json training run nor a bench_generate.py --json run")
        except OSError as e:
            raise ValueError(f"{f}: {e.strerror}") from None
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{f}: cannot plot ({type(e).__name__}: {e})") from None
    if train_runs:
        results = pooled_training(train_runs)
        written.append(train_chart(results, out / "train_tokens_per_s.png"))
        if any(r["config"] in LONG_CONTEXT[1:] and "tokens_per_s" in r for r in results):
            written.append(long_context_chart(results, out / "long_context.png"))
    return written
