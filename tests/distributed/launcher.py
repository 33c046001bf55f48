"""Start N gloo ranks with torch.multiprocessing and collect what each returns.

Every rank runs `fn(rank, world_size, *args, **kwargs)` after joining a process group that has a timeout,
so a failing rank makes the others fail fast instead of hanging the test session.

A rank that has saved its result leaves with `os._exit` after destroying its process groups:
Python's interpreter teardown with gloo's native threads still around can abort the process
(SIGABRT, "terminate called without an active exception", pytorch/pytorch#179291), the likely
cause of a rank-0 abort that once failed CI and did not reproduce here. faulthandler prints
every thread's stack if a rank crashes anywhere else. What the tests check is the result; the
real entry point's exit is covered by the torchrun tests.
"""

from __future__ import annotations

import faulthandler
import gc
import os
import socket
import sys
import tempfile

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world_size, port, out_dir, fn, args, kwargs):
    faulthandler.enable()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from moetrain.parallel import init_distributed
    init_distributed(timeout_s=60)
    try:
        result = fn(rank, world_size, *args, **kwargs)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        del result
    finally:
        gc.collect()  # trainers sit in reference cycles: free them while the groups exist
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_distributed(fn, world_size: int, *args, **kwargs):
    """Returns [result of rank 0, ..., result of rank N-1]; raises if any rank fails."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_entry, args=(world_size, free_port(), out_dir, fn, args, kwargs),
                 nprocs=world_size, join=True)
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False)
                for r in range(world_size)]
