"""Evaluating a trained model: loss, perplexity, bits per byte and next-token accuracy over whole files, and the
log-likelihood scoring of continuations behind multiple-choice tasks (HellaSwag/ARC style).

Every figure is computed in float64 from the logits of `Model.forward` (no dropout).

Windows. A file of n tokens is read in windows of T = max_seq_len tokens that start every `stride` tokens
(0, S, 2S, ...). Each window scores only the targets the previous one did not, so every token after the first
is predicted exactly once, from at least T - stride preceding tokens (fewer only in the first window). A
smaller stride gives more context per prediction and costs T/stride forwards per T tokens.

Bits per byte = total loss in nats / (ln 2 x the UTF-8 bytes of the scored tokens), the bytes taken from the
tokenizer's `token_bytes`: for the byte tokenizer it is loss / ln 2.
"""
from __future__ import annotations

import json
import math
import os
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..core.checks import check_int
from ..errors import MissingFileError
from ..core.model import Model
from ..data.tokenizer import Tokenizer

PathLike = Union[str, "os.PathLike[str]"]
TOP_K = 5                 # top-k accuracy reported beside accuracy
MAX_LOGITS_FLOATS = 1 << 26  # a forward's logits stay within 256 MiB: fewer windows per batch for big vocabularies


# ----------------------------------------------------------------------------------------------------
# windows and their figures
# ----------------------------------------------------------------------------------------------------
def windows(n: int, T: int, stride: int) -> List[Tuple[int, int, int]]:
    """(begin, end, first) for n tokens: inputs tokens[begin:end], targets tokens[begin+1:end+1], of which
    positions first.. (within the window) are scored. Every token 1..n-1 is scored exactly once."""
    out, begin, scored = [], 0, 0  # scored: the last token index already predicted
    while True:
        end = min(begin + T, n - 1)
        out.append((begin, end, scored - begin))
        scored = end
        if end == n - 1:
            return out
        begin += stride


class Totals:
    """Running sums over scored tokens: nats, bytes, correct and top-k correct predictions."""

    def __init__(self):
        self.nats, self.tokens, self.bytes, self.correct, self.top_k = 0.0, 0, 0, 0, 0

    def add(self, logits: np.ndarray, targets: np.ndarray, token_bytes: np.ndarray) -> None:
        """logits [n, V] (any float type), targets [n]."""
        z = logits.astype(np.float64)
        mx = z.max(axis=1)
        lse = mx + np.log(np.exp(z - mx[:, None]).sum(axis=1))
        target = z[np.arange(len(targets)), targets]
        self.nats += float((lse - target).sum())
        self.tokens += len(targets)
        self.bytes += int(token_bytes[targets].sum())
        finite = np.isfinite(z).all(axis=1)  # a row with NaN/Inf logits ranks nothing: never correct
        self.correct += int(((z.argmax(axis=1) == targets) & finite).sum())  # ties: the lowest id
        self.top_k += int((((z > target[:, None]).sum(axis=1) < TOP_K) & finite).sum())  # fewer than k better

    def figures(self) -> Dict[str, float]:
        loss = self.nats / self.tokens
        return {"loss": loss, "perplexity": float("inf") if loss >= 709.0 else math.exp(loss),  # NaN stays NaN
                "bits_per_byte": self.nats / (math.log(2) * self.bytes) if self.bytes else float("nan"),
                "accuracy": self.correct / self.tokens, "top5_accuracy": self.top_k / self.tokens,
                "tokens": self.tokens, "bytes": self.bytes}


def _batches(tokens: np.ndarray, T: int, stride: int, batch: int) -> Iterator[tuple]:
    """(inputs [B, t], targets [B, t], firsts [B]) of consecutive windows of one length."""
    group: list = []
    for w in windows(len(tokens), T, stride) + [None]:
        if group and (w is None or len(group) == batch or w[1] - w[0] != group[0][1] - group[0][0]):
            x = np.stack([tokens[b:e] for b, e, _ in group]).astype(np.int32)
            y = np.stack([tokens[b + 1:e + 1] for b, e, _ in group]).astype(np.int32)
            yield x, y, [f for _, _, f in group]
            group = []
        if w is not None:
            group.append(w)


