"""KV-cached generation: equal to a full forward at every step; sampling controls behave."""
import numpy as np
import pytest

import cllm

EACH_VARIANT = pytest.mark.usefixtures("each_variant")  # the oracle tests run on every kernel variant the CPU runs

CFG = cllm.ModelConfig(vocab_size=67, max_seq_len=24, embedding_dim=48, num_layers=2, num_heads=3, ff_dim=100)


# llama: RoPE at each cached position, a cache of 2 K/V heads for 6 query heads, an untied head
LLAMA = dict(architecture="llama", pos_encoding="rope", num_heads=6, num_kv_heads=2, tie_embeddings=False)


@pytest.fixture(scope="module", params=["learned", "sinusoidal", "llama"])
def model(request):
    kw = LLAMA if request.param == "llama" else dict(pos_encoding=request.param)
    m = cllm.Model(CFG.replace(**kw), seed=1)
    rng = np.random.default_rng(0)
    for v in m.parameters().values():  # a non-trivial model: larger weights, non-zero biases
        v += rng.normal(0, 0.05, v.shape).astype(np.float32)
    return m


@EACH_VARIANT
def test_cached_logits_equal_full_forward_at_every_step(model):
    prompt = [5, 9, 1, 33]
    toks, logits = model.generate(prompt, max_new_tokens=CFG.max_seq_len - len(prompt) + 1, temperature=0.8,
                                  seed=4, return_logits=True)
    ctx = list(prompt)
    worst = 0.0
    for i, t in enumerate(toks):
        full = model.forward(np.array([ctx]))[0, -1]
        worst = max(worst, float(np.abs(full - logits[i]).max()))
        ctx.append(int(t))
    assert worst < 1e-4, worst


@EACH_VARIANT
def test_context_window_slides_past_max_seq_len(model):
    toks, logits = model.generate([1, 2, 3], max_new_tokens=3 * CFG.max_seq_len, temperature=1.0, seed=0,
                                  return_logits=True)
    assert toks.shape == (3 * CFG.max_seq_len,) and np.isfinite(logits).all()


@EACH_VARIANT
def test_temperature_zero_is_greedy(model):
    toks, logits = model.generate([3, 4], max_new_tokens=10, temperature=0.0, return_logits=True)
    assert np.array_equal(toks, logits.argmax(axis=1))
    # a very low temperature samples the argmax as well
    cold = model.generate([3, 4], max_new_tokens=10, temperature=1e-4, seed=9)
    assert np.array_equal(toks, cold)


def test_seeded_sampling_is_reproducible(model):
    a = model.generate([7], 20, temperature=1.0, seed=1)
    b = model.generate([7], 20, temperature=1.0, seed=1)
    c = model.generate([7], 20, temperature=1.0, seed=2)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


@EACH_VARIANT
def test_top_k_and_top_p_restrict_the_candidates(model):
    toks, logits = model.generate([2], 40, temperature=1.0, top_k=3, seed=5, return_logits=True)
    for t, lg in zip(toks, logits):
        assert t in np.argsort(-lg, kind="stable")[:3]
    toks, logits = model.generate([2], 40, temperature=1.0, top_p=0.5, seed=5, return_logits=True)
    for t, lg in zip(toks, logits):
        p = np.exp(lg - lg.max())
        p /= p.sum()
        order = np.argsort(-p, kind="stable")
        nucleus = order[: int(np.searchsorted(np.cumsum(p[order]), 0.5) + 1)]
        assert t in nucleus
    # top_k=1 is greedy
    g = model.generate([2], 15, temperature=0.0)
    assert np.array_equal(model.generate([2], 15, temperature=1.5, top_k=1, seed=3), g)


def test_sampling_follows_the_distribution():
    """With a fixed context, sampled frequencies match softmax(logits / T)."""
    cfg = cllm.ModelConfig(vocab_size=5, max_seq_len=2, embedding_dim=8, num_layers=1, num_heads=1, ff_dim=8)
    m = cllm.Model(cfg, seed=0)
    m.parameters()["wte"][:] *= 50
    _, lg = m.generate([0], 1, temperature=0.0, return_logits=True)
    p = np.exp((lg[0] - lg[0].max()) / 0.7)
    p /= p.sum()
    counts = np.bincount([int(m.generate([0], 1, temperature=0.7, seed=s)[0]) for s in range(4000)], minlength=5)
    np.testing.assert_allclose(counts / 4000, p, atol=0.03)


# ------------------------------------------------------------------------------------------------------
# batches, stops, penalties, the step callback
# ------------------------------------------------------------------------------------------------------
PROMPTS = [[5, 9, 1, 33], [2], [7, 7, 3, 60, 1, 2, 8, 9, 10, 11], [40, 41]]


