"""Hugging Face GPT-2 and Llama in and out.

`from_hf(path)` reads a directory saved by transformers (`GPT2LMHeadModel` or `LlamaForCausalLM.save_pretrained`):
config.json, the weights from model.safetensors or a sharded model.safetensors.index.json, the tokenizer from
tokenizer.json or vocab.json + merges.txt. Every config field that changes the model's maths is honoured or
refused with an error naming it. `export_hf(model, tokenizer, path)` writes a directory transformers'
AutoModelForCausalLM and AutoTokenizer load as they are.

CLLM's parameter names are the state-dict names without the "transformer." (GPT-2) or "model." (Llama) prefix,
in the same layouts (GPT-2's Conv1D [in, out], Llama's nn.Linear [out, in]), so weights move across unchanged.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import numpy as np

from ..core import safetensors_io
from ..core.config import ModelConfig
from ..errors import CLLMError, MissingFileError
from ..core.files import atomic_write, read_json_object
from ..core.model import Model, parameter_shapes
from ..data.tokenizer import Tokenizer

PathLike = Union[str, "os.PathLike[str]"]
PREFIXES = {"gpt2": "transformer.", "llama": "model."}
_BUFFERS = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers older transformers saved; not weights
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # the tanh approximation CLLM computes
_LAYER_NORM_EPS = 1e-5


class HFFormatError(CLLMError, ValueError):
    """A Hugging Face directory CLLM cannot read as the model it describes (names the file and the field)."""


# ----------------------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------------------
class _Fields:
    """Typed reads of config.json's fields, each error naming the file, the field and the value."""

    def __init__(self, hf: dict, source):
        self.hf, self.source = hf, source

    def _get(self, names, default):
        for name in names:
            if self.hf.get(name) is not None:
                return name, self.hf[name]
        if default is None:
            raise HFFormatError(f"{self.source}: field {names[0]!r} is missing (or null)")
        return names[0], default

    def int(self, *names, default=None) -> int:
        name, value = self._get(names, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise HFFormatError(f"{self.source}: field {name!r} must be an integer, got {value!r}")
        return value

    def float(self, *names, default=None) -> float:
        name, value = self._get(names, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise HFFormatError(f"{self.source}: field {name!r} must be a finite number, got {value!r}")
        return float(value)

    def bool(self, name, default: bool) -> bool:
        _, value = self._get((name,), default)
        if not isinstance(value, bool):
            raise HFFormatError(f"{self.source}: field {name!r} must be true or false, got {value!r}")
        return value

    def str(self, name, default: str) -> str:
        _, value = self._get((name,), default)
        if not isinstance(value, str):
            raise HFFormatError(f"{self.source}: field {name!r} must be a string, got {value!r}")
        return value

    def refuse(self, name, value, why):
        raise HFFormatError(f"{self.source}: {name} = {value!r} is not supported: {why}")


def _model_config(source, **kw) -> ModelConfig:
    try:
        return ModelConfig(**kw)
    except (TypeError, ValueError) as e:
        raise HFFormatError(f"{source}: {e}") from None


def config_from_hf(hf: dict, source: PathLike = "config.json") -> ModelConfig:
    """The ModelConfig of a transformers GPT2Config or LlamaConfig (as a dict); HFFormatError naming a field CLLM
    cannot honour."""
    f = _Fields(hf, source)
    model_type = hf.get("model_type")
    if model_type == "llama":
        return _llama_config_from_hf(f, source)
    if model_type != "gpt2":
        f.refuse("model_type", model_type, "CLLM imports GPT-2 and Llama models (model_type 'gpt2' or 'llama')")
    act = f.str("activation_function", "gelu_new")
    if act not in _TANH_GELUS:
        f.refuse("activation_function", act, f"CLLM's GELU is the tanh approximation ({', '.join(_TANH_GELUS)})")
    eps = f.float("layer_norm_epsilon", default=_LAYER_NORM_EPS)
    if not math.isclose(eps, _LAYER_NORM_EPS, rel_tol=1e-6):
        f.refuse("layer_norm_epsilon", eps, f"CLLM's LayerNorm uses {_LAYER_NORM_EPS}")
    for name, wanted, why in (("scale_attn_weights", True, "CLLM scales attention scores by 1/sqrt(head_dim)"),
                              ("scale_attn_by_inverse_layer_idx", False, "CLLM does not scale scores by layer"),
                              ("add_cross_attention", False, "CLLM is decoder-only"),
                              ("tie_word_embeddings", True, "CLLM's LM head is tied to wte")):
        if f.bool(name, wanted) != wanted:
            f.refuse(name, hf.get(name), why)
    f.bool("reorder_and_upcast_attn", False)  # float32 scores in another order: CLLM computes them in float32
    drops = [f.float(k, default=0.0) for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop")]
    for k, p in zip(("resid_pdrop", "embd_pdrop", "attn_pdrop"), drops):
        if not 0.0 <= p < 1.0:
            f.refuse(k, p, "a dropout probability is in [0, 1)")
    C = f.int("n_embd", "hidden_size")
    return _model_config(source, vocab_size=f.int("vocab_size"), max_seq_len=f.int("n_positions", "n_ctx"),
                         embedding_dim=C, num_layers=f.int("n_layer", "num_hidden_layers"),
                         num_heads=f.int("n_head", "num_attention_heads"), ff_dim=f.int("n_inner", default=4 * C),
                         dropout=max(drops), pos_encoding="learned")


def _check_rope(f: _Fields) -> dict:
    """The rope_parameters mapping ({} if absent), every rotary setting checked to be the default (unscaled) one:
    transformers 5 keeps them in rope_parameters, earlier versions in rope_scaling with the type under "rope_type"
    or the older "type"; both are read, so that neither spelling is ignored."""
    for field in ("rope_parameters", "rope_scaling"):
        value = f.hf.get(field)
        if value is None:
            continue
        if not isinstance(value, dict):
            f.refuse(field, value, "a mapping is expected (or null)")
        for key in ("rope_type", "type"):
            if value.get(key) not in (None, "default"):
                f.refuse(f"{field}.{key}", value[key], "CLLM's rotary embedding is the default (unscaled) one")
        if "rope_type" not in value and "type" not in value and set(value) - {"rope_theta", "partial_rotary_factor"}:
            f.refuse(field, value, "it names no rope_type; CLLM's rotary embedding is the default (unscaled) one")
        if value.get("partial_rotary_factor", 1.0) != 1.0:
            f.refuse(f"{field}.partial_rotary_factor", value["partial_rotary_factor"],
                     "CLLM rotates the whole head (1.0)")
    if f.hf.get("partial_rotary_factor", 1.0) not in (None, 1.0):
        f.refuse("partial_rotary_factor", f.hf["partial_rotary_factor"], "CLLM rotates the whole head (1.0)")
    return f.hf.get("rope_parameters") or {}


def _llama_config_from_hf(f: _Fields, source) -> ModelConfig:
    hf = f.hf
    act = f.str("hidden_act", "silu")
    if act != "silu":
        f.refuse("hidden_act", act, "CLLM's SwiGLU gates with silu")
    for name, why in (("attention_bias", "CLLM's llama projections have no bias"),
                      ("mlp_bias", "CLLM's llama MLP has no bias")):
        if f.bool(name, False):
            f.refuse(name, True, why)
    if f.int("pretraining_tp", default=1) != 1:
        f.refuse("pretraining_tp", hf.get("pretraining_tp"), "CLLM computes the projections unsplit (1)")
    rope = _check_rope(f)
    theta = f.float("rope_theta", default=10000.0)
    if "rope_theta" in rope:  # transformers 5 reads this one, earlier versions the top-level one: they must agree
        inner = _Fields(rope, source).float("rope_theta")
        if hf.get("rope_theta") is not None and inner != theta:
            f.refuse("rope_theta", theta, f"it differs from rope_parameters.rope_theta = {inner!r}")
        theta = inner
    C, H = f.int("hidden_size"), f.int("num_attention_heads")
    window, T = hf.get("sliding_window"), f.int("max_position_embeddings")
    no_effect = window is None or hf.get("use_sliding_window") is False or (isinstance(window, int) and window >= T)
    if not no_effect:  # a window as long as the context, or switched off, changes nothing
        f.refuse("sliding_window", window, "CLLM's attention sees the whole context (null, or at least "
                                           f"max_position_embeddings = {T})")
    if H > 0 and f.int("head_dim", default=C // H) != C // H:
        f.refuse("head_dim", hf.get("head_dim"), f"CLLM's head size is hidden_size / num_attention_heads = {C // H}")
    dropout = f.float("attention_dropout", default=0.0)
    if not 0.0 <= dropout < 1.0:
        f.refuse("attention_dropout", dropout, "a dropout probability is in [0, 1)")
    return _model_config(source, architecture="llama", vocab_size=f.int("vocab_size"),
                         max_seq_len=T, embedding_dim=C,
                         num_layers=f.int("num_hidden_layers"), num_heads=H,
                         num_kv_heads=f.int("num_key_value_heads", default=H), ff_dim=f.int("intermediate_size"),
                         dropout=dropout, rope_theta=theta, rms_norm_eps=f.float("rms_norm_eps", default=1e-6),
                         tie_embeddings=f.bool("tie_word_embeddings", False))


def config_to_hf(config: ModelConfig, bos_id: Optional[int], eos_id: Optional[int]) -> dict:
    """transformers' GPT2Config or LlamaConfig (as a dict) of a CLLM model."""
    p = float(config.dropout)
    if config.architecture == "llama":  # CLLM's dropout (every site) becomes the attention's, the one Llama has
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": config.vocab_size,
                "max_position_embeddings": config.max_seq_len, "hidden_size": config.embedding_dim,
                "intermediate_size": config.ff_dim, "num_hidden_layers": config.num_layers,
                "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
                "head_dim": config.head_dim, "hidden_act": "silu", "rms_norm_eps": config.rms_norm_eps,
                "rope_theta": config.rope_theta,
                "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
                "attention_bias": False, "mlp_bias": False, "attention_dropout": p, "pretraining_tp": 1,
                "initializer_range": 0.02, "tie_word_embeddings": config.tie_embeddings, "use_cache": True,
                "bos_token_id": bos_id, "eos_token_id": eos_id, "torch_dtype": "float32"}
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": config.vocab_size,
            "n_positions": config.max_seq_len, "n_embd": config.embedding_dim, "n_layer": config.num_layers,
            "n_head": config.num_heads, "n_inner": config.ff_dim, "activation_function": "gelu_new",
            "layer_norm_epsilon": _LAYER_NORM_EPS, "resid_pdrop": p, "embd_pdrop": p, "attn_pdrop": p,
            "initializer_range": 0.02, "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False, "tie_word_embeddings": True, "use_cache": True,
            "bos_token_id": bos_id, "eos_token_id": eos_id, "torch_dtype": "float32"}


# ----------------------------------------------------------------------------------------------------
# weights
# ----------------------------------------------------------------------------------------------------
def _weight_files(path: Path) -> Tuple[list, Optional[dict]]:
    """The safetensors files holding the weights, and the shard index's tensor -> file map (None: one file)."""
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.is_file():
        return [single], None
    if index.is_file():
        weight_map = read_json_object(index, HFFormatError).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise HFFormatError(f"{index}: field 'weight_map' is missing or empty")
        for tensor, name in weight_map.items():
            if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
                raise HFFormatError(f"{index}: weight_map[{tensor!r}] = {name!r} is not a file name in the "
                                    f"directory")
        return [path / name for name in dict.fromkeys(weight_map.values())], weight_map
    for pickle in ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack"):
        if (path / pickle).exists():
            raise HFFormatError(
                f"{path / pickle}: CLLM reads only safetensors weights (a pickle can run code when loaded); "
                f"convert once with transformers: AutoModelForCausalLM.from_pretrained(DIR)"
                f".save_pretrained(DIR, safe_serialization=True)")
    raise MissingFileError(2, "no model.safetensors or model.safetensors.index.json in the directory", str(path))


def hf_name(name: str, architecture: str = "gpt2") -> str:
    """transformers' name of a CLLM parameter ("wte" -> "transformer.wte.weight"; llama "norm.weight" ->
    "model.norm.weight", "lm_head.weight" as it is)."""
    if architecture == "llama":
        return name if name == "lm_head.weight" else PREFIXES["llama"] + name
    return PREFIXES["gpt2"] + (name + ".weight" if name in ("wte", "wpe") else name)


def cllm_name(name: str, architecture: str = "gpt2") -> str:
    """CLLM's name of a transformers tensor, prefixed or bare ("transformer.wte.weight" -> "wte")."""
    prefix = PREFIXES[architecture]
    name = name[len(prefix):] if name.startswith(prefix) else name
    if architecture == "llama":
        return name
    return name[:-len(".weight")] if name in ("wte.weight", "wpe.weight") else name


def read_hf_weights(path: Path, config: ModelConfig) -> Dict[str, np.ndarray]:
    """CLLM name -> float32 array of every weight in an HF GPT-2 or Llama directory, checked against the config.
    A tied model's directory may also hold lm_head.weight, equal to the embedding."""
    arch = config.architecture
    expected = parameter_shapes(config)
    embedding = "embed_tokens.weight" if arch == "llama" else "wte"
    weights, where, head, stored_names = {}, {}, None, set()
    files, weight_map = _weight_files(path)
    for file in files:
        for stored, arr in safetensors_io.read_float32(file).items():
            stored_names.add(stored)
            if weight_map is not None and weight_map.get(stored) != file.name:
                raise HFFormatError(f"{file}: holds tensor {stored}, which model.safetensors.index.json places "
                                    f"in {weight_map.get(stored)!r}")
            if not np.isfinite(arr).all():
                raise HFFormatError(f"{file}: tensor {stored} holds NaN or Inf")
            name = cllm_name(stored, arch)
            if arch == "gpt2" and name.endswith(_BUFFERS):
                continue
            if name == "lm_head.weight" and config.tie_embeddings:
                head = (file, arr)
                continue
            if name not in expected:
                raise HFFormatError(f"{file}: unexpected tensor {stored} for a {arch} of this config")
            if name in weights:
                raise HFFormatError(f"{file}: tensor {stored} appears twice (also in {where[name]})")
            if tuple(arr.shape) != tuple(expected[name]):
                raise HFFormatError(f"{file}: tensor {stored} has shape {list(arr.shape)}, config.json needs "
                                    f"{list(expected[name])}")
            weights[name], where[name] = arr, file
    if weight_map is not None:
        unread = sorted(set(weight_map) - stored_names)
        if unread:
            raise HFFormatError(f"{path / 'model.safetensors.index.json'}: lists {unread[0]}, which no shard holds")
    missing = [n for n in expected if n not in weights]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise HFFormatError(f"{path}: weights missing: {', '.join(hf_name(n, arch) for n in missing[:3])}{more}")
    if head is not None and not np.array_equal(head[1], weights[embedding]):
        raise HFFormatError(f"{head[0]}: lm_head.weight differs from {hf_name(embedding, arch)} (an untied head), "
                            f"but config.json ties them")
    return weights


# ----------------------------------------------------------------------------------------------------
# the whole model
# ----------------------------------------------------------------------------------------------------
def from_hf(path: PathLike, precision: str = "fp32") -> Tuple[Model, Tokenizer]:
    """Model and tokenizer from a Hugging Face GPT-2 or Llama directory (see the module docstring)."""
    from .hf_tokenizer import tokenizer_from_hf

    path = Path(path)
    if not path.is_dir():
        raise MissingFileError(2, "Hugging Face model directory not found", str(path))
    config = config_from_hf(read_json_object(path / "config.json", HFFormatError), path / "config.json")
    weights = read_hf_weights(path, config)
    tokenizer = tokenizer_from_hf(path)
    if tokenizer.vocab_size > config.vocab_size:
        raise HFFormatError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens, more than config.json's "
                            f"vocab_size {config.vocab_size} (the embedding's rows)")
    model = Model(config, seed=0, precision=precision)
    model.load_parameters(weights)
    return model, tokenizer


def export_hf(model: Model, tokenizer, path: PathLike) -> Path:
    """Write `model` and `tokenizer` as a transformers GPT-2 or Llama directory (config.json, model.safetensors,
    tokenizer files, generation_config.json). A GPT-2's sinusoidal positions are written into wpe.

    All or nothing: the files are written into a hidden staging directory inside `path` and moved into place
    only once every one is whole, so a full disk or an unwritable directory (an OSError naming the file) leaves
    no partial export behind and any files already in `path` as they were."""
    from .hf_tokenizer import hf_tokenizer_files

    path = Path(path)
    specials = tokenizer.special_ids
    bos, eos = specials.get("bos"), specials.get("eos")
    arch = model.config.architecture
    params = model.parameters()
    if arch == "gpt2" and "wpe" not in params:  # sinusoidal: the fixed table becomes GPT-2's learned one
        params["wpe"] = model.position_table()
    tensors = {hf_name(name, arch): np.ascontiguousarray(v, dtype=np.float32) for name, v in params.items()}
    for name, arr in tensors.items():
        if not np.isfinite(arr).all():
            raise ValueError(f"cannot export: tensor {name} holds NaN or Inf")
    files = {"model.safetensors": lambda f: safetensors_io.write_float32(f, tensors, {"format": "pt"}),
             "config.json": _json_bytes(config_to_hf(model.config, bos, eos)),
             "generation_config.json": _json_bytes({"bos_token_id": bos, "eos_token_id": eos}),
             **hf_tokenizer_files(tokenizer, model_max_length=model.config.max_seq_len)}
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    try:
        stage = Path(tempfile.mkdtemp(dir=path, prefix=".export.", suffix=".tmp"))
    except OSError as e:  # a read-only directory: named, not the staging directory's random name
        if created:
            path.rmdir()
        raise OSError(e.errno, f"cannot write the export into it: {e.strerror}", str(path)) from None
    try:
        for name, content in files.items():
            write = content if callable(content) else (lambda f, data=content: f.write(data))
            try:
                atomic_write(stage / name, write, what="Hugging Face export", missing_dir="staging directory vanished")
            except OSError as e:  # named by the file the user asked for, not its staged copy
                raise OSError(e.errno, e.strerror or str(e), str(path / name)) from None
        for name in files:
            os.replace(stage / name, path / name)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        if created:
            shutil.rmtree(path, ignore_errors=True)
        raise
    stage.rmdir()
    return path


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=2) + "\n").encode("utf-8")
