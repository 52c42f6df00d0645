"""The portable transport under the split ops: fire-and-forget exchanges over torch.distributed.

Owns: the in-flight `Transfer` handles and their registry (tickets); the in-flight budget; the
choice of carrier for each group (`staging.kind_for`: `window`, `gloo`, `gloo-staged`, `nccl`) and
its lane (`protocol.Lane`: exchange numbers, aborts, health); and what happens on a fault (abort,
agreement, recovery, the library's own collectives). The protocol (options, header, cross-check,
outcomes, the emulated link) is `protocol.py`; the carriers are `gloo.py`, `nccl.py`, `window.py`.
Never computes layouts or touches the ops' semantics. Imports the carriers; none imports it.

The window carrier (ranks of one machine, the CPU default) has no thread: a setup copies its
header and rows into every peer's shared-memory window, a teardown waits for the peers' counters
(window.py). On CUDA tensors (opt-in, `OVERLAP_TRANSPORT=window`) the rows go into the peers'
CUDA windows through CUDA IPC instead, ordered by interprocess events (`window.CudaFlavour`).
The gloo carrier (gloo.py) works as follows:

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
    timeout / dead peer      gloo closes the pair (window: the peer's counter never comes, or its
                             process is gone): the group is broken -> recover(group) builds a
                             new one (dist.new_group) for the survivors

No gloo operation is ever cancelled: a posted receive always gets the message it waits for (a
header, or an abort header in its place), so the streams between ranks never fall out of step.
"""

from __future__ import annotations

import atexit
import os
import threading
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..errors import CapacityError, CommError, CommTimeoutError, HandleError, OverlapError
from . import staging
from .gloo import P2PLane
from .nccl import NcclLane
from .protocol import (  # re-exported: the transport's public names live on here
    _H_OP,
    DEFAULT_TIMEOUT_S,
    DTYPE_CODES,
    HEADER_LEN,
    MAGIC,
    OP_ABORT,
    OP_CODES,
    PARAM_FIELDS,
    EmulatedLink,
    Lane,
    Transfer,
    comm_options,
    configure,
    current_link,
    current_timeout,
    decode_reason,
    make_abort_header,
    make_header,
    max_in_flight,
    reason_text,
    resolve_group,
    teardown_timeout,
    wire_device,
)
from .protocol import _InvalidInput as _InvalidInput
from .protocol import _options as _options
from .protocol import _ParameterMismatch as _ParameterMismatch
from .window import WindowLane

__all__ = [
    "DEFAULT_TIMEOUT_S", "DTYPE_CODES", "HEADER_LEN", "MAGIC", "OP_ABORT", "OP_CODES", "PARAM_FIELDS", "EmulatedLink",
    "GroupStatus", "Transfer", "abort", "claim", "collective", "comm_options", "configure", "current_link",
    "current_timeout", "group_status", "in_flight", "make_abort_header", "make_header", "max_in_flight",
    "read_ticket", "recover", "resolve_group", "settle", "shutdown", "start", "teardown_timeout",
    "transfer_of", "write_ticket",
]  # fmt: skip


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
# Lanes: one per (group, carrier) on this rank
# --------------------------------------------------------------------------------------------

_CARRIERS: dict[str, type[Lane]] = {"gloo": P2PLane, "gloo-staged": P2PLane, "nccl": NcclLane, "window": WindowLane}
_workers: dict[str, dict[str, Lane]] = {}  # group name -> carrier name -> its lane
_workers_lock = threading.Lock()
_replaced: dict[str, str] = {}  # old group name -> the name of the group `recover` built for it


def _carrier(kind: str) -> str:
    return "gloo" if kind == "gloo-staged" else kind  # the staged kind rides the gloo lane


def _lane_for(group: dist.ProcessGroup, group_name: str, kind: str) -> Lane:
    carrier = _carrier(kind)
    with _workers_lock:
        lanes = _workers.setdefault(group_name, {})
        lane = lanes.get(carrier)
        if lane is None or lane.group is not group:
            if lane is not None:
                lane.stop()
            lane = lanes[carrier] = _CARRIERS[carrier](group, group_name)
        return lane


def _lanes_of(group_name: str) -> list[Lane]:
    with _workers_lock:
        return list(_workers.get(group_name, {}).values())


def _default_lane(group: dist.ProcessGroup, group_name: str) -> Lane:
    """The lanes `abort` and `collective` act on when the group has carried nothing yet."""
    lanes = _lanes_of(group_name)
    if lanes:
        return lanes[0]
    device = wire_device(group, None)
    return _lane_for(group, group_name, staging.kind_for(group, device, probe=True))


