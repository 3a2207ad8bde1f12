"""Data parallelism across processes: the communicators over MPI (mpi.py) and the gradients' exchange and ZeRO-1
shards (reducer.py). See docs/distributed.md."""
from .mpi import (DEFAULT_CHECK_INTERVAL, MPICommunicator, SingleProcess, abort_on_error, auto_communicator,
                  launched_world_size, mpirun_command)
from .reducer import GRAD_DTYPES, GradientReducer, from_bf16, shard_ranges, to_bf16

__all__ = ["SingleProcess", "MPICommunicator", "GradientReducer", "auto_communicator", "abort_on_error",
           "launched_world_size", "mpirun_command", "shard_ranges", "DEFAULT_CHECK_INTERVAL", "GRAD_DTYPES",
           "to_bf16", "from_bf16"]
