"""CLLM: a small, fast CPU training engine for decoder-only transformers."""
from . import kernels  # the core's kernels behind argument checks (see kernels.py)
from .checkpoint import Checkpoint, export_weights, load_checkpoint, save_checkpoint
from .config import ModelConfig
from .distributed import SingleProcess
from .errors import CLLMError, InsufficientMemoryError, MissingFileError, MPISetupError, ReplicaDivergenceError
from .model import Model
from .optim import SGD, AdamW, clip_grad_norm, grad_norm
from .schedule import lr_at
from .system import bound_threads_from_environment, get_num_threads, set_num_threads
from .evaluation import score
from .generation import generate_text, sample_text
from .gguf_export import export_gguf
from .hf import export_hf, from_hf
from .isa import build_info
from .train_config import TrainConfig
from .trainer import Trainer

__version__ = "0.1.0"

bound_threads_from_environment()

__all__ = ["ModelConfig", "Model", "AdamW", "SGD", "clip_grad_norm", "grad_norm", "kernels", "set_num_threads",
           "get_num_threads", "lr_at", "Checkpoint", "save_checkpoint", "load_checkpoint", "export_weights",
           "TrainConfig", "Trainer", "SingleProcess", "sample_text",
           "generate_text", "score", "from_hf", "export_hf", "export_gguf", "build_info",
           "CLLMError", "MissingFileError", "InsufficientMemoryError", "MPISetupError", "ReplicaDivergenceError",
           "__version__"]
