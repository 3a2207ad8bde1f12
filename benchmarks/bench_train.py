"""Benchmarks: CLLM's end-to-end training throughput against PyTorch, and its matmul against NumPy's BLAS.

    python benchmarks/bench_train.py                        # every engine, config and thread count
    python benchmarks/bench_train.py --configs tiny,small --threads 2 --steps 10 --json results.json
    python benchmarks/bench_train.py --matmul               # CLLM matmul vs NumPy (OpenBLAS) GFLOP/s
    python benchmarks/bench_train.py --kernels --configs small   # the C++ per-kernel timer, cllm_bench_kernels
    python benchmarks/bench_train.py --report results.json  # a --json file as Markdown tables

End to end, each (engine, config, threads) trains the same model in a fresh subprocess (bench_child.py), so
peak RSS is its own and no engine inherits another's thread pools or caches: `warmup` steps first
(torch.compile compiles there), then `steps` timed steps of forward + backward + clip_grad_norm(1.0) + AdamW on
random tokens.

Engines: ``cllm`` (float32), ``cllm-bf16`` (``cllm.Model(..., precision="bf16")``), ``cllm-bf16-dot`` (the same on
the avx512bf16 kernels, CLLM_ISA=avx512bf16: the peer where the dispatcher runs bf16 on the FMAs), ``torch`` (PyTorch eager,
the model of torch_gpt2.py, or of torch_llama.py for the llama configs), ``torch-compile`` (``torch.compile`` of
the same model), and ``torch-bf16`` / ``torch-bf16-compile`` (the same under PyTorch's own bf16 mixed precision,
``torch.autocast("cpu", bfloat16)`` with fp32 master weights: the fair peer of cllm-bf16), the PyTorch ones only
when torch is installed. PyTorch is an optional dependency of the benchmarks and of nothing else.

Model FLOPs per token (stated in the output too): ``6 * N + 6 * L * T * C`` where N counts every parameter
except the position table wpe (a lookup, no matmul; wte counts once, as the tied LM head's matmul), and
``6 * L * T * C`` is causal self-attention (QK^T and PV over the lower triangle: 2 * 2 * L * T * C / 2 forward,
twice that backward). Model GFLOP/s = that times tokens/s.

Needs the cllm package importable (installed, or PYTHONPATH=python in a checkout).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from bench_common import BLAS_ENV_UNSET, CONFIGS, ENGINE_ISA, ENGINES, FLOP_FORMULA, RESULT_TAG, wait_for_idle
from bench_report import markdown_report, print_matmul_table, print_train_table

CHILD = Path(__file__).resolve().with_name("bench_child.py")  # one measurement in a fresh process


# ---- the parent: one subprocess per measurement -------------------------------------------------------
def child_env(threads: int, engine: str = "") -> dict:
    env = dict(os.environ)
    if engine in ENGINE_ISA:
        env["CLLM_ISA"] = ENGINE_ISA[engine]
    for var in BLAS_ENV_UNSET:
        env.pop(var, None)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    return env


def _cllm_variants() -> list:
    """The kernel variants this CPU runs (asked in a subprocess: the parent never loads the core)."""
    out = subprocess.run([sys.executable, "-c", "import cllm; print(','.join(cllm.build_info()['variants_supported']))"],
                         capture_output=True, text=True)
    return out.stdout.strip().split(",") if out.returncode == 0 else []


def run_child(spec: dict, timeout: float, wait_idle: float = 0.0) -> dict:
    load = wait_for_idle(wait_idle) if wait_idle > 0 else None
    if load is not None and load >= 0.3:
        print(f"    (machine still busy: other processes use {load:.1f} cores)", flush=True)
    cmd = [sys.executable, str(CHILD), json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, env=child_env(spec["threads"], spec.get("engine", "")), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(spec, error=f"timed out after {timeout:.0f} s")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return dict(spec, error=f"exit {proc.returncode}: " + " | ".join(tail))


def _disturbance(r: dict) -> float:
    """Cores other processes used during a measurement (the worst row for --matmul); 0 when unknown."""
    if "rows" in r:
        return max((row.get("other_cores") or 0.0) for row in r["rows"]) if r["rows"] else 0.0
    return r.get("other_cores") or 0.0


def measure(spec: dict, args) -> dict:
    """run_child, repeated (--retry-busy) while other processes disturbed it; the least disturbed run wins."""
    best = None
    for attempt in range(1 + max(0, args.retry_busy)):
        r = run_child(spec, args.timeout, args.wait_idle)
        if "error" in r:
            return r if best is None else best
        r["attempts"] = attempt + 1
        if best is None or _disturbance(r) < _disturbance(best):
            best = r
        if _disturbance(r) < 0.3:
            break
        if attempt < args.retry_busy:
            print(f"    (disturbed: other processes used {_disturbance(r):.1f} cores; measuring again)", flush=True)
    return best


def torch_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None


# ---- the command line ----------------------------------------------------------------------------------
def _csv(value: str, allowed=None, cast=str, what="value"):
    items = [cast(v.strip()) for v in value.split(",") if v.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"empty list of {what}s")
    if allowed is not None:
        bad = [v for v in items if v not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(map(str, bad))} (choose from {', '.join(allowed)})")
    return items


def _threads(value: str):
    items = _csv(value, cast=int, what="thread count")
    if any(t < 1 for t in items):
        raise argparse.ArgumentTypeError("thread counts must be >= 1")
    return items


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The benchmark's options."""
    p.add_argument("--configs", type=lambda v: _csv(v, CONFIGS, what="config"), default=list(CONFIGS),
                   help="comma-separated configs: " + ", ".join(
                       f"{k} (V={c['V']} T={c['T']} C={c['C']} L={c['L']} H={c['H']} B={c['B']}"
                       + (f" llama KV={c['KV']} SwiGLU {c['F']})" if c.get("arch") == "llama" else ")")
                       for k, c in CONFIGS.items()) + " (default: all)")
    p.add_argument("--threads", type=_threads, default=[1, 2], help="comma-separated thread counts (default 1,2)")
    p.add_argument("--engines", type=lambda v: _csv(v, ENGINES, what="engine"), default=list(ENGINES),
                   help="comma-separated engines from " + ", ".join(ENGINES)
                   + " (default: all that are available)")
    p.add_argument("--steps", type=int, default=None,
                   help="timed steps per run (default per config: "
                   + ", ".join(f"{k} {c['steps']}" for k, c in CONFIGS.items()) + ")")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps first, torch.compile's compilation included (default per config: "
                   + ", ".join(f"{k} {c['warmup']}" for k, c in CONFIGS.items()) + ")")
    p.add_argument("--json", metavar="PATH", default=None, help="also write the results as JSON to PATH")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                   help="before each measurement wait up to SECONDS for the machine to be idle (other processes "
                   "using < 0.3 cores): on a shared machine other work slows every engine down (default 0)")
    p.add_argument("--retry-busy", type=int, default=0, metavar="N",
                   help="re-run a measurement up to N times while other processes kept >= 0.3 cores busy during it, "
                   "keeping the least disturbed run (default 0)")
    p.add_argument("--rounds", type=int, default=1, metavar="N",
                   help="run the engines of each config and thread count N times, alternating, and report each "
                   "engine's median run: where the machine's speed drifts, alternation keeps the ratios fair "
                   "(default 1)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds allowed for each subprocess (default 900)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--matmul", action="store_true",
                      help="instead: CLLM's linear forward/backward against NumPy's BLAS on the configs' shapes")
    mode.add_argument("--kernels", action="store_true",
                      help="instead: run the C++ per-kernel benchmark (cllm_bench_kernels) for each config/threads")
    mode.add_argument("--report", metavar="JSON", default=None,
                      help="instead: print a file written by --json as Markdown tables (measures nothing)")
    mode.add_argument("--plot", metavar="DIR", default=None,
                      help="instead: PNG charts into DIR from the JSON files given after the options (this script's "
                      "--json, bench_generate.py's --json; measures nothing)")
    p.add_argument("files", nargs="*", metavar="JSON", help="--plot: the result files to draw")
    return p


