"""Checkpoints: round trip, GPT-2 names readable by safetensors, embedded tokenizer, atomic writes, and clear
errors for missing / truncated / corrupt / foreign / wrong-version / wrong-shape / non-finite files."""
import io
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import cllm
from cllm.train import checkpoint as ckmod
from cllm.train.checkpoint import export_weights, load_checkpoint, read_metadata, restore_optimizer, save_checkpoint
from cllm.core.safetensors_io import crc32, write_float32
from cllm.data.tokenizer import ByteTokenizer
from cllm.data.bpe import BPETokenizer

CFG = cllm.ModelConfig(vocab_size=256, max_seq_len=16, embedding_dim=32, num_layers=1, num_heads=4, ff_dim=64,
                       dropout=0.1)
STATE = {"step": 3, "loader": {"rng": [1, 2, 3]}, "best_val_loss": 4.5, "note": "ünïcode"}


def trained(seed=3, steps=2):
    """A tiny model and its AdamW after a few steps (so moments, step count and dropout_step are non-trivial)."""
    model = cllm.Model(CFG, seed=seed)
    opt = cllm.AdamW(model, lr=1e-2)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        x = rng.integers(0, 256, (2, 16))
        model.forward_backward(x, np.roll(x, -1, axis=1))
        opt.step()
    return model, opt


@pytest.fixture
def saved(tmp_path):
    model, opt = trained()
    path = save_checkpoint(tmp_path / "ck.safetensors", model, opt, ByteTokenizer(), STATE)
    return path, model, opt


def test_round_trip(saved):
    path, model, opt = saved
    ck = load_checkpoint(path)
    assert ck.config == CFG and ck.trainer_state == STATE and ck.path == path
    assert ck.tokenizer == ByteTokenizer()
    for name, p in model.parameters().items():
        assert np.array_equal(ck.model.parameters()[name], p), name
    assert ck.model.dropout_step == model.dropout_step == 2
    assert ck.model.seed == model.seed
    st = ck.optimizer_state
    assert st["step"] == opt.step_count == 2 and st["type"] == "AdamW" and st["lr"] == pytest.approx(1e-2)
    # the restored optimizer and model continue exactly like the originals
    opt2 = cllm.AdamW(ck.model, lr=1e-2)
    restore_optimizer(opt2, st)
    assert np.array_equal(opt2.exp_avg, opt.exp_avg) and np.array_equal(opt2.exp_avg_sq, opt.exp_avg_sq)
    x = np.random.default_rng(9).integers(0, 256, (2, 16))
    for m, o in ((model, opt), (ck.model, opt2)):
        m.forward_backward(x, x)  # dropout active: the same masks only if dropout_step and seed were restored
        o.step()
    assert np.array_equal(model.flat_parameters(), ck.model.flat_parameters())


def test_weights_readable_as_gpt2_state_dict(saved):
    path, model, opt = saved
    tensors = load_file(str(path))
    weights = {k: v for k, v in tensors.items() if not k.startswith("optimizer.")}
    params = model.parameters()
    assert set(weights) == set(params)
    assert {"wte", "wpe", "h.0.attn.c_attn.weight", "ln_f.bias"} <= set(weights)
    for name, p in params.items():
        assert weights[name].dtype == np.float32 and np.array_equal(weights[name], p), name
    state = opt.state()
    for name in params:
        assert np.array_equal(tensors["optimizer.exp_avg." + name], state["exp_avg"][name])
        assert np.array_equal(tensors["optimizer.exp_avg_sq." + name], state["exp_avg_sq"][name])
    with safe_open(str(path), framework="np") as f:
        meta = f.metadata()
    assert meta["format"] == "cllm-checkpoint" and meta["format_version"] == "1"
    assert json.loads(meta["config"]) == CFG.to_dict()
    assert json.loads(meta["trainer_state"]) == STATE
    assert json.loads(meta["tokenizer"]) == {"type": "byte"}
    assert read_metadata(path)["trainer_state"] == STATE


def test_export_weights(tmp_path):
    model, _ = trained()
    path = export_weights(tmp_path / "w.safetensors", model)
    tensors = load_file(str(path))
    assert set(tensors) == set(model.parameters())
    for name, p in model.parameters().items():
        assert np.array_equal(tensors[name], p)
    with pytest.raises(ValueError, match="not a CLLM checkpoint"):
        load_checkpoint(path)  # weights alone are not a checkpoint


