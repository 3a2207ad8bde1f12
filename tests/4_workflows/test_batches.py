"""Tests for cllm.data's batch loading: BatchLoader (shapes, shift, coverage, determinism, resume state, rank
sharding, validation) and eval_batches."""

import json

import numpy as np
import pytest

from cllm.data import (
    BatchLoader,
    eval_batches,
    load_tokens,
    write_tokens,
)

# ----------------------------------------------------------------------------
# BatchLoader / eval_batches
# ----------------------------------------------------------------------------


@pytest.fixture
def token_file(tmp_path):
    # tokens 0..N-1 (mod vocab) make every window easy to recognise
    tokens = np.arange(5000) % 60000
    write_tokens(tmp_path / "train.bin", tokens, 60000)
    return load_tokens(tmp_path / "train.bin")


def test_batches_shape_shift_and_range(token_file):
    B, T = 4, 16
    loader = BatchLoader(token_file.tokens, B, T, seed=0)
    assert loader.tokens is token_file.tokens  # the memmap is used, not copied
    for _ in range(20):
        x, y = loader.next_batch()
        assert x.shape == y.shape == (B, T)
        assert x.dtype == y.dtype == np.int32
        assert x.flags.c_contiguous and y.flags.c_contiguous
        assert type(x) is np.ndarray
        np.testing.assert_array_equal(y, x + 1)  # y is x shifted by one token
        np.testing.assert_array_equal(x, x[:, :1] + np.arange(T))  # contiguous windows
        assert x[:, 0].min() >= 0 and y[:, -1].max() <= 4999


def test_batches_cover_both_ends():
    tokens = np.arange(10, dtype=np.uint16)
    loader = BatchLoader(tokens, 8, 8, seed=0)  # offsets can only be 0 or 1
    starts = set()
    for _ in range(10):
        x, y = loader.next_batch()
        starts.update(x[:, 0].tolist())
        assert y[:, -1].max() <= 9
    assert starts == {0, 1}
    x, y = BatchLoader(tokens[:9], 2, 8).next_batch()  # exactly seq_len + 1 tokens
    assert x.tolist() == [list(range(8))] * 2 and y.tolist() == [list(range(1, 9))] * 2


def test_batches_deterministic(token_file):
    a = BatchLoader(token_file, 3, 8, seed=42)  # a TokenFile is accepted too
    b = BatchLoader(token_file.tokens, 3, 8, seed=42)
    c = BatchLoader(token_file.tokens, 3, 8, seed=43)
    batches_a = [a.next_batch() for _ in range(5)]
    batches_b = [b.next_batch() for _ in range(5)]
    batches_c = [c.next_batch() for _ in range(5)]
    for (xa, ya), (xb, yb) in zip(batches_a, batches_b):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    assert any(not np.array_equal(xa, xc) for (xa, _), (xc, _) in zip(batches_a, batches_c))


def test_state_dict_resume(token_file):
    loader = BatchLoader(token_file.tokens, 4, 8, seed=7)
    for _ in range(3):
        loader.next_batch()
    state = json.loads(json.dumps(loader.state_dict()))  # survives JSON
    assert state["step"] == 3
    expected = [loader.next_batch() for _ in range(3)]

    resumed = BatchLoader(token_file.tokens, 4, 8, seed=999)
    resumed.load_state_dict(state)
    got = [resumed.next_batch() for _ in range(3)]
    for (xe, ye), (xg, yg) in zip(expected, got):
        np.testing.assert_array_equal(xe, xg)
        np.testing.assert_array_equal(ye, yg)
    assert resumed.step == 6 and resumed.seed == 7


def test_state_dict_mismatch(token_file):
    state = BatchLoader(token_file.tokens, 4, 8).state_dict()
    with pytest.raises(ValueError, match="seq_len"):
        BatchLoader(token_file.tokens, 4, 9).load_state_dict(state)
    with pytest.raises(ValueError, match="global batch"):
        BatchLoader(token_file.tokens, 5, 8).load_state_dict(state)
    with pytest.raises(ValueError, match="num_tokens"):
        BatchLoader(token_file.tokens[:100], 4, 8).load_state_dict(state)
    with pytest.raises(ValueError, match="missing"):
        BatchLoader(token_file.tokens, 4, 8).load_state_dict({"step": 1})
    # same global batch split over two ranks is fine
    BatchLoader(token_file.tokens, 2, 8, rank=1, world_size=2).load_state_dict(state)


