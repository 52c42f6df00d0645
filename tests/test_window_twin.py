"""The CUDA window's logic on CPU (issue 20): a device setup (`staging.simulate_device`, rows per
peer unknown on the host) forced onto the window carrier runs the CUDA flavour's protocol with a
fake device flavour: its counts reach the host only after a few polls (as a pinned copy's event
would), its rows live in a separate memory with a base offset (the CUDA window is the data area
alone), it never lends views, and its signals are checked in order: the writer's device signal
before the host counter says "issued", the reader's wait only after it, the reader's release before
the slot is marked consumed. Compared bit-exactly with the dense reference; a deferred input check
still stops every rank at the headers."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.distributed as dist

from .carriers import on
from .reference import Case, dense_reference
from .test_staging import DEVICE_CASES, run_case_on

RUN_S = 120.0
POLLS = 3  # the fake counts "land" at the third poll


def _install_fake_device() -> list[str]:
    """Make the window carrier choose `FakeDevice` for cpu tensors in this process; returns the
    log of what its signals saw being wrong (empty when every order held)."""
    from overlap.ops import transport, window

    errors: list[str] = []

    class FakeDevice(window.HostFlavour):
        device_type = "cpu"
        lends = False
        copies_early = True  # the whole send buffer goes out at the setup, before the counts land

        def own_rows(self) -> torch.Tensor:
            return self.lane.own.bytes[self.lane.layout.data :]

        def peer_rows(self, r: int) -> torch.Tensor | None:
            mapping = self.lane.peer_maps.get(r)
            return None if mapping is None else mapping.bytes[self.lane.layout.data :]

        def base(self) -> int:
            return self.lane.layout.data

        def new_rows(self, nbytes: int, transfer) -> torch.Tensor:
            return torch.empty(nbytes, dtype=torch.uint8)

        def prepare(self, transfer) -> None:
            if transfer.send_rows is not None:
                errors.append("a device setup came with host rows per peer")
                return
            checks = transfer.plan.checks if transfer.plan is not None else ()
            # The "device to host" copy: torch copies into numpy-owned words, as the CUDA flavour's
            # non-blocking copy into registered host memory (no value is read in the setup).
            lw = transfer.block_counts.numel()
            words = np.zeros(lw + len(checks), dtype=np.int64)
            parts = [transfer.block_counts.reshape(-1), *(c.is_bad.reshape(1).to(torch.int64) for c in checks)]
            torch.from_numpy(words).copy_(torch.cat(parts))
            transfer.counts_probe = ([POLLS], words[:lw].reshape(transfer.block_counts.shape), words[lw:])
            self.seen = [*getattr(self, "seen", []), transfer]

        def counts_landed(self, probe) -> bool:
            probe[0][0] -= 1
            return probe[0][0] <= 0

        def _counter(self, owner_words, sender: int, slot: int) -> int:
            return int(owner_words[self.lane.layout.counter(sender, slot)])

        def before_write(self, r: int, slot: int) -> None:
            self.writing = (r, slot)

        def after_write(self, r: int, slot: int) -> None:
            if self._counter(self.lane.peer_maps[r].words, self.lane.rank, slot) != -1:
                errors.append(f"after_write({r}, {slot}) after the counter said issued")

        def before_read(self, r: int, slot: int) -> None:
            if self._counter(self.lane.own.words, r, slot) <= 0:
                errors.append(f"before_read({r}, {slot}) before rank {r} issued its write")

        def after_read(self, transfer, slot: int) -> None:
            lay = self.lane.layout
            if int(self.lane.own.words[lay.consumed + slot]) >= (transfer.epoch << 32 | transfer.seq + 1):
                errors.append(f"after_read({slot}) after the slot was marked consumed")
            self.reads = getattr(self, "reads", 0) + 1

    def flavour_for(lane, device):
        return FakeDevice(lane)

    transport.shutdown()  # lanes made from here on choose the fake flavour
    window.flavour_for = flavour_for  # type: ignore[assignment]
    return errors


def _uninstall_fake_device() -> None:
    from overlap.ops import transport, window

    transport.shutdown()  # the pool's processes serve other tests: no fake lane outlives the case
    window.flavour_for = _REAL_FLAVOUR_FOR


def _real_flavour_for():
    from overlap.ops import window

    return window.flavour_for


_REAL_FLAVOUR_FOR = _real_flavour_for()


def _twin_case(case: Case) -> dict:
    from overlap.ops import transport

    errors = _install_fake_device()
    try:
        res = run_case_on(case, "cpu", simulate=True, watch=True)
        lane = transport._workers[dist.group.WORLD.group_name]["window"]
        res["errors"] = errors
        res["reads_seen"] = getattr(lane.flavour, "reads", 0)
        peers = set(range(dist.get_world_size())) - {dist.get_rank()}
        res["early"] = [t.early_rows == peers for t in getattr(lane.flavour, "seen", [])]
        res["flavour"] = type(lane.flavour).__name__
    finally:
        _uninstall_fake_device()
    return res


@pytest.mark.parametrize("case", [DEVICE_CASES[i] for i in (1, 2, 3, 4)])
def test_the_cuda_flavours_logic_on_a_fake_device_equals_the_reference(rank_pools, case):
    results = rank_pools(case.world).run(on, "window", _twin_case, case, timeout_s=RUN_S)
    reference = dense_reference(case)
    for rank, res in enumerate(results):
        assert res["flavour"] == "FakeDevice" and res["kind"] == "window"
        assert res["errors"] == [], res["errors"]
        assert res["reads"] == [], f"rank {rank}: a setup read tensor values on the host: {res['reads']}"
        assert res["reads_seen"] == 2  # dispatch and combine, each read once through the device signals
        # The combine sent its whole buffer to every peer before its counts landed (the dispatch did
        # wherever the peer's window was already mapped: on the first exchange it may not be).
        assert len(res["early"]) == 2 and res["early"][1]
        assert "resolve" in res["traces"][0] and "resolve" in res["traces"][1]
        assert torch.equal(res["x_out"], reference[rank]), f"rank {rank} differs from the dense reference"


def _bad_input_twin_case() -> dict:

    errors = _install_fake_device()
    try:
        return _bad_input_on_fake(errors)
    finally:
        _uninstall_fake_device()


def _bad_input_on_fake(errors: list[str]) -> dict:
    from overlap import ops
    from overlap.errors import CommError
    from overlap.ops import staging

    from .reference import build

    rank, world = dist.get_rank(), dist.get_world_size()
    case = Case(world=world, batches=(4,) * world)
    p = build(case)
    g = dist.group.WORLD.group_name
    x, ids = p["x"][rank], p["ids"][rank].clone()
    if rank == 1:
        ids[2, 1] = case.experts + 3
    with staging.simulate_device():
        y, _, cmd = ops.dispatch_setup(x, ids, g, world, rank, case.experts)
    outcome: dict = {"errors": errors}
    try:
        ops.dispatch_teardown(x, y, ids, cmd, g, world, rank, case.experts)
        outcome["error"] = None
    except ValueError as exc:
        outcome["error"] = ("ValueError", str(exc))
    except CommError as exc:
        outcome["error"] = ("CommError", str(exc))
    res = run_case_on(case, "cpu")
    outcome["after_ok"] = torch.equal(res["x_out"], dense_reference(case)[rank])
    return outcome


def test_a_deferred_check_on_the_fake_device_stops_every_rank_at_the_headers(rank_pools):
    good, bad = rank_pools(2).run(on, "window", _bad_input_twin_case, timeout_s=RUN_S)
    assert bad["error"][0] == "ValueError" and re.search(r"moe_expert_num = 8\), got 11", bad["error"][1])
    assert good["error"][0] == "CommError" and "rank 1 gave dispatch_setup invalid input" in good["error"][1]
    assert good["after_ok"] and bad["after_ok"]
    assert good["errors"] == [] and bad["errors"] == []


def _raw_deferred_case(rounds: int) -> dict:
    """`transport.start` with the rows per peer left to the carrier (`send_rows=None`, host counts,
    no simulation): the host flavour resolves them from the counts; every slot is reused."""
    from overlap.ops import transport

    rank, world = dist.get_rank(), dist.get_world_size()
    g = dist.group.WORLD
    row_bytes = 24
    got = []
    for step in range(rounds):
        rows = [(rank + 2 * r + step) % 4 for r in range(world)]  # rows to each peer, 0 included
        counts = torch.tensor(rows, dtype=torch.int64).view(world, 1)
        blocks = [torch.full((n, row_bytes), 16 * rank + r + step, dtype=torch.uint8) for r, n in enumerate(rows)]
        buf = torch.cat(blocks)
        values = dict.fromkeys(transport.PARAM_FIELDS, 0) | {"ep_world_size": world, "row_bytes": row_bytes}
        header = transport.make_header("dispatch", values, 12, 1)  # the same BS on every rank
        handle = transport.start(
            "dispatch", g, g.group_name, send_buf=buf, send_rows=None, block_counts=counts, header=header
        )
        recv, recv_counts = handle.take()
        with transport._registry_lock:
            transport._registry.pop(handle.ticket, None)
        got.append((recv.clone(), recv_counts.clone()))
    return {"got": got}


def test_a_host_setup_that_leaves_the_rows_per_peer_to_the_window_gets_them_right(rank_pools):
    world, rounds = 3, 6
    results = rank_pools(world).run(on, "window", _raw_deferred_case, rounds, timeout_s=RUN_S)
    for rank, res in enumerate(results):
        for step, (recv, counts) in enumerate(res["got"]):
            sent = [(src + 2 * rank + step) % 4 for src in range(world)]  # what each source sent this rank
            assert counts.view(-1).tolist() == sent
            blocks = [torch.full((n, 24), 16 * src + rank + step, dtype=torch.uint8) for src, n in enumerate(sent)]
            want = torch.cat(blocks)
            assert torch.equal(recv, want), f"rank {rank}, step {step}"
