"""The module paths of the flat layout (cllm.trainer, cllm.tokenizer, cllm.distributed, ...) before the package was
grouped by job: `import cllm.trainer`, `from cllm.distributed import auto_communicator` and `cllm.tokenizer.X`
keep working, each warning once with its new place. A module whose names were split among several now points
to the subpackage that exports them all (tokenizer -> cllm.data, distributed -> cllm.parallel)."""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {
    "checks": "core.checks", "config": "core.config", "model": "core.model", "isa": "core.isa",
    "system": "core.system", "files": "core.files", "safetensors_io": "core.safetensors_io",
    "tokenizer": "data", "tokenfile": "data.tokenfile", "corpus": "data.corpus", "batches": "data.batches",
    "optim": "train.optim", "schedule": "train.schedule", "checkpoint": "train.checkpoint",
    "run_files": "train.run_files", "train_config": "train.config", "trainer": "train.trainer",
    "distributed": "parallel",
    "hf": "interop.hf", "hf_tokenizer": "interop.hf_tokenizer", "gguf_export": "interop.gguf_export",
    "pretrained": "interop.pretrained",
    "generation": "infer.generation", "evaluation": "infer.evaluation",
}


def moved_module(old: str):
    """The module that cllm.<old> now is, after a DeprecationWarning naming it."""
    new = f"cllm.{MOVED[old]}"
    warnings.warn(f"cllm.{old} is now {new}", DeprecationWarning, stacklevel=3)
    return importlib.import_module(new)


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds cllm.<old> and loads it as the module it moved to (the same module object, not a copy)."""

    def find_spec(self, fullname, path=None, target=None):
        package, _, old = fullname.partition(".")
        if package == "cllm" and old in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        return moved_module(spec.name.partition(".")[2])

    def exec_module(self, module):
        pass


def install() -> None:
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        sys.meta_path.append(_Alias())  # last: the real modules are always found first
