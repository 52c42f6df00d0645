"""The window carrier: exchanges between the ranks of one machine through shared-memory windows,
with no transport thread.

Each rank of a group owns one receive window, a file in `/dev/shm` that every peer maps once
(`torch.frombuffer` over an `mmap`; names travel through the job's torch.distributed store, so no
collective runs). Its size follows `HCCL_BUFFSIZE` (MB; `DEFAULT_WINDOW_MB` when unset), as the
seed's windows do, and is split into `2 · max_in_flight` slots (one per exchange in flight: a
dispatch and a combine double buffer) of one region per peer::

    control  magic, pid, epoch | consumed[slot] | abort records | counter[sender][slot] | attached
    data     slot 0: region(peer 0) region(peer 1) ...   slot 1: ...
    region   header (32 int64, `protocol.make_header`) | block counts (L_max int64) | row offset
             (1 int64: where this receiver's rows start among those copied) | rows

One exchange, number i of epoch e (id = e << 32 | i + 1), slot i mod S::

    setup (caller)      for every peer: wait until the peer has consumed what this rank last
                        wrote in that region (never blocks: else the write is kept and retried at
                        this rank's next call); counter := -1; header, counts, rows into the
                        peer's region; counter := id
    teardown (caller)   wait (bounded: spin, then sleep with backoff) for every peer's counter ==
                        id, check every peer's header (`protocol.check_headers`: parameters, op
                        order, deferred input checks, abort), copy the rows out, check the counters
                        again, consumed[slot] := id
    emulated link       CPU: no thread either. The setup models the exchange's start on the link
                        (after the lane's previous exchange), its completion the end (+ the
                        duration of the larger of the bytes sent and received); the teardown
                        sleeps out what is left of it. CUDA windows, and a link whose
                        `duration` may block (a test's gate), use the lane's link thread, as the
                        gloo carrier's thread does

While it waits, a rank also completes any other exchange of its own whose rows have all arrived,
so that an exchange torn down out of order never holds a slot a peer needs. Memory order: a
counter is written after its region and read before it (x86-64 keeps stores and loads in order).

Flavours. What differs between the CPU window and the CUDA one is two small strategies, chosen by
a lane's first exchange (`flavour_for`): the *memory* the rows live in and the *signal* a reader
waits on. `HostFlavour` (CPU): rows in the shared-memory window itself, the counter alone, rows
lent to a teardown as views. `CudaFlavour` (CUDA IPC, opt-in with `OVERLAP_TRANSPORT=window`): the
rows in a CUDA tensor shared once with every peer, copies on the lane's CUDA stream after the
setup's ready event, an interprocess event per (peer, slot) beside the counter, a `released`
event per slot so that a slot is not overwritten before its reader's device copy ran; the header,
counts and counters stay in the shared-memory window. A device setup does not know on the host how
many rows each peer gets: it copies its whole send buffer into every peer's region at once
(`copies_early`), and its counts come to page-locked host memory by a non-blocking copy; the
header (with the offset of the peer's rows in what was copied) and the counter wait (kept, retried
at every setup and teardown) until `Event.query()` says the counts landed. The host never waits
for the device (docs/gpu.md).

Faults: `abort` publishes, in this rank's window, the epoch it ends and the exchange number where
its stream stops, with the reason; a peer waiting on this rank for a number at or past it raises
`CommError` naming it (`protocol.StreamAborted`), and stale writes of an old epoch never match a
new id. A peer whose process is gone gives `CommError` at once, a silent one `CommTimeoutError`
after the timeout; both leave the group broken (`transport.recover`). A window's file is unlinked
as soon as every peer has mapped it, else when the lane stops (`transport.shutdown`, `recover`)
or the process exits; a survivor removes a dead peer's, and a process making its first window
removes those of processes that are gone (killed): no file is left in /dev/shm.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import mmap
import multiprocessing.util
import os
import pickle
import queue
import socket
import threading
import time
import weakref
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from ..errors import CommError, CommTimeoutError
from . import staging
from .protocol import (
    _H_LMAX,
    _H_ROWS,
    _H_SEQ,
    HEADER_LEN,
    Ended,
    Lane,
    Refused,
    StreamAborted,
    Transfer,
    check_headers,
    max_in_flight,
    where,
)

DEFAULT_WINDOW_MB = 1024  # address space per rank and group; tmpfs pages are used only when touched
SHM_DIR = "/dev/shm"
SHM_PREFIX = "overlap-win-"
_MAGIC = 0x4F564C57  # "OVLW"
_REASON_WORDS = 26
_REC_WORDS = 4 + _REASON_WORDS  # epoch, stop, first, reason length, reason bytes
_RING = 8  # abort records kept (epochs)
_SPIN_S = 50e-6  # busy-wait this long before sleeping
_MAX_SLEEP_S = 2e-3
_PID_CHECK_S = 0.1
_ALIGN = 4096
_META = 1  # words after the block counts: the offset of the receiver's rows in the rows copied


def window_bytes() -> int:
    """The receive window of one rank and group, in bytes: `HCCL_BUFFSIZE` MB, else the default."""
    raw = os.environ.get("HCCL_BUFFSIZE")
    if not raw:
        return DEFAULT_WINDOW_MB * 2**20
    try:
        megabytes = int(raw)
    except ValueError:
        raise ValueError(f"HCCL_BUFFSIZE must be an integer number of MB, got {raw!r}") from None
    if megabytes < 1:
        raise ValueError(f"HCCL_BUFFSIZE must be >= 1 MB, got {megabytes}")
    return megabytes * 2**20


class _Layout:
    """Word and byte offsets of one window (the same on every rank of the group)."""

    def __init__(self, world: int, slots: int, data_bytes: int) -> None:
        self.world, self.slots = world, slots
        self.epoch, self.pid, self.magic = 2, 1, 0
        self.consumed = 8
        self.records = self.consumed + slots
        self.counters = self.records + _RING * _REC_WORDS
        self.attached = self.counters + world * slots
        ctl_words = self.attached + world
        self.data = -(-ctl_words * 8 // _ALIGN) * _ALIGN
        peers = max(world - 1, 1)
        self.region = (data_bytes // (slots * peers)) // 64 * 64
        self.total = self.data + self.region * slots * peers

    def counter(self, sender: int, slot: int) -> int:
        return self.counters + sender * self.slots + slot

    def region_at(self, owner: int, sender: int, slot: int) -> int:
        index = sender if sender < owner else sender - 1
        return self.data + (slot * max(self.world - 1, 1) + index) * self.region


class _Mapping:
    """One window mapped into this process: its words (numpy, for single-word loads and stores) and
    bytes (torch, for copies)."""

    def __init__(self, path: str, size: int, create: bool) -> None:
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, size)
            self.mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.words = np.frombuffer(self.mm, dtype=np.int64)
        self.bytes = torch.frombuffer(self.mm, dtype=torch.uint8)

    def close(self) -> None:
        self.words = None  # type: ignore[assignment]
        self.bytes = None  # type: ignore[assignment]
        try:
            self.mm.close()
        except BufferError:  # a tensor still views it: the mapping goes with the last view
            pass


_live: weakref.WeakSet[WindowLane] = weakref.WeakSet()
_created = 0  # windows made by this process (makes names and store keys unique)
_created_lock = threading.Lock()


def _unlink_all() -> None:
    for lane in list(_live):
        lane._unlink()


atexit.register(_unlink_all)  # the main process
multiprocessing.util.Finalize(None, _unlink_all, exitpriority=0)  # also multiprocessing's children


def _store() -> Any:
    return dist.distributed_c10d._get_default_store()


# --------------------------------------------------------------------------------------------
# Flavours: where the rows live (memory) and how a reader knows they landed (signal)
# --------------------------------------------------------------------------------------------


class HostFlavour:
    """The CPU window: rows in the shared-memory window itself; the counter is the only signal;
    the rows per peer are on the host at the setup (or resolved from host `block_counts`)."""

    device_type = "cpu"
    lends = True  # a teardown may read the rows as views of the window
    copies_early = False  # a device setup's whole send buffer goes out before its counts are known

    def __init__(self, lane: WindowLane) -> None:
        self.lane = lane

    # memory
    def own_rows(self) -> Tensor:
        return self.lane.own.bytes

    def peer_rows(self, r: int) -> Tensor | None:
        mapping = self.lane.peer_maps.get(r)
        return None if mapping is None else mapping.bytes

    def base(self) -> int:
        return 0  # the rows' memory starts at the window's byte 0

    def new_rows(self, nbytes: int, transfer: Transfer) -> Tensor:
        return self.lane._lend(transfer, nbytes)

    # counts
    def prepare(self, transfer: Transfer) -> None:
        """At the setup: a setup without host rows per peer brings its counts and check flags to
        the host (`transfer.counts_probe`; `counts_landed` says when they are there)."""
        if transfer.send_rows is not None:
            return
        checks = transfer.plan.checks if transfer.plan is not None else ()
        counts = transfer.block_counts.to("cpu", torch.int64).numpy()
        flags = np.array([bool(c.is_bad) for c in checks], dtype=np.int64)
        transfer.counts_probe = (None, counts, flags)

    def counts_landed(self, probe: Any) -> bool:
        return True

    # signal
    def attach(self, r: int) -> bool:
        return True

    def before_write(self, r: int, slot: int) -> None:
        pass

    def after_write(self, r: int, slot: int) -> None:
        pass

    def before_read(self, r: int, slot: int) -> None:
        pass

    def after_read(self, transfer: Transfer, slot: int) -> None:
        pass

    def begin(self, transfer: Transfer) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()

    def close(self) -> None:
        pass


class CudaFlavour(HostFlavour):
    """The CUDA window (CUDA IPC): each rank's receive window is a CUDA tensor of the window's data
    size, shared once with every peer (torch's CUDA IPC sharing, `reduce_tensor`; handles through
    the job's store). Rows are copied straight into the peer's window on the lane's CUDA stream
    after the setup's ready event; an interprocess event per (peer, slot), recorded after the copy,
    is the device signal; the host counter says only that the copy was *issued*. A reader's stream
    waits on the writer's event and copies its rows out, then records its own interprocess event
    `released[slot]`, which the next writer of that slot waits on (so a slot is never overwritten
    before the reader's device copy ran). No host wait on the device: the counts (rows per peer)
    come to pinned host memory with a non-blocking copy and are polled (`Event.query`)."""

    device_type = "cuda"
    lends = False  # the rows are copied out on the lane's stream (its done event orders the reader)
    copies_early = True

    def __init__(self, lane: WindowLane, device: torch.device) -> None:
        super().__init__(lane)
        self.device = device
        lay = lane.layout
        with torch.cuda.device(device):
            self.stream = torch.cuda.Stream(device=device)
            self.window = torch.empty(lay.total - lay.data, dtype=torch.uint8, device=device)
            self.written = {
                (r, s): torch.cuda.Event(interprocess=True)
                for r in range(lane.world)
                if r != lane.rank
                for s in range(lane.slots)
            }
            self.released = [torch.cuda.Event(interprocess=True) for _ in range(lane.slots)]
            from torch.multiprocessing.reductions import reduce_tensor

            rebuild, args = reduce_tensor(self.window)
            blob = {
                "rebuild": (rebuild, args),
                "written": {k: e.ipc_handle() for k, e in self.written.items()},
                "released": [e.ipc_handle() for e in self.released],
            }
        self.key = f"{lane.key_prefix}{lane.rank}/cuda"
        _store().set(self.key, base64.b64encode(pickle.dumps(blob)).decode())
        self.peers: dict[int, tuple[Tensor, dict[tuple[int, int], Any], list[Any]]] = {}
        self.host_slots: dict[int, tuple[np.ndarray, Tensor]] = {}
        self.host_owners: dict[int, Transfer] = {}
        self.pinned: list[Tensor] = []  # registered host memory, unregistered at `close`

    def own_rows(self) -> Tensor:
        return self.window

    def peer_rows(self, r: int) -> Tensor | None:
        peer = self.peers.get(r)
        return None if peer is None else peer[0]

    def base(self) -> int:
        return self.lane.layout.data

    def attach(self, r: int) -> bool:
        """Open rank r's window and events once (False while r has not published them yet)."""
        if r in self.peers:
            return True
        key = f"{self.lane.key_prefix}{r}/cuda"
        store = _store()
        if not store.check([key]):
            return False
        blob = pickle.loads(base64.b64decode(store.get(key)))
        rebuild, args = blob["rebuild"]
        with torch.cuda.device(self.device):
            window = rebuild(*args)
            written = {k: torch.cuda.Event.from_ipc_handle(self.device, h) for k, h in blob["written"].items()}
            released = [torch.cuda.Event.from_ipc_handle(self.device, h) for h in blob["released"]]
        self.peers[r] = (window, written, released)
        return True

    def new_rows(self, nbytes: int, transfer: Transfer) -> Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)  # allocated on the lane's stream

    def prepare(self, transfer: Transfer) -> None:
        """At the setup, on the lane's stream: wait for the setup's ready event (every later copy of
        the exchange follows it there); for a setup without host rows per peer, a non-blocking copy
        of its counts and check flags into pinned host memory, and an event to poll."""
        checks = transfer.plan.checks if transfer.plan is not None else ()
        with torch.cuda.stream(self.stream):
            if transfer.ready_event is not None:
                self.stream.wait_event(transfer.ready_event)  # type: ignore[arg-type]
            staging.protect([transfer.send_buf, transfer.block_counts, *(c.is_bad for c in checks)], self.stream)
        if transfer.send_rows is not None:
            return
        lw = transfer.block_counts.numel()
        array, host = self._host_slot(transfer, lw + len(checks))
        with torch.cuda.stream(self.stream):
            flags = [c.is_bad.reshape(1).to(torch.int64) for c in checks]
            parts = [transfer.block_counts.reshape(-1).to(torch.int64), *flags]
            host[: lw + len(checks)].copy_(torch.cat(parts), non_blocking=True)
            landed = torch.cuda.Event()
            landed.record(self.stream)
        counts = array[:lw].reshape(transfer.block_counts.shape)
        transfer.counts_probe = (landed, counts, array[lw : lw + len(checks)])

    def _host_slot(self, transfer: Transfer, words: int) -> tuple[np.ndarray, Tensor]:
        """Page-locked host words for `transfer`'s counts (numpy, read without a torch call; and the
        torch view the device copies into): its slot's, grown to `words`, or fresh ones while the
        slot's previous exchange is still unresolved (copies into one buffer follow each other on
        the lane's stream)."""
        slot = transfer.seq % self.lane.slots
        have = self.host_slots.get(slot)
        owner = self.host_owners.get(slot)
        busy = owner is not None and owner is not transfer and owner.counts_probe is not None and not owner.cancelled
        if have is not None and have[0].size >= words and not busy:
            self.host_owners[slot] = transfer
            return have
        array = np.zeros(max(words, 64), dtype=np.int64)
        view = torch.from_numpy(array)
        # cudaHostRegister (portable): the device-to-host copy into it stays asynchronous
        code = int(torch.cuda.cudart().cudaHostRegister(view.data_ptr(), array.nbytes, 1))
        if code != 0:
            raise CommError(f"the CUDA window could not page-lock {array.nbytes} bytes of host memory (error {code})")
        self.pinned.append(view)
        if not busy:
            self.host_slots[slot] = (array, view)
            self.host_owners[slot] = transfer
        return array, view

    def counts_landed(self, probe: Any) -> bool:
        return probe[0] is None or bool(probe[0].query())  # a query, never a wait

    def before_write(self, r: int, slot: int) -> None:
        self.stream.wait_event(self.peers[r][2][slot])  # r's read of this slot has run

    def after_write(self, r: int, slot: int) -> None:
        self.written[(r, slot)].record(self.stream)

    def before_read(self, r: int, slot: int) -> None:
        if not self.attach(r):  # r published before it wrote: only a reader that never wrote to r gets here
            raise CommError(f"rank {r} wrote into this rank's CUDA window without publishing its own")
        self.stream.wait_event(self.peers[r][1][(self.lane.rank, slot)])

    def after_read(self, transfer: Transfer, slot: int) -> None:
        self.released[slot].record(self.stream)
        done = torch.cuda.Event()
        done.record(self.stream)
        transfer.done_event = done

    def begin(self, transfer: Transfer) -> contextlib.AbstractContextManager[Any]:
        return torch.cuda.stream(self.stream)

    def close(self) -> None:
        self.peers.clear()
        with contextlib.suppress(Exception):  # the lane is retired: its queued copies may finish first
            self.stream.synchronize()
            for view in self.pinned:
                torch.cuda.cudart().cudaHostUnregister(view.data_ptr())
        self.pinned.clear()
        self.host_slots.clear()
        self.host_owners.clear()


def flavour_for(lane: WindowLane, device: torch.device) -> HostFlavour:
    """The flavour of a lane whose first exchange moves tensors on `device` (tests may replace it)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return CudaFlavour(lane, torch.device("cuda", index))
    return HostFlavour(lane)


class WindowLane(Lane):
    """One group's exchanges through shared-memory windows (see the module)."""

    kind = "window"

    def __init__(self, group: dist.ProcessGroup, group_name: str) -> None:
        super().__init__(group, group_name)
        # One reentrant lock for the protocol state and the windows: setups write under it,
        # waiters read under it (and sleep outside it).
        self.lock = self.io = threading.RLock()  # type: ignore[assignment]
        global _created
        with _created_lock:
            _created += 1
            serial = _created
        self.slots = 2 * max_in_flight()
        self.layout = _Layout(self.world, self.slots, window_bytes())
        self.path = os.path.join(SHM_DIR, f"{SHM_PREFIX}{os.getpid()}-{serial}")
        if serial == 1:
            sweep_stale_windows()
        self.own = _Mapping(self.path, self.layout.total, create=True)
        _live.add(self)
        self.unlinked = False
        w = self.own.words
        w[self.layout.pid] = os.getpid()
        w[self.layout.attached + self.rank] = 1
        w[self.layout.magic] = _MAGIC
        self.peer_maps: dict[int, _Mapping] = {}
        self.peer_pids: dict[int, int] = {}
        self.peer_paths: dict[int, str] = {}
        self.last_written: dict[tuple[int, int], int] = {}  # (peer, slot) -> id this rank wrote there last
        self.writes: list[tuple[Transfer, int]] = []  # (transfer, peer) not written yet, in setup order
        self.pool: list[Tensor] = []  # buffers for received rows, given back by `Transfer.release`
        self.pid_checked = 0.0
        self.link_queue: queue.SimpleQueue[Transfer | None] | None = None
        self.link_thread: threading.Thread | None = None
        self.flavour: HostFlavour | None = None  # chosen by the first exchange's device (`flavour_for`)
        # The generation counts this group's windows in this process: ranks that rebuild lanes
        # symmetrically (shutdown, recover) agree on it.
        self.key_prefix = f"overlap/window/{group_name}/{self._generation(group_name)}/"
        self.host = socket.gethostname()
        _store().set(f"{self.key_prefix}{self.rank}", f"{self.host}|{self.path}|{os.getpid()}")

    _generations: dict[str, int] = {}

    @classmethod
    def _generation(cls, group_name: str) -> int:
        with _created_lock:
            cls._generations[group_name] = cls._generations.get(group_name, 0) + 1
            return cls._generations[group_name]

    # -- mapping peers --

    def _peer(self, r: int) -> _Mapping | None:
        """Rank r's window, mapped on first use; None while r has not made it yet."""
        mapping = self.peer_maps.get(r)
        if mapping is not None:
            return mapping
        key = f"{self.key_prefix}{r}"
        store = _store()
        if not store.check([key]):
            return None
        host, path, pid = store.get(key).decode().split("|")
        if host != self.host:
            raise CommError(
                f"the window carrier needs every rank of group {self.group_name!r} on one machine, but rank {r} "
                f"runs on {host!r} and this rank on {self.host!r}: set OVERLAP_TRANSPORT=gloo"
            )
        mapping = _Mapping(path, self.layout.total, create=False)
        if int(mapping.words[self.layout.magic]) != _MAGIC:
            raise CommError(f"rank {r}'s window {path} on group {self.group_name!r} is not initialised")
        mapping.words[self.layout.attached + self.rank] = 1
        self.peer_maps[r] = mapping
        self.peer_pids[r] = int(pid)
        self.peer_paths[r] = path
        return mapping

    def _unlink(self) -> None:
        if not self.unlinked:
            self.unlinked = True
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    def _maybe_unlink(self) -> None:
        """Unlink this rank's window file once every peer has mapped it (the mappings stay)."""
        if not self.unlinked:
            a = self.layout.attached
            if all(int(self.own.words[a + r]) for r in range(self.world)):
                self._unlink()

    # -- the carrier's part --

    def check_fits(self, transfer: Transfer) -> None:
        device = transfer.send_buf.device
        with self.io:
            if self.flavour is None:
                self.flavour = flavour_for(self, device)
        if self.flavour.device_type != device.type:
            raise ValueError(
                f"{transfer.op}_setup: the window carrier of group {self.group_name!r} moves "
                f"{self.flavour.device_type} tensors (its first exchange's), got {device.type} tensors: use one "
                f"device per group"
            )
        lmax = transfer.block_counts.shape[1]
        row_bytes = transfer.send_buf.shape[1]
        room = self.layout.region - (HEADER_LEN + lmax + _META) * 8
        # Rows per peer unknown on the host (a device setup): any peer may get every row.
        bound = transfer.send_rows or [transfer.send_buf.shape[0]] * self.world
        for r, rows in enumerate(bound):
            need = rows * row_bytes
            if r != self.rank and need > room:
                peers = max(self.world - 1, 1)
                want = -(
                    -((need + (HEADER_LEN + lmax + _META) * 8 + 64) * self.slots * peers + self.layout.data) // 2**20
                )
                raise ValueError(
                    f"{transfer.op}_setup: HCCL_BUFFSIZE is too small for the window carrier: {need} bytes of rows "
                    f"for rank {r} do not fit its window's region of {max(room, 0)} bytes (window "
                    f"{self.layout.total // 2**20} MB = {self.slots} slots x {peers} peers); set HCCL_BUFFSIZE >= "
                    f"{want} (MB), lower max_in_flight, or set OVERLAP_TRANSPORT=gloo"
                )

    def submit(self, transfer: Transfer) -> None:
        """Number the exchange and write it into every peer's window (called with `lock` held)."""
        transfer.seq = self.next_seq
        self.next_seq += 1
        transfer.header[_H_SEQ] = transfer.seq
        transfer.started_at = transfer.issued_at
        transfer.delivered = {self.rank}
        if transfer.plan is not None:
            transfer.plan.trace.append("exchange")
        assert self.flavour is not None  # set by check_fits
        self.flavour.prepare(transfer)  # a device setup: its counts come to the host without a wait
        self.writes += [(transfer, r) for r in range(self.world) if r != self.rank]
        self._flush_writes()
        if transfer.link is not None and self._models_inline(transfer):
            # The emulated link with no thread: its time is modelled here and at completion, and
            # the teardown that finds the rows sleeps out the rest (`Transfer.wait`).
            transfer.started_at = max(transfer.issued_at, self.link_free_at)
            self.link_free_at = transfer.started_at + transfer.link.duration(self._bytes_out(transfer))
            transfer.complete = self._complete_inline
        elif transfer.link is not None:  # the emulated link completes it on the lane's link thread
            if self.link_queue is None:
                self.link_queue = queue.SimpleQueue()
                self.link_thread = threading.Thread(
                    target=self._link_loop, name=f"overlap-link-{self.group_name}", daemon=True
                )
                self.link_thread.start()
            transfer.started_at = None
            self.link_queue.put(transfer)
        else:
            transfer.complete = self._complete_inline

    def _models_inline(self, transfer: Transfer) -> bool:
        """True when the link of `transfer` is modelled without the link thread: host memory (a
        CUDA window's teardown must not hold the host) and a link whose `duration` never blocks."""
        assert transfer.link is not None
        return type(self.flavour) is HostFlavour and not transfer.link.blocking

    def _bytes_out(self, transfer: Transfer) -> int:
        sent = transfer.send_rows or [0] * self.world
        return (sum(sent) - sent[self.rank]) * transfer.send_buf.shape[1]

    def _model_link(self, transfer: Transfer, counts: Tensor, landed_at: float | None) -> float:
        """At completion of an inline-modelled exchange: when the link is done with it (its start +
        the duration of the larger of the bytes sent and received), and the end of its `link`
        interval: that, or the moment a teardown already waiting saw the rows land, if later (a
        peer slower than the model)."""
        assert transfer.link is not None and transfer.started_at is not None
        own_rows = int(counts[self.rank].sum())
        bytes_in = (int(counts.sum()) - own_rows) * transfer.send_buf.shape[1]
        done_at = transfer.started_at + transfer.link.duration(max(self._bytes_out(transfer), bytes_in))
        transfer.link_done_at = done_at
        # Exchanges set up after it were placed on the link by their bytes sent: if this one ends
        # later than that placed it (it received more than it sent), they start later too.
        free = done_at
        for later in sorted(
            (t for t in self.pending if t.seq > transfer.seq and t.epoch == transfer.epoch and t.link_done_at is None),
            key=lambda t: t.seq,
        ):
            if later.link is None or later.started_at is None or later.complete is None:
                continue
            later.started_at = max(later.started_at, free)
            free = later.started_at + later.link.duration(self._bytes_out(later))
        self.link_free_at = max(self.link_free_at, free)
        return max(done_at, landed_at or 0.0)

    def close_epoch(self, epoch: int, reason: str, timeout_s: float) -> None:
        """Publish this rank's abort of `epoch`: where its stream stops, and why (no peer is waited
        for); then the next epoch starts from exchange 0."""
        lay, w = self.layout, self.own.words
        first = self.ended is None or self.stream_epoch != epoch
        # The stream stops at the first number whose rows have not reached every peer.
        unsent = [t.seq for t, _ in self.writes if t.epoch == epoch]
        stop = min([self.next_seq, *unsent])
        rec = lay.records + (epoch % _RING) * _REC_WORDS
        data = reason.encode("utf-8", "replace")[: _REASON_WORDS * 8]
        padded = data + b"\0" * (_REASON_WORDS * 8 - len(data))
        with self.io:
            w[rec] = epoch
            w[rec + 1] = stop
            w[rec + 2] = int(first)
            w[rec + 3] = len(data)
            w[rec + 4 : rec + 4 + _REASON_WORDS] = np.frombuffer(padded, dtype=np.int64)
            w[lay.epoch] = epoch + 1  # after the record: a peer that sees the epoch sees the record
            self.writes = [(t, r) for t, r in self.writes if t.epoch > epoch]
        self.stream_epoch = epoch + 1
        self.next_seq = 0
        self.ended = None

    def stop(self) -> None:
        if self.link_queue is not None:
            self.link_queue.put(None)
        self._unlink()
        if self.flavour is not None:
            self.flavour.close()
        _live.discard(self)

    def join(self, timeout_s: float) -> None:
        if self.link_thread is not None:
            self.link_thread.join(timeout=timeout_s)

    # -- writing --

    def _flush_writes(self) -> None:
        """Write every pending (transfer, peer) whose region the peer has released (with `io` held)."""
        if not self.writes:
            return
        self.writes = [(t, r) for t, r in self.writes if t.cancelled or not self._write(t, r)]

    def _resolved(self, transfer: Transfer) -> bool:
        """True once `transfer`'s rows per peer are on the host: at once for a host setup; for a
        device setup once its counts' copy has landed (polled, never waited for), when the
        deferred checks are applied as `staging.resolve` does."""
        if transfer.send_rows is not None:
            return True
        assert self.flavour is not None
        probe = transfer.counts_probe
        if probe is None or not self.flavour.counts_landed(probe):
            return False
        counts = np.array(probe[1], dtype=np.int64)  # host words (numpy): no torch read, no device wait
        flags = [int(f) for f in probe[2]]
        plan = transfer.plan
        if plan is not None:
            plan.trace.append("resolve")
            for check, bad in zip(plan.checks, flags):
                if bad:
                    plan.error = ValueError(check.message())  # the error path may read device tensors
                    transfer.header[staging.INVALID_SLOT] = 1
                    counts[:] = 0
                    break
        transfer.block_counts = torch.from_numpy(counts)
        transfer.send_rows = [int(v) for v in counts.sum(axis=1)]
        transfer.counts_probe = None
        return True

    def _write(self, transfer: Transfer, r: int) -> bool:
        peer = self._peer(r)
        if peer is None:
            return False
        flavour = self.flavour
        assert flavour is not None
        if not flavour.attach(r):
            return False
        lay = self.layout
        slot = transfer.seq % self.slots
        previous = self.last_written.get((r, slot), 0)
        released = max(int(peer.words[lay.consumed + slot]), int(peer.words[lay.epoch]) << 32)
        if previous and released < previous:
            return False
        lmax = transfer.block_counts.shape[1]
        row_bytes = transfer.send_buf.shape[1]
        base = lay.region_at(r, self.rank, slot)
        counter = lay.counter(self.rank, slot)
        rows_at = base + (HEADER_LEN + lmax + _META) * 8 - flavour.base()
        memory = flavour.peer_rows(r)
        assert memory is not None  # attached above
        if transfer.send_rows is None and flavour.copies_early and r not in transfer.early_rows:
            # A device setup: its rows per peer are not on the host yet, but the whole send buffer
            # fits the peer's region (check_fits): copy it now, say where r's rows start later.
            peer.words[counter] = -1
            with flavour.begin(transfer):
                flavour.before_write(r, slot)
                if transfer.send_buf.numel():
                    memory[rows_at : rows_at + transfer.send_buf.numel()].view(-1, row_bytes).copy_(
                        transfer.send_buf, non_blocking=True
                    )
                flavour.after_write(r, slot)
            transfer.early_rows.add(r)
        if not self._resolved(transfer):
            return False
        assert transfer.send_rows is not None
        offsets = [0]
        for rows in transfer.send_rows:
            offsets.append(offsets[-1] + rows)
        payload = transfer.send_buf[offsets[r] : offsets[r + 1]]
        header = transfer.header.clone()
        header[_H_ROWS] = transfer.send_rows[r]
        ident = _ident(transfer)
        early = r in transfer.early_rows
        peer.words[counter] = -1  # a reader that saw the old id finds it changed
        region = peer.bytes[base : base + (HEADER_LEN + lmax + _META) * 8].view(torch.int64)
        region[:HEADER_LEN].copy_(header)
        region[HEADER_LEN : HEADER_LEN + lmax].copy_(transfer.block_counts[r])
        region[HEADER_LEN + lmax] = offsets[r] if early else 0
        if not early:
            with flavour.begin(transfer):
                flavour.before_write(r, slot)
                if payload.numel():
                    memory[rows_at : rows_at + payload.numel()].view(-1, row_bytes).copy_(payload, non_blocking=True)
                flavour.after_write(r, slot)  # the device signal, before the host's "issued"
        peer.words[counter] = ident
        self.last_written[(r, slot)] = ident
        return True

    # -- reading --

    def _landed(self, transfer: Transfer) -> bool:
        """True once every peer's rows for `transfer` are in this rank's window; updates
        `transfer.delivered`."""
        lay, w = self.layout, self.own.words
        slot, ident = transfer.seq % self.slots, _ident(transfer)
        for r in range(self.world):
            if r not in transfer.delivered and int(w[lay.counter(r, slot)]) == ident:
                transfer.delivered.add(r)
        return len(transfer.delivered) == self.world

    def _sent(self, transfer: Transfer) -> bool:
        """True once this rank's rows for `transfer` are in every peer's window."""
        return not any(t is transfer for t, _ in self.writes)

    def _ended_for(self, transfer: Transfer) -> StreamAborted | None:
        """A peer left `transfer`'s epoch (it aborted) at or before its number: the stream ends."""
        lay = self.layout
        stops: dict[int, tuple[int, bool, str]] = {}
        for r in range(self.world):
            if r == self.rank or r in transfer.delivered:
                continue
            peer = self.peer_maps.get(r)
            if peer is None or int(peer.words[lay.epoch]) <= transfer.epoch:
                continue
            rec = lay.records + (transfer.epoch % _RING) * _REC_WORDS
            if int(peer.words[rec]) != transfer.epoch:
                stops[r] = (0, True, "aborted")  # its record was overwritten: it left long ago
                continue
            stop, first, length = (int(peer.words[rec + k]) for k in (1, 2, 3))
            raw = peer.words[rec + 4 : rec + 4 + _REASON_WORDS].tobytes()[:length]
            stops[r] = (stop, bool(first), raw.decode("utf-8", "replace"))
        hit = {r: v for r, v in stops.items() if v[0] <= transfer.seq}
        if not hit:
            return None
        firsts = {r: why for r, (_, first, why) in hit.items() if first} or {r: why for r, (_, _, why) in hit.items()}
        seq = min(v[0] for v in hit.values())
        ended = Ended(seq, firsts)
        return StreamAborted(
            f"{transfer.op} exchange{where(transfer)} failed: {ended.describe(transfer.group_name)}", seq, firsts
        )

    def _receive(self, transfer: Transfer, lend: bool = False) -> tuple[Tensor, Tensor]:
        """Check the peers' headers and copy this rank's rows out of its window (`transfer` has
        arrived); marks the slot consumed even when the check fails. With `lend` (the caller of
        `Transfer.take_chunks` waits for it), the rows are not copied: `transfer.chunks` are views
        of the window (and of the send buffer), and the slot stays held until `Transfer.release`."""
        lay, own = self.layout, self.own
        flavour = self.flavour
        assert flavour is not None
        lend = lend and flavour.lends
        memory = flavour.own_rows()
        slot, ident = transfer.seq % self.slots, _ident(transfer)
        held = False
        lmax = transfer.block_counts.shape[1]
        row_bytes = transfer.send_buf.shape[1]
        assert transfer.send_rows is not None
        try:
            headers = {}
            for r in range(self.world):
                if r != self.rank:
                    base = lay.region_at(self.rank, r, slot)
                    headers[r] = own.bytes[base : base + HEADER_LEN * 8].view(torch.int64).clone()
            check_headers(transfer, headers, self.rank)
            offsets = [0]
            for rows in transfer.send_rows:
                offsets.append(offsets[-1] + rows)
            counts = torch.empty(self.world, lmax, dtype=torch.int64)
            chunks = []
            for r in range(self.world):
                if r == self.rank:
                    counts[r] = transfer.block_counts[r]
                    chunks.append(transfer.send_buf[offsets[r] : offsets[r + 1]])
                    continue
                base = lay.region_at(self.rank, r, slot) + HEADER_LEN * 8
                words = own.bytes[base : base + (lmax + _META) * 8].view(torch.int64)
                counts[r] = words[:lmax]
                n, skip = int(headers[r][_H_ROWS]), int(words[lmax])
                if int(headers[r][_H_LMAX]) != lmax or skip < 0 or (skip + n) * row_bytes > lay.region:
                    raise CommError(f"rank {r} wrote a malformed region for exchange #{transfer.seq}")
                start = base + (lmax + _META) * 8 - flavour.base() + skip * row_bytes
                chunks.append(memory[start : start + n * row_bytes].view(n, row_bytes))
            if lend:
                transfer.chunks = chunks

                def give_back() -> None:
                    cell = lay.consumed + slot
                    with self.io:
                        own.words[cell] = max(int(own.words[cell]), ident)

                transfer._give_back, held = give_back, True
                if transfer.plan is not None:
                    transfer.plan.trace.append("done")
                return transfer.send_buf[:0], counts
            total = sum(c.shape[0] for c in chunks)
            with flavour.begin(transfer):
                for r in range(self.world):
                    if r != self.rank:
                        flavour.before_read(r, slot)
                rows_out = flavour.new_rows(total * row_bytes, transfer).view(total, row_bytes)
                torch.cat(chunks, out=rows_out)
                flavour.after_read(transfer, slot)
            for r in range(self.world):
                if r != self.rank and int(own.words[lay.counter(r, slot)]) != ident:
                    raise CommError(
                        f"{transfer.op} exchange{where(transfer)} on group {self.group_name!r}: rank {r} overwrote "
                        f"exchange #{transfer.seq} while this rank read it"
                    )
            if transfer.plan is not None:
                transfer.plan.trace.append("done")
            return rows_out, counts
        finally:
            if not held:
                cell = lay.consumed + slot
                own.words[cell] = max(int(own.words[cell]), ident)

    def _lend(self, transfer: Transfer, nbytes: int) -> Tensor:
        """A buffer of `nbytes` for `transfer`'s received rows, from the lane's pool when one fits
        (a fresh large allocation costs a page fault per 4 KiB page: more than the copy itself);
        `Transfer.release` gives it back."""
        with self.io:
            fits = [i for i, b in enumerate(self.pool) if nbytes <= b.numel() <= 2 * nbytes + 4096]
            if fits:  # by index: `list.remove` would compare tensors by value
                buf = self.pool.pop(min(fits, key=lambda i: self.pool[i].numel()))
            else:
                buf = torch.empty(nbytes, dtype=torch.uint8)

        def give_back() -> None:
            with self.io:
                self.pool.append(buf)
                while len(self.pool) > 2 * self.slots:
                    self.pool.pop(0)

        transfer._give_back = give_back
        return buf[:nbytes]

    def _drain(self, skip: Transfer | None) -> None:
        """Complete every other inline exchange of this lane whose rows have all arrived (with `io`
        held), so that none holds a slot a peer waits for."""
        with self.lock:
            others = sorted(
                (t for t in self.pending if t is not skip and t.complete is not None and not t._done.is_set()),
                key=lambda t: t.seq,
            )
        for t in others:
            if not t.cancelled and t.epoch == self.stream_epoch and self._landed(t) and self._resolved(t):
                self._run(t)

    def _run(self, transfer: Transfer, lend: bool = False, landed_at: float | None = None) -> None:
        """Receive an arrived transfer and finish it (with `io` held). `landed_at`: when a teardown
        that was already waiting saw its rows land (for an inline-modelled link)."""
        result, error = None, None
        try:
            result = self._receive(transfer, lend)
        except BaseException as exc:
            error = self.outcome(transfer, exc)
        link_end = None
        if error is None and result is not None and transfer.link is not None and transfer.complete is not None:
            link_end = self._model_link(transfer, result[1], landed_at)  # before `finish` wakes a waiter
        self.finish(transfer, result, error)
        if link_end is not None:
            transfer.finished_at = link_end

    def _await(
        self, transfer: Transfer, timeout_s: float, teardown: bool
    ) -> tuple[tuple[Tensor, Tensor] | None, BaseException | None]:
        """Wait (bounded) until `transfer` has landed and been sent, then receive it: a teardown
        finishes it (unless another thread did), the link thread gets `(rows, counts)` back.
        Returns `(result, error)`: the error that ended the wait, or the receive's."""
        deadline = time.perf_counter() + timeout_s
        began = time.perf_counter()
        sleep = 20e-6
        waited = False  # the rows were not there at the first look
        while True:
            if transfer._done.is_set():
                return None, None
            refused = self._refusal_for(transfer)
            if refused is not None:
                return None, refused
            with self.io:
                if transfer._done.is_set():
                    return None, None
                self._flush_writes()
                self._maybe_unlink()
                if self._landed(transfer) and self._sent(transfer) and self._resolved(transfer):
                    if teardown:
                        landed_at = time.perf_counter() if waited else None
                        self._run(transfer, lend=transfer.wants_chunks, landed_at=landed_at)
                        return None, None
                    try:
                        return self._receive(transfer), None
                    except BaseException as exc:
                        return None, exc
                waited = True
                self._drain(transfer)
                aborted = self._ended_for(transfer)
                if aborted is not None:
                    return None, aborted
                now = time.perf_counter()
                if now - self.pid_checked > _PID_CHECK_S:
                    self.pid_checked = now
                    gone = self._dead_peers(transfer)
                    for r in gone:  # it cannot remove its window any more: do it for it
                        path = self.peer_paths.get(r)
                        if path is not None and os.path.exists(path):
                            with contextlib.suppress(OSError):
                                os.unlink(path)
                    if gone:
                        return None, CommError(
                            f"{transfer.op} exchange{where(transfer)} on group {self.group_name!r}: ranks {gone} "
                            f"exited (their processes are gone); ranks {self._missing(transfer)} have not delivered"
                        )
            now = time.perf_counter()
            if now >= deadline:
                return None, CommTimeoutError(
                    f"{transfer.op}{'_teardown' if teardown else ' exchange'}{where(transfer)} on group "
                    f"{self.group_name!r} timed out after {timeout_s:g} s: ranks {self._missing(transfer)} have not "
                    f"delivered (set OVERLAP_TIMEOUT_S or comm_options(timeout_s=...) to wait longer)"
                )
            if now - began > _SPIN_S:
                time.sleep(min(sleep, deadline - now))
                sleep = min(sleep * 2, _MAX_SLEEP_S)

    def _missing(self, transfer: Transfer) -> list[int]:
        missing = set(range(self.world)) - transfer.delivered
        missing |= {r for t, r in self.writes if t is transfer}  # this rank's rows not in r's window yet
        return sorted(missing)

    def _dead_peers(self, transfer: Transfer) -> list[int]:
        gone = []
        for r in self._missing(transfer):
            pid = self.peer_pids.get(r)
            if pid is None or pid == os.getpid():
                continue
            if _process_gone(pid):
                gone.append(r)
        return gone

    def _refusal_for(self, transfer: Transfer) -> BaseException | None:
        with self.lock:
            if self.broken is not None:
                return Refused(str(self.unusable_error()))
            if self.ended is not None and transfer.epoch == self.stream_epoch and transfer.seq >= self.ended.seq:
                return Refused(
                    f"{transfer.op} exchange{where(transfer)} cancelled: {self.ended.describe(self.group_name)}"
                )
            if transfer.cancelled:
                return Refused(f"{transfer.op} exchange{where(transfer)} was cancelled by overlap.ops.abort")
        return None

    def _complete_inline(self, transfer: Transfer, timeout_s: float) -> None:
        _, error = self._await(transfer, timeout_s, teardown=True)
        if error is not None and not transfer._done.is_set():
            self.finish(transfer, None, self.outcome(transfer, error))

    def _link_loop(self) -> None:
        assert self.link_queue is not None
        while True:
            transfer = self.link_queue.get()
            if transfer is None:
                return
            transfer.started_at = time.perf_counter()
            result, error = self._await(transfer, transfer.timeout_s, teardown=False)
            if error is None and result is not None:
                rows = result[0]
                row_bytes = transfer.send_buf.shape[1]
                sent = transfer.send_rows or [0] * self.world
                out_bytes = (sum(sent) - sent[self.rank]) * row_bytes
                in_bytes = (rows.shape[0] - sent[self.rank]) * row_bytes
                # a CUDA window holds its stream (the reader's copies and done event are queued there)
                stream = self.flavour.stream if isinstance(self.flavour, CudaFlavour) else None
                try:
                    self.hold_on_link(transfer, max(out_bytes, in_bytes), stream=stream)
                except BaseException as exc:
                    error = exc
            if error is not None:
                error = self.outcome(transfer, error)
            self.finish(transfer, result if error is None else None, error)


def sweep_stale_windows() -> list[str]:
    """Unlink the window files of processes that are gone (killed before they could clean up: a
    SIGKILL, `os._exit`); runs when a process makes its first window. Returns the paths removed."""
    removed: list[str] = []
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(SHM_PREFIX):
            continue
        try:
            pid = int(name[len(SHM_PREFIX) :].split("-", 1)[0])
        except ValueError:
            continue
        if pid != os.getpid() and _process_gone(pid):
            try:
                os.unlink(os.path.join(SHM_DIR, name))
                removed.append(name)
            except OSError:
                pass
    return removed


def _process_gone(pid: int) -> bool:
    """True when process `pid` has exited (a zombie not yet reaped by its parent counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state in (b"Z", b"X")


def _ident(transfer: Transfer) -> int:
    return (transfer.epoch << 32) | (transfer.seq + 1)
