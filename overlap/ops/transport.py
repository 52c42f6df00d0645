"""The portable transport under the split ops: fire-and-forget exchanges over torch.distributed.

Owns: one ordered worker per process group that carries every exchange of that group; the
in-flight `Transfer` handles and their registry (tickets); the header that lets every rank check
every other rank's parameters and op order before any payload moves; bounded waits; the in-flight
budget; the emulated link; and what happens on a fault (abort, agreement, recovery, the library's
own collectives). Never computes layouts or touches the ops' semantics.

One exchange (a setup's send, completed by its teardown) is::

    setup (caller thread):   stage rows into a private send buffer -> Transfer -> worker queue
    worker (one per group):  phase 1  header to / from every peer  (fixed 32 int64: op, seq,
                                      the shared parameters, rows and row width for that peer)
                             check    every peer's header equals ours -> else raise on all ranks
                             phase 2  payload to / from every peer  (block counts + rows)
                             link     emulated: complete no earlier than start + latency +
                                      max(bytes out, bytes in) / bandwidth (sleeping: no core used)
    teardown (caller):       wait (bounded) -> received rows and counts, owned by the Transfer

All exchanges of a group go through its single worker in setup order, so every rank issues its
collectives in the same order however the caller interleaves setups, teardowns and compute. Do not
run other collectives on a group while one of its exchanges is in flight; the library's own
(`collective`, `settle`) wait bounded and raise only our errors (on gloo, point-to-point messages
and collectives travel on separate tags).

Faults (docs/faults.md)::

    abort(group, error)      cancel this rank's exchanges of the group; the worker sends an abort
                             header (op ABORT, the error as text) at its next exchange number
    peers                    their exchange at that number sees the abort header instead of a
                             header -> CommError naming the rank and its error; no payload moves
                             on any rank; the rest of their epoch fails locally, without talking
    every rank's abort       the epoch ends at the first number where anyone aborted, the same on
                             every rank; the next epoch numbers on from there: the group is usable
    settle(group, error)     at the end of a unit every rank runs: abort if failed, then one
                             all_gather so that ranks that did not fail learn of it and abort too
    timeout / dead peer      gloo closes the pair: the group is broken -> recover(group) builds
                             a new one (dist.new_group) for the survivors

No gloo operation is ever cancelled: a posted receive always gets the message it waits for (a
header, or an abort header in its place), so the streams between ranks never fall out of step.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import os
import queue
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..errors import CapacityError, CommError, CommTimeoutError, HandleError, OverlapError
from . import staging

MAGIC = 0x4F564C50  # "OVLP": marks a comm_cmd_info written by this transport
HEADER_LEN = 32
OP_CODES = {"dispatch": 1, "combine": 2}
PARAM_FIELDS = (
    "ep_world_size", "moe_expert_num", "expert_shard_type", "shared_expert_num",
    "shared_expert_rank_num", "global_bs", "quant_mode", "comm_quant_mode", "comm_type",
    "hidden", "row_bytes",
)  # fmt: skip
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

    The data itself still moves at once (over gloo); the worker then *sleeps* until the modelled
    completion, so the wait uses no compute core, like the NPU's SDMA engine. Exchanges of one
    group run one after another, as on one link. If the real transfer is slower than the model,
    the real time stands.
    """

    latency_s: float = 20e-6
    bandwidth_bytes_per_s: float = 1e9

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
    exchange number on its group, given when the worker starts it (-1 until then).
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
    delivered: set[int] = field(default_factory=set)
    _done: threading.Event = field(default_factory=threading.Event)
    _result: tuple[Tensor, Tensor] | None = None
    _error: BaseException | None = None
    ready_event: object | None = None  # CUDA: recorded on the setup's stream after staging
    done_event: object | None = None  # CUDA: recorded on the comm stream when the rows landed
    plan: staging.ExchangePlan | None = None  # transport kind and deferred checks (staging.py)

    @property
    def is_complete(self) -> bool:
        """True once the exchange has landed (or failed); never blocks."""
        return self._done.is_set()

    @property
    def nbytes(self) -> int:
        return int(self.send_buf.numel())

    def wait(self, timeout_s: float | None = None) -> None:
        """Block until the exchange lands; raise its error, or `CommTimeoutError` after the timeout."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
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

    def take(self, timeout_s: float | None = None) -> tuple[Tensor, Tensor]:
        """Wait, then hand over `(recv rows (M, row_bytes) uint8, recv counts (W, L_max) int64)`."""
        self.wait(timeout_s)
        staging.hand_over(self)  # CUDA: the caller's stream waits for the landed rows and keeps them alive
        assert self._result is not None  # internal invariant: set with _done and no error
        return self._result

    def __await__(self):  # awaitable without blocking the event loop
        import asyncio

        loop = asyncio.get_running_loop()
        return loop.run_in_executor(None, self.wait).__await__()


_registry: dict[int, Transfer] = {}
_registry_lock = threading.Lock()
_last_ticket = 0  # tickets are 1, 2, ...; under _registry_lock
_cancelled: dict[int, str] = {}  # ticket -> why `abort` cancelled it (the most recent _CANCELLED_KEPT)
_CANCELLED_KEPT = 4096
_NONCE = int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF  # marks this process's comm_cmd_info


def in_flight(group_name: str | None = None) -> list[Transfer]:
    """Transfers set up and not yet torn down (of one group, or all), oldest first."""
    with _registry_lock:
        return [t for t in _registry.values() if group_name is None or t.group_name == group_name]


def _group_tag(group_name: str) -> int:
    return zlib.crc32(group_name.encode()) & 0x7FFFFFFF


def _check_word(values: list[int]) -> int:
    data = b"".join(int(v).to_bytes(8, "little", signed=True) for v in values)  # host ints: no tensor read
    return zlib.crc32(data) & 0x7FFFFFFF


def write_ticket(comm_cmd_info: Tensor, transfer: Transfer) -> None:
    """Record the ticket in the setup's `comm_cmd_info` (a host tensor: see `read_ticket`).

    Words 0..5: magic, ticket, op code, the group's tag, this process's nonce, a check word over
    the five: a teardown can tell a copy of a real handle from a forged or foreign one.
    """
    head = [MAGIC, transfer.ticket, OP_CODES[transfer.op], _group_tag(transfer.group_name), _NONCE]
    comm_cmd_info[:6] = torch.tensor([*head, _check_word(head)], dtype=torch.int32)


def read_ticket(comm_cmd_info: Tensor, op: str) -> int:
    """The ticket inside a setup's `comm_cmd_info`, checked; `HandleError` if it holds none or one
    this process never issued. Reads host memory only: the portable setups keep `comm_cmd_info` on
    the host (a device tensor given here is read, which waits for its stream)."""
    head = comm_cmd_info[:6].tolist() if comm_cmd_info.numel() >= 6 else []
    if len(head) < 6 or head[0] != MAGIC:
        raise HandleError(f"comm_cmd_info was not returned by {op}_setup: {op}_teardown without its setup")
    if head[4] != _NONCE or head[5] != _check_word(head[:5]):
        raise HandleError(
            f"comm_cmd_info names ticket {head[1]}, which this process never issued (forged, "
            f"corrupted, or from another process): pass the comm_cmd_info {op}_setup returned"
        )
    return int(head[1])


def claim(comm_cmd_info: Tensor, op: str, group_name: str | None = None) -> Transfer:
    """Find and remove the transfer a teardown on `group_name` completes; `HandleError` on any
    misuse (nothing is removed then), `CommError` if `abort` cancelled it."""
    ticket = read_ticket(comm_cmd_info, op)
    with _registry_lock:
        transfer = _registry.get(ticket)
        if transfer is None:
            if ticket in _cancelled:
                raise CommError(
                    f"{op}_teardown: ticket {ticket} was cancelled by overlap.ops.abort "
                    f"({_cancelled[ticket]}); its exchange will not complete: set up again"
                )
            if not 0 < ticket <= _last_ticket:
                raise HandleError(
                    f"comm_cmd_info names ticket {ticket}, which this process never issued: pass the "
                    f"comm_cmd_info {op}_setup returned"
                )
            raise HandleError(f"comm_cmd_info ticket {ticket} was already torn down (a teardown runs once per setup)")
        if transfer.op != op:
            raise HandleError(f"{op}_teardown was given the comm_cmd_info of a {transfer.op}_setup (ticket {ticket})")
        if group_name is not None and transfer.group_name != group_name:
            raise HandleError(
                f"{op}_teardown on group {group_name!r} was given the comm_cmd_info of an exchange on "
                f"group {transfer.group_name!r} (ticket {ticket}): tear it down on its own group"
            )
        del _registry[ticket]
    return transfer


# --------------------------------------------------------------------------------------------
# The worker
# --------------------------------------------------------------------------------------------


class _GroupWorker:
    """Carries one group's exchanges, in order, on one daemon thread.

    Exchange numbers (`seq`) are given here, when an exchange starts, so a setup refused before
    reaching the worker takes none. The stream of exchanges is cut by aborts (`abort`): at the
    first exchange number where any rank sends an abort header, every rank's stream of that epoch
    ends; the rest of the epoch fails locally, without communicating, and the next epoch (after
    this rank's own `abort`, an `_AbortMarker` in the queue) goes on from the next number.
    """

    def __init__(self, group: dist.ProcessGroup, group_name: str) -> None:
        self.group = group
        self.group_name = group_name
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.peers = [dist.get_global_rank(group, r) for r in range(self.world)]
        self.lock = threading.Lock()  # guards the state below against setups and aborts
        self.next_seq = 0  # worker thread only
        self.epoch = 0  # epoch of new setups: + 1 at every local abort
        self.stream_epoch = 0  # epoch of the exchanges the worker runs now
        self.ended: _Ended | None = None  # the stream of `stream_epoch` ended at an abort
        self.broken: BaseException | None = None  # the first failure that left the group unusable
        self.pending: set[Transfer] = set()  # submitted, not yet finished
        self.issued_in_epoch = 0
        self.last_abort: int | None = None  # id() of the error of the last abort, while nothing was issued since
        self.device = torch.device("cpu")
        self.queue: queue.SimpleQueue[Transfer | _AbortMarker | threading.Event | None] = queue.SimpleQueue()
        self.link_free_at = 0.0
        self.side_stream: torch.cuda.Stream | None = None
        self.thread = threading.Thread(target=self._loop, name=f"overlap-comm-{group_name}", daemon=True)
        self.thread.start()

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

    def _loop(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            if isinstance(item, threading.Event):  # group_status(wait_s=...): everything before ran
                item.set()
                continue
            if isinstance(item, _AbortMarker):
                self._close_epoch(item)
                continue
            transfer = item
            transfer.started_at = time.perf_counter()
            result: tuple[Tensor, Tensor] | None = None
            error: BaseException | None = None
            try:
                if self.broken is not None:
                    raise _Refused(str(self.unusable_error()))
                if self.ended is not None:  # the stream of this epoch ended at an abort: no exchange
                    raise _Refused(
                        f"{transfer.op} exchange{_where(transfer)} cancelled: {self.ended.describe(self.group_name)}"
                    )
                transfer.seq = self.next_seq
                self.next_seq += 1
                transfer.header[_H_SEQ] = transfer.seq
                self.device = transfer.send_buf.device
                if transfer.cancelled:  # its own abort: tell every peer at this exchange number
                    aborters = self._abort_exchange(transfer.seq, transfer.abort_reason, transfer.timeout_s)
                    with self.lock:
                        self.ended = _Ended(transfer.seq, aborters)
                else:
                    result = self._run_on_device(transfer)
            except _StreamAborted as exc:  # a peer aborted at this number: every rank's stream ends here
                with self.lock:
                    self.ended = _Ended(exc.seq, exc.aborters)
                error = CommError(str(exc))
            except _ParameterMismatch as exc:
                error = exc  # every rank stopped after the headers: the group stays usable
            except _Refused as exc:
                error = CommError(str(exc))
            except (CommError, CommTimeoutError) as exc:
                error = exc
                with self.lock:
                    self.broken = self.broken or exc
            except BaseException as exc:  # surfaces on the teardown, with the cause chained
                error = CommError(f"{transfer.op} exchange on group {self.group_name!r} failed: {exc}")
                error.__cause__ = exc
                with self.lock:
                    self.broken = self.broken or error
            transfer.finished_at = time.perf_counter()
            with self.lock:
                if not transfer.cancelled:
                    transfer._result, transfer._error = result, error
                    transfer._done.set()
                self.pending.discard(transfer)

    def _close_epoch(self, marker: _AbortMarker) -> None:
        """This rank's abort of `marker.epoch`: tell the peers unless the stream already ended (or
        the group is broken), then let the next epoch run from the next exchange number."""
        if self.broken is None and self.ended is None:
            seq = self.next_seq
            self.next_seq += 1
            try:
                self._abort_exchange(seq, marker.reason, marker.timeout_s)
            except BaseException as exc:  # a peer is dead or silent: nobody can agree any more
                error = CommError(
                    f"the abort of group {self.group_name!r} at exchange #{seq} could not reach every rank: {exc}"
                )
                error.__cause__ = exc
                with self.lock:
                    self.broken = self.broken or error
        with self.lock:
            self.stream_epoch = marker.epoch + 1
            self.ended = None
        marker.done.set()

    def _abort_exchange(self, seq: int, reason: str, timeout_s: float) -> dict[int, str]:
        """Send an abort header (exchange `seq`, the reason as text) to every peer and receive
        theirs; no payload follows on any rank. Returns `{rank: reason}` of every rank that
        aborted at this number (this one included)."""
        header = make_abort_header(seq, reason)
        probe = Transfer(
            ticket=0,
            op="abort",
            group_name=self.group_name,
            seq=seq,
            header=header,
            send_buf=torch.empty(0, 1, dtype=torch.uint8),
            send_rows=[0] * self.world,
            block_counts=torch.zeros(self.world, 1, dtype=torch.int64),
            timeout_s=timeout_s,
        )
        outs = {r: header.clone() for r in range(self.world) if r != self.rank}
        ins = {r: torch.empty(HEADER_LEN, dtype=torch.int64) for r in outs}
        device = _wire_device(self.group, self.device)
        if device.type != "cpu":  # NCCL moves device tensors only
            outs = {r: h.to(device) for r, h in outs.items()}
            ins = {r: h.to(device) for r, h in ins.items()}
        probe.delivered = {self.rank}
        self._p2p(outs, ins, probe, time.perf_counter() + timeout_s)
        aborters = {self.rank: reason}
        for r, h in ins.items():
            h = h.cpu()
            if int(h[_H_MAGIC]) == MAGIC and int(h[_H_OP]) == OP_ABORT:
                aborters[r] = _decode_reason(h)
        return aborters

    def _run_on_device(self, transfer: Transfer) -> tuple[Tensor, Tensor]:
        """CPU: exchange on this thread. CUDA: on a side stream that first waits for the setup's
        staging (`ready_event`), then records `done_event` for the teardown's stream to wait on;
        staged through pinned host buffers over gloo (see `staging.run`)."""
        if self.side_stream is None and transfer.send_buf.device.type == "cuda":
            self.side_stream = torch.cuda.Stream(device=transfer.send_buf.device)
        side_stream = self.side_stream if transfer.send_buf.device.type == "cuda" else None
        return staging.run(transfer, self._exchange, side_stream)

    # -- phases --

    def _p2p(self, sends: dict[int, Tensor], recvs: dict[int, Tensor], transfer: Transfer, deadline: float) -> None:
        ops = [dist.P2POp(dist.irecv, buf, self.peers[r], self.group) for r, buf in recvs.items()]
        ops += [dist.P2POp(dist.isend, buf, self.peers[r], self.group) for r, buf in sends.items()]
        if not ops:
            return
        works = dist.batch_isend_irecv(ops)
        recv_peers = list(recvs)
        send_peers = list(sends)
        where = f" ({transfer.label})" if transfer.label else ""
        for i, work in enumerate(works):
            remaining = deadline - time.perf_counter()
            peer = recv_peers[i] if i < len(recv_peers) else None
            missing = sorted(set(recv_peers) - transfer.delivered)
            try:
                ok = work.wait(timedelta(seconds=max(remaining, 0.001)))
            except Exception as exc:
                if time.perf_counter() >= deadline - 0.01:  # gloo raises when its wait times out (ms granularity)
                    raise CommTimeoutError(
                        f"{transfer.op} exchange{where} on group {self.group_name!r} timed out after "
                        f"{transfer.timeout_s:g} s: ranks {missing} have not delivered ({exc})"
                    ) from exc
                who = (
                    f"receiving from rank {peer}"
                    if peer is not None
                    else f"sending to rank {send_peers[i - len(recv_peers)]}"
                )
                raise CommError(
                    f"{transfer.op} exchange{where} on group {self.group_name!r}: {who} failed ({exc}); "
                    f"ranks {missing} have not delivered"
                ) from exc
            if ok is False:
                raise CommTimeoutError(
                    f"{transfer.op} exchange{where} on group {self.group_name!r} timed out after "
                    f"{transfer.timeout_s:g} s: ranks {missing} have not delivered"
                )
            if peer is not None:
                transfer.delivered.add(peer)

    def _exchange(self, transfer: Transfer) -> tuple[Tensor, Tensor]:
        deadline = time.perf_counter() + transfer.timeout_s
        me, world = self.rank, self.world
        device = transfer.send_buf.device
        lmax = transfer.block_counts.shape[1]
        row_bytes = transfer.send_buf.shape[1]
        assert transfer.send_rows is not None  # internal: resolved on this thread before the exchange
        offsets = list(itertools.accumulate([0, *transfer.send_rows]))

        # Phase 1: headers. Each carries the shared parameters, so a disagreement is seen by all.
        headers_out, headers_in = {}, {}
        for r in range(world):
            if r == me:
                continue
            h = transfer.header.clone()
            h[_H_ROWS] = transfer.send_rows[r]
            headers_out[r] = h
            headers_in[r] = torch.empty(HEADER_LEN, dtype=torch.int64)
        if device.type != "cpu":  # NCCL moves device tensors only
            headers_out = {r: h.to(device) for r, h in headers_out.items()}
            headers_in = {r: h.to(device) for r, h in headers_in.items()}
        transfer.delivered = {me}
        self._p2p(headers_out, headers_in, transfer, deadline)
        headers_in = {r: h.cpu() for r, h in headers_in.items()}
        _check_headers(transfer, headers_in, me)
        transfer.delivered = {me}

        # Phase 2: payload = block counts (as bytes) + rows.
        count_bytes = lmax * 8
        sends, recvs = {}, {}
        for r in range(world):
            if r == me:
                continue
            rows = transfer.send_buf[offsets[r] : offsets[r + 1]]
            counts = transfer.block_counts[r].contiguous().view(torch.uint8).to(device)
            sends[r] = torch.cat([counts, rows.reshape(-1)])
            recvs[r] = torch.empty(
                count_bytes + int(headers_in[r][_H_ROWS]) * row_bytes, dtype=torch.uint8, device=device
            )
        self._p2p(sends, recvs, transfer, deadline)

        recv_counts = torch.empty(world, lmax, dtype=torch.int64)
        chunks = []
        for r in range(world):
            if r == me:
                recv_counts[r] = transfer.block_counts[r]
                chunks.append(transfer.send_buf[offsets[r] : offsets[r + 1]])
            else:
                buf = recvs[r]
                recv_counts[r] = buf[:count_bytes].cpu().view(torch.int64)
                chunks.append(buf[count_bytes:].view(-1, row_bytes))
        recv_rows = torch.cat(chunks) if chunks else transfer.send_buf[:0]

        link = transfer.link
        if link is not None:
            out_bytes = sum(s.numel() for s in sends.values())
            in_bytes = sum(b.numel() for b in recvs.values())
            start = max(transfer.started_at or 0.0, self.link_free_at)
            done_at = start + link.duration(max(out_bytes, in_bytes))
            delay = done_at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            self.link_free_at = max(done_at, time.perf_counter())
        return recv_rows, recv_counts

    def submit(self, transfer: Transfer) -> None:
        self.queue.put(transfer)


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
class _Ended:
    """Where the stream of an epoch ended: the exchange number and who aborted there, with why."""

    seq: int
    aborters: dict[int, str]

    def describe(self, group_name: str) -> str:
        who = "; ".join(f"rank {r}: {why}" for r, why in sorted(self.aborters.items()))
        ranks = sorted(self.aborters)
        names = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks}"
        return f"group {group_name!r} was aborted by {names} at exchange #{self.seq} ({who})"


@dataclass(eq=False)
class _AbortMarker:
    """Queued by `abort`: ends this rank's epoch `epoch` on the worker (see `_GroupWorker`)."""

    epoch: int
    reason: str
    timeout_s: float
    done: threading.Event = field(default_factory=threading.Event)


