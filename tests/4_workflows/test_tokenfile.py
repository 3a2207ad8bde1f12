"""Tests for cllm.data's token files: write_tokens / write_token_chunks and load_tokens (header layout, checksum,
validation, damaged, truncated and foreign files, a full disk)."""

import struct
import zlib

import numpy as np
import pytest

from cllm.data import (
    HEADER_SIZE,
    MAGIC,
    NUM_TOKENS_OFFSET,
    TokenFile,
    load_tokens,
    write_token_chunks,
    write_tokens,
)
from cllm.errors import CLLMError

# ----------------------------------------------------------------------------
# Token files
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("vocab_size, itemsize", [(256, 2), (65536, 2), (65537, 4), (100_000, 4)])
def test_write_load_round_trip(tmp_path, vocab_size, itemsize):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab_size, size=5000)
    tokens[0] = vocab_size - 1
    path = tmp_path / "t.bin"
    assert write_tokens(path, tokens, vocab_size) == path
    assert path.stat().st_size == HEADER_SIZE + 5000 * itemsize
    tf = load_tokens(path)
    assert isinstance(tf, TokenFile)
    assert isinstance(tf.tokens, np.memmap)
    assert not tf.tokens.flags.writeable
    assert tf.tokens.dtype.itemsize == itemsize
    assert tf.vocab_size == vocab_size and tf.bytes_per_token == itemsize
    assert len(tf) == 5000
    np.testing.assert_array_equal(tf.tokens, tokens)
    assert [p.name for p in tmp_path.iterdir()] == ["t.bin"]  # temp file was renamed


def test_header_layout(tmp_path):
    path = tmp_path / "t.bin"
    write_tokens(path, [1, 2, 3], 300)
    raw = path.read_bytes()
    assert raw[:8] == MAGIC == b"CLLMTOK\0"
    assert struct.unpack_from("<III", raw, 8) == (1, 2, 300)
    assert struct.unpack_from("<Q", raw, NUM_TOKENS_OFFSET) == (3,)
    assert struct.unpack_from("<I", raw, 20) == (1,)  # flags: the checksum is set
    assert struct.unpack_from("<I", raw, 32) == (zlib.crc32(np.array([1, 2, 3], "<u2").tobytes()),)
    assert raw[36:64] == bytes(28)
    assert np.frombuffer(raw[64:], dtype="<u2").tolist() == [1, 2, 3]


def test_write_empty_and_overwrite(tmp_path):
    path = tmp_path / "t.bin"
    write_tokens(path, [], 10)
    assert len(load_tokens(path)) == 0
    write_tokens(path, np.array([9, 0], dtype=np.uint8), 10)
    assert load_tokens(path).tokens.tolist() == [9, 0]


def test_write_validation(tmp_path):
    path = tmp_path / "t.bin"
    with pytest.raises(ValueError, match="out of range"):
        write_tokens(path, [0, 10], 10)
    with pytest.raises(ValueError, match="out of range"):
        write_tokens(path, [-1], 10)
    with pytest.raises(ValueError, match="1-D"):
        write_tokens(path, [[1, 2]], 10)
    with pytest.raises(TypeError):
        write_tokens(path, [0.5], 10)
    with pytest.raises(ValueError, match="vocab_size"):
        write_tokens(path, [0], 0)
    with pytest.raises(FileNotFoundError, match="nodir"):
        write_tokens(tmp_path / "nodir" / "t.bin", [0], 10)
    assert not path.exists() and list(tmp_path.iterdir()) == []


def _valid_file(tmp_path, tokens=(1, 2, 3, 4), vocab_size=300):
    path = tmp_path / "t.bin"
    write_tokens(path, list(tokens), vocab_size)
    return path


def _patch(path, offset, fmt, value):
    raw = bytearray(path.read_bytes())
    struct.pack_into(fmt, raw, offset, value)
    path.write_bytes(bytes(raw))


def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        load_tokens(tmp_path / "nope.bin")
    with pytest.raises(CLLMError, match="nope.bin"):  # also a CLLMError
        load_tokens(tmp_path / "nope.bin")


def test_load_foreign_file(tmp_path):
    path = tmp_path / "foreign.bin"
    path.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(ValueError, match=r"foreign\.bin.*not a CLLM token file"):
        load_tokens(path)
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="not a CLLM token file"):
        load_tokens(path)