def kernels_binary() -> Path:
    """The installed cllm_bench_kernels (site-packages/cllm/bin), or $CLLM_BENCH_KERNELS."""
    env = os.environ.get("CLLM_BENCH_KERNELS")
    if env:
        return Path(env)
    import importlib.util

    spec = importlib.util.find_spec("cllm")
    package = Path(spec.origin).parent if spec and spec.origin else Path(".")
    return package / "bin" / ("cllm_bench_kernels" + (".exe" if os.name == "nt" else ""))


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _check_args(args) -> None:
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if args.warmup is not None and args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    if args.retry_busy < 0 or args.wait_idle < 0 or args.timeout <= 0 or args.rounds < 1:
        raise ValueError("--retry-busy and --wait-idle must be >= 0, --timeout > 0, --rounds >= 1")
    if bool(args.plot) != bool(args.files):
        raise ValueError("--plot DIR takes the result files to draw after the options (and files need --plot)")


def _run_kernels(args) -> int:
    exe = kernels_binary()
    if not exe.exists():
        print(f"cllm_bench_kernels not found at {exe} (built from benchmarks/bench_kernels.cpp when the package "
              f"is installed; or set CLLM_BENCH_KERNELS)", file=sys.stderr)
        return 1
    status = 0
    for name in args.configs:
        for t in args.threads:
            if args.wait_idle > 0:
                wait_for_idle(args.wait_idle)
            status |= subprocess.run([str(exe), name, str(t)], env=child_env(t)).returncode
    return status


