"""The one splitting rule and the one in-flight budget of every executor.

Owns: how a batch is cut into microbatches (count and padded size, the same on every rank), the
agreement on the group's largest batch that the rule starts from (one small all-reduce), the
padding of a rank's rows to the agreed size, and how many exchanges of one kind may be in flight.
The planned executor, the fibers, the serial forward and the transformers integration all ask here;
nothing else decides these numbers. Never runs an op.

The rule, from the group's largest batch T (tokens on the rank that has most)::

    count = max(ceil(T / 512), min(microbatches, T // min_tokens), 1)     (T // 0 counts as T)
    size  = ceil(T / count)                                               (rows per microbatch)

No call ever carries more than 512 tokens (the ops' BS limit). A batch with fewer than `min_tokens`
tokens per microbatch is not split further: below that, an exchange's fixed cost outweighs what
overlap can hide. Every rank pads its rows to `count · size` (padding rows are inactive, or zeros
for a module that takes no mask), so every rank makes the same calls in the same order, even a
rank with no tokens at all.

Threads: whether torch's idle OpenMP threads spin (`spins`), which starves the comm threads of the
cores they need, and the passive wait every rank the library starts gets (`PASSIVE_ENV`); the
scheduler warns once per process (`warn_if_spinning`).
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from ..ops import transport

MAX_TOKENS_PER_CALL = 512  # the ops' BS limit
DEFAULT_MICROBATCHES = 2
DEFAULT_MIN_TOKENS = 32


def check_microbatches(microbatches: object, min_tokens: object) -> None:
    """`microbatches` an int >= 1 and `min_tokens` an int >= 0, else ValueError."""
    if isinstance(microbatches, bool) or not isinstance(microbatches, int) or microbatches < 1:
        raise ValueError(f"microbatches must be an int >= 1, got {microbatches!r}")
    if isinstance(min_tokens, bool) or not isinstance(min_tokens, int) or min_tokens < 0:
        raise ValueError(f"min_tokens must be an int >= 0, got {min_tokens!r}")


@dataclass(frozen=True)
class Split:
    """How a batch whose largest rank holds `total` tokens is cut: `count` microbatches of `size`
    rows (padded) on every rank. `count == 0` when no rank has a token (nothing to exchange)."""

    total: int
    count: int
    size: int

    def rows(self, i: int) -> slice:
        """The rows of microbatch `i` in a rank's batch padded to `count · size`."""
        return slice(i * self.size, (i + 1) * self.size)

    def chunk(self, x: Tensor, i: int) -> tuple[Tensor, Tensor]:
        """Rows of microbatch `i` of x `(T, ...)` zero-padded to `size`, and its `(size,)` bool
        True-prefix mask of real rows (the ops' `x_active_mask`)."""
        part = x[self.rows(i)]
        active = part.shape[0]
        if active < self.size:
            part = torch.cat([part, part.new_zeros(self.size - active, *x.shape[1:])])
        return part.contiguous(), torch.arange(self.size, device=x.device) < active

    def pad(self, x: Tensor) -> Tensor:
        """x `(T, ...)` with zero rows appended up to `count · size` rows."""
        missing = self.count * self.size - x.shape[0]
        return torch.cat([x, x.new_zeros(missing, *x.shape[1:])]) if missing > 0 else x


def split(total: int, microbatches: int = DEFAULT_MICROBATCHES, min_tokens: int = DEFAULT_MIN_TOKENS) -> Split:
    """The rule of the module docstring for a group whose largest batch is `total` tokens."""
    if total < 0:
        raise ValueError(f"total must be >= 0 tokens, got {total}")
    check_microbatches(microbatches, min_tokens)
    if total == 0:
        return Split(0, 0, 0)
    by_size = min(microbatches, total // min_tokens if min_tokens > 0 else total)  # T // 0 counts as T
    count = max(math.ceil(total / MAX_TOKENS_PER_CALL), by_size, 1)
    return Split(total, count, math.ceil(total / count))


def largest_batch(num_tokens: int, group: dist.ProcessGroup | None) -> int:
    """The largest `num_tokens` of the group's ranks: one small all-reduce, which every rank of the
    group must enter (so call it only where no exchange of the group is in flight).

    Raises:
        CommError: the all-reduce failed, or the group is broken (a peer died or timed out).
        CommTimeoutError: a peer did not join within the timeout.
    """
    group = group if group is not None else dist.group.WORLD
    if group is None:
        raise RuntimeError("torch.distributed is not initialised: call dist.init_process_group(...) first")
    t = torch.tensor([num_tokens], dtype=torch.int64)
    if dist.get_backend(group) == "nccl":  # NCCL reduces device tensors only
        t = t.cuda()
    # Through the transport: a broken group raises CommError at once, a backend failure becomes
    # CommError / CommTimeoutError (never the backend's own exception), bounded by the timeout.
    transport.collective(
        lambda: dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group, async_op=True),
        "agreeing on the largest batch (all-reduce)",
        group,
    )
    return int(t.item())


