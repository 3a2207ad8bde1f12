"""The model: a thin Python face over the C++ core. Parameters and gradients are NumPy views into the
core's flat buffers (no copies): writing into a view changes the model."""
from __future__ import annotations

import os
from typing import Optional

import numpy as np

from . import _core
from .config import ModelConfig

# "bf16": matmul inputs rounded to bfloat16 with fp32 accumulation (AVX-512 BF16 where available);
# parameters, gradients and optimizer state stay fp32.
PRECISIONS = ("fp32", "bf16")

_INT32_MAX = 2**31 - 1  # the core counts sizes (B*T, dimensions, token ids) in 32-bit ints
# OpenMP teams much larger than the machine fail to start: libgomp exits ("Thread creation failed") or the process
# crashes, so the thread count is bounded.
MAX_THREADS = max(1024, 4 * (os.cpu_count() or 1))


def check_num_threads(n) -> int:
    """The number of kernel threads, checked: an int in [1, MAX_THREADS]."""
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"number of threads must be an int, got {type(n).__name__}")
    if not 1 <= n <= MAX_THREADS:
        raise ValueError(f"number of threads must be in [1, {MAX_THREADS}], got {n}")
    return int(n)


# ----------------------------------------------------------------------------------------------------
# memory: refuse, with a clear error, what cannot fit instead of letting the OOM killer end the process
# ----------------------------------------------------------------------------------------------------
class InsufficientMemoryError(MemoryError, ValueError):
    """Raised *before* an allocation that would not fit in the memory available to this process.

    Both a MemoryError and a ValueError (so a command line that reports ValueErrors as user errors reports
    it in one line). Set the environment variable CLLM_MEMORY_CHECK=0 to skip the check."""


def _read_int(path: str) -> Optional[int]:
    try:
        with open(path) as f:
            text = f.read().strip()
        return None if text == "max" else int(text)
    except (OSError, ValueError):
        return None


def _cgroup_room() -> Optional[int]:
    """Bytes left under this process's cgroup memory limit (v2 or v1), None when there is no limit."""
    for limit_f, usage_f, stat_f, inactive in (
            ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory.stat",
             "inactive_file"),
            ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes",
             "/sys/fs/cgroup/memory/memory.stat", "total_inactive_file")):
        limit, usage = _read_int(limit_f), _read_int(usage_f)
        if limit is None or usage is None or limit >= 1 << 60:
            continue
        reclaimable = 0  # page cache the kernel drops before it reaches the limit
        try:
            with open(stat_f) as f:
                for line in f:
                    k, _, v = line.partition(" ")
                    if k == inactive:
                        reclaimable = int(v)
        except (OSError, ValueError):
            pass
        return max(0, limit - max(0, usage - reclaimable))
    return None


def available_memory() -> Optional[int]:
    """Bytes this process can still allocate without swapping out the machine or meeting the OOM killer:
    MemAvailable + SwapFree (Linux /proc/meminfo, else sysconf), capped by a cgroup limit; None if unknown."""
    avail = None
    try:
        info = {}
        with open("/proc/meminfo") as f:
            for line in f:
                k, _, v = line.partition(":")
                parts = v.split()
                if parts and parts[0].isdigit():
                    info[k] = int(parts[0]) * 1024
        if "MemAvailable" in info:
            avail = info["MemAvailable"] + info.get("SwapFree", 0)
    except OSError:
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, ValueError, OSError):
            avail = None
    room = _cgroup_room()
    if room is not None:
        avail = room if avail is None else min(avail, room)
    return avail


def _size(nbytes: int) -> str:
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20)):
        if nbytes >= scale:
            return f"{nbytes / scale:,.1f} {unit}"
    return f"{nbytes:,} bytes"


_CHECK_FROM_BYTES = 16 << 20  # smaller allocations are not checked (reading /proc costs ~0.1 ms)


def check_memory(nbytes: int, what: str) -> None:
    """Raise InsufficientMemoryError if `nbytes` (16 MiB or more) more bytes cannot fit in the memory available."""
    if nbytes < _CHECK_FROM_BYTES or os.environ.get("CLLM_MEMORY_CHECK", "1").strip() == "0":
        return
    avail = available_memory()
    if avail is not None and nbytes > avail:
        raise InsufficientMemoryError(f"{what} needs {_size(nbytes)} of memory, but only {_size(avail)} is "
                                      f"available")


def core_config(config: ModelConfig, precision: str = "fp32") -> "_core.Config":
    """The core's Config for a ModelConfig (the core validates it again)."""
    c = _core.Config()
    c.vocab_size, c.max_seq_len = config.vocab_size, config.max_seq_len
    c.embedding_dim, c.num_layers = config.embedding_dim, config.num_layers
    c.num_heads, c.ff_dim = config.num_heads, config.ff_dim
    c.dropout, c.learned_pos = float(config.dropout), config.pos_encoding == "learned"
    c.bf16 = precision == "bf16"
    return c


