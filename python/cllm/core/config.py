"""Model configuration: the core's field list (`_core.config_fields`, written once in csrc/cllm.h) as a frozen
dataclass, validated by the core on construction."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from .. import _core
from .checks import INT32_MAX, INT32_MIN, check_flag, check_float, check_int

# (name, kind, default, choices, help) of every field, in order
FIELDS = tuple(_core.config_fields)
_CHOICES = {name: tuple(choices) for name, kind, _, choices, _ in FIELDS if kind == "choice"}
ARCHITECTURES = _CHOICES["architecture"]
POS_ENCODINGS = tuple(c for c in _CHOICES["pos_encoding"] if c != "auto")
# fields whose core default means "the architecture's own": None in Python, made explicit on construction
_AUTO = {"pos_encoding": "auto", "num_kv_heads": 0}


def _with_core_fields(cls):
    """Adds the core's fields to cls (their defaults, help and kind as field metadata) and makes it a dataclass."""
    types = {"int": int, "float": float, "bool": bool, "choice": str}
    if "__annotations__" not in cls.__dict__:
        cls.__annotations__ = {}
    for name, kind, default, choices, help in FIELDS:
        auto = name in _AUTO
        cls.__annotations__[name] = Optional[types[kind]] if auto else types[kind]
        setattr(cls, name, dataclasses.field(default=None if auto else default,
                                             metadata={"help": help, "kind": kind, "choices": choices}))
    return dataclass(frozen=True)(cls)


def _core_value(name: str, kind: str, value):
    """A field's value as the core takes it: the type checked here (ints within the core's 32 bits), the rules
    left to the core."""
    if value is None and name in _AUTO:
        return _AUTO[name]
    if kind == "int":
        value = check_int(name, value)
        if not INT32_MIN <= value <= INT32_MAX:
            raise ValueError(f"{name} {value:,} is too large (at most {INT32_MAX:,})")
        return value
    if kind == "float":
        return check_float(name, value, finite=False)
    if kind == "bool":
        return check_flag(name, value)
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, one of {_CHOICES[name]}, got {type(value).__name__}")
    return value


@_with_core_fields
class ModelConfig:
    """Shape of a decoder-only transformer: the core's fields (csrc/cllm.h's CLLM_CONFIG_FIELDS), checked by
    the core on construction (ValueError naming the field).

    architecture "gpt2" (the default): LayerNorm, GELU MLP, biases, LM head tied to wte, positions "learned" (a
    trained wpe table) or "sinusoidal" (a fixed one).
    architecture "llama": RMSNorm (rms_norm_eps), rotary positions ("rope", rope_theta), a SwiGLU MLP of hidden
    size ff_dim, grouped-query attention with num_kv_heads K/V heads (None: num_heads, plain multi-head), no
    biases, and a tied or untied (tie_embeddings=False: lm_head.weight) LM head.
    pos_encoding None picks the architecture's default ("learned" for gpt2, "rope" for llama)."""

    def __post_init__(self):
        core = self.to_core()
        resolved = _core.resolve_config(core)
        for name, kind, _, _, _ in FIELDS:
            value = getattr(resolved, name) if name in _AUTO else getattr(self, name)
            object.__setattr__(self, name, _core_value(name, kind, value) if kind != "float" else float(value))

    def to_core(self, precision: str = "fp32") -> "_core.Config":
        """The core's Config of these fields (bf16 matmuls with precision "bf16")."""
        core = _core.Config()
        for name, kind, _, _, _ in FIELDS:
            setattr(core, name, _core_value(name, kind, getattr(self, name)))
        core.bf16 = precision == "bf16"
        return core

    @property
    def head_dim(self) -> int:
        return self.embedding_dim // self.num_heads

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """A config from to_dict's mapping; keys a checkpoint older than the llama architecture lacks take their
        defaults (a gpt2)."""
        if not isinstance(d, dict):
            raise ValueError(f"model config must be a mapping, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model config keys: {', '.join(unknown)}")
        return cls(**d)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)