def _where(transfer: Transfer) -> str:
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


def _decode_reason(header: Tensor) -> str:
    length = max(0, min(int(header[_H_ROWS]), _REASON_BYTES))
    raw = header[_H_PARAMS:].contiguous().numpy().tobytes()[:length]
    return raw.decode("utf-8", "replace")


class _InvalidInput(_ParameterMismatch, ValueError):
    """This rank's setup input failed a check deferred to the transport's thread (device tensors)."""


def _check_headers(transfer: Transfer, headers: dict[int, Tensor], me: int) -> None:
    mine = transfer.header
    aborters = {
        r: _decode_reason(h) for r, h in headers.items() if int(h[_H_MAGIC]) == MAGIC and int(h[_H_OP]) == OP_ABORT
    }
    if aborters:  # every rank sees the same aborts at this number: no payload moves anywhere
        ended = _Ended(int(mine[_H_SEQ]), aborters)
        raise _StreamAborted(
            f"{transfer.op} exchange{_where(transfer)} failed: {ended.describe(transfer.group_name)}",
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
                raise _ParameterMismatch(
                    f"ranks disagree on {name} on group {transfer.group_name!r}: rank {me} "
                    f"has {a}, rank {r} has {b}; it must be the same on all ranks"
                )
        if int(mine[_H_PARAMS + PARAM_FIELDS.index("global_bs")]) == 0:
            a, b = int(mine[_H_BATCH]), int(theirs[_H_BATCH])
            if a != b:
                raise _ParameterMismatch(
                    f"global_bs = 0 needs the same BS on all ranks, got BS = {a} on rank {me} "
                    f"and {b} on rank {r}; pass global_bs = max_bs * ep_world_size"
                )


_workers: dict[str, _GroupWorker] = {}
_workers_lock = threading.Lock()


_replaced: dict[str, str] = {}  # old group name -> the name of the group `recover` built for it


def _worker_for(group: dist.ProcessGroup, group_name: str) -> _GroupWorker:
    with _workers_lock:
        worker = _workers.get(group_name)
        if worker is None or worker.group is not group:
            worker = _workers[group_name] = _GroupWorker(group, group_name)
        return worker


def shutdown() -> None:
    """Stop every group worker (call before destroying process groups). In-flight transfers fail."""
    with _workers_lock:
        workers = list(_workers.values())
        _workers.clear()
    for worker in workers:
        worker.queue.put(None)
    for worker in workers:
        worker.thread.join(timeout=5)
    with _registry_lock:
        _registry.clear()
        _cancelled.clear()


def make_header(op: str, params_values: dict[str, int], batch: int, lmax: int) -> Tensor:
    header = torch.zeros(HEADER_LEN, dtype=torch.int64)
    header[_H_MAGIC] = MAGIC
    header[_H_OP] = OP_CODES[op]
    header[_H_LMAX] = lmax
    header[_H_BATCH] = batch
    for i, name in enumerate(PARAM_FIELDS):
        header[_H_PARAMS + i] = params_values[name]
    return header


def start(
    op: str,
    group: dist.ProcessGroup,
    group_name: str,
    *,
    send_buf: Tensor,
    send_rows: list[int] | None,
    block_counts: Tensor,
    header: Tensor,
    label: str = "",
    checks: tuple[staging.DeferredCheck, ...] = (),
) -> Transfer:
    """Queue an exchange on the group's worker and return its handle at once.

    Every option is read and every refusal raised before anything is taken: a refused call
    leaves no ticket, no in-flight slot and no exchange number behind.

    Args:
        op: "dispatch" or "combine".
        send_buf: `(N, row_bytes)` uint8, owned by the transfer from now on (pass a private copy).
        send_rows: rows for each peer, in peer order (their sum is at most N), or None to take
            them from `block_counts` on the group's worker (a setup on a device reads no values).
        block_counts: `(W, L_max)` int64 rows per (peer, local expert), sent with the rows; with
            `send_rows=None` it may stay on the device (resolved on the worker).
        header: from `make_header`.
        checks: input checks deferred to the worker (`staging.DeferredCheck`).

    Raises:
        ValueError: a bad `OVERLAP_TIMEOUT_S`.
        CapacityError: `max_in_flight` exchanges of this op are already set up on the group.
        CommError: the group is broken, was replaced by `recover`, or a peer aborted it and this
            rank has not called `abort` yet.
    """
    timeout_s, link = current_timeout(), current_link()
    if group_name in _replaced:
        raise CommError(
            f"{op}_setup: group {group_name!r} was replaced by overlap.ops.recover with group "
            f"{_replaced[group_name]!r}: pass the new group's group_name"
        )
    plan = staging.begin(group, group_name, send_buf, checks)  # ValueError before any state changes
    worker = _worker_for(group, group_name)
    transfer = Transfer(
        ticket=0,
        op=op,
        group_name=group_name,
        seq=-1,
        header=header.clone(),
        send_buf=send_buf,
        send_rows=send_rows,
        block_counts=block_counts if send_rows is None else block_counts.to("cpu", torch.int64),
        label=label,
        timeout_s=timeout_s,
        link=link,
        plan=plan,
    )
    if send_buf.device.type == "cuda":
        transfer.ready_event = torch.cuda.Event()
        transfer.ready_event.record(torch.cuda.current_stream(send_buf.device))
    global _last_ticket
    with worker.lock:
        refusal = worker.refusal()
        if refusal is not None:
            raise refusal
        with _registry_lock:
            busy = [t for t in _registry.values() if t.group_name == group_name and t.op == op]
            if len(busy) >= _options.max_in_flight:
                raise CapacityError(
                    f"{op}_setup: {len(busy)} {op} exchanges already in flight on group {group_name!r} (tickets "
                    f"{[t.ticket for t in busy]}); at most max_in_flight = {_options.max_in_flight} (the double "
                    f"buffer): tear one down first or raise it with overlap.ops.configure(max_in_flight=...)"
                )
            _last_ticket += 1
            transfer.ticket = _last_ticket
            _registry[transfer.ticket] = transfer
        transfer.epoch = worker.epoch
        worker.issued_in_epoch += 1
        worker.last_abort = None
        worker.pending.add(transfer)
        worker.submit(transfer)
    return transfer


# --------------------------------------------------------------------------------------------
# Faults: abort, agreement, library-owned collectives, recovery
# --------------------------------------------------------------------------------------------


def _group_and_name(group: dist.ProcessGroup | str) -> tuple[dist.ProcessGroup, str]:
    if isinstance(group, str):
        try:
            return dist.distributed_c10d._resolve_process_group(group), group  # type: ignore[arg-type]
        except Exception as exc:  # torch raises ValueError or RuntimeError depending on the version
            raise ValueError(
                f"group must be a torch.distributed process group or its group_name, got {group!r}"
            ) from exc
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed ProcessGroup or its group_name, got {type(group).__name__}")
    return group, group.group_name


def _wire_device(group: dist.ProcessGroup, device: torch.device | None) -> torch.device:
    """Where the group's messages must live: the device for NCCL, the host for gloo (which also
    carries device exchanges, staged through host buffers)."""
    if dist.get_backend(group) != "nccl":
        return torch.device("cpu")
    return device if device is not None and device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())