def parameter_layout(config: ModelConfig) -> list:
    """The core's parameter layout of a model of this config (no allocation): one dict per tensor with
    name, shape, offset and size (in floats) and decay (whether weight decay applies), in buffer order."""
    return [dict(name=n, shape=tuple(s), offset=o, size=z, decay=d)
            for n, s, o, z, d in _core.ParamLayout(core_config(config)).tensors]


def parameter_shapes(config: ModelConfig) -> dict:
    """name -> shape of every parameter of a model of this config, in the core's order (no allocation)."""
    return {t["name"]: t["shape"] for t in parameter_layout(config)}


def parameter_count(config: ModelConfig, padded: bool = True) -> int:
    """Floats in the parameter buffer of a model of this config (each tensor padded to 16 floats, as the core
    lays them out; padded=False gives the number of parameters)."""
    if padded:
        return _core.ParamLayout(core_config(config)).total
    return sum(t["size"] for t in parameter_layout(config))


def activation_count(config: ModelConfig, batch_size: int, seq_len: int) -> int:
    """Floats in the activation arena of a training step on [batch_size, seq_len] tokens (the core's plan)."""
    return _core.activation_floats(core_config(config), batch_size, seq_len)


def memory_estimate(config: ModelConfig, batch_size: int = 1, seq_len: Optional[int] = None,
                    optimizer: str = "adamw") -> int:
    """Bytes a training run of this model needs: parameters, gradients, optimizer state ("adamw": two moments,
    "sgd": one buffer, None: none) and the activations of one [batch_size, seq_len] step."""
    seq_len = config.max_seq_len if seq_len is None else seq_len
    buffers = 2 + {"adamw": 2, "sgd": 1, None: 0}[optimizer]
    return 4 * (buffers * parameter_count(config) + activation_count(config, batch_size, seq_len))