def test_load_truncated_header(tmp_path):
    path = _valid_file(tmp_path)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ValueError, match="t.bin.*truncated"):
        load_tokens(path)


def test_load_bad_version(tmp_path):
    path = _valid_file(tmp_path)
    _patch(path, 8, "<I", 7)
    with pytest.raises(ValueError, match="t.bin.*version 7"):
        load_tokens(path)


@pytest.mark.parametrize("bpt", [0, 1, 3, 8])
def test_load_bad_bytes_per_token(tmp_path, bpt):
    path = _valid_file(tmp_path)
    _patch(path, 12, "<I", bpt)
    with pytest.raises(ValueError, match=f"t.bin.*bytes_per_token {bpt}"):
        load_tokens(path)


def test_load_vocab_too_big_for_uint16(tmp_path):
    path = _valid_file(tmp_path)
    _patch(path, 16, "<I", 70000)
    with pytest.raises(ValueError, match="does not fit"):
        load_tokens(path)


def test_load_truncated_and_trailing(tmp_path):
    path = _valid_file(tmp_path)
    good = path.read_bytes()
    path.write_bytes(good[:-1])
    with pytest.raises(ValueError, match=r"t\.bin.*size mismatch.*truncated.*4 tokens"):
        load_tokens(path)
    path.write_bytes(good + b"\0\0")
    with pytest.raises(ValueError, match="size mismatch.*trailing"):
        load_tokens(path)
    path.write_bytes(good)
    _patch(path, NUM_TOKENS_OFFSET, "<Q", 1000)
    with pytest.raises(ValueError, match="size mismatch"):
        load_tokens(path)


def test_load_token_out_of_vocab(tmp_path):
    path = _valid_file(tmp_path, tokens=(1, 2, 250, 4), vocab_size=300)
    _patch(path, 16, "<I", 100)  # now token 250 >= vocab_size 100
    with pytest.raises(ValueError, match=r"t\.bin.*token 250 at index 2 is >= vocab_size 100"):
        load_tokens(path)
    assert len(load_tokens(path, check_range=False)) == 4


def test_damaged_token_file_is_detected(tmp_path):
    path = _valid_file(tmp_path, tokens=(1, 2, 250, 4), vocab_size=300)
    raw = bytearray(path.read_bytes())
    raw[HEADER_SIZE + 2] ^= 0x04  # token 2 becomes 6: in range, but not what was written
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"t\.bin: token file is damaged \(checksum mismatch\)"):
        load_tokens(path)


def test_token_file_without_checksum_loads_with_a_warning(tmp_path):
    path = _valid_file(tmp_path, tokens=(1, 2, 3), vocab_size=300)
    _patch(path, 20, "<I", 0)  # the flags of an older file
    with pytest.warns(RuntimeWarning, match=r"t\.bin: token file has no checksum"):
        assert load_tokens(path).tokens.tolist() == [1, 2, 3]
    _patch(path, 20, "<I", 6)
    with pytest.raises(ValueError, match="invalid flags 6"):
        load_tokens(path)


def test_token_chunks_are_written_as_they_come(tmp_path):
    """write_token_chunks takes a generator: each chunk is checked and written, never the whole stream."""
    seen = []

    def chunks():
        for i in range(5):
            seen.append(i)
            yield np.full(1000, i, dtype=np.int64)

    path = write_token_chunks(tmp_path / "s.bin", chunks(), 70000)
    tf = load_tokens(path)
    assert seen == list(range(5)) and tf.bytes_per_token == 4
    assert np.array_equal(tf.tokens, np.repeat(np.arange(5), 1000))

    def bad():
        yield np.zeros(3, np.int32)
        yield np.array([70000])

    with pytest.raises(ValueError, match=r"b\.bin: token value 70000 is out of range"):
        write_token_chunks(tmp_path / "b.bin", bad(), 70000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.bin"]  # no partial file, no temporary left


def test_full_disk_on_a_token_file_names_it(tmp_path):
    import errno
    import os

    def full_disk():  # the write of the second chunk fails as on a full disk
        yield np.arange(10)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OSError) as e:
        write_token_chunks(tmp_path / "train.bin", full_disk(), 300)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "train.bin")
    assert "cannot write the token file" in str(e.value) and list(tmp_path.iterdir()) == []
