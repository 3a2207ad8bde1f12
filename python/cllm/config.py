"""Model configuration: plain values with defaults, validated on construction."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from .checks import INT32_MAX, check_flag, check_float, check_int

ARCHITECTURES = ("gpt2", "llama")
POS_ENCODINGS = ("learned", "sinusoidal", "rope")
_LLAMA_ONLY = {"rope_theta": 10000.0, "rms_norm_eps": 1e-5}  # their defaults; a gpt2 must keep them


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a decoder-only transformer, checked on construction (sizes within the core's 32-bit ints).

    architecture "gpt2" (the default): LayerNorm, GELU MLP, biases, LM head tied to wte, positions "learned" (a
    trained wpe table) or "sinusoidal" (a fixed one).
    architecture "llama": RMSNorm (rms_norm_eps), rotary positions ("rope", rope_theta), a SwiGLU MLP of hidden
    size ff_dim, grouped-query attention with num_kv_heads K/V heads (None: num_heads, plain multi-head), no
    biases, and a tied or untied (tie_embeddings=False: lm_head.weight) LM head.
    pos_encoding None picks the architecture's default ("learned" for gpt2, "rope" for llama)."""

    vocab_size: int = 256
    max_seq_len: int = 128
    embedding_dim: int = 128
    num_layers: int = 4
    num_heads: int = 4
    ff_dim: int = 512
    dropout: float = 0.0
    pos_encoding: Optional[str] = None
    architecture: str = "gpt2"
    num_kv_heads: Optional[int] = None
    rope_theta: float = _LLAMA_ONLY["rope_theta"]
    rms_norm_eps: float = _LLAMA_ONLY["rms_norm_eps"]
    tie_embeddings: bool = True

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {self.architecture!r}")
        llama = self.architecture == "llama"
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        for name in ("vocab_size", "max_seq_len", "embedding_dim", "num_layers", "num_heads", "num_kv_heads",
                     "ff_dim"):
            value = check_int(name, getattr(self, name), lo=1)
            if value > INT32_MAX:  # the core's sizes are 32-bit ints
                raise ValueError(f"{name} {value:,} is too large (at most {INT32_MAX:,})")
            object.__setattr__(self, name, value)
        if 3 * self.embedding_dim > INT32_MAX:  # the width of the qkv projection
            raise ValueError(f"embedding_dim {self.embedding_dim:,} is too large (at most {INT32_MAX // 3:,})")
        if llama and 2 * self.ff_dim > INT32_MAX:  # the width of SwiGLU's gate | up
            raise ValueError(f"ff_dim {self.ff_dim:,} is too large for llama (at most {INT32_MAX // 2:,})")
        if self.embedding_dim % self.num_heads != 0:
            raise ValueError(
                f"embedding_dim {self.embedding_dim} is not divisible by num_heads {self.num_heads}")
        object.__setattr__(self, "dropout", check_float("dropout", self.dropout, 0, 1, hi_open=True))
        pos = self.pos_encoding if self.pos_encoding is not None else "rope" if llama else "learned"
        allowed = ("rope",) if llama else ("learned", "sinusoidal")
        if pos not in allowed:
            raise ValueError(f"pos_encoding of a {self.architecture} model must be one of {allowed}, got {pos!r}")
        object.__setattr__(self, "pos_encoding", pos)
        object.__setattr__(self, "tie_embeddings", check_flag("tie_embeddings", self.tie_embeddings))
        object.__setattr__(self, "rope_theta", check_float("rope_theta", self.rope_theta, 1, 1e30, lo_open=True,
                                                           hi_open=True))
        object.__setattr__(self, "rms_norm_eps", check_float("rms_norm_eps", self.rms_norm_eps, 0, 1,
                                                             lo_open=True, hi_open=True))
        if llama:
            if self.num_heads % self.num_kv_heads != 0:
                raise ValueError(f"num_kv_heads {self.num_kv_heads} does not divide num_heads {self.num_heads}")
            if self.head_dim % 2 != 0:
                raise ValueError(f"llama's rotary embedding needs an even head size: embedding_dim "
                                 f"{self.embedding_dim} / num_heads {self.num_heads} = {self.head_dim}")
            return
        if self.num_kv_heads != self.num_heads:
            raise ValueError(f"num_kv_heads {self.num_kv_heads} needs architecture 'llama' (gpt2 has num_kv_heads "
                             f"= num_heads {self.num_heads})")
        if not self.tie_embeddings:
            raise ValueError("tie_embeddings=False needs architecture 'llama' (gpt2's LM head is tied to wte)")
        for name, default in _LLAMA_ONLY.items():
            if getattr(self, name) != default:
                raise ValueError(f"{name} {getattr(self, name)} needs architecture 'llama' (gpt2 has none)")

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
