"""Model configuration: plain values with defaults, validated on construction."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .checks import INT32_MAX, check_float, check_int

POS_ENCODINGS = ("learned", "sinusoidal")


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a GPT-2-style model: vocabulary, context length, width, depth, heads, feed-forward width, dropout
    probability and position encoding ("learned": a trained wpe table, "sinusoidal": a fixed one). Checked on
    construction, sizes within the core's 32-bit ints (ints stored as Python ints, dropout as a float)."""

    vocab_size: int = 256
    max_seq_len: int = 128
    embedding_dim: int = 128
    num_layers: int = 4
    num_heads: int = 4
    ff_dim: int = 512
    dropout: float = 0.0
    pos_encoding: str = "learned"

    def __post_init__(self):
        for name in ("vocab_size", "max_seq_len", "embedding_dim", "num_layers", "num_heads", "ff_dim"):
            value = check_int(name, getattr(self, name), lo=1)
            if value > INT32_MAX:  # the core's sizes are 32-bit ints
                raise ValueError(f"{name} {value:,} is too large (at most {INT32_MAX:,})")
            object.__setattr__(self, name, value)
        if 3 * self.embedding_dim > INT32_MAX:  # the width of the qkv projection
            raise ValueError(f"embedding_dim {self.embedding_dim:,} is too large (at most {INT32_MAX // 3:,})")
        if self.embedding_dim % self.num_heads != 0:
            raise ValueError(
                f"embedding_dim {self.embedding_dim} is not divisible by num_heads {self.num_heads}")
        object.__setattr__(self, "dropout", check_float("dropout", self.dropout, 0, 1, hi_open=True))
        if self.pos_encoding not in POS_ENCODINGS:
            raise ValueError(f"pos_encoding must be one of {POS_ENCODINGS}, got {self.pos_encoding!r}")

    @property
    def head_dim(self) -> int:
        return self.embedding_dim // self.num_heads

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        if not isinstance(d, dict):
            raise ValueError(f"model config must be a mapping, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model config keys: {', '.join(unknown)}")
        return cls(**d)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)
