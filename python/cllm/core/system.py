"""The machine CLLM runs on: kernel threads and the memory left to this process.

Threads: the C++ kernels run on an OpenMP team of `get_num_threads()` threads, set with `set_num_threads(n)`;
absurd counts are refused (MAX_THREADS), as OpenMP teams much larger than the machine fail to start (libgomp exits
with "Thread creation failed" or the process crashes). OMP_NUM_THREADS is checked before the core loads
(cllm/_omp_env.py) and, should libgomp have read it first, bounded after (`bound_threads_from_environment`).

Memory: `check_memory(nbytes, what)` refuses, with an InsufficientMemoryError, an allocation that cannot fit in
what `available_memory()` reports, before it is made, instead of letting the OOM killer end the process. The
environment variable CLLM_MEMORY_CHECK=0 turns the check off.
"""
from __future__ import annotations

import os
import warnings
from typing import Optional

from .. import _core
from .._omp_env import MAX_THREADS, VARIABLE, thread_list
from .checks import check_int
from ..errors import InsufficientMemoryError

__all__ = ["MAX_THREADS", "check_num_threads", "set_num_threads", "get_num_threads", "bound_threads_from_environment",
           "available_memory", "format_bytes", "check_memory", "InsufficientMemoryError"]

# ----------------------------------------------------------------------------------------------------
# threads
# ----------------------------------------------------------------------------------------------------
def check_num_threads(n) -> int:
    """The number of kernel threads, checked: an int in [1, MAX_THREADS]."""
    return check_int("number of threads", n, 1, MAX_THREADS)


def set_num_threads(n: int) -> None:
    """Threads used by the C++ kernels (OpenMP), 1 to MAX_THREADS."""
    _core.set_num_threads(check_num_threads(n))


def get_num_threads() -> int:
    """Threads the C++ kernels use (OpenMP)."""
    return _core.get_num_threads()


def bound_threads_from_environment() -> None:
    """The thread count outside [1, MAX_THREADS] (an OMP_NUM_THREADS that libgomp read before cllm could bound it,
    cllm/_omp_env.py: a library loaded it first) would crash the first parallel kernel: bound it, with a warning
    (called once, when cllm is imported, after the core is loaded)."""
    n = _core.get_num_threads()  # an unsigned long cut to an int by libgomp: 2**32 reads as 0
    if not 1 <= n <= MAX_THREADS:
        counts = thread_list(os.environ.get(VARIABLE, ""))
        use = min(counts[0], MAX_THREADS) if counts else min(os.cpu_count() or 1, MAX_THREADS)
        warnings.warn(f"OpenMP's thread count reads {n} (libgomp was loaded before cllm, with a {VARIABLE} it "
                      f"cannot hold); using {use}", RuntimeWarning, stacklevel=3)
        _core.set_num_threads(use)


# ----------------------------------------------------------------------------------------------------
# memory
# ----------------------------------------------------------------------------------------------------
# (controller directory, limit, usage, stat, the stat key of reclaimable page cache): cgroup v2, then v1
_CGROUP_KINDS = (
    ("", "memory.max", "memory.current", "memory.stat", "inactive_file"),
    ("memory", "memory.limit_in_bytes", "memory.usage_in_bytes", "memory.stat", "total_inactive_file"),
)
_CHECK_FROM_BYTES = 16 << 20  # smaller allocations are not checked (reading /proc costs ~0.1 ms)


def _read_int(path: str) -> Optional[int]:
    try:
        with open(path) as f:
            text = f.read().strip()
        return None if text == "max" else int(text)
    except (OSError, ValueError):
        return None


def _stat_value(path: str, key: str) -> int:
    """The value of `key` in a cgroup memory.stat file; 0 if it cannot be read."""
    value = 0
    try:
        with open(path) as f:
            for line in f:
                k, _, v = line.partition(" ")
                if k == key:
                    value = int(v)
    except (OSError, ValueError):
        pass
    return value


