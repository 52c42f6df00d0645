"""The gloo carrier: point-to-point messages over the group's torch.distributed backend, carried by
one ordered thread per group. Also the base of the `nccl` carrier (same messages, on the device).

One exchange (a setup's send, completed by its teardown)::

    setup (caller thread):   stage rows into a private send buffer -> Transfer -> lane queue
    thread (one per group):  phase 1  header to / from every peer (`protocol.make_header`)
                             check    every peer's header equals ours -> else raise on all ranks
                             phase 2  payload to / from every peer  (block counts + rows)
                             link     emulated: complete no earlier than start + latency +
                                      max(bytes out, bytes in) / bandwidth (sleeping: no core used)
    teardown (caller):       wait (bounded) -> received rows and counts, owned by the Transfer

All exchanges of a group go through its single thread in setup order, so every rank issues its
messages in the same order however the caller interleaves setups, teardowns and compute. An abort
travels as an abort header at this rank's next exchange number; no gloo operation is ever
cancelled: a posted receive always gets the message it waits for (a header, or an abort header in
its place), so the streams between ranks never fall out of step. A timeout or a dead peer leaves
the backend's pair closed: the lane is broken (`transport.recover`).
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..errors import CommError, CommTimeoutError
from . import staging
from .protocol import (
    _H_MAGIC,
    _H_OP,
    _H_ROWS,
    _H_SEQ,
    HEADER_LEN,
    MAGIC,
    OP_ABORT,
    AbortMarker,
    Ended,
    Lane,
    Refused,
    Transfer,
    check_headers,
    decode_reason,
    make_abort_header,
    where,
    wire_device,
)


class _Waiters:
    """Daemon threads that each wait on one posted gloo op at a time, for `P2PLane._wait_all`.

    gloo waits on one op per call, a wait cannot be cut short, and a wait that times out closes every
    connection of the group: so a lane waits on all the ops of an exchange at once, each for the
    whole time left. Threads are made as needed (never fewer than the ops being waited on) and kept.
    Not a `ThreadPoolExecutor`: its threads are joined at interpreter exit, so a wait left pending
    on a dead or silent peer would hold the process's exit for the rest of the timeout.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.jobs: queue.SimpleQueue[tuple[Any, float, Callable[[BaseException | None], None]] | None] = (
            queue.SimpleQueue()
        )
        self.lock = threading.Lock()
        self.threads = 0
        self.busy = 0  # jobs queued or being waited on

    def start(self, work: Any, timeout_s: float, report: Callable[[BaseException | None], None]) -> None:
        with self.lock:
            self.busy += 1
            grow = self.busy > self.threads
            self.threads += int(grow)
        if grow:
            threading.Thread(target=self._run, name=f"{self.name}-wait", daemon=True).start()
        self.jobs.put((work, timeout_s, report))

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            work, timeout_s, report = job
            outcome: BaseException | None = None
            try:
                if work.wait(timedelta(seconds=timeout_s)) is False:
                    outcome = TimeoutError("the wait returned False")
            except Exception as exc:  # noqa: BLE001 - handed to the lane, which names the peer
                outcome = exc
            with self.lock:
                self.busy -= 1
            report(outcome)

    def stop(self) -> None:
        with self.lock:
            threads = self.threads
        for _ in range(threads):
            self.jobs.put(None)


