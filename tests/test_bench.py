"""The benchmark driver itself (not speed): its JSON, alternating rounds, the Markdown report, bad options."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_train.py"


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


def test_torch_bf16_engine_trains_the_same_model(tmp_path):
    """PyTorch's autocast-bf16 (the fair peer of cllm-bf16) starts from CLLM's weights: the first losses agree to
    bf16 rounding."""
    pytest.importorskip("torch")
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
