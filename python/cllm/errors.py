"""The exceptions CLLM raises for problems a user can fix: a bad file, a machine too small, a launch gone wrong.

Each is a CLLMError and also the standard exception of its kind (a missing file is a FileNotFoundError, too
little memory a MemoryError), so callers can catch either. Bad argument values raise the standard ValueError /
TypeError. The command line prints any of USER_ERRORS as one line (cli.main), and a data-parallel rank failing
with one of them shows no traceback (distributed.py).
"""
from __future__ import annotations


class CLLMError(Exception):
    """A problem with the user's input, files or machine, worded to be read by a person."""


class MissingFileError(CLLMError, FileNotFoundError):
    """A file or directory the user named (or one a run needs) does not exist."""


class InsufficientMemoryError(CLLMError, MemoryError):
    """Raised *before* an allocation that would not fit in the memory available to this process.
    Set the environment variable CLLM_MEMORY_CHECK=0 to skip the check."""


class MPISetupError(CLLMError, RuntimeError):
    """MPI cannot be used as launched (mpi4py missing, or linked against another MPI than the launcher's)."""


class ReplicaDivergenceError(CLLMError, RuntimeError):
    """The ranks' copies of the model are no longer equal (raised on every rank alike)."""


# what a user can fix, with a message that says it all: a CLLMError, a bad argument value or type, a file that
# cannot be read or written
USER_ERRORS = (CLLMError, ValueError, TypeError, OSError)