def _reason(error: BaseException | str | None) -> str:
    if error is None:
        return "aborted"
    if isinstance(error, str):
        return error
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def abort(
    group: dist.ProcessGroup | str,
    error: BaseException | str | None = None,
    *,
    tickets: Iterable[int] | None = None,
    timeout_s: float | None = None,
) -> list[int]:
    """Abort this rank's work on `group` and tell every peer; returns at once.

    Cancels this rank's in-flight exchanges of the group (or only `tickets`): they leave the
    registry (the budget is free again), their result is dropped, a teardown blocked on one wakes
    with `CommError`, and a later teardown of one raises `CommError` ("cancelled"). Then, on the
    group's worker, an abort header carrying `error`'s type and message goes to every peer at this
    rank's next exchange number, unless a peer's abort ended the stream first. Every peer's
    exchange at that number, and every later one it had set up, fails with `CommError` naming this
    rank and its error, at once (a peer waiting on this rank sees it within milliseconds; a peer
    not waiting sees it at its next exchange on the group).

    Each rank of the group must call `abort` once for the same failure (a peer after its own
    `CommError`); then sequence numbers, registry and budget agree on every rank and the group is
    usable again; until then setups on a rank whose stream a peer ended raise `CommError`.
    Aborting twice for the same exception object, with nothing set up between, does nothing.
    If the peers cannot be reached within the timeout (one is dead or silent), the group is
    marked broken on this rank: see `recover`.

    Args:
        group: the process group or its group_name.
        error: what failed (its type and first line travel to the peers, at most 208 bytes).
        tickets: the tickets to cancel (default: every in-flight exchange of the group).
        timeout_s: how long the worker waits for the peers' headers (default: `current_timeout()`).

    Returns:
        The tickets cancelled.
    """
    group_obj, group_name = _group_and_name(group)
    reason = _reason(error)
    timeout = current_timeout() if timeout_s is None else timeout_s
    if not timeout > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    wanted = None if tickets is None else {int(t) for t in tickets}
    if group_name in _replaced:  # `recover` cancelled everything of the old group already
        return []
    worker = _worker_for(group_obj, group_name)
    cancel_error = CommError(f"exchange cancelled by overlap.ops.abort on group {group_name!r} on this rank ({reason})")
    with worker.lock:
        if error is not None and worker.last_abort == id(error) and worker.issued_in_epoch == 0:
            return []
        with _registry_lock:
            victims = [
                t for t in _registry.values() if t.group_name == group_name and (wanted is None or t.ticket in wanted)
            ]
            for t in victims:
                del _registry[t.ticket]
                _cancelled[t.ticket] = reason
            while len(_cancelled) > _CANCELLED_KEPT:
                del _cancelled[next(iter(_cancelled))]
        victims += [
            t
            for t in worker.pending
            if t not in victims and t.epoch == worker.epoch and (wanted is None or t.ticket in wanted)
        ]
        for t in victims:
            t.cancelled, t.abort_reason = True, reason
            if not t._done.is_set():
                t._error = cancel_error
                t._done.set()
        worker.queue.put(_AbortMarker(worker.epoch, reason, timeout))
        worker.epoch += 1
        worker.issued_in_epoch = 0
        worker.last_abort = id(error) if error is not None else None
    return sorted(t.ticket for t in victims)


