"""Local ranks over gloo (for the command line, benchmarks, examples and tests), or torchrun's group.

Owns process start-up only, in one place:

- `RankPool(world)`: `world` spawned processes, each joined to one gloo group, that run
  `pool.run(fn, *args)` on every rank and return the per-rank results (a rank's exception comes
  back as `RankError` with its traceback; a rank that hangs or dies fails the call within
  `timeout_s` and the next call starts a fresh pool). Reused across calls (the tests' pool).
- `run_ranks(world, fn, *args)`: one call on a fresh pool, rank 0's result; under `torchrun`
  (RANK and WORLD_SIZE set) it joins the existing group instead and calls `fn` once here.
- `rank_device(kind, local_rank)`: the device a rank computes on (`cuda:(local_rank % G)`).
- `threads_per_rank(world)`: torch's intra-op threads per rank so that ranks × threads never
  exceed the cores.
- `rank_env(threads)`: what every spawned rank's environment gets before torch starts in it: a
  passive OpenMP wait (`OMP_WAIT_POLICY=PASSIVE`, and `KMP_BLOCKTIME=0` for Intel's runtime), so
  that idle OpenMP threads sleep instead of spinning on the cores the comm threads need, and
  `OMP_NUM_THREADS=threads`: `torch.set_num_threads` sets only the calling thread's OpenMP team,
  so without it every other thread that runs a torch op (the transport's worker, a stream worker)
  gets a team as large as the host, spinning beside the rank's own. An OpenMP runtime reads these
  once, when it loads (with torch), so they cannot be set from inside a running rank: under
  `torchrun` the user sets them (README; torchrun sets OMP_NUM_THREADS=1 itself), and the
  scheduler warns once when they are missing (`overlap.pipeline.policy.spins`).

`fn` must be importable (module level): the processes are spawned.
"""

from __future__ import annotations

import contextlib
import os
import queue
import tempfile
import traceback
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .pipeline.policy import PASSIVE_ENV

DEVICES = ("cpu", "cuda")


class RankError(RuntimeError):
    """A rank raised; `.rank`, `.type_name` and `.message` say which and what."""

    def __init__(self, rank: int, type_name: str, message: str, tb: str) -> None:
        super().__init__(f"rank {rank} raised {type_name}: {message}\n{tb}")
        self.rank, self.type_name, self.message = rank, type_name, message


def threads_per_rank(world: int, cores: int | None = None) -> int:
    """Intra-op threads for each of `world` local ranks: the cores shared out, at least 1, keeping one
    core of each rank's share for its comm threads (setup/teardown workers, the transport) once the
    share is 4 cores or more, so that ranks x threads never oversubscribe the host."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    share = max(1, cores // max(world, 1))
    return share - 1 if share >= 4 else share


def rank_env(threads: int, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The variables a spawned rank with `threads` intra-op threads gets: `PASSIVE_ENV` and
    `OMP_NUM_THREADS`, except those the user set already (`environ`, default `os.environ`), which
    are kept as they are."""
    environ = os.environ if environ is None else environ
    wanted = {**PASSIVE_ENV, "OMP_NUM_THREADS": str(threads)}
    return {k: v for k, v in wanted.items() if k not in environ}


def rank_device(kind: str, local_rank: int) -> torch.device:
    """The device rank `local_rank` of this host computes on: cpu, or `cuda:(local_rank % G)` for
    G visible GPUs (ranks share GPUs when there are more ranks than GPUs).

    Raises:
        ValueError: `kind` is not one of `DEVICES`, or cuda without a GPU.
    """
    if kind not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {kind!r}")
    if kind == "cpu":
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if count == 0:
        raise ValueError("device must be 'cpu' on a host without a CUDA GPU, got 'cuda'")
    return torch.device("cuda", local_rank % count)


def _rank_main(rank: int, world: int, init_file: str, threads: int, tasks: Any, results: Any) -> None:
    torch.set_num_threads(threads)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=600)
    )
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args, kwargs = task
        try:
            results.put((rank, True, fn(*args, **kwargs)))
        except BaseException as exc:  # reported to the caller, the rank stays alive
            results.put((rank, False, (type(exc).__name__, str(exc), traceback.format_exc())))
    try:
        from . import ops

        ops.shutdown()
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - best effort on the way out
        pass


