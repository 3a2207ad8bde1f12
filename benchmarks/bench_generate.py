"""Generation speed: CLLM fp32 and bf16 decoding against transformers' generate(), and the memory bandwidth.

    PYTHONPATH=python python benchmarks/bench_generate.py                      # GPT-2-124M shape, batch 1 and 8
    PYTHONPATH=python python benchmarks/bench_generate.py --rounds 5 --json out.json
    PYTHONPATH=python python benchmarks/bench_generate.py --batching --config small   # batched vs one at a time

A random model of a benchmark config (bench_common.CONFIGS; gpt2 with max_seq_len 1024 by default), greedy,
prompts of --prompt-len random tokens. Each round measures, in this order: the machine's read bandwidth (NumPy
sums over a 512 MiB array: one thread, and two threads on halves), then every engine at every batch size. The
report gives each quantity's median over the rounds:
  tokens/s      new tokens (batch x --new-tokens) per second of the whole generate call, prefill included
  decode/s      decode steps per second after the first token (CLLM: timed by generate's on_step)
  weight GB/s   decode steps/s x the weight bytes one step reads (every weight once: 4 bytes each in fp32, 2 in
                bf16), against the read bandwidth measured in the same run
  first s       the call's time before its decode steps (CLLM): the prefill, the first token and, for
                cllm-bf16, packing the bf16 weight copies
Engines: cllm (fp32), cllm-bf16 (Model.generate(decode_precision="bf16")), transformers (GPT2LMHeadModel with the same
weights, generate(do_sample=False, use_cache=True), float32, torch threads = --threads) when installed.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

import cllm
from bench_common import model_config, other_load, wait_for_idle


def read_bandwidth(threads: int, array: np.ndarray, reps: int = 5) -> float:
    """GB/s of NumPy sums over `array`, split into `threads` parts summed at once (NumPy releases the GIL)."""
    parts = np.array_split(array, threads)
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(reps):
            t = time.perf_counter()
            list(pool.map(np.sum, parts))
            best = min(best, time.perf_counter() - t)
    return array.nbytes / best / 1e9


def weight_bytes(model: cllm.Model, bytes_per_weight: int) -> int:
    """Bytes of the weights one decode step reads: every parameter but the position table (one row of it)."""
    return bytes_per_weight * sum(t["size"] for t in model.tensor_info if t["name"] != "wpe")


def run_cllm(model, prompts, new_tokens, precision):
    """(seconds for the call, seconds from the first token to the last): one generate call."""
    stamps = []
    t = time.perf_counter()
    model.generate(prompts, new_tokens, temperature=0.0, decode_precision=precision,
                   on_step=lambda seqs, toks: stamps.append(time.perf_counter()))
    return time.perf_counter() - t, stamps[-1] - stamps[0]


def transformers_model(model: cllm.Model):
    """GPT2LMHeadModel with the CLLM model's weights (Conv1D keeps CLLM's [in, out] layout), or None."""
    try:
        import torch
        import transformers
    except ImportError:
        return None
    from cllm.interop.hf import config_to_hf, hf_name

    cfg = transformers.GPT2Config(**config_to_hf(model.config, None, None))
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    state = {hf_name(k): torch.from_numpy(v.copy()) for k, v in model.parameters().items()}
    state["lm_head.weight"] = state["transformer.wte.weight"]
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all(".attn.bias" in m or ".attn.masked_bias" in m for m in missing), missing
    return hf


def run_transformers(hf, prompts, new_tokens):
    import torch

    ids = torch.tensor(np.asarray(prompts), dtype=torch.long)
    t = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=0)
    assert out.shape[1] == ids.shape[1] + new_tokens
    return time.perf_counter() - t, None


def measure(args) -> dict:
    cfg = model_config(args.config).replace(max_seq_len=args.max_seq_len)
    cllm.set_num_threads(args.threads)
    model = cllm.Model(cfg, seed=0)
    engines = [e for e in args.engines.split(",")]
    hf = transformers_model(model) if "transformers" in engines else None
    if "transformers" in engines and hf is None:
        print("transformers or torch not installed: engine transformers skipped")
        engines.remove("transformers")
    if hf is not None:
        import torch
        torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    rng = np.random.default_rng(0)
    prompts = {b: rng.integers(0, cfg.vocab_size, (b, args.prompt_len)) for b in batches}
    array = np.ones(512 << 18, dtype=np.float32)  # 512 MiB, far beyond the caches
    rounds = []
    for r in range(args.rounds):
        if args.wait_idle > 0:
            wait_for_idle(args.wait_idle)
        load = other_load(0.5)
        bandwidth = {str(n): read_bandwidth(n, array) for n in sorted({1, args.threads})}
        rec = {"other_cores_before": load, "bandwidth_gbs": bandwidth, "runs": []}
        for engine in engines:
            for b in batches:
                if engine == "transformers":
                    total, decode = run_transformers(hf, prompts[b], args.new_tokens)
                else:
                    total, decode = run_cllm(model, list(prompts[b]), args.new_tokens,
                                             "bf16" if engine == "cllm-bf16" else "fp32")
                run = {"engine": engine, "batch": b, "seconds": total, "tokens_per_s": b * args.new_tokens / total}
                if decode is not None:
                    steps = (args.new_tokens - 1) / decode
                    wb = weight_bytes(model, 2 if engine == "cllm-bf16" else 4)
                    run.update(decode_steps_per_s=steps, weight_gbs=steps * wb / 1e9)
                rec["runs"].append(run)
                print(f"round {r + 1}: {engine:12s} batch {b}: {run['tokens_per_s']:8.1f} tokens/s"
                      + (f", {run['weight_gbs']:5.1f} GB/s of weights" if decode is not None else ""), flush=True)
        print(f"round {r + 1}: other processes kept {load if load is not None else float('nan'):.1f} cores busy "
              f"before it; read bandwidth " +
              ", ".join(f"{n} thread(s) {v:.1f} GB/s" for n, v in rec["bandwidth_gbs"].items()), flush=True)
        rounds.append(rec)
    return {"what": "generation", "config": args.config, "max_seq_len": cfg.max_seq_len,
            "parameters": model.num_parameters, "threads": args.threads, "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens, "date": time.strftime("%Y-%m-%d %H:%M"), "build": cllm.build_info(),
            "rounds": rounds}


def summary(result: dict) -> list:
    """One row per (engine, batch): medians over the rounds."""
    rows = []
    keys = sorted({(r["engine"], r["batch"]) for rd in result["rounds"] for r in rd["runs"]},
                  key=lambda k: (k[1], k[0]))
    bw = statistics.median(rd["bandwidth_gbs"][str(result["threads"])] for rd in result["rounds"])
    for engine, batch in keys:
        runs = [r for rd in result["rounds"] for r in rd["runs"] if (r["engine"], r["batch"]) == (engine, batch)]
        row = {"engine": engine, "batch": batch,
               "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
               "rounds": [round(r["tokens_per_s"], 1) for r in runs]}
        if "weight_gbs" in runs[0]:
            row["weight_gbs"] = statistics.median(r["weight_gbs"] for r in runs)
            row["first_s"] = statistics.median(r["seconds"] - (result["new_tokens"] - 1) / r["decode_steps_per_s"]
                                               for r in runs)
            row["of_bandwidth"] = row["weight_gbs"] / bw
        rows.append(row)
    return rows


def report(result: dict) -> str:
    rows = summary(result)
    bw = {n: statistics.median(rd["bandwidth_gbs"][n] for rd in result["rounds"])
          for n in result["rounds"][0]["bandwidth_gbs"]}
    ref = {r["batch"]: r["tokens_per_s"] for r in rows if r["engine"] == "transformers"}
    lines = [f"{result['config']} ({result['parameters']:,} parameters, max_seq_len {result['max_seq_len']}), "
             f"{result['threads']} threads, prompts of {result['prompt_len']} tokens, {result['new_tokens']} new "
             f"tokens, greedy; medians of {len(result['rounds'])} alternating rounds",
             "read bandwidth (NumPy sum): " + ", ".join(f"{n} thread(s) {v:.1f} GB/s" for n, v in bw.items()),
             "cores other processes kept busy before each round: "
             + " / ".join("?" if rd.get("other_cores_before") is None else f"{rd['other_cores_before']:.1f}"
                          for rd in result["rounds"]), "",
             "| batch | engine | tokens/s | rounds | /transformers | weight GB/s | of read bandwidth | first s |",
             "| ---: | --- | ---: | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        vs = f"{r['tokens_per_s'] / ref[r['batch']]:.2f}" if r["batch"] in ref else ""
        gbs = f"{r['weight_gbs']:.1f}" if "weight_gbs" in r else ""
        of = f"{100 * r['of_bandwidth']:.0f} %" if "of_bandwidth" in r else ""
        first = f"{r['first_s']:.2f}" if "first_s" in r else ""
        lines.append(f"| {r['batch']} | {r['engine']} | {r['tokens_per_s']:.1f} | "
                     f"{' / '.join(map(str, r['rounds']))} | {vs} | {gbs} | {of} | {first} |")
    return "\n".join(lines)


def batching(args) -> None:
    """Batched generation against one prompt at a time: the same prompts, greedy, tokens per second each way."""
    cfg = model_config(args.config)
    cllm.set_num_threads(args.threads)
    model = cllm.Model(cfg, seed=0)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, cfg.vocab_size, int(n)) for n in rng.integers(4, cfg.max_seq_len // 4, args.prompts)]

    def best(f):
        times = []
        for _ in range(args.rounds):
            t = time.perf_counter()
            out = f()
            times.append(time.perf_counter() - t)
        return min(times), out

    t_one, one = best(lambda: [model.generate(p, args.new_tokens, temperature=0.0) for p in prompts])
    t_batch, batch = best(lambda: model.generate(prompts, args.new_tokens, temperature=0.0))
    same = all(np.array_equal(a, b) for a, b in zip(one, batch))
    n = args.prompts * args.new_tokens
    print(f"{args.config} ({model.num_parameters:,} parameters), {args.prompts} prompts x {args.new_tokens} tokens, "
          f"{cllm.get_num_threads()} threads")
    print(f"one at a time: {t_one:.3f} s ({n / t_one:.1f} tokens/s)")
    print(f"batched:       {t_batch:.3f} s ({n / t_batch:.1f} tokens/s), {t_one / t_batch:.2f}x; "
          f"equal tokens: {same}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="gpt2", help="a bench_common config, gpt2 architecture (default: gpt2)")
    ap.add_argument("--max-seq-len", type=int, default=1024, help="the model's context (default: 1024, GPT-2's)")
    ap.add_argument("--threads", type=int, default=2, help="threads for every engine (default: 2)")
    ap.add_argument("--batches", default="1,8", help="batch sizes (default: 1,8)")
    ap.add_argument("--engines", default="cllm,cllm-bf16,transformers", help="(default: all three)")
    ap.add_argument("--prompt-len", type=int, default=16, help="tokens per prompt (default: 16)")
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens generated per prompt (default: 64)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians reported (default: 3)")
    ap.add_argument("--json", metavar="PATH", help="write every measurement here")
    ap.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                    help="before each round wait up to SECONDS for other processes to use < 0.3 cores (default 0)")
    ap.add_argument("--report", metavar="JSON", help="instead: print the table of a file written by --json")
    ap.add_argument("--batching", action="store_true",
                    help="instead: batched generation against one prompt at a time (--prompts prompts, best of "
                         "--rounds)")
    ap.add_argument("--prompts", type=int, default=8, help="--batching: prompts in the batch (default: 8)")
    args = ap.parse_args()
    if args.batching:
        return batching(args)
    if args.report:
        with open(args.report) as f:
            return print(report(json.load(f)))
    result = measure(args)
    print()
    print(report(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
