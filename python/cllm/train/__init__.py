"""Training: the run's settings (TrainConfig), the Trainer's loop, optimizers, the lr schedule, checkpoints, resuming
and the run directory's files."""
from .checkpoint import Checkpoint, export_weights, load_checkpoint, read_metadata, save_checkpoint
from .config import TrainConfig, read_config_file
from .optim import EMA, SGD, AdamW, clip_grad_norm, grad_norm
from .schedule import lr_at
from .trainer import Trainer

__all__ = ["TrainConfig", "read_config_file", "Trainer", "AdamW", "SGD", "EMA", "clip_grad_norm", "grad_norm",
           "lr_at", "Checkpoint", "save_checkpoint", "load_checkpoint", "export_weights", "read_metadata"]
