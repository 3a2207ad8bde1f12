"""The model: a thin Python face over the C++ core, and the core's answers about a config's sizes (parameter
layout, activation arena, memory needed) without building a model. Parameters and gradients are NumPy views into
the core's flat buffers (no copies): writing into a view changes the model."""
from __future__ import annotations

import warnings
from typing import Optional

import numpy as np

from .. import _core
from .checks import INT32_MAX, UINT64_MAX, as_int32_tokens, check_float, check_int, token_array
from .config import ModelConfig
from .system import check_memory

# "bf16": matmul inputs rounded to bfloat16 with fp32 accumulation (AVX-512 BF16 where available);
# parameters, gradients and optimizer state stay fp32.
PRECISIONS = ("fp32", "bf16")


def check_decode_precision(decode_precision: str, precision: Optional[str]) -> str:
    """generate's decode_precision, checked; `precision` is its old name (kept working, with a warning: the name
    is the model's, whose matmul precision it is)."""
    if precision is not None:
        warnings.warn("generate(precision=...) is now generate(decode_precision=...); precision names the model's "
                      "matmul precision", DeprecationWarning, stacklevel=3)
        decode_precision = precision
    if decode_precision not in PRECISIONS:
        raise ValueError(f"decode_precision must be one of {PRECISIONS}, got {decode_precision!r}")
    return decode_precision


def _tensor_dicts(layout: "_core.ParamLayout") -> list:
    return [dict(name=n, shape=tuple(s), offset=o, size=z, decay=d) for n, s, o, z, d in layout.tensors]


def parameter_layout(config: ModelConfig) -> list:
    """The core's parameter layout of a model of this config (no allocation): one dict per tensor with
    name, shape, offset and size (in floats) and decay (whether weight decay applies), in buffer order."""
    return _tensor_dicts(_core.ParamLayout(config.to_core()))


def parameter_shapes(config: ModelConfig) -> dict:
    """name -> shape of every parameter of a model of this config, in the core's order (no allocation)."""
    return {t["name"]: t["shape"] for t in parameter_layout(config)}


def parameter_count(config: ModelConfig, padded: bool = True) -> int:
    """Floats in the parameter buffer of a model of this config (each tensor padded to 16 floats, as the core
    lays them out; padded=False gives the number of parameters)."""
    layout = _core.ParamLayout(config.to_core())
    return layout.total if padded else layout.parameters


def activation_count(config: ModelConfig, batch_size: int, seq_len: int) -> int:
    """Floats in the activation arena of a training step on [batch_size, seq_len] tokens (the core's plan)."""
    return _core.activation_floats(config.to_core(), batch_size, seq_len)


def memory_estimate(config: ModelConfig, batch_size: int = 1, seq_len: Optional[int] = None,
                    optimizer: str = "adamw", ema: bool = False, shards: int = 1) -> int:
    """Bytes a training run of this model needs (per rank): parameters, gradients, optimizer state ("adamw": two
    moments, "sgd": one buffer, None: none), the EMA's average and scratch (ema) and the activations of one
    [batch_size, seq_len] step. shards: the ranks the AdamW moments are sharded over (ZeRO-1, --zero, AdamW only):
    each rank holds the moments of its shard only, the largest of `shard_ranges(total, shards)` (about 1/shards).
    Not counted: rank 0 gathering the whole moments to write a checkpoint (the trainer adds it)."""
    from ..parallel.reducer import shard_ranges  # numpy only: mpi4py is not imported

    seq_len = config.max_seq_len if seq_len is None else seq_len
    shards = check_int("shards", shards, 1, 2**31 - 1)
    total = parameter_count(config)
    shard = max(hi - lo for lo, hi in shard_ranges(total, shards))
    state = {"adamw": 2 * shard, "sgd": total, None: 0}[optimizer]  # ZeRO-1 shards AdamW's moments only
    return 4 * ((2 + (2 if ema else 0)) * total + state + activation_count(config, batch_size, seq_len))


def _is_batch(prompt) -> bool:
    """A batch of prompts: a 2-D array, or a non-empty list/tuple whose items are sequences."""
    if isinstance(prompt, np.ndarray):
        return prompt.ndim == 2
    return isinstance(prompt, (list, tuple)) and len(prompt) > 0 and all(np.ndim(p) == 1 for p in prompt)


