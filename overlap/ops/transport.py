"""The portable transport under the split ops: fire-and-forget exchanges over torch.distributed.

Owns: one ordered worker per process group that carries every exchange of that group; the
in-flight `Transfer` handles and their registry (tickets); the header that lets every rank check
every other rank's parameters and op order before any payload moves; bounded waits; the in-flight
budget; and the emulated link. Never computes layouts or touches the ops' semantics.

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
run other collectives on a group while one of its exchanges is in flight.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from ..errors import CapacityError, CommError, CommTimeoutError, HandleError
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
_timeout_override: contextvars.ContextVar[float | None] = contextvars.ContextVar("overlap_timeout_s", default=None)


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


def comm_options(*, timeout_s: float | None = None) -> contextlib.AbstractContextManager[None]:
    """Override the teardown timeout for the calls made inside the block (this context: it follows
    the caller onto the threads the pipeline runs ops on)."""
    if timeout_s is not None and not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    from .context import bound

    return bound(_timeout_override, timeout_s)


def current_timeout() -> float:
    override = _timeout_override.get()
    if override is not None:
        return override
    if _options.timeout_s is not None:
        return _options.timeout_s
    return _env_float("OVERLAP_TIMEOUT_S", DEFAULT_TIMEOUT_S)


def current_link() -> EmulatedLink | None:
    return _options.link


def max_in_flight() -> int:
    """Exchanges of one kind that may be in flight per group (`configure(max_in_flight=...)`)."""
    return _options.max_in_flight


# --------------------------------------------------------------------------------------------
# Groups
# --------------------------------------------------------------------------------------------


def resolve_group(group_ep: str, ep_world_size: int, ep_rank_id: int) -> dist.ProcessGroup:
    """The `torch.distributed` process group named `group_ep`, checked against W and the rank."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised: call dist.init_process_group(...) and pass "
                           "group_ep=<group>.group_name")
    try:
        group = dist.distributed_c10d._resolve_process_group(group_ep)
    except Exception as exc:  # torch raises ValueError or RuntimeError depending on the version
        raise ValueError(f"group_ep must name a torch.distributed process group (its group_name), got "
                         f"{group_ep!r}") from exc
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
    once by `take`. Its times (`time.perf_counter`) show when the link carried it.
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
                    f"still queued behind an earlier exchange of the group that has not completed {hint}")
            world = self.block_counts.shape[0]
            missing = sorted(set(range(world)) - self.delivered)
            raise CommTimeoutError(
                f"{self.op}_teardown{where} on group {self.group_name!r} timed out after {timeout:g} s: "
                f"ranks {missing} have not delivered {hint}")
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


_ticket_counter = itertools.count(1)
_registry: dict[int, Transfer] = {}
_registry_lock = threading.Lock()


def in_flight(group_name: str | None = None) -> list[Transfer]:
    """Transfers set up and not yet torn down (of one group, or all), oldest first."""
    with _registry_lock:
        return [t for t in _registry.values() if group_name is None or t.group_name == group_name]


def write_ticket(comm_cmd_info: Tensor, transfer: Transfer) -> None:
    """Record the ticket in the setup's `comm_cmd_info` (and as a host-side attribute)."""
    for i, value in enumerate((MAGIC, transfer.ticket, OP_CODES[transfer.op], transfer.seq)):
        comm_cmd_info[i] = value  # a fill per entry: no host-to-device copy that would wait on a device
    comm_cmd_info._overlap_ticket = transfer.ticket  # type: ignore[attr-defined]


def claim(comm_cmd_info: Tensor, op: str) -> Transfer:
    """Find and remove the transfer a teardown completes; `HandleError` on any misuse."""
    ticket = getattr(comm_cmd_info, "_overlap_ticket", None)
    if ticket is None:
        head = comm_cmd_info[:4].tolist() if comm_cmd_info.numel() >= 4 else []
        if len(head) < 4 or head[0] != MAGIC:
            raise HandleError(f"comm_cmd_info was not returned by {op}_setup: {op}_teardown without its setup")
        ticket = head[1]
    with _registry_lock:
        transfer = _registry.get(ticket)
        if transfer is None:
            raise HandleError(f"comm_cmd_info ticket {ticket} was already torn down (a teardown runs once per setup)")
        if transfer.op != op:
            raise HandleError(f"{op}_teardown was given the comm_cmd_info of a {transfer.op}_setup (ticket {ticket})")
        del _registry[ticket]
    return transfer


# --------------------------------------------------------------------------------------------
# The worker
# --------------------------------------------------------------------------------------------


