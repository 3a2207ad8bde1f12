"""The PyTorch GPT-2 the benchmark races against (build_torch_gpt2), and a check that it is the same model as CLLM's.

    python benchmarks/torch_gpt2.py [--config tiny|small|gpt2] [--steps 3] [--threads 2]

The check copies a CLLM model's parameters into the torch model, then compares on the same batch:
the loss, every gradient (CLLM names and [in, out] layouts), and the losses of a few training steps of
forward + backward + clip_grad_norm(1.0) + AdamW(lr 3e-4, betas (0.9, 0.95), eps 1e-8, weight decay 0.1 on
the 2-D weights: wte, wpe and the linear weights, as CLLM does) on both sides, and the parameters after them.
Exits 1 when they disagree beyond float32 round-off.
Needs torch (`pip install torch==2.13.0`); nothing in the package or the tests does (torch is imported inside
the functions, so that importing this module does not need it).
"""
from __future__ import annotations

import argparse
import math
import sys

import numpy as np


def build_torch_gpt2(vocab_size, max_seq_len, embedding_dim, num_layers, num_heads, ff_dim, seed=0):
    """The same GPT-2 in PyTorch: pre-LN, causal SDPA attention, GELU (tanh), tied LM head, GPT-2 init.
    Module names follow the Hugging Face GPT-2 state dict, as CLLM's parameter names do (nn.Linear stores
    its weight [out, in], CLLM [in, out]: see load_cllm_parameters)."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    C, H = embedding_dim, num_heads

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_attn = nn.Linear(C, 3 * C)
            self.c_proj = nn.Linear(C, C)

        def forward(self, x):
            B, T, _ = x.shape
            q, k, v = self.c_attn(x).split(C, dim=2)
            q, k, v = (t.view(B, T, H, C // H).transpose(1, 2) for t in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # scale 1/sqrt(head_dim)
            return self.c_proj(y.transpose(1, 2).reshape(B, T, C))

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_fc = nn.Linear(C, ff_dim)
            self.c_proj = nn.Linear(ff_dim, C)

        def forward(self, x):
            return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1 = nn.LayerNorm(C, eps=1e-5)
            self.attn = Attention()
            self.ln_2 = nn.LayerNorm(C, eps=1e-5)
            self.mlp = MLP()

        def forward(self, x):
            x = x + self.attn(self.ln_1(x))
            return x + self.mlp(self.ln_2(x))

    class GPT2(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(vocab_size, C)
            self.wpe = nn.Embedding(max_seq_len, C)
            self.h = nn.ModuleList(Block() for _ in range(num_layers))
            self.ln_f = nn.LayerNorm(C, eps=1e-5)

        def forward(self, idx, targets=None):
            T = idx.shape[1]
            x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
            for block in self.h:
                x = block(x)
            logits = F.linear(self.ln_f(x), self.wte.weight)  # tied head
            if targets is None:
                return logits
            return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))

    torch.manual_seed(seed)
    model = GPT2()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith(".bias"):
                p.zero_()
            elif ".ln_" in pname or pname.startswith("ln_f"):
                p.fill_(1.0)
            elif pname.endswith("c_proj.weight"):
                p.normal_(0.0, 0.02 / math.sqrt(2 * num_layers))
            else:
                p.normal_(0.0, 0.02)
    return model


def torch_name(cllm_name: str) -> str:
    """The torch parameter name of a CLLM parameter (the embeddings are modules there: wte -> wte.weight)."""
    return cllm_name + ".weight" if cllm_name in ("wte", "wpe") else cllm_name


def as_cllm_layout(cllm_name: str, arr):
    """A torch parameter (or gradient) in CLLM's layout: nn.Linear's [out, in] weights become Conv1D's [in, out]."""
    return arr.T if cllm_name.endswith(".weight") and arr.ndim == 2 else arr


# How a torch model's parameters map to CLLM's: (name, layout). torch_llama.py's model needs neither change.
GPT2_MAPPING = (torch_name, as_cllm_layout)


def load_cllm_parameters(tmodel, params: dict) -> None:
    """Copy CLLM parameters (name -> array, linear weights [in, out]) into build_torch_gpt2's model."""
    import torch

    tparams = dict(tmodel.named_parameters())
    with torch.no_grad():
        for name, arr in params.items():
            t = tparams[torch_name(name)]
            src = torch.from_numpy(arr.copy())
            if name.endswith(".weight") and arr.ndim == 2:
                src = src.t()
            t.copy_(src)


