"""The model: a thin Python face over the C++ core. Parameters and gradients are NumPy views into the
core's flat buffers (no copies): writing into a view changes the model."""
from __future__ import annotations

import numpy as np

from . import _core
from .config import ModelConfig

# "bf16": matmul inputs rounded to bfloat16 with fp32 accumulation (AVX-512 BF16 where available);
# parameters, gradients and optimizer state stay fp32.
PRECISIONS = ("fp32", "bf16")


def _as_tokens(a, what: str) -> np.ndarray:
    """Checks dtype and rank at the boundary; range checks happen in the core with row/position."""
    arr = np.asarray(a)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(f"{what} must be an integer array, got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise ValueError(f"{what} must be 2-D [batch, time], got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{what} is empty (shape {arr.shape})")
    if arr.dtype != np.int32:
        info = np.iinfo(np.int32)
        lo, hi = arr.min(), arr.max()
        if lo < info.min or hi > info.max:
            bad = lo if lo < info.min else hi
            raise ValueError(f"token id {bad} out of range in {what}")
    return np.ascontiguousarray(arr, dtype=np.int32)


class Model:
    """A GPT-2-style decoder-only transformer whose kernels run in C++.

    precision="bf16" runs every matmul on bfloat16 inputs with fp32 accumulation (mixed precision);
    master weights, gradients and optimizer state are fp32 either way.

    >>> model = Model(ModelConfig(vocab_size=256, max_seq_len=64), seed=0)
    >>> loss = model.forward_backward(x, y)   # fills model.gradients()
    """

    def __init__(self, config: ModelConfig, seed: int = 0, precision: str = "fp32"):
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a cllm.ModelConfig, got {type(config).__name__}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.config = config
        self.seed = int(seed)
        self.precision = precision
        c = _core.Config()
        c.vocab_size, c.max_seq_len = config.vocab_size, config.max_seq_len
        c.embedding_dim, c.num_layers = config.embedding_dim, config.num_layers
        c.num_heads, c.ff_dim = config.num_heads, config.ff_dim
        c.dropout, c.learned_pos = float(config.dropout), config.pos_encoding == "learned"
        c.bf16 = precision == "bf16"
        self._core = _core.Model(c, int(seed))
        self._params = self._core.param_views()
        self._grads = self._core.grad_views()
        self.tensor_info = [
            dict(name=n, shape=tuple(s), offset=o, size=z, decay=d) for n, s, o, z, d in self._core.tensor_info()
        ]

    # -- buffers ------------------------------------------------------------------------------
    def parameters(self) -> dict:
        """name -> float32 view into the parameter buffer, Hugging Face GPT-2 names and shapes."""
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
        """The [max_seq_len, C] positional table in use (a copy of wpe, or the sinusoidal table)."""
        return self._core.position_table()

    def load_parameters(self, params: dict) -> None:
        """Copy a name -> array mapping into the model; every tensor must be present with its shape."""
        mine = self._params
        missing = sorted(set(mine) - set(params))
        extra = sorted(set(params) - set(mine))
        if missing or extra:
            raise ValueError(f"parameter names do not match: missing {missing}, unexpected {extra}")
        for name, view in mine.items():
            src = np.asarray(params[name])
            if src.shape != view.shape:
                raise ValueError(f"parameter {name}: shape {src.shape} does not match {view.shape}")
            view[...] = src

    # -- compute ------------------------------------------------------------------------------
    def forward(self, x) -> np.ndarray:
        """Logits [B, T, V] float32 (evaluation: no dropout, no gradient work)."""
        return self._core.forward(_as_tokens(x, "inputs"))

    def forward_backward(self, x, y, accumulate: bool = False, grad_scale: float = 1.0) -> float:
        """Mean cross-entropy of next-token prediction; fills the gradients of grad_scale * loss.

        Gradients are zeroed first unless accumulate=True (gradient accumulation)."""
        x = _as_tokens(x, "inputs")
        y = _as_tokens(y, "targets")
        if x.shape != y.shape:
            raise ValueError(f"inputs shape {x.shape} and targets shape {y.shape} differ")
        return self._core.forward_backward(x, y, bool(accumulate), float(grad_scale))

    def loss(self, x, y) -> float:
        """Mean cross-entropy without gradients or dropout (validation)."""
        x = _as_tokens(x, "inputs")
        y = _as_tokens(y, "targets")
        if x.shape != y.shape:
            raise ValueError(f"inputs shape {x.shape} and targets shape {y.shape} differ")
        return self._core.loss(x, y)

    def zero_grad(self) -> None:
        self._core.zero_grad()

    def dropout_masks(self, B: int, T: int) -> dict:
        """The dropout masks (values 0 or 1/(1-p)) the next forward_backward with this B, T will use."""
        return self._core.dropout_masks(int(B), int(T))

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
        self._core.dropout_step = int(value)

    def generate(self, prompt, max_new_tokens: int = 100, temperature: float = 1.0, top_k=None, top_p=None,
                  seed: int = 0, return_logits: bool = False):
        """Sample a continuation of `prompt` (1-D token ids) with a KV cache; returns the new token ids.

        temperature 0 is greedy; top_k keeps the k most likely tokens; top_p keeps the smallest set whose
        probability reaches p. The same seed gives the same tokens. With return_logits=True also returns the
        [n, V] logits each token was drawn from. Past max_seq_len the newest half of the context is kept."""
        p = np.asarray(prompt)
        if p.size == 0:
            raise ValueError("prompt is empty: give at least one token")
        if p.ndim != 1 or not np.issubdtype(p.dtype, np.integer):
            raise ValueError(f"prompt must be a 1-D integer array of token ids, got shape {p.shape} dtype {p.dtype}")
        if p.size > self.config.max_seq_len:
            raise ValueError(f"prompt length {p.size} exceeds max_seq_len {self.config.max_seq_len}")
        if isinstance(max_new_tokens, bool) or int(max_new_tokens) != max_new_tokens or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
        if not (temperature >= 0 and np.isfinite(temperature)):
            raise ValueError(f"temperature must be finite and >= 0, got {temperature}")
        if top_k is not None and (int(top_k) != top_k or top_k < 1):
            raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
        if top_p is not None and not (0.0 < top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")
        if p.min() < 0 or p.max() >= self.config.vocab_size:
            bad = int(p.min()) if p.min() < 0 else int(p.max())
            pos = int(np.nonzero(p == bad)[0][0])
            raise ValueError(f"token id {bad} out of range for vocab_size {self.config.vocab_size} (prompt position {pos})")
        return self._core.generate(np.ascontiguousarray(p, dtype=np.int32), int(max_new_tokens), float(temperature),
                                   int(top_k or 0), float(top_p or 1.0), int(seed) & 0xFFFFFFFFFFFFFFFF, bool(return_logits))

    def __repr__(self) -> str:
        return f"cllm.Model({self.config}, parameters={self.num_parameters:,}, precision={self.precision!r})"