def test_batch_equals_one_at_a_time_greedy(model):
    n = 2 * CFG.max_seq_len  # past the context: sequences are prefilled again at different steps
    batch = model.generate(PROMPTS, n, temperature=0.0)
    assert isinstance(batch, list) and len(batch) == len(PROMPTS)
    for p, toks in zip(PROMPTS, batch):
        assert np.array_equal(toks, model.generate(p, n, temperature=0.0))


def test_batch_logits_match_one_at_a_time_and_seeds_are_per_prompt(model):
    toks, logits = model.generate(PROMPTS, 12, temperature=1.0, seed=[1, 2, 3, 4], return_logits=True)
    for i, p in enumerate(PROMPTS):
        t1, l1 = model.generate(p, 12, temperature=1.0, seed=i + 1, return_logits=True)
        # bit for bit: a decode step's few-rows products sum each row alone, in the same order for any batch
        assert np.array_equal(logits[i], l1)
        assert np.array_equal(toks[i], t1)
    # a 2-D array is a batch too; one int seed serves every prompt
    same = model.generate(np.array([[3, 4], [3, 4]]), 8, temperature=1.0, seed=5)
    assert np.array_equal(same[0], same[1])


def test_stop_tokens_end_a_sequence_without_the_token(model):
    free = model.generate(PROMPTS, 10, temperature=0.0)
    stop = int(free[0][3])
    out = model.generate(PROMPTS, 10, temperature=0.0, stop_tokens=[stop])
    for f, o in zip(free, out):
        cut = list(f).index(stop) if stop in f else len(f)
        assert list(o) == list(f[:cut])


def test_on_step_streams_tokens_and_stops_sequences(model):
    seen = {i: [] for i in range(len(PROMPTS))}

    def on_step(seqs, tokens):
        for s, t in zip(seqs, tokens):
            seen[s].append(t)
        return [1] if len(seen[1]) == 3 else None

    out = model.generate(PROMPTS, 9, temperature=0.7, seed=3, on_step=on_step)
    assert [list(o) for o in out] == [seen[i] for i in range(len(PROMPTS))]
    assert len(out[1]) == 3 and all(len(out[i]) == 9 for i in (0, 2, 3))
    with pytest.raises(ValueError, match="on_step returned sequence 7"):
        model.generate([1], 3, on_step=lambda s, t: [7])
    with pytest.raises(ZeroDivisionError):  # the callback's own error reaches the caller
        model.generate([1], 3, on_step=lambda s, t: 1 / 0)


def penalised(logits, context, output, rep, freq, pres):
    """The penalties restated: transformers' repetition penalty, then OpenAI's frequency/presence penalties."""
    z = logits.astype(np.float64).copy()
    for t in set(context) | set(output):
        z[t] = z[t] * rep if z[t] < 0 else z[t] / rep
    for t in set(output):
        z[t] -= output.count(t) * freq + pres
    return z


@pytest.mark.parametrize("rep, freq, pres", [(1.8, 0.0, 0.0), (1.0, 0.7, 0.0), (1.0, 0.0, 2.0), (0.5, 0.3, 0.4)])
def test_penalties_follow_their_definitions(model, rep, freq, pres):
    prompt = [5, 9, 1, 33]
    toks, logits = model.generate(prompt, 15, temperature=0.0, repetition_penalty=rep, frequency_penalty=freq,
                                  presence_penalty=pres, return_logits=True)
    for i, t in enumerate(toks):
        z = penalised(logits[i], prompt, [int(x) for x in toks[:i]], rep, freq, pres)
        assert t == int(np.argmax(z))
    plain = model.generate(prompt, 15, temperature=0.0)
    if rep > 1 or pres > 1:  # a strong penalty repeats less than greedy decoding
        assert len(set(toks.tolist())) >= len(set(plain.tolist()))


def test_generate_bad_batch_and_penalty_arguments(model):
    for kw, words in [(dict(repetition_penalty=0), "repetition_penalty"), (dict(frequency_penalty=float("nan")),
                      "frequency_penalty"), (dict(presence_penalty="x"), "presence_penalty"),
                      (dict(stop_tokens=[CFG.vocab_size]), "stop_tokens"), (dict(stop_tokens=["a"]), "stop_tokens"),
                      (dict(stop_tokens=[1.5]), "stop_tokens"), (dict(seed=[1, 2]), "seed"),
                      (dict(on_step=3), "on_step")]:
        with pytest.raises((TypeError, ValueError), match=words):
            model.generate([1, 2], 3, **kw)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        model.generate([[1], []], 3)
    with pytest.raises(ValueError, match="prompt 0 length"):
        model.generate([list(range(CFG.max_seq_len + 1)), [1]], 3)
