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