def _checked_callback(on_step, n: int):
    """on_step with its answer checked: None or indices of the batch's sequences."""
    if not callable(on_step):
        raise TypeError(f"on_step must be callable, got {type(on_step).__name__}")

    def call(seqs, tokens):
        stop = on_step(seqs, tokens)
        stop = [] if stop is None else [int(b) for b in stop]
        bad = [b for b in stop if not 0 <= b < n]
        if bad:
            raise ValueError(f"on_step returned sequence {bad[0]}, not in 0..{n - 1}")
        return stop
    return call


class Model:
    """A decoder-only transformer (GPT-2 or Llama blocks, `ModelConfig.architecture`) whose kernels run in C++.

    precision="bf16" runs every matmul on bfloat16 inputs with fp32 accumulation (mixed precision);
    master weights, gradients and optimizer state are fp32 either way.

    >>> model = Model(ModelConfig(vocab_size=256, max_seq_len=64), seed=0)
    >>> loss = model.forward_backward(x, y)   # fills model.gradients()
    """

    def __init__(self, config: ModelConfig, seed: int = 0, precision: str = "fp32"):
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a cllm.ModelConfig, got {type(config).__name__}")
        seed = check_int("seed", seed, 0, UINT64_MAX)
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        # parameters + gradients, before the core allocates (and zero-fills) them
        layout = _core.ParamLayout(config.to_core())
        check_memory(8 * layout.total, f"a model of {layout.parameters:,} parameters (weights and gradients)")
        self.config = config
        self.seed = seed
        self.precision = precision
        self._arena_shape = None  # the (B, T) the core's activation arena is sized for
        self._core = _core.Model(config.to_core(precision), seed)
        self._params = self._core.param_views()
        self._grads = self._core.grad_views()
        self.layout = self._core.layout  # the core's ParamLayout: names, shapes, offsets, decay
        self.tensor_info = _tensor_dicts(self.layout)

    # -- buffers ------------------------------------------------------------------------------
    def parameters(self) -> dict:
        """name -> float32 view into the parameter buffer, Hugging Face names and shapes (GPT2LMHeadModel's without
        "transformer.", LlamaForCausalLM's without "model.")."""
        return dict(self._params)

    def gradients(self) -> dict:
        """name -> float32 view into the gradient buffer (same names and shapes)."""
        return dict(self._grads)

    def flat_parameters(self) -> np.ndarray:
        """The whole parameter buffer as one flat view (tensors at `tensor_info` offsets, padded)."""
        return self._core.flat_params()

    def flat_gradients(self) -> np.ndarray:
        return self._core.flat_grads()

    @property
    def num_parameters(self) -> int:
        return sum(t["size"] for t in self.tensor_info)

    def position_table(self) -> np.ndarray:
        """The [max_seq_len, C] positional table in use (a copy of wpe, or the sinusoidal table); a llama model has
        none (ValueError): its positions are rotary."""
        return self._core.position_table()

    def exclusive(self, fn):
        """fn() while holding the model's lock, its result returned: a generate running on another thread ends
        first, and no other call of the model starts meanwhile. For code that writes the weights (through the
        views of parameters()) while other threads may use the model. fn must not call the model (RuntimeError)."""
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        return self._core.exclusive(fn)

    def load_parameters(self, params: dict) -> None:
        """Copy a name -> array mapping into the model; every tensor must be present with its shape and hold
        real numbers (integer or floating dtype). Everything is checked before anything is copied, and the copy
        waits for a generate running on another thread (which sees one model throughout)."""
        if not hasattr(params, "keys") or not hasattr(params, "__getitem__"):
            raise TypeError(f"params must be a mapping name -> array, got {type(params).__name__}")
        mine = self._params
        missing = sorted(set(mine) - set(params))
        extra = sorted(set(params) - set(mine))
        if missing or extra:
            raise ValueError(f"parameter names do not match: missing {missing}, unexpected {extra}")
        sources = {}
        for name, view in mine.items():
            src = sources[name] = np.asarray(params[name])
            if src.shape != view.shape:
                raise ValueError(f"parameter {name}: shape {src.shape} does not match {view.shape}")
            if src.dtype.kind not in "iuf":
                raise TypeError(f"parameter {name}: dtype {src.dtype} is not a real number type")

        def copy():
            for name, view in mine.items():
                view[...] = sources[name]
        self.exclusive(copy)

    # -- compute ------------------------------------------------------------------------------
    def _tokens(self, a, name: str) -> np.ndarray:
        """A [batch, time] integer array, checked: dtype, rank and shape, before any value is read or copied (so
        that a huge broadcast array fails at once)."""
        arr = token_array(name, a)
        if arr.ndim != 2:
            raise ValueError(f"{name} must be 2-D [batch, time], got shape {arr.shape}")
        if arr.shape[0] == 0 or arr.shape[1] == 0:
            raise ValueError(f"{name} is empty (shape {arr.shape})")
        if arr.shape[1] > self.config.max_seq_len:
            raise ValueError(f"sequence length {arr.shape[1]} exceeds max_seq_len {self.config.max_seq_len}")
        if arr.size > INT32_MAX:
            raise ValueError(f"{name} has {arr.size:,} tokens, more than one call can take ({INT32_MAX:,})")
        return arr

    def _batch(self, x, y=None, out_per_token: int = 0):
        """(x, y) as int32 token arrays, after checking their shapes and that the activations (and the
        conversions and the output) fit in memory."""
        x = self._tokens(x, "inputs")
        if y is not None:
            y = self._tokens(y, "targets")
            if x.shape != y.shape:
                raise ValueError(f"inputs shape {x.shape} and targets shape {y.shape} differ")
        copies = sum(a.size for a in (x, y) if a is not None and not (a.dtype == np.int32 and a.flags.c_contiguous))
        self._reserve(*x.shape, extra_floats=copies + out_per_token * x.size)
        return as_int32_tokens("inputs", x), None if y is None else as_int32_tokens("targets", y)

    def _reserve(self, B: int, T: int, extra_floats: int = 0) -> None:
        """Check that the activation arena for a new (B, T) (and `extra_floats` of output) fits in memory,
        before the core allocates it."""
        need = extra_floats + (activation_count(self.config, B, T) if (B, T) != self._arena_shape else 0)
        if need:
            check_memory(4 * need, f"a batch of {B} x {T} tokens")

    def forward(self, x) -> np.ndarray:
        """Logits [B, T, V] float32 (evaluation: no dropout, no gradient work)."""
        x, _ = self._batch(x, out_per_token=self.config.vocab_size)
        out = self._core.forward(x)
        self._arena_shape = x.shape
        return out

    def forward_backward(self, x, y, accumulate: bool = False, grad_scale: float = 1.0,
                         label_smoothing: float = 0.0, on_grads_ready=None, embedding_grad=None) -> float:
        """Mean cross-entropy of next-token prediction; fills the gradients of grad_scale * loss.

        Gradients are zeroed first unless accumulate=True (gradient accumulation). label_smoothing eps in [0, 1]
        trains towards (1 - eps) onehot + eps / V, as PyTorch's cross_entropy(label_smoothing=eps); the loss
        returned is that smoothed loss. on_grads_ready (optional, a callable) is called during the backward
        with a range (from, to) each time the flat gradients [from:to] are final (after the final norm, after
        each layer's MLP half and after each layer from the last, to the end of the buffer, and (0, total)
        last), so that they can be sent while the rest is computed. embedding_grad (optional, a float32
        C-contiguous [B, T, C] array; tied head only) receives the gradient at the embedding output instead of
        its being added into the wte (and wpe) gradients, which then hold the LM head's part only;
        on_grads_ready then gets wte's range first, right after the head's GEMMs (data parallelism sends the
        sparse embedding part compactly, GradientReducer)."""
        grad_scale = check_float("grad_scale", grad_scale)
        label_smoothing = check_float("label_smoothing", label_smoothing, 0, 1)
        if on_grads_ready is not None and not callable(on_grads_ready):
            raise TypeError(f"on_grads_ready must be callable or None, got {type(on_grads_ready).__name__}")
        x, y = self._batch(x, y)
        if embedding_grad is not None:
            self._check_embedding_grad(embedding_grad, x.shape)
        loss = self._core.forward_backward(x, y, bool(accumulate), grad_scale, label_smoothing, on_grads_ready,
                                           embedding_grad)
        self._arena_shape = x.shape
        return loss

    def _check_embedding_grad(self, out, shape) -> None:
        if not self.config.tie_embeddings:
            raise ValueError("embedding_grad needs a tied head (tie_embeddings); an untied model's wte gradient "
                             "has no head part")
        want = (*shape, self.config.embedding_dim)
        if not isinstance(out, np.ndarray) or out.dtype != np.float32 or out.shape != want:
            raise TypeError(f"embedding_grad must be a float32 array of shape {want}, got "
                            f"{getattr(out, 'dtype', type(out).__name__)} {getattr(out, 'shape', '')}")
        if not out.flags.c_contiguous or not out.flags.writeable:
            raise ValueError("embedding_grad must be C-contiguous and writeable (the backward writes into it)")

    def loss(self, x, y) -> float:
        """Mean cross-entropy without gradients or dropout (validation)."""
        x, y = self._batch(x, y)
        loss = self._core.loss(x, y)
        self._arena_shape = x.shape
        return loss

    def zero_grad(self) -> None:
        self._core.zero_grad()

    def dropout_masks(self, B: int, T: int) -> dict:
        """The dropout masks (values 0 or 1/(1-p)) the next forward_backward with this B, T will use."""
        B = check_int("B", B, 1, INT32_MAX, integral_float=True)
        T = check_int("T", T, 1, self.config.max_seq_len, integral_float=True)
        check_memory(4 * _core.dropout_mask_floats(self.config.to_core(), B, T),
                     f"dropout masks for {B} x {T} tokens")
        return self._core.dropout_masks(B, T)

    @property
    def activation_bytes(self) -> int:
        """Size of the activation arena of the last (B, T) seen: grows linearly in B*T (attention keeps
        a per-row log-sum-exp, never a T x T matrix)."""
        return self._core.arena_bytes

    @property
    def dropout_step(self) -> int:
        """Number of forward_backward calls made: the dropout RNG's position (saved in checkpoints)."""
        return self._core.dropout_step

    @dropout_step.setter
    def dropout_step(self, value: int) -> None:
        self._core.dropout_step = check_int("dropout_step", value, 0, UINT64_MAX, integral_float=True)

    @property
    def dropout_stream(self) -> int:
        """Which of independent dropout mask streams this model draws (same seed and step, other masks).
        Data-parallel training sets it to the rank, so the ranks' rows of one global batch get their own
        masks instead of repeating rank 0's. Default 0."""
        return self._core.dropout_stream

    @dropout_stream.setter
    def dropout_stream(self, value: int) -> None:
        self._core.dropout_stream = check_int("dropout_stream", value, 0, UINT64_MAX, integral_float=True)

    def generate(self, prompt, max_new_tokens: int = 100, temperature: float = 1.0, top_k=None, top_p=None,
                 seed=0, return_logits: bool = False, stop_tokens=(), repetition_penalty: float = 1.0,
                 frequency_penalty: float = 0.0, presence_penalty: float = 0.0, on_step=None,
                 decode_precision: str = "fp32", precision: Optional[str] = None, vocab_limit=None):
        """Sample a continuation of `prompt` with a KV cache; returns the new token ids.

        `prompt` is 1-D token ids, or a batch: a list of them (any lengths) or a 2-D array. A batch returns a
        list, one array per prompt, decoded together (faster than one at a time); prompt b samples with seed b of
        `seed` (an int for all, or one per prompt), so its tokens do not depend on the rest of the batch.

        temperature 0 is greedy; top_k keeps the k most likely tokens; top_p keeps the smallest set whose
        probability reaches p. repetition_penalty (> 0, 1 off) divides the positive logits and multiplies the
        negative ones of every token in the prompt or output (transformers' RepetitionPenaltyLogitsProcessor);
        frequency_penalty and presence_penalty subtract count x f + p from the logits of tokens in the output.
        A token of `stop_tokens` (e.g. the tokenizer's EOS) ends its sequence and is not returned.
        on_step(sequences, tokens) runs after each step with the sequences that drew a token (indices into the
        batch; [0] for one prompt) and their tokens; it returns the sequences to stop there (or None); it must not
        use the model (RuntimeError: the model is busy with this call). vocab_limit (1 to vocab_size, None: all)
        draws only ids below it, greedy or sampled: a tokenizer smaller than the model's padded vocabulary (as
        Hugging Face pads it to a multiple of 64 or 128) has no text for the others. seed (each in [0, 2**64 - 1])
        gives the same tokens for the same seed.
        With return_logits=True also returns the [n, V] logits (before penalties) each token was drawn from
        (a list for a batch). Past max_seq_len the newest half of a context is kept.

        decode_precision="bf16" decodes with bfloat16 copies of the weights (made again by each call, in half the parameter
        bytes of extra memory that the model keeps for its next bf16 call until release_generation_memory()) and a
        bfloat16 K/V cache, summing in fp32: each new token reads half the bytes, so decoding is up to twice as fast,
        and the tokens can differ from fp32's where two candidates are close. The prompt's prefill runs in the
        model's own precision (Model's `precision`). `precision=` is the old name of decode_precision."""
        decode_precision = check_decode_precision(decode_precision, precision)
        batch = _is_batch(prompt)
        n = check_int("the number of prompts", len(prompt) if batch else 1, 1, INT32_MAX)
        max_new_tokens = check_int("max_new_tokens", max_new_tokens, 0, INT32_MAX, integral_float=True)
        s = _core.Sampling()
        s.temperature = check_float("temperature", temperature, lo=0)
        if top_k is not None:  # k >= V keeps all
            s.top_k = min(check_int("top_k", top_k, 1, 1 << 64, integral_float=True), self.config.vocab_size)
        if top_p is not None:
            s.top_p = check_float("top_p", top_p, 0, 1, lo_open=True)
        s.repetition_penalty = check_float("repetition_penalty", repetition_penalty, lo=0, lo_open=True)
        s.frequency_penalty = check_float("frequency_penalty", frequency_penalty)
        s.presence_penalty = check_float("presence_penalty", presence_penalty)
        if vocab_limit is not None:
            s.vocab_limit = check_int("vocab_limit", vocab_limit, 1, self.config.vocab_size, integral_float=True)
        seeds = self._seeds(seed, n)
        stops = np.asarray(stop_tokens).reshape(-1)
        stops = token_array("stop_tokens", stops if stops.size else stops.astype(np.int64))
        callback = None if on_step is None else _checked_callback(on_step, n)
        return_logits = bool(return_logits)
        # before any prompt is copied (a broadcast array may hold billions of rows)
        self.check_generation_memory(n, max_new_tokens, return_logits, decode_precision)
        prompts = [self._prompt(p, f"prompt {i}" if batch else "prompt")
                   for i, p in enumerate(prompt if batch else [prompt])]
        self._arena_shape = None  # generation re-sizes the arena
        out = self._core.generate(prompts, max_new_tokens, s, seeds, as_int32_tokens("stop_tokens", stops), callback,
                                  return_logits, decode_precision)
        if batch:
            return out
        return (out[0][0], out[1][0]) if return_logits else out[0]

    def release_generation_memory(self) -> None:
        """Frees the storage of the bfloat16 weight copies that generate(decode_precision="bf16") keeps for its next call
        (about half the parameters' bytes), e.g. before training a model that was sampled from; the next bf16 call
        allocates it again (and pays for faulting it in again)."""
        self._core.release_decode_storage()

    def check_generation_memory(self, prompts: int, max_new_tokens: int, return_logits: bool = False,
                                decode_precision: str = "fp32", precision: Optional[str] = None) -> None:
        """InsufficientMemoryError unless `generate` of max_new_tokens for `prompts` prompts fits in memory (a
        ValueError for counts out of range). generate checks it; callers that build many prompts check it first."""
        n = check_int("the number of prompts", prompts, 1, INT32_MAX)
        max_new_tokens = check_int("max_new_tokens", max_new_tokens, 0, INT32_MAX, integral_float=True)
        bf16 = check_decode_precision(decode_precision, precision) == "bf16"
        floats = _core.generation_floats(self.config.to_core(), n, max_new_tokens, bool(return_logits), bf16)
        if bf16:  # the storage of the bf16 weight copies, once allocated, is kept and reused
            floats -= min(floats, self._core.decode_storage_floats)
        check_memory(4 * floats, f"generating {max_new_tokens:,} tokens for {n:,} prompt(s)")

    def _prompt(self, p, name: str) -> np.ndarray:
        p = np.asarray(p)
        if p.size == 0:
            raise ValueError(f"{name} is empty: give at least one token")
        p = token_array(name, p)
        if p.ndim != 1:
            raise ValueError(f"{name} must be a 1-D integer array of token ids, got shape {p.shape}")
        if p.size > self.config.max_seq_len:
            raise ValueError(f"{name} length {p.size} exceeds max_seq_len {self.config.max_seq_len}")
        return as_int32_tokens(name, p)

    @staticmethod
    def _seeds(seed, n: int) -> list:
        """One seed per prompt, each in [0, 2**64 - 1] (the core's uint64: a larger one would repeat a smaller)."""
        if isinstance(seed, (list, tuple, np.ndarray)):
            if len(seed) != n:
                raise ValueError(f"seed: {len(seed)} seeds for {n} prompts")
            return [check_int("seed", s, 0, UINT64_MAX, integral_float=True) for s in seed]
        return [check_int("seed", seed, 0, UINT64_MAX, integral_float=True)] * n

    def __repr__(self) -> str:
        return f"cllm.Model({self.config}, parameters={self.num_parameters:,}, precision={self.precision!r})"