def settle(
    group: dist.ProcessGroup | str,
    error: BaseException | None = None,
    *,
    tickets: Iterable[int] | None = None,
    timeout_s: float | None = None,
) -> None:
    """End a unit of work that every rank of `group` runs (a scheduler context): every rank calls
    it, with the exception that ended its part or None.

    A failed rank aborts first (`abort`, so that peers waiting on it wake at once); then one small
    `all_gather` (W x 32 int64) tells every rank which ranks failed and why. If any did, every
    rank has aborted the same epoch (`tickets`: the setups made inside the unit), the group is
    usable again, and a rank that had not failed raises `CommError` naming the failed ranks and
    their errors (a failed rank returns: its caller re-raises its own error).

    Raises:
        CommError: a peer failed; or the agreement itself failed (the group is then broken).
        CommTimeoutError: a peer did not reach the agreement within the timeout.
    """
    group_obj, group_name = _group_and_name(group)
    if error is not None:
        abort(group_obj, error, tickets=tickets, timeout_s=timeout_s)
    worker = _workers.get(group_name)
    device = _wire_device(group_obj, worker.device if worker is not None else None)
    mine = make_abort_header(0, _reason(error)) if error is not None else torch.zeros(HEADER_LEN, dtype=torch.int64)
    world = dist.get_world_size(group_obj)
    gathered = [torch.zeros(HEADER_LEN, dtype=torch.int64, device=device) for _ in range(world)]
    collective(
        lambda: dist.all_gather(gathered, mine.to(device), group=group_obj, async_op=True),
        "the failure agreement (all_gather)",
        group_obj,
        timeout_s=timeout_s,
    )
    failed = {r: _decode_reason(h.cpu()) for r, h in enumerate(gathered) if int(h[_H_OP]) == OP_ABORT}
    if not failed or error is not None:
        return
    ranks = sorted(failed)
    names = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks}"
    who = "; ".join(f"rank {r}: {why}" for r, why in sorted(failed.items()))
    exc = CommError(
        f"{names} failed in the same unit of work on group {group_name!r} ({who}); this rank's part "
        f"was aborted too, on every rank: the group is usable again"
    )
    abort(group_obj, exc, tickets=tickets, timeout_s=timeout_s)
    raise exc


