"""Checkpoints: one safetensors file holding everything needed to sample from or resume a run.

File layout (safetensors, float32, little-endian):

    <name>                         model weights under their Hugging Face names ("wte", "h.0.ln_1.weight", ...)
    optimizer.<slot>.<name>        the optimizer's state (optional: absent when saved without an optimizer):
                                   AdamW exp_avg and exp_avg_sq (the moments), SGD momentum_buffer
    ema.<name>                     the exponential moving average of the weights (optional: runs with ema_decay)
    __metadata__ (str -> str):
      format          "cllm-checkpoint"
      format_version  "1"
      config          JSON of the ModelConfig
      tokenizer       the tokenizer's JSON (Tokenizer.to_json())
      model_state     JSON {"seed", "dropout_step"}: the model's init seed (it also seeds dropout) and RNG position
      optimizer       JSON {"type", "step", "lr", ...: the optimizer's hyperparameters} (when an optimizer was saved)
      ema             JSON {"decay"} (when the EMA weights were saved)
      trainer_state   JSON chosen by the trainer: step, schedule, data-loader state, early-stopping state, ...
      tensor_crc32    JSON {tensor name: CRC-32 of its bytes}
      metadata_crc32  CRC-32 of every other metadata entry (`_metadata_crc32`)

load_checkpoint checks both checksums and names what is damaged (the metadata, or a tensor); a file without them
(written before CLLM stored them, or by another tool) loads with a warning.

So `safetensors.torch.load_file(path)` filtered to names without an "optimizer." or "ema." prefix is a
Hugging-Face-named state dict. The tensors are streamed from the model's own buffers (no copy of the whole set).
Writes are atomic (temporary file in the same directory, fsync, os.replace, fsync of the directory): a crash
mid-write leaves the previous checkpoint untouched and never a partial file under the real name.
"""
from __future__ import annotations

import json
import math
import os
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Union

import numpy as np

from ..core.config import ModelConfig
from ..errors import InsufficientMemoryError, MissingFileError
from ..core.files import atomic_write
from ..core.model import Model, parameter_shapes
from ..core.safetensors_io import crc32, read_header, write_float32
from ..data.tokenizer import Tokenizer, tokenizer_from_json

FORMAT = "cllm-checkpoint"
FORMAT_VERSION = "1"
WEIGHTS_FORMAT = "cllm-weights"
EXP_AVG, EXP_AVG_SQ = "optimizer.exp_avg.", "optimizer.exp_avg_sq."  # AdamW's tensor names
OPTIMIZER_SLOTS = {"AdamW": ("exp_avg", "exp_avg_sq"), "SGD": ("momentum_buffer",)}  # type -> state tensors
EMA = "ema."

PathLike = Union[str, "os.PathLike[str]"]


@dataclass
class Checkpoint:
    """What load_checkpoint returns. `model` is a ready cllm.Model (weights, seed and dropout_step restored);
    `optimizer_state` is None or {"type", "step", "lr", ..., and per slot of OPTIMIZER_SLOTS {name: array}};
    `ema` is None or the EMA weights {name: array}, with `ema_decay`."""

    model: Model
    optimizer_state: Optional[Dict[str, Any]]
    tokenizer: Tokenizer
    trainer_state: Dict[str, Any]
    config: ModelConfig
    path: Path = None
    metadata: Dict[str, str] = field(default_factory=dict)
    ema: Optional[Dict[str, np.ndarray]] = None
    ema_decay: Optional[float] = None


# ----------------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------------
def _write_payload(f, tensors: Dict[str, np.ndarray], metadata: Dict[str, str]) -> None:
    """Write the safetensors file to the open temporary file (a separate function so tests can simulate a crash
    here)."""
    write_float32(f, tensors, metadata)


def _atomic_write(path: Path, tensors: Dict[str, np.ndarray], metadata: Dict[str, str]) -> None:
    """Write a checkpoint atomically, its checksums added to `metadata`."""
    metadata["tensor_crc32"] = json.dumps({name: crc32(a) for name, a in tensors.items()}, sort_keys=True)
    metadata["metadata_crc32"] = str(_metadata_crc32(metadata))
    atomic_write(path, lambda f: _write_payload(f, tensors, metadata), what="checkpoint",
                 missing_dir="checkpoint directory does not exist")