class RankPool:
    """`world` local rank processes over one gloo group, started on first use and reused.

    Args:
        world: number of ranks (>= 2: the ops' ep_world_size range starts at 2).
        threads: torch intra-op threads per rank (default `threads_per_rank(world)`).
        env: variables set in every rank's environment before torch starts there (default
            `rank_env(threads)`: a passive OpenMP wait and OMP_NUM_THREADS, except what the
            caller's environment sets); `{}` leaves the environment as it is.
    """

    def __init__(self, world: int, *, threads: int | None = None, env: dict[str, str] | None = None) -> None:
        if isinstance(world, bool) or not isinstance(world, int) or world < 2:
            raise ValueError(f"world must be an int >= 2 (the ops' ep_world_size range is [2, 384]), got {world!r}")
        self.world = world
        self.threads = threads or threads_per_rank(world)
        self.env = rank_env(self.threads) if env is None else dict(env)
        self._procs: list[Any] = []
        self._tasks: list[Any] = []

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        fd, init_file = tempfile.mkstemp(prefix="overlap-gloo-")
        os.close(fd)
        os.unlink(init_file)
        self._init_file: str | None = init_file
        self._results = ctx.Queue()
        self._tasks = [ctx.Queue() for _ in range(self.world)]
        self._procs = [
            ctx.Process(
                target=_rank_main,
                args=(r, self.world, init_file, self.threads, self._tasks[r], self._results),
                daemon=True,
            )
            for r in range(self.world)
        ]
        # A spawned child copies this process's environment when it starts and loads torch (and
        # its OpenMP runtime) while unpickling: set the variables around the start only.
        saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        try:
            for i, p in enumerate(self._procs):
                try:
                    p.start()
                except BaseException:
                    self._procs = self._procs[:i]  # only the started ones: `close` joins them
                    self.close()
                    raise
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def run(self, fn: Callable[..., Any], *args: Any, timeout_s: float = 600.0, **kwargs: Any) -> list[Any]:
        """Results of `fn(*args, **kwargs)` on ranks 0..world-1 (raises `RankError` if one raised)."""
        outcomes = self.run_outcomes(fn, *args, timeout_s=timeout_s, **kwargs)
        for rank, (ok, value) in enumerate(outcomes):
            if not ok:
                raise RankError(rank, *value)
        return [value for _, value in outcomes]

    def run_outcomes(
        self, fn: Callable[..., Any], *args: Any, timeout_s: float = 600.0, **kwargs: Any
    ) -> list[tuple[bool, Any]]:
        """Per rank `(True, result)` or `(False, (type name, message, traceback))`.

        Raises:
            TimeoutError: a rank did not finish within `timeout_s` (the pool is torn down).
        """
        if not self._procs or not all(p.is_alive() for p in self._procs):
            self.close()
            self._start()
        for q in self._tasks:
            q.put((fn, args, kwargs))
        outcomes: dict[int, tuple[bool, Any]] = {}
        while len(outcomes) < self.world:
            try:
                rank, ok, value = self._results.get(timeout=timeout_s)
            except queue.Empty:
                self.close()
                missing = sorted(set(range(self.world)) - set(outcomes))
                errors = "".join(
                    f"\nrank {r} raised {v[0]}: {v[1]}\n{v[2]}" for r, (ok, v) in outcomes.items() if not ok
                )
                raise TimeoutError(
                    f"ranks {missing} did not finish {fn.__name__} within {timeout_s} s{errors}"
                ) from None
            outcomes[rank] = (ok, value)
        return [outcomes[r] for r in range(self.world)]

    def close(self) -> None:
        """Stop the rank processes (killing those that do not stop)."""
        for q in self._tasks:
            try:
                q.put(None)
            except Exception:  # noqa: BLE001 - a closed queue: the rank is gone already
                pass
        for p in self._procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                # SIGKILL cannot be refused, but a loaded machine took over 5 s to reap a rank
                # killed while it was still starting (a suite run beside two CPU burners)
                p.join(timeout=60)
        self._procs = []
        # gloo's FileStore leaves its rendezvous file behind when ranks are stopped mid-way.
        init_file: str | None = getattr(self, "_init_file", None)
        self._init_file = None
        if init_file:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(init_file)

    def __enter__(self) -> RankPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def run_ranks(
    ranks: int, fn: Callable[..., Any], *args: Any, timeout_s: float = 3600.0, env: dict[str, str] | None = None
) -> Any:
    """Run `fn(*args)` on `ranks` local gloo ranks (or once under torchrun); rank 0's result.
    `env`: as `RankPool`'s (default: a passive OpenMP wait in every rank).

    Raises:
        ValueError: `ranks` < 2.
        RankError: a rank raised (its traceback is in the message).
    """
    if under_torchrun():
        if not dist.is_initialized():
            dist.init_process_group("gloo")
        return fn(*args)
    if isinstance(ranks, bool) or not isinstance(ranks, int) or ranks < 2:
        raise ValueError(f"ranks must be >= 2 (the ops' ep_world_size range is [2, 384]), got {ranks!r}")
    with RankPool(ranks, env=env) as pool:
        return pool.run(fn, *args, timeout_s=timeout_s)[0]
