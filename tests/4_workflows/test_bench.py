"""The benchmark driver itself (not speed): its JSON, alternating rounds, the Markdown report, bad options."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_train.py"


@pytest.mark.slow
def test_rounds_keep_each_engines_median_run(tmp_path):
    out = tmp_path / "b.json"
    proc = subprocess.run([sys.executable, str(BENCH), "--configs", "tiny", "--threads", "1", "--engines",
                           "cllm", "--steps", "1", "--warmup", "0", "--rounds", "3", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("(round ") == 3
    data = json.loads(out.read_text())
    (r,) = data["results"]
    rounds = r["rounds_tokens_per_s"]
    assert len(rounds) == 3 and rounds == sorted(rounds)
    assert r["tokens_per_s"] == rounds[1] > 0  # the median run
    assert r["engine"] == "cllm" and r["config"] == "tiny" and r["threads"] == 1
    assert r["first_loss"] > 0 and r["peak_rss_mb"] > 0
    report = subprocess.run([sys.executable, str(BENCH), "--report", str(out)], capture_output=True, text=True,
                            timeout=60)
    assert report.returncode == 0, report.stderr
    assert "| tiny | 1 | cllm |" in report.stdout and "All rounds" in report.stdout


@pytest.mark.parametrize("argv", [["--rounds", "0"], ["--steps", "0"], ["--configs", "huge"], ["--threads", "0"]])
def test_bad_options_are_one_line_errors(argv):
    proc = subprocess.run([sys.executable, str(BENCH), *argv], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and proc.stderr.strip()


@pytest.mark.slow
@pytest.mark.torch
def test_torch_bf16_engine_trains_the_same_model(tmp_path):
    """PyTorch's autocast-bf16 (the fair peer of cllm-bf16) starts from CLLM's weights: the first losses agree to
    bf16 rounding."""
    out = tmp_path / "b.json"
    proc = subprocess.run([sys.executable, str(BENCH), "--configs", "tiny", "--threads", "1", "--engines",
                           "cllm-bf16,torch-bf16", "--steps", "1", "--warmup", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    results = {r["engine"]: r for r in json.loads(out.read_text())["results"]}
    assert results["torch-bf16"]["precision"] == "autocast-bf16"
    assert abs(results["torch-bf16"]["first_loss"] - results["cllm-bf16"]["first_loss"]) < 0.02


@pytest.mark.parametrize("content", [b"", b"{not json", b"\xff\xfe", b"[1, 2]", b'{"results": [{"config": 1}]}',
                                     b'{"results": 5}', b'{"mode": "matmul", "results": [{"rows": [{}]}]}',
                                     b'{"meta": [], "results": []}'])
def test_a_malformed_report_file_is_one_line(tmp_path, content):
    bad = tmp_path / "r.json"
    bad.write_bytes(content)
    proc = subprocess.run([sys.executable, str(BENCH), "--report", str(bad)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and str(bad) in proc.stderr


def test_long_context_configs_keep_activation_memory_linear_in_T():
    """small, small-t1024 and small-t2048 train on the same B*T = 2048 tokens per step: the activation arena is the
    same size (attention keeps a log-sum-exp per row, never a T x T block), so memory grows with B*T, not T^2."""
    sys.path.insert(0, str(BENCH.parent))
    from bench_common import CONFIGS, model_config
    from cllm.core.model import activation_count

    sizes = {}
    for name in ("small", "small-t1024", "small-t2048"):
        c = CONFIGS[name]
        assert c["B"] * c["T"] == 2048 and model_config(name).max_seq_len == c["T"]
        sizes[name] = activation_count(model_config(name), c["B"], c["T"])
    assert max(sizes.values()) <= min(sizes.values()) * 1.001, sizes


@pytest.mark.slow
def test_plot_writes_the_charts_from_result_files(tmp_path):
    train = {"mode": "train", "results": [
        dict(config=c, threads=t, engine=e, tokens_per_s=v * (1 + t))
        for c, v in (("small", 2000.0), ("small-t1024", 1800.0), ("small-t2048", 1500.0))
        for t in (1, 2) for e in ("cllm", "torch")] + [dict(config="gpt2", threads=2, engine="torch", skipped="x")]}
    runs = [dict(engine=e, batch=b, tokens_per_s=10.0 * b, seconds=1.0,
                 **({"weight_gbs": 20.0, "decode_steps_per_s": 70.0} if e != "transformers" else {}))
            for e in ("cllm", "cllm-bf16", "transformers") for b in (1, 8)]
    gen = {"what": "generation", "config": "gpt2", "parameters": 124e6, "threads": 2, "new_tokens": 64,
           "rounds": [{"bandwidth_gbs": {"1": 20.0, "2": 25.0}, "runs": runs}] * 3}
    short = {"mode": "train", "results": [r for r in train["results"] if r["config"] == "small"]}
    long = {"mode": "train", "results": [r for r in train["results"] if r["config"] != "small"]}
    files = []
    for name, data in (("t1.json", short), ("t2.json", long), ("g.json", gen)):
        files.append(tmp_path / name)
        files[-1].write_text(json.dumps(data))
    proc = subprocess.run([sys.executable, str(BENCH), "--plot", str(tmp_path / "png"), *map(str, files)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for png in ("train_tokens_per_s.png", "long_context.png", "generation.png"):
        assert (tmp_path / "png" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    bad = subprocess.run([sys.executable, str(BENCH), "--plot", str(tmp_path / "png"), str(BENCH)],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "bench_train.py" in bad.stderr


def test_plot_pools_training_runs_a_later_run_replacing_an_earlier_measurement():
    sys.path.insert(0, str(BENCH.parent))
    from bench_plot import pooled_training

    first = [dict(config="small", threads=2, engine=e, tokens_per_s=v) for e, v in (("cllm", 1.0), ("torch", 2.0))]
    second = [dict(config="small", threads=2, engine="cllm", tokens_per_s=3.0),
              dict(config="gpt2", threads=2, engine="cllm", tokens_per_s=4.0)]
    pooled = pooled_training([first, second])
    assert {(r["config"], r["engine"]): r["tokens_per_s"] for r in pooled} == {
        ("small", "cllm"): 3.0, ("small", "torch"): 2.0, ("gpt2", "cllm"): 4.0}
    assert len(pooled) == 3
