#!/usr/bin/env python
"""Coverage-guided fuzzing of CLLM's file readers (and the Model array API) with atheris (libFuzzer).

    pip install atheris
    python tests/fuzz/fuzz_readers.py TARGET [libFuzzer flags...]

TARGET is one of: checkpoint, tokens, tokenizer, config_toml, config_json, arrays. Every input is written to a
file and given to the reader (load_checkpoint, load_tokens, load_tokenizer, TrainConfig.from_file), or decoded into
arrays for Model.forward / forward_backward / generate. The reader must either succeed (and what it returns must be
consistent: finite weights, tokens below vocab_size, a lossless tokenizer...) or raise exactly ValueError,
TypeError, FileNotFoundError or MemoryError with a message; anything else (another exception type, a crash, a hang
past -timeout, memory past -rss_limit_mb) is reported by libFuzzer with the input saved as crash-*/timeout-*.

The seed corpus (a real checkpoint, token file, tokenizers, config files) is generated in a temporary directory
unless corpus directories are given. A campaign of 100 000 cases per reader, as in docs/reliability.md:

    for t in checkpoint tokens tokenizer config_toml config_json arrays; do
        python tests/fuzz/fuzz_readers.py $t -runs=100000 -timeout=20 -rss_limit_mb=4096 -print_final_stats=1
    done
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import warnings
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["cllm"]):
    import numpy as np

    import cllm
    from cllm.train.checkpoint import load_checkpoint, read_metadata, save_checkpoint
    from cllm.data import load_tokens, write_tokens
    from cllm.errors import InsufficientMemoryError
    from cllm.errors import MissingFileError
    from cllm.data.tokenizer import ByteTokenizer, load_tokenizer
    from cllm.data.bpe import BPETokenizer
    from cllm.train.config import TrainConfig

CLEAN = (ValueError, TypeError, FileNotFoundError, MissingFileError, MemoryError, InsufficientMemoryError)
SAMPLE_TEXT = "def f(x):\n    return x * 2  # héllo wörld ✓\n\n\tclass A: pass\r\n"
WORK = Path(tempfile.mkdtemp(prefix="cllm-fuzz-"))


def check_clean(e: BaseException, path=None) -> None:
    t = type(e)
    if not (t in CLEAN or isinstance(e, MemoryError)):
        raise AssertionError(f"unexpected exception {t.__module__}.{t.__qualname__}: {e}") from e
    if not str(e).strip():
        raise AssertionError(f"{t.__name__} without a message") from e
    if path is not None and not isinstance(e, MissingFileError) and str(path) not in str(e):
        raise AssertionError(f"the message does not name the file {path}: {e}") from e


def guarded(fn, *args, path=None, **kwargs):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return True, fn(*args, **kwargs)
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # a Rust panic is a BaseException and must not leak either
        check_clean(e, path)
        return False, e


# ----------------------------------------------------------------------------------------------------
# targets
# ----------------------------------------------------------------------------------------------------
def fuzz_checkpoint(data: bytes) -> None:
    path = WORK / "input.safetensors"
    path.write_bytes(data)
    guarded(read_metadata, path, path=path)  # what `cllm train --resume` reads first
    ok, ck = guarded(load_checkpoint, path, path=path)
    if ok:
        assert ck.config.vocab_size >= ck.tokenizer.vocab_size
        assert np.isfinite(ck.model.flat_parameters()).all()
        ok, _ = guarded(ck.model.loss, np.zeros((1, 2), np.int32), np.ones((1, 2), np.int32))
        assert ok


def fuzz_tokens(data: bytes) -> None:
    path = WORK / "input.bin"
    path.write_bytes(data)
    ok, tf = guarded(load_tokens, path, path=path)
    if ok:
        assert len(tf) == (len(data) - 64) // tf.bytes_per_token
        if len(tf):
            assert int(np.max(tf.tokens)) < tf.vocab_size
        del tf


def fuzz_tokenizer(data: bytes) -> None:
    path = WORK / "input.json"
    path.write_bytes(data)
    ok, tok = guarded(load_tokenizer, path, path=path)
    if ok:
        ids = tok.encode(SAMPLE_TEXT)
        assert ids.size == 0 or (ids.min() >= 0 and ids.max() < tok.vocab_size)
        assert tok.decode(ids) == SAMPLE_TEXT, "a tokenizer that loads must be lossless"


def _fuzz_config(data: bytes, suffix: str) -> None:
    path = WORK / f"input{suffix}"
    path.write_bytes(data)
    ok, cfg = guarded(TrainConfig.from_file, path, path=path)
    if ok:
        assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def fuzz_config_toml(data: bytes) -> None:
    _fuzz_config(data, ".toml")


def fuzz_config_json(data: bytes) -> None:
    _fuzz_config(data, ".json")


MODEL = None
DTYPES = [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64, np.float32, np.float64,
          np.bool_, np.complex64, object]


def _array(fdp):
    dtype = np.dtype(DTYPES[fdp.ConsumeIntInRange(0, len(DTYPES) - 1)])
    ndim = fdp.ConsumeIntInRange(0, 3)
    shape = [fdp.PickValueInList([0, 1, 2, 3, 8, 9, 2**31, 2**40]) for _ in range(ndim)]
    if any(d >= 2**31 for d in shape):  # huge: zero-sized or broadcast, never materialised
        big = shape.index(max(shape))  # one huge dimension (NumPy refuses larger shapes even when empty)
        shape = [d if d < 2**31 or i == big else 1 for i, d in enumerate(shape)]
        if fdp.ConsumeBool():
            shape[0 if big else -1] = 0
            return np.zeros(shape, dtype)
        return np.broadcast_to(np.zeros((), dtype), shape)
    n = int(np.prod(shape)) if shape else 1
    if dtype == object:
        a = np.array([fdp.PickValueInList([None, 1, 2.5, "x"]) for _ in range(n)] or [None], dtype=object)[:n]
    elif dtype.kind == "c":
        a = np.array(fdp.ConsumeFloatListInRange(n, -5, 5), dtype=dtype)
    elif dtype.kind == "f":
        a = np.array([fdp.ConsumeRegularFloat() if fdp.ConsumeBool() else fdp.PickValueInList(
            [np.nan, np.inf, -np.inf]) for _ in range(n)], dtype=dtype)
    else:
        a = np.array([fdp.ConsumeIntInRange(-2, 60) for _ in range(n)], dtype=np.int64)
        a = a.astype(dtype) if dtype.kind != "u" else np.abs(a).astype(dtype)
    a = a.reshape(shape)
    if ndim and fdp.ConsumeBool():
        a = np.repeat(a, 2, axis=-1)[..., ::2]  # non-contiguous
    return a


def fuzz_arrays(data: bytes) -> None:
    global MODEL
    if MODEL is None:
        MODEL = cllm.Model(cllm.ModelConfig(vocab_size=50, max_seq_len=8, embedding_dim=16, num_layers=1,
                                            num_heads=2, ff_dim=32))
    fdp = atheris.FuzzedDataProvider(data)
    which = fdp.ConsumeIntInRange(0, 3)
    x = _array(fdp)
    if which == 0:
        guarded(MODEL.forward, x)
    elif which == 1:
        guarded(MODEL.forward_backward, x, _array(fdp) if fdp.ConsumeBool() else x)
    elif which == 2:
        guarded(MODEL.loss, x, x)
    else:
        guarded(MODEL.generate, x, fdp.PickValueInList([0, 1, 5, -1, 2.5, 2**40, None]),
                temperature=fdp.PickValueInList([0.0, 1.0, -1.0, float("nan"), 1e30]),
                top_k=fdp.PickValueInList([None, 1, 3, 0, 10**20]), top_p=fdp.PickValueInList([None, 0.5, 0.0, 2.0]),
                seed=fdp.ConsumeIntInRange(-5, 5))


TARGETS = {"checkpoint": fuzz_checkpoint, "tokens": fuzz_tokens, "tokenizer": fuzz_tokenizer,
           "config_toml": fuzz_config_toml, "config_json": fuzz_config_json, "arrays": fuzz_arrays}


# ----------------------------------------------------------------------------------------------------
# seed corpus
# ----------------------------------------------------------------------------------------------------
def make_seeds(target: str) -> Path:
    d = WORK / f"seeds-{target}"
    d.mkdir(exist_ok=True)
    if target == "checkpoint":  # a small model: most of the file is its header
        m = cllm.Model(cllm.ModelConfig(vocab_size=256, max_seq_len=2, embedding_dim=2, num_layers=1, num_heads=1,
                                        ff_dim=2), seed=1)
        save_checkpoint(d / "with_optimizer", m, cllm.AdamW(m), ByteTokenizer(), {"step": 1})
        save_checkpoint(d / "without_optimizer", m, None, ByteTokenizer())
    elif target == "tokens":
        write_tokens(d / "u16", np.arange(40) % 37, 37)
        write_tokens(d / "u32", np.arange(10) * 7000, 70001)
        write_tokens(d / "empty", [], 5)
    elif target == "tokenizer":
        ByteTokenizer().save(d / "byte")
        BPETokenizer.train([SAMPLE_TEXT * 10, "the quick brown fox " * 10], 270).save(d / "bpe")
    elif target == "config_toml":
        (d / "a").write_text('max_steps = 10\nlr = 1e-3\nbetas = [0.9, 0.95]\ndata = ["a", "b"]\n'
                             'tokenizer = "bpe"\nmax_time = 60.0\nprogress = false\n')
    elif target == "config_json":
        (d / "a").write_text(json.dumps({"max_steps": 10, "lr": 1e-3, "betas": [0.9, 0.95], "data": "x",
                                         "grad_clip": None, "on_nonfinite": "stop", "seed": 3}))
    else:
        (d / "a").write_bytes(os.urandom(64))
    return d


JSON_WORDS = ['"dtype"', '"F32"', '"F16"', '"I32"', '"shape"', '"data_offsets"', '"__metadata__"', '"format"',
              '"cllm-checkpoint"', '"format_version"', '"config"', '"tokenizer"', '"model_state"', '"optimizer"',
              '"trainer_state"', '"vocab_size"', '"embedding_dim"', '"num_heads"', '"seed"', '"dropout_step"',
              '"step"', '"type"', '"byte"', '"bpe"', '"model"', '"vocab"', '"merges"', '"BPE"', '"ByteLevel"',
              '"pre_tokenizer"', '"decoder"', '"normalizer"', '"added_tokens"', '"max_steps"', '"lr"', '"betas"',
              '"data"', '"max_time"', '"grad_clip"', '"on_nonfinite"', "{", "}", "[", "]", ":", ",", "null", "true",
              "false", "-1", "0", "1e999", "NaN", "Infinity", "2147483648", "18446744073709551616", '"\\u0000"']
TOML_WORDS = ["=", "[", "]", "[[", "]]", '"', "'" * 3, "true", "false", "inf", "nan", "-inf", "1e999", "0x7fffffff",
              "1979-05-27T07:32:00Z", "max_steps", "lr", "betas", "data", "tokenizer", "bpe", "max_time",
              "grad_clip", "on_nonfinite", "skip", "stop", "{", "}", ",", "#", "\n"]


def make_dict(target: str) -> Path:
    """A libFuzzer dictionary of the tokens of the format (JSON keys and values, TOML syntax)."""
    words = TOML_WORDS if target == "config_toml" else JSON_WORDS
    path = WORK / f"{target}.dict"
    def quoted(w: str) -> str:  # libFuzzer's dictionary syntax: "...", with \\, \" and \xNN escapes
        return '"' + "".join(c if c.isprintable() and c not in '\\"' else "".join(
            f"\\x{b:02X}" for b in c.encode()) for c in w) + '"'
    path.write_text("".join(quoted(w) + "\n" for w in words))
    return path


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(TARGETS)}}} [libFuzzer flags] [corpus dirs]")
    target = sys.argv.pop(1)
    argv = list(sys.argv)
    if not any(not a.startswith("-") for a in argv[1:]):  # no corpus directory given: generate seeds
        argv.append(str(make_seeds(target)))
    if target != "arrays" and target != "tokens" and not any(a.startswith("-dict=") for a in argv):
        argv.insert(1, f"-dict={make_dict(target)}")
    atheris.Setup(argv, TARGETS[target])
    atheris.Fuzz()


if __name__ == "__main__":
    main()