def _token_array(a, what: str, max_seq_len: Optional[int] = None) -> np.ndarray:
    """Checks dtype, rank and shape at the boundary, before reading or copying any value (so that a huge
    broadcast array fails at once)."""
    arr = np.asarray(a)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(f"{what} must be an integer array, got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise ValueError(f"{what} must be 2-D [batch, time], got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{what} is empty (shape {arr.shape})")
    if max_seq_len is not None and arr.shape[1] > max_seq_len:
        raise ValueError(f"sequence length {arr.shape[1]} exceeds max_seq_len {max_seq_len}")
    if arr.shape[0] * arr.shape[1] > _INT32_MAX:
        raise ValueError(f"{what} has {arr.shape[0] * arr.shape[1]:,} tokens, more than one call can take "
                         f"({_INT32_MAX:,})")
    return arr


def _needs_copy(arr: np.ndarray) -> bool:
    return not (arr.dtype == np.int32 and arr.flags.c_contiguous)


def _int32_tokens(arr: np.ndarray, what: str) -> np.ndarray:
    """A C-contiguous int32 copy (or the array itself); per-token range checks happen in the core with
    row/position."""
    if arr.dtype != np.int32:
        info = np.iinfo(np.int32)
        lo, hi = arr.min(), arr.max()
        if lo < info.min or hi > info.max:
            bad = lo if lo < info.min else hi
            raise ValueError(f"token id {bad} out of range in {what}")
    return np.ascontiguousarray(arr, dtype=np.int32)


def _int_arg(name: str, value, minimum: int = 0, maximum: int = _INT32_MAX) -> int:
    """An integer argument (integral floats accepted) in [minimum, maximum]; TypeError/ValueError naming it."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer, float, np.floating)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if isinstance(value, (float, np.floating)):
        if not (np.isfinite(value) and float(value).is_integer()):
            raise ValueError(f"{name} must be an int, got {value!r}")
        value = int(value)
    if not minimum <= value <= maximum:
        raise ValueError(f"{name} must be in [{minimum}, {maximum}], got {value}")
    return int(value)


def _float_arg(name: str, value) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not np.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


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
        for name in ("vocab_size", "max_seq_len", "embedding_dim", "num_layers", "num_heads", "ff_dim"):
            if getattr(config, name) > _INT32_MAX:
                raise ValueError(f"{name} {getattr(config, name):,} is too large (at most {_INT32_MAX:,})")
        if 3 * config.embedding_dim > _INT32_MAX:
            raise ValueError(f"embedding_dim {config.embedding_dim:,} is too large (at most {_INT32_MAX // 3:,})")
        if seed > 0xFFFFFFFFFFFFFFFF:
            raise ValueError(f"seed must be below 2**64, got {seed}")
        # parameters + gradients, before the core allocates (and zero-fills) them
        check_memory(8 * parameter_count(config), f"a model of {parameter_count(config, padded=False):,} "
                                                  f"parameters (weights and gradients)")
        self.config = config
        self.seed = int(seed)
        self.precision = precision
        self._arena_shape = None  # the (B, T) the core's activation arena is sized for
        self._core = _core.Model(core_config(config, precision), int(seed))
        self._params = self._core.param_views()
        self._grads = self._core.grad_views()
        self.layout = self._core.layout  # the core's ParamLayout: names, shapes, offsets, decay
        self.tensor_info = [dict(name=n, shape=tuple(s), offset=o, size=z, decay=d)
                            for n, s, o, z, d in self.layout.tensors]

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
        """Copy a name -> array mapping into the model; every tensor must be present with its shape and hold
        real numbers (integer or floating dtype)."""
        if not hasattr(params, "keys") or not hasattr(params, "__getitem__"):
            raise TypeError(f"params must be a mapping name -> array, got {type(params).__name__}")
        mine = self._params
        missing = sorted(set(mine) - set(params))
        extra = sorted(set(params) - set(mine))
        if missing or extra:
            raise ValueError(f"parameter names do not match: missing {missing}, unexpected {extra}")
        for name, view in mine.items():
            src = np.asarray(params[name])
            if src.shape != view.shape:
                raise ValueError(f"parameter {name}: shape {src.shape} does not match {view.shape}")
            if src.dtype.kind not in "iuf":
                raise TypeError(f"parameter {name}: dtype {src.dtype} is not a real number type")
            view[...] = src

    # -- compute ------------------------------------------------------------------------------
    def _batch(self, x, y=None, out_per_token: int = 0):
        """(x, y) as int32 token arrays, after checking their shapes and that the activations (and the
        conversions and the output) fit in memory."""
        x = _token_array(x, "inputs", self.config.max_seq_len)
        if y is not None:
            y = _token_array(y, "targets", self.config.max_seq_len)
            if x.shape != y.shape:
                raise ValueError(f"inputs shape {x.shape} and targets shape {y.shape} differ")
        copies = sum(a.size for a in (x, y) if a is not None and _needs_copy(a))
        self._reserve(*x.shape, extra_floats=copies + out_per_token * x.size)
        return _int32_tokens(x, "inputs"), None if y is None else _int32_tokens(y, "targets")

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

    def forward_backward(self, x, y, accumulate: bool = False, grad_scale: float = 1.0) -> float:
        """Mean cross-entropy of next-token prediction; fills the gradients of grad_scale * loss.

        Gradients are zeroed first unless accumulate=True (gradient accumulation)."""
        grad_scale = _float_arg("grad_scale", grad_scale)
        x, y = self._batch(x, y)
        loss = self._core.forward_backward(x, y, bool(accumulate), grad_scale)
        self._arena_shape = x.shape
        return loss

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
        B = _int_arg("B", B, 1)
        T = _int_arg("T", T, 1, self.config.max_seq_len)
        c = self.config
        check_memory(4 * B * T * (c.num_layers * (c.num_heads * T + 2 * c.embedding_dim) + c.embedding_dim),
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
        self._core.dropout_step = _int_arg("dropout_step", value, 0, 0xFFFFFFFFFFFFFFFF)

    @property
    def dropout_stream(self) -> int:
        """Which of independent dropout mask streams this model draws (same seed and step, other masks).
        Data-parallel training sets it to the rank, so the ranks' rows of one global batch get their own
        masks instead of repeating rank 0's. Default 0."""
        return self._core.dropout_stream

    @dropout_stream.setter
    def dropout_stream(self, value: int) -> None:
        self._core.dropout_stream = _int_arg("dropout_stream", value, 0, 0xFFFFFFFFFFFFFFFF)

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
        max_new_tokens = _int_arg("max_new_tokens", max_new_tokens)
        temperature = _float_arg("temperature", temperature)
        if not temperature >= 0:
            raise ValueError(f"temperature must be finite and >= 0, got {temperature}")
        if top_k is not None:
            top_k = min(_int_arg("top_k", top_k, 1, 1 << 64), self.config.vocab_size)  # k >= V keeps all
        if top_p is not None:
            top_p = _float_arg("top_p", top_p)
            if not 0.0 < top_p <= 1.0:
                raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")
        if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
            if not (isinstance(seed, (float, np.floating)) and np.isfinite(seed) and float(seed).is_integer()):
                raise TypeError(f"seed must be an int, got {seed!r}")
        c = self.config
        check_memory(4 * (2 * c.num_layers * c.max_seq_len * c.embedding_dim
                          + activation_count(c, 1, c.max_seq_len)
                          + (max_new_tokens * c.vocab_size if return_logits else 0)),
                     f"generating {max_new_tokens:,} tokens")
        self._arena_shape = None  # generation re-sizes the arena
        if p.min() < 0 or p.max() >= self.config.vocab_size:
            bad = int(p.min()) if p.min() < 0 else int(p.max())
            pos = int(np.nonzero(p == bad)[0][0])
            raise ValueError(f"token id {bad} out of range for vocab_size {self.config.vocab_size} (prompt position {pos})")
        return self._core.generate(np.ascontiguousarray(p, dtype=np.int32), int(max_new_tokens), float(temperature),
                                   int(top_k or 0), float(top_p or 1.0), int(seed) & 0xFFFFFFFFFFFFFFFF, bool(return_logits))

    def __repr__(self) -> str:
        return f"cllm.Model({self.config}, parameters={self.num_parameters:,}, precision={self.precision!r})"
