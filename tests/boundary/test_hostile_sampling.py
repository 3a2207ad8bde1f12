"""Sampling given hostile models, flags and callbacks (issue 33 items 4, 7, 8, 9, 10): a vocabulary padded beyond
the tokenizer's, shell escapes in --stop/--prompt, seeds beyond 64 bits, a callback that uses the model it is
called from, and weights loaded from another thread during a generate."""
import threading
import time

import numpy as np
import pytest

import cllm
from cllm import cli
from cllm.data.tokenizer import ByteTokenizer
from cllm.infer.generation import generate_text

CFG = cllm.ModelConfig(vocab_size=256, max_seq_len=32, embedding_dim=32, num_layers=1, num_heads=2, ff_dim=64)
PADDED = cllm.ModelConfig(vocab_size=320, max_seq_len=32, embedding_dim=32, num_layers=1, num_heads=2, ff_dim=64)
BYTES = ByteTokenizer()


@pytest.fixture(scope="module")
def model(helpers):
    return helpers.add_noise(cllm.Model(CFG, seed=2), seed=1, scale=0.2)


@pytest.fixture(scope="module")
def padded(tmp_path_factory):
    """A model of 320 ids (as Hugging Face pads vocabularies) with a 256-id tokenizer, its padding ids the likeliest."""
    m = cllm.Model(PADDED, seed=3)
    m.parameters()["wte"][256:] *= 100.0
    path = tmp_path_factory.mktemp("padded") / "m.safetensors"
    cllm.save_checkpoint(path, m, None, BYTES)
    return m, path


def run_cli(capsys, *argv):
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


# ---- item 4: a vocabulary padded beyond the tokenizer's -----------------------------------------------------------
@pytest.mark.parametrize("temperature, top_k", [(0.0, None), (1.0, None), (1.0, 10**6), (2.0, 5)])
def test_a_padded_model_never_draws_ids_the_tokenizer_lacks(padded, temperature, top_k):
    m, _ = padded
    free = m.generate([1, 2], 40, temperature=temperature, top_k=top_k)
    assert free.max() >= 256  # the padding ids are the likeliest: without a limit they are drawn
    limited = m.generate([1, 2], 40, temperature=temperature, top_k=top_k, vocab_limit=256)
    assert limited.size == 40 and limited.max() < 256
    text = generate_text(m, BYTES, ["ab", "c"], 40, temperature=temperature, top_k=top_k, stop_at_eos=False)
    assert len(text) == 2 and all(text)  # decoded: every id drawn is the tokenizer's


def test_vocab_limit_out_of_range_is_refused(padded):
    m, _ = padded
    for bad in (0, -1, 321, 10**30):
        with pytest.raises(ValueError, match="vocab_limit"):
            m.generate([1], 3, vocab_limit=bad)
    with pytest.raises(TypeError, match="vocab_limit"):
        m.generate([1], 3, vocab_limit="256")


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--temperature", "0"], ["--num-samples", "2", "--top-k", "1000"], ["--stream"]])
def test_cllm_sample_of_a_padded_model(padded, capsys, extra):
    _, path = padded
    code, out, err = run_cli(capsys, "sample", "--checkpoint", path, "--max-new-tokens", 30, "--prompt", "ab", *extra)
    assert code == 0 and out.startswith("ab"), err


# ---- item 7: escapes in --stop and --prompt --------------------------------------------------------------------
def _captured_options(monkeypatch, capsys, checkpoint, *argv):
    seen = {}

    def fake(model, tokenizer, prompts, **options):
        seen.update(options, prompts=prompts)
        return [""] * len(prompts)
    monkeypatch.setattr("cllm.infer.generation.generate_text", fake)
    code, _, err = run_cli(capsys, "sample", "--checkpoint", checkpoint, *argv)
    assert code == 0, err
    return seen


@pytest.mark.parametrize("typed, meant", [
    ("\\n\\n", "\n\n"), ("\\t", "\t"), ("a\\\\nb", "a\\nb"), ("\\r\\n", "\r\n"),
    ("\\x41\\u00e9\\U0001F600", "A\u00e9\U0001F600"), ("C:\\path", "C:\\path"), ("end\\", "end\\"), ("\\q", "\\q"),
])
def test_stop_and_prompt_read_backslash_escapes(padded, monkeypatch, capsys, typed, meant):
    _, path = padded
    seen = _captured_options(monkeypatch, capsys, path, "--stop", typed, "--prompt", typed + "x")
    assert seen["stop"] == [meant] and seen["prompts"] == [meant + "x"]
    literal = _captured_options(monkeypatch, capsys, path, "--stop", typed, "--prompt", typed, "--no-escapes")
    assert literal["stop"] == [typed] and literal["prompts"] == [typed]


@pytest.mark.parametrize("typed", ["\\ud800", "\\U00110000"])
def test_an_escape_that_is_no_character_is_one_line(padded, capsys, typed):
    code, _, err = run_cli(capsys, "sample", "--checkpoint", padded[1], "--stop", typed)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--stop" in err and typed in err


