"""Exchanges of device tensors: which transport carries them, what a setup may not read on the host,
staging through pinned host buffers, and tensor lifetimes across the transport's side stream.

Owns:
- **The transport kind** of an exchange, decided when its setup starts it and queryable with
  `transport_kind(group_name)`:

  | tensors | group backend | kind          | how the payload moves                                   |
  |---------|---------------|---------------|---------------------------------------------------------|
  | cpu     | gloo          | `window`      | copied into each peer's shared-memory window (default)  |
  | cpu     | gloo          | `gloo`        | gloo sends the tensors as they are                      |
  | cuda    | nccl          | `nccl`        | NCCL sends device memory on the transport's side stream |
  | cuda    | gloo          | `gloo-staged` | device→pinned host, gloo, pinned host→device (`Stager`) |
  | cuda    | gloo          | `window`      | opt-in (OVERLAP_TRANSPORT=window): the CUDA IPC window  |

  `OVERLAP_TRANSPORT=gloo|window|nccl` forces a carrier. CPU ranks use `window` when every rank of
  the job runs on this machine (torchrun's `LOCAL_WORLD_SIZE` equals `WORLD_SIZE`, or they are
  unset), else `gloo`. NCCL refuses two ranks on one GPU, so ranks that share a GPU use a gloo group
  and the staged kind (`backend_for` says which backend a launcher should pick). The window carrier
  on CUDA (`window.CudaFlavour`: rows through CUDA IPC) is opt-in with `OVERLAP_TRANSPORT=window`
  until it is measured on a GPU; under `simulate_device()` the same force runs its CPU twin.
- **Deferred values.** On a device, reading a tensor's values on the host (`.item()`, `.tolist()`,
  `int(t)`, `bool(t)`, `.cpu()`) waits for every kernel queued before it, so a setup that did it
  would stop being fire-and-forget. A setup on a device (`defers_host_reads`) therefore computes
  its checks as device flags (`DeferredCheck`) and leaves the rows per peer on the device; the
  transport's thread resolves them (`resolve`) after the setup's ready event, before the header
  goes out. A failed check travels in the header, so every rank of the exchange stops before any
  payload moves: the rank with the bad input raises its `ValueError`, its peers a `CommError`.
- **Staging** (`Stager`): the kind `gloo-staged` of one exchange, in this order, on the side stream
  of the group's transport thread: wait for the setup's ready event; copy the send rows into a
  pinned host buffer; wait for that copy; exchange over gloo (the same header cross-check, emulated
  link and errors as every exchange); copy the received rows back through a pinned buffer; record
  the done event the teardown's stream waits on. On cpu tensors (`simulate_device`) the same
  sequence runs with host copies and no events, so CI exercises it.
- **Lifetime across streams** (`protect`): a tensor made on one stream and used on another is marked
  with `record_stream`, so the caching allocator does not hand its memory out again until the
  other stream's work queued so far has run.

Never communicates by itself (the transport's `_exchange` does) and never reads a device tensor's
values on the caller's thread.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover - annotations only: protocol imports this module, not the reverse
    from .protocol import Transfer

KINDS = ("window", "gloo", "nccl", "gloo-staged")
CARRIERS = ("gloo", "window", "nccl")  # what OVERLAP_TRANSPORT may force
INVALID_SLOT = 31  # header entry (of the transport's 32) a rank sets when its deferred check failed
_simulate: contextvars.ContextVar[bool] = contextvars.ContextVar("overlap_simulate_device", default=False)
_kinds: dict[str, str] = {}
_kinds_lock = threading.Lock()


# --------------------------------------------------------------------------------------------
# Where host reads are free, and the CPU stand-in for a device
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def simulate_device() -> Iterator[None]:
    """Treat cpu tensors as device tensors in the setups called inside the block (this context: it
    follows the caller onto the threads the pipeline runs ops on).

    The setups then take the device path (no host read of a tensor's values; rows per peer and
    input checks resolved on the transport's thread) and their exchanges are staged (`Stager`, with
    host copies standing in for device copies). For tests on machines without a GPU.
    """
    token = _simulate.set(True)
    try:
        yield
    finally:
        _simulate.reset(token)


def is_simulating() -> bool:
    """True inside `simulate_device()` (in this context)."""
    return _simulate.get()


def defers_host_reads(tensor: Tensor) -> bool:
    """True when a setup must not read `tensor`'s values on the caller's thread: it lives on a
    device (reading would wait for the device's queue), or `simulate_device()` is on."""
    return tensor.device.type != "cpu" or is_simulating()


# --------------------------------------------------------------------------------------------
# Transport kinds
# --------------------------------------------------------------------------------------------


def backend_for(device: torch.device | str, local_world_size: int, num_gpus: int | None = None) -> str:
    """The process-group backend for `local_world_size` ranks on this host using `device`.

    Args:
        device: the ranks' tensors' device (type cpu or cuda).
        local_world_size: ranks on this host.
        num_gpus: GPUs on this host (default: `torch.cuda.device_count()`).

    Returns:
        `"nccl"` when every rank has its own GPU, else `"gloo"` (cpu tensors, or ranks sharing a
        GPU: their exchanges are then staged through pinned host buffers).
    """
    device = torch.device(device)
    if device.type != "cuda":
        return "gloo"
    if local_world_size < 1:
        raise ValueError(f"local_world_size must be >= 1, got {local_world_size}")
    gpus = torch.cuda.device_count() if num_gpus is None else num_gpus
    return "nccl" if 0 < local_world_size <= gpus else "gloo"


def forced_carrier() -> str | None:
    """The carrier `OVERLAP_TRANSPORT` forces, or None. Raises `ValueError` for another value."""
    raw = os.environ.get("OVERLAP_TRANSPORT") or None
    if raw is not None and raw not in CARRIERS:
        raise ValueError(f"OVERLAP_TRANSPORT must be one of {CARRIERS}, got {raw!r}")
    return raw


def one_machine() -> bool:
    """True when every rank of the job runs on this machine, as far as the launcher says: torchrun's
    `LOCAL_WORLD_SIZE` equals its `WORLD_SIZE` (or either is unset: local ranks, `RankPool`). The
    window carrier checks it again when it maps a peer's window (same host name)."""
    local, world = os.environ.get("LOCAL_WORLD_SIZE"), os.environ.get("WORLD_SIZE")
    return not local or not world or local == world


def shm_has_room(world: int) -> bool:
    """True when the shared-memory folder can hold `world` full windows (`HCCL_BUFFSIZE` MB each).

    Windows are sparse (only touched pages cost memory), but a write past what the folder can hold
    kills the process with SIGBUS (a container's 64 MB /dev/shm, say), so the default choice takes
    the window carrier only where the folder could hold every window whole; elsewhere (no such
    folder: macOS) gloo. `OVERLAP_TRANSPORT=window` forces it anyway."""
    import shutil

    from .window import SHM_DIR, window_bytes

    now = time.monotonic()
    free, read_at = _shm_free.get(SHM_DIR, (-1, -_SHM_FREE_TTL_S))
    if now - read_at >= _SHM_FREE_TTL_S:
        try:
            free = shutil.disk_usage(SHM_DIR).free
        except OSError:
            free = -1
        _shm_free[SHM_DIR] = (free, now)
    return free >= 0 and free >= world * window_bytes()


# A folder's free bytes and when they were read: a setup asks at every call, and `statvfs` cost
# about as much as the rest of the carrier choice.
_shm_free: dict[str, tuple[int, float]] = {}
_SHM_FREE_TTL_S = 1.0


def kind_for(group: dist.ProcessGroup, device: torch.device, *, probe: bool = False) -> str:
    """The transport kind an exchange of tensors on `device` over `group` uses (see the module).

    Args:
        probe: only report the kind (an abort on a group that has carried nothing yet).

    Raises:
        ValueError: the tensors and the group's backend cannot meet (cpu tensors on an NCCL-only
            group, or a device other than cpu or cuda), or a bad / impossible `OVERLAP_TRANSPORT`.
    """
    backend = str(dist.get_backend(group)).lower()
    forced = forced_carrier()
    if device.type == "cpu":
        if "gloo" not in backend:
            raise ValueError(
                f"tensors on cpu need a gloo group, but group {group.group_name!r} uses {backend!r}: "
                f"move the tensors to cuda or pass a gloo group's group_name as group_ep"
            )
        if forced == "nccl":
            raise ValueError("OVERLAP_TRANSPORT=nccl needs cuda tensors on an nccl group, got cpu tensors")
        if is_simulating() and not probe:
            # The CPU twin of the CUDA window: forced, the device path's setups ride the window carrier.
            return "window" if forced == "window" else "gloo-staged"
        if forced is not None:
            return forced
        return "window" if one_machine() and shm_has_room(group.size()) else "gloo"
    if device.type == "cuda":
        if "nccl" in backend:
            if forced not in (None, "nccl"):
                raise ValueError(f"OVERLAP_TRANSPORT={forced} needs a gloo group, group {group.group_name!r} uses nccl")
            return "nccl"
        if "gloo" in backend:
            if forced == "nccl":
                raise ValueError(f"OVERLAP_TRANSPORT=nccl needs an nccl group, group {group.group_name!r} uses gloo")
            if forced == "window":
                return "window"  # the CUDA IPC window (window.CudaFlavour): opt-in until measured on a GPU
            return "gloo-staged"
        raise ValueError(f"tensors on cuda need an nccl or gloo group, group {group.group_name!r} uses {backend!r}")
    raise ValueError(f"the portable transport moves cpu or cuda tensors, got device {device}")


def transport_kind(group_name: str) -> str | None:
    """The transport kind (`"window"`, `"gloo"`, `"nccl"` or `"gloo-staged"`) of the latest exchange started on
    the group named `group_name` in this process, or None if none was started yet."""
    with _kinds_lock:
        return _kinds.get(group_name)


# --------------------------------------------------------------------------------------------
# Deferred values: checks and rows per peer, resolved on the transport's thread
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeferredCheck:
    """One input check a setup on a device cannot make on the host.

    Attributes:
        is_bad: 0-dim bool on the tensors' device, True when the input is invalid.
        message: builds the `ValueError` text on the transport's thread (it may read the private
            device tensors it closes over: they are resolved after the setup's ready event).
    """

    is_bad: Tensor
    message: Callable[[], str]


@dataclass(eq=False)
class ExchangePlan:
    """How one exchange moves, decided by its setup; carried on its `Transfer`.

    Attributes:
        kind: one of `KINDS`.
        checks: the setup's deferred input checks (empty when it checked on the host).
        error: the `ValueError` of the first failed check, once `resolve` found one.
        trace: the steps the transport ran, in order (`"ready"`, `"resolve"`, `"to_host"`,
            `"exchange"`, `"to_device"`, `"done"`), for tests and debugging.
    """

    kind: str
    checks: tuple[DeferredCheck, ...] = ()
    error: ValueError | None = None
    trace: list[str] = field(default_factory=list)


def begin(
    group: dist.ProcessGroup, group_name: str, send_buf: Tensor, checks: Sequence[DeferredCheck] = ()
) -> ExchangePlan:
    """Plan an exchange whose send rows live in `send_buf` (caller's thread; reads no values)."""
    kind = kind_for(group, send_buf.device)
    with _kinds_lock:
        _kinds[group_name] = kind
    return ExchangePlan(kind=kind, checks=tuple(checks))


def resolve(transfer: Transfer) -> None:
    """On the transport's thread, before the header goes out: run the deferred checks and bring the
    rows per peer to the host. A failed check leaves an exchange that sends nothing and whose
    header says so (`transfer.plan.error` is set; the header check raises it)."""
    plan = transfer.plan
    if plan is not None:
        plan.trace.append("resolve")
        for check in plan.checks:
            if bool(check.is_bad.cpu()):
                plan.error = ValueError(check.message())
                transfer.header[INVALID_SLOT] = 1
                break
    if transfer.send_rows is None or (plan is not None and plan.error is not None):
        counts = transfer.block_counts.to("cpu", torch.int64)
        if plan is not None and plan.error is not None:
            counts = torch.zeros_like(counts)
        transfer.block_counts = counts
        transfer.send_rows = counts.sum(dim=1).tolist()


# --------------------------------------------------------------------------------------------
# Lifetime across streams
# --------------------------------------------------------------------------------------------


def protect(tensors: Sequence[Tensor | None], stream: Any) -> None:
    """Keep the caching allocator from reusing `tensors`' memory before `stream`'s work queued so
    far has run (`Tensor.record_stream`). No-op for cpu tensors or `stream=None`."""
    if stream is None:
        return
    for t in tensors:
        if t is not None and t.device.type == "cuda":
            t.record_stream(stream)


_CYCLES_PER_S: dict[int, float] = {}


def cycles_per_second(device: torch.device) -> float:
    """Clock cycles per second of `torch.cuda._sleep`'s spin on `device`, measured once per process:
    timing events around a 2^22-cycle spin on a private stream, polled (`Event.query`, never a host
    sync, so it is allowed under `torch.cuda.set_sync_debug_mode("error")`). The device properties'
    clock rate is gone with CUDA 13, and a guessed one was 25 % off on an H200."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    rate = _CYCLES_PER_S.get(index)
    if rate is None:
        cycles = 1 << 22
        with torch.cuda.device(index):
            stream = torch.cuda.Stream()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with torch.cuda.stream(stream):
                start.record(stream)
                torch.cuda._sleep(cycles)
                end.record(stream)
            while not end.query():
                time.sleep(50e-6)
            rate = cycles / max(start.elapsed_time(end) * 1e-3, 1e-9)
        _CYCLES_PER_S[index] = rate
    return rate


def hold_stream(stream: Any, seconds: float) -> Any:
    """Keep the CUDA `stream` busy for about `seconds` with a one-thread spin kernel, and return an
    event recorded on it after the spin: work that waits on the event (or is queued on `stream`)
    waits; the host and every other stream do not (the emulated link on a device)."""
    cycles = int(seconds * cycles_per_second(stream.device)) if seconds > 0 else 0
    with torch.cuda.stream(stream):
        if cycles > 0:
            torch.cuda._sleep(cycles)
        done = torch.cuda.Event()
        done.record(stream)
    return done


def hand_over(transfer: Transfer) -> None:
    """Teardown side, on the caller's thread: order the caller's current stream after the exchange
    (its done event) and mark the received tensors as used by that stream."""
    if transfer.done_event is None:
        return
    consumer = torch.cuda.current_stream(transfer.send_buf.device)
    consumer.wait_event(transfer.done_event)  # type: ignore[arg-type]  # a torch.cuda.Event when set
    if transfer._result is not None:
        protect(transfer._result, consumer)


# --------------------------------------------------------------------------------------------
# Running one exchange on the transport's thread
# --------------------------------------------------------------------------------------------


class Stager:
    """Copies one exchange's payload device→pinned host before a host-only exchange and back after.

    On cuda the copies run on `side_stream` (the transport's); on cpu (`side_stream=None`, under
    `simulate_device`) they are plain host copies and the events are skipped, so the same sequence
    is exercised without a GPU. `trace` records the steps in the order they ran.
    """

    def __init__(self, side_stream: Any, trace: list[str]) -> None:
        self.side_stream = side_stream
        self.trace = trace

    def to_host(self, tensor: Tensor) -> Tensor:
        """A host copy of `tensor` (pinned on cuda), complete when this returns."""
        self.trace.append("to_host")
        if tensor.device.type == "cpu":
            return tensor.clone()
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        host.copy_(tensor, non_blocking=True)
        self.side_stream.synchronize()  # this thread only: gloo reads the host buffer next
        return host

    def to_device(self, tensor: Tensor, device: torch.device) -> Tensor:
        """`tensor` on `device`, copied through a pinned buffer on the side stream (not waited for)."""
        self.trace.append("to_device")
        if device.type == "cpu":
            return tensor.clone()
        pinned = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        pinned.copy_(tensor)
        return pinned.to(device, non_blocking=True)  # the host allocator keeps `pinned` until the copy ran

    def exchange(
        self, transfer: Transfer, exchange: Callable[[Transfer], tuple[Tensor, Tensor]]
    ) -> tuple[Tensor, Tensor]:
        """Run `exchange` (the transport's) on a host copy of the send rows; return device rows."""
        device = transfer.send_buf.device
        original = transfer.send_buf
        transfer.send_buf = self.to_host(original)
        try:
            self.trace.append("exchange")
            rows, counts = exchange(transfer)
        finally:
            transfer.send_buf = original
        return self.to_device(rows, device), counts


def run(
    transfer: Transfer, exchange: Callable[[Transfer], tuple[Tensor, Tensor]], side_stream: Any
) -> tuple[Tensor, Tensor]:
    """Carry `transfer` on the transport's thread: `exchange` does the header and payload phases.

    Args:
        transfer: the exchange; `transfer.plan` says its kind (None: a plain host exchange).
        exchange: the transport's two-phase exchange of `transfer.send_buf`.
        side_stream: the transport's `torch.cuda.Stream` for cuda tensors, else None.

    Returns:
        `(rows (M, row_bytes) uint8 on the send buffer's device, counts (W, L_max) int64 on cpu)`.
    """
    plan = transfer.plan
    trace = plan.trace if plan is not None else []
    staged = plan is not None and plan.kind == "gloo-staged"
    on_device = side_stream is not None
    with torch.cuda.stream(side_stream) if on_device else contextlib.nullcontext():
        if on_device and transfer.ready_event is not None:
            side_stream.wait_event(transfer.ready_event)
        trace.append("ready")
        # The side stream reads what the caller's stream made: keep it from the allocator meanwhile.
        checks = [c.is_bad for c in plan.checks] if plan is not None else []
        protect([transfer.send_buf, transfer.block_counts, *checks], side_stream)
        resolve(transfer)
        if staged:
            rows, counts = Stager(side_stream, trace).exchange(transfer, exchange)
        else:
            trace.append("exchange")
            rows, counts = exchange(transfer)
        if on_device:
            transfer.done_event = torch.cuda.Event()
            transfer.done_event.record(side_stream)
        trace.append("done")
    return rows, counts