def _cgroup_dirs(proc_cgroup: str, root: str, controller: str) -> list:
    """This process's cgroup directory of one hierarchy (v2 when `controller` is "", else v1's) and every
    ancestor up to the hierarchy's root, as listed in /proc/self/cgroup; a limit may sit on any of them (a
    Slurm job, a systemd service). The root alone when the path cannot be read or does not exist here."""
    base = os.path.join(root, controller)
    path = None
    try:
        with open(proc_cgroup) as f:
            for line in f:
                _, controllers, rel = line.rstrip("\n").split(":", 2)
                if (controller == "" and controllers == "") or controller in controllers.split(","):
                    path = rel
    except (OSError, ValueError):
        pass
    dirs = []
    parts = [p for p in (path or "").split("/") if p]
    for depth in range(len(parts), -1, -1):
        d = os.path.join(base, *parts[:depth])
        if os.path.isdir(d):
            dirs.append(d)
    return dirs


def _cgroup_room(proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> Optional[int]:
    """Bytes left under the tightest cgroup memory limit (v2 or v1) of this process's cgroup and its ancestors,
    None when there is none."""
    rooms = []
    for controller, limit_f, usage_f, stat_f, inactive in _CGROUP_KINDS:
        for d in _cgroup_dirs(proc_cgroup, root, controller):
            limit, usage = _read_int(os.path.join(d, limit_f)), _read_int(os.path.join(d, usage_f))
            if limit is None or usage is None or limit >= 1 << 60:
                continue
            reclaimable = _stat_value(os.path.join(d, stat_f), inactive)  # page cache dropped before the limit
            rooms.append(max(0, limit - max(0, usage - reclaimable)))
    return min(rooms) if rooms else None


def _meminfo_available() -> Optional[int]:
    """MemAvailable + SwapFree from /proc/meminfo (Linux), else the free physical pages (sysconf); None if
    neither is known."""
    try:
        info = {}
        with open("/proc/meminfo") as f:
            for line in f:
                k, _, v = line.partition(":")
                parts = v.split()
                if parts and parts[0].isdigit():
                    info[k] = int(parts[0]) * 1024
        if "MemAvailable" in info:
            return info["MemAvailable"] + info.get("SwapFree", 0)
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def _address_space_room() -> Optional[int]:
    """Bytes left under an address-space limit (RLIMIT_AS, `ulimit -v`: past it an allocation fails, and the
    Rust code of a library aborts the process): the limit less this process's size now; None without one."""
    try:
        import resource

        limit = resource.getrlimit(resource.RLIMIT_AS)[0]
        if limit == resource.RLIM_INFINITY:
            return None
        with open("/proc/self/statm") as f:
            size = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (ImportError, AttributeError, OSError, ValueError, IndexError):
        return None
    return max(0, limit - size)


def available_memory() -> Optional[int]:
    """Bytes this process can still allocate without swapping out the machine or meeting the OOM killer:
    MemAvailable + SwapFree (Linux /proc/meminfo, else sysconf), capped by the tightest cgroup limit of this
    process's cgroup hierarchy and by what an address-space limit leaves; None if unknown."""
    avail = _meminfo_available()
    for room in (_cgroup_room(), _address_space_room()):
        if room is not None:
            avail = room if avail is None else min(avail, room)
    return avail


def format_bytes(nbytes: int) -> str:
    """A size for people: "1.5 GiB", "24.0 MiB", "100,000 bytes"."""
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20)):
        if nbytes >= scale:
            return f"{nbytes / scale:,.1f} {unit}"
    return f"{nbytes:,} bytes"


def check_memory(nbytes: int, what: str) -> None:
    """Raise InsufficientMemoryError if `nbytes` (16 MiB or more) more bytes cannot fit in the memory available;
    `what` names the allocation in the message ("a batch of 8 x 256 tokens needs ...")."""
    if nbytes < _CHECK_FROM_BYTES or os.environ.get("CLLM_MEMORY_CHECK", "1").strip() == "0":
        return
    avail = available_memory()
    if avail is not None and nbytes > avail:
        raise InsufficientMemoryError(f"{what} needs {format_bytes(nbytes)} of memory, but only "
                                      f"{format_bytes(avail)} is available")
