"""The exchange protocol every carrier shares: what an exchange is, how ranks cross-check it, and
what a group's state is on this rank. Carriers (`gloo`, `nccl`, `window`) move the bytes;
`transport` owns the registry, the public entry points and the choice of carrier.

Owns:
- the options (timeout, emulated link, in-flight budget) and their per-call overrides;
- `Transfer`, one in-flight exchange (its send buffer, its result, its times);
- the header: a fixed 32 int64 record (op, exchange number, the shared parameters, rows and row
  width for the peer, the deferred-check flag) that every rank sends to every peer before any
  payload, `check_headers` that raises on every rank when ranks disagree, and the abort header
  (op ABORT, the error as text) that ends a stream of exchanges;
- `Lane`, one group's exchanges over one carrier on this rank: exchange numbers, abort epochs,
  where a peer's abort ended the stream, whether the group is broken, the emulated link's clock,
  and how a carrier's outcome becomes the transfer's result or error (`Lane.finish`).

Imports no carrier and not `transport`: carriers import it (no cycle).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import Tensor

from ..errors import CommError, CommTimeoutError
from . import staging

MAGIC = 0x4F564C50  # "OVLP": marks a comm_cmd_info written by this transport
HEADER_LEN = 32
OP_CODES = {"dispatch": 1, "combine": 2}
PARAM_FIELDS = (
    "ep_world_size", "moe_expert_num", "expert_shard_type", "shared_expert_num",
    "shared_expert_rank_num", "global_bs", "quant_mode", "comm_quant_mode", "comm_type",
    "hidden", "row_bytes", "dtype",
)  # fmt: skip
# `dtype` is the setup's input dtype (x for dispatch, expand_x for combine): ranks with bf16 and
# fp16 rows send the same row bytes, so without it a peer's rows would be misread silently.
DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.int8: 4}
_DTYPE_NAMES = {code: str(dtype).removeprefix("torch.") for dtype, code in DTYPE_CODES.items()}
_H_MAGIC, _H_OP, _H_SEQ, _H_ROWS, _H_LMAX, _H_BATCH = range(6)
_H_PARAMS = 6  # PARAM_FIELDS follow
_H_INVALID = staging.INVALID_SLOT  # set when a setup's deferred input check failed
OP_ABORT = 9  # an abort header: _H_ROWS holds the reason's length, its bytes fill _H_PARAMS up to _H_INVALID
_REASON_BYTES = (_H_INVALID - _H_PARAMS) * 8


# --------------------------------------------------------------------------------------------
# Options: emulated link, timeout, in-flight budget
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EmulatedLink:
    """A modelled link: an exchange completes `latency_s + bytes / bandwidth_bytes_per_s` after it
    starts, where bytes is the larger of what this rank sends to and receives from its peers.

    The data itself still moves at once; the exchange then completes no earlier than the model
    says, and what waits for it *sleeps*, so the wait uses no compute core, like the NPU's SDMA
    engine: the gloo carrier's worker thread, or, on the CPU window (which has no thread), the
    teardown itself (`Transfer.wait`). Exchanges of one group run one after another, as on one
    link. If the real transfer is slower than the model, the real time stands.
    """

    latency_s: float = 20e-6
    bandwidth_bytes_per_s: float = 1e9
    # True when `duration` may block (a test's gate holding an exchange open): the window carrier
    # then asks it on its link thread, not on the thread that waits for the exchange.
    blocking: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if not self.latency_s >= 0:
            raise ValueError(f"latency_s must be >= 0, got {self.latency_s}")
        if not self.bandwidth_bytes_per_s > 0:
            raise ValueError(f"bandwidth_bytes_per_s must be > 0, got {self.bandwidth_bytes_per_s}")

    def duration(self, nbytes: int) -> float:
        return self.latency_s + nbytes / self.bandwidth_bytes_per_s


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number of seconds, got {raw!r}") from None
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


@dataclass
class _Options:
    link: EmulatedLink | None = None
    timeout_s: float | None = None  # None: OVERLAP_TIMEOUT_S or DEFAULT_TIMEOUT_S
    max_in_flight: int = 2


DEFAULT_TIMEOUT_S = 300.0
_options = _Options()
_KEEP = "keep"
# Per-call overrides: context variables, so that they follow the caller into the threads a pipeline
# runs its ops on (`contextvars.copy_context().run(...)`), unlike a thread-local.
_timeout_override: contextvars.ContextVar[float | None] = contextvars.ContextVar("overlap_timeout_s", default=None)
_link_override: contextvars.ContextVar[EmulatedLink | None | str] = contextvars.ContextVar(
    "overlap_link", default=_KEEP
)


def configure(
    *,
    link: EmulatedLink | None | str = "keep",
    timeout_s: float | None | str = "keep",
    max_in_flight: int | None = None,
) -> None:
    """Set process-wide transport options (every rank should set the same).

    Args:
        link: an `EmulatedLink`, or None for the plain transport.
        timeout_s: seconds a teardown waits before `CommTimeoutError`; None restores the default
            (`OVERLAP_TIMEOUT_S`, else 300 s). A `comm_options(timeout_s=...)` block overrides it.
        max_in_flight: exchanges per op kind (dispatch, combine) and group set up but not yet
            torn down; the next setup raises `CapacityError` before communicating. Default 2, the
            double buffer (HCCL_BUFFSIZE's factor 2).
    """
    if link != "keep":
        if link is not None and not isinstance(link, EmulatedLink):
            raise TypeError(f"link must be an EmulatedLink or None, got {type(link).__name__}")
        _options.link = link
    if timeout_s != "keep":
        if timeout_s is not None and not timeout_s > 0:  # type: ignore[operator]
            raise ValueError(f"timeout_s must be > 0 or None, got {timeout_s}")
        _options.timeout_s = timeout_s  # type: ignore[assignment]
    if max_in_flight is not None:
        if isinstance(max_in_flight, bool) or not isinstance(max_in_flight, int) or max_in_flight < 1:
            raise ValueError(f"max_in_flight must be an int >= 1, got {max_in_flight!r}")
        _options.max_in_flight = max_in_flight


@contextlib.contextmanager
def comm_options(
    *,
    timeout_s: float | None = None,
    link: EmulatedLink | None | str = _KEEP,
) -> Iterator[None]:
    """Override options for the calls made inside the block (this context: the thread, and the
    threads that run copies of it, as the scheduler's microbatch workers do).

    Args:
        timeout_s: seconds a teardown (and the exchange itself) may take; None: no override.
        link: an `EmulatedLink`, or None for the plain transport, for the setups in the block;
            "keep": no override.

    A setup captures the effective timeout and link; its teardown, on any thread, uses them unless
    the teardown itself runs inside a `comm_options(timeout_s=...)` block.
    """
    if timeout_s is not None and not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    if link != _KEEP and link is not None and not isinstance(link, EmulatedLink):
        raise TypeError(f"link must be an EmulatedLink, None or 'keep', got {type(link).__name__}")
    timeout_token = _timeout_override.set(timeout_s) if timeout_s is not None else None
    link_token = _link_override.set(link) if link != _KEEP else None
    try:
        yield
    finally:
        if link_token is not None:
            _link_override.reset(link_token)
        if timeout_token is not None:
            _timeout_override.reset(timeout_token)


def current_timeout() -> float:
    """The timeout a setup made here would use: comm_options, else configure, else
    `OVERLAP_TIMEOUT_S`, else 300 s. Raises `ValueError` for a bad `OVERLAP_TIMEOUT_S`."""
    override = _timeout_override.get()
    if override is not None:
        return override
    if _options.timeout_s is not None:
        return _options.timeout_s
    return _env_float("OVERLAP_TIMEOUT_S", DEFAULT_TIMEOUT_S)


def teardown_timeout() -> float | None:
    """A teardown's own override (`comm_options(timeout_s=...)` around it), else None: the
    transfer's timeout, captured at its setup."""
    return _timeout_override.get()


def current_link() -> EmulatedLink | None:
    """The link a setup made here would use: comm_options, else configure."""
    override = _link_override.get()
    return _options.link if override == _KEEP else override  # type: ignore[return-value]


def max_in_flight() -> int:
    """Exchanges of one kind that may be in flight per group (`configure(max_in_flight=...)`)."""
    return _options.max_in_flight


# --------------------------------------------------------------------------------------------
# Groups
# --------------------------------------------------------------------------------------------


def resolve_group(group_ep: str, ep_world_size: int, ep_rank_id: int) -> dist.ProcessGroup:
    """The `torch.distributed` process group named `group_ep`, checked against W and the rank."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is not initialised: call dist.init_process_group(...) and pass "
            "group_ep=<group>.group_name"
        )
    try:
        group = dist.distributed_c10d._resolve_process_group(group_ep)  # type: ignore[arg-type]
    except Exception as exc:  # torch raises ValueError or RuntimeError depending on the version
        raise ValueError(
            f"group_ep must name a torch.distributed process group (its group_name), got {group_ep!r}"
        ) from exc
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    if size != ep_world_size:
        raise ValueError(f"ep_world_size must equal the size of group {group_ep!r} ({size}), got {ep_world_size}")
    if rank != ep_rank_id:
        raise ValueError(f"ep_rank_id must equal this process's rank in group {group_ep!r} ({rank}), got {ep_rank_id}")
    return group


# --------------------------------------------------------------------------------------------
# Transfers
# --------------------------------------------------------------------------------------------


@dataclass(eq=False)
class Transfer:
    """One in-flight exchange. Owns its send buffer and, once landed, what it received.

    Created by `start`; found again by a teardown through the ticket in `comm_cmd_info`; consumed
    once by `take`. Its times (`time.perf_counter`) show when the link carried it. `seq` is the
    exchange number on its group, given when its carrier starts it (-1 until then).
    """

    ticket: int
    op: str
    group_name: str
    seq: int
    header: Tensor  # (HEADER_LEN,) int64, this rank's header (rows field per peer set at send)
    send_buf: Tensor  # (N, row_bytes) uint8, private
    send_rows: list[int] | None  # rows to each peer (None: resolved from block_counts on the worker)
    block_counts: Tensor  # (W, L_max) int64 rows per (peer, its local expert); on cpu once resolved
    label: str = ""
    timeout_s: float = DEFAULT_TIMEOUT_S
    link: EmulatedLink | None = None  # captured at setup
    epoch: int = 0  # the group's abort epoch this transfer was set up in (see `abort`)
    cancelled: bool = False  # set by `abort`: the worker drops its result
    abort_reason: str = ""  # why (sent to the peers if the worker had not started it)
    issued_at: float = field(default_factory=time.perf_counter)
    started_at: float | None = None
    finished_at: float | None = None
    # Carriers that model the link where the exchange is waited for (window): when it completes.
    link_done_at: float | None = None
    link_bytes: int = 0  # threaded carriers: the larger of the bytes sent and received, for the link model
    # A link modelled on a device stream (`Lane.hold_on_link`): its modelled end, on the host clock,
    # where its link interval ends (the host moved on before the stream got there).
    device_link_end: float | None = None
    delivered: set[int] = field(default_factory=set)
    _done: threading.Event = field(default_factory=threading.Event)
    _result: tuple[Tensor, Tensor] | None = None
    _error: BaseException | None = None
    ready_event: object | None = None  # CUDA: recorded on the setup's stream after staging
    done_event: object | None = None  # CUDA: recorded on the comm stream when the rows landed
    plan: staging.ExchangePlan | None = None  # transport kind and deferred checks (staging.py)
    # A carrier without a thread (window) completes the exchange on the waiting thread:
    # `complete(transfer, timeout_s)` returns once it finished it (or raises CommTimeoutError).
    complete: Any = None
    lane: Any = None  # the `Lane` carrying it
    # Set by a carrier that lends the received rows (a pooled buffer, or its window): gives them back.
    _give_back: Any = None
    wants_chunks: bool = False  # set by `take_chunks`: the carrier may lend views instead of a copy
    chunks: list[Tensor] | None = None  # the lent views, one per source rank, in rank order
    counts_probe: Any = None  # window carrier, device setup: (landed event, host counts, host check flags)
    early_rows: set[int] = field(default_factory=set)  # window: peers sent the whole buffer before the counts

    @property
    def is_complete(self) -> bool:
        """True once the exchange has landed (or failed) and its modelled link time is over; never
        blocks."""
        if not self._done.is_set():
            return False
        return self.link_done_at is None or self._error is not None or time.perf_counter() >= self.link_done_at

    @property
    def nbytes(self) -> int:
        return int(self.send_buf.numel())

    def wait(self, timeout_s: float | None = None) -> None:
        """Block until the exchange lands; raise its error, or `CommTimeoutError` after the timeout."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        if self.complete is not None and not self._done.is_set():
            self.complete(self, timeout)
        if not self._done.wait(timeout):
            where = f" ({self.label})" if self.label else ""
            hint = "(set OVERLAP_TIMEOUT_S or comm_options(timeout_s=...) to wait longer)"
            if self.started_at is None:  # never reached the link: an earlier exchange holds the worker
                raise CommTimeoutError(
                    f"{self.op}_teardown{where} on group {self.group_name!r} timed out after {timeout:g} s while "
                    f"still queued behind an earlier exchange of the group that has not completed {hint}"
                )
            world = self.block_counts.shape[0]
            missing = sorted(set(range(world)) - self.delivered)
            raise CommTimeoutError(
                f"{self.op}_teardown{where} on group {self.group_name!r} timed out after {timeout:g} s: "
                f"ranks {missing} have not delivered {hint}"
            )
        if self._error is not None:
            raise self._error
        if self.link_done_at is not None:  # the rows are here; the modelled link is not done yet
            delay = self.link_done_at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)

    def take(self, timeout_s: float | None = None) -> tuple[Tensor, Tensor]:
        """Wait, then hand over `(recv rows (M, row_bytes) uint8, recv counts (W, L_max) int64)`."""
        self.wait(timeout_s)
        staging.hand_over(self)  # CUDA: the caller's stream waits for the landed rows and keeps them alive
        assert self._result is not None  # internal invariant: set with _done and no error
        return self._result

    def take_chunks(self, timeout_s: float | None = None) -> tuple[list[Tensor], Tensor]:
        """Like `take`, but the rows come as one `(M_r, row_bytes)` tensor per source rank, in rank
        order (their concatenation is `take`'s rows). A carrier may lend them without copying (the
        window carrier: views of its window); call `release` once done with them."""
        self.wants_chunks = True
        rows, counts = self.take(timeout_s)
        return (self.chunks if self.chunks is not None else [rows]), counts

    def release(self) -> None:
        """The caller is done with the received rows (`take`'s result): a carrier that lent them
        from a pool (window) may reuse the buffer. Optional; the rows must not be used after it."""
        give_back, self._give_back = self._give_back, None
        if give_back is not None:
            self._result, self.chunks = None, None
            give_back()

    def __await__(self):  # awaitable without blocking the event loop
        import asyncio

        loop = asyncio.get_running_loop()
        return loop.run_in_executor(None, self.wait).__await__()


# --------------------------------------------------------------------------------------------
# Headers
# --------------------------------------------------------------------------------------------


class _ParameterMismatch(CommError):
    """Ranks called the same exchange with different parameters or in a different op order."""


class _StreamAborted(CommError):
    """A peer sent an abort header where this rank's exchange expected its header."""

    def __init__(self, message: str, seq: int, aborters: dict[int, str]) -> None:
        super().__init__(message)
        self.seq, self.aborters = seq, aborters


class _Refused(CommError):
    """An exchange the worker did not run: its group is broken, or its epoch was aborted."""


@dataclass(frozen=True)
class Ended:
    """Where the stream of an epoch ended: the exchange number and who aborted there, with why."""

    seq: int
    aborters: dict[int, str]

    def describe(self, group_name: str) -> str:
        who = "; ".join(f"rank {r}: {why}" for r, why in sorted(self.aborters.items()))
        ranks = sorted(self.aborters)
        names = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks}"
        return f"group {group_name!r} was aborted by {names} at exchange #{self.seq} ({who})"