def _metadata_crc32(meta: dict) -> int:
    """CRC-32 of the metadata entries but metadata_crc32 itself, in a canonical form."""
    rest = {k: v for k, v in meta.items() if k != "metadata_crc32"}
    return zlib.crc32(json.dumps(rest, sort_keys=True).encode("utf-8"))


def _check_finite(arrays: Dict[str, np.ndarray], what: str, path) -> None:
    for name, a in arrays.items():
        if not np.isfinite(a).all():
            bad = int(a.size - np.count_nonzero(np.isfinite(a)))
            raise ValueError(f"{path}: refusing to save non-finite {what} ({bad} NaN/Inf values in {name})")


def _json(obj, what: str) -> str:
    try:
        return json.dumps(obj, allow_nan=False, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} is not JSON-serialisable: {e}") from None


def save_checkpoint(path: PathLike, model: Model, optimizer, tokenizer: Tokenizer,
                    trainer_state: Optional[dict] = None, ema=None) -> Path:
    """Write model weights, the optimizer's state (if `optimizer` is not None: AdamW or SGD), the EMA weights (if
    `ema`, a cllm.train.optim.EMA, is not None), tokenizer and trainer state to `path` atomically. Refuses (ValueError)
    to write non-finite weights or optimizer state. Returns the path."""
    path = Path(path)
    if not isinstance(model, Model):
        raise TypeError(f"model must be a cllm.Model, got {type(model).__name__}")
    if not isinstance(tokenizer, Tokenizer):
        raise TypeError(f"tokenizer must be a cllm Tokenizer, got {type(tokenizer).__name__}")
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"tokenizer vocab_size {tokenizer.vocab_size} exceeds the model's "
                         f"vocab_size {model.config.vocab_size}")
    params = model.parameters()
    _check_finite(params, "weights", path)
    tensors = {name: np.ascontiguousarray(v) for name, v in params.items()}
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": _json(model.config.to_dict(), "model config"),
        "tokenizer": tokenizer.to_json(),
        "model_state": _json({"seed": int(model.seed), "dropout_step": int(model.dropout_step)}, "model state"),
        "trainer_state": _json(trainer_state if trainer_state is not None else {}, "trainer_state"),
    }
    if optimizer is not None:
        state = optimizer.state()
        for slot in OPTIMIZER_SLOTS[type(optimizer).__name__]:
            _check_finite(state[slot], "optimizer state", path)
            for name, v in state[slot].items():
                tensors[f"optimizer.{slot}.{name}"] = np.ascontiguousarray(v)
        metadata["optimizer"] = _json({"type": type(optimizer).__name__, "step": int(state["step"]),
                                       **optimizer.hyperparameters()}, "optimizer state")
    if ema is not None:
        weights = ema.parameters()
        _check_finite(weights, "EMA weights", path)
        tensors.update({EMA + name: np.ascontiguousarray(v) for name, v in weights.items()})
        metadata["ema"] = _json({"decay": ema.decay}, "ema")
    _atomic_write(path, tensors, metadata)
    return path


def export_weights(path: PathLike, model: Model) -> Path:
    """Write only the weights under their Hugging Face names (plus the model config in the metadata), atomically."""
    path = Path(path)
    params = model.parameters()
    _check_finite(params, "weights", path)
    tensors = {name: np.ascontiguousarray(v) for name, v in params.items()}
    metadata = {"format": WEIGHTS_FORMAT, "format_version": FORMAT_VERSION,
                "config": _json(model.config.to_dict(), "model config")}
    _atomic_write(path, tensors, metadata)
    return path


# ----------------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------------
def _meta_json(path: Path, meta: dict, key: str):
    if key not in meta:
        raise ValueError(f"{path}: checkpoint metadata has no {key!r} entry")
    try:
        return json.loads(meta[key])
    except (json.JSONDecodeError, TypeError, RecursionError) as e:  # TypeError: not a string
        raise ValueError(f"{path}: checkpoint metadata {key!r} is not valid JSON: {e}") from None


