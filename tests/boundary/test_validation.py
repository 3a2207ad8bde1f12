"""Bad input at the boundary raises a clear Python exception naming the problem (never a crash)."""
import dataclasses

import numpy as np
import pytest

import cllm

CFG = cllm.ModelConfig(vocab_size=50, max_seq_len=8, embedding_dim=16, num_layers=1, num_heads=2, ff_dim=32)


@pytest.fixture(scope="module")
def model():
    return cllm.Model(CFG, seed=0)


def ok(B=2, T=4):
    return np.zeros((B, T), dtype=np.int64)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(embedding_dim=30, num_heads=4), ValueError, "not divisible by num_heads"),
    (dict(vocab_size=0), ValueError, "vocab_size must be positive"),
    (dict(num_layers=-1), ValueError, "num_layers must be positive"),
    (dict(max_seq_len=0), ValueError, "max_seq_len must be positive"),
    (dict(ff_dim=0), ValueError, "ff_dim must be positive"),
    (dict(embedding_dim=2.5), TypeError, "embedding_dim must be an int"),
    (dict(dropout=1.0), ValueError, "dropout"),
    (dict(pos_encoding="rotary"), ValueError, "pos_encoding"),
    (dict(vocab_size=2**31), ValueError, "vocab_size 2,147,483,648 is too large"),
    (dict(embedding_dim=2**30, num_heads=1), ValueError, "embedding_dim 1,073,741,824 is too large"),
    (dict(num_heads=True), TypeError, "num_heads must be an int"),
    (dict(architecture="mistral"), ValueError, "architecture must be one of"),
    (dict(num_kv_heads=2), ValueError, "num_kv_heads 2 needs architecture 'llama'"),
    (dict(tie_embeddings=False), ValueError, "tie_embeddings=False needs architecture 'llama'"),
    (dict(rope_theta=500000.0), ValueError, "rope_theta 500000.0 needs architecture 'llama'"),
    (dict(pos_encoding="rope"), ValueError, "pos_encoding of a gpt2 model"),
    (dict(architecture="llama", pos_encoding="learned"), ValueError, "pos_encoding of a llama model"),
    (dict(architecture="llama", num_heads=4, num_kv_heads=3), ValueError, "num_kv_heads 3 does not divide"),
    (dict(architecture="llama", embedding_dim=12, num_heads=4), ValueError, "even head size"),
    (dict(architecture="llama", rms_norm_eps=0.0), ValueError, "rms_norm_eps"),
    (dict(architecture="llama", rope_theta=float("nan")), ValueError, "rope_theta"),
    (dict(architecture="llama", tie_embeddings="no"), TypeError, "tie_embeddings"),
], ids=["heads-divide", "vocab0", "layers-neg", "seq0", "ff0", "float-dim", "dropout1", "posenc", "vocab-int32",
        "qkv-int32", "bool", "arch", "gpt2-kv", "gpt2-untied", "gpt2-theta", "gpt2-rope", "llama-learned",
        "kv-divide", "odd-head", "eps0", "theta-nan", "tie-str"])