@dataclass(eq=False)
class AbortMarker:
    """Queued by `abort`: ends this rank's epoch `epoch` on the worker (see `_GroupWorker`)."""

    epoch: int
    reason: str
    timeout_s: float
    done: threading.Event = field(default_factory=threading.Event)


def where(transfer: Transfer) -> str:
    return f" ({transfer.label})" if transfer.label else ""


def make_abort_header(seq: int, reason: str) -> Tensor:
    header = torch.zeros(HEADER_LEN, dtype=torch.int64)
    header[_H_MAGIC], header[_H_OP], header[_H_SEQ] = MAGIC, OP_ABORT, seq
    data = reason.encode("utf-8", "replace")[:_REASON_BYTES]
    header[_H_ROWS] = len(data)
    padded = data + b"\0" * (-len(data) % 8)
    if padded:
        words = torch.frombuffer(bytearray(padded), dtype=torch.int64)
        header[_H_PARAMS : _H_PARAMS + words.numel()] = words
    return header


def decode_reason(header: Tensor) -> str:
    length = max(0, min(int(header[_H_ROWS]), _REASON_BYTES))
    raw = header[_H_PARAMS:].contiguous().numpy().tobytes()[:length]
    return raw.decode("utf-8", "replace")


class _InvalidInput(_ParameterMismatch, ValueError):
    """This rank's setup input failed a check deferred to the transport's thread (device tensors)."""


