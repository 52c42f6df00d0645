"""The one launcher of local ranks: thread split, device per rank, argument checks, a rank's error
coming back with its traceback."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

from overlap.launch import RankError, RankPool, rank_device, rank_env, run_ranks, threads_per_rank
from overlap.pipeline.policy import openmp_runtime, spins


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


def _hang() -> None:
    time.sleep(3600)


def test_a_pool_torn_down_on_timeout_leaves_no_rendezvous_file():
    pool = RankPool(2, threads=1)
    assert pool.run(_rank_and_size) == [(0, 2), (1, 2)]
    init_file = pool._init_file
    assert init_file and os.path.exists(init_file)
    with pytest.raises(TimeoutError, match="did not finish _hang"):
        pool.run(_hang, timeout_s=3)  # the pool kills its ranks
    assert not os.path.exists(init_file)


def _rank_env() -> tuple[str | None, str | None, str | None]:
    import os

    return os.environ.get("OMP_WAIT_POLICY"), os.environ.get("KMP_BLOCKTIME"), os.environ.get("OMP_NUM_THREADS")


def _thread_team() -> int:
    """OS threads a fresh Python thread's torch op starts besides itself (its OpenMP team but the
    thread, counted while it is alive): `OMP_NUM_THREADS` - 1, whatever torch.set_num_threads said
    in the rank's main thread."""
    import os
    import threading

    import torch.nn.functional as F

    before = len(os.listdir("/proc/self/task"))
    x, w = torch.randn(256, 1024), torch.randn(1024, 1024)
    seen: list[int] = []

    def op() -> None:
        F.linear(x, w)
        seen.append(len(os.listdir("/proc/self/task")) - before - 1)

    t = threading.Thread(target=op)
    t.start()
    t.join()
    return seen[0]


def test_ranks_get_a_passive_openmp_wait_and_their_thread_count_and_the_parent_keeps_its_environment(monkeypatch):
    import os

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("KMP_BLOCKTIME", "7")  # the user's own setting is kept
    assert rank_env(3) == {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "3"}
    with RankPool(2, threads=1) as pool:
        assert pool.run(_rank_env) == [("PASSIVE", "7", "1")] * 2
        if os.path.isdir("/proc/self/task"):
            assert pool.run(_thread_team) == [0, 0]  # a comm thread's op adds no OpenMP team
    assert "OMP_WAIT_POLICY" not in os.environ and "OMP_NUM_THREADS" not in os.environ
    assert os.environ["KMP_BLOCKTIME"] == "7"
    with RankPool(2, threads=1, env={}) as pool:  # opted out: the ranks inherit as is
        assert pool.run(_rank_env) == [(None, "7", None)] * 2
        if os.path.isdir("/proc/self/task") and (os.cpu_count() or 1) > 1:
            assert all(n >= 1 for n in pool.run(_thread_team))  # the team the env var prevents


GNU_INFO = "ATen/Parallel:\n\tat::get_num_threads() : 4\nOpenMP 201511\nATen parallel backend: OpenMP\n"
NATIVE_INFO = "ATen/Parallel:\n\tat::get_num_threads() : 4\nATen parallel backend: native thread pool\n"


def test_which_openmp_runtime_runs_the_intra_op_threads():
    assert openmp_runtime(GNU_INFO, "7f.. /lib/libgomp.so.1") == "gnu"
    assert openmp_runtime(GNU_INFO, "7f.. /opt/lib/libiomp5.so") == "intel"
    assert openmp_runtime(NATIVE_INFO, "7f.. /opt/lib/libiomp5.so") == "native"


@pytest.mark.parametrize(
    "runtime,threads,env,spinning",
    [
        ("gnu", 4, {}, True),  # unset: 300 000 turns after every region
        ("gnu", 4, {"OMP_WAIT_POLICY": "active"}, True),
        ("gnu", 4, {"OMP_WAIT_POLICY": "Passive"}, False),
        ("gnu", 4, {"KMP_BLOCKTIME": "0"}, True),  # libgomp ignores KMP_*
        ("gnu", 1, {"OMP_NUM_THREADS": "1"}, False),  # no team anywhere
        ("gnu", 1, {}, True),  # other threads' teams take every core (4 here)
        ("gnu", 1, {"OMP_NUM_THREADS": "2"}, True),
        ("intel", 4, {}, True),  # 200 ms of spinning by default
        ("intel", 4, {"KMP_BLOCKTIME": "0"}, False),
        ("intel", 4, {"OMP_WAIT_POLICY": "PASSIVE"}, False),
        ("native", 4, {}, False),
    ],
)
def test_the_spinning_rule(runtime, threads, env, spinning):
    reason = spins(runtime, threads, env, cores=4)
    assert (reason is not None) == spinning
    if spinning:
        assert "OMP_WAIT_POLICY=PASSIVE" in reason and "\n" not in reason
    with pytest.raises(ValueError, match="runtime must be one of"):
        spins("tbb", 4, {}, cores=4)


def test_the_scheduler_warns_once_per_process(monkeypatch):
    import warnings

    from overlap.pipeline import policy

    monkeypatch.setattr(policy, "_spin_reason", lambda n: f"{n} threads spin")
    monkeypatch.setattr(policy, "_warned", [])
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    import overlap

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with overlap.scheduler():  # entering a context checks
            pass
        with overlap.scheduler():
            pass
        assert policy.warn_if_spinning() == "3 threads spin"
    assert [str(w.message) for w in caught] == ["3 threads spin"]  # once per process
    assert caught[0].filename == __file__  # pointing at the caller's `with` line


def test_a_pool_whose_rank_fails_to_start_stops_the_started_ones_and_raises(monkeypatch):
    import multiprocessing.context as mpc

    real = mpc.SpawnProcess.start
    started = []

    def start(self):
        if started:
            raise OSError("no more processes")
        started.append(self)
        real(self)

    monkeypatch.setattr(mpc.SpawnProcess, "start", start)
    pool = RankPool(3, threads=1)
    with pytest.raises(OSError, match="no more processes"):
        pool.run(_rank_and_size, timeout_s=5)
    assert pool._procs == [] and not started[0].is_alive()
