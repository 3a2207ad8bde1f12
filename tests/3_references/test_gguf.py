"""GGUF export, read back with the gguf package (llama.cpp's own reader) and, where torch is installed, loaded by
transformers' GGUF reader (an independent consumer) to compare logits and token ids."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import cllm
from cllm.interop.gguf_export import export_gguf, gguf_tensors
from cllm.interop.hf import from_hf
from cllm.data.tokenizer import ByteTokenizer

gguf = pytest.importorskip("gguf", reason="the gguf package (pip install 'cllm[interop]')")
FIXTURE = Path(__file__).parent.parent / "fixtures" / "tiny-gpt2"


def read(path):
    r = gguf.GGUFReader(str(path))
    fields = {name: f.contents() for name, f in r.fields.items()}
    tensors = {t.name: np.asarray(t.data) for t in r.tensors}
    return fields, tensors


def test_gguf_holds_every_tensor_and_the_tokenizer(tmp_path):
    model, tok = from_hf(FIXTURE)
    path = export_gguf(model, tok, tmp_path / "m.gguf")
    fields, tensors = read(path)
    expected = dict(gguf_tensors(model))
    assert set(tensors) == set(expected) and len(expected) == len(model.parameters()) + 1  # + the tied output
    for name, arr in expected.items():
        assert tensors[name].dtype == np.float32 and np.array_equal(tensors[name], arr), name
    # layouts as llama.cpp's converter writes them: Conv1D weights transposed to [out, in]
    p = model.parameters()
    assert np.array_equal(tensors["blk.1.ffn_up.weight"], p["h.1.mlp.c_fc.weight"].T)
    assert np.array_equal(tensors["output.weight"], p["wte"])
    c = model.config
    assert fields["general.architecture"] == "gpt2"
    assert (fields["gpt2.context_length"], fields["gpt2.embedding_length"], fields["gpt2.feed_forward_length"],
            fields["gpt2.block_count"], fields["gpt2.attention.head_count"]) == \
        (c.max_seq_len, c.embedding_dim, c.ff_dim, c.num_layers, c.num_heads)
    assert fields["tokenizer.ggml.model"] == "gpt2"
    vocab = tok.hf_tokenizer.get_vocab(with_added_tokens=True)
    assert fields["tokenizer.ggml.tokens"] == sorted(vocab, key=vocab.get)
    import json
    merges = json.loads(tok.hf_tokenizer.to_str())["model"]["merges"]
    assert fields["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in merges]
    assert fields["tokenizer.ggml.eos_token_id"] == tok.eos_id == fields["tokenizer.ggml.bos_token_id"]
    types = fields["tokenizer.ggml.token_type"]
    assert types[tok.eos_id] == gguf.TokenType.CONTROL and types.count(gguf.TokenType.CONTROL) == 1


def test_gguf_f16(tmp_path):
    model, tok = from_hf(FIXTURE)
    _, tensors = read(export_gguf(model, tok, tmp_path / "m.gguf", dtype="f16"))
    for name, arr in gguf_tensors(model):
        if arr.ndim == 2:
            assert tensors[name].dtype == np.float16 and np.array_equal(tensors[name], arr.astype(np.float16))
        else:
            assert np.array_equal(tensors[name], arr)
    with pytest.raises(ValueError, match="dtype must be one of"):
        export_gguf(model, tok, tmp_path / "x.gguf", dtype="q4")
    assert not (tmp_path / "x.gguf").exists()


def test_gguf_byte_tokenizer_and_padded_vocab(tmp_path):
    cfg = cllm.ModelConfig(vocab_size=260, max_seq_len=16, embedding_dim=16, num_layers=1, num_heads=2, ff_dim=64,
                           pos_encoding="sinusoidal")
    model = cllm.Model(cfg, seed=0)
    fields, tensors = read(export_gguf(model, ByteTokenizer(), tmp_path / "b.gguf"))
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens) == 260 and len(set(tokens)) == 260
    assert fields["tokenizer.ggml.token_type"][256:] == [gguf.TokenType.UNUSED] * 4
    assert len(fields["tokenizer.ggml.merges"]) == 1  # llama.cpp's loader needs at least one
    assert np.array_equal(tensors["position_embd.weight"], model.position_table())


@pytest.mark.slow
@pytest.mark.torch
def test_gguf_loads_in_transformers(tmp_path):
    tf = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    import torch

    _, tok = from_hf(FIXTURE)
    # transformers' GGUF reader assumes ff = 4 C (it ignores feed_forward_length for gpt2)
    model = cllm.Model(cllm.ModelConfig(vocab_size=320, max_seq_len=32, embedding_dim=32, num_layers=2,
                                        num_heads=4, ff_dim=128), seed=3)
    rng = np.random.default_rng(1)
    for p in model.parameters().values():
        if p.ndim == 1:
            p += 0.1 * rng.standard_normal(p.shape).astype(np.float32)
    export_gguf(model, tok, tmp_path / "m.gguf")
    # its GGUF mapping sets n_ctx, not n_positions (the size of wpe): given here
    hf_model = tf.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", n_positions=32).eval()
    hf_tok = tf.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    text = "def greet(name):\n    return name  # héllo"
    ids = tok.encode(text)
    assert hf_tok(text)["input_ids"] == ids.tolist()
    with torch.no_grad():
        theirs = hf_model(torch.tensor(ids[None].astype(np.int64))).logits.numpy()
    ours = model.forward(ids[None])
    err = float(np.abs(theirs - ours).max() / np.abs(ours).max())
    print(f"GGUF in transformers vs CLLM logits: {err:.2e} (tol 1e-4)")
    assert err < 1e-4


def _llama_cpp_logits_error(llama_cpp, model, tok, path) -> float:
    """max |llama.cpp's logits - CLLM's| / max |CLLM's| over a short text (tokenized alike by both)."""
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, verbose=False, n_ctx=model.config.max_seq_len,
                          n_threads=2, type_k=0, type_v=0)  # float32 KV cache
    text = "def greet(name):\n    return name  # héllo"
    ids = tok.encode(text).tolist()
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids
    llm.eval(ids)
    theirs = np.array(llm.scores[:len(ids)])
    ours = model.forward(np.array([ids]))[0]
    return float(np.abs(theirs - ours).max() / np.abs(ours).max())


