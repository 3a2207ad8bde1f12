"""The model and what everything stands on: its config (the core's field list), the Model over the C++ core, the
kernels behind argument checks, the kernel variant in use, threads and memory, argument checks, atomic files and
safetensors I/O."""
from . import kernels
from .config import ModelConfig
from .isa import build_info
from .model import Model, activation_count, memory_estimate, parameter_count, parameter_layout, parameter_shapes
from .system import get_num_threads, set_num_threads

__all__ = ["ModelConfig", "Model", "kernels", "build_info", "get_num_threads", "set_num_threads", "parameter_layout",
           "parameter_shapes", "parameter_count", "activation_count", "memory_estimate"]
