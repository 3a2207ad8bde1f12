"""The Llama architecture against PyTorch: logits equal to transformers' LlamaForCausalLM on the same random weights
(imported with from_hf), an exported directory that transformers loads with no weight warnings and equal logits,
and a 30-step AdamW trajectory equal to PyTorch eager's (benchmarks/torch_llama.py, the model the benchmark races).
The parts and gradients against the float64 oracle are in test_parts.py and test_model_vs_oracle.py."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

import cllm
from cllm.interop.hf import HFFormatError, cllm_name, export_hf, from_hf, hf_name
from cllm.data.tokenizer import ByteTokenizer

FIXTURE = Path(__file__).parent.parent / "fixtures" / "tiny-gpt2"  # its byte-level BPE tokenizer (320 tokens)
BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def rel_err(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def _transformers():
    return pytest.importorskip("transformers")


def random_hf_llama(tf, path, seed=0, **shape):
    """A LlamaForCausalLM with random weights (norm weights off 1), saved to path with the fixture's tokenizer."""
    import torch

    torch.manual_seed(seed)
    hf_model = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=320, **shape)).eval()
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.2 * torch.randn_like(p))
    hf_model.save_pretrained(path)
    shutil.copy(FIXTURE / "tokenizer.json", path)
    return hf_model


SHAPES = [
    dict(hidden_size=48, intermediate_size=100, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
         max_position_embeddings=40, tie_word_embeddings=False),
    dict(hidden_size=64, intermediate_size=172, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
         max_position_embeddings=24, tie_word_embeddings=True, rms_norm_eps=1e-5),
    dict(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=1,
         max_position_embeddings=128, tie_word_embeddings=False, rope_theta=500000.0),
]


@pytest.mark.torch
@pytest.mark.parametrize("shape", SHAPES, ids=["H6-KV2-untied", "H4-KV4-tied", "H8-KV1-untied-theta5e5-T100"])
def test_transformers_random_llama_imports(tmp_path, shape):
    tf = _transformers()
    import torch

    hf_model = random_hf_llama(tf, tmp_path, **shape)
    T = min(100, shape["max_position_embeddings"])
    ids = np.random.default_rng(0).integers(0, 320, (2, T))
    with torch.no_grad():
        expect = hf_model(torch.tensor(ids)).logits.numpy()
    model, _ = from_hf(tmp_path)
    c = model.config
    assert (c.architecture, c.num_kv_heads, c.tie_embeddings) == \
        ("llama", shape["num_key_value_heads"], shape["tie_word_embeddings"])
    err = rel_err(model.forward(ids), expect)
    print(f"{shape}: logits vs transformers {err:.2e} (tol 1e-4)")
    assert err < 1e-4


@pytest.mark.torch
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_exported_llama_loads_in_transformers(tmp_path, tie):
    tf = _transformers()
    import torch

    _, tok = from_hf(FIXTURE)
    cfg = cllm.ModelConfig(architecture="llama", vocab_size=320, max_seq_len=32, embedding_dim=48, num_layers=2,
                           num_heads=6, num_kv_heads=3, ff_dim=80, tie_embeddings=tie)
    model = cllm.Model(cfg, seed=2)
    for name, p in model.parameters().items():  # norm weights off 1, larger weights: non-trivial logits
        p += np.random.default_rng(1).normal(0, 0.2 if p.ndim == 1 else 0.05, p.shape).astype(np.float32)
    out = export_hf(model, tok, tmp_path / "out")
    hf_model, info = tf.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched weights
    assert type(hf_model).__name__ == "LlamaForCausalLM"
    ids = np.random.default_rng(3).integers(0, 320, (2, 32))
    with torch.no_grad():
        theirs = hf_model.eval()(torch.tensor(ids)).logits.numpy()
    assert rel_err(theirs, model.forward(ids)) < 1e-4
    back, _ = from_hf(out)  # and back, bit for bit
    assert back.config == model.config
    for name, arr in model.parameters().items():
        assert np.array_equal(back.parameters()[name], arr), name


def test_llama_names_map_both_ways(tmp_path):
    cfg = cllm.ModelConfig(architecture="llama", num_layers=1, tie_embeddings=False)
    for name in cllm.Model(cfg, seed=0).parameters():
        assert cllm_name(hf_name(name, "llama"), "llama") == name
    assert hf_name("lm_head.weight", "llama") == "lm_head.weight"
    assert hf_name("layers.0.mlp.up_proj.weight", "llama") == "model.layers.0.mlp.up_proj.weight"


