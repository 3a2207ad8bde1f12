"""Text from a model: prompts encoded, continued together by Model.generate (KV-cached, batched, C++), decoded.
Generation stops at the tokenizer's EOS token and at the caller's stop strings; `on_text` receives the text as it
is produced (streaming), never a piece that a stop string later removes."""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import numpy as np

from ..core.model import Model, check_decode_precision
from ..data.tokenizer import Tokenizer


class _TextStream:
    """One sequence's text as its tokens arrive: what may be shown yet, and where a stop string cuts it."""

    def __init__(self, tokenizer: Tokenizer, stops: Sequence[str]):
        self.tokenizer, self.stops = tokenizer, stops
        self.ids: List[int] = []
        self.shown = 0           # characters passed to on_text
        self.final: Optional[str] = None  # set when a stop string ended the text
        # the tokenizer's streaming decoder, if it has one: each token then costs its own text, not a decode of
        # everything so far (quadratic over a long output)
        step = getattr(tokenizer, "decode_stream", None)
        self._step = step() if step is not None else None
        self._streamed = ""  # the text of ids so far, whole characters only (with _step)

    def add(self, token: int) -> str:
        """Take a token; return the newly safe text (stopped: the text up to the stop string)."""
        self.ids.append(token)
        if self._step is not None:
            self._streamed += self._step(token)
            text = safe = self._streamed
        else:
            text = self.tokenizer.decode(np.asarray(self.ids))
            safe = text.rstrip("\ufffd")  # an incomplete UTF-8 character may still change
        cuts = [i for i in (text.find(s, max(0, self.shown - len(s) + 1)) for s in self.stops) if i >= 0]
        if cuts:
            self.final = text[:min(cuts)]
            return self.flush(self.final)
        # hold back the longest ending that may grow into a stop string
        hold = max((k for s in self.stops for k in range(1, min(len(s), len(safe) + 1)) if safe.endswith(s[:k])),
                   default=0)
        return self.flush(text[:max(len(safe) - hold, self.shown)])

    def flush(self, text: str) -> str:
        piece, self.shown = text[self.shown:], max(self.shown, len(text))
        return piece

    def text(self) -> str:
        return self.final if self.final is not None else self.tokenizer.decode(np.asarray(self.ids))


def generate_text(model: Model, tokenizer: Tokenizer, prompts: Sequence[str], max_new_tokens: int = 100,
                  temperature: float = 1.0, top_k=None, top_p=None, seed=0, stop: Sequence[str] = (),
                  stop_at_eos: bool = True, repetition_penalty: float = 1.0, frequency_penalty: float = 0.0,
                  presence_penalty: float = 0.0, on_text: Optional[Callable[[int, str], None]] = None,
                  decode_precision: str = "fp32", precision: Optional[str] = None) -> List[str]:
    """The decoded continuation of each prompt (not including the prompt), generated together in one batch.

    An empty prompt starts from a newline; a prompt longer than the context keeps its last max_seq_len tokens.
    A sequence ends at the tokenizer's EOS token (unless stop_at_eos=False) and just before the first of the
    `stop` strings it produces. on_text(i, piece) receives prompt i's text as it is produced; the pieces of a
    prompt add up to its result. `seed` is an int or one per prompt; decode_precision "bf16" decodes with bf16
    weights and cache; see Model.generate for the rest (and precision, decode_precision's old name). Only ids the
    tokenizer has are drawn: a model whose vocabulary is padded beyond the tokenizer's (Hugging Face models often
    are) never emits the padding ids. on_text must not use the model (RuntimeError)."""
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts) or not prompts:
        raise TypeError("prompts must be a non-empty list of str")
    if isinstance(stop, str) or not all(isinstance(s, str) for s in stop):
        raise TypeError("stop must be a list of str")
    if any(s == "" for s in stop):
        raise ValueError("a stop string is empty")
    decode_precision = check_decode_precision(decode_precision, precision)
    model.check_generation_memory(len(prompts), max_new_tokens, decode_precision=decode_precision)  # before encoding
    ids = []
    for p in prompts:
        enc = tokenizer.encode(p)
        ids.append((enc if enc.size else tokenizer.encode("\n"))[-model.config.max_seq_len:])
    streams = [_TextStream(tokenizer, list(stop)) for _ in prompts]

    def on_step(seqs, tokens):
        ended = []
        for s, t in zip(seqs, tokens):
            piece = streams[s].add(int(t))
            if piece and on_text is not None:
                on_text(s, piece)
            if streams[s].final is not None:
                ended.append(s)
        return ended

    eos = tokenizer.eos_id if stop_at_eos else None
    # a larger tokenizer than the model: its ids beyond the model's are refused by generate (in the prompts)
    vocab_limit = min(tokenizer.vocab_size, model.config.vocab_size)
    model.generate(ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                   seed=seed, stop_tokens=[] if eos is None else [eos], repetition_penalty=repetition_penalty,
                   frequency_penalty=frequency_penalty, presence_penalty=presence_penalty, on_step=on_step,
                   decode_precision=decode_precision, vocab_limit=vocab_limit)
    texts = [s.text() for s in streams]
    for i, (s, text) in enumerate(zip(streams, texts)):  # what was held back for a stop string that never came
        piece = s.flush(text)
        if piece and on_text is not None:
            on_text(i, piece)
    return texts


def sample_text(model: Model, tokenizer: Tokenizer, prompt: str, max_new_tokens: int = 100,
                temperature: float = 1.0, top_k=None, top_p=None, seed: int = 0, **options) -> str:
    """The decoded continuation of one prompt; `options` as generate_text's."""
    return generate_text(model, tokenizer, [prompt], max_new_tokens, temperature=temperature, top_k=top_k,
                         top_p=top_p, seed=seed, **options)[0]


__all__ = ["generate_text", "sample_text"]
