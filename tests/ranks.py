"""The tests' rank processes: `overlap.launch.RankPool` with one intra-op thread per rank."""

from __future__ import annotations

from overlap.launch import RankError, RankPool

__all__ = ["RankError", "RankPool"]


def exit_once_all_arrived(key: str, dying: bool, code: int = 0) -> None:
    """Every rank calls it at the same point; the `dying` rank then exits its process (with `code`)
    as soon as every rank has arrived, and the others go on at once.

    A test that kills a rank must not kill it while a peer is still building a group with it: gloo's
    connect fails on the peer ("Connection closed by peer") before the op under test is reached.
    The arrival count lives in the default group's store (the pool's rendezvous file, which outlives
    any rank), under `key`; pass something unique to this call, such as the group's name.
    """
    import os
    import time

    import torch.distributed as dist

    store = dist.distributed_c10d._get_default_store()
    store_key = f"tests/arrived/{key}"
    store.add(store_key, 1)
    if not dying:
        return
    deadline = time.monotonic() + 60.0
    while store.add(store_key, 0) < dist.get_world_size() and time.monotonic() < deadline:
        time.sleep(0.005)
    os._exit(code)
