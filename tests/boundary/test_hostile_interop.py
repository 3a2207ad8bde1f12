"""A hostile pass over the Hugging Face import (issue 33, items 1, 2 and 6): config.json settings CLLM does not
compute, safetensors headers whose tensors overlap or disagree with their shapes, and the test extra pulling
torch. Each refusal is one line naming the file, the field (or tensor) and the value; nothing is ignored."""
from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

import cllm
from cllm.core.safetensors_io import read_float32, read_header
from cllm.data.tokenizer import ByteTokenizer
from cllm.interop.hf import HFFormatError, export_hf, from_hf

FIXTURE = Path(__file__).parent.parent / "fixtures" / "tiny-gpt2"
ROOT = Path(__file__).parent.parent.parent


@pytest.fixture(scope="module")
def llama_export(tmp_path_factory):
    model = cllm.Model(cllm.ModelConfig(architecture="llama", vocab_size=256, max_seq_len=16, embedding_dim=16,
                                        num_layers=1, num_heads=4, num_kv_heads=2, ff_dim=24), seed=0)
    return export_hf(model, ByteTokenizer(), tmp_path_factory.mktemp("llama") / "l")


@pytest.fixture
def llama_dir(llama_export, tmp_path):
    d = tmp_path / "l"
    shutil.copytree(llama_export, d)
    return d


def set_config(d: Path, **changes) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v != "<absent>"}))


# ---- config.json: rotary scaling and other settings CLLM does not compute ------------------------------------
@pytest.mark.parametrize("changes,words", [
    # transformers < 5's spelling: the type under "type" (the case the tester found), beside a default rope_parameters
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), ["rope_scaling.type", "'linear'"]),
    (dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), ["rope_scaling.rope_type", "'dynamic'"]),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}, rope_parameters="<absent>"), ["'llama3'"]),
    (dict(rope_scaling={"type": "yarn", "factor": 4.0}, rope_parameters="<absent>"), ["'yarn'"]),
    (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}), ["rope_parameters.rope_type"]),
    (dict(rope_scaling={"factor": 2.0}), ["rope_scaling", "names no rope_type"]),
    (dict(rope_scaling="linear"), ["rope_scaling = 'linear'", "mapping"]),
    (dict(partial_rotary_factor=0.5), ["partial_rotary_factor = 0.5"]),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}),
     ["rope_parameters.partial_rotary_factor = 0.5"]),
    (dict(rope_theta=20000.0), ["rope_theta = 20000.0", "differs from rope_parameters.rope_theta = 10000.0"]),
    (dict(sliding_window=4), ["sliding_window = 4"]),
    (dict(mlp_bias=True), ["mlp_bias = True"]),
    (dict(hidden_act="gelu"), ["hidden_act = 'gelu'"]),
    (dict(head_dim=8), ["head_dim = 8"]),
])
def test_llama_settings_cllm_does_not_compute_are_refused(llama_dir, changes, words):
    set_config(llama_dir, **changes)
    with pytest.raises(HFFormatError) as e:
        from_hf(llama_dir)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(llama_dir / "config.json")) and "not supported" in msg, msg
    for w in words:
        assert w in msg, msg


@pytest.mark.parametrize("changes", [
    dict(rope_scaling=None), dict(rope_scaling="<absent>"), dict(rope_scaling={"rope_type": "default"}),
    dict(rope_scaling={"type": "default", "factor": 2.0}),  # "default" ignores a factor: no effect
    dict(rope_parameters="<absent>", rope_theta=10000.0), dict(partial_rotary_factor=1.0),
    dict(sliding_window=None), dict(sliding_window=16), dict(sliding_window=4, use_sliding_window=False),
])
def test_llama_settings_without_effect_stay_accepted(llama_dir, changes):
    set_config(llama_dir, **changes)
    from_hf(llama_dir)


