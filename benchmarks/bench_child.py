"""One benchmark measurement in this fresh process (started by bench_train.py, one per engine, config and
threads, so that peak RSS is its own and no engine inherits another's thread pools or caches):

    python benchmarks/bench_child.py SPEC_JSON

SPEC_JSON: {"mode": "train", "config", "threads", "engine", "steps", "warmup"} or {"mode": "matmul", "config",
"threads"}. Prints one line, RESULT_TAG followed by the result as JSON.
"""
from __future__ import annotations

import json
import statistics
import sys
import time

from bench_common import (CONFIGS, RESULT_TAG, LoadMeter, flops_per_token, linear_shapes, model_config, param_count,
                          peak_rss_mb)


# ---- timing helpers ----------------------------------------------------------------------------------
def _median_time(fn, min_reps=3, min_time=0.3, max_reps=50):
    fn()  # warmup
    times = []
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if (len(times) >= min_reps and time.perf_counter() - start >= min_time) or len(times) >= max_reps:
            return statistics.median(times), min(times)


def _batches(name: str, n: int, seed: int = 0):
    import numpy as np

    c = CONFIGS[name]
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        seq = rng.integers(0, c["V"], size=(c["B"], c["T"] + 1), dtype=np.int64)
        out.append((np.ascontiguousarray(seq[:, :-1], dtype=np.int32), np.ascontiguousarray(seq[:, 1:], dtype=np.int32)))
    return out


# ---- engines (each builds a model and returns a step function: (x, y) numpy -> loss) -----------------
def _make_cllm(name: str, threads: int, precision: str):
    import cllm

    cllm.set_num_threads(threads)
    cfg = model_config(name)
    model = cllm.Model(cfg, seed=0, precision=precision)
    opt = cllm.AdamW(model, lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)

    def step(x, y):
        loss = model.forward_backward(x, y)
        cllm.clip_grad_norm(model, 1.0)
        opt.step()
        return float(loss)

    info = {"precision": precision, "cllm_threads": cllm.get_num_threads()}
    return step, info


def _make_torch(name: str, threads: int, compiled: bool, bf16: bool):
    """PyTorch on the same model; bf16: its own mixed precision, autocast to bfloat16 around the forward (fp32
    master weights, as CLLM's bf16), the fair peer of cllm-bf16."""
    import torch

    import torch_gpt2
    import torch_llama

    torch.set_num_threads(threads)
    cfg = model_config(name)
    if cfg.architecture == "llama":
        model, load_cllm_parameters = torch_llama.build_torch_llama(cfg), torch_llama.load_cllm_parameters
    else:
        model = torch_gpt2.build_torch_gpt2(cfg.vocab_size, cfg.max_seq_len, cfg.embedding_dim, cfg.num_layers,
                                            cfg.num_heads, cfg.ff_dim)
        load_cllm_parameters = torch_gpt2.load_cllm_parameters
    # start from CLLM's initial weights: both engines then train the same model from the same point, and
    # their loss columns agree to float rounding (a check that the comparison is like for like)
    import cllm

    init = cllm.Model(cfg, seed=0)
    load_cllm_parameters(model, init.parameters())
    del init
    # weight decay on the 2-D weights (wte, wpe, linear weights), as cllm.AdamW does
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    kw = dict(lr=3e-4, betas=(0.9, 0.95), eps=1e-8)
    try:  # the fused CPU AdamW is PyTorch's fastest; older versions have only foreach
        opt, impl = torch.optim.AdamW(groups, fused=True, **kw), "fused"
    except (RuntimeError, TypeError, ValueError):
        opt, impl = torch.optim.AdamW(groups, foreach=True, **kw), "foreach"
    fwd = torch.compile(model) if compiled else model

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = fwd(torch.from_numpy(x).long(), torch.from_numpy(y).long())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return float(loss.item())

    info = {"torch_version": torch.__version__, "torch_threads": torch.get_num_threads(), "adamw": impl,
            "precision": "autocast-bf16" if bf16 else "fp32"}
    return step, info