def test_bad_config(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        cllm.ModelConfig(**kwargs)


def test_config_defaults_per_architecture():
    """The defaults resolve per architecture, and an older checkpoint's config (no llama keys) is a gpt2."""
    gpt2, llama = cllm.ModelConfig(), cllm.ModelConfig(architecture="llama", num_heads=4)
    assert (gpt2.pos_encoding, gpt2.num_kv_heads, gpt2.tie_embeddings) == ("learned", 4, True)
    assert (llama.pos_encoding, llama.num_kv_heads) == ("rope", 4)
    old = {k: v for k, v in gpt2.to_dict().items()
           if k not in ("architecture", "num_kv_heads", "rope_theta", "rms_norm_eps", "tie_embeddings")}
    assert cllm.ModelConfig.from_dict(old) == gpt2
    assert cllm.ModelConfig.from_dict(llama.to_dict()) == llama


def test_one_schema_and_one_check():
    """ModelConfig's fields are the core's list, in order, with its defaults; the rules are the core's alone, so
    a caller of _core directly meets the same one-line errors as ModelConfig's."""
    from cllm import _core

    fields = [(f.name, f.default) for f in dataclasses.fields(cllm.ModelConfig)]
    core = [(name, None if name in ("pos_encoding", "num_kv_heads") else default)
            for name, _, default, _, _ in _core.config_fields]
    assert fields == core
    c = _core.Config()
    c.architecture, c.pos_encoding = "llama", "learned"
    with pytest.raises(ValueError, match="pos_encoding of a llama model must be one of"):
        _core.ParamLayout(c)
    c.pos_encoding, c.num_kv_heads = "rope", 3
    with pytest.raises(ValueError, match="num_kv_heads 3 does not divide num_heads 4"):
        _core.ParamLayout(c)
    with pytest.raises(ValueError, match="architecture must be one of 'gpt2', 'llama', got 'bert'"):
        c.architecture = "bert"
    resolved = _core.resolve_config(_core.Config())
    assert (resolved.pos_encoding, resolved.num_kv_heads) == ("learned", 4)


def test_config_stores_plain_python_numbers():
    """NumPy ints and floats are taken and stored as Python ones (so the config serialises as JSON)."""
    cfg = cllm.ModelConfig(vocab_size=np.int64(50), max_seq_len=np.int32(8), dropout=np.float32(0.5))
    assert type(cfg.vocab_size) is int and type(cfg.max_seq_len) is int and type(cfg.dropout) is float
    assert cfg == cllm.ModelConfig(vocab_size=50, max_seq_len=8, dropout=0.5)


def test_token_out_of_range_names_row_and_position(model):
    x = ok()
    x[1, 3] = 300
    with pytest.raises(ValueError, match=r"token id 300 out of range for vocab_size 50 \(inputs batch row 1, position 3\)"):
        model.forward_backward(x, ok())
    y = ok()
    y[0, 2] = -1
    with pytest.raises(ValueError, match=r"token id -1 out of range.*targets batch row 0, position 2"):
        model.forward_backward(ok(), y)
    with pytest.raises(ValueError, match="out of range"):
        model.forward(x)
    with pytest.raises(ValueError, match="out of range"):
        model.loss(x, ok())


def test_huge_ids_do_not_wrap(model):
    x = ok()
    x[0, 0] = 2**32 + 1  # would wrap to 1 in int32
    with pytest.raises(ValueError, match="out of range"):
        model.forward(x)


@pytest.mark.parametrize("bad", [np.zeros((2, 4), np.float32), np.zeros((2, 4), bool).astype(object),
                                 np.array([["a"] * 4] * 2)], ids=["float", "object", "str"])
def test_non_integer_dtype(model, bad):
    with pytest.raises(TypeError, match="integer"):
        model.forward_backward(bad, ok())
    with pytest.raises(TypeError, match="integer"):
        model.forward(bad)


@pytest.mark.parametrize("shape", [(4,), (1, 2, 4)], ids=["1d", "3d"])
def test_wrong_ndim(model, shape):
    with pytest.raises(ValueError, match="2-D"):
        model.forward_backward(np.zeros(shape, np.int32), np.zeros(shape, np.int32))


def test_shape_mismatch(model):
    with pytest.raises(ValueError, match="differ"):
        model.forward_backward(ok(2, 4), ok(2, 3))
    with pytest.raises(ValueError, match="differ"):
        model.loss(ok(2, 4), ok(1, 4))


def test_too_long(model):
    with pytest.raises(ValueError, match="sequence length 9 exceeds max_seq_len 8"):
        model.forward_backward(ok(1, 9), ok(1, 9))
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        model.forward(ok(1, 9))


@pytest.mark.parametrize("shape", [(0, 4), (2, 0)], ids=["B0", "T0"])
def test_empty(model, shape):
    with pytest.raises(ValueError, match="empty"):
        model.forward_backward(np.zeros(shape, np.int32), np.zeros(shape, np.int32))


def test_non_contiguous_and_other_int_dtypes_work(model):
    x = np.arange(32, dtype=np.int16).reshape(4, 8)[:, ::2] % 50  # strided view
    y = (x + 1) % 50
    ref = model.loss(np.ascontiguousarray(x, np.int32), np.ascontiguousarray(y, np.int32))
    assert model.loss(x, y) == ref


def test_generate_validation(model):
    with pytest.raises(ValueError, match="empty"):
        model.generate([], 5)
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        model.generate(list(range(9)), 5)
    with pytest.raises(ValueError, match="token id 77 out of range.*position 1"):
        model.generate([1, 77], 5)
    with pytest.raises(ValueError, match="temperature"):
        model.generate([1], 5, temperature=-1)
    with pytest.raises(ValueError, match="top_k"):
        model.generate([1], 5, top_k=0)
    with pytest.raises(ValueError, match="top_p"):
        model.generate([1], 5, top_p=1.5)


def test_optimizer_and_clip_validation(model):
    with pytest.raises(ValueError, match="lr"):
        cllm.AdamW(model, lr=-1)
    with pytest.raises(ValueError, match="betas"):
        cllm.AdamW(model, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="max_norm"):
        cllm.clip_grad_norm(model, 0.0)
    with pytest.raises(TypeError, match="cllm.Model"):
        cllm.AdamW(object())
    with pytest.raises(ValueError, match="threads"):
        cllm.set_num_threads(0)


def test_load_parameters_checks_names_and_shapes(model):
    params = {k: v.copy() for k, v in model.parameters().items()}
    params["wte"] = params["wte"][:, :3]
    with pytest.raises(ValueError, match="wte"):
        model.load_parameters(params)
    params.pop("wte")
    with pytest.raises(ValueError, match="missing"):
        model.load_parameters(params)