def _run_matmul(args) -> list:
    results = []
    for name in args.configs:
        for t in args.threads:
            print(f"  matmul {name} threads={t} ...", flush=True)
            results.append(measure(dict(mode="matmul", config=name, threads=t), args))
    print_matmul_table(results)
    return results


def _train_rounds(args, engines, name: str, threads: int, steps: int, warmup: int) -> dict:
    """engine -> its runs: the engines run `args.rounds` times, alternating."""
    runs = {e: [] for e in engines}
    for rnd in range(args.rounds):
        for engine in runs:
            spec = dict(mode="train", config=name, threads=threads, engine=engine, steps=steps, warmup=warmup)
            tag = f" (round {rnd + 1}/{args.rounds})" if args.rounds > 1 else ""
            print(f"  {name} threads={threads} {engine}: {warmup} warmup + {steps} timed steps{tag} ...", flush=True)
            r = measure(spec, args)
            if "error" not in r:
                print(f"    {r['tokens_per_s']:.0f} tokens/s, {r['model_gflops']:.1f} GFLOP/s, "
                      f"peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
            else:
                print(f"    failed: {r['error']}", flush=True)
            runs[engine].append(r)
    return runs


def _median_run(runs: list) -> dict:
    """The median run by tokens/s (the lower middle one for an even count), with every round's tokens/s; the
    first run when all failed."""
    ok = sorted((r for r in runs if "error" not in r), key=lambda r: r["tokens_per_s"])
    if not ok:
        return runs[0]
    return dict(ok[(len(ok) - 1) // 2], rounds_tokens_per_s=[r["tokens_per_s"] for r in ok])


def _run_train(args) -> list:
    skip = {} if torch_available() else {e: "skipped: torch is not installed" for e in ENGINES if e.startswith("torch")}
    if "avx512bf16" not in _cllm_variants():
        skip["cllm-bf16-dot"] = "skipped: this CPU has no AVX512_BF16"
    results = []
    for name in args.configs:
        c = CONFIGS[name]
        steps = args.steps if args.steps is not None else c["steps"]
        warmup = args.warmup if args.warmup is not None else c["warmup"]
        for t in args.threads:
            engines = [e for e in ENGINES if e in args.engines]
            runs = _train_rounds(args, [e for e in engines if e not in skip], name, t, steps, warmup)
            for engine in engines:
                if engine in skip:
                    results.append(dict(mode="train", config=name, threads=t, engine=engine, steps=steps,
                                        warmup=warmup, skipped=skip[engine]))
                else:
                    results.append(_median_run(runs[engine]))
    print()
    print_train_table(results)
    return results


def _report(path: Path) -> str:
    """The Markdown report of a saved --json file; ValueError naming the file if it is not one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise TypeError(f"expected a JSON object, got {type(data).__name__}")
        return markdown_report(data)
    except OSError as e:
        raise ValueError(f"{path}: {e.strerror}") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, KeyError, TypeError, AttributeError,
            ValueError) as e:  # a record without a field, a field of the wrong type
        raise ValueError(f"{path}: not a benchmark report written by --json ({type(e).__name__}: {e})") from None


def run(args) -> int:
    """Runs the benchmark the parsed `args` ask for; returns the exit status."""
    _check_args(args)
    if args.report:
        print(_report(Path(args.report)))
        return 0
    if args.plot:
        from bench_plot import plot

        for path in plot(args.plot, args.files):
            print(f"wrote {path}")
        return 0
    meta = dict(date=time.strftime("%Y-%m-%d %H:%M:%S"), machine=platform.machine(), processor=_cpu_name(),
                cpus=os.cpu_count(), python=platform.python_version(), flop_formula=FLOP_FORMULA)
    print(f"# cllm benchmark {meta['date']}  {meta['processor']} ({meta['cpus']} CPUs)  Python {meta['python']}",
          flush=True)
    if args.kernels:
        return _run_kernels(args)
    results = _run_matmul(args) if args.matmul else _run_train(args)
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(dict(meta=meta, mode="matmul" if args.matmul else "train", results=results),
                                   indent=2) + "\n")
        print(f"wrote {path}")
    return 1 if any("error" in r for r in results) else 0


def main(argv=None) -> int:
    parser = add_arguments(argparse.ArgumentParser(
        prog="python benchmarks/bench_train.py",
        description="CLLM benchmarks: end-to-end training tokens/s against PyTorch (eager, torch.compile), "
                    "or (--matmul) CLLM's matmul against NumPy's BLAS, or (--kernels) the C++ per-kernel timer."))
    try:
        return run(parser.parse_args(argv))
    except ValueError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
