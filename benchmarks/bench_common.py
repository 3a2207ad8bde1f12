"""What the benchmark scripts share: the configs, their FLOP arithmetic, and how busy the machine is.

Imported by bench_train.py (the driver), bench_child.py (one measurement in a fresh process), bench_mpi.py and
torch_gpt2.py.
The model sizes come from CLLM itself (cllm.core.model.parameter_shapes), not from a second copy of the architecture.
"""
from __future__ import annotations

import os
import sys
import time

# name -> shape and default (steps, warmup). GPT-2 configs: ff_dim = 4 * C. Llama configs (arch "llama"): KV K/V
# heads, SwiGLU hidden size F, tied head.
CONFIGS = {
    "tiny": dict(V=256, T=128, C=128, L=4, H=4, B=16, steps=20, warmup=3),
    "small": dict(V=8192, T=256, C=384, L=6, H=6, B=8, steps=6, warmup=2),
    "gpt2": dict(V=50257, T=256, C=768, L=12, H=12, B=4, steps=1, warmup=1),
    # long contexts at the small width, the same B*T = 2048 tokens per step
    "small-t1024": dict(V=8192, T=1024, C=384, L=6, H=6, B=2, steps=4, warmup=1),
    "small-t2048": dict(V=8192, T=2048, C=384, L=6, H=6, B=1, steps=4, warmup=1),
    "tiny-llama": dict(V=256, T=128, C=128, L=4, H=4, KV=2, F=344, B=16, steps=20, warmup=3, arch="llama"),
    "llama": dict(V=8192, T=256, C=384, L=6, H=6, KV=2, F=1024, B=8, steps=6, warmup=2, arch="llama"),
}
ENGINES = ("cllm", "cllm-bf16", "cllm-bf16-dot", "torch", "torch-compile", "torch-bf16", "torch-bf16-compile")
# cllm-bf16-dot: cllm-bf16 on the avx512bf16 kernels (vdpbf16ps) whatever the automatic choice: its peer where the
# dispatcher runs bf16 on the FMAs instead (docs/portability.md)
ENGINE_ISA = {"cllm-bf16-dot": "avx512bf16"}
FLOP_FORMULA = "6*N + 6*L*T*C per token (N = parameters without wpe; causal attention)"
LLAMA_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                 "mlp.up_proj", "mlp.down_proj")  # nn.Linear weights [out, in]
RESULT_TAG = "CLLM_BENCH_RESULT "
# Set on some machines to steer OpenBLAS; they can slow NumPy down, so the children run without them.
BLAS_ENV_UNSET = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # the block's linear layers


# ---- shapes and arithmetic ---------------------------------------------------------------------------
def model_config(name: str):
    from cllm import ModelConfig

    c = CONFIGS[name]
    if c.get("arch") == "llama":
        return ModelConfig(architecture="llama", vocab_size=c["V"], max_seq_len=c["T"], embedding_dim=c["C"],
                           num_layers=c["L"], num_heads=c["H"], num_kv_heads=c["KV"], ff_dim=c["F"])
    return ModelConfig(vocab_size=c["V"], max_seq_len=c["T"], embedding_dim=c["C"], num_layers=c["L"],
                       num_heads=c["H"], ff_dim=4 * c["C"])


def param_count(name: str) -> int:
    """Parameters of the config (with wpe), as CLLM lays them out (the Hugging Face GPT-2 layout)."""
    from cllm.core.model import parameter_count

    return parameter_count(model_config(name), padded=False)


def flops_per_token(name: str) -> float:
    from cllm.core.model import parameter_shapes

    c = CONFIGS[name]
    T, C = parameter_shapes(model_config(name)).get("wpe", (0, 0))
    n = param_count(name) - T * C  # wpe is a lookup
    return 6.0 * n + 6.0 * c["L"] * c["T"] * c["C"]


def linear_shapes(name: str):
    """(layer, N rows, IC, OC) of every distinct matmul in a training step: the block's four linears (CLLM's
    weights are [in, out]) and the tied LM head (done here as a [C, V] linear, the same FLOPs as the model's
    lnf @ wte^T)."""
    from cllm.core.model import parameter_shapes

    c = CONFIGS[name]
    N = c["B"] * c["T"]
    shapes = parameter_shapes(model_config(name))
    if c.get("arch") == "llama":  # as [in, out] products of the same FLOPs
        V, C = shapes["embed_tokens.weight"]
        return ([(layer, N, *shapes[f"layers.0.{layer}.weight"][::-1]) for layer in LLAMA_LINEARS]
                + [("lm_head", N, C, V)])
    V, C = shapes["wte"]
    return [(layer, N, *shapes[f"h.0.{layer}.weight"]) for layer in LINEARS] + [("lm_head", N, C, V)]


# ---- how busy this process and the machine are --------------------------------------------------------
def peak_rss_mb() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024.0 * 1024.0) if sys.platform == "darwin" else r / 1024.0  # bytes on macOS, KiB on Linux


def _cpu_seconds() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def machine_busy_seconds():
    """CPU-seconds all processes spent busy so far (Linux /proc/stat), or None elsewhere."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        ticks = os.sysconf("SC_CLK_TCK")
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
        return (user + nice + system + irq + softirq + steal) / ticks
    except (OSError, ValueError, IndexError):
        return None


class LoadMeter:
    """Measures, over a region, this process's CPU use and how many cores other processes kept busy: a
    benchmark sharing its cores with other work is slower for reasons that are not its own."""

    def __enter__(self):
        self.wall0, self.cpu0, self.busy0 = time.perf_counter(), _cpu_seconds(), machine_busy_seconds()
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self.wall0
        cpu = _cpu_seconds() - self.cpu0
        self.own_cores = cpu / wall if wall > 0 else 0.0
        busy = machine_busy_seconds()
        self.other_cores = None if busy is None or self.busy0 is None else max(0.0, (busy - self.busy0 - cpu) / wall)
        return False


def other_load(sample_s: float = 1.0):
    """Cores kept busy by other processes over the next sample_s seconds (this process sleeps meanwhile)."""
    b0 = machine_busy_seconds()
    if b0 is None:
        return None
    time.sleep(sample_s)
    b1 = machine_busy_seconds()
    return max(0.0, (b1 - b0) / sample_s)


def wait_for_idle(max_wait_s: float, threshold: float = 0.3):
    """Waits (up to max_wait_s) until other processes use fewer than `threshold` cores; returns that load."""
    deadline = time.monotonic() + max_wait_s
    while True:
        load = other_load()
        if load is None or load < threshold or time.monotonic() >= deadline:
            return load
