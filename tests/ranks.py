"""A pool of rank processes over gloo, started once and reused by many test cases.

`RankPool(world).run(fn, *args)` calls `fn(*args)` on every rank (each process has joined one
gloo process group of `world` ranks) and returns the per-rank results, raising on the first rank
error with that rank's traceback. A pool whose ranks hang or die is torn down and the test fails
within `timeout_s`; the next `run` starts a fresh pool. `fn` must be importable (module level).
"""

from __future__ import annotations

import os
import queue
import tempfile
import traceback
from datetime import timedelta
from typing import Any, Callable

import torch.multiprocessing as mp


class RankError(RuntimeError):
    """A rank raised; `.rank`, `.type_name` and `.message` say which and what."""

    def __init__(self, rank: int, type_name: str, message: str, tb: str) -> None:
        super().__init__(f"rank {rank} raised {type_name}: {message}\n{tb}")
        self.rank, self.type_name, self.message = rank, type_name, message


def _rank_main(rank: int, world: int, init_file: str, tasks: Any, results: Any) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args, kwargs = task
        try:
            results.put((rank, True, fn(*args, **kwargs)))
        except BaseException as exc:  # reported to the test, the rank stays alive
            results.put((rank, False, (type(exc).__name__, str(exc), traceback.format_exc())))
    try:
        import overlap.ops

        overlap.ops.shutdown()
        dist.destroy_process_group()
    except Exception:
        pass


class RankPool:
    def __init__(self, world: int) -> None:
        self.world = world
        self._procs: list[Any] = []

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        fd, init_file = tempfile.mkstemp(prefix="overlap-gloo-")
        os.close(fd)
        os.unlink(init_file)
        self._results = ctx.Queue()
        self._tasks = [ctx.Queue() for _ in range(self.world)]
        self._procs = [ctx.Process(target=_rank_main, args=(r, self.world, init_file, self._tasks[r], self._results),
                                   daemon=True) for r in range(self.world)]
        for p in self._procs:
            p.start()

    def run(self, fn: Callable[..., Any], *args: Any, timeout_s: float = 120.0, **kwargs: Any) -> list[Any]:
        """Results of `fn(*args, **kwargs)` on ranks 0..world-1 (raises `RankError` if one raised)."""
        outcomes = self.run_outcomes(fn, *args, timeout_s=timeout_s, **kwargs)
        for rank, (ok, value) in enumerate(outcomes):
            if not ok:
                raise RankError(rank, *value)
        return [value for _, value in outcomes]

    def run_outcomes(self, fn: Callable[..., Any], *args: Any, timeout_s: float = 120.0,
                     **kwargs: Any) -> list[tuple[bool, Any]]:
        """Per rank `(True, result)` or `(False, (type name, message, traceback))`."""
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
                errors = "".join(f"\nrank {r} raised {v[0]}: {v[1]}\n{v[2]}" for r, (ok, v) in outcomes.items() if not ok)
                raise TimeoutError(f"ranks {missing} did not finish {fn.__name__} within {timeout_s} s{errors}") from None
            outcomes[rank] = (ok, value)
        return [outcomes[r] for r in range(self.world)]

    def close(self) -> None:
        for q in getattr(self, "_tasks", []):
            try:
                q.put(None)
            except Exception:
                pass
        for p in self._procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        self._procs = []
