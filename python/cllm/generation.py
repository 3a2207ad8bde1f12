"""Text from a model: a prompt encoded, continued by Model.generate (KV-cached, C++), decoded."""
from __future__ import annotations

import numpy as np

from .model import Model
from .tokenizer import Tokenizer


def sample_text(model: Model, tokenizer: Tokenizer, prompt: str, max_new_tokens: int = 100,
                temperature: float = 1.0, top_k=None, top_p=None, seed: int = 0) -> str:
    """The decoded continuation of `prompt` (the prompt itself is not included). An empty prompt starts
    from a newline; a prompt longer than the context keeps its last max_seq_len tokens."""
    ids = tokenizer.encode(prompt)
    if ids.size == 0:
        ids = tokenizer.encode("\n")
    ids = ids[-model.config.max_seq_len:]
    new = model.generate(ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                         top_p=top_p, seed=seed)
    return tokenizer.decode(np.asarray(new))


__all__ = ["sample_text"]