def agree(num_tokens: int, group: dist.ProcessGroup | None, microbatches: int, min_tokens: int) -> Split:
    """`split` of the group's largest batch (one all-reduce)."""
    check_microbatches(microbatches, min_tokens)
    return split(largest_batch(num_tokens, group), microbatches, min_tokens)


def in_flight_budget() -> int:
    """Exchanges of one kind (dispatch, combine) that may be in flight per group: the transport's
    `max_in_flight` (2, the double buffer, unless `ops.configure` changed it)."""
    return transport.max_in_flight()


PASSIVE_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"}
"""A passive OpenMP wait: GNU libgomp (pip's torch) spins GOMP_SPINCOUNT (300 000 turns) after
each parallel region unless OMP_WAIT_POLICY=PASSIVE; Intel's libiomp5 spins KMP_BLOCKTIME (200 ms)
unless it is 0."""


OPENMP_RUNTIMES = ("gnu", "intel", "native")


def openmp_runtime(parallel_info: str, loaded: str) -> str:
    """Which runtime runs torch's intra-op threads: "native" (torch's own pool: the parallel info
    does not name OpenMP as its backend), "intel" (libiomp5 among the `loaded` libraries, e.g. the
    text of /proc/self/maps) or "gnu" (libgomp: pip's torch)."""
    if "parallel backend: OpenMP" not in parallel_info:
        return "native"
    return "intel" if "libiomp" in loaded else "gnu"


def spins(runtime: str, num_threads: int, environ: Mapping[str, str] | None = None, cores: int = 1) -> str | None:
    """Why idle OpenMP threads spin (a one-line reason), or None when they do not.

    The rule: an OpenMP runtime (`openmp_runtime`), a team of more than one thread somewhere in
    the process, and a wait that is not passive. Teams: `num_threads` (torch's, set by
    `torch.set_num_threads` for the calling thread only) and, for every other thread that runs a
    torch op (the transport's, the stream workers), `OMP_NUM_THREADS`, or all `cores` when it is
    unset. Waits: for GNU OpenMP `OMP_WAIT_POLICY` is not `passive` (unset: each thread spins
    300 000 turns after every parallel region; `active`: for ever); for Intel OpenMP neither
    `OMP_WAIT_POLICY=passive` nor `KMP_BLOCKTIME=0` (unset: 200 ms of spinning). torch's native
    pool waits on a condition variable.
    """
    if runtime not in OPENMP_RUNTIMES:
        raise ValueError(f"runtime must be one of {OPENMP_RUNTIMES}, got {runtime!r}")
    environ = os.environ if environ is None else environ
    if runtime == "native":
        return None
    try:
        others = int(environ.get("OMP_NUM_THREADS", "").split(",")[0])
    except ValueError:  # unset (or unreadable): a team of every core
        others = cores
    if max(num_threads, others) <= 1:
        return None
    if environ.get("OMP_WAIT_POLICY", "").strip().lower() == "passive":
        return None
    if runtime == "intel" and environ.get("KMP_BLOCKTIME", "").strip() == "0":
        return None
    policy = environ.get("OMP_WAIT_POLICY")
    teams = (
        f"torch's {num_threads} intra-op threads" if num_threads > 1 else f"teams of {others} threads in comm threads"
    )
    return (
        f"{teams} ({runtime} OpenMP) spin after each parallel region "
        f"(OMP_WAIT_POLICY={'unset' if policy is None else policy}) and starve the comm threads: "
        "set OMP_WAIT_POLICY=PASSIVE (Intel OpenMP: or KMP_BLOCKTIME=0) and OMP_NUM_THREADS before the process starts"
    )


@functools.cache
def _spin_reason(num_threads: int) -> str | None:
    try:
        with open("/proc/self/maps") as f:
            loaded = f.read()
    except OSError:  # not Linux: judge by the parallel info alone
        loaded = ""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return spins(openmp_runtime(torch.__config__.parallel_info(), loaded), num_threads, cores=cores)


_warned: list[str] = []


def warn_if_spinning() -> str | None:
    """Warn (`RuntimeWarning`, one line, once per process) when `spins` finds this process's OpenMP
    threads spinning; returns the reason, or None. Cheap after the first call."""
    reason = _spin_reason(torch.get_num_threads())
    if reason is not None and not _warned:
        _warned.append(reason)
        warnings.warn(reason, RuntimeWarning, stacklevel=3)
    return reason