class _GroupWorker:
    """Carries one group's exchanges, in order, on one daemon thread."""

    def __init__(self, group: dist.ProcessGroup, group_name: str) -> None:
        self.group = group
        self.group_name = group_name
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.peers = [dist.get_global_rank(group, r) for r in range(self.world)]
        self.seq = itertools.count()
        self.broken: BaseException | None = None
        self.queue: queue.SimpleQueue[Transfer | None] = queue.SimpleQueue()
        self.link_free_at = 0.0
        self.side_stream: torch.cuda.Stream | None = None
        self.thread = threading.Thread(target=self._loop, name=f"overlap-comm-{group_name}", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            transfer = self.queue.get()
            if transfer is None:
                return
            transfer.started_at = time.perf_counter()
            try:
                if self.broken is not None:
                    raise CommError(f"group {self.group_name!r} is unusable after an earlier failure: {self.broken}")
                transfer._result = self._run_on_device(transfer)
            except _ParameterMismatch as exc:
                transfer._error = exc  # every rank stopped after the headers: the group stays usable
            except (CommError, CommTimeoutError) as exc:
                transfer._error = self.broken = exc
            except BaseException as exc:  # surfaces on the teardown, with the cause chained
                error = CommError(f"{transfer.op} exchange on group {self.group_name!r} failed: {exc}")
                error.__cause__ = exc
                transfer._error = self.broken = error
            transfer.finished_at = time.perf_counter()
            transfer._done.set()

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
                        f"{transfer.timeout_s:g} s: ranks {missing} have not delivered ({exc})") from exc
                who = f"receiving from rank {peer}" if peer is not None else \
                    f"sending to rank {send_peers[i - len(recv_peers)]}"
                raise CommError(f"{transfer.op} exchange{where} on group {self.group_name!r}: {who} failed ({exc}); "
                                f"ranks {missing} have not delivered") from exc
            if ok is False:
                raise CommTimeoutError(f"{transfer.op} exchange{where} on group {self.group_name!r} timed out after "
                                       f"{transfer.timeout_s:g} s: ranks {missing} have not delivered")
            if peer is not None:
                transfer.delivered.add(peer)

    def _exchange(self, transfer: Transfer) -> tuple[Tensor, Tensor]:
        deadline = time.perf_counter() + transfer.timeout_s
        me, world = self.rank, self.world
        device = transfer.send_buf.device
        lmax = transfer.block_counts.shape[1]
        row_bytes = transfer.send_buf.shape[1]
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
            recvs[r] = torch.empty(count_bytes + int(headers_in[r][_H_ROWS]) * row_bytes, dtype=torch.uint8,
                                   device=device)
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

        link = _options.link
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


class _InvalidInput(_ParameterMismatch, ValueError):
    """This rank's setup input failed a check deferred to the transport's thread (device tensors)."""


def _check_headers(transfer: Transfer, headers: dict[int, Tensor], me: int) -> None:
    mine = transfer.header
    if transfer.plan is not None and transfer.plan.error is not None:
        raise _InvalidInput(str(transfer.plan.error))  # the peers saw the flag in our header too
    for r in sorted(headers):
        theirs = headers[r]
        if int(theirs[_H_INVALID]):
            raise _ParameterMismatch(f"rank {r} gave {transfer.op}_setup invalid input (a check made on the "
                                     f"transport's thread; rank {r} raises its ValueError); no rows moved")
        if int(theirs[_H_MAGIC]) != MAGIC:
            raise _ParameterMismatch(f"rank {r} sent no overlap header on group {transfer.group_name!r}: another "
                                     f"collective ran on the group during an exchange")
        if int(theirs[_H_OP]) != int(mine[_H_OP]) or int(theirs[_H_SEQ]) != int(mine[_H_SEQ]):
            names = {v: k for k, v in OP_CODES.items()}
            raise _ParameterMismatch(
                f"ranks disagree on op order on group {transfer.group_name!r}: rank {me} is at exchange "
                f"#{int(mine[_H_SEQ])} ({names.get(int(mine[_H_OP]), '?')}), rank {r} at #{int(theirs[_H_SEQ])} "
                f"({names.get(int(theirs[_H_OP]), '?')})")
        for i, name in enumerate(PARAM_FIELDS):
            a, b = int(mine[_H_PARAMS + i]), int(theirs[_H_PARAMS + i])
            if a != b:
                raise _ParameterMismatch(f"ranks disagree on {name} on group {transfer.group_name!r}: rank {me} "
                                         f"has {a}, rank {r} has {b}; it must be the same on all ranks")
        if int(mine[_H_PARAMS + PARAM_FIELDS.index("global_bs")]) == 0:
            a, b = int(mine[_H_BATCH]), int(theirs[_H_BATCH])
            if a != b:
                raise _ParameterMismatch(f"global_bs = 0 needs the same BS on all ranks, got BS = {a} on rank {me} "
                                         f"and {b} on rank {r}; pass global_bs = max_bs * ep_world_size")


_workers: dict[str, _GroupWorker] = {}
_workers_lock = threading.Lock()


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
        CapacityError: `max_in_flight` exchanges of this op are already set up on the group.
    """
    busy = [t for t in in_flight(group_name) if t.op == op]
    if len(busy) >= _options.max_in_flight:
        raise CapacityError(
            f"{op}_setup: {len(busy)} {op} exchanges already in flight on group {group_name!r} (tickets "
            f"{[t.ticket for t in busy]}); at most max_in_flight = {_options.max_in_flight} (the double buffer): "
            f"tear one down first or raise it with overlap.ops.configure(max_in_flight=...)")
    plan = staging.begin(group, group_name, send_buf, checks)  # ValueError before any state changes
    worker = _worker_for(group, group_name)
    if worker.broken is not None:
        raise CommError(f"group {group_name!r} is unusable after an earlier failure: {worker.broken}")
    seq = next(worker.seq)
    header = header.clone()
    header[_H_SEQ] = seq
    transfer = Transfer(ticket=next(_ticket_counter), op=op, group_name=group_name, seq=seq, header=header,
                        send_buf=send_buf, send_rows=send_rows,
                        block_counts=block_counts if send_rows is None else block_counts.to("cpu", torch.int64),
                        label=label, timeout_s=current_timeout(),
                        plan=plan)
    if send_buf.device.type == "cuda":
        transfer.ready_event = torch.cuda.Event()
        transfer.ready_event.record(torch.cuda.current_stream(send_buf.device))
    with _registry_lock:
        _registry[transfer.ticket] = transfer
    worker.submit(transfer)
    return transfer


def transfer_of(comm_cmd_info: Tensor) -> Transfer | None:
    """The in-flight transfer a setup's `comm_cmd_info` names, without claiming it (None if none)."""
    ticket = getattr(comm_cmd_info, "_overlap_ticket", None)
    with _registry_lock:
        return _registry.get(ticket) if ticket is not None else None
