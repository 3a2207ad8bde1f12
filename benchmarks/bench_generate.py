"""Batched generation against one prompt at a time: the same prompts, greedy, tokens per second each way.

    PYTHONPATH=python python benchmarks/bench_generate.py --config small --prompts 8 --new-tokens 64

A random model of a benchmark config (bench_common.CONFIGS); prompts of different lengths. The batch decodes
its rows together (the training GEMMs with N = rows), so the weights are read once per step for all of them.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

import cllm
from bench_common import model_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="small", help="tiny, small or gpt2 (default: small)")
    ap.add_argument("--prompts", type=int, default=8, help="prompts in the batch (default: 8)")
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens generated per prompt (default: 64)")
    ap.add_argument("--repeat", type=int, default=3, help="best of this many runs (default: 3)")
    args = ap.parse_args()
    cfg = model_config(args.config)
    model = cllm.Model(cfg, seed=0)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, cfg.vocab_size, int(n)) for n in rng.integers(4, cfg.max_seq_len // 4, args.prompts)]

    def best(f):
        times = []
        for _ in range(args.repeat):
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


if __name__ == "__main__":
    main()