def release(group: dist.ProcessGroup | str) -> None:
    """Stop the lanes of one group (its transport thread, its shared-memory window) and forget its
    handles, as `shutdown` does for every group: call it on every rank once the group carries
    nothing more, before `dist.destroy_process_group(group)`. A job that makes groups as it goes
    (per phase, per test) otherwise keeps each one's lanes, and gloo its threads, for good."""
    _, group_name = _group_and_name(group)
    with _workers_lock:
        lanes = list(_workers.pop(group_name, {}).values())
    _retire(lanes)
    with _registry_lock:
        for ticket in [k for k, t in _registry.items() if t.group_name == group_name]:
            del _registry[ticket]


def shutdown() -> None:
    """Stop every group's lanes (call before destroying process groups). In-flight transfers fail;
    the window carrier's shared memory is released. Also run at interpreter exit (`atexit`), so
    that no lane still holds a process group when Python tears its modules down: a gloo group
    destroyed that late, its threads still joinable, aborted a torchrun worker at exit
    ("terminate called without an active exception", then SIGSEGV) on a loaded host."""
    with _workers_lock:
        lanes = [lane for group in _workers.values() for lane in group.values()]
        _workers.clear()
    _retire(lanes)
    with _registry_lock:
        _registry.clear()
        _cancelled.clear()


def _retire(lanes: list[Lane]) -> None:
    """Stop `lanes` (all asked first, so their threads wind down together), then join each (bounded)."""
    for lane in lanes:
        lane.stop()
    for lane in lanes:
        lane.join(5.0)


atexit.register(shutdown)


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
    worker = _lane_for(group, group_name, plan.kind)
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
        lane=worker,
    )
    if send_buf.device.type == "cuda":
        transfer.ready_event = torch.cuda.Event()
        transfer.ready_event.record(torch.cuda.current_stream(send_buf.device))
    worker.check_fits(transfer)  # ValueError (the window carrier's size) before any state changes
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
    reason = reason_text(error)
    timeout = current_timeout() if timeout_s is None else timeout_s
    if not timeout > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    wanted = None if tickets is None else {int(t) for t in tickets}
    if group_name in _replaced:  # `recover` cancelled everything of the old group already
        return []
    _default_lane(group_obj, group_name)
    cancelled: list[int] = []
    for worker in _lanes_of(group_name):
        cancelled += _abort_lane(worker, group_name, error, reason, wanted, timeout)
    return sorted(cancelled)


def _abort_lane(
    worker: Lane,
    group_name: str,
    error: BaseException | str | None,
    reason: str,
    wanted: set[int] | None,
    timeout: float,
) -> list[int]:
    cancel_error = CommError(f"exchange cancelled by overlap.ops.abort on group {group_name!r} on this rank ({reason})")
    with worker.lock:
        if error is not None and worker.last_abort == id(error) and worker.issued_in_epoch == 0:
            return []
        with _registry_lock:
            victims = [
                t
                for t in _registry.values()
                if t.group_name == group_name and t.lane is worker and (wanted is None or t.ticket in wanted)
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
        worker.epoch += 1
        worker.issued_in_epoch = 0
        worker.last_abort = id(error) if error is not None else None
        worker.close_epoch(worker.epoch - 1, reason, timeout)
    return [t.ticket for t in victims]


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
    lanes = _lanes_of(group_name)
    device = wire_device(group_obj, lanes[0].device if lanes else None)
    mine = make_abort_header(0, reason_text(error)) if error is not None else torch.zeros(HEADER_LEN, dtype=torch.int64)
    world = dist.get_world_size(group_obj)
    gathered = [torch.zeros(HEADER_LEN, dtype=torch.int64, device=device) for _ in range(world)]
    collective(
        lambda: dist.all_gather(gathered, mine.to(device), group=group_obj, async_op=True),
        "the failure agreement (all_gather)",
        group_obj,
        timeout_s=timeout_s,
    )
    failed = {r: decode_reason(h.cpu()) for r, h in enumerate(gathered) if int(h[_H_OP]) == OP_ABORT}
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
    for lane in _lanes_of(group_name):
        if lane.broken is not None:
            raise lane.unusable_error()
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
        for worker in _lanes_of(group_name) or [_default_lane(group_obj, group_name)]:
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
        lanes = list(_workers.pop(group_name, {}).values())
    for worker in lanes:
        with worker.lock:
            worker.broken = worker.broken or CommError(reason)
            for t in worker.pending:
                t.cancelled = True
                if not t._done.is_set():
                    t._error = CommError(f"exchange cancelled: {reason}")
                    t._done.set()
        worker.stop()
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
        lanes = _workers.get(group_name, {})
        kind = staging.transport_kind(group_name)
        worker = lanes.get(_carrier(kind)) if kind is not None else None
        worker = worker or next(iter(lanes.values()), None)
    if worker is None:
        return GroupStatus(group_name, 0, 0, len(in_flight(group_name)), None, None)
    if wait_s > 0:
        worker.flush(wait_s)
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