def collective(
    fn: Callable[[], Any],
    what: str,
    group: dist.ProcessGroup | str,
    *,
    timeout_s: float | None = None,
) -> Any:
    """Run a collective of the library's own on `group` (`fn()`), raising only our errors.

    `fn` should issue it with `async_op=True` and return the work: it is then waited for at most
    `timeout_s` (default `current_timeout()`). A broken group raises at once, without calling
    `fn`. A backend failure becomes `CommError`, a timeout `CommTimeoutError`; either marks the
    group broken (the backend's connections cannot be trusted after it), the message says what
    to call. Returns what `fn` returned.

        t = torch.tensor([num_tokens])
        transport.collective(lambda: dist.all_reduce(t, op=dist.ReduceOp.MAX, group=g, async_op=True),
                             "token count all-reduce", g)
    """
    group_obj, group_name = _group_and_name(group)
    timeout = current_timeout() if timeout_s is None else timeout_s
    if group_name in _replaced:
        raise CommError(
            f"{what}: group {group_name!r} was replaced by overlap.ops.recover with group "
            f"{_replaced[group_name]!r}: use the new group"
        )
    worker = _workers.get(group_name)
    if worker is not None and worker.broken is not None:
        raise worker.unusable_error()
    try:
        out = fn()
        if isinstance(out, dist.Work) and out.wait(timedelta(seconds=timeout)) is False:
            raise TimeoutError(f"the work did not complete within {timeout:g} s")
        return out
    except OverlapError:
        raise
    except Exception as exc:  # a backend error: never let it escape raw
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        timed_out = isinstance(exc, TimeoutError) or "timed out" in text.lower() or "timeout" in text.lower()
        cls = CommTimeoutError if timed_out else CommError
        error = cls(f"{what} on group {group_name!r} {'timed out' if timed_out else 'failed'}: {text}")
        worker = _worker_for(group_obj, group_name)
        with worker.lock:
            worker.broken = worker.broken or error
        raise cls(
            f"{error}; the group is unusable: call overlap.ops.recover(group) on every surviving rank (docs/faults.md)"
        ) from exc


