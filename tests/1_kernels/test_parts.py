"""Each C++ kernel pair (cllm.kernels, float32) against the float64 oracle part.

Forward: max |got - ref| / max(1, |ref|) <= 1e-4. Backward: ||got - ref|| / ||ref|| <= 1e-4 per gradient.
Backward kernels are fed the kernel's own forward outputs (mean/rstd, out/lse), as the model does.
"""

from __future__ import annotations

import numpy as np
import pytest

import oracle

pytestmark = pytest.mark.usefixtures("each_variant")  # every kernel variant this CPU runs

FWD_TOL = 1e-4
BWD_TOL = 1e-4


def f32(a):
    return np.ascontiguousarray(a, dtype=np.float32)


def i32(a):
    return np.ascontiguousarray(a, dtype=np.int32)


# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("B,T,V,P,C", [(2, 13, 37, 16, 48), (1, 5, 11, 5, 33), (3, 1, 7, 4, 8)],
                         ids=["B2-T13-C48", "B1-T5-C33-P=T", "B3-T1-C8"])
def test_embedding(kernels, errs, rng, B, T, V, P, C):
    tokens = rng.integers(0, V, (B, T))
    tokens.flat[: min(3, tokens.size)] = V - 1  # repeated and the largest token id
    wte = rng.standard_normal((V, C))
    pos = rng.standard_normal((P, C))
    dout = rng.standard_normal((B, T, C))
    ref, cache = oracle.embedding_forward(tokens, wte, pos)
    dwte_ref, dpos_ref = oracle.embedding_backward(dout, cache)

    out = kernels.embedding_forward(i32(tokens), f32(wte), f32(pos))
    assert out.shape == (B, T, C) and out.dtype == np.float32
    errs.maxabs("out", out, ref, FWD_TOL)
    dwte, dpos = kernels.embedding_backward(f32(dout), i32(tokens), V, P)
    assert dwte.shape == (V, C) and dpos.shape == (P, C)
    errs.normwise("dwte", dwte, dwte_ref, BWD_TOL)
    errs.normwise("dpos", dpos, dpos_ref, BWD_TOL)
    assert np.all(dpos[T:] == 0), "rows of dpos beyond T must be zero"
    errs.finish()


@pytest.mark.parametrize("P,C", [(16, 48), (13, 33), (128, 128), (1, 2)], ids=["16x48", "13x33-oddC", "128x128", "1x2"])
def test_sinusoidal_table(kernels, errs, P, C):
    got = kernels.sinusoidal_table(P, C)
    assert got.shape == (P, C)
    errs.maxabs("table", got, oracle.sinusoidal_table(P, C), FWD_TOL)
    errs.finish()


# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("N,C,offset", [(37, 48, 0.0), (5, 33, 3.0), (64, 128, -1.0), (1, 7, 0.5)],
                         ids=["37x48", "5x33-offset", "64x128", "1x7"])
def test_layernorm(kernels, errs, rng, N, C, offset):
    x = rng.standard_normal((N, C)) * 1.5 + offset
    w = 1.0 + 0.2 * rng.standard_normal(C)
    b = 0.2 * rng.standard_normal(C)
    dout = rng.standard_normal((N, C))
    ref, mean_ref, rstd_ref, cache = oracle.layernorm_forward(x, w, b)
    dx_ref, dw_ref, db_ref = oracle.layernorm_backward(dout, cache)

    out, mean, rstd = kernels.layernorm_forward(f32(x), f32(w), f32(b))
    assert out.shape == (N, C) and mean.shape == (N,) and rstd.shape == (N,)
    errs.maxabs("out", out, ref, FWD_TOL)
    errs.maxabs("mean", mean, mean_ref, FWD_TOL)
    errs.maxabs("rstd", rstd, rstd_ref, FWD_TOL)
    dx, dw, db = kernels.layernorm_backward(f32(dout), f32(x), f32(w), mean, rstd)
    errs.normwise("dx", dx, dx_ref, BWD_TOL)
    errs.normwise("dw", dw, dw_ref, BWD_TOL)
    errs.normwise("db", db, db_ref, BWD_TOL)
    errs.finish()


