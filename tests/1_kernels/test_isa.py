"""Kernel variants chosen at run time (docs/portability.md): what build_info reports, CLLM_ISA forcing a variant,
one-line errors for a variant that is unknown or that the CPU lacks (the latter under QEMU emulating an AVX2-only
CPU), and every variant computing the same model."""
import json
import os
import platform
import shutil
import subprocess
import sys

import numpy as np
import pytest

import cllm
from cllm.core.isa import use_variant

INFO = cllm.build_info()
SUPPORTED = INFO["variants_supported"]
X86 = platform.machine() in ("x86_64", "AMD64")


def run_cllm(*args, isa=None, runner=()):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("CLLM_ISA", None)
    if isa is not None:
        env["CLLM_ISA"] = isa
    return subprocess.run([*runner, sys.executable, "-m", "cllm", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_build_info_reports_the_variant_in_use():
    slow_bf16 = SUPPORTED[:2] == ["avx512bf16", "avx512"] and INFO["bf16_dot_speed"] < 1.25
    assert INFO["variant"] == (SUPPORTED[1] if slow_bf16 else SUPPORTED[0]), "auto picks the best variant here"
    assert set(SUPPORTED) <= set(INFO["variants_built"])
    assert os.path.isfile(INFO["library"]) and INFO["variant"] in os.path.basename(INFO["library"])
    assert INFO["bf16"].startswith("native" if INFO["variant"] == "avx512bf16" else "emulated")
    assert INFO["threads"] == cllm.get_num_threads() and INFO["openmp"].startswith("OpenMP")
    assert (INFO["bf16_dot_speed"] is None) == ("avx512bf16" not in INFO["cpu_features"])


@pytest.mark.skipif("avx512bf16" not in INFO["cpu_features"], reason="needs a CPU with AVX512_BF16")
def test_bf16_dot_products_are_used_where_they_beat_the_fma_units():
    """AVX512_BF16 by its measured speed, not its presence: where vdpbf16ps is no faster than the fp32 FMAs (Intel's
    run at half their rate) the automatic choice is the avx512 kernels, whose bf16 matmuls are FMAs on bf16-rounded
    inputs; where it is (AMD Zen 4: twice), the avx512bf16 kernels. The reason says which and the ratio."""
    speed = INFO["bf16_dot_speed"]
    assert 0.1 < speed < 8, speed  # a real measurement (16 lanes x 2 products against 16 lanes x 1 FMA)
    if speed < 1.25:
        assert INFO["variant"] == "avx512" and f"{speed:.2f}x the fp32 FMA rate" in INFO["reason"]
        assert INFO["bf16"].startswith("emulated")
    else:
        assert INFO["variant"] == "avx512bf16" and "the fp32 FMA rate" in INFO["reason"]
    assert cllm.build_info()["bf16_dot_speed"] == speed  # measured once per process: the choice cannot change
    if X86:
        assert INFO["variants_built"][-1] == "baseline" and "baseline" in SUPPORTED
        assert ("avx2" in SUPPORTED) == ("avx2" in INFO["cpu_features"] and "fma" in INFO["cpu_features"])


@pytest.mark.parametrize("variant", SUPPORTED)
def test_cllm_isa_forces_a_variant(variant):
    r = run_cllm("info", "--json", isa=variant)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["variant"] == variant and info["reason"] == f"forced by CLLM_ISA={variant}"


@pytest.mark.slow
def test_unknown_variant_is_one_line_error(tmp_path):
    r = run_cllm("info", isa="avx9000")
    assert r.returncode == 2 and "reason: CLLM_ISA=avx9000: unknown kernel variant" in r.stdout
    r = run_cllm("sample", "--checkpoint", tmp_path / "none", isa="avx9000")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "CLLM_ISA=avx9000: unknown kernel variant; use auto or one of" in r.stderr
    code = "import cllm, numpy as np\ntry:\n    cllm.kernels.gelu_forward(np.ones(3, np.float32))\n" \
           "except ValueError as e:\n    print('ValueError:', e)"
    env = dict(os.environ, CLLM_ISA="avx9000")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.stdout.startswith("ValueError: CLLM_ISA=avx9000: unknown kernel variant"), out.stdout + out.stderr


def test_use_variant_refuses_and_keeps_the_selection():
    before = cllm.build_info()["variant"]
    with pytest.raises(ValueError, match="variant=nope: unknown kernel variant"):
        use_variant("nope")
    assert cllm.build_info()["variant"] == before


def test_every_variant_computes_the_same_model():
    config = cllm.ModelConfig(vocab_size=97, max_seq_len=24, embedding_dim=48, num_layers=2, num_heads=3, ff_dim=96)
    x = np.random.default_rng(0).integers(0, 97, (3, 24)).astype(np.int32)
    results = {}
    try:
        for variant in SUPPORTED:
            use_variant(variant)
            model = cllm.Model(config, seed=3)
            loss = model.forward_backward(x, np.roll(x, -1, 1))
            results[variant] = (loss, model.flat_gradients().copy(), model.forward(x))
    finally:
        use_variant("auto")
    loss0, grads0, logits0 = results[SUPPORTED[0]]
    for variant, (loss, grads, logits) in results.items():
        assert abs(loss - loss0) < 1e-5, variant
        np.testing.assert_allclose(grads, grads0, rtol=0, atol=1e-5 * np.abs(grads0).max(), err_msg=variant)
        np.testing.assert_allclose(logits, logits0, rtol=0, atol=1e-5 * np.abs(logits0).max(), err_msg=variant)


QEMU = shutil.which("qemu-x86_64")


@pytest.mark.slow
@pytest.mark.skipif(not (X86 and QEMU), reason="needs x86-64 and qemu-x86_64 (Debian's qemu-user; .ci/run installs it)")
def test_on_an_avx2_only_cpu():
    """Under QEMU emulating Haswell: auto picks avx2; forcing AVX-512 is one line naming what the CPU lacks."""
    haswell = (QEMU, "-cpu", "Haswell")
    r = run_cllm("info", "--json", runner=haswell)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["variant"] == "avx2" and info["variants_supported"] == ["avx2", "baseline"]
    assert info["bf16"].startswith("emulated")
    r = run_cllm("train", "--max-steps", "1", isa="avx512bf16", runner=haswell)
    errors = [line for line in r.stderr.splitlines() if "TCG doesn't support" not in line]
    assert r.returncode == 2 and errors == [
        "cllm train: error: CLLM_ISA=avx512bf16: this CPU lacks AVX-512 F/BW/CD/DQ/VL (x86-64-v4) and AVX512_BF16; "
        "it runs: avx2, baseline"]