def check_headers(transfer: Transfer, headers: dict[int, Tensor], me: int) -> None:
    tensors = headers
    mine = transfer.header.tolist()  # host ints: one conversion per header, not one per field read
    headers = {r: h.tolist() for r, h in tensors.items()}  # type: ignore[misc]
    aborters = {
        r: decode_reason(tensors[r])
        for r, h in headers.items()
        if int(h[_H_MAGIC]) == MAGIC and int(h[_H_OP]) == OP_ABORT
    }
    if aborters:  # every rank sees the same aborts at this number: no payload moves anywhere
        ended = Ended(int(mine[_H_SEQ]), aborters)
        raise _StreamAborted(
            f"{transfer.op} exchange{where(transfer)} failed: {ended.describe(transfer.group_name)}",
            ended.seq,
            aborters,
        )
    if transfer.plan is not None and transfer.plan.error is not None:
        raise _InvalidInput(str(transfer.plan.error))  # the peers saw the flag in our header too
    for r in sorted(headers):
        theirs = headers[r]
        if int(theirs[_H_INVALID]):
            raise _ParameterMismatch(
                f"rank {r} gave {transfer.op}_setup invalid input (a check made on the "
                f"transport's thread; rank {r} raises its ValueError); no rows moved"
            )
        if int(theirs[_H_MAGIC]) != MAGIC:
            raise _ParameterMismatch(
                f"rank {r} sent no overlap header on group {transfer.group_name!r}: another "
                f"collective ran on the group during an exchange"
            )
        if int(theirs[_H_OP]) != int(mine[_H_OP]) or int(theirs[_H_SEQ]) != int(mine[_H_SEQ]):
            names = {v: k for k, v in OP_CODES.items()}
            raise _ParameterMismatch(
                f"ranks disagree on op order on group {transfer.group_name!r}: rank {me} is at exchange "
                f"#{int(mine[_H_SEQ])} ({names.get(int(mine[_H_OP]), '?')}), rank {r} at #{int(theirs[_H_SEQ])} "
                f"({names.get(int(theirs[_H_OP]), '?')})"
            )
        for i, name in enumerate(PARAM_FIELDS):
            a, b = int(mine[_H_PARAMS + i]), int(theirs[_H_PARAMS + i])
            if a != b:
                shown = f" ({_DTYPE_NAMES.get(a, a)} vs {_DTYPE_NAMES.get(b, b)})" if name == "dtype" else ""
                raise _ParameterMismatch(
                    f"ranks disagree on {name} on group {transfer.group_name!r}: rank {me} "
                    f"has {a}, rank {r} has {b}{shown}; it must be the same on all ranks"
                )
        if int(mine[_H_PARAMS + PARAM_FIELDS.index("global_bs")]) == 0:
            a, b = int(mine[_H_BATCH]), int(theirs[_H_BATCH])
            if a != b:
                raise _ParameterMismatch(
                    f"global_bs = 0 needs the same BS on all ranks, got BS = {a} on rank {me} "
                    f"and {b} on rank {r}; pass global_bs = max_bs * ep_world_size"
                )