def _state_int(path: Path, state: dict, key: str, what: str) -> int:
    """A non-negative integer below 2**64 from a decoded metadata entry (0 when absent)."""
    value = state.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**64:
        raise ValueError(f"{path}: checkpoint {what} {key!r} must be a non-negative int, got {value!r}")
    return value


def load_checkpoint(path: PathLike, *, allow_nonfinite: bool = False) -> Checkpoint:
    """Read a checkpoint written by save_checkpoint.

    Raises MissingFileError (a FileNotFoundError) if the file is missing, and ValueError naming the file if it
    is truncated, corrupt, not a CLLM checkpoint, of another format version, missing tensors or holding tensors
    of the wrong shape for its config, or (unless allow_nonfinite=True) holding NaN/Inf weights."""
    path = Path(path)
    if not path.exists():
        raise MissingFileError(2, "checkpoint not found", str(path))
    if not path.is_file():
        raise ValueError(f"{path}: checkpoint is not a regular file")
    header = read_header(path, "checkpoint")[0]
    meta = _checkpoint_metadata(path, header)
    sums = _tensor_checksums(path, meta)
    config, tokenizer = _config_and_tokenizer(path, meta)
    trainer_state = _meta_json(path, meta, "trainer_state") if "trainer_state" in meta else {}
    model_state = _meta_json(path, meta, "model_state") if "model_state" in meta else {}
    opt_meta = _meta_json(path, meta, "optimizer") if "optimizer" in meta else None
    ema_meta = _meta_json(path, meta, "ema") if "ema" in meta else None
    if not isinstance(trainer_state, dict) or not isinstance(model_state, dict):
        raise ValueError(f"{path}: checkpoint trainer_state / model_state must be JSON objects")
    if opt_meta is not None and not isinstance(opt_meta, dict):
        raise ValueError(f"{path}: checkpoint optimizer metadata must be a JSON object")
    slots = () if opt_meta is None else OPTIMIZER_SLOTS.get(opt_meta.get("type"))
    if slots is None:
        raise ValueError(f"{path}: checkpoint optimizer type {opt_meta.get('type')!r} is not one of "
                         f"{', '.join(OPTIMIZER_SLOTS)}")
    ema_decay = None
    if ema_meta is not None:
        ema_decay = ema_meta.get("decay") if isinstance(ema_meta, dict) else None
        if isinstance(ema_decay, bool) or not isinstance(ema_decay, float) or not 0 < ema_decay < 1:
            raise ValueError(f"{path}: checkpoint ema metadata must be {{\"decay\": a number in (0, 1)}}")
    seed = _state_int(path, model_state, "seed", "model_state")
    dropout_step = _state_int(path, model_state, "dropout_step", "model_state")
    opt_step = _state_int(path, opt_meta, "step", "optimizer") if opt_meta is not None else 0

    groups = _tensor_groups(path, header, config, slots, ema=ema_meta is not None)
    tensors = _read_tensors(path, [k for k in header if k != "__metadata__"], allow_nonfinite, sums)
    try:
        model = Model(config, seed=seed)
    except InsufficientMemoryError as e:
        raise InsufficientMemoryError(f"{path}: cannot build the model of this checkpoint: {e}") from None
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: cannot build the model of this checkpoint: {e}") from None
    model.load_parameters({n: tensors[k] for n, k in groups[""].items()})
    model.dropout_step = dropout_step
    optimizer_state = None
    if opt_meta is not None:
        optimizer_state = dict(opt_meta, step=opt_step)
        for slot in slots:
            optimizer_state[slot] = {n: tensors[k] for n, k in groups[f"optimizer.{slot}."].items()}
    ema = {n: tensors[k] for n, k in groups[EMA].items()} if ema_meta is not None else None
    return Checkpoint(model=model, optimizer_state=optimizer_state, tokenizer=tokenizer,
                      trainer_state=trainer_state, config=config, path=path, metadata=dict(meta), ema=ema,
                      ema_decay=ema_decay)


