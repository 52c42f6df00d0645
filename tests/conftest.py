from __future__ import annotations

import pytest

from .ranks import RankPool

_pools: dict[int, RankPool] = {}


@pytest.fixture(scope="session")
def rank_pools():
    """`rank_pools(world)` -> a `RankPool` of that many gloo ranks, started once per session."""

    def get(world: int) -> RankPool:
        if world not in _pools:
            _pools[world] = RankPool(world, threads=1)
        return _pools[world]

    yield get
    for pool in _pools.values():
        pool.close()
    _pools.clear()


def _release_test_groups() -> int:
    """In a rank: release (`ops.release`) and destroy every process group but the world. Tests make
    fresh groups (and `recover` makes more); kept for the session, each gloo group's threads wake
    and poll for good: 200 groups made a pooled rank use ~10 % of a core while idle."""
    import torch.distributed as dist

    from overlap import ops

    world = dist.group.WORLD
    groups = [g for g in list(dist.distributed_c10d._world.pg_map) if g is not world]
    for group in groups:
        ops.release(group)
        dist.destroy_process_group(group)
    return len(groups)


@pytest.fixture(autouse=True)
def _groups_released_after_each_test():
    """After each test, on every started pool, the groups the test made are released and destroyed
    (once every rank is done with the test: no exchange of them is in flight anywhere)."""
    yield
    for pool in list(_pools.values()):
        if not pool._procs:
            continue
        try:
            pool.run(_release_test_groups, timeout_s=120)
        except Exception:  # noqa: BLE001 - a pool left broken by its test: start afresh next time
            pool.close()
