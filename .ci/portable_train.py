"""Trains a tiny model for a few steps and prints {"variant": ..., "losses": [...]} as JSON: run by .ci/portable
natively and under QEMU emulating older CPUs, whose losses must equal the native run's."""
import json

import numpy as np

import cllm

cllm.set_num_threads(1)
config = cllm.ModelConfig(vocab_size=256, max_seq_len=32, embedding_dim=64, num_layers=2, num_heads=4, ff_dim=256)
losses = []
for precision in ("fp32", "bf16"):
    model = cllm.Model(config, seed=1, precision=precision)
    opt = cllm.AdamW(model, lr=1e-3)
    tokens = np.random.default_rng(0).integers(0, 256, (4, 33)).astype(np.int32)
    for _ in range(5):
        losses.append(float(model.forward_backward(tokens[:, :-1], tokens[:, 1:])))
        cllm.clip_grad_norm(model, 1.0)
        opt.step()
sample = model.generate(tokens[0, :8], max_new_tokens=8, temperature=0).tolist()
print(json.dumps({"variant": cllm.build_info()["variant"], "losses": losses, "sample": sample}))