def _checkpoint_metadata(path: Path, header: dict) -> dict:
    """The header's metadata, checked to be a CLLM checkpoint's of this format version."""
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise ValueError(f"{path}: not a CLLM checkpoint (safetensors metadata format is {found!r}, "
                         f"expected {FORMAT!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported checkpoint format_version {meta.get('format_version')!r} "
                         f"(this CLLM reads version {FORMAT_VERSION})")
    return meta


def _tensor_checksums(path: Path, meta: dict) -> Optional[Dict[str, int]]:
    """{tensor name: CRC-32} from metadata whose own checksum matches; None, with a warning, for a checkpoint
    saved without checksums. ValueError naming the file when the metadata is damaged."""
    if "metadata_crc32" not in meta:
        warnings.warn(f"{path}: checkpoint has no checksums (saved by an older CLLM or another tool); "
                      f"damage to it cannot be detected", RuntimeWarning, stacklevel=3)
        return None
    if meta["metadata_crc32"] != str(_metadata_crc32(meta)):
        raise ValueError(f"{path}: checkpoint metadata is damaged (checksum mismatch): its config, tokenizer or "
                         f"training state cannot be trusted")
    sums = _meta_json(path, meta, "tensor_crc32")
    if not isinstance(sums, dict) or not all(isinstance(v, int) and not isinstance(v, bool) for v in sums.values()):
        raise ValueError(f"{path}: checkpoint metadata 'tensor_crc32' must map tensor names to integers")
    return sums


def _config_and_tokenizer(path: Path, meta: dict):
    """(ModelConfig, Tokenizer) of the metadata, the tokenizer's ids within the model's vocabulary."""
    try:
        config = ModelConfig.from_dict(_meta_json(path, meta, "config"))
    except (TypeError, ValueError) as e:
        if str(e).startswith(str(path)):
            raise
        raise ValueError(f"{path}: invalid model config in checkpoint: {e}") from None
    try:
        tokenizer = tokenizer_from_json(meta.get("tokenizer", ""))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: invalid tokenizer in checkpoint: {e}") from None
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"{path}: tokenizer vocab_size {tokenizer.vocab_size} exceeds the model's "
                         f"vocab_size {config.vocab_size}")
    return config, tokenizer


def _tensor_groups(path: Path, header: dict, config: ModelConfig, slots: tuple, ema: bool) -> Dict[str, Dict[str, str]]:
    """{prefix ("" for the weights, "optimizer.<slot>." for each optimizer slot, EMA when saved): {parameter name:
    tensor name}}, checked before anything is allocated: the header must hold every tensor of this config in each
    group, with its shape, as float32, and nothing else."""
    expected = parameter_shapes(config)
    prefixes = [f"optimizer.{slot}." for slot in slots] + ([EMA] if ema else [])
    groups = {p: {} for p in [""] + prefixes}
    for k in header:
        if k != "__metadata__":
            prefix = next((p for p in prefixes if k.startswith(p)), "")
            groups[prefix][k[len(prefix):]] = k
    for prefix, group in groups.items():
        what = f"tensor {prefix}" if prefix else "weight "
        missing = [n for n in expected if n not in group]
        extra = [n for n in group if n not in expected]
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise ValueError(f"{path}: checkpoint is missing {what}{', '.join(missing[:3])}{more}")
        if extra:
            raise ValueError(f"{path}: checkpoint has unexpected tensor {prefix}{extra[0]} for this config")
        for n, key in group.items():
            info = header[key]
            shape = info.get("shape")
            shape = tuple(shape) if isinstance(shape, list) else shape
            if shape != expected[n]:
                shown = list(shape) if isinstance(shape, tuple) else repr(shape)
                raise ValueError(f"{path}: tensor {key} has shape {shown}, the config needs {list(expected[n])}")
            if info.get("dtype") != "F32":
                raise ValueError(f"{path}: tensor {key} has dtype {info.get('dtype')}, expected F32")
    return groups


