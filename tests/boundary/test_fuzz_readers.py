"""Fuzzing: every file reader ends malformed input in a clear Python exception naming the file.

A clear exception is exactly a ValueError, TypeError, FileNotFoundError (cllm's MissingFileError) or MemoryError
(cllm's InsufficientMemoryError, NumPy's) with a message that names the file (checked by fuzz_helpers.py). A crash,
a hang, or any other exception type (IndexError, KeyError, OverflowError, RecursionError, struct.error, a
UnicodeDecodeError or JSONDecodeError leaking from inside, a Rust panic, SystemError, ...) fails the test, which
prints the input.

Readers: checkpoints (load_checkpoint on mutated / truncated / random bytes of a real checkpoint and on valid
safetensors files with wrong metadata, shapes and dtypes), token files (load_tokens), tokenizer files
(load_tokenizer, tokenizer_from_json), config files (TrainConfig.from_file, TOML and JSON). The array API is fuzzed
in test_fuzz_api.py.

The normal test run is short and deterministic (derandomized, a few hundred examples per target). The long
campaign (see docs/reliability.md) runs the same properties with random seeds:

    CLLM_FUZZ_EXAMPLES=100000 python -m pytest -q -p no:cacheprovider tests/boundary/test_fuzz_readers.py

and tests/fuzz/fuzz_readers.py drives the readers with atheris (coverage-guided, libFuzzer).
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import cllm
from cllm.train.checkpoint import EXP_AVG, EXP_AVG_SQ, load_checkpoint, read_metadata, save_checkpoint
from cllm.data import HEADER_SIZE, MAGIC, load_tokens, write_tokens
from cllm.data.tokenizer import ByteTokenizer, load_tokenizer, tokenizer_from_json
from cllm.data.bpe import BPETokenizer
from cllm.train.config import TrainConfig
from fuzz_helpers import JSON_VALUES, attempt, fuzz

# ----------------------------------------------------------------------------------------------------
# shared inputs: a real small checkpoint, token file, tokenizers and config files
# ----------------------------------------------------------------------------------------------------
TINY = cllm.ModelConfig(vocab_size=256, max_seq_len=8, embedding_dim=8, num_layers=1, num_heads=2, ff_dim=16)
SAMPLE_TEXT = "def f(x):\n    return x * 2  # héllo wörld ✓\n\n\tclass A: pass\r\n"


class Blob(bytes):
    """Bytes with a short repr (Hypothesis prints the arguments of a failing example)."""

    def __repr__(self):
        return f"<{len(self)} bytes>"


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


pytestmark = pytest.mark.filterwarnings("ignore:.*has no checksum:RuntimeWarning")  # forged files


@pytest.fixture(scope="module")
def good_checkpoint(work):
    model = cllm.Model(TINY, seed=1)
    opt = cllm.AdamW(model)
    x = np.arange(16).reshape(2, 8) % 256
    model.forward_backward(x, np.roll(x, -1, axis=1))
    opt.step()
    path = save_checkpoint(work / "good.safetensors", model, opt, ByteTokenizer(),
                           {"step": 1, "loader": {"seed": 0}, "best_val_loss": None})
    return Blob(path.read_bytes())


@pytest.fixture(scope="module")
def good_tokens(work):
    path = write_tokens(work / "good.bin", np.arange(40) % 37, 37)
    return Blob(path.read_bytes())


@pytest.fixture(scope="module")
def bpe_json():
    return BPETokenizer.train([SAMPLE_TEXT * 20, "the quick brown fox jumps over the lazy dog " * 10], 300).to_json()


def split_checkpoint(data: bytes):
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def unsealed(metadata: dict) -> dict:
    """Checkpoint metadata without its checksums (as an older CLLM wrote it)."""
    return {k: v for k, v in metadata.items() if k not in ("tensor_crc32", "metadata_crc32")}


def join_checkpoint(header, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


# ----------------------------------------------------------------------------------------------------
# strategies
# ----------------------------------------------------------------------------------------------------
@st.composite
def byte_mutations(draw, data: bytes, focus: int = 0):
    """`data` with 1-6 random edits (set, insert, delete, truncate, splice), `focus` > 0 biases the positions to
    the first `focus` bytes (the header)."""
    b = bytearray(data)
    for _ in range(draw(st.integers(1, 6))):
        if not b:
            b += draw(st.binary(min_size=1, max_size=8))
            continue
        hi = min(len(b), focus) if focus and draw(st.booleans()) else len(b)
        pos = draw(st.integers(0, max(0, hi - 1)))
        op = draw(st.sampled_from(["set", "set", "insert", "delete", "truncate", "splice", "digit"]))
        if op == "set":
            b[pos] = draw(st.integers(0, 255))
        elif op == "insert":
            b[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del b[pos:pos + draw(st.integers(1, 64))]
        elif op == "truncate":
            del b[pos:]
        elif op == "splice":
            src = draw(st.integers(0, len(b) - 1))
            b[pos:pos] = b[src:src + draw(st.integers(1, 64))]
        else:  # JSON-ish characters in the header text
            b[pos] = draw(st.sampled_from(b'{}[]",:0123456789-+eE.tfnu\\ '))
    return bytes(b)


def write(path: Path, data) -> Path:
    if isinstance(data, str):
        path.write_text(data, encoding="utf-8", errors="surrogatepass")
    else:
        path.write_bytes(data)
    return path


# ----------------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------------
def load_and_check(path: Path):
    attempt(read_metadata, path, path=path)  # what `cllm train --resume` reads first
    ok, ck = attempt(load_checkpoint, path, path=path)
    if ok:  # a loaded checkpoint is consistent, finite and usable
        assert ck.config.vocab_size >= ck.tokenizer.vocab_size
        assert np.isfinite(ck.model.flat_parameters()).all()
        if ck.optimizer_state is not None:
            assert set(ck.optimizer_state["exp_avg"]) == set(ck.optimizer_state["exp_avg_sq"]) == set(
                ck.model.parameters())
        ok2, _ = attempt(ck.model.loss, np.zeros((1, 2), np.int32), np.ones((1, 2), np.int32))
        assert ok2
    return ok, ck


@pytest.mark.slow
@fuzz(150)
@given(data=st.data())
def test_checkpoint_mutated_bytes(work, good_checkpoint, data):
    (n,) = struct.unpack("<Q", good_checkpoint[:8])
    mutated = data.draw(byte_mutations(good_checkpoint, focus=8 + n))
    load_and_check(write(work / "mutated.safetensors", mutated))


@fuzz(60)
@given(blob=st.binary(max_size=300) | st.builds(lambda n, rest: struct.pack("<Q", n) + rest,
                                                st.sampled_from([0, 1, 2, 8, 100, 2**31, 2**63, 2**64 - 1]),
                                                st.binary(max_size=200)))
def test_checkpoint_random_bytes(work, blob):
    ok, _ = load_and_check(write(work / "random.safetensors", blob))
    assert not ok


def _mutate_metadata(data, meta: dict) -> None:
    key = data.draw(st.sampled_from(["format", "format_version", "config", "tokenizer", "model_state", "optimizer",
                                     "trainer_state"]))
    how = data.draw(st.sampled_from(["delete", "text", "json", "field"]))
    if how == "delete":
        meta.pop(key, None)
    elif how == "text":
        meta[key] = data.draw(st.text(max_size=40) | st.sampled_from(["{", "[" * 5000, "{}", "null", "NaN", "1e999"]))
    elif how == "json":
        meta[key] = json.dumps(data.draw(JSON_VALUES))
    else:  # one field of a JSON entry
        try:
            obj = json.loads(meta.get(key, "{}"))
        except (ValueError, RecursionError):
            obj = {}
        if not isinstance(obj, dict):
            obj = {}
        fields = {"config": list(TINY.to_dict()), "model_state": ["seed", "dropout_step"],
                  "optimizer": ["type", "step", "lr", "betas"], "tokenizer": ["type", "tokenizer"]}.get(key, ["step"])
        field = data.draw(st.sampled_from(fields + ["unknown"]))
        if data.draw(st.booleans()):
            obj[field] = data.draw(JSON_VALUES)
        else:
            obj.pop(field, None)
        meta[key] = json.dumps(obj)


def _mutate_tensor_entry(data, header: dict) -> None:
    names = [k for k in header if k != "__metadata__"]
    name = data.draw(st.sampled_from(names))
    how = data.draw(st.sampled_from(["dtype", "shape", "offsets", "delete", "rename", "entry"]))
    info = header[name]
    if not isinstance(info, dict) and how in ("dtype", "shape", "offsets"):
        header[name] = info = {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]}
    if how == "dtype":
        info["dtype"] = data.draw(st.sampled_from(["F16", "BF16", "F64", "I32", "U8", "BOOL", "F8_E4M3", "X", ""])
                                  | JSON_VALUES)
    elif how == "shape":
        info["shape"] = data.draw(st.lists(st.sampled_from([0, 1, 2, 8, 16, 256, -1, 2**31, 2**40]), max_size=3)
                                  | JSON_VALUES)
    elif how == "offsets":
        offsets = info.get("data_offsets")
        ints = isinstance(offsets, list) and len(offsets) == 2 and all(type(v) is int for v in offsets)
        lo, hi = offsets if ints else (0, 4)
        info["data_offsets"] = data.draw(st.sampled_from([[hi, lo], [lo, hi + 4], [lo, lo], [-4, hi], [lo, 2**63],
                                                          [lo], [lo, hi, hi], [float("inf"), hi], "x"])
                                         | st.lists(JSON_VALUES, max_size=3))
    elif how == "delete":
        del header[name]
    elif how == "rename":
        header[data.draw(st.sampled_from(["wte2", EXP_AVG + "wpe", EXP_AVG_SQ + "x", "h.9.ln_1.weight", "",
                                          "__metadata__x"]))] = header.pop(name)
    else:
        header[name] = data.draw(JSON_VALUES)


@pytest.mark.slow
@fuzz(200)
@given(data=st.data())
def test_checkpoint_wrong_metadata_and_tensor_entries(work, good_checkpoint, data):
    header, body = split_checkpoint(good_checkpoint)
    if data.draw(st.booleans()):  # without checksums, so that the edits reach the checks behind them
        header["__metadata__"] = unsealed(header["__metadata__"])
    for _ in range(data.draw(st.integers(1, 3))):
        if data.draw(st.booleans()):
            _mutate_metadata(data, header["__metadata__"])
        else:
            _mutate_tensor_entry(data, header)
    if data.draw(st.integers(0, 9)) == 0:
        body = body[:data.draw(st.integers(0, len(body)))]
    load_and_check(write(work / "meta.safetensors", join_checkpoint(header, body)))


@pytest.mark.slow
@fuzz(80)
@given(data=st.data())
def test_checkpoint_valid_safetensors_wrong_shapes_and_dtypes(work, good_checkpoint, data):
    """Files safetensors itself reads without complaint, holding tensors of the wrong dtype or shape (or
    NaN/Inf), must be refused by load_checkpoint with an error naming the tensor."""
    from safetensors.numpy import load, save

    header, _ = split_checkpoint(good_checkpoint)
    tensors = load(good_checkpoint)
    name = data.draw(st.sampled_from(sorted(tensors)))
    a = tensors[name]
    how = data.draw(st.sampled_from(["dtype", "shape", "nonfinite"]))
    if how == "dtype":
        dtype = data.draw(st.sampled_from([np.float16, np.float64, np.int32, np.int64, np.uint8, np.bool_]))
        tensors[name] = a.astype(dtype)
    elif how == "shape":
        shape = data.draw(st.lists(st.integers(0, 20), max_size=3).filter(lambda s: tuple(s) != a.shape))
        tensors[name] = np.zeros(shape, np.float32)
    else:
        b = a.copy().reshape(-1)
        b[data.draw(st.integers(0, b.size - 1))] = data.draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        tensors[name] = b.reshape(a.shape)
    path = write(work / "wrong.safetensors", save(tensors, metadata=unsealed(header["__metadata__"])))
    ok, e = load_and_check(path)
    assert not ok and name in str(e), e
    if how == "nonfinite":  # refused by default, loadable when asked for
        ck = load_checkpoint(path, allow_nonfinite=True)
        assert not np.isfinite(ck.model.flat_parameters()).all() or name.startswith("optimizer.")


@pytest.mark.parametrize("trainer_state", ["[]", '"x"', '{"train_config": 5}', '{"train_config": [1, 2]}'])
def test_cli_resume_from_a_checkpoint_with_corrupt_trainer_state(work, good_checkpoint, trainer_state, capsys):
    from cllm import cli

    header, body = split_checkpoint(good_checkpoint)
    header["__metadata__"]["trainer_state"] = trainer_state
    run = work / f"resume{abs(hash(trainer_state))}"
    run.mkdir(exist_ok=True)
    write(run / "last.safetensors", join_checkpoint(header, body))
    assert cli.main(["train", "--resume", "--out-dir", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "last.safetensors" in err[0], err


# ----------------------------------------------------------------------------------------------------
# token files
# ----------------------------------------------------------------------------------------------------
def load_tokens_and_check(path: Path):
    ok, tf = attempt(load_tokens, path, path=path)
    if ok:
        assert len(tf) == (path.stat().st_size - HEADER_SIZE) // tf.bytes_per_token
        if len(tf):
            assert int(np.max(tf.tokens)) < tf.vocab_size
        del tf  # release the memory map before the file is rewritten
    return ok


@fuzz(150)
@given(version=st.sampled_from([1, 1, 1, 0, 2, 2**32 - 1]),
       bpt=st.sampled_from([2, 2, 4, 4, 0, 1, 3, 8, 2**32 - 1]),
       vocab=st.sampled_from([37, 37, 0, 1, 5, 255, 65535, 65536, 65537, 2**32 - 1]),
       count=st.sampled_from([None, None, 0, 1, 39, 41, 2**31, 2**63, 2**64 - 1]),
       extra=st.sampled_from([0, 0, 0, -1, 1, -2, 2, -64]),
       magic=st.sampled_from([MAGIC, MAGIC, MAGIC, b"CLLMTOK\x01", b"\0" * 8, b"GGUF\0\0\0\0"]),
       body=st.sampled_from(["good", "good", "big_ids", "random"]),
       seed=st.integers(0, 2**16))
@pytest.mark.slow
def test_token_file_headers(work, version, bpt, vocab, count, extra, magic, body, seed):
    rng = np.random.default_rng(seed)
    n = 40 if count is None else count
    width = bpt if bpt in (2, 4) else 2
    nbody = min(n, 64)
    if body == "good":
        ids = rng.integers(0, 37, nbody)
    elif body == "big_ids":
        ids = rng.integers(0, 2 ** (8 * width), nbody, dtype=np.uint64)
    else:
        ids = None
    payload = (ids.astype(f"<u{width}").tobytes() if ids is not None else rng.bytes(nbody * width))
    if extra < 0:
        payload = payload[:max(0, len(payload) + extra)]
    else:
        payload += rng.bytes(extra)
    head = struct.pack("<8sIIIIQ32x", magic, version, bpt, vocab, 0, n)
    load_tokens_and_check(write(work / "hdr.bin", head + payload))


@pytest.mark.slow
@fuzz(150)
@given(data=st.data())
def test_token_file_mutated_bytes(work, good_tokens, data):
    load_tokens_and_check(write(work / "mut.bin", data.draw(byte_mutations(good_tokens, focus=HEADER_SIZE))))


def test_token_file_not_a_file(work):
    with pytest.raises(FileNotFoundError):
        load_tokens(work / "missing.bin")
    ok, e = attempt(load_tokens, work, path=work)
    assert not ok


# ----------------------------------------------------------------------------------------------------
# tokenizer files
# ----------------------------------------------------------------------------------------------------
def tokenizer_and_check(fn, arg, path=None):
    ok, tok = attempt(fn, arg, path=path)
    if ok:  # whatever loads is a lossless tokenizer with ids in [0, vocab_size)
        ids = tok.encode(SAMPLE_TEXT)
        assert ids.size == 0 or (0 <= ids.min() and ids.max() < tok.vocab_size)
        assert tok.decode(ids) == SAMPLE_TEXT
    return ok


def _mutate_json(data, obj, depth=0):
    if isinstance(obj, dict) and obj:
        key = data.draw(st.sampled_from(sorted(obj)))
        how = data.draw(st.sampled_from(["delete", "replace", "descend", "descend"]))
        if how == "delete":
            del obj[key]
        elif how == "descend" and depth < 8 and isinstance(obj[key], (dict, list)) and obj[key]:
            _mutate_json(data, obj[key], depth + 1)
        else:
            obj[key] = data.draw(JSON_VALUES | st.sampled_from(["BPE", "ByteLevel", "WordPiece", "Ġ", "a b"]))
    elif isinstance(obj, list) and obj:
        i = data.draw(st.integers(0, len(obj) - 1))
        how = data.draw(st.sampled_from(["delete", "replace", "descend", "descend"]))
        if how == "delete":
            del obj[i]
        elif how == "descend" and depth < 8 and isinstance(obj[i], (dict, list)) and obj[i]:
            _mutate_json(data, obj[i], depth + 1)
        else:
            obj[i] = data.draw(JSON_VALUES | st.sampled_from(["Ġ", "a b", ["a", "b"]]))


@pytest.mark.slow
@fuzz(120)
@given(data=st.data())
def test_tokenizer_json_mutated(work, bpe_json, data):
    outer = json.loads(bpe_json)
    inner = json.loads(outer["tokenizer"])
    how = data.draw(st.sampled_from(["inner", "inner", "inner", "vocab_id", "outer", "text", "bytes"]))
    if how == "inner":
        for _ in range(data.draw(st.integers(1, 3))):
            _mutate_json(data, inner)
        outer["tokenizer"] = json.dumps(inner)
    elif how == "vocab_id":
        vocab = inner["model"]["vocab"]
        vocab[data.draw(st.sampled_from(sorted(vocab)))] = data.draw(
            st.sampled_from([-1, 0, 299, 300, 2**31 - 1, 2**31, 2**40, 1.5, "x", None]))
        outer["tokenizer"] = json.dumps(inner)
    elif how == "outer":
        _mutate_json(data, outer)
    s = json.dumps(outer)
    if how == "text":
        s = data.draw(st.text(max_size=60) | st.sampled_from(['{"type": "byte"}', '{"type": "bpe"}', "[" * 10000,
                                                              '{"type": {"a": 1}}', "null", '"byte"']))
    if how == "bytes":
        blob = data.draw(byte_mutations(s.encode()))
        tokenizer_and_check(load_tokenizer, write(work / "tok.json", blob), path=work / "tok.json")
        tokenizer_and_check(tokenizer_from_json, blob)
        return
    tokenizer_and_check(tokenizer_from_json, s)
    tokenizer_and_check(load_tokenizer, write(work / "tok.json", s), path=work / "tok.json")


@fuzz(40)
@given(arg=JSON_VALUES | st.binary(max_size=20))
def test_tokenizer_from_json_wrong_types(arg):
    tokenizer_and_check(tokenizer_from_json, arg if not isinstance(arg, str) else json.dumps(arg))


# ----------------------------------------------------------------------------------------------------
# config files
# ----------------------------------------------------------------------------------------------------
FIELDS = sorted(TrainConfig.__dataclass_fields__)
TOML_VALUES = st.sampled_from(['1', '0', '-1', '1e-3', '3.5', 'true', 'false', '"byte"', '"bpe"', '"cosine"', '"skip"',
                               '"x"', '[]', '[0.9, 0.95]', '[0.9]', '["a", "b"]', 'inf', 'nan', '-inf',
                               '99999999999999999999', '1979-05-27', '{a = 1}', '"runs/x"', '0x10', '1_000',
                               '[[1]]', '"\\u00e9"', "'''multi\nline'''"])


def toml_text(data) -> str:
    lines = []
    for _ in range(data.draw(st.integers(0, 6))):
        key = data.draw(st.sampled_from(FIELDS) | st.sampled_from(["unknown", "max-steps", "a.b", '"quoted"', "[t]"]))
        if key == "[t]":
            lines.append("[table]")
        else:
            lines.append(f"{key} = {data.draw(TOML_VALUES)}")
    return "\n".join(lines) + "\n"


def config_and_check(path: Path):
    ok, cfg = attempt(TrainConfig.from_file, path, path=path)
    if ok:
        assert isinstance(cfg, TrainConfig) and TrainConfig.from_dict(cfg.to_dict()) == cfg
    return ok


@pytest.mark.slow
@fuzz(150)
@given(data=st.data())
def test_config_toml(work, data):
    text = toml_text(data)
    if data.draw(st.booleans()):
        blob = data.draw(byte_mutations(text.encode() or b"x"))
        config_and_check(write(work / "c.toml", blob))
    else:
        config_and_check(write(work / "c.toml", text))


@pytest.mark.slow
@fuzz(150)
@given(data=st.data())
def test_config_json(work, data):
    settings_ = {}
    for _ in range(data.draw(st.integers(0, 6))):
        key = data.draw(st.sampled_from(FIELDS) | st.sampled_from(["unknown", "max-steps", ""]))
        settings_[key] = data.draw(JSON_VALUES | st.sampled_from([[0.9, 0.95], "runs/x", "cosine", 1e-3, 10]))
    text = json.dumps(settings_) if data.draw(st.integers(0, 4)) else json.dumps(data.draw(JSON_VALUES))
    if data.draw(st.booleans()):
        config_and_check(write(work / "c.json", data.draw(byte_mutations(text.encode()))))
    else:
        config_and_check(write(work / "c.json", text))


def test_config_other_paths(work):
    with pytest.raises(FileNotFoundError):
        TrainConfig.from_file(work / "missing.toml")
    for name, content in (("c.yaml", "a: 1"), ("deep.json", "[" * 100000), ("deep.toml", "a = " + "[" * 100000)):
        ok, _ = attempt(TrainConfig.from_file, write(work / name, content), path=work / name)
        assert not ok
