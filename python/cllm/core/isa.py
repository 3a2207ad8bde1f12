"""Which kernels run: the C++ kernels are built once per x86-64 level (baseline, avx2, avx512, avx512bf16) and the
best one this CPU runs is loaded on first use. CLLM_ISA=baseline|avx2|avx512|avx512bf16 forces a lower one; asking
for one the CPU lacks is an error naming what it lacks, raised by `check_kernels()` and by every kernel call.
"""
from __future__ import annotations

import platform

from .. import _core
from ..errors import CLLMError

__all__ = ["build_info", "check_kernels", "use_variant", "format_build_info"]


def build_info() -> dict:
    """The variants built, the one in use and why, the CPU's features, bf16 (native or emulated), OpenMP, threads.
    `variant` is None when no variant could be loaded; `reason` then says why."""
    from .. import __version__
    info = {"cllm": __version__, "python": platform.python_version(), "machine": platform.machine()}
    info.update(_core.build_info())
    return info


def check_kernels() -> None:
    """Raises CLLMError (one line: what CLLM_ISA asked for and what the CPU lacks) when no kernels are loaded."""
    info = _core.build_info()
    if info["variant"] is None:
        raise CLLMError(info["reason"])


def use_variant(name: str) -> None:
    """Switch to another kernel variant ("auto": the best this CPU runs); ValueError when the CPU lacks it. For tests
    and comparisons: a model's buffers do not depend on the variant, so switching between calls is safe."""
    _core.select_isa(name)


def format_build_info(info: dict) -> str:
    """`cllm info`'s text: one `name: value` line per field."""
    lines = []
    for key, value in info.items():
        if isinstance(value, list):
            value = ", ".join(value) or "none"
        lines.append(f"{key}: {value}")
    return "\n".join(lines)