# ---- safetensors headers ----------------------------------------------------------------------------------------
def rewrite_header(path: Path, edit) -> None:
    """Apply `edit(header)` to a safetensors file's header, keeping its data section as it is."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


@pytest.fixture
def gpt2_dir(tmp_path):
    d = tmp_path / "hf"
    shutil.copytree(FIXTURE, d)
    return d


def test_overlapping_tensors_are_refused_not_read_as_each_other(gpt2_dir):
    """Two tensors of one size made to share their bytes: before, ln_1.bias silently loaded ln_1.weight's values."""
    weights = gpt2_dir / "model.safetensors"
    a, b = "transformer.h.0.ln_1.weight", "transformer.h.0.ln_1.bias"
    rewrite_header(weights, lambda h: h[b].update(data_offsets=h[a]["data_offsets"]))
    with pytest.raises(ValueError) as e:
        from_hf(gpt2_dir)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(weights)) and "overlap" in msg and a in msg and b in msg, msg

    def half_over(h):  # one tensor starting inside another
        lo, hi = h[a]["data_offsets"]
        h[b]["data_offsets"] = [lo + 4, hi + 4]
    shutil.copy(FIXTURE / "model.safetensors", weights)
    rewrite_header(weights, half_over)
    with pytest.raises(ValueError, match="overlap"):
        read_float32(weights)


@pytest.mark.parametrize("entry,words", [
    ({"shape": [-2, -16]}, ["shape [-2, -16]", "non-negative integers"]),
    ({"shape": [2.5, 12.8]}, ["shape [2.5, 12.8]"]),
    ({"shape": [True, 32]}, ["shape [True, 32]"]),
    ({"shape": "32"}, ["shape '32'"]),
    ({"shape": [2 ** 40] * 3}, ["hold 128 bytes", "shape [1099511627776"]),
    ({"shape": [16]}, ["hold 128 bytes", "shape [16] and dtype F32"]),
    ({"dtype": "F16"}, ["hold 128 bytes", "dtype F16"]),
    ({"dtype": ["F32"]}, ["dtype ['F32'] is not a string"]),
    ({"data_offsets": [128, 0]}, ["data_offsets [128, 0]"]),
    ({"data_offsets": [-128, 0]}, ["data_offsets [-128, 0]"]),
    ({"data_offsets": [0.0, 128.0]}, ["data_offsets [0.0, 128.0]"]),
    ({"data_offsets": [0, 128, 256]}, ["data_offsets [0, 128, 256]"]),
    ({"data_offsets": [10 ** 9, 10 ** 9 + 128]}, ["truncated"]),
])
def test_bad_tensor_entries_name_the_file_and_the_tensor(gpt2_dir, entry, words):
    weights = gpt2_dir / "model.safetensors"
    name = "transformer.h.0.ln_1.weight"  # 32 float32: 128 bytes
    rewrite_header(weights, lambda h: h[name].update(entry))
    for read in (read_header, read_float32):
        with pytest.raises(ValueError) as e:
            read(weights)
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(str(weights)), msg
        for w in words:
            assert w in msg, msg
        if "truncated" not in words:
            assert name in msg, msg
    with pytest.raises(ValueError, match=name if "truncated" not in words else "truncated"):
        from_hf(gpt2_dir)


def test_a_valid_file_reads_as_before(gpt2_dir):
    from safetensors.numpy import load_file

    theirs = load_file(gpt2_dir / "model.safetensors")
    ours = read_float32(gpt2_dir / "model.safetensors")
    assert set(ours) == set(theirs) and all(np.array_equal(ours[k], theirs[k]) for k in theirs)


# ---- packaging: no extra pulls torch -------------------------------------------------------------------------
def test_no_extra_pulls_torch():
    """torch is installed separately (CI: a CPU build first); `pip install ".[interop,test]"` must not pull a CUDA
    torch through a package that requires it (accelerate does, unconditionally; transformers only in its
    extras). CI installs accelerate beside torch instead (.ci/run)."""
    import importlib.metadata as metadata
    import re

    try:
        import tomllib
    except ImportError:  # Python < 3.11
        import tomli as tomllib
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = lambda reqs: {re.split(r"[ <>=!~;\[(]", r, 1)[0].strip().lower().replace("_", "-") for r in reqs}
    for extra, reqs in extras.items():
        for name in names(reqs):
            assert name not in ("torch", "accelerate"), f"extra {extra!r} pulls {name}"
            try:
                needs = [r for r in metadata.requires(name) or [] if "extra ==" not in r]
            except metadata.PackageNotFoundError:
                continue
            assert "torch" not in names(needs), f"extra {extra!r}: {name} requires torch"