# ----------------------------------------------------------------------------------------------------
# N <= 16 takes the few-rows path (decode steps): 11 and 16 rows in groups of 8, one and two rows a k at a time;
# full column strips and a ragged end; K over 64 sums several chunks of w's rows, the last one short
@pytest.mark.parametrize("N,K,M", [(37, 48, 100), (13, 33, 17), (128, 128, 384), (1, 5, 3), (26, 100, 48),
                                   (11, 70, 100), (16, 40, 67), (1, 200, 100), (2, 130, 70)],
                         ids=["37x48x100", "13x33x17", "128x128x384", "1x5x3", "26x100x48", "11x70x100", "16x40x67",
                              "1x200x100", "2x130x70"])
def test_linear(kernels, errs, rng, N, K, M):
    x = rng.standard_normal((N, K))
    w = rng.standard_normal((K, M)) * 0.2
    b = rng.standard_normal(M) * 0.5
    dout = rng.standard_normal((N, M))
    ref, cache = oracle.linear_forward(x, w, b)
    dx_ref, dw_ref, db_ref = oracle.linear_backward(dout, cache)

    out = kernels.linear_forward(f32(x), f32(w), f32(b))
    assert out.shape == (N, M)
    errs.maxabs("out", out, ref, FWD_TOL)
    dx, dw, db = kernels.linear_backward(f32(dout), f32(x), f32(w))
    assert dx.shape == (N, K) and dw.shape == (K, M) and db.shape == (M,)
    errs.normwise("dx", dx, dx_ref, BWD_TOL)
    errs.normwise("dw", dw, dw_ref, BWD_TOL)
    errs.normwise("db", db, db_ref, BWD_TOL)
    errs.finish()


@pytest.mark.parametrize("K,M", [(200, 100), (64, 96), (8, 35)], ids=["200x100", "64x96", "8x35"])
def test_linear_few_rows_same_bits_in_any_batch_and_thread_count(cllm, kernels, rng, K, M):
    """A decode step's row gets the same bits alone, in any batch of up to 16 rows and with any thread count: the
    few-rows path sums each output over fixed chunks of w's rows, in order, whatever the rows and threads."""
    x = f32(rng.standard_normal((16, K)))
    w = f32(rng.standard_normal((K, M)) * 0.2)
    b = f32(rng.standard_normal(M))
    alone = kernels.linear_forward(x[:1], w, b)[0]
    orig = cllm.get_num_threads()
    try:
        for threads in (1, 2, 3, 5):
            cllm.set_num_threads(threads)
            for n in range(1, 17):
                got = kernels.linear_forward(x[:n], w, b)[0]
                assert np.array_equal(got, alone), f"{n} rows, {threads} threads: row 0 differs from row 0 alone"
    finally:
        cllm.set_num_threads(orig)


# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,scale", [((37, 100), 3.0), ((5, 33), 8.0), ((1, 1), 1.0)],
                         ids=["37x100", "5x33-wide-range", "1x1"])
def test_gelu(kernels, errs, rng, shape, scale):
    x = rng.standard_normal(shape) * scale
    dout = rng.standard_normal(shape)
    ref, cache = oracle.gelu_forward(x)
    dx_ref = oracle.gelu_backward(dout, cache)
    out = kernels.gelu_forward(f32(x))
    assert out.shape == shape
    errs.maxabs("out", out, ref, FWD_TOL)
    dx = kernels.gelu_backward(f32(dout), f32(x))
    errs.normwise("dx", dx, dx_ref, BWD_TOL)
    errs.finish()


# ----------------------------------------------------------------------------------------------------
# T above 64 spans several query blocks (the kernel's diagonal-block skipping), 130 and 200 with a ragged last one
@pytest.mark.parametrize("B,T,C,H", [(2, 13, 48, 3), (2, 13, 48, 1), (1, 1, 48, 3), (3, 7, 20, 5), (1, 64, 128, 4),
                                     (1, 130, 64, 2), (2, 200, 96, 3)],
                         ids=["B2-T13-C48-H3", "B2-T13-C48-H1", "B1-T1-H3", "B3-T7-C20-H5", "B1-T64-C128-H4",
                              "B1-T130-C64-H2", "B2-T200-C96-H3"])