def _read_tensors(path: Path, names, allow_nonfinite: bool, sums: Optional[Dict[str, int]]) -> Dict[str, np.ndarray]:
    """The tensors `names`, each checked against its checksum in `sums` (unless None) and for NaN/Inf."""
    from safetensors import SafetensorError, safe_open

    if sums is not None and set(sums) != set(names):
        odd = sorted(set(sums) ^ set(names))[0]
        raise ValueError(f"{path}: checkpoint is damaged: tensor {odd} is not both in the file and in its checksums")
    tensors = {}
    try:
        with safe_open(str(path), framework="np") as f:
            for k in names:
                tensors[k] = f.get_tensor(k)
                if sums is not None and crc32(tensors[k]) != sums[k]:
                    raise ValueError(f"{path}: tensor {k} is damaged (checksum mismatch)")
    except SafetensorError as e:
        raise ValueError(f"{path}: corrupt safetensors checkpoint: {e}") from None
    if not allow_nonfinite:
        for k, a in tensors.items():
            if not np.isfinite(a).all():
                bad = int(a.size - np.count_nonzero(np.isfinite(a)))
                raise ValueError(f"{path}: checkpoint holds non-finite values ({bad} NaN/Inf in {k}); "
                                 f"pass allow_nonfinite=True to load it anyway")
    return tensors


def read_metadata(path: PathLike) -> Dict[str, Any]:
    """The metadata of a CLLM checkpoint, with the JSON entries decoded, without reading any tensor."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(2, "checkpoint not found", str(path))
    meta = read_header(path, "checkpoint")[0].get("__metadata__") or {}
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a CLLM checkpoint")
    _tensor_checksums(path, meta)
    out = dict(meta)
    for key in ("config", "model_state", "optimizer", "trainer_state"):
        if key in meta:
            out[key] = _meta_json(path, meta, key)
            if not isinstance(out[key], dict):
                raise ValueError(f"{path}: checkpoint metadata {key!r} must be a JSON object")
    return out


def restore_optimizer(optimizer, optimizer_state: dict) -> None:
    """Load a Checkpoint's optimizer_state (its tensors and step count) into an optimizer of the same type over the
    checkpoint's model."""
    if optimizer_state is None:
        raise ValueError("the checkpoint holds no optimizer state")
    kind = type(optimizer).__name__
    if optimizer_state.get("type") != kind:
        raise ValueError(f"the checkpoint holds {optimizer_state.get('type')} state, not {kind}'s")
    optimizer.load_state(optimizer_state["step"], *(optimizer_state[slot] for slot in OPTIMIZER_SLOTS[kind]))


class TrainerStateReader:
    """Typed fields of a checkpoint's trainer_state: a missing or wrongly typed one is a ValueError naming the
    file and the field (a hand-edited or damaged state must not become a traceback or a silent cast)."""

    _KINDS = {"count": "a non-negative int", "loss": "a finite number or null", "seconds": "a non-negative number"}

    def __init__(self, path: Path, state: dict):
        self.path, self.state = path, state

    def __call__(self, key: str, kind: str, none: bool = False, default=...):
        if key not in self.state:
            if default is ...:
                raise ValueError(f"{self.path}: cannot resume, trainer_state lacks {key!r}")
            return default
        v = self.state[key]
        number = isinstance(v, (int, float)) and not isinstance(v, bool)
        ok = {"count": isinstance(v, int) and number and v >= 0,
              "loss": v is None or (number and math.isfinite(v)),
              "seconds": number and math.isfinite(v) and v >= 0}[kind] or (none and v is None)
        if not ok:
            what = self._KINDS[kind] + (" or null" if none else "")
            raise ValueError(f"{self.path}: cannot resume, trainer_state field {key!r} must be {what}, got {v!r}")
        return v


__all__ = ["Checkpoint", "save_checkpoint", "load_checkpoint", "export_weights", "restore_optimizer",
           "read_metadata", "TrainerStateReader", "FORMAT", "FORMAT_VERSION"]