@pytest.mark.slow
def test_an_escaped_stop_string_ends_the_sample(model, tmp_path, capsys):
    """End to end: the stop string typed as escapes cuts the sample as the string itself does."""
    path = tmp_path / "m.safetensors"
    cllm.save_checkpoint(path, model, None, BYTES)
    free = generate_text(model, BYTES, ["ab"], 30, temperature=0.0, stop_at_eos=False)[0]
    stop = free[6:9]
    typed = "".join(f"\\u{ord(c):04x}" if ord(c) < 0x10000 else f"\\U{ord(c):08x}" for c in stop)
    code, out, err = run_cli(capsys, "sample", "--checkpoint", path, "--prompt", "ab", "--temperature", 0,
                             "--max-new-tokens", 30, "--stop", typed, "--ignore-eos")
    assert code == 0 and out == "ab" + free[:free.index(stop)] + "\n", (out, err)


# ---- item 8: seeds beyond 64 bits ----------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [["--seed", 2**64], ["--seed", -1], ["--seed", 2**64 - 1, "--num-samples", 2],
                                  ["--seed", 10**40]])
def test_cllm_sample_refuses_seeds_out_of_range(padded, capsys, argv):
    code, _, err = run_cli(capsys, "sample", "--checkpoint", padded[1], "--max-new-tokens", 2, *argv)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--seed" in err and str(2**64 - 1)[:10] in err


def test_generate_refuses_seeds_out_of_range(model):
    for bad in (2**64, -1, [0, 2**64]):
        n = len(bad) if isinstance(bad, list) else 1
        with pytest.raises(ValueError, match="seed"):
            model.generate([[1, 2]] * n if n > 1 else [1, 2], 3, seed=bad)
        with pytest.raises(ValueError, match="seed"):
            generate_text(model, BYTES, ["a"] * n, 3, seed=bad)
    assert model.generate([1, 2], 5, seed=2**64 - 1).size == 5  # the largest seed is in range


# ---- item 9: the model used from its own callback ------------------------------------------------------------
def _finishes(fn, timeout=30):
    """fn()'s exception (or None), failing the test if it does not return within timeout (a deadlock)."""
    result = {}

    def run():
        try:
            fn()
            result["error"] = None
        except BaseException as e:  # noqa: BLE001 (handed to the test)
            result["error"] = e
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert "error" in result, "deadlocked"
    return result["error"]


@pytest.mark.parametrize("use", ["forward", "generate", "loss", "load_parameters", "zero_grad"])
def test_the_model_used_from_its_own_on_step_is_an_error(use):
    m = cllm.Model(CFG, seed=1)
    calls = {"forward": lambda: m.forward(np.array([[1, 2]])), "generate": lambda: m.generate([1], 2),
             "loss": lambda: m.loss(np.array([[1, 2]]), np.array([[2, 3]])),
             "load_parameters": lambda: m.load_parameters(m.parameters()), "zero_grad": m.zero_grad}
    error = _finishes(lambda: m.generate([1, 2], 5, on_step=lambda seqs, toks: calls[use]()))
    assert isinstance(error, RuntimeError) and "on_step" in str(error) and "generat" in str(error), error
    error = _finishes(lambda: generate_text(m, BYTES, ["a"], 5, on_text=lambda i, piece: calls[use]()))
    assert isinstance(error, RuntimeError) and "on_text" in str(error), error
    assert m.generate([1, 2], 3).size == 3  # the model is free again


def test_the_model_used_from_on_grads_ready_is_an_error():
    m = cllm.Model(CFG, seed=1)
    x = np.array([[1, 2, 3]])
    error = _finishes(lambda: m.forward_backward(x, x, on_grads_ready=lambda lo, hi: m.forward(x)))
    assert isinstance(error, RuntimeError) and "forward_backward" in str(error), error


# ---- item 10: weights loaded from another thread during a generate -------------------------------------------
def _perturbed(seed):
    m = cllm.Model(CFG, seed=seed)
    rng = np.random.default_rng(seed)
    for v in m.parameters().values():
        v += rng.normal(0, 0.2, v.shape).astype(np.float32)
    return m


@pytest.mark.parametrize("change", ["load_parameters", "adamw", "sgd"])
def test_weights_changed_during_a_generate_wait_for_it(change):
    old, new, m = _perturbed(1), _perturbed(2), _perturbed(1)
    alone = old.generate([1, 2], 20, temperature=0.0)
    x = np.array([[1, 2, 3, 4]])
    m.forward_backward(x, x)  # gradients for the optimizers
    opt = {"adamw": lambda: cllm.AdamW(m, lr=1.0), "sgd": lambda: cllm.SGD(m, lr=1e4)}.get(change, lambda: None)()
    started, got = threading.Event(), {}

    def slow(seqs, tokens):
        started.set()
        time.sleep(0.01)
    t = threading.Thread(target=lambda: got.setdefault("out", m.generate([1, 2], 20, temperature=0.0, on_step=slow)))
    t.start()
    assert started.wait(30)
    if opt is None:
        m.load_parameters(new.parameters())
    else:
        opt.step()
    t.join(30)
    assert np.array_equal(got["out"], alone)  # the old model's tokens, throughout
    assert not np.array_equal(m.generate([1, 2], 20, temperature=0.0), alone)  # the change made after it