def recover(
    group: dist.ProcessGroup | str,
    ranks: Iterable[int] | None = None,
    *,
    timeout: timedelta | None = None,
) -> dist.ProcessGroup:
    """Build a fresh process group for the surviving ranks of a broken `group` and move the
    library's state to it; every surviving rank calls it with the same `ranks`.

    The old group's exchanges on this rank are cancelled and its worker retired; ops on the old
    group_name then raise `CommError` naming the new one. The new group is made with
    `dist.new_group(ranks, use_local_synchronization=True)`, so only the survivors take part;
    torch.distributed needs its store (the default group's rendezvous) for that.

    Args:
        group: the broken group (or its group_name).
        ranks: global ranks of the survivors (default: every rank of `group`); must include this rank.
        timeout: for creating the new group (default: torch's).

    Returns:
        The new group (pass its group_name as group_ep, and rebuild anything that holds the old group).

    Raises:
        ValueError: `ranks` is not a subset of the group's ranks, or lacks this rank.
        CommError: torch.distributed could not build the group; the message says what to call.
    """
    group_obj, group_name = _group_and_name(group)
    members = dist.get_process_group_ranks(group_obj)
    survivors = sorted(members if ranks is None else {int(r) for r in ranks})
    if not set(survivors) <= set(members):
        raise ValueError(f"ranks must be global ranks of group {group_name!r} ({members}), got {survivors}")
    if dist.get_rank() not in survivors:
        raise ValueError(f"ranks must include this rank ({dist.get_rank()}), got {survivors}")
    reason = f"group {group_name!r} was replaced by overlap.ops.recover"
    with _workers_lock:
        worker = _workers.pop(group_name, None)
    if worker is not None:
        with worker.lock:
            worker.broken = worker.broken or CommError(reason)
            for t in worker.pending:
                t.cancelled = True
                if not t._done.is_set():
                    t._error = CommError(f"exchange cancelled: {reason}")
                    t._done.set()
        worker.queue.put(None)  # its thread may still sit in a backend wait; it is a daemon
    with _registry_lock:
        for t in [t for t in _registry.values() if t.group_name == group_name]:
            del _registry[t.ticket]
            _cancelled[t.ticket] = reason
    try:
        kwargs = {} if timeout is None else {"timeout": timeout}
        new = dist.new_group(survivors, backend=dist.get_backend(group_obj), use_local_synchronization=True, **kwargs)  # type: ignore[arg-type]
    except Exception as exc:
        raise CommError(
            f"overlap.ops.recover could not build a new group of ranks {survivors}: {exc}. torch.distributed needs "
            f"its store for that; if the store is gone (the rank hosting it died), call overlap.ops.shutdown(), "
            f"dist.destroy_process_group() and dist.init_process_group(...) with a new store on the surviving "
            f"ranks, then build the EP group again"
        ) from exc
    _replaced[group_name] = new.group_name
    return new