def make_header(op: str, params_values: dict[str, int], batch: int, lmax: int) -> Tensor:
    words = [0] * HEADER_LEN  # built as a list: one tensor from it, not 30 element writes
    words[_H_MAGIC], words[_H_OP], words[_H_LMAX], words[_H_BATCH] = MAGIC, OP_CODES[op], lmax, batch
    for i, name in enumerate(PARAM_FIELDS):
        words[_H_PARAMS + i] = int(params_values[name])
    return torch.tensor(words, dtype=torch.int64)


def wire_device(group: dist.ProcessGroup, device: torch.device | None) -> torch.device:
    """Where the group's messages must live: the device for NCCL, the host for gloo (which also
    carries device exchanges, staged through host buffers)."""
    if dist.get_backend(group) != "nccl":
        return torch.device("cpu")
    return device if device is not None and device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())


def reason_text(error: BaseException | str | None) -> str:
    if error is None:
        return "aborted"
    if isinstance(error, str):
        return error
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


ParameterMismatch = _ParameterMismatch
StreamAborted = _StreamAborted
Refused = _Refused
InvalidInput = _InvalidInput


# --------------------------------------------------------------------------------------------
# A group's exchanges over one carrier
# --------------------------------------------------------------------------------------------


class Lane:
    """One group's exchanges over one carrier on this rank: the protocol state every carrier shares.

    Exchange numbers (`next_seq`) are given in setup order (by a threaded carrier when its thread
    starts the exchange, by the window carrier at the setup), so a refused setup takes none. The
    stream of exchanges is cut by aborts (`transport.abort`): at the first exchange number where any
    rank aborts, every rank's stream of that epoch ends; the rest of the epoch fails locally, without
    communicating; the next epoch starts after this rank's own abort (`close_epoch`).
    """

    kind = ""

    def __init__(self, group: dist.ProcessGroup, group_name: str) -> None:
        self.group = group
        self.group_name = group_name
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.peers = [dist.get_global_rank(group, r) for r in range(self.world)]
        self.lock = threading.Lock()  # guards the state below against setups, teardowns and aborts
        self.next_seq = 0
        self.epoch = 0  # epoch of new setups: + 1 at every local abort
        self.stream_epoch = 0  # epoch of the exchanges the carrier runs now
        self.ended: Ended | None = None  # the stream of `stream_epoch` ended at an abort
        self.broken: BaseException | None = None  # the first failure that left the group unusable
        self.pending: set[Transfer] = set()  # submitted, not yet finished
        self.issued_in_epoch = 0
        self.last_abort: int | None = None  # id() of the error of the last abort, while nothing was issued since
        self.device = torch.device("cpu")
        self.link_free_at = 0.0

    # -- the carrier's part --

    def check_fits(self, transfer: Transfer) -> None:
        """Raise `ValueError` if `transfer` cannot travel on this carrier (before any state changes)."""

    def submit(self, transfer: Transfer) -> None:  # pragma: no cover - every carrier overrides it
        """Start `transfer` (called with `lock` held, after the refusals)."""
        raise NotImplementedError

    def close_epoch(self, epoch: int, reason: str, timeout_s: float) -> None:  # pragma: no cover
        """This rank's abort of `epoch` (called with `lock` held, after `epoch` was bumped)."""
        raise NotImplementedError

    def flush(self, wait_s: float) -> None:
        """Wait (at most `wait_s`) until the carrier has run everything submitted so far."""

    def stop(self) -> None:
        """Retire the lane (its thread, its shared memory); in-flight transfers are abandoned."""

    def join(self, timeout_s: float) -> None:
        """Wait for the lane's thread, if any, after `stop`."""

    # -- shared --

    def unusable_error(self) -> CommError:
        """The error a use of a broken group raises (never nested: it quotes the first failure)."""
        hint = (
            "the group's gloo/NCCL connections cannot be trusted any more: call overlap.ops.recover(group) on "
            "every surviving rank and use the group it returns (see docs/faults.md)"
        )
        return CommError(f"group {self.group_name!r} is unusable after an earlier failure ({self.broken}); {hint}")

    def refusal(self) -> CommError | None:
        """Why a setup must be refused now (call with `lock` held), or None."""
        if self.broken is not None:
            return self.unusable_error()
        if self.ended is not None and self.stream_epoch == self.epoch:
            return CommError(
                f"{self.ended.describe(self.group_name)}; every exchange of that epoch was cancelled: "
                f"call overlap.ops.abort({self.group_name!r}, error) on this rank to go on (an "
                f"overlap.scheduler context does it when it exits with the error)"
            )
        return None

    def outcome(self, transfer: Transfer, exc: BaseException) -> BaseException:
        """The error a failed exchange gives its teardown; records what it did to the group."""
        if isinstance(exc, _StreamAborted):  # a peer aborted at this number: every rank's stream ends here
            with self.lock:
                if self.ended is None or self.ended.seq > exc.seq:
                    self.ended = Ended(exc.seq, exc.aborters)
            return CommError(str(exc))
        if isinstance(exc, _ParameterMismatch):
            return exc  # every rank stopped after the headers: the group stays usable
        if isinstance(exc, _Refused):
            return CommError(str(exc))
        if isinstance(exc, (CommError, CommTimeoutError)):
            with self.lock:
                self.broken = self.broken or exc
            return exc
        error = CommError(f"{transfer.op} exchange on group {self.group_name!r} failed: {exc}")
        error.__cause__ = exc
        with self.lock:
            self.broken = self.broken or error
        return error

    def finish(self, transfer: Transfer, result: tuple[Tensor, Tensor] | None, error: BaseException | None) -> None:
        """Hand the outcome to the transfer (unless `abort` cancelled it) and retire it."""
        transfer.finished_at = max(time.perf_counter(), transfer.device_link_end or 0.0)
        with self.lock:
            if not transfer.cancelled and not transfer._done.is_set():
                transfer._result, transfer._error = result, error
                transfer._done.set()
            self.pending.discard(transfer)

    def hold_on_link(self, transfer: Transfer, nbytes: int, stream: Any = None) -> None:
        """The emulated link: the exchange completes no earlier than its start + the modelled
        duration of `nbytes`, one exchange after another on this lane.

        Without `stream` (host memory) this returns only then, sleeping (no core is used). With the
        transport's CUDA `stream`, it returns at once: the rest of the modelled time is a spin
        kernel queued on that stream (`staging.hold_stream`), and the transfer's done event, which
        the teardown's stream waits on, is recorded after it. So neither the host nor the compute
        stream is held by the model: only what the teardown orders after the exchange waits, on
        the device, as it would for a real link's transfer.
        """
        link = transfer.link
        if link is None:
            return
        start = max(transfer.started_at or 0.0, self.link_free_at)
        done_at = start + link.duration(nbytes)
        delay = done_at - time.perf_counter()
        if stream is not None:
            transfer.done_event = staging.hold_stream(stream, delay)
            transfer.device_link_end = done_at
            self.link_free_at = done_at
            return
        if delay > 0:
            time.sleep(delay)
        self.link_free_at = max(done_at, time.perf_counter())