def test_llama_config_round_trip_and_refusals(tmp_path):
    model = cllm.Model(cllm.ModelConfig(architecture="llama", vocab_size=256, max_seq_len=16, embedding_dim=16,
                                        num_layers=1, num_heads=4, num_kv_heads=2, ff_dim=24, rope_theta=1e6,
                                        rms_norm_eps=1e-6), seed=0)
    out = export_hf(model, ByteTokenizer(), tmp_path / "l")
    assert from_hf(out)[0].config == model.config
    cfg = json.loads((out / "config.json").read_text())
    for change, match in ((dict(hidden_act="gelu"), "hidden_act = 'gelu' is not supported"),
                          (dict(attention_bias=True), "attention_bias = True is not supported"),
                          (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 1e6}), "rope_type = 'llama3'"),
                          (dict(head_dim=8), "head_dim = 8 is not supported"),
                          (dict(num_key_value_heads=3), "num_kv_heads 3 does not divide num_heads 4"),
                          (dict(rms_norm_eps="small"), "'rms_norm_eps' must be a finite number")):
        (out / "config.json").write_text(json.dumps({**cfg, **change}))
        with pytest.raises(HFFormatError, match=match):
            from_hf(out)


def test_tied_llama_refuses_a_different_lm_head(tmp_path):
    from safetensors.numpy import load_file, save_file

    model = cllm.Model(cllm.ModelConfig(architecture="llama", vocab_size=256, max_seq_len=16, embedding_dim=16,
                                        num_layers=1, num_heads=2, ff_dim=24), seed=0)
    out = export_hf(model, ByteTokenizer(), tmp_path / "l")
    tensors = load_file(out / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]  # tied, saved twice: accepted
    save_file(tensors, out / "model.safetensors")
    from_hf(out)
    tensors["lm_head.weight"] = tensors["lm_head.weight"] + 1
    save_file(tensors, out / "model.safetensors")
    with pytest.raises(HFFormatError, match="lm_head.weight differs from model.embed_tokens.weight"):
        from_hf(out)


@pytest.mark.slow
@pytest.mark.torch
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_30_adamw_steps_equal_pytorch(tie, capsys):
    """forward + backward + clip_grad_norm(1.0) + AdamW, 30 steps: losses within 1e-3 of PyTorch eager's at every
    step, every gradient of the first step, and the parameters after the last (torch_llama's check)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import torch_gpt2
        import torch_llama
    finally:
        sys.path.remove(str(BENCHMARKS))
    cfg = cllm.ModelConfig(architecture="llama", vocab_size=67, max_seq_len=32, embedding_dim=48, num_layers=2,
                           num_heads=6, num_kv_heads=2, ff_dim=100, tie_embeddings=tie)
    model = cllm.Model(cfg, seed=0)
    tmodel = torch_llama.build_torch_llama(cfg)
    torch_llama.load_cllm_parameters(tmodel, model.parameters())
    ok = torch_llama.check_equivalence(model, tmodel, 4, 30, torch_gpt2)
    out = capsys.readouterr().out
    assert out.count("step ") == 30
    assert ok, out


@pytest.mark.slow
def test_llama_checkpoint_round_trip(tmp_path):
    """A checkpoint of a llama (GQA, untied) loads back bit for bit with its config and optimizer state."""
    from cllm.train.checkpoint import load_checkpoint, save_checkpoint

    cfg = cllm.ModelConfig(architecture="llama", vocab_size=256, max_seq_len=16, embedding_dim=32, num_layers=2,
                           num_heads=4, num_kv_heads=2, ff_dim=40, tie_embeddings=False, rope_theta=5e5)
    model = cllm.Model(cfg, seed=3)
    opt = cllm.AdamW(model, lr=1e-3)
    x = np.random.default_rng(0).integers(0, 256, (2, 16))
    model.forward_backward(x, x)
    opt.step()
    ck = load_checkpoint(save_checkpoint(tmp_path / "c.safetensors", model, opt, ByteTokenizer()))
    assert ck.config == cfg
    for name, arr in model.parameters().items():
        assert np.array_equal(ck.model.parameters()[name], arr), name
    assert np.array_equal(ck.model.forward(x), model.forward(x))
