"""A model and its tokenizer from wherever they were saved: a CLLM checkpoint file, a run directory (its
best.safetensors, else last.safetensors) or a Hugging Face GPT-2 directory (one with a config.json)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Tuple, Union

from ..errors import CLLMError, MissingFileError
from ..core.model import Model
from ..data.tokenizer import Tokenizer

PathLike = Union[str, "os.PathLike[str]"]


def checkpoint_file(path: PathLike) -> Path:
    """The checkpoint a path names: the file itself, or a run directory's best, else last, checkpoint."""
    path = Path(path)
    if not path.exists():
        raise MissingFileError(2, "checkpoint or model directory not found", str(path))
    if path.is_dir():
        for name in ("best.safetensors", "last.safetensors"):
            if (path / name).is_file():
                return path / name
        raise CLLMError(f"{path}: no best.safetensors or last.safetensors in this directory (nor a config.json "
                        f"of a Hugging Face model)")
    return path


def load_pretrained(path: PathLike) -> Tuple[Model, Tokenizer]:
    """(model, tokenizer) from a CLLM checkpoint or run directory, or a Hugging Face GPT-2 directory. A checkpoint
    of a run with ema_decay gives its averaged weights."""
    path = Path(path)
    if path.is_dir() and (path / "config.json").is_file():
        from .hf import from_hf
        return from_hf(path)
    from ..train.checkpoint import load_checkpoint
    ckpt = load_checkpoint(checkpoint_file(path))
    if ckpt.ema is not None:
        ckpt.model.load_parameters(ckpt.ema)
    return ckpt.model, ckpt.tokenizer
