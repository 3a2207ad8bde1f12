"""CLLM: a small, fast CPU training engine for decoder-only transformers."""
from . import _core
from . import kernels  # the core's kernels behind argument checks (see kernels.py)
from .config import ModelConfig
from .model import Model
from .optim import SGD, AdamW, clip_grad_norm, grad_norm

__version__ = "0.1.0"

from .system import bound_threads_from_environment as _bound_threads_from_environment
from .system import get_num_threads, set_num_threads

_bound_threads_from_environment()

__all__ = ["ModelConfig", "Model", "AdamW", "SGD", "clip_grad_norm", "grad_norm", "kernels",
           "set_num_threads", "get_num_threads", "__version__"]

from .schedule import lr_at  # noqa: E402
from .checkpoint import Checkpoint, export_weights, load_checkpoint, save_checkpoint  # noqa: E402
from .trainer import SingleProcess, TrainConfig, Trainer, sample_text  # noqa: E402

__all__ += ["lr_at", "Checkpoint", "save_checkpoint", "load_checkpoint", "export_weights", "TrainConfig", "Trainer",
            "SingleProcess", "sample_text"]