@pytest.mark.parametrize("tokenizer", ["bpe", "byte"])
def test_gguf_runs_in_llama_cpp(tmp_path, tokenizer):
    """llama.cpp itself (the llama-cpp-python package, which CI builds from source) loads the file, tokenizes
    text to CLLM's ids and computes CLLM's logits. Tolerance 1e-3: llama.cpp's CPU GELU reads a float16 table."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (CI installs it)")
    if tokenizer == "bpe":
        model, tok = from_hf(FIXTURE)
    else:
        tok = ByteTokenizer()
        model = cllm.Model(cllm.ModelConfig(vocab_size=256, max_seq_len=64, embedding_dim=32, num_layers=2,
                                            num_heads=4, ff_dim=128), seed=1)
    path = export_gguf(model, tok, tmp_path / "m.gguf")
    err = _llama_cpp_logits_error(llama_cpp, model, tok, path)
    print(f"llama.cpp vs CLLM logits ({tokenizer}): {err:.2e} (tol 1e-3)")
    assert err < 1e-3


def test_gguf_refuses_nonfinite_weights(tmp_path):
    model, tok = from_hf(FIXTURE)
    model.parameters()["h.1.attn.c_proj.bias"][3] = np.inf
    with pytest.raises(ValueError, match="blk.1.attn_output.bias holds NaN or Inf"):
        export_gguf(model, tok, tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


def _llama(tie, seed=1, V=320):
    model = cllm.Model(cllm.ModelConfig(architecture="llama", vocab_size=V, max_seq_len=64, embedding_dim=48,
                                        num_layers=2, num_heads=6, num_kv_heads=2, ff_dim=80, tie_embeddings=tie,
                                        rope_theta=20000.0), seed=seed)
    rng = np.random.default_rng(seed)
    for p in model.parameters().values():  # norm weights off 1, larger weights: non-trivial logits
        p += rng.normal(0, 0.2 if p.ndim == 1 else 0.05, p.shape).astype(np.float32)
    return model


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_gguf_llama_reads_back(tmp_path, tie):
    model = _llama(tie)
    _, tok = from_hf(FIXTURE)
    fields, tensors = read(export_gguf(model, tok, tmp_path / "l.gguf"))
    expected = dict(gguf_tensors(model))
    assert set(tensors) == set(expected) and len(expected) == len(model.parameters())
    assert ("output.weight" in tensors) == (not tie)  # tied: llama.cpp reuses token_embd
    for name, arr in expected.items():
        assert tensors[name].dtype == np.float32 and np.array_equal(tensors[name], arr), name
    p, c = model.parameters(), model.config
    assert np.array_equal(tensors["blk.1.ffn_gate.weight"], p["layers.1.mlp.gate_proj.weight"])
    # q/k rows: head h's pair i moves from rows (i, i + hs/2) to (2i, 2i + 1)
    q, hs = p["layers.0.self_attn.q_proj.weight"], c.head_dim
    got = tensors["blk.0.attn_q.weight"]
    for h in range(c.num_heads):
        for i in range(hs // 2):
            assert np.array_equal(got[h * hs + 2 * i], q[h * hs + i])
            assert np.array_equal(got[h * hs + 2 * i + 1], q[h * hs + hs // 2 + i])
    assert fields["general.architecture"] == "llama"
    assert (fields["llama.attention.head_count"], fields["llama.attention.head_count_kv"],
            fields["llama.rope.freq_base"], fields["llama.rope.dimension_count"], fields["llama.feed_forward_length"]) \
        == (6, 2, 20000.0, 8, 80)
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(c.rms_norm_eps)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_gguf_llama_runs_in_llama_cpp(tmp_path, tie):
    """llama.cpp computes the exported llama's logits (its rotary embedding on the permuted q/k rows)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (CI installs it)")
    model = _llama(tie)
    _, tok = from_hf(FIXTURE)
    path = export_gguf(model, tok, tmp_path / "l.gguf")
    err = _llama_cpp_logits_error(llama_cpp, model, tok, path)
    print(f"llama.cpp vs CLLM logits (llama, tied={tie}): {err:.2e} (tol 1e-3)")
    assert err < 1e-3
