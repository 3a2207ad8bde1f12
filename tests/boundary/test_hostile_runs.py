"""A hostile pass over `cllm train`'s run directory and inputs (issue 33): absurd eval_batches, a loader state out
of range in a checkpoint, foreign lines in metrics.jsonl, another corpus prepared into the run's data/. Each case:
one line and status 2 where it is an error, never a hang, a traceback or a run on the wrong data."""
import json
import os
import struct
import time
from pathlib import Path

import pytest

from cllm import cli
from cllm.data import prepare
from cllm.train import checkpoint as ck

TINY = ["--max-seq-len", "16", "--embedding-dim", "32", "--num-layers", "1", "--num-heads", "4", "--ff-dim", "64",
        "--batch-size", "4", "--eval-interval", "4", "--eval-batches", "2", "--no-progress", "--sample-tokens", "0",
        "--threads", "1", "--val-fraction", "0.3"]


def corpus(root: Path, name: str, text: str) -> Path:
    d = root / name
    d.mkdir()
    for i in range(3):
        (d / f"{i}.txt").write_text(f"{text} {i}\n" * 300)
    return d


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile-runs")
    prepare([corpus(root, "c", "def f(x): return x")], root / "data", "byte", val_fraction=0.3)
    return root / "data"


def train(capsys, *argv):
    capsys.readouterr()
    code = cli.main(["train", *TINY, *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line_error(code, err, *words):
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, (code, err)
    for w in words:
        assert w in lines[0], (w, err)


def test_absurd_eval_batches_is_refused_before_any_work(data_dir, tmp_path, capsys):
    """A billion validation batches never let the setup finish (memory grew 2.8 MB/s): refused at once, naming
    the setting, the validation split and the most it can use."""
    started = time.perf_counter()
    code, out, err = train(capsys, "--data", data_dir, "--out-dir", tmp_path / "r", "--eval-batches", 1_000_000_000)
    one_line_error(code, err, "eval_batches 1,000,000,000", str(data_dir / "val.bin"), "use at most")
    assert time.perf_counter() - started < 10 and "model:" not in out
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


def _with_loader_rng(path: Path, **state) -> None:
    """Rewrite a checkpoint with its loader's PCG64 state changed (checksums made to match: an edit)."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    meta = header["__metadata__"]
    ts = json.loads(meta["trainer_state"])
    ts["loader"]["rng"]["state"].update(state)
    meta["trainer_state"] = json.dumps(ts)
    meta["metadata_crc32"] = str(ck._metadata_crc32(meta))
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


@pytest.mark.parametrize("state", [{"state": -1}, {"inc": 2**200}, {"state": "x"}])
def test_loader_rng_state_out_of_range_is_one_line(data_dir, tmp_path, capsys, state):
    out = tmp_path / "r"
    assert train(capsys, "--data", data_dir, "--out-dir", out, "--max-steps", 2)[0] == 0
    _with_loader_rng(out / "last.safetensors", **state)
    code, _, err = train(capsys, "--data", data_dir, "--out-dir", out, "--max-steps", 3, "--resume")
    one_line_error(code, err, f"{out / 'last.safetensors'}: cannot resume", "trainer_state field 'loader'",
                   "generator state")


def test_foreign_metrics_lines_do_not_fail_a_finished_run(data_dir, tmp_path, capsys):
    """metrics.jsonl is a report: lines the loss plot cannot plot are skipped with a warning."""
    out = tmp_path / "r"
    assert train(capsys, "--data", data_dir, "--out-dir", out, "--max-steps", 2, "--decay-steps", 4)[0] == 0
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 1, "train_loss": {"a": 1}}\n{"step": 2, "val_loss": "low"}\n{"step": 1, "val_loss": true}\n')
    with pytest.warns(RuntimeWarning, match="the loss plot skips 3 lines"):
        code, out_text, err = train(capsys, "--data", data_dir, "--out-dir", out, "--max-steps", 4, "--resume",
                                    "--decay-steps", 4)
    assert code == 0 and "Traceback" not in err, err
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_another_corpus_prepared_into_the_run_is_not_trained_on(tmp_path, capsys):
    """`cllm prepare OTHER --out RUN/data` after a run left RUN/data's stamp, which still matched the run's own
    inputs: the next run said "using prepared data" and trained on OTHER. It prepares its own inputs again."""
    mine, other = corpus(tmp_path, "mine", "x = 1"), corpus(tmp_path, "other", "y = 2")
    run = tmp_path / "run"
    assert train(capsys, "--data", mine, "--out-dir", run, "--max-steps", 1)[0] == 0
    mine_tokens = (run / "data" / "train.bin").read_bytes()
    capsys.readouterr()
    assert cli.main(["prepare", str(other), "--out", str(run / "data"), "--val-fraction", "0.3"]) == 0
    assert (run / "data" / "train.bin").read_bytes() != mine_tokens
    code, out, err = train(capsys, "--data", mine, "--out-dir", run, "--max-steps", 1, "--overwrite")
    assert code == 0, err
    assert "using prepared data" not in out and "another preparation replaced them" in out
    assert (run / "data" / "train.bin").read_bytes() == mine_tokens


def test_a_nonfinite_stop_says_which_checkpoints_hold_finite_weights(data_dir, tmp_path, capsys):
    """on_nonfinite=stop after an update that made the weights NaN (a weight decay of 1e300): no checkpoint can be
    written, and the error says so (it claimed "the checkpoints hold the last finite weights" with none there)."""
    out = tmp_path / "nan"
    with pytest.warns(RuntimeWarning):
        code, _, err = train(capsys, "--data", data_dir, "--out-dir", out, "--max-steps", "3", "--weight-decay",
                             "1e300", "--on-nonfinite", "stop")
    assert code == 1 and err.count("\n") == 1, err
    assert "no checkpoint was written" in err and not list(out.glob("*.safetensors")), err


@pytest.mark.parametrize("free_kib", [0, 96], ids=["full", "almost-full"])
def test_prepare_onto_a_full_disk_names_what_it_could_not_write(tiny_tmpfs, tmp_path, capsys, free_kib):
    """A disk with no room for the lock file or for the token stream: one line naming the file or the directory
    (it was "[Errno 28] No space left on device", naming nothing)."""
    src = corpus(tmp_path, "c", "def f(x): return x * 2  # a line of text to fill the token files")
    fd = os.open(tiny_tmpfs / "fill", os.O_WRONLY | os.O_CREAT)  # fill the disk, then free free_kib of it
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        os.ftruncate(fd, max(0, os.fstat(fd).st_size - free_kib * 1024))
    os.close(fd)
    capsys.readouterr()
    code = cli.main(["prepare", str(src), "--out", str(tiny_tmpfs / "p")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "No space left on device" in err, err
    assert f"{tiny_tmpfs / 'p'}" in err, err
