"""CLLM: a small, fast CPU training engine for decoder-only transformers."""
from . import _core
from . import kernels  # the core's kernels behind argument checks (see kernels.py)
from .checkpoint import Checkpoint, export_weights, load_checkpoint, save_checkpoint
from .config import ModelConfig
from .distributed import SingleProcess
from .errors import CLLMError, InsufficientMemoryError, MissingFileError, MPISetupError, ReplicaDivergenceError
from .model import Model
from .optim import SGD, AdamW, clip_grad_norm, grad_norm
from .schedule import lr_at
from .train_config import TrainConfig

__version__ = "0.1.0"


def set_num_threads(n: int) -> None:
    """Threads used by the C++ kernels (OpenMP), 1 to cllm.model.MAX_THREADS."""
    from .model import check_num_threads

    _core.set_num_threads(check_num_threads(n))


def get_num_threads() -> int:
    return _core.get_num_threads()


def _bound_threads_from_environment() -> None:
    """OMP_NUM_THREADS far beyond the machine would crash the first parallel kernel: bound it, with a warning."""
    from .model import MAX_THREADS

    if _core.get_num_threads() > MAX_THREADS:
        import warnings

        warnings.warn(f"{_core.get_num_threads()} OpenMP threads requested (OMP_NUM_THREADS); using {MAX_THREADS}",
                      RuntimeWarning, stacklevel=3)
        _core.set_num_threads(MAX_THREADS)


_bound_threads_from_environment()

from .trainer import Trainer, sample_text  # noqa: E402  (it imports set_num_threads / get_num_threads from here)

__all__ = ["ModelConfig", "Model", "AdamW", "SGD", "clip_grad_norm", "grad_norm", "kernels", "set_num_threads",
           "get_num_threads", "lr_at", "Checkpoint", "save_checkpoint", "load_checkpoint", "export_weights",
           "TrainConfig", "Trainer", "SingleProcess", "sample_text", "CLLMError", "MissingFileError",
           "InsufficientMemoryError", "MPISetupError", "ReplicaDivergenceError", "__version__"]