def torch_grads_as_cllm(tmodel, names, mapping=GPT2_MAPPING) -> dict:
    """The torch model's gradients under CLLM names and layouts (GPT-2: linear weights [in, out])."""
    to_torch, as_cllm = mapping
    tparams = dict(tmodel.named_parameters())
    return {name: as_cllm(name, tparams[to_torch(name)].grad.detach().numpy()) for name in names}


# ---- the equivalence check ---------------------------------------------------------------------------------
def _first_step_agrees(model, tmodel, x, y, mapping=GPT2_MAPPING):
    """Loss and every gradient of one forward + backward on both sides; (agrees, cllm loss, torch loss)."""
    import torch

    loss_c = model.forward_backward(x, y)
    loss_t = tmodel(torch.from_numpy(x).long(), torch.from_numpy(y).long())
    loss_t.backward()
    dl = abs(loss_c - loss_t.item())
    print(f"loss      cllm {loss_c:.6f}  torch {loss_t.item():.6f}  |diff| {dl:.2e}")
    ok = dl <= 1e-4 * abs(loss_t.item()) + 1e-6
    grads_c = model.gradients()
    grads_t = torch_grads_as_cllm(tmodel, grads_c, mapping)
    worst_name, worst = None, 0.0
    for name, gc in grads_c.items():
        gt = grads_t[name]
        scale = float(np.abs(gt).max()) + 1e-12
        err = float(np.abs(gc - gt).max()) / scale
        if err > worst:
            worst_name, worst = name, err
    print(f"gradients {len(grads_c)} tensors, worst max|diff|/max|grad| = {worst:.2e} ({worst_name})")
    return ok and worst <= 1e-3, loss_c, loss_t


def _training_agrees(model, tmodel, batches, steps: int, loss_c, loss_t, mapping=GPT2_MAPPING) -> bool:
    """`steps` steps of clip + AdamW on both sides from the same start (the first on the gradients already
    computed): losses, gradient norms and, at the end, the parameters."""
    import torch

    import cllm

    to_torch, as_cllm = mapping
    params = model.parameters()
    decay = {t["name"]: t["decay"] for t in model.tensor_info}
    tparams = dict(tmodel.named_parameters())
    opt_c = cllm.AdamW(model, lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    groups = [
        {"params": [tparams[to_torch(n)] for n in params if decay[n]], "weight_decay": 0.1},
        {"params": [tparams[to_torch(n)] for n in params if not decay[n]], "weight_decay": 0.0},
    ]
    opt_t = torch.optim.AdamW(groups, lr=3e-4, betas=(0.9, 0.95), eps=1e-8)
    ok = True
    for step in range(steps):
        if step > 0:
            x, y = batches[step % len(batches)]
            loss_c = model.forward_backward(x, y)
            tmodel.zero_grad(set_to_none=True)
            loss_t = tmodel(torch.from_numpy(x).long(), torch.from_numpy(y).long())
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
        tp = as_cllm(n, tparams[to_torch(n)].detach().numpy())
        pdiff = max(pdiff, float(np.abs(p - tp).max()))
    print(f"parameters after {steps} steps: max|diff| = {pdiff:.2e}")
    return ok and pdiff <= 1e-4


def main(argv=None) -> int:
    import torch

    import bench_common as bench
    import cllm

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", choices=[k for k, v in bench.CONFIGS.items() if v.get("arch") != "llama"],
                    default="tiny")
    ap.add_argument("--steps", type=int, default=3, help="training steps compared after the gradient check")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=None, help="batch size (default: the config's)")
    args = ap.parse_args(argv)

    cllm.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    cfg = bench.model_config(args.config)
    B = args.batch or bench.CONFIGS[args.config]["B"]
    model = cllm.Model(cfg, seed=0)
    tmodel = build_torch_gpt2(cfg.vocab_size, cfg.max_seq_len, cfg.embedding_dim, cfg.num_layers, cfg.num_heads,
                              cfg.ff_dim)
    load_cllm_parameters(tmodel, model.parameters())

    rng = np.random.default_rng(1)
    batches = []
    for _ in range(4):  # the training steps cycle through a few batches, as the benchmark does
        seq = rng.integers(0, cfg.vocab_size, size=(B, cfg.max_seq_len + 1))
        batches.append((seq[:, :-1].astype(np.int32), seq[:, 1:].astype(np.int32)))
    print(f"config {args.config}: B={B} T={cfg.max_seq_len}, {model.num_parameters:,} parameters")
    ok, loss_c, loss_t = _first_step_agrees(model, tmodel, *batches[0])
    ok &= _training_agrees(model, tmodel, batches, args.steps, loss_c, loss_t)
    print("EQUIVALENT" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
