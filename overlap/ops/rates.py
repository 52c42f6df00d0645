"""How fast the group's carrier moves an exchange, against `copy_` of the same bytes in the same run.

`exchange_rates(group, rows, row_bytes)` sends `rows` rows of `row_bytes` bytes from every rank,
split evenly over the ranks (a dispatch's all-to-all), through the same transport the ops use
(`transport.start`, then `take_chunks` as the dispatch teardown does: the rows readable where they
landed), and times setup → teardown. Bytes per exchange
are what this rank sends to its peers; `exchange_GBps` is those bytes over the median exchange
time (the slowest rank's), `copy_GBps` the same bytes through `Tensor.copy_` on this rank (on
CUDA both are timed with device synchronisation). `python -m overlap bench` and
`bench/bench_exchange.py` report them.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
import torch.distributed as dist

from . import staging, transport


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _raw_exchange(group: dist.ProcessGroup, rows: list[int], buf: torch.Tensor) -> None:
    world = dist.get_world_size(group)
    values = dict.fromkeys(transport.PARAM_FIELDS, 0) | {"ep_world_size": world, "row_bytes": buf.shape[1]}
    header = transport.make_header("dispatch", values, sum(rows), 1)
    counts = torch.tensor(rows, dtype=torch.int64).view(world, 1)
    handle = transport.start(
        "dispatch", group, group.group_name, send_buf=buf, send_rows=rows, block_counts=counts, header=header
    )
    try:
        handle.take_chunks()  # as the dispatch teardown does: the rows, readable where they landed
        handle.release()
    finally:
        with transport._registry_lock:  # what a teardown's claim does: the budget is free again
            transport._registry.pop(handle.ticket, None)


def exchange_rates(
    group: dist.ProcessGroup, rows: int, row_bytes: int, *, reps: int = 5, device: torch.device | None = None
) -> dict[str, Any]:
    """`{"transport", "exchange_bytes", "exchange_s", "exchange_GBps", "copy_s", "copy_GBps"}` (every
    rank gets the same figures: times are the slowest rank's medians)."""
    if rows < 1 or row_bytes < 1 or reps < 1:
        raise ValueError(f"rows, row_bytes and reps must be >= 1, got {rows}, {row_bytes}, {reps}")
    device = device or torch.device("cpu")
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    split = [rows // world + (1 if r < rows % world else 0) for r in range(world)]
    buf = torch.randint(0, 255, (rows, row_bytes), dtype=torch.uint8, device=device)
    nbytes = (rows - split[rank]) * row_bytes
    src = buf[: rows - split[rank]]
    dst = torch.empty_like(src)
    with transport.comm_options(link=None):
        _raw_exchange(group, split, buf)  # warm-up: windows mapped, pages touched
        exchange, copy = [], []
        for _ in range(reps):
            _sync(device)
            t0 = time.perf_counter()
            _raw_exchange(group, split, buf)
            _sync(device)
            exchange.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            dst.copy_(src)
            _sync(device)
            copy.append(time.perf_counter() - t0)
    wire = (
        torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else torch.device("cpu")
    )
    times = torch.tensor([statistics.median(exchange), statistics.median(copy)], dtype=torch.float64, device=wire)
    dist.all_reduce(times, op=dist.ReduceOp.MAX, group=group)
    exchange_s, copy_s = (float(t) for t in times.cpu())
    return {
        "transport": staging.transport_kind(group.group_name),
        "exchange_bytes": nbytes,
        "exchange_s": exchange_s,
        "exchange_GBps": nbytes / exchange_s / 1e9 if exchange_s > 0 else 0.0,
        "copy_s": copy_s,
        "copy_GBps": nbytes / copy_s / 1e9 if copy_s > 0 else 0.0,
    }
