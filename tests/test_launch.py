"""The one launcher of local ranks: thread split, device per rank, argument checks, a rank's error
coming back with its traceback."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from overlap.launch import RankError, RankPool, rank_device, run_ranks, threads_per_rank


@pytest.mark.parametrize("world,cores,threads", [(2, 2, 1), (2, 16, 7), (4, 16, 3), (8, 16, 2), (3, 2, 1), (1, 8, 7)])
def test_threads_never_oversubscribe_the_cores(world, cores, threads):
    assert threads_per_rank(world, cores) == threads
    assert world * threads <= max(cores, world)


def test_rank_device():
    assert rank_device("cpu", 5) == torch.device("cpu")
    with pytest.raises(ValueError, match=r"device must be one of \('cpu', 'cuda'\), got 'tpu'"):
        rank_device("tpu", 0)
    if torch.cuda.is_available():
        assert rank_device("cuda", torch.cuda.device_count() + 1).index == 1 % torch.cuda.device_count()
    else:
        with pytest.raises(ValueError, match="device must be 'cpu' on a host without a CUDA GPU"):
            rank_device("cuda", 0)


def test_bad_world_sizes_are_refused_before_any_process_starts():
    with pytest.raises(ValueError, match=r"ranks must be >= 2 .*got 1"):
        run_ranks(1, print)
    with pytest.raises(ValueError, match=r"world must be an int >= 2 .*got True"):
        RankPool(True)  # type: ignore[arg-type]


def _rank_and_size() -> tuple[int, int]:
    return dist.get_rank(), dist.get_world_size()


def _fail_on_rank_1() -> int:
    if dist.get_rank() == 1:
        raise KeyError("only rank 1")
    return dist.get_rank()


def test_pool_runs_on_every_rank_and_reports_a_ranks_error():
    with RankPool(3, threads=1) as pool:
        assert pool.run(_rank_and_size) == [(0, 3), (1, 3), (2, 3)]
        with pytest.raises(RankError, match="rank 1 raised KeyError") as info:
            pool.run(_fail_on_rank_1)
        assert info.value.rank == 1 and "only rank 1" in info.value.message
        assert pool.run(_rank_and_size)[2] == (2, 3)  # the pool goes on after a rank's error