def evaluate_tokens(model: Model, tokens: np.ndarray, token_bytes: np.ndarray, stride: Optional[int] = None,
                    batch_size: int = 4, totals: Optional[Totals] = None, progress=None) -> Totals:
    """Add the figures of one token sequence (at least 2 tokens, any integer array: a token file's memory map is
    read a batch of windows at a time) to `totals` (new if None); see the module
    docstring for the windows. `progress` (a tqdm bar or None) advances by one per window."""
    T = model.config.max_seq_len
    stride = T // 2 if stride is None else stride
    totals = Totals() if totals is None else totals
    batch = max(1, min(batch_size, MAX_LOGITS_FLOATS // (T * model.config.vocab_size)))
    for x, y, firsts in _batches(tokens, T, stride, batch):
        logits = model.forward(x)
        for row, first in enumerate(firsts):
            totals.add(logits[row, first:], y[row, first:], token_bytes)
        if progress is not None:
            progress.update(len(firsts))
    return totals


def read_eval_file(path: PathLike, tokenizer: Tokenizer) -> np.ndarray:
    """The tokens of a file to evaluate: a CLLM token file (.bin, as `cllm prepare` writes) as it is (memory-mapped),
    else UTF-8 text encoded with `tokenizer`. ValueError naming the file if it is unusable."""
    from ..data.tokenfile import MAGIC, load_tokens

    path = _input_file(path, "file to evaluate")
    with open(path, "rb") as f:
        is_token_file = f.read(len(MAGIC)) == MAGIC
    if is_token_file:
        tf = load_tokens(path)
        if tf.vocab_size != tokenizer.vocab_size:
            raise ValueError(f"{path}: token file of vocab_size {tf.vocab_size}, the model's tokenizer has "
                             f"{tokenizer.vocab_size}")
        tokens = tf.tokens  # memory-mapped: the windows are read as they are scored
    else:
        try:
            tokens = tokenizer.encode(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text (byte {e.start}) nor a CLLM token file") from None
        except MemoryError as e:  # a text file is held whole, with its tokens
            raise MemoryError(f"{path}: {e} (a token file from `cllm prepare` is read as it is scored)") from None
    if len(tokens) < 2:
        raise ValueError(f"{path}: {len(tokens)} token(s); evaluation needs at least 2")
    return tokens


def evaluate_files(model: Model, tokenizer: Tokenizer, paths: Sequence[PathLike], stride: Optional[int] = None,
                   batch_size: int = 4, progress: bool = False) -> Dict[str, float]:
    """loss, perplexity, bits_per_byte, accuracy, top5_accuracy, tokens and bytes over whole files, pooled
    (every scored token counts once). Files: UTF-8 text or CLLM token files."""
    T = model.config.max_seq_len
    stride = T // 2 if stride is None else check_int("stride", stride, 1, T, integral_float=True)
    batch_size = check_int("batch_size", batch_size, 1, 1 << 20, integral_float=True)
    if not paths:
        raise ValueError("no files to evaluate")
    token_bytes = tokenizer.token_bytes()
    files = [read_eval_file(p, tokenizer) for p in paths]  # every file checked before the long part starts
    totals = Totals()
    total = sum(len(windows(len(t), T, stride)) for t in files)
    with _bar(progress, total, "window") as bar:
        for tokens in files:
            evaluate_tokens(model, tokens, token_bytes, stride, batch_size, totals, bar)
    return totals.figures()


def _input_file(path: PathLike, what: str) -> Path:
    """path as a Path; MissingFileError if it does not exist, ValueError if it is a directory or a device."""
    path = Path(path)
    if not path.exists():
        raise MissingFileError(2, f"{what} not found", str(path))
    if not path.is_file():
        raise ValueError(f"{path}: not a regular file (the {what})")
    return path


def _bar(enabled: bool, total: int, unit: str):
    if not enabled:
        return nullcontext(None)
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return nullcontext(None)
    return tqdm(total=total, unit=unit, dynamic_ncols=True, file=sys.stderr)


# ----------------------------------------------------------------------------------------------------
# scoring continuations, multiple choice
# ----------------------------------------------------------------------------------------------------
def _encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> Tuple[np.ndarray, np.ndarray]:
    """(context ids, continuation ids) as lm-evaluation-harness splits them: the context's trailing spaces move
    to the continuation, the pair is encoded whole and split after the context's own tokens (so a token that
    straddles the boundary counts with the continuation)."""
    stripped = context.rstrip(" ")
    continuation = context[len(stripped):] + continuation
    context = stripped
    whole = tokenizer.encode(context + continuation)
    n = len(tokenizer.encode(context))
    return whole[:n], whole[n:]


def score(model: Model, tokenizer: Tokenizer, context: str, continuations: Sequence[str]) -> List[Tuple[float, int]]:
    """(summed log-probability, token count) of each continuation after `context`. An empty context starts
    from the tokenizer's EOS token; when context + continuation exceeds max_seq_len, the oldest context tokens
    are dropped (a continuation may be at most max_seq_len tokens)."""
    if not isinstance(context, str):
        raise TypeError(f"context must be a str, got {type(context).__name__}")
    if isinstance(continuations, str) or not all(isinstance(c, str) for c in continuations):
        raise TypeError("continuations must be a sequence of str")
    pairs = [_scored_ids(tokenizer, context, c, model.config.max_seq_len) for c in continuations]
    return [(_log_likelihood(model, seq, n), n) for seq, n in pairs]


def _scored_ids(tokenizer: Tokenizer, context: str, continuation: str, T: int) -> Tuple[np.ndarray, int]:
    """(the ids of context + continuation, at most T + 1 of them, the continuation's token count): what one
    forward scores the continuation with. ValueError when it cannot be scored."""
    ctx, cont = _encode_pair(tokenizer, context, continuation)
    if len(cont) == 0:
        raise ValueError(f"continuation {continuation!r:.60} encodes to no tokens")
    if len(ctx) == 0:
        if tokenizer.eos_id is None:
            raise ValueError("context is empty and the tokenizer has no EOS token to start from")
        ctx = np.array([tokenizer.eos_id], dtype=np.int32)
    if len(cont) > T:
        raise ValueError(f"continuation {continuation[:40]!r} is {len(cont)} tokens, more than max_seq_len {T}")
    return np.concatenate([ctx, cont])[-(T + 1):], len(cont)


def _log_likelihood(model: Model, seq: np.ndarray, n: int) -> float:
    """The summed log-probability of the last n tokens of seq, each given the tokens before it."""
    logits = model.forward(seq[None, :-1])[0, -n:].astype(np.float64)
    mx = logits.max(axis=1)
    lse = mx + np.log(np.exp(logits - mx[:, None]).sum(axis=1))
    return float((logits[np.arange(n), seq[-n:]] - lse).sum())


def read_choices(path: PathLike) -> List[dict]:
    """The examples of a JSONL file, one object per line: "context" (str), "endings" (a list of at least two
    str) and "label" (the index of the right ending); each example keeps its "line". ValueError naming the file,
    line and field."""
    path = _input_file(path, "choices file")
    examples = []
    try:
        # "\n" only: str.splitlines also splits at U+2028, U+0085, ... which JSON strings may hold as they are
        lines = path.read_bytes().decode("utf-8").split("\n")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{i}"
        try:
            ex = json.loads(line)
        except (ValueError, RecursionError) as e:  # JSONDecodeError, an integer of over 4300 digits, nesting
            raise ValueError(f"{where}: not valid JSON: {e}") from None
        if not isinstance(ex, dict):
            raise ValueError(f"{where}: expected a JSON object with context, endings, label")
        ctx, endings, label = ex.get("context"), ex.get("endings"), ex.get("label")
        if not isinstance(ctx, str):
            raise ValueError(f"{where}: field 'context' must be a string, got {ctx!r:.60}")
        if not isinstance(endings, list) or len(endings) < 2 or not all(isinstance(e, str) and e for e in endings):
            raise ValueError(f"{where}: field 'endings' must be a list of at least two non-empty strings")
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(endings):
            raise ValueError(f"{where}: field 'label' must be an index into endings (0..{len(endings) - 1}), "
                             f"got {label!r:.60}")
        examples.append({"context": ctx, "endings": endings, "label": label, "line": i})
    if not examples:
        raise ValueError(f"{path}: no examples")
    return examples


def evaluate_choices(model: Model, tokenizer: Tokenizer, path: PathLike, progress: bool = False) -> Dict[str, float]:
    """Multiple choice as lm-evaluation-harness scores it: each ending, after a " " delimiter, is scored by its
    summed log-likelihood; `accuracy` picks the largest, `acc_norm` the largest per character of the ending
    (len(ending), as lm-eval's completion_len). Ties go to the first ending."""
    examples = read_choices(path)
    T = model.config.max_seq_len
    scored = []  # every example encoded and checked before the long part starts
    for ex in examples:
        try:
            scored.append([_scored_ids(tokenizer, ex["context"], " " + e, T) for e in ex["endings"]])
        except ValueError as e:
            raise ValueError(f"{path}:{ex['line']}: {e}") from None
    right = right_norm = 0
    with _bar(progress, len(examples), "example") as bar:
        for ex, pairs in zip(examples, scored):
            lls = np.array([_log_likelihood(model, seq, n) for seq, n in pairs])
            lengths = np.array([float(len(e)) for e in ex["endings"]])
            right += int(np.argmax(lls) == ex["label"])
            right_norm += int(np.argmax(lls / lengths) == ex["label"])
            if bar is not None:
                bar.update(1)
    n = len(examples)
    return {"accuracy": right / n, "acc_norm": right_norm / n, "examples": n}


__all__ = ["windows", "evaluate_tokens", "evaluate_files", "read_eval_file", "score", "read_choices",
           "evaluate_choices", "Totals"]
