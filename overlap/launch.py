"""Start local ranks over gloo (for the command line and examples), or join torchrun's group.

Owns process start-up only: `run_ranks(world, fn, *args)` spawns `world` processes, each joins one
gloo group and calls `fn(*args)`; rank 0's return value comes back. Under `torchrun` (RANK and
WORLD_SIZE set) it joins the existing group instead and calls `fn` once in this process.
"""

from __future__ import annotations

import os
import tempfile
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, world: int, init_file: str, fn: Callable[..., Any], args: tuple, results: Any) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    try:
        value = fn(*args)
        if rank == 0:
            results.put(value)
    finally:
        from . import ops

        ops.shutdown()
        dist.destroy_process_group()


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def run_ranks(world: int, fn: Callable[..., Any], *args: Any) -> Any:
    """Run `fn(*args)` on `world` local gloo ranks (or once under torchrun); rank 0's result."""
    if under_torchrun():
        if not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend)
        return fn(*args)
    if world < 2:
        raise ValueError(f"ranks must be >= 2 (the ops' ep_world_size range is [2, 384]), got {world}")
    fd, init_file = tempfile.mkstemp(prefix="overlap-gloo-")
    os.close(fd)
    os.unlink(init_file)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    context = mp.start_processes(_entry, args=(world, init_file, fn, args, results), nprocs=world, join=False,
                                 start_method="spawn")
    while not context.join():
        pass
    return results.get(timeout=10)
