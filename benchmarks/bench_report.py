"""The benchmark's results as tables: printed after a run, and as Markdown from a saved --json file."""
from __future__ import annotations

import json
import sys

from bench_common import ENGINES, FLOP_FORMULA


def _fmt(v, spec="{:.1f}", none="-"):
    return none if v is None else spec.format(v)


def print_train_table(results, out=sys.stdout):
    ok = [r for r in results if "error" not in r and "skipped" not in r]
    engines = [e for e in ENGINES if any(r["engine"] == e for r in ok)]
    peers = engines
    head = (f"{'config':<7} {'thr':>3} {'engine':<14} {'tokens/s':>10} "
            + " ".join(f"{'/' + p:>14}" for p in peers)
            + f" {'GFLOP/s':>8} {'step ms':>9} {'warmup s':>8} {'RSS MB':>7} {'loss':>13} {'other':>6}")
    print(head, file=out)
    index = {(r["config"], r["threads"], r["engine"]): r for r in ok}
    for r in results:
        label = f"{r['config']:<7} {r['threads']:>3} {r['engine']:<14}"
        if "error" in r or "skipped" in r:
            print(f"{label} {'(' + (r.get('skipped') or r.get('error')) + ')'}", file=out)
            continue
        ratios = []
        for p in peers:
            peer = index.get((r["config"], r["threads"], p))
            ratios.append(f"{r['tokens_per_s'] / peer['tokens_per_s']:>14.2f}" if peer else f"{'-':>14}")
        print(f"{label} {r['tokens_per_s']:>10.0f} " + " ".join(ratios)
              + f" {r['model_gflops']:>8.1f} {r['step_s_median'] * 1e3:>9.1f} {r['warmup_s']:>8.1f}"
              f" {r['peak_rss_mb']:>7.0f} {r['first_loss']:>6.3f}>{r['last_loss']:<6.3f}"
              f" {_fmt(r.get('other_cores'), '{:.2f}'):>6}", file=out)
    spread = [r for r in ok if len(r.get("rounds_tokens_per_s", ())) > 1]
    for r in spread:
        print(f"rounds {r['config']} {r['threads']} {r['engine']}: tokens/s "
              + " / ".join(f"{v:.0f}" for v in r["rounds_tokens_per_s"]) + " (the median one is shown)", file=out)
    print(f"tokens/s = B*T / median step time (forward+backward+clip+AdamW); '/X' = tokens/s ratio to engine X;\n"
          f"GFLOP/s = model FLOPs, {FLOP_FORMULA};\n"
          f"RSS = the child process's peak resident set (ru_maxrss); loss = first warmup step > last timed step\n"
          f"(every engine starts from CLLM's initial weights and sees the same batches: equal losses, same model);\n"
          f"other = cores kept busy by other processes during the timed steps (contention: numbers are lower).",
          file=out)


def print_matmul_table(results, out=sys.stdout):
    print(f"{'config':<7} {'thr':>3} {'layer':<12} {'dir':<4} {'N x IC x OC':<20} {'CLLM GFLOP/s':>12} "
          f"{'NumPy GFLOP/s':>13} {'CLLM/NumPy':>10} {'other':>6}", file=out)
    for r in results:
        if "error" in r:
            print(f"{r['config']:<7} {r['threads']:>3} ({r['error']})", file=out)
            continue
        for row in r["rows"]:
            shape = f"{row['N']}x{row['IC']}x{row['OC']}"
            print(f"{r['config']:<7} {r['threads']:>3} {row['layer']:<12} {row['direction']:<4} {shape:<20} "
                  f"{row['cllm_gflops']:>12.1f} {row['numpy_gflops']:>13.1f} "
                  f"{row['cllm_gflops'] / row['numpy_gflops']:>10.2f} {_fmt(row.get('other_cores'), '{:.2f}'):>6}",
                  file=out)
    seen = set()
    for r in results:
        if "blas_info" in r:
            line = json.dumps(r["blas_info"])
            if line not in seen:
                seen.add(line)
                print(f"NumPy BLAS (threads={r['threads']}): {line}", file=out)
    print("fwd: out = x @ w + b (2*N*IC*OC FLOPs); bwd: dx = dout @ w^T, dw = x^T @ dout, db = sum(dout) "
          "(4*N*IC*OC);\nlm_head is timed as a [C, V] linear (same FLOPs as lnf @ wte^T). Median of >= 3 calls "
          "after a warmup; each side allocates its outputs;\nother = cores kept busy by other processes meanwhile (contention: numbers are lower).", file=out)


def markdown_report(data: dict) -> str:
    """Markdown tables of a saved --json file (to paste into benchmarks/README.md)."""
    meta, results = data.get("meta", {}), data.get("results", [])
    lines = [f"Measured {meta.get('date', '?')} on {meta.get('processor', '?')} ({meta.get('cpus', '?')} CPUs), "
             f"Python {meta.get('python', '?')}.", ""]
    if data.get("mode") == "matmul":
        lines += ["| config | threads | layer | dir | N x IC x OC | CLLM GFLOP/s | NumPy GFLOP/s | CLLM/NumPy | other |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in results:
            for row in r.get("rows", []):
                lines.append(f"| {r['config']} | {r['threads']} | {row['layer']} | {row['direction']} | "
                             f"{row['N']}x{row['IC']}x{row['OC']} | {row['cllm_gflops']:.1f} | "
                             f"{row['numpy_gflops']:.1f} | {row['cllm_gflops'] / row['numpy_gflops']:.2f} | "
                             f"{_fmt(row.get('other_cores'), '{:.2f}')} |")
        return "\n".join(lines)
    ok = [r for r in results if "error" not in r and "skipped" not in r]
    engines = [e for e in ENGINES if any(r["engine"] == e for r in ok)]
    index = {(r["config"], r["threads"], r["engine"]): r for r in ok}
    lines += ["| config | threads | engine | tokens/s | " + " | ".join(f"/{e}" for e in engines)
              + " | GFLOP/s | step ms | warmup s | peak RSS MB | other |",
              "| --- | --- | --- | --- | " + " | ".join("---" for _ in engines) + " | --- | --- | --- | --- | --- |"]
    for r in results:
        if "error" in r or "skipped" in r:
            lines.append(f"| {r['config']} | {r['threads']} | {r['engine']} | {r.get('skipped') or r.get('error')} |")
            continue
        ratios = []
        for e in engines:
            peer = index.get((r["config"], r["threads"], e))
            ratios.append(f"{r['tokens_per_s'] / peer['tokens_per_s']:.2f}" if peer else "-")
        lines.append(f"| {r['config']} | {r['threads']} | {r['engine']} | {r['tokens_per_s']:.0f} | " + " | ".join(ratios)
                     + f" | {r['model_gflops']:.1f} | {r['step_s_median'] * 1e3:.0f} | {r['warmup_s']:.1f} | "
                     f"{r['peak_rss_mb']:.0f} | {_fmt(r.get('other_cores'), '{:.2f}')} |")
    spread = [r for r in ok if len(r.get("rounds_tokens_per_s", ())) > 1]
    if spread:
        lines += ["", "Each engine ran in alternating rounds; the median run is shown. All rounds (tokens/s):", ""]
        lines += [f"- {r['config']}, {r['threads']} thread(s), {r['engine']}: "
                  + " / ".join(f"{v:.0f}" for v in r["rounds_tokens_per_s"]) for r in spread]
    return "\n".join(lines)