@dataclass(frozen=True)
class GroupStatus:
    """What this rank's transport knows about one group (`group_status`)."""

    group_name: str
    next_exchange: int  # the number the worker gives the next exchange it starts
    epoch: int  # local aborts so far
    in_flight: int  # set up, not torn down
    aborted: str | None  # a peer's abort this rank has not answered with its own `abort`
    broken: str | None  # why the group is unusable


def group_status(group_name: str, *, wait_s: float = 0.0) -> GroupStatus:
    """This rank's view of a group's exchange numbering, aborts and health. With `wait_s`, first
    wait (at most that long) until the worker has run everything queued so far."""
    with _workers_lock:
        worker = _workers.get(group_name)
    if worker is None:
        return GroupStatus(group_name, 0, 0, len(in_flight(group_name)), None, None)
    if wait_s > 0:
        flushed = threading.Event()
        worker.queue.put(flushed)
        flushed.wait(wait_s)
    with worker.lock:
        aborted = (
            worker.ended.describe(group_name)
            if worker.ended is not None and worker.stream_epoch == worker.epoch
            else None
        )
        return GroupStatus(
            group_name,
            worker.next_seq,
            worker.epoch,
            len(in_flight(group_name)),
            aborted,
            None if worker.broken is None else str(worker.broken),
        )


def transfer_of(comm_cmd_info: Tensor) -> Transfer | None:
    """The in-flight transfer a setup's `comm_cmd_info` names, without claiming it (None if none)."""
    try:
        ticket = read_ticket(comm_cmd_info, "transfer_of")
    except HandleError:
        return None
    with _registry_lock:
        return _registry.get(ticket)