class P2PLane(Lane):
    """Carries one group's exchanges, in order, on one daemon thread.

    Exchange numbers (`seq`) are given here, when an exchange starts, so a setup refused before
    reaching the worker takes none. The stream of exchanges is cut by aborts (`abort`): at the
    first exchange number where any rank sends an abort header, every rank's stream of that epoch
    ends; the rest of the epoch fails locally, without communicating, and the next epoch (after
    this rank's own `abort`, an `AbortMarker` in the queue) goes on from the next number.
    """

    kind = "gloo"

    def __init__(self, group: dist.ProcessGroup, group_name: str) -> None:
        super().__init__(group, group_name)
        self.queue: queue.SimpleQueue[Transfer | AbortMarker | threading.Event | None] = queue.SimpleQueue()
        self.side_stream: torch.cuda.Stream | None = None
        self.posts_each = dist.get_backend(group) == "gloo"  # see `_post`
        self.lingering: list[tuple[list[Any], dict[int, Tensor], dict[int, Tensor]]] = []  # see `_p2p`
        self.waiters = _Waiters(f"overlap-comm-{group_name}")
        self.thread = threading.Thread(target=self._loop, name=f"overlap-comm-{group_name}", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            if isinstance(item, threading.Event):  # group_status(wait_s=...): everything before ran
                item.set()
                continue
            if isinstance(item, AbortMarker):
                self._close_epoch(item)
                continue
            transfer = item
            transfer.started_at = time.perf_counter()
            result: tuple[Tensor, Tensor] | None = None
            error: BaseException | None = None
            try:
                if self.broken is not None:
                    raise Refused(str(self.unusable_error()))
                if self.ended is not None:  # the stream of this epoch ended at an abort: no exchange
                    raise Refused(
                        f"{transfer.op} exchange{where(transfer)} cancelled: {self.ended.describe(self.group_name)}"
                    )
                transfer.seq = self.next_seq
                self.next_seq += 1
                transfer.header[_H_SEQ] = transfer.seq
                self.device = transfer.send_buf.device
                if transfer.cancelled:  # its own abort: tell every peer at this exchange number
                    aborters = self._abort_exchange(transfer.seq, transfer.abort_reason, transfer.timeout_s)
                    with self.lock:
                        self.ended = Ended(transfer.seq, aborters)
                else:
                    result = self._run_on_device(transfer)
            except BaseException as exc:  # surfaces on the teardown, with the cause chained
                error = self.outcome(transfer, exc)
            self.finish(transfer, result, error)

    def _close_epoch(self, marker: AbortMarker) -> None:
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
        device = wire_device(self.group, self.device)
        if device.type != "cpu":  # NCCL moves device tensors only
            outs = {r: h.to(device) for r, h in outs.items()}
            ins = {r: h.to(device) for r, h in ins.items()}
        probe.delivered = {self.rank}
        self._p2p(outs, ins, probe, time.perf_counter() + timeout_s)
        aborters = {self.rank: reason}
        for r, h in ins.items():
            h = h.cpu()
            if int(h[_H_MAGIC]) == MAGIC and int(h[_H_OP]) == OP_ABORT:
                aborters[r] = decode_reason(h)
        return aborters

    def _run_on_device(self, transfer: Transfer) -> tuple[Tensor, Tensor]:
        """CPU: exchange on this thread. CUDA: on a side stream that first waits for the setup's
        staging (`ready_event`), then records `done_event` for the teardown's stream to wait on;
        staged through pinned host buffers over gloo (see `staging.run`). Then the emulated link
        (`hold_on_link`): a sleep of this thread on cpu, a hold of the side stream on cuda."""
        if self.side_stream is None and transfer.send_buf.device.type == "cuda":
            self.side_stream = torch.cuda.Stream(device=transfer.send_buf.device)
        side_stream = self.side_stream if transfer.send_buf.device.type == "cuda" else None
        result = staging.run(transfer, self._exchange, side_stream)
        # the emulated link: on cuda a hold of the side stream (after the rows landed there), else a sleep
        self.hold_on_link(transfer, transfer.link_bytes, stream=side_stream)
        return result

    # -- phases --

    def _post(self, sends: dict[int, Tensor], recvs: dict[int, Tensor]) -> list[Any]:
        """Post the receives and sends; their works (receives first), in the order of `recvs`, then
        `sends`. On gloo each is posted on its own, sends first, and a post that raises (gloo
        refuses to post to a peer whose connection already closed) becomes that op's outcome: the
        other peers still get this rank's rows, so a dead rank is named as such by every survivor
        instead of stalling the live ones. NCCL posts them as one batch (its ordering needs it)."""
        if not self.posts_each:
            ops = [dist.P2POp(dist.irecv, buf, self.peers[r], self.group) for r, buf in recvs.items()]
            ops += [dist.P2POp(dist.isend, buf, self.peers[r], self.group) for r, buf in sends.items()]
            return dist.batch_isend_irecv(ops) if ops else []

        def post(fn: Callable[..., Any], buf: Tensor, peer: int) -> Any:
            try:
                return fn(buf, self.peers[peer], group=self.group)
            except Exception as exc:  # noqa: BLE001 - raised at its wait, naming the peer
                return exc

        sent = [post(dist.isend, buf, r) for r, buf in sends.items()]
        received = [post(dist.irecv, buf, r) for r, buf in recvs.items()]
        return received + sent

    def _p2p(self, sends: dict[int, Tensor], recvs: dict[int, Tensor], transfer: Transfer, deadline: float) -> None:
        """Post the sends and receives and wait for them until `deadline`; raise on the first that
        fails, naming its peer and the ranks that have not delivered. On gloo all ops are waited on
        at once (`_wait_all`), so a dead peer is named the moment its connection closes, whatever
        the order of the ops. The works and buffers of a failed exchange stay referenced by the lane
        (`lingering`): the backend may still write into or read from them."""
        works = self._post(sends, recvs)
        ops = [(r, True) for r in recvs] + [(r, False) for r in sends]

        def landed(i: int) -> None:  # as each lands: a teardown that times out meanwhile names the rest
            peer, receiving = ops[i]
            if receiving:
                transfer.delivered.add(peer)

        # (op index, cause, timed out?) of the ops that failed, in the order they failed
        failures: list[tuple[int, BaseException, bool]] = []
        if self.posts_each:
            failures = self._wait_all(works, deadline, landed)
        else:
            for i, work in enumerate(works):
                try:
                    ok = work.wait(timedelta(seconds=max(deadline - time.perf_counter(), 0.001)))
                    if ok is False:
                        raise TimeoutError("the wait returned False")
                except Exception as exc:
                    failures.append((i, exc, time.perf_counter() >= deadline - 0.01))
                    break
                landed(i)
        if not failures:
            return
        self.lingering.append((works, sends, recvs))
        index, cause, timed_out = failures[0]
        peer, receiving = ops[index]
        missing = sorted(set(recvs) - transfer.delivered)
        where = f" ({transfer.label})" if transfer.label else ""
        error: CommError | CommTimeoutError
        if timed_out:
            error = CommTimeoutError(
                f"{transfer.op} exchange{where} on group {self.group_name!r} timed out after "
                f"{transfer.timeout_s:g} s: ranks {missing} have not delivered ({cause})"
            )
        else:
            who = f"receiving from rank {peer}" if receiving else f"sending to rank {peer}"
            error = CommError(
                f"{transfer.op} exchange{where} on group {self.group_name!r}: {who} failed ({cause}); "
                f"ranks {missing} have not delivered"
            )
        raise error from cause

    def _wait_all(
        self, works: list[Any], deadline: float, landed: Callable[[int], None]
    ) -> list[tuple[int, BaseException, bool]]:
        """gloo: wait for all `works` at once (each on a waiter thread, for the whole time left)
        until every one completed or one failed, calling `landed(index)` as each completes: the
        failures as (index, cause, timed out?), in the order they happened. A dead peer is thus seen the moment
        its connection closes, even while an op with a live but silent peer is pending (a survivor
        that gave up at an earlier exchange, which the dead peer had completed with this rank)."""
        cond = threading.Condition()
        outcomes: dict[int, BaseException | None] = {}
        failures: list[tuple[int, BaseException, bool]] = []

        def report(index: int) -> Callable[[BaseException | None], None]:
            def done(outcome: BaseException | None) -> None:
                with cond:
                    outcomes[index] = outcome
                    if outcome is None:
                        landed(index)
                    else:
                        failures.append((index, outcome, time.perf_counter() >= deadline - 0.01))
                    cond.notify()

            return done

        for i, work in enumerate(works):
            if isinstance(work, Exception):  # refused at its post
                report(i)(work)
            else:
                self.waiters.start(work, max(deadline - time.perf_counter(), 0.001), report(i))
        with cond:
            while len(outcomes) < len(works) and not failures:
                # the waits themselves end at the deadline: the slack only guards against a lost report
                if not cond.wait(timeout=max(deadline - time.perf_counter(), 0.0) + 5.0):
                    lost = next(i for i in range(len(works)) if i not in outcomes)
                    failures.append((lost, TimeoutError("the backend's wait did not return"), True))
            return list(failures)

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
        check_headers(transfer, headers_in, me)
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

        out_bytes = sum(s.numel() for s in sends.values())
        in_bytes = sum(b.numel() for b in recvs.values())
        transfer.link_bytes = max(out_bytes, in_bytes)  # held by `_run_on_device`
        return recv_rows, recv_counts

    def submit(self, transfer: Transfer) -> None:
        self.queue.put(transfer)

    def close_epoch(self, epoch: int, reason: str, timeout_s: float) -> None:
        self.queue.put(AbortMarker(epoch, reason, timeout_s))

    def flush(self, wait_s: float) -> None:
        flushed = threading.Event()
        self.queue.put(flushed)
        flushed.wait(wait_s)

    def stop(self) -> None:
        self.queue.put(None)  # its thread may still sit in a backend wait; it is a daemon
        self.waiters.stop()

    def join(self, timeout_s: float) -> None:
        self.thread.join(timeout=timeout_s)
