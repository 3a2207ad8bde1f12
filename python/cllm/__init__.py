"""CLLM: a small, fast CPU training engine for decoder-only transformers.

The package by job: core/ (the model, its config, the kernels), data/ (tokenizers, token files, corpora,
batches), train/ (the trainer, optimizers, checkpoints), parallel/ (MPI), interop/ (Hugging Face, GGUF),
infer/ (generation, evaluation); cli.py is the command line. The public names are all here."""
from ._omp_env import bound_omp_num_threads

bound_omp_num_threads()  # before the imports below load the core and libgomp, which reads OMP_NUM_THREADS once
from . import _moved
from .core import kernels  # the core's kernels behind argument checks (see core/kernels.py)
from .core.config import ModelConfig
from .core.isa import build_info
from .core.model import Model
from .core.system import bound_threads_from_environment, get_num_threads, set_num_threads
from .data import BPETokenizer, ByteTokenizer, Tokenizer, load_tokenizer
from .errors import CLLMError, InsufficientMemoryError, MissingFileError, MPISetupError, ReplicaDivergenceError
from .infer.evaluation import score
from .infer.generation import generate_text, sample_text
from .interop.gguf_export import export_gguf
from .interop.hf import export_hf, from_hf
from .parallel.mpi import SingleProcess
from .train.checkpoint import Checkpoint, export_weights, load_checkpoint, save_checkpoint
from .train.config import TrainConfig
from .train.optim import SGD, AdamW, clip_grad_norm, grad_norm
from .train.schedule import lr_at
from .train.trainer import Trainer

__version__ = "0.1.0"

__all__ = ["ModelConfig", "Model", "AdamW", "SGD", "clip_grad_norm", "grad_norm", "kernels", "set_num_threads",
           "get_num_threads", "lr_at", "Checkpoint", "save_checkpoint", "load_checkpoint", "export_weights",
           "TrainConfig", "Trainer", "SingleProcess", "sample_text",
           "generate_text", "score", "from_hf", "export_hf", "export_gguf", "build_info",
           "Tokenizer", "ByteTokenizer", "BPETokenizer", "load_tokenizer",
           "CLLMError", "MissingFileError", "InsufficientMemoryError", "MPISetupError", "ReplicaDivergenceError",
           "__version__"]

bound_threads_from_environment()
_moved.install()  # the flat layout's module paths (cllm.trainer, ...) still import, with a warning


def __getattr__(name: str):
    if name in _moved.MOVED:  # cllm.tokenizer.ByteTokenizer and the like, from before the subpackages
        return _moved.moved_module(name)
    raise AttributeError(f"module 'cllm' has no attribute {name!r}")
