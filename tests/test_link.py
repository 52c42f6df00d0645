"""The emulated link's model: an exchange completes no earlier than `latency_s + bytes /
bandwidth_bytes_per_s` after it starts (bytes: the larger of what this rank sends to and receives
from its peers), and the exchanges of one group are carried one after another. Only lower bounds
and orderings are asserted: they hold however loaded the machine is."""

from __future__ import annotations

import threading
import time

import pytest
import torch
import torch.distributed as dist

from overlap import ops
from overlap.ops import staging
from overlap.ops.protocol import Lane, Transfer

from .carriers import CPU_CARRIERS, on
from .gates import LinkGates
from .reference import Case, build

LATENCY_S = 0.02
MODEL_S = 0.4  # bytes / bandwidth of the first exchange (bandwidth chosen from its byte count)


def test_duration_is_latency_plus_bytes_over_bandwidth():
    link = ops.EmulatedLink(latency_s=0.5, bandwidth_bytes_per_s=1000.0)
    assert link.duration(0) == 0.5
    assert link.duration(1000) == 1.5
    assert link.duration(250) == 0.75
    assert ops.EmulatedLink(latency_s=0.0, bandwidth_bytes_per_s=4e9).duration(2_000_000_000) == 0.5


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        ({"latency_s": -1e-3}, r"latency_s must be >= 0, got -0.001"),
        ({"bandwidth_bytes_per_s": 0.0}, r"bandwidth_bytes_per_s must be > 0, got 0.0"),
        ({"bandwidth_bytes_per_s": -5.0}, r"bandwidth_bytes_per_s must be > 0, got -5.0"),
    ],
)
def test_link_rejects_bad_parameters(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        ops.EmulatedLink(**kwargs)


def test_configure_rejects_a_link_of_the_wrong_type():
    with pytest.raises(TypeError, match=r"link must be an EmulatedLink or None, got tuple"):
        ops.configure(link=(1e-3, 1e9))


def _payload_bytes(case: Case, rank: int) -> int:
    """max(bytes sent to, bytes received from) the peers: routed rows times the staging row
    (Align256(H) bf16 elements), counted from the routing. The block counts sent with the rows
    are left out, so the bound below is a little lower than the modelled time."""
    p = build(case)
    local = case.local_experts
    row = -(-case.hidden // 256) * 256 * 2
    sent = sum(1 for e in p["ids"][rank].flatten().tolist() if e // local != rank)
    received = sum(
        1 for src in range(case.world) if src != rank for e in p["ids"][src].flatten().tolist() if e // local == rank
    )
    return max(sent, received) * row


def _link_case(case: Case, bandwidth: float) -> list[dict]:
    """Two dispatches in flight at once on the group (the first is held on the link until the second
    is set up), then both torn down: their link times."""
    rank, world = dist.get_rank(), dist.get_world_size()
    p = build(case)
    g = dist.group.WORLD.group_name
    x, ids = p["x"][rank], p["ids"][rank]
    gates = LinkGates(hold={0})
    ops.configure(link=gates.link(latency_s=LATENCY_S, bandwidth_bytes_per_s=bandwidth))
    try:
        first = ops.dispatch_setup(x, ids, g, world, rank, case.experts)
        second = ops.dispatch_setup(x, ids, g, world, rank, case.experts)
        handles = [ops.transfer_of(first[2]), ops.transfer_of(second[2])]
        first_open = not handles[0].is_complete
        gates.release(0)
        for y, _, cmd in (first, second):
            ops.dispatch_teardown(x, y, ids, cmd, g, world, rank, case.experts)
    finally:
        gates.release_all()
        ops.configure(link=None)
    return [
        {"started": h.started_at, "finished": h.finished_at, "first_open": first_open, "expired": gates.expired}
        for h in handles
    ]


@pytest.mark.parametrize("carrier", CPU_CARRIERS)
def test_exchanges_take_at_least_the_modelled_time_one_after_another(rank_pools, carrier):
    case = Case(world=2, batches=(16, 16), experts=8, top_k=2, seed=21)
    nbytes = [_payload_bytes(case, r) for r in range(case.world)]
    bandwidth = max(nbytes) / MODEL_S  # the rank that moves the most bytes models MODEL_S
    results = rank_pools(2).run(on, carrier, _link_case, case, bandwidth)
    for rank, (a, b) in enumerate(results):
        modelled = LATENCY_S + nbytes[rank] / bandwidth
        assert modelled >= LATENCY_S + 0.5 * MODEL_S  # both ranks move a comparable amount
        # Lower bounds: they cannot flake on a slow machine.
        assert a["finished"] - a["started"] >= modelled, (rank, a, modelled)
        assert b["finished"] - b["started"] >= modelled, (rank, b, modelled)
        # One link per group: the second exchange starts only after the first has completed,
        # and so completes no earlier than two modelled durations after the first started.
        assert b["started"] >= a["finished"], (rank, a, b)
        assert b["finished"] - a["started"] >= 2 * modelled
        assert a["first_open"] and a["expired"] == []  # both were in flight together


def _inline_link_case(case: Case, bandwidth: float) -> dict:
    """Window carrier, a plain (non-blocking) link: two dispatches in flight, then both torn down."""
    import time

    rank, world = dist.get_rank(), dist.get_world_size()
    p = build(case)
    g = dist.group.WORLD.group_name
    x, ids = p["x"][rank], p["ids"][rank]
    ops.configure(link=ops.EmulatedLink(latency_s=LATENCY_S, bandwidth_bytes_per_s=bandwidth))
    try:
        first = ops.dispatch_setup(x, ids, g, world, rank, case.experts)
        second = ops.dispatch_setup(x, ids, g, world, rank, case.experts)
        handles = [ops.transfer_of(first[2]), ops.transfer_of(second[2])]
        open_before = [not h.is_complete for h in handles]
        returned = []
        for y, _, cmd in (first, second):
            ops.dispatch_teardown(x, y, ids, cmd, g, world, rank, case.experts)
            returned.append(time.perf_counter())
    finally:
        ops.configure(link=None)
    return {
        "kind": ops.transport_kind(g),
        # `complete` set: the thread that waits completes the exchange (never the lane's link thread)
        "inline": [h.complete is not None for h in handles],
        "open_before": open_before,
        "spans": [(h.issued_at, h.started_at, h.link_done_at, h.finished_at) for h in handles],
        "returned": returned,
    }


def test_the_window_link_is_modelled_without_a_thread(rank_pools):
    """On the CPU window the setup models when the link starts the exchange, its completion when it
    ends, and the teardown sleeps out the rest: no link thread (it would need a core to wake on,
    which a busy host hands out a scheduler slice late). The model is the same: lower bounds and
    one exchange after another."""
    case = Case(world=2, batches=(16, 16), experts=8, top_k=2, seed=21)
    nbytes = [_payload_bytes(case, r) for r in range(case.world)]
    bandwidth = max(nbytes) / MODEL_S
    for rank, res in enumerate(rank_pools(2).run(on, "window", _inline_link_case, case, bandwidth)):
        assert res["kind"] == "window" and res["inline"] == [True, True], res
        assert res["open_before"] == [True, True]  # nothing completes before its modelled time
        modelled = LATENCY_S + nbytes[rank] / bandwidth
        (issued0, start0, done0, end0), (issued1, start1, done1, end1) = res["spans"]
        eps = 1e-6  # perf_counter values near 10^4 s: their differences carry ~1e-12 s of rounding
        assert start0 >= issued0 and done0 - start0 >= modelled - eps and end0 >= done0
        assert start1 >= done0 - eps  # the second waits for the first on the one link
        assert done1 - start1 >= modelled - eps and end1 >= done1
        assert res["returned"][0] >= done0 and res["returned"][1] >= done1  # each teardown slept it out


# --------------------------------------------------------------------------------------------
# On a device: the model holds the transport's stream, not the host (CPU twin of the CUDA path)
# --------------------------------------------------------------------------------------------


class _ClockOnlyLane(Lane):
    """A lane with only the link clock and what `finish` touches."""

    def __init__(self) -> None:
        self.link_free_at = 0.0
        self.lock = threading.Lock()
        self.pending: set[Transfer] = set()


def _transfer(link: ops.EmulatedLink) -> Transfer:
    return Transfer(
        ticket=0,
        op="dispatch",
        group_name="g",
        seq=0,
        header=torch.zeros(1, dtype=torch.int64),
        send_buf=torch.zeros(1, 1, dtype=torch.uint8),
        send_rows=[0],
        block_counts=torch.zeros(1, 1, dtype=torch.int64),
        link=link,
        started_at=time.perf_counter(),
    )


def test_on_a_stream_the_link_is_a_hold_of_that_stream_and_the_host_returns_at_once(monkeypatch):
    held: list[tuple[object, float]] = []
    events = iter(["done-0", "done-1"])

    def hold_stream(stream, seconds):
        held.append((stream, seconds))
        return next(events)

    monkeypatch.setattr(staging, "hold_stream", hold_stream)
    lane = _ClockOnlyLane()
    link = ops.EmulatedLink(latency_s=0.0, bandwidth_bytes_per_s=1000.0)
    first, second = _transfer(link), _transfer(link)
    t0 = time.perf_counter()
    lane.hold_on_link(first, 300, stream="side")  # 0.3 s modelled
    lane.hold_on_link(second, 200, stream="side")  # 0.2 s more, after the first on the same link
    host_s = time.perf_counter() - t0
    since_start = time.perf_counter() - first.started_at
    assert host_s < 0.25, host_s  # neither call slept for the model (0.3 s for the first alone)
    assert [stream for stream, _ in held] == ["side", "side"]
    assert 0.3 - since_start <= held[0][1] <= 0.3
    assert 0.5 - since_start <= held[1][1] <= 0.5  # queued behind the first exchange's modelled time
    assert (first.done_event, second.done_event) == ("done-0", "done-1")  # what the teardown waits on
    assert lane.link_free_at == pytest.approx(first.started_at + 0.5)
    # the link intervals (timeline, report, --comm-ratio calibration) end at the modelled times
    for transfer, end in ((first, 0.3), (second, 0.5)):
        lane.finish(transfer, None, None)
        assert transfer.finished_at == pytest.approx(first.started_at + end)


def test_without_a_stream_the_link_sleeps_the_carrier_thread(monkeypatch):
    monkeypatch.setattr(staging, "hold_stream", lambda *a: pytest.fail("a host exchange held a stream"))
    lane = _ClockOnlyLane()
    transfer = _transfer(ops.EmulatedLink(latency_s=0.05, bandwidth_bytes_per_s=1e12))
    lane.hold_on_link(transfer, 1000)
    assert time.perf_counter() - transfer.started_at >= 0.05
    assert transfer.done_event is None
