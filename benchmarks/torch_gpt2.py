"""Checks that the PyTorch GPT-2 the benchmark races against is the same model as CLLM's.

    python benchmarks/torch_gpt2.py [--config tiny|small|gpt2] [--steps 3] [--threads 2]

The model itself lives in cllm.bench.build_torch_gpt2 (so the installed `cllm bench` has it, torch imported
only there). This script copies a CLLM model's parameters into it, then compares on the same batch:
the loss, every gradient (CLLM names and [in, out] layouts), and the losses of a few training steps of
forward + backward + clip_grad_norm(1.0) + AdamW(lr 3e-4, betas (0.9, 0.95), eps 1e-8, weight decay 0.1 on
the 2-D weights: wte, wpe and the linear weights, as CLLM does) on both sides, and the parameters after them.
Exits 1 when they disagree beyond float32 round-off.
Needs torch (`pip install torch==2.13.0`); nothing in the package or the tests does.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np


def main(argv=None) -> int:
    import torch

    import cllm
    from cllm import bench

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", choices=list(bench.CONFIGS), default="tiny")
    ap.add_argument("--steps", type=int, default=3, help="training steps compared after the gradient check")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=None, help="batch size (default: the config's)")
    args = ap.parse_args(argv)

    cllm.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    cfg = bench.model_config(args.config)
    c = bench.CONFIGS[args.config]
    B = args.batch or c["B"]
    model = cllm.Model(cfg, seed=0)
    params = model.parameters()
    decay = {t["name"]: t["decay"] for t in model.tensor_info}
    tmodel = bench.build_torch_gpt2(cfg.vocab_size, cfg.max_seq_len, cfg.embedding_dim, cfg.num_layers,
                                    cfg.num_heads, cfg.ff_dim)
    bench.load_cllm_parameters(tmodel, params)
    tparams = dict(tmodel.named_parameters())

    rng = np.random.default_rng(1)
    batches = []
    for _ in range(4):  # the training steps cycle through a few batches, as the benchmark does
        seq = rng.integers(0, cfg.vocab_size, size=(B, cfg.max_seq_len + 1))
        batches.append((seq[:, :-1].astype(np.int32), seq[:, 1:].astype(np.int32)))
    x, y = batches[0]
    tx, ty = torch.from_numpy(x).long(), torch.from_numpy(y).long()

    ok = True
    loss_c = model.forward_backward(x, y)
    loss_t = tmodel(tx, ty)
    loss_t.backward()
    print(f"config {args.config}: B={B} T={cfg.max_seq_len}, {model.num_parameters:,} parameters")
    dl = abs(loss_c - loss_t.item())
    print(f"loss      cllm {loss_c:.6f}  torch {loss_t.item():.6f}  |diff| {dl:.2e}")
    ok &= dl <= 1e-4 * abs(loss_t.item()) + 1e-6

    grads_c = model.gradients()
    grads_t = bench.torch_grads_as_cllm(tmodel, grads_c)
    worst_name, worst = None, 0.0
    for name, gc in grads_c.items():
        gt = grads_t[name]
        scale = float(np.abs(gt).max()) + 1e-12
        err = float(np.abs(gc - gt).max()) / scale
        if err > worst:
            worst_name, worst = name, err
    print(f"gradients {len(grads_c)} tensors, worst max|diff|/max|grad| = {worst:.2e} ({worst_name})")
    ok &= worst <= 1e-3

    # a few training steps on both sides from the same start
    opt_c = cllm.AdamW(model, lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    groups = [
        {"params": [tparams[bench._torch_name(n)] for n in params if decay[n]], "weight_decay": 0.1},
        {"params": [tparams[bench._torch_name(n)] for n in params if not decay[n]], "weight_decay": 0.0},
    ]
    opt_t = torch.optim.AdamW(groups, lr=3e-4, betas=(0.9, 0.95), eps=1e-8)
    for step in range(args.steps):
        if step > 0:
            x, y = batches[step % len(batches)]
            tx, ty = torch.from_numpy(x).long(), torch.from_numpy(y).long()
            loss_c = model.forward_backward(x, y)
            tmodel.zero_grad(set_to_none=True)
            loss_t = tmodel(tx, ty)
            loss_t.backward()
        norm_c = cllm.clip_grad_norm(model, 1.0)
        norm_t = float(torch.nn.utils.clip_grad_norm_(tmodel.parameters(), 1.0))
        opt_c.step()
        opt_t.step()
        d = abs(loss_c - loss_t.item())
        print(f"step {step}: loss cllm {loss_c:.6f} torch {loss_t.item():.6f} |diff| {d:.2e}; "
              f"grad norm cllm {norm_c:.5f} torch {norm_t:.5f}")
        ok &= d <= 1e-3 * abs(loss_t.item()) and abs(norm_c - norm_t) <= 1e-3 * norm_t + 1e-6
    pdiff = 0.0
    for n, p in params.items():
        tp = tparams[bench._torch_name(n)].detach().numpy()
        tp = tp.T if n.endswith(".weight") and tp.ndim == 2 else tp
        pdiff = max(pdiff, float(np.abs(p - tp).max()))
    print(f"parameters after {args.steps} steps: max|diff| = {pdiff:.2e}")
    ok &= pdiff <= 1e-4
    print("EQUIVALENT" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