# ---- measurements ------------------------------------------------------------------------------------
def _child_train(spec: dict) -> dict:
    name, engine, threads = spec["config"], spec["engine"], spec["threads"]
    if engine == "cllm":
        step, info = _make_cllm(name, threads, "fp32")
    elif engine in ("cllm-bf16", "cllm-bf16-dot"):  # -dot: the parent set CLLM_ISA=avx512bf16
        step, info = _make_cllm(name, threads, "bf16")
    elif engine in ("torch", "torch-compile", "torch-bf16", "torch-bf16-compile"):
        step, info = _make_torch(name, threads, engine.endswith("compile"), "bf16" in engine)
    else:
        raise ValueError(f"unknown engine {engine!r}")
    batches = _batches(name, 4)
    t0 = time.perf_counter()
    first_loss = None
    for i in range(spec["warmup"]):
        loss = step(*batches[i % len(batches)])
        first_loss = loss if first_loss is None else first_loss
    warmup_s = time.perf_counter() - t0
    times, losses = [], []
    with LoadMeter() as load:
        for i in range(spec["steps"]):
            x, y = batches[(spec["warmup"] + i) % len(batches)]
            t = time.perf_counter()
            losses.append(step(x, y))
            times.append(time.perf_counter() - t)
    c = CONFIGS[name]
    tokens = c["B"] * c["T"]
    med = statistics.median(times)
    return dict(spec, tokens_per_step=tokens, step_s_median=med, step_s_min=min(times), step_s_mean=statistics.fmean(times),
                tokens_per_s=tokens / med, tokens_per_s_mean=tokens / statistics.fmean(times),
                model_gflops=flops_per_token(name) * tokens / med / 1e9, warmup_s=warmup_s,
                first_loss=first_loss if first_loss is not None else losses[0], last_loss=losses[-1],
                peak_rss_mb=peak_rss_mb(), own_cores=load.own_cores, other_cores=load.other_cores,
                params=param_count(name), **info)


def _blas_info() -> dict:
    import numpy as np

    out = {"numpy": np.__version__}
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        out["blas"] = f"{blas.get('name')} {blas.get('version')}"
    except Exception:  # older NumPy: no dict mode
        pass
    try:
        from threadpoolctl import threadpool_info

        out["threadpools"] = [{k: p.get(k) for k in ("internal_api", "version", "num_threads", "architecture",
                                                      "threading_layer")}
                              for p in sorted(threadpool_info(), key=lambda p: str(p.get("internal_api")))]
    except ImportError:
        out["threadpools"] = "threadpoolctl not installed"
    return out


def _child_matmul(spec: dict) -> dict:
    """CLLM's linear forward/backward (cllm.kernels) against NumPy's `@` on the config's shapes."""
    import numpy as np

    import cllm

    threads = spec["threads"]
    cllm.set_num_threads(threads)
    limiter = None
    try:
        from threadpoolctl import threadpool_limits

        limiter = threadpool_limits(limits=threads, user_api="blas")
    except ImportError:
        pass  # OPENBLAS_NUM_THREADS is set in the child's environment anyway
    rng = np.random.default_rng(0)
    rows = []
    for layer, N, IC, OC in linear_shapes(spec["config"]):
        x = rng.standard_normal((N, IC), dtype=np.float32)
        w = (rng.standard_normal((IC, OC), dtype=np.float32) * 0.02).astype(np.float32)
        b = np.zeros(OC, dtype=np.float32)
        dout = (rng.standard_normal((N, OC), dtype=np.float32) * 1e-3).astype(np.float32)
        k = cllm.kernels

        def np_fwd():
            out = x @ w
            out += b
            return out

        def np_bwd():
            return dout @ w.T, x.T @ dout, dout.sum(axis=0)

        fl = 2.0 * N * IC * OC
        for direction, cl, nump, flops in (("fwd", lambda: k.linear_forward(x, w, b), np_fwd, fl),
                                           ("bwd", lambda: k.linear_backward(dout, x, w), np_bwd, 2 * fl)):
            with LoadMeter() as load:
                t_c, _ = _median_time(cl)
                t_n, _ = _median_time(nump)
            rows.append(dict(layer=layer, direction=direction, N=N, IC=IC, OC=OC, cllm_gflops=flops / t_c / 1e9,
                             numpy_gflops=flops / t_n / 1e9, cllm_s=t_c, numpy_s=t_n, other_cores=load.other_cores))
    info = _blas_info()
    if limiter is not None:
        limiter.restore_original_limits()
    return dict(spec, rows=rows, blas_info=info)


def main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    result = _child_matmul(spec) if spec.get("mode") == "matmul" else _child_train(spec)
    result.setdefault("peak_rss_mb", peak_rss_mb())
    print(RESULT_TAG + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
