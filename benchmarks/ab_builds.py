"""A/B of the training step between two builds of CLLM, in alternating rounds (this machine's speed drifts).

    python benchmarks/ab_builds.py OLD_PYTHONPATH NEW_PYTHONPATH [--rounds 6] [--precision fp32|bf16]

Each round runs both builds, each in its own process (order alternating), on the "small" config
(V=8192 T=256 C=384 L=6 H=6 B=8, 2 threads): 2 warm-up steps, then the median of 8 steps of
forward_backward + clip_grad_norm + AdamW. Prints each build's median over the rounds and NEW/OLD time.
A PYTHONPATH is a directory holding a built `cllm` (e.g. a checkout's python/ after a dev build).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, sys, time
import numpy as np, cllm
cllm.set_num_threads(2)
cfg = cllm.ModelConfig(vocab_size=8192, max_seq_len=256, embedding_dim=384, num_layers=6, num_heads=6, ff_dim=1536)
model = cllm.Model(cfg, seed=0, precision=sys.argv[1])
opt = cllm.AdamW(model, lr=3e-4)
x = np.random.default_rng(0).integers(0, 8192, (8, 256)).astype(np.int32)
y = np.roll(x, -1, 1)
times = []
for i in range(10):
    t = time.perf_counter()
    model.forward_backward(x, y)
    cllm.clip_grad_norm(model, 1.0)
    opt.step()
    if i >= 2:
        times.append(time.perf_counter() - t)
print(json.dumps(sorted(times)[len(times) // 2]))
"""


def step_time(pythonpath: str, precision: str) -> float:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(pythonpath), OMP_NUM_THREADS="2")
    r = subprocess.run([sys.executable, "-c", CHILD, precision], env=env, capture_output=True, text=True,
                       cwd="/", timeout=600)
    if r.returncode:
        sys.exit(f"{pythonpath}: the step failed:\n{r.stderr.strip()}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    args = ap.parse_args()
    times = {args.old: [], args.new: []}
    for r in range(args.rounds):
        for build in (args.old, args.new) if r % 2 == 0 else (args.new, args.old):
            times[build].append(step_time(build, args.precision))
            print(f"round {r + 1}: {build}: {times[build][-1] * 1e3:.1f} ms", flush=True)
    old, new = statistics.median(times[args.old]), statistics.median(times[args.new])
    print(f"{args.precision}: old {old * 1e3:.1f} ms, new {new * 1e3:.1f} ms per step; new/old time {new / old:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