def test_rank_sharding(token_file):
    B, T = 3, 8
    single = BatchLoader(token_file.tokens, 2 * B, T, seed=11)
    ranks = [BatchLoader(token_file.tokens, B, T, seed=11, rank=r, world_size=2) for r in range(2)]
    for _ in range(5):
        x, y = single.next_batch()
        parts = [r.next_batch() for r in ranks]
        np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), x)
        np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), y)


def test_eval_batches(token_file):
    a = eval_batches(token_file.tokens, 4, 8, num_batches=3)
    b = eval_batches(token_file.tokens, 4, 8, num_batches=3)
    assert len(a) == 3
    for (xa, ya), (xb, yb) in zip(a, b):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
        np.testing.assert_array_equal(ya, xa + 1)
    whole = eval_batches(token_file.tokens, 4, 8, num_batches=2, seed=5)
    halves = [eval_batches(token_file.tokens, 2, 8, num_batches=2, seed=5, rank=r, world_size=2) for r in range(2)]
    for i in range(2):
        np.testing.assert_array_equal(np.concatenate([halves[0][i][0], halves[1][i][0]]), whole[i][0])
    with pytest.raises(ValueError, match="num_batches"):
        eval_batches(token_file.tokens, 4, 8, num_batches=0)


def test_eval_batches_are_drawn_as_they_are_read(token_file):
    """A million validation batches cost nothing until read (they were a list built up front, outside the
    memory check)."""
    import tracemalloc

    tracemalloc.start()
    many = eval_batches(token_file.tokens, 64, 64, num_batches=1_000_000)
    assert len(many) == 1_000_000 and tracemalloc.get_traced_memory()[1] < 1 << 20
    tracemalloc.stop()
    first = [b for _, b in zip(range(2), many)]
    again = [b for _, b in zip(range(2), many)]
    for (x, y), (x2, y2) in zip(first, again):
        assert np.array_equal(x, x2) and np.array_equal(y, y2)
    assert np.array_equal(many[1][0], first[1][0])


def test_loader_validation(token_file):
    small = np.arange(8)
    with pytest.raises(ValueError, match=r"too small for one batch: 8 tokens.*seq_len=8.*9"):
        BatchLoader(small, 1, 8)
    with pytest.raises(ValueError, match="too small"):
        eval_batches(small, 1, 16, num_batches=1)
    with pytest.raises(ValueError, match="batch_size"):
        BatchLoader(token_file.tokens, 0, 8)
    with pytest.raises(ValueError, match="seq_len"):
        BatchLoader(token_file.tokens, 2, -1)
    with pytest.raises(ValueError, match="rank"):
        BatchLoader(token_file.tokens, 2, 8, rank=2, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        BatchLoader(token_file.tokens, 2, 8, rank=-1)
    with pytest.raises(ValueError, match="world_size"):
        BatchLoader(token_file.tokens, 2, 8, world_size=0)
    with pytest.raises(ValueError, match="1-D"):
        BatchLoader(np.zeros((10, 10), dtype=np.int32), 2, 4)


def test_check_eval_batches_bounds_them_by_the_split(token_file):
    """As many batches as draw each window once on average (5000 - 16 windows, 4 x 2 rows: 623), or 16 on any
    split; more is an error naming the setting, the file and the limit."""
    from cllm.data.batches import check_eval_batches

    check_eval_batches(token_file, 623, 4, 16, world_size=2)
    with pytest.raises(ValueError, match=r"eval_batches 624 is more than .*train.bin can use.*use at most 623"):
        check_eval_batches(token_file, 624, 4, 16, world_size=2)
    check_eval_batches(token_file, 16, 4096, 16)  # the default holds on a split of a few windows
    with pytest.raises(ValueError, match=r"eval_batches 1,000,000,000 .*use at most 16"):
        check_eval_batches(token_file, 10**9, 4096, 16)
