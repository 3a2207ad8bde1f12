"""Hugging Face and GGUF interoperability: import of transformers' GPT-2 directories, export to transformers
and llama.cpp's GGUF, with every refusal one clear error. The fixture (tests/fixtures/tiny-gpt2, made by
make_tiny_gpt2.py with transformers) checks import without torch; the live tests run transformers itself
(CI installs it with a CPU build of torch) and are skipped only where torch is missing."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import cllm
from cllm.errors import MissingFileError
from cllm.interop.hf import HFFormatError, cllm_name, export_hf, from_hf, hf_name
from cllm.data.tokenizer import ByteTokenizer

FIXTURE = Path(__file__).parent.parent / "fixtures" / "tiny-gpt2"
EXPECTED = np.load(FIXTURE / "expected.npz")


def rel_err(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


@pytest.fixture
def hf_dir(tmp_path):
    """A writable copy of the fixture directory."""
    d = tmp_path / "hf"
    shutil.copytree(FIXTURE, d)
    return d


def edit_config(d: Path, **changes) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


# ---- import ------------------------------------------------------------------------------------
def test_from_hf_logits_equal_transformers():
    model, tok = from_hf(FIXTURE)
    ids = tok.encode(str(EXPECTED["text"]))
    assert ids.tolist() == EXPECTED["ids"].tolist()
    err = rel_err(model.forward(ids[None])[0], EXPECTED["logits"])
    print(f"from_hf logits vs transformers: {err:.2e} (tol 1e-4)")
    assert err < 1e-4
    assert tok.special_tokens["eos"] == "<|endoftext|>" and tok.eos_id == 0
    assert model.config.ff_dim == 48 and model.config.max_seq_len == 32


def test_from_hf_accepts_prefixless_names_tied_head_buffers_and_shards(hf_dir):
    ref, _ = from_hf(FIXTURE)
    tensors = load_file(hf_dir / "model.safetensors")
    bare = {k[len("transformer."):]: v for k, v in tensors.items()}
    bare["lm_head.weight"] = tensors["transformer.wte.weight"]  # tied, saved twice
    bare["h.0.attn.bias"] = np.tril(np.ones((32, 32), np.float32))  # old causal-mask buffers
    bare["h.1.attn.masked_bias"] = np.array(-1e4, np.float32)
    names = sorted(bare)
    half = len(names) // 2
    (hf_dir / "model.safetensors").unlink()
    save_file({k: bare[k] for k in names[:half]}, str(hf_dir / "model-00001-of-00002.safetensors"))
    save_file({k: bare[k] for k in names[half:]}, str(hf_dir / "model-00002-of-00002.safetensors"))
    index = {"weight_map": {k: f"model-0000{1 + (i >= half)}-of-00002.safetensors" for i, k in enumerate(names)}}
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    model, _ = from_hf(hf_dir)
    for name, arr in ref.parameters().items():
        assert np.array_equal(model.parameters()[name], arr), name


@pytest.mark.parametrize("dtype", ["F16", "BF16"])
def test_from_hf_reads_half_precision_weights(hf_dir, dtype):
    tensors = load_file(hf_dir / "model.safetensors")
    if dtype == "F16":
        half = {k: v.astype(np.float16) for k, v in tensors.items()}
        expect = {k: v.astype(np.float16).astype(np.float32) for k, v in tensors.items()}
        save_file(half, str(hf_dir / "model.safetensors"))
    else:  # NumPy has no bfloat16: write the raw bytes with a hand-made header
        bits = {k: (v.view(np.uint32) >> 16).astype(np.uint16) for k, v in tensors.items()}
        expect = {k: (b.astype(np.uint32) << 16).view(np.float32) for k, b in bits.items()}
        header, blobs, off = {}, [], 0
        for k, b in bits.items():
            header[k] = {"dtype": "BF16", "shape": list(b.shape), "data_offsets": [off, off + b.nbytes]}
            blobs.append(b.tobytes())
            off += b.nbytes
        raw = json.dumps(header).encode()
        (hf_dir / "model.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw + b"".join(blobs))
    model, _ = from_hf(hf_dir)
    for k, v in expect.items():
        assert np.array_equal(model.parameters()[cllm_name(k)], v), k


def test_from_hf_reads_vocab_and_merges(hf_dir):
    """vocab.json + merges.txt (no tokenizer.json) give the same ids."""
    spec = json.loads((hf_dir / "tokenizer.json").read_text())
    (hf_dir / "vocab.json").write_text(json.dumps(spec["model"]["vocab"]))
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    (hf_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (hf_dir / "tokenizer.json").unlink()
    _, tok = from_hf(hf_dir)
    assert tok.encode(str(EXPECTED["text"])).tolist() == EXPECTED["ids"].tolist()
    assert tok.eos_id == 0


@pytest.mark.parametrize("field,value,match", [
    ("model_type", "llama", "field .hidden_size. is missing"),  # a GPT-2 config relabelled
    ("model_type", "bert", "model_type"),
    ("activation_function", "gelu", "activation_function"),
    ("activation_function", "relu", "activation_function"),
    ("layer_norm_epsilon", 1e-6, "layer_norm_epsilon"),
    ("scale_attn_by_inverse_layer_idx", True, "scale_attn_by_inverse_layer_idx"),
    ("scale_attn_weights", False, "scale_attn_weights"),
    ("tie_word_embeddings", False, "tie_word_embeddings"),
    ("n_inner", 64, r"mlp.c_fc.(weight|bias) has shape"),
    ("n_embd", 48, "has shape"),
])
def test_from_hf_refuses_what_it_cannot_honour(hf_dir, field, value, match):
    edit_config(hf_dir, **{field: value})
    with pytest.raises(HFFormatError, match=match) as e:
        from_hf(hf_dir)
    assert "\n" not in str(e.value) and str(hf_dir) in str(e.value)


def test_from_hf_refuses_untied_head(hf_dir):
    tensors = load_file(hf_dir / "model.safetensors")
    tensors["lm_head.weight"] = tensors["transformer.wte.weight"] + 1.0
    save_file(tensors, str(hf_dir / "model.safetensors"))
    with pytest.raises(HFFormatError, match="untied"):
        from_hf(hf_dir)


def test_from_hf_bad_directories(tmp_path, hf_dir):
    with pytest.raises(MissingFileError, match="not found"):
        from_hf(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MissingFileError, match="config.json"):
        from_hf(empty)
    (hf_dir / "model.safetensors").rename(hf_dir / "pytorch_model.bin")
    with pytest.raises(HFFormatError, match="pytorch_model.bin.*safetensors"):
        from_hf(hf_dir)
    (hf_dir / "pytorch_model.bin").unlink()
    with pytest.raises(MissingFileError, match="model.safetensors"):
        from_hf(hf_dir)


def test_from_hf_missing_and_unexpected_tensors(hf_dir):
    tensors = load_file(hf_dir / "model.safetensors")
    extra = dict(tensors, **{"transformer.h.5.ln_1.weight": np.ones(32, np.float32)})
    save_file(extra, str(hf_dir / "model.safetensors"))
    with pytest.raises(HFFormatError, match="unexpected tensor transformer.h.5.ln_1.weight"):
        from_hf(hf_dir)
    del tensors["transformer.ln_f.bias"]
    save_file(tensors, str(hf_dir / "model.safetensors"))
    with pytest.raises(HFFormatError, match="missing: transformer.ln_f.bias"):
        from_hf(hf_dir)


def test_from_hf_tokenizer_larger_than_embedding(hf_dir):
    tensors = load_file(hf_dir / "model.safetensors")
    tensors["transformer.wte.weight"] = tensors["transformer.wte.weight"][:300]
    save_file(tensors, str(hf_dir / "model.safetensors"))
    edit_config(hf_dir, vocab_size=300)
    with pytest.raises(HFFormatError, match="320 tokens, more than config.json's vocab_size 300"):
        from_hf(hf_dir)


def test_from_hf_corrupt_files(hf_dir):
    (hf_dir / "config.json").write_text("{not json")
    with pytest.raises(HFFormatError, match="config.json: not valid JSON"):
        from_hf(hf_dir)
    shutil.copy(FIXTURE / "config.json", hf_dir / "config.json")
    data = (hf_dir / "model.safetensors").read_bytes()
    (hf_dir / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors"):
        from_hf(hf_dir)


# ---- export ------------------------------------------------------------------------------------
def test_hf_round_trip_is_bit_identical(tmp_path):
    model, tok = from_hf(FIXTURE)
    out = export_hf(model, tok, tmp_path / "out")
    a, b = load_file(FIXTURE / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(a) == set(b)
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    again, tok2 = from_hf(out)
    assert tok2 == tok
    for name, arr in model.parameters().items():
        assert np.array_equal(again.parameters()[name], arr)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["eos_token_id"] == 0 and cfg["model_type"] == "gpt2"
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 0


def test_export_sinusoidal_and_byte_tokenizer(tmp_path):
    cfg = cllm.ModelConfig(vocab_size=256, max_seq_len=16, embedding_dim=16, num_layers=1, num_heads=2, ff_dim=32,
                           pos_encoding="sinusoidal")
    model = cllm.Model(cfg, seed=1)
    out = export_hf(model, ByteTokenizer(), tmp_path / "byte")
    assert np.array_equal(load_file(out / "model.safetensors")["transformer.wpe.weight"], model.position_table())
    back, tok = from_hf(out)
    text = "héllo\n\tw 🙂\x00\x7f"
    assert tok.encode(text).tolist() == ByteTokenizer().encode(text).tolist()
    assert tok.decode(tok.encode(text)) == text
    ids = ByteTokenizer().encode(text)[None]
    assert np.array_equal(back.forward(ids), model.forward(ids))


def test_names_map_both_ways():
    for name in cllm.Model(cllm.ModelConfig(num_layers=1), seed=0).parameters():
        assert cllm_name(hf_name(name)) == name


# ---- live checks against transformers (CI installs torch and transformers) ---------------------
def _transformers():
    return pytest.importorskip("transformers")


@pytest.mark.parametrize("shape", [dict(n_embd=48, n_layer=2, n_head=3, n_inner=None, n_positions=40),
                                   dict(n_embd=64, n_layer=3, n_head=4, n_inner=80, n_positions=24),
                                   dict(n_embd=768, n_layer=12, n_head=12, n_inner=None, n_positions=128)],
                         ids=["n_inner-unset", "n_inner-80", "gpt2-124M-shape"])
@pytest.mark.slow
@pytest.mark.torch
def test_transformers_random_gpt2_imports(tmp_path, shape):
    tf = _transformers()
    import torch

    vocab = 50257 if shape["n_embd"] == 768 else 320
    torch.manual_seed(0)
    hf_model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=vocab, **shape)).eval()
    hf_model.save_pretrained(tmp_path, safe_serialization=True)
    shutil.copy(FIXTURE / "tokenizer.json", tmp_path)
    ids = np.random.default_rng(0).integers(0, 320, (2, 17))
    with torch.no_grad():
        expect = hf_model(torch.tensor(ids)).logits.numpy()
    model, _ = from_hf(tmp_path)
    err = rel_err(model.forward(ids), expect)
    print(f"{shape}: logits vs transformers {err:.2e} (tol 1e-4)")
    assert err < 1e-4


@pytest.mark.slow
@pytest.mark.torch
def test_exported_directory_loads_in_transformers(tmp_path):
    tf = _transformers()
    import torch

    model, tok = from_hf(FIXTURE)
    out = export_hf(model, tok, tmp_path / "out")
    hf_model, info = tf.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched weights
    hf_tok = tf.AutoTokenizer.from_pretrained(out)
    text = str(EXPECTED["text"])
    assert hf_tok(text)["input_ids"] == tok.encode(text).tolist()
    assert hf_tok.eos_token == "<|endoftext|>"
    ids = tok.encode(text)[None]
    with torch.no_grad():
        theirs = hf_model.eval()(torch.tensor(ids.astype(np.int64))).logits.numpy()
    assert rel_err(theirs, model.forward(ids)) < 1e-4


@pytest.mark.torch
def test_exported_byte_tokenizer_in_transformers(tmp_path):
    tf = _transformers()
    cfg = cllm.ModelConfig(vocab_size=256, max_seq_len=16, embedding_dim=16, num_layers=1, num_heads=2, ff_dim=32)
    out = export_hf(cllm.Model(cfg, seed=0), ByteTokenizer(), tmp_path / "byte")
    hf_tok = tf.AutoTokenizer.from_pretrained(out)
    text = "héllo\n\twörld 🙂 x"
    assert hf_tok(text)["input_ids"] == ByteTokenizer().encode(text).tolist()
    assert hf_tok.decode(hf_tok(text)["input_ids"]) == text


@pytest.mark.parametrize("field,value,match", [
    ("n_positions", float("inf"), "'n_positions' must be an integer"),
    ("n_embd", 32.7, "'n_embd' must be an integer, got 32.7"),
    ("n_embd", "32", "'n_embd' must be an integer"),
    ("n_layer", True, "'n_layer' must be an integer, got True"),
    ("tie_word_embeddings", "false", "'tie_word_embeddings' must be true or false"),
    ("layer_norm_epsilon", "1e-5", "'layer_norm_epsilon' must be a finite number"),
    ("resid_pdrop", -0.5, "resid_pdrop = -0.5"),
    ("activation_function", 3, "'activation_function' must be a string"),
    ("vocab_size", None, "'vocab_size' is missing"),
])
def test_from_hf_typed_config_fields(hf_dir, field, value, match):
    """Each field is read as the JSON type GPT2Config writes: no truncation, no bool("false") == True."""
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg[field] = value
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(HFFormatError, match=match) as e:
        from_hf(hf_dir)
    assert str(e.value).startswith(str(hf_dir / "config.json"))


def test_from_hf_refuses_nonfinite_weights(hf_dir):
    tensors = load_file(hf_dir / "model.safetensors")
    tensors["transformer.h.0.mlp.c_fc.weight"][0, 0] = np.nan
    save_file(tensors, str(hf_dir / "model.safetensors"))
    with pytest.raises(HFFormatError, match="transformer.h.0.mlp.c_fc.weight holds NaN or Inf"):
        from_hf(hf_dir)


def test_from_hf_checks_the_shard_index(hf_dir):
    tensors = load_file(hf_dir / "model.safetensors")
    names = sorted(tensors)
    (hf_dir / "model.safetensors").unlink()
    save_file({k: tensors[k] for k in names[:5]}, str(hf_dir / "a.safetensors"))
    save_file({k: tensors[k] for k in names[5:]}, str(hf_dir / "b.safetensors"))
    index = hf_dir / "model.safetensors.index.json"
    wrong = {k: "b.safetensors" for k in names}
    wrong[names[-1]] = "a.safetensors"
    index.write_text(json.dumps({"weight_map": wrong}))
    with pytest.raises(HFFormatError, match=r"b.safetensors: holds tensor transformer.wte.weight, which .* places in 'a.safetensors'"):
        from_hf(hf_dir)
    index.write_text(json.dumps({"weight_map": {k: ("a" if i < 5 else "b") + ".safetensors"
                                                for i, k in enumerate(names + ["transformer.extra"])}}))
    with pytest.raises(HFFormatError, match="lists transformer.extra, which no shard holds"):
        from_hf(hf_dir)
    index.write_text(json.dumps({"weight_map": {names[0]: 123}}))
    with pytest.raises(HFFormatError, match="weight_map.*123 is not a file name"):
        from_hf(hf_dir)