def test_attention(kernels, errs, rng, B, T, C, H):
    qkv = rng.standard_normal((B, T, 3 * C)) * 1.5
    dout = rng.standard_normal((B, T, C))
    ref, lse_ref, cache = oracle.attention_forward(qkv, H)
    dqkv_ref = oracle.attention_backward(dout, cache)

    out, lse = kernels.attention_forward(f32(qkv), H)
    assert out.shape == (B, T, C) and lse.shape == (B, H, T)
    errs.maxabs("out", out, ref, FWD_TOL)
    errs.maxabs("lse", lse, lse_ref, FWD_TOL)
    dqkv = kernels.attention_backward(f32(dout), f32(qkv), out, lse, H)
    assert dqkv.shape == (B, T, 3 * C)
    errs.normwise("dqkv", dqkv, dqkv_ref, BWD_TOL)
    for part, sl in (("dq", slice(0, C)), ("dk", slice(C, 2 * C)), ("dv", slice(2 * C, 3 * C))):
        if np.linalg.norm(dqkv_ref[..., sl]) > 0:  # T == 1: dq and dk are exactly zero
            errs.normwise(part, dqkv[..., sl], dqkv_ref[..., sl], BWD_TOL)
        else:  # zero up to the rounding of products the size of dv's (= dout at T == 1)
            scale = max(1.0, float(np.abs(dqkv_ref[..., 2 * C:]).max()))
            errs.record(part + " (abs)", float(np.max(np.abs(dqkv[..., sl]))) / scale, 1e-6)
    errs.finish()


# T = 800: the packed K and V (pack_operand) span several K blocks (384 deep in fp32, 768 in bf16), the query
# blocks reading leading parts of them that end inside a block
@pytest.mark.parametrize("B,T,H,KV,hs", [(2, 13, 6, 2, 8), (1, 130, 4, 1, 16), (3, 7, 3, 3, 4), (1, 800, 4, 2, 16)],
                         ids=["B2-T13-H6-KV2", "B1-T130-H4-KV1", "B3-T7-H3-KV3", "B1-T800-H4-KV2"])
def test_grouped_query_attention(kernels, errs, rng, B, T, H, KV, hs):
    qkv = rng.standard_normal((B, T, (H + 2 * KV) * hs)) * 1.5
    dout = rng.standard_normal((B, T, H * hs))
    ref, lse_ref, cache = oracle.attention_forward(qkv, H, None, KV)
    out, lse = kernels.attention_forward(f32(qkv), H, KV)
    errs.maxabs("out", out, ref, FWD_TOL)
    errs.maxabs("lse", lse, lse_ref, FWD_TOL)
    dqkv = kernels.attention_backward(f32(dout), f32(qkv), out, lse, H, KV)
    dref = oracle.attention_backward(dout, cache)
    assert dqkv.shape == dref.shape
    for part, sl in (("dq", slice(0, H * hs)), ("dk", slice(H * hs, (H + KV) * hs)), ("dv", slice((H + KV) * hs, None))):
        errs.normwise(part, dqkv[..., sl], dref[..., sl], BWD_TOL)
    errs.finish()


@pytest.mark.parametrize("N,C,eps", [(37, 48, 1e-5), (5, 33, 1e-6), (1, 7, 1e-5)], ids=["37x48", "5x33", "1x7"])
def test_rmsnorm(kernels, errs, rng, N, C, eps):
    x = rng.standard_normal((N, C)) * 2 + 0.5
    w = 1 + 0.3 * rng.standard_normal(C)
    dout = rng.standard_normal((N, C))
    ref, rstd_ref, cache = oracle.rmsnorm_forward(x, w, eps)
    out, rstd = kernels.rmsnorm_forward(f32(x), f32(w), eps)
    errs.maxabs("out", out, ref, FWD_TOL)
    errs.maxabs("rstd", rstd, rstd_ref, FWD_TOL)
    dx, dw = kernels.rmsnorm_backward(f32(dout), f32(x), f32(w), rstd)
    dx_ref, dw_ref = oracle.rmsnorm_backward(dout, cache)
    errs.normwise("dx", dx, dx_ref, BWD_TOL)
    errs.normwise("dw", dw, dw_ref, BWD_TOL)
    errs.finish()


@pytest.mark.parametrize("B,T,heads,hs,theta", [(2, 13, 3, 16, 10000.0), (1, 200, 2, 64, 500000.0), (3, 1, 1, 2, 10.0)],
                         ids=["B2-T13-hs16", "T200-hs64-theta5e5", "T1-hs2"])
def test_rope(kernels, errs, rng, B, T, heads, hs, theta):
    x = rng.standard_normal((B, T, heads, hs))
    errs.maxabs("forward", kernels.rope_forward(f32(x), theta), oracle.rope_forward(x, theta), FWD_TOL)
    errs.maxabs("backward", kernels.rope_backward(f32(x), theta), oracle.rope_backward(x, theta), FWD_TOL)
    errs.finish()