def test_without_optimizer(tmp_path):
    model, _ = trained()
    path = save_checkpoint(tmp_path / "m.safetensors", model, None, ByteTokenizer())
    ck = load_checkpoint(path)
    assert ck.optimizer_state is None and ck.trainer_state == {}
    assert np.array_equal(ck.model.flat_parameters(), model.flat_parameters())


def test_bpe_tokenizer_round_trips(tmp_path):
    text = "def foo(bar):\n    return bar + 1\n" * 50 + "class Baz:\n    pass\n" * 30
    tok = BPETokenizer.train([text], 300)
    model = cllm.Model(CFG.replace(vocab_size=tok.vocab_size), seed=0)
    path = save_checkpoint(tmp_path / "bpe.safetensors", model, None, tok)
    ck = load_checkpoint(path)
    assert isinstance(ck.tokenizer, BPETokenizer) and ck.tokenizer == tok
    sample = "def baz(foo):\n    return foo\n"
    assert np.array_equal(ck.tokenizer.encode(sample), tok.encode(sample))
    assert ck.tokenizer.decode(tok.encode(sample)) == sample


# ------------------------------------------------------------------------------------------------------
# atomic writes
# ------------------------------------------------------------------------------------------------------
def file_bytes(tensors, metadata) -> bytes:
    """The bytes save_checkpoint writes for these tensors and metadata."""
    buf = io.BytesIO()
    write_float32(buf, tensors, metadata)
    return buf.getvalue()


def _other_model():
    return trained(seed=11, steps=1)


