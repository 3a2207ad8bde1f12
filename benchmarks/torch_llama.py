"""The PyTorch Llama the benchmark races against (build_torch_llama), and a check that it is the same model as CLLM's.

    python benchmarks/torch_llama.py [--config tiny-llama|llama] [--steps 30] [--threads 2]

The same check as torch_gpt2.py (its functions, with this model): the loss and every gradient of one step, then
`steps` steps of clip_grad_norm(1.0) + AdamW on both sides, losses within 1e-3 and the parameters after them.
Exits 1 when they disagree. Needs torch; importing this module does not.
"""
from __future__ import annotations

import argparse
import sys


def build_torch_llama(config, seed=0):
    """CLLM's llama blocks in PyTorch eager: RMSNorm, RoPE (rotate_half), grouped-query causal SDPA, SwiGLU, no
    biases, tied or untied head. Parameter names are CLLM's (LlamaForCausalLM's without "model."), nn.Linear
    weights [out, in] as CLLM stores them, so parameters copy across unchanged (load_cllm_parameters)."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    c = config
    C, H, KV, hs, T = c.embedding_dim, c.num_heads, c.num_kv_heads, c.head_dim, c.max_seq_len
    inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, hs, 2, dtype=torch.float64) / hs))
    angle = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq[None, :]
    cos, sin = torch.cat([angle.cos()] * 2, -1).float(), torch.cat([angle.sin()] * 2, -1).float()

    def rope(x):  # x [B, heads, T, hs]
        t = x.shape[2]
        x1, x2 = x[..., :hs // 2], x[..., hs // 2:]
        return x * cos[:t] + torch.cat([-x2, x1], -1) * sin[:t]

    class RMSNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(C))

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + c.rms_norm_eps) * self.weight

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = nn.Linear(C, H * hs, bias=False)
            self.k_proj = nn.Linear(C, KV * hs, bias=False)
            self.v_proj = nn.Linear(C, KV * hs, bias=False)
            self.o_proj = nn.Linear(C, C, bias=False)

        def forward(self, x):
            B, t, _ = x.shape
            q = rope(self.q_proj(x).view(B, t, H, hs).transpose(1, 2))
            k = rope(self.k_proj(x).view(B, t, KV, hs).transpose(1, 2))
            v = self.v_proj(x).view(B, t, KV, hs).transpose(1, 2)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=KV != H)
            return self.o_proj(y.transpose(1, 2).reshape(B, t, C))

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj = nn.Linear(C, c.ff_dim, bias=False)
            self.up_proj = nn.Linear(C, c.ff_dim, bias=False)
            self.down_proj = nn.Linear(c.ff_dim, C, bias=False)

        def forward(self, x):
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.input_layernorm = RMSNorm()
            self.self_attn = Attention()
            self.post_attention_layernorm = RMSNorm()
            self.mlp = MLP()

        def forward(self, x):
            x = x + self.self_attn(self.input_layernorm(x))
            return x + self.mlp(self.post_attention_layernorm(x))

    class Llama(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_tokens = nn.Embedding(c.vocab_size, C)
            self.layers = nn.ModuleList(Block() for _ in range(c.num_layers))
            self.norm = RMSNorm()
            if not c.tie_embeddings:
                self.lm_head = nn.Linear(C, c.vocab_size, bias=False)

        def forward(self, idx, targets=None):
            x = self.embed_tokens(idx)
            for block in self.layers:
                x = block(x)
            head = self.embed_tokens.weight if c.tie_embeddings else self.lm_head.weight
            logits = F.linear(self.norm(x), head)
            if targets is None:
                return logits
            return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))

    torch.manual_seed(seed)
    return Llama()


def load_cllm_parameters(tmodel, params: dict) -> None:
    """Copy CLLM parameters (name -> array) into build_torch_llama's model: the same names and layouts."""
    import torch

    tparams = dict(tmodel.named_parameters())
    assert set(tparams) == set(params), sorted(set(tparams) ^ set(params))
    with torch.no_grad():
        for name, arr in params.items():
            tparams[name].copy_(torch.from_numpy(arr.copy()))


def main(argv=None) -> int:
    import numpy as np
    import torch

    import bench_common as bench
    import cllm
    import torch_gpt2

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    llamas = [k for k, v in bench.CONFIGS.items() if v.get("arch") == "llama"]
    ap.add_argument("--config", choices=llamas, default="tiny-llama")
    ap.add_argument("--steps", type=int, default=30, help="training steps compared after the gradient check")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    cllm.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    cfg = bench.model_config(args.config)
    B = bench.CONFIGS[args.config]["B"]
    model = cllm.Model(cfg, seed=0)
    tmodel = build_torch_llama(cfg)
    load_cllm_parameters(tmodel, model.parameters())
    ok = check_equivalence(model, tmodel, B, args.steps, torch_gpt2)
    print("EQUIVALENT" if ok else "MISMATCH")
    return 0 if ok else 1


def check_equivalence(model, tmodel, B: int, steps: int, torch_gpt2) -> bool:
    """torch_gpt2's gradient and training checks on this pair of models (the names map one to one)."""
    import numpy as np

    rng = np.random.default_rng(1)
    cfg = model.config
    batches = []
    for _ in range(4):
        seq = rng.integers(0, cfg.vocab_size, size=(B, cfg.max_seq_len + 1))
        batches.append((seq[:, :-1].astype(np.int32), seq[:, 1:].astype(np.int32)))
    same = (lambda name: name, lambda name, arr: arr)  # CLLM's names and layouts already
    ok, loss_c, loss_t = torch_gpt2._first_step_agrees(model, tmodel, *batches[0], mapping=same)
    return ok & torch_gpt2._training_agrees(model, tmodel, batches, steps, loss_c, loss_t, mapping=same)


if __name__ == "__main__":
    sys.exit(main())
