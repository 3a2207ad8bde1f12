"""A hostile pass over `cllm export` (issue 33, items 3, 4 and 5): a symlink planted at the GGUF writer's
temporary name, float16 weights that would overflow, an unwritable directory and a full disk. Each failure is
one line naming the file, exit status 2, and no partial file left behind; nothing is written through a link."""
from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest

from cllm import cli
from cllm.core import safetensors_io
from cllm.interop.hf import export_hf, from_hf

gguf = pytest.importorskip("gguf", reason="the gguf package (pip install 'cllm[interop]')")
from cllm.interop import gguf_export  # noqa: E402  (needs gguf only when called, but its tests need gguf)
from cllm.interop.gguf_export import export_gguf  # noqa: E402

FIXTURE = Path(__file__).parent.parent / "fixtures" / "tiny-gpt2"


@pytest.fixture(scope="module")
def fixture_model():
    return from_hf(FIXTURE)


def run_cli(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    return code, capsys.readouterr().err


def assert_one_line(code, err, *words):
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in lines[0], lines[0]


# ---- item 3: a planted symlink -------------------------------------------------------------------------------
def test_gguf_export_never_writes_through_a_planted_link(tmp_path, fixture_model):
    """The old temporary name (".m.gguf.tmp<pid>") was predictable: a link planted there had its target
    overwritten with the GGUF file, and was then renamed into place as m.gguf."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    planted = tmp_path / f".m.gguf.tmp{os.getpid()}"
    planted.symlink_to(victim)
    export_gguf(*fixture_model, tmp_path / "m.gguf")
    assert victim.read_text() == "precious"
    assert not (tmp_path / "m.gguf").is_symlink() and (tmp_path / "m.gguf").read_bytes()[:4] == b"GGUF"
    assert planted.is_symlink() and os.readlink(planted) == str(victim)  # left alone: not ours
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([victim.name, planted.name, "m.gguf"])
    assert (tmp_path / "m.gguf").stat().st_mode & 0o777 == 0o644


# ---- item 4: float16 overflow --------------------------------------------------------------------------------
def test_f16_export_refuses_weights_beyond_float16(tmp_path, fixture_model):
    model, tok = fixture_model
    w = model.parameters()["h.1.mlp.c_fc.weight"]
    old = float(w[2, 3])
    w[2, 3] = -70000.0
    try:
        with pytest.raises(ValueError) as e:
            export_gguf(model, tok, tmp_path / "m.gguf", dtype="f16")
        msg = str(e.value)
        assert "\n" not in msg and "blk.1.ffn_up.weight" in msg and "70000" in msg and "65504" in msg, msg
        assert list(tmp_path.iterdir()) == []
        export_gguf(model, tok, tmp_path / "m.gguf", dtype="f32")  # float32 holds it
        w[2, 3] = 65504.0  # float16's largest: exported exactly
        export_gguf(model, tok, tmp_path / "m16.gguf", dtype="f16")
        t = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(str(tmp_path / "m16.gguf")).tensors}
        assert np.isfinite(t["blk.1.ffn_up.weight"]).all() and t["blk.1.ffn_up.weight"].max() == 65504
    finally:
        w[2, 3] = old


# ---- item 5: an unwritable directory, a full disk --------------------------------------------------------------
@pytest.fixture
def tiny_tmpfs(tmpfs):
    """A 64 KiB tmpfs: the fixture's exports (~150 KiB) do not fit."""
    d = tmpfs("tmpfs", "size=64k")
    if d is None:
        pytest.skip("cannot mount a tmpfs here")
    return d


@pytest.mark.parametrize("fmt", ["hf", "gguf"])
def test_export_into_a_read_only_directory(read_only_dir, capsys, fmt):
    out = read_only_dir if fmt == "hf" else read_only_dir / "m.gguf"  # hf: the empty directory given as --out
    code, err = run_cli(capsys, "export", FIXTURE, "--format", fmt, "--out", out)
    assert_one_line(code, err, str(out))
    assert any(w in err for w in ("Read-only file system", "Permission denied", "Operation not permitted")), err
    assert list(read_only_dir.iterdir()) == []


@pytest.mark.parametrize("fmt", ["hf", "gguf"])
def test_export_onto_a_full_disk_for_real(tiny_tmpfs, capsys, fmt):
    out = tiny_tmpfs / ("hf" if fmt == "hf" else "m.gguf")
    code, err = run_cli(capsys, "export", FIXTURE, "--format", fmt, "--out", out)
    assert_one_line(code, err, str(out), "No space left on device")
    assert list(tiny_tmpfs.iterdir()) == []  # no partial file, no temporary file, no half export directory


def test_hf_export_onto_a_full_disk_simulated(tmp_path, capsys, monkeypatch, fixture_model):
    """ENOSPC in the middle of model.safetensors: the error names it, the directory is as it was."""
    def full_disk(f, tensors, metadata):
        f.write(b"x" * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(safetensors_io, "write_float32", full_disk)
    out = tmp_path / "hf"
    code, err = run_cli(capsys, "export", FIXTURE, "--format", "hf", "--out", out)
    assert_one_line(code, err, str(out / "model.safetensors"), "No space left on device")
    assert not out.exists()
    out.mkdir()  # an existing directory (API: files already in it stay as they were)
    (out / "config.json").write_text("old")
    with pytest.raises(OSError) as e:
        export_hf(*fixture_model, out)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(out / "model.safetensors")
    assert [p.name for p in out.iterdir()] == ["config.json"] and (out / "config.json").read_text() == "old"


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
                                   OSError("1024 requested and 776 written")], ids=["ENOSPC", "short-write"])
def test_gguf_export_onto_a_full_disk_simulated(tmp_path, capsys, monkeypatch, error):
    """A full disk at a tensor's write: one line naming the GGUF file, no file left (a short write with no errno,
    as ndarray.tofile reports it, is named too and said to be a likely full disk)."""
    def full_disk(self, f, *args, **kwargs):
        f.write(b"x" * 1000)
        raise error

    monkeypatch.setattr(gguf_export._Written, "tofile", full_disk)
    out = tmp_path / "m.gguf"
    code, err = run_cli(capsys, "export", FIXTURE, "--format", "gguf", "--out", out)
    assert_one_line(code, err, str(out), "cannot write the GGUF file",
                    "No space left on device" if error.errno else "is the disk full?")
    assert list(tmp_path.iterdir()) == []
