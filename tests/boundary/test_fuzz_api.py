"""Fuzzing: the array API ends malformed input in a clear Python exception.

A clear exception is exactly a ValueError, TypeError or MemoryError (cllm's InsufficientMemoryError, NumPy's) with
a message (checked by fuzz_helpers.py). A crash, a hang, or any other exception type (IndexError, KeyError,
OverflowError, SystemError, a Rust panic, ...) fails the test, which prints the input.

Array API: Model.forward / forward_backward / loss / generate / load_parameters and every cllm.kernels function, on
random shapes (0-sized and huge dimensions), dtypes (bool, ints, uint64, floats, complex, object, str),
non-contiguous strides, out-of-range ids and NaN/Inf floats; then minimal reproducers of undefined behaviour in the
C++ core found by this fuzzing under .ci/sanitize. The file readers are fuzzed in test_fuzz_readers.py.

The normal test run is short and deterministic (derandomized, a few hundred examples per target). The long
campaign (see docs/reliability.md) runs the same properties with random seeds:

    CLLM_FUZZ_EXAMPLES=100000 python -m pytest -q -p no:cacheprovider tests/boundary/test_fuzz_api.py
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import cllm
from fuzz_helpers import JSON_VALUES, attempt, fuzz


# ----------------------------------------------------------------------------------------------------
# the array API
# ----------------------------------------------------------------------------------------------------
DTYPES = [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64, np.float16, np.float32,
          np.float64, np.bool_, np.complex64, np.complex128, object, "U3"]
HUGE = [2**31 - 1, 2**31, 2**32 + 1, 2**40]
# broadcast (zero-stride) arrays only get dimensions the API refuses from the shape alone: a 2**31 - 1 broadcast
# vector is a legal 8 GiB float32 input that fits in memory and would really be converted
HUGE_BROADCAST = [2**31, 2**32 + 1, 2**40]


@st.composite
def arrays(draw, small=(0, 1, 2, 3, 5, 8, 9), ndim=None, dtype=None, lo=-3, hi=300):
    """Random arrays: any dtype, 0-3 dims (or `ndim`), small or huge dimensions (huge only where the array holds
    no memory: zero-sized, or broadcast with zero strides), dense, strided (non-contiguous) or transposed, values
    around [lo, hi] plus extreme and non-finite ones."""
    dtype = np.dtype(draw(st.sampled_from(DTYPES)) if dtype is None else dtype)
    nd = draw(st.integers(0, 3)) if ndim is None else ndim
    shape = [draw(st.sampled_from(small)) for _ in range(nd)]
    layout = draw(st.sampled_from(["dense", "dense", "strided", "transposed", "zero_huge", "broadcast_huge"]))
    if layout in ("zero_huge", "broadcast_huge") and nd:
        i = draw(st.integers(0, nd - 1))
        shape[i] = draw(st.sampled_from(HUGE if layout == "zero_huge" else HUGE_BROADCAST))
        if layout == "zero_huge":
            j = draw(st.integers(0, nd - 1).filter(lambda j: j != i)) if nd > 1 else i
            shape[j] = 0
            return np.zeros(shape, dtype=dtype)
        return np.broadcast_to(np.zeros((), dtype=dtype), shape)
    n = int(np.prod(shape)) if shape else 1
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        extremes = st.sampled_from([v for v in (int(info.min), int(info.max), -1, 0, hi, hi + 1)
                                    if info.min <= v <= info.max])
        vals = draw(st.lists(st.integers(max(lo, int(info.min)), min(hi, int(info.max))) | extremes, min_size=n,
                             max_size=n))
        a = np.array(vals, dtype=dtype)
    elif dtype.kind in "fc":
        vals = draw(st.lists(st.floats(-4, 4, width=16) | st.sampled_from([np.nan, np.inf, -np.inf, 1e30, -0.0]),
                             min_size=n, max_size=n))
        a = np.array(vals, dtype=dtype)
    elif dtype.kind == "b":
        a = np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=dtype)
    elif dtype.kind == "O":
        a = np.empty(n, dtype=object)
        a[:] = draw(st.lists(st.sampled_from([None, 1, 2.5, "x", [1], np.nan]), min_size=n, max_size=n))
    else:
        a = np.array(draw(st.lists(st.sampled_from(["a", "1", ""]), min_size=n, max_size=n)), dtype=dtype)
    a = a.reshape(shape)
    if layout == "strided" and nd:
        i = draw(st.integers(0, nd - 1))
        a = np.repeat(a, 2, axis=i)[(slice(None),) * i + (slice(None, None, 2),)]
    elif layout == "transposed" and nd > 1:
        a = np.ascontiguousarray(np.swapaxes(a, 0, -1)).swapaxes(0, -1)
    return a


@pytest.fixture(scope="module")
def model():
    return cllm.Model(cllm.ModelConfig(vocab_size=50, max_seq_len=8, embedding_dim=16, num_layers=1, num_heads=2,
                                       ff_dim=32), seed=0)


def valid_tokens(a, model) -> bool:
    """Valid ids of a batch small enough to run (the strategies make small arrays or ones with dimensions of
    2**31 and more, whose values must not be scanned here either)."""
    a = np.asarray(a)
    return (a.dtype.kind in "iu" and a.ndim == 2 and 0 < a.size <= 10**6 and a.shape[1] <= model.config.max_seq_len
            and int(a.min()) >= 0 and int(a.max()) < model.config.vocab_size)


@fuzz(300)
@given(x=arrays(lo=-2, hi=52), y=arrays(lo=-2, hi=52), which=st.sampled_from(["forward", "forward_backward", "loss"]),
       same=st.booleans())
@pytest.mark.slow
def test_model_array_inputs(model, x, y, which, same):
    if same:
        y = x
    before = model.flat_parameters().copy()
    if which == "forward":
        ok, out = attempt(model.forward, x)
        valid = valid_tokens(x, model)
    else:
        ok, out = attempt(getattr(model, which), x, y)
        valid = valid_tokens(x, model) and valid_tokens(y, model) and np.shape(x) == np.shape(y)
    assert ok == valid, (ok, out)  # valid input works, everything else is refused (never trained on)
    if ok and which == "forward":
        assert out.shape == (*np.shape(x), model.config.vocab_size) and np.isfinite(out).all()
    elif ok:
        assert np.isfinite(out)
    assert np.array_equal(model.flat_parameters(), before)  # the weights are only changed by an optimizer


@fuzz(120)
@given(prompt=arrays(ndim=None, lo=-2, hi=52),
       max_new=st.sampled_from([0, 1, 3, 20, -1, 2.0, 2.5, 2**31, 10**20, float("inf"), float("nan"), None, "3",
                                True]),
       temperature=st.sampled_from([0.0, 0.8, 1e-30, 1e30, -1.0, float("nan"), float("inf"), None, "1", 1]),
       top_k=st.sampled_from([None, 1, 3, 50, 51, 10**30, 0, -1, 1.5, float("inf"), float("nan"), "2", True]),
       top_p=st.sampled_from([None, 1.0, 0.5, 1e-300, 0.0, 1.5, -0.1, float("nan"), "0.5"]),
       seed=st.sampled_from([0, 1, -1, 2**64 + 5, 1.0, 1.5, float("inf"), None, "1"]),
       return_logits=st.booleans())
@pytest.mark.slow
def test_generate_inputs(model, prompt, max_new, temperature, top_k, top_p, seed, return_logits):
    ok, out = attempt(model.generate, prompt, max_new, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                      return_logits=return_logits)
    if ok:
        toks = out[0] if return_logits else out
        for t in toks if np.ndim(prompt) == 2 else [toks]:  # a 2-D prompt is a batch: one array per row
            assert t.ndim == 1 and (t.size == 0 or (t.min() >= 0 and t.max() < model.config.vocab_size))


@fuzz(40)
@given(params=st.dictionaries(st.sampled_from(["wte", "wpe", "ln_f.weight", "x"]), arrays(), max_size=4)
       | JSON_VALUES)
@pytest.mark.slow
def test_load_parameters_inputs(model, params):
    before = model.flat_parameters().copy()
    ok, _ = attempt(model.load_parameters, params)
    assert not ok and np.array_equal(model.flat_parameters(), before)


def test_nonfinite_inputs_to_the_model_are_finite_errors_or_finite_losses(model):
    """NaN in the weights never crashes the core; the loss reports it (the trainer's guard acts on that)."""
    m = cllm.Model(model.config, seed=0)
    m.parameters()["wte"][3, 0] = np.nan
    x = np.array([[3, 1, 2]])
    assert not np.isfinite(m.loss(x, x))
    assert not np.isfinite(m.forward_backward(x, x))
    assert m.generate([3], 5, temperature=0.8, top_k=5, top_p=0.9).shape == (5,)  # any ids, but no crash
    assert m.generate([3], 5, temperature=0.0).shape == (5,)


# kernels: builders of consistent arguments from small dims, then one argument corrupted
def _f(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def kernel_args(name, d, rng):
    B, T, C, H, V, F, N, P = (d[k] for k in "BTCHVFNP")
    C3 = 3 * C * H  # attention needs C % H == 0: use C * H channels
    tok = lambda *s: rng.integers(0, max(V, 1), s).astype(np.int32)  # noqa: E731
    return {
        "sinusoidal_table": lambda: (P, C),
        "embedding_forward": lambda: (tok(B, T), _f(rng, V, C), _f(rng, max(P, T), C)),
        "embedding_backward": lambda: (_f(rng, B, T, C), tok(B, T), V, max(P, T)),
        "layernorm_forward": lambda: (_f(rng, N, C), _f(rng, C), _f(rng, C)),
        "layernorm_backward": lambda: (_f(rng, N, C), _f(rng, N, C), _f(rng, C), _f(rng, N), _f(rng, N)),
        "linear_forward": lambda: (_f(rng, N, C), _f(rng, C, F), _f(rng, F)),
        "linear_backward": lambda: (_f(rng, N, F), _f(rng, N, C), _f(rng, C, F)),
        "matmul": lambda: (_f(rng, N, C), _f(rng, C, F), False, False, bool(d["bf16"])),
        "gelu_forward": lambda: (_f(rng, N, F),),
        "gelu_backward": lambda: (_f(rng, N, F), _f(rng, N, F)),
        "attention_forward": lambda: (_f(rng, B, T, C3), H),
        "attention_backward": lambda: (_f(rng, B, T, C3 // 3), _f(rng, B, T, C3), _f(rng, B, T, C3 // 3),
                                       _f(rng, B, H, T), H),
        "feedforward_forward": lambda: (_f(rng, N, C), _f(rng, C, F), _f(rng, F), _f(rng, F, C), _f(rng, C)),
        "feedforward_backward": lambda: (_f(rng, N, C), _f(rng, N, C), _f(rng, C, F), _f(rng, F), _f(rng, F, C),
                                         _f(rng, C)),
        "rmsnorm_forward": lambda: (_f(rng, N, C), _f(rng, C), 1e-5),
        "rmsnorm_backward": lambda: (_f(rng, N, C), _f(rng, N, C), _f(rng, C), _f(rng, N)),
        "rope_forward": lambda: (_f(rng, B, T, H, 2 * C), 10000.0),  # an even head size
        "rope_backward": lambda: (_f(rng, B, T, H, 2 * C), 10000.0),
        "swiglu_forward": lambda: (_f(rng, N, 2 * F),),
        "swiglu_backward": lambda: (_f(rng, N, F), _f(rng, N, 2 * F)),
        "cross_entropy_forward": lambda: (_f(rng, N, V), tok(N)),
        "cross_entropy_backward": lambda: (_f(rng, N, V), tok(N), 0.5),
    }[name]()


KERNELS = sorted(cllm.kernels.__all__)
DIMS = st.fixed_dictionaries({k: st.sampled_from([0, 1, 1, 2, 3, 5, 8]) for k in "BTCVFNP"}
                             | {"H": st.sampled_from([1, 1, 2, 3]), "bf16": st.booleans()})


@pytest.mark.slow
@fuzz(400)
@given(name=st.sampled_from(KERNELS), dims=DIMS, seed=st.integers(0, 2**16), data=st.data())
def test_kernel_inputs(name, dims, seed, data):
    rng = np.random.default_rng(seed)
    args = list(kernel_args(name, dims, rng))
    how = data.draw(st.sampled_from(["none", "none", "nonfinite", "noncontiguous", "replace", "scalar", "drop",
                                     "extra"]))
    i = data.draw(st.integers(0, len(args) - 1))
    arrays_at = [j for j, a in enumerate(args) if isinstance(a, np.ndarray)]
    if how == "nonfinite" and arrays_at:
        j = data.draw(st.sampled_from(arrays_at))
        if args[j].dtype == np.float32 and args[j].size:
            flat = args[j].reshape(-1)
            flat[data.draw(st.integers(0, flat.size - 1))] = data.draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    elif how == "noncontiguous" and arrays_at:
        j = data.draw(st.sampled_from(arrays_at))
        args[j] = np.repeat(args[j], 2, axis=-1)[..., ::2] if args[j].ndim else args[j]
    elif how == "replace":
        args[i] = data.draw(arrays())
    elif how == "scalar":
        args[i] = data.draw(st.sampled_from([None, 0, -1, 2**31, 2**40, 1.5, float("nan"), "x", [1, 2], True]))
    elif how == "drop":
        args.pop(i)
    elif how == "extra":
        args.append(0)
    ok, out = attempt(getattr(cllm.kernels, name), *args)
    if how in ("none", "nonfinite", "noncontiguous") and min(dims[k] for k in "BTCVFNP") > 0:
        assert ok, out  # well-formed arguments work, NaN/Inf and strides included (0-sized ones may be refused)
    if ok:
        for o in out if isinstance(out, tuple) else (out,):
            assert isinstance(o, np.ndarray) and o.dtype == np.float32


@example(shape=(2**31, 1))
@example(shape=(1, 2**31))
@example(shape=(2**40, 2**16))
@fuzz(10)
@given(shape=st.tuples(st.sampled_from(HUGE_BROADCAST + [1, 8]), st.sampled_from(HUGE_BROADCAST + [1, 8]))
       .filter(lambda s: s[0] * s[1] < 2**59))  # NumPy's own limit on array sizes
def test_huge_broadcast_inputs_fail_fast(model, shape):
    """A broadcast array with huge dimensions is refused from its shape, before any value is read or copied."""
    x = np.broadcast_to(np.int64(1), shape)
    ok, _ = attempt(model.forward, x)
    assert ok == (shape == (1, 8) or shape == (8, 8) or shape == (8, 1) or shape == (1, 1))
    ok, _ = attempt(cllm.kernels.gelu_forward, np.broadcast_to(np.float64(1), shape))
    assert ok == (max(shape) <= 8)


# ----------------------------------------------------------------------------------------------------
# minimal reproducers of undefined behaviour in the C++ core found by the fuzzing under .ci/sanitize
# (they pass in a normal build; UBSan aborts them until csrc/ is fixed)
# ----------------------------------------------------------------------------------------------------
def test_exp_of_nan_is_nan_without_undefined_behaviour():
    """csrc/cllm.h fast_exp(NaN): the NaN passes the clamp, `(int32_t)n` of a NaN is undefined and the result is
    shifted left while negative ("left shift of negative value -2147483521"). Reached by any NaN logit, attention
    score or GELU input, e.g. a NaN weight."""
    losses = cllm.kernels.cross_entropy_forward(np.array([[np.nan, 0.0, 1.0]], np.float32), np.zeros(1, np.int32))
    assert np.isnan(losses).all()
    assert np.isnan(cllm.kernels.gelu_forward(np.array([np.nan], np.float32))).all()
    out, lse = cllm.kernels.attention_forward(np.full((1, 2, 6), np.nan, np.float32), 2)
    assert np.isnan(out).all()


def test_zero_width_linear_layer_without_undefined_behaviour():
    """csrc/cllm_linear.cpp linear_forward / cllm_gemm.cpp gemm_impl with an empty output: memcpy/memset to the null pointer of an
    empty std::vector ("null pointer passed as argument 1, which is declared to never be null"), e.g. a
    feed-forward layer of width 0."""
    x = np.ones((2, 3), np.float32)
    out = cllm.kernels.feedforward_forward(x, np.zeros((3, 0), np.float32), np.zeros(0, np.float32),
                                           np.zeros((0, 3), np.float32), np.full(3, 0.5, np.float32))
    assert np.array_equal(out, np.full((2, 3), 0.5, np.float32))


def test_linear_backward_with_no_rows_or_columns_without_undefined_behaviour():
    """csrc/cllm_linear.cpp linear_backward's bias gradient with no columns: memcpy into the null scratch of zero
    partial rows ("null pointer passed as argument 1"). No rows leave the bias gradient at zero."""
    for n, ic, oc in [(3, 4, 0), (0, 3, 4), (3, 0, 4)]:
        dx, dw, db = cllm.kernels.linear_backward(np.ones((n, oc), np.float32), np.ones((n, ic), np.float32),
                                                  np.ones((ic, oc), np.float32))
        assert dx.shape == (n, ic) and dw.shape == (ic, oc)
        assert np.array_equal(db, np.full(oc, float(n), np.float32))
        assert np.array_equal(dw, np.full((ic, oc), float(n), np.float32))