@pytest.mark.parametrize("N,F,scale", [(37, 100, 3.0), (5, 33, 12.0), (1, 1, 1.0)], ids=["37x100", "5x33-wide", "1x1"])
def test_swiglu(kernels, errs, rng, N, F, scale):
    gu = rng.standard_normal((N, 2 * F)) * scale
    dout = rng.standard_normal((N, F))
    ref, cache = oracle.swiglu_forward(gu)
    errs.maxabs("out", kernels.swiglu_forward(f32(gu)), ref, FWD_TOL)
    errs.normwise("dgu", kernels.swiglu_backward(f32(dout), f32(gu)), oracle.swiglu_backward(dout, cache), BWD_TOL)
    errs.finish()


def test_attention_is_causal(kernels, rng):
    """Changing a later token's k/v must not change earlier outputs."""
    B, T, C, H = 1, 9, 12, 3
    qkv = rng.standard_normal((B, T, 3 * C)).astype(np.float32)
    out1, _ = kernels.attention_forward(qkv, H)
    qkv2 = qkv.copy()
    qkv2[:, 5:, C:] += 1.0  # keys and values of positions >= 5
    out2, _ = kernels.attention_forward(qkv2, H)
    np.testing.assert_array_equal(out1[:, :5], out2[:, :5])
    assert not np.allclose(out1[:, 5:], out2[:, 5:])


# ----------------------------------------------------------------------------------------------------
# the larger shapes take the GEMM's other paths for the c_fc product and its GELU epilogue: column
# strips per thread (64 rows), one K block at a time (1024 rows), a C of >= 4 MiB (2048 x 1024)
@pytest.mark.parametrize("N,C,F", [(37, 48, 100), (9, 33, 70), (64, 128, 512), (1024, 32, 512), (2048, 32, 1024)],
                         ids=["37x48x100", "9x33x70", "64x128x512", "1024x32x512", "2048x32x1024"])
@pytest.mark.slow
def test_feedforward(kernels, errs, rng, N, C, F):
    x = rng.standard_normal((N, C))
    w_fc = rng.standard_normal((C, F)) * (1.5 / np.sqrt(C))
    b_fc = rng.standard_normal(F) * 0.3
    w_proj = rng.standard_normal((F, C)) * (1.0 / np.sqrt(F))
    b_proj = rng.standard_normal(C) * 0.3
    dout = rng.standard_normal((N, C))
    ref, cache = oracle.feedforward_forward(x, w_fc, b_fc, w_proj, b_proj)
    refs = oracle.feedforward_backward(dout, cache)

    args = [f32(a) for a in (x, w_fc, b_fc, w_proj, b_proj)]
    out = kernels.feedforward_forward(*args)
    assert out.shape == (N, C)
    errs.maxabs("out", out, ref, FWD_TOL)
    got = kernels.feedforward_backward(f32(dout), *args)
    for name, g, r in zip(["dx", "dw_fc", "db_fc", "dw_proj", "db_proj"], got, refs):
        errs.normwise(name, g, r, BWD_TOL)
    errs.finish()


# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("N,V,scale", [(37, 67, 3.0), (5, 256, 10.0), (1, 2, 1.0), (64, 50257, 2.0)],
                         ids=["37x67", "5x256-peaked", "1x2", "64x50257"])
@pytest.mark.slow
def test_cross_entropy(kernels, errs, rng, N, V, scale):
    logits = rng.standard_normal((N, V)) * scale
    logits[0, 0] += 30.0  # a large logit: forward must be max-subtracted
    targets = rng.integers(0, V, N)
    targets[-1] = V - 1
    for eps in (0.0, 0.1, 1.0):  # label smoothing
        ref, cache = oracle.cross_entropy_forward(logits, targets, eps)
        losses = kernels.cross_entropy_forward(f32(logits), i32(targets), eps)
        assert losses.shape == (N,)
        errs.maxabs(f"losses(eps={eps})", losses, ref, FWD_TOL)
        for s in (1.0 / N, 0.37):
            d = kernels.cross_entropy_backward(f32(logits), i32(targets), s, eps)
            assert d.shape == (N, V)
            errs.normwise(f"dlogits(scale={s:.3g}, eps={eps})", d, oracle.cross_entropy_backward(cache, s), BWD_TOL)
    errs.finish()