def test_crash_mid_write_keeps_old_checkpoint(saved, monkeypatch):
    path, model, _ = saved
    before = path.read_bytes()

    def crash(f, tensors, metadata):
        data = file_bytes(tensors, metadata)
        f.write(data[: len(data) // 2])
        raise OSError("disk on fire")

    monkeypatch.setattr(ckmod, "_write_payload", crash)
    m2, o2 = _other_model()
    with pytest.raises(OSError, match="disk on fire"):
        save_checkpoint(path, m2, o2, ByteTokenizer(), {"step": 99})
    assert path.read_bytes() == before
    assert os.listdir(path.parent) == [path.name]  # the partial temporary file is gone
    ck = load_checkpoint(path)
    assert ck.trainer_state == STATE
    assert np.array_equal(ck.model.flat_parameters(), model.flat_parameters())


def test_crash_at_rename_keeps_old_checkpoint(saved, monkeypatch):
    path, _, _ = saved
    before = path.read_bytes()

    def no_rename(src, dst):
        raise OSError("power cut")

    monkeypatch.setattr(os, "replace", no_rename)
    m2, o2 = _other_model()
    with pytest.raises(OSError, match="power cut"):
        save_checkpoint(path, m2, o2, ByteTokenizer(), {"step": 99})
    monkeypatch.undo()
    assert path.read_bytes() == before and os.listdir(path.parent) == [path.name]
    assert load_checkpoint(path).trainer_state == STATE


def test_killed_process_leaves_only_a_temporary_file(saved):
    """A process killed mid-write (no cleanup at all) leaves a hidden temporary file, never the real name."""
    path, _, _ = saved
    before = path.read_bytes()
    code = textwrap.dedent(f"""
        import os, numpy as np, cllm
        from cllm.train import checkpoint as ck
        from cllm.data.tokenizer import ByteTokenizer
        def die(f, tensors, metadata):
            f.write(b"x" * 1000); f.flush(); os._exit(9)
        ck._write_payload = die
        m = cllm.Model(cllm.ModelConfig(**{CFG.to_dict()!r}), seed=5)
        ck.save_checkpoint({str(path)!r}, m, None, ByteTokenizer(), {{"step": 1}})
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 9, r.stderr
    assert path.read_bytes() == before
    stray = [n for n in os.listdir(path.parent) if n != path.name]
    assert len(stray) == 1 and stray[0].startswith(".") and stray[0].endswith(".tmp")
    assert load_checkpoint(path).trainer_state == STATE
    with pytest.raises(ValueError):  # and the partial file itself is recognisably invalid
        load_checkpoint(path.parent / stray[0])


def test_save_refuses_nonfinite_weights(saved):
    path, model, opt = saved
    before = path.read_bytes()
    model.parameters()["h.0.mlp.c_fc.weight"][0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite.*h.0.mlp.c_fc.weight"):
        save_checkpoint(path, model, opt, ByteTokenizer(), STATE)
    assert path.read_bytes() == before
    with pytest.raises(ValueError, match="non-finite"):
        export_weights(path.parent / "w.safetensors", model)
    assert os.listdir(path.parent) == [path.name]


# ------------------------------------------------------------------------------------------------------
# bad files
# ------------------------------------------------------------------------------------------------------
def _rewrite(path, out, edit_tensors=None, edit_meta=None, reseal=True):
    """Copy a checkpoint's tensors and metadata with edits (to forge bad files), with checksums recomputed to
    match (reseal) or left as they were."""
    tensors = load_file(str(path))
    with safe_open(str(path), framework="np") as f:
        meta = dict(f.metadata())
    if edit_tensors:
        edit_tensors(tensors)
    if edit_meta:
        edit_meta(meta)
    if reseal:
        meta["tensor_crc32"] = json.dumps({k: crc32(np.ascontiguousarray(v)) for k, v in tensors.items()})
        meta["metadata_crc32"] = str(ckmod._metadata_crc32(meta))
    save_file(tensors, str(out), metadata=meta)
    return out


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_checkpoint(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("keep", [0, 5, 8, 100, "half", -4])
def test_truncated(saved, tmp_path, keep):
    path = saved[0]
    data = path.read_bytes()
    n = len(data) // 2 if keep == "half" else keep if keep >= 0 else len(data) + keep
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(data[:n])
    with pytest.raises(ValueError, match="cut.safetensors.*(truncated|empty)"):
        load_checkpoint(bad)


def test_random_bytes_and_text(tmp_path):
    bad = tmp_path / "noise.safetensors"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(ValueError, match="noise.safetensors"):
        load_checkpoint(bad)
    txt = tmp_path / "notes.txt"
    txt.write_text("this is not a checkpoint at all, just some text that is long enough")
    with pytest.raises(ValueError, match="notes.txt"):
        load_checkpoint(txt)
    # a plausible header length followed by garbage JSON
    bad.write_bytes((20).to_bytes(8, "little") + b"{not json at all...}" + b"\0" * 10)
    with pytest.raises(ValueError, match="corrupt header"):
        load_checkpoint(bad)


def test_foreign_safetensors_file(tmp_path):
    model, _ = trained()
    plain = tmp_path / "plain.safetensors"
    save_file({k: np.ascontiguousarray(v) for k, v in model.parameters().items()}, str(plain))
    with pytest.raises(ValueError, match="plain.safetensors: not a CLLM checkpoint"):
        load_checkpoint(plain)
    other = tmp_path / "other.safetensors"
    save_file({"x": np.zeros(3, np.float32)}, str(other), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="not a CLLM checkpoint"):
        load_checkpoint(other)


def test_wrong_format_version(saved, tmp_path):
    bad = _rewrite(saved[0], tmp_path / "v2.safetensors", edit_meta=lambda m: m.update(format_version="2"))
    with pytest.raises(ValueError, match="v2.safetensors: unsupported checkpoint format_version '2'"):
        load_checkpoint(bad)


def test_wrong_shape_and_missing_tensor(saved, tmp_path):
    def shrink(t):
        t["h.0.mlp.c_fc.weight"] = np.zeros((32, 32), np.float32)

    bad = _rewrite(saved[0], tmp_path / "shape.safetensors", edit_tensors=shrink)
    with pytest.raises(ValueError, match=r"shape.safetensors: tensor h.0.mlp.c_fc.weight has shape \[32, 32\]"):
        load_checkpoint(bad)

    bigger = _rewrite(saved[0], tmp_path / "cfg.safetensors",
                      edit_meta=lambda m: m.update(config=json.dumps(CFG.replace(embedding_dim=64).to_dict())))
    with pytest.raises(ValueError, match="cfg.safetensors: tensor .* has shape"):
        load_checkpoint(bigger)

    missing = _rewrite(saved[0], tmp_path / "missing.safetensors", edit_tensors=lambda t: t.pop("ln_f.bias"))
    with pytest.raises(ValueError, match="missing.safetensors: checkpoint is missing weight ln_f.bias"):
        load_checkpoint(missing)

    no_moment = _rewrite(saved[0], tmp_path / "moment.safetensors",
                         edit_tensors=lambda t: t.pop("optimizer.exp_avg_sq.wte"))
    with pytest.raises(ValueError, match="missing tensor optimizer.exp_avg_sq.wte"):
        load_checkpoint(no_moment)

    bad_cfg = _rewrite(saved[0], tmp_path / "badcfg.safetensors", edit_meta=lambda m: m.update(config="{oops"))
    with pytest.raises(ValueError, match="badcfg.safetensors: checkpoint metadata 'config' is not valid JSON"):
        load_checkpoint(bad_cfg)


def test_nonfinite_weights_refused_unless_allowed(saved, tmp_path):
    def poison(t):
        t["wpe"][3, 4] = np.inf
        t["h.0.ln_1.bias"][0] = np.nan

    bad = _rewrite(saved[0], tmp_path / "nan.safetensors", edit_tensors=poison)
    with pytest.raises(ValueError, match="nan.safetensors: checkpoint holds non-finite values.*allow_nonfinite"):
        load_checkpoint(bad)
    ck = load_checkpoint(bad, allow_nonfinite=True)
    assert np.isinf(ck.model.parameters()["wpe"][3, 4]) and np.isnan(ck.model.parameters()["h.0.ln_1.bias"][0])


# ------------------------------------------------------------------------------------------------------
# integrity: checksums of every tensor and of the metadata
# ------------------------------------------------------------------------------------------------------
def _flip_byte(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_flipped_byte_in_tensor_data_names_the_tensor(saved):
    path = saved[0]
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8:8 + header_len])
    lo, hi = header["h.0.mlp.c_fc.weight"]["data_offsets"]
    _flip_byte(path, 8 + header_len + lo + (hi - lo) // 2 + 1)  # a low mantissa bit: still finite, still valid
    with pytest.raises(ValueError, match=r"ck.safetensors: tensor h.0.mlp.c_fc.weight is damaged \(checksum"):
        load_checkpoint(path)


def test_edited_metadata_is_detected(saved):
    path = saved[0]
    data = path.read_bytes()
    cfg = json.dumps(CFG.to_dict(), sort_keys=True)
    edited = cfg.replace('"num_heads": 4', '"num_heads": 8')
    assert edited != cfg and json.dumps(cfg)[1:-1].encode() in data
    path.write_bytes(data.replace(json.dumps(cfg)[1:-1].encode(), json.dumps(edited)[1:-1].encode()))
    for read in (load_checkpoint, read_metadata):
        with pytest.raises(ValueError, match="ck.safetensors: checkpoint metadata is damaged"):
            read(path)
    r = subprocess.run([sys.executable, "-m", "cllm", "sample", "--checkpoint", str(path), "--max-new-tokens", "3"],
                       capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": cllm_path()})
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "metadata is damaged" in r.stderr, r.stderr


def cllm_path() -> str:
    return os.path.dirname(os.path.dirname(cllm.__file__))


def test_checkpoint_without_checksums_loads_with_a_warning(saved, tmp_path):
    def unseal(meta):
        del meta["tensor_crc32"], meta["metadata_crc32"]

    old = _rewrite(saved[0], tmp_path / "old.safetensors", edit_meta=unseal, reseal=False)
    with pytest.warns(RuntimeWarning, match="old.safetensors: checkpoint has no checksums"):
        ck = load_checkpoint(old)
    assert np.array_equal(ck.model.flat_parameters(), saved[1].flat_parameters())


def test_checksums_listed_for_other_tensors_are_damage(saved, tmp_path):
    def wrong_list(meta):  # the metadata consistent with its own checksum, but listing other tensors
        meta["tensor_crc32"] = json.dumps({"wte": 1})
        meta["metadata_crc32"] = str(ckmod._metadata_crc32(meta))

    bad = _rewrite(saved[0], tmp_path / "x.safetensors", edit_meta=wrong_list, reseal=False)
    with pytest.raises(ValueError, match="x.safetensors: checkpoint is damaged: tensor "):
        load_checkpoint(bad)


def test_save_streams_the_tensors_without_copying_them(tmp_path):
    """The checkpoint is written from the model's buffers: Python allocates far less than the file's size
    (safetensors' save() built the whole file in memory, doubling the peak)."""
    import tracemalloc

    model = cllm.Model(CFG.replace(embedding_dim=128, ff_dim=512, num_layers=2), seed=0)
    opt = cllm.AdamW(model)
    tracemalloc.start()
    path = save_checkpoint(tmp_path / "big.safetensors", model, opt, ByteTokenizer())
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < path.stat().st_size / 8, (peak, path.stat().st_size)
    assert np.array_equal(load_checkpoint(path).model.flat_parameters(), model.flat_parameters())
