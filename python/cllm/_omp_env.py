"""OMP_NUM_THREADS, checked before the core loads libgomp.

libgomp reads OMP_NUM_THREADS once, when it is loaded (with cllm._core), and keeps it as an unsigned long that
omp_get_max_threads() returns cut to an int: 4294967296 reads as 0 threads (the first parallel kernel segfaults),
2147483648 as a negative count (libgomp aborts), and a value far beyond the machine cannot start. So, before
anything imports the core, `bound_omp_num_threads()` rewrites the variable in this process's environment:

- a thread count is a positive integer or a comma-separated list of them (OpenMP's nesting levels, "4,2"),
  with spaces allowed around each; a count above MAX_THREADS is lowered to MAX_THREADS, with a warning;
- any other value (garbage, 0, a negative number, "4,,2") is removed, with a warning that names it: the kernels
  then use OpenMP's default (one thread per CPU); an empty value is taken as unset, silently.

This module imports nothing of the package (it must run before the core is loaded)."""
from __future__ import annotations

import os
import re
import warnings

MAX_THREADS = max(1024, 4 * (os.cpu_count() or 1))
VARIABLE = "OMP_NUM_THREADS"
_LIST = re.compile(r"\s*[0-9]+\s*(,\s*[0-9]+\s*)*", re.ASCII)


def thread_list(value: str):
    """The thread counts of an OMP_NUM_THREADS value (a count of over 18 digits as MAX_THREADS + 1); None if it
    is not a list of positive integers."""
    if not _LIST.fullmatch(value):
        return None
    counts = [int(v) if len(v.strip().lstrip("0")) <= 18 else MAX_THREADS + 1 for v in value.split(",")]
    return counts if min(counts) >= 1 else None


def bound_omp_num_threads(environ=os.environ) -> None:
    """Rewrite OMP_NUM_THREADS in `environ` (see the module docstring); called once, as cllm is imported."""
    value = environ.get(VARIABLE)
    if value is None:
        return
    if not value.strip():
        del environ[VARIABLE]
        return
    counts = thread_list(value)
    if counts is None:
        del environ[VARIABLE]
        warnings.warn(f"{VARIABLE}={value!r:.60} is not a thread count (a positive integer, or a comma-separated "
                      f"list of them): ignored, using OpenMP's default", RuntimeWarning, stacklevel=3)
        return
    bounded = ",".join(str(min(c, MAX_THREADS)) for c in counts)
    if max(counts) > MAX_THREADS:
        warnings.warn(f"{VARIABLE}={value!r:.60} asks for more threads than cllm allows (MAX_THREADS = "
                      f"{MAX_THREADS}); using {bounded}", RuntimeWarning, stacklevel=3)
    environ[VARIABLE] = bounded
