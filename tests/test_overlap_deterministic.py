"""Overlap happens, shown without timing: each executor runs while the test holds a transfer open
on the link (`tests/gates.py`), and the next microbatch's compute must run while it is held.

The compute that should hide a transfer first waits (bounded) until that transfer is on the link,
then runs, and only then releases it. An executor that does not overlap never puts the transfer on
the link while that compute is pending: the wait runs out and the test fails; a setup that waits
for its own transfer blocks until the gate's safety timeout and fails the same way. The overlap
report is then checked against an independent recomputation from the timeline's intervals.

Exchanges are numbered in setup order on each rank (one group, one worker): with two microbatches
dispatch mb0, dispatch mb1, combine mb0, combine mb1 are exchanges 0-3; the link track of the
timeline confirms that order.
"""

from __future__ import annotations

import threading

import pytest
import torch
import torch.distributed as dist

import overlap
from overlap import ops

from .gates import LinkGates

HIDDEN, EXPERTS, TOP_K, INTER = 1024, 4, 2, 64


class Holds:
    """Call `n` of a compute function holds exchange `holds[n]`: it waits for it to reach the link,
    runs, then releases it. `seen` records, per held call, whether the exchange was on the link."""

    def __init__(self, gates: LinkGates, holds: dict[int, int]) -> None:
        self.gates, self.holds = gates, holds
        self.calls = 0
        self.seen: dict[int, bool] = {}
        self.lock = threading.Lock()

    def around(self, fn, *args):
        with self.lock:
            n = self.calls
            self.calls += 1
        exchange = self.holds.get(n)
        if exchange is not None:
            on_link = self.gates.wait_entered(exchange)
            self.seen[n] = on_link and not self.gates.is_released(exchange)
            if not on_link:
                self.gates.release_all()  # let the run finish; the test fails on `seen`
        try:
            return fn(*args)
        finally:
            if exchange is not None:
                self.gates.release(exchange)


# ---- independent interval arithmetic -------------------------------------------------------------


def _merge(spans):
    out = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def _length(spans):
    return sum(b - a for a, b in _merge(spans))


def _overlap(xs, ys):
    total = 0.0
    for a, b in _merge(xs):
        for c, d in _merge(ys):
            total += max(0.0, min(b, d) - max(a, c))
    return total


def _check_report(timeline, report) -> dict:
    """Hidden fraction recomputed from the intervals the report was computed from."""
    ivs = timeline.intervals
    compute = [(iv.start, iv.end) for iv in ivs if iv.kind == "compute"]
    comm = [(iv.start, iv.end) for iv in ivs if iv.kind == "comm"]
    hidden = _overlap(compute, comm)
    busy = _length(comm)
    return {
        "busy": busy,
        "hidden": hidden,
        "fraction": hidden / busy if busy else 0.0,
        "report_fraction": report.hidden_fraction,
        "report_busy": report.comm_busy,
        "report_hidden": report.overlap,
        "source": report.comm_source,
    }


def _span(timeline, track, name):
    (iv,) = [iv for iv in timeline.intervals if iv.track == track and iv.name == name]
    return iv.start, iv.end


# ---- the planned graph (a protocol layer: the reference MoELayer, as the demo runs it) ----------


class HeldExpertsLayer(overlap.MoELayer):
    """The reference layer whose `moe_experts` calls go through `Holds`."""

    holds: Holds | None = None

    def moe_experts(self, expand_x, dynamic_scales, expert_token_nums):
        parent = super().moe_experts
        if self.holds is None:
            return parent(expand_x, dynamic_scales, expert_token_nums)
        return self.holds.around(parent, expand_x, dynamic_scales, expert_token_nums)


def _planned_case() -> dict:
    rank = dist.get_rank()
    layer = HeldExpertsLayer(HIDDEN, EXPERTS, TOP_K, INTER, num_shared_experts=1, seed=3)
    x = torch.randn(64, HIDDEN, generator=torch.Generator().manual_seed(10 + rank)).to(torch.bfloat16)
    plain = layer(x)
    # experts@mb0 runs while dispatch mb1 (exchange 1) is held; experts@mb1 while combine mb0 (2) is.
    gates = LinkGates(hold={1, 2})
    layer.holds = Holds(gates, {0: 1, 1: 2})
    ops.configure(link=gates.link())
    try:
        with overlap.scheduler(microbatches=2, min_tokens=1) as s:
            out = layer(x)
    finally:
        gates.release_all()
        ops.configure(link=None)
        layer.holds, holds = None, layer.holds
    tl = s.timeline
    return {
        # Other microbatch compositions reach the expert GEMMs: equal within 2 bf16 ulps at 1.
        "equal": torch.allclose(out.float(), plain.float(), rtol=1.6e-2, atol=1.6e-2),
        "seen": holds.seen,
        "expired": gates.expired,
        "link": [iv.name for iv in tl.intervals if iv.track == "link"],
        "experts0_x_dispatch1": _overlap(
            [_span(tl, "compute", "experts@mb0.l0")], [_span(tl, "link", "dispatch@mb1.l0")]
        ),
        "experts1_x_combine0": _overlap(
            [_span(tl, "compute", "experts@mb1.l0")], [_span(tl, "link", "combine@mb0.l0")]
        ),
        "report": _check_report(tl, s.report()),
    }


def _assert_report(r: dict) -> None:
    assert r["source"] == "comm"
    assert r["report_busy"] == pytest.approx(r["busy"], rel=1e-9, abs=1e-9)
    assert r["report_hidden"] == pytest.approx(r["hidden"], rel=1e-9, abs=1e-9)
    assert r["report_fraction"] == pytest.approx(r["fraction"], rel=1e-9, abs=1e-9)
    assert 0 < r["fraction"] <= 1


def test_planned_graph_computes_the_next_microbatch_while_a_transfer_is_held(rank_pools):
    for rank, res in enumerate(rank_pools(2).run(_planned_case)):
        assert res["link"] == ["dispatch@mb0.l0", "dispatch@mb1.l0", "combine@mb0.l0", "combine@mb1.l0"], rank
        assert res["seen"] == {0: True, 1: True}, (rank, "experts ran without the held transfer on the link")
        assert res["expired"] == [], rank
        assert res["equal"], rank
        # The held transfers overlap the compute that hid them, in the very intervals the report uses.
        assert res["experts0_x_dispatch1"] > 0 and res["experts1_x_combine0"] > 0, rank
        _assert_report(res["report"])


# ---- the fibers (an unmodified module that calls the four ops, under overlap.wrap) --------------


class OpCallingMoE(torch.nn.Module):
    """A layer written against the ops directly (no protocol): route, dispatch, experts, combine.
    Its route and experts calls go through `Holds` when set."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = overlap.MoELayer(HIDDEN, EXPERTS, TOP_K, INTER, seed=4)
        self.route_holds: Holds | None = None
        self.expert_holds: Holds | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kw = self.layer.moe_comm_kwargs()
        a = tuple(kw.pop(k) for k in ("group_ep", "ep_world_size", "ep_rank_id", "moe_expert_num"))
        kw.pop("quant_mode")
        route = self.layer.moe_route
        ids, w = route(x) if self.route_holds is None else self.route_holds.around(route, x)
        y, expand_idx, cmd = ops.dispatch_setup(x, ids, *a, **kw)
        expand_x, scales, assist, nums = ops.dispatch_teardown(x, y, ids, cmd, *a, **kw)
        experts = self.layer.moe_experts
        out = (
            experts(expand_x, scales, nums)
            if self.expert_holds is None
            else self.expert_holds.around(experts, expand_x, scales, nums)
        )
        qx, cmd2 = ops.combine_setup(out, ids, assist, *a, **kw)
        return ops.combine_teardown(out, qx, ids, expand_idx, w, cmd2, *a, **kw)


def _fibers_case() -> dict:
    rank = dist.get_rank()
    module = OpCallingMoE()
    x = torch.randn(8, HIDDEN, generator=torch.Generator().manual_seed(20 + rank)).to(torch.bfloat16)
    plain = torch.cat([module(x[:4]), module(x[4:])])  # the wrapper splits into these two microbatches
    wrapped = overlap.wrap(module)
    # mb1's route runs while dispatch mb0 (exchange 0) is held; mb0's experts while dispatch mb1 (1)
    # is held; mb1's experts while combine mb0 (2) is held.
    gates = LinkGates(hold={0, 1, 2})
    module.route_holds = Holds(gates, {1: 0})
    module.expert_holds = Holds(gates, {0: 1, 1: 2})
    ops.configure(link=gates.link())
    try:
        with overlap.scheduler(microbatches=2, min_tokens=1) as s:
            out = wrapped(x)
    finally:
        gates.release_all()
        ops.configure(link=None)
        route_seen, expert_seen = module.route_holds.seen, module.expert_holds.seen
        module.route_holds = module.expert_holds = None
    tl = s.timeline
    return {
        "equal": torch.equal(out, plain),
        "route_seen": route_seen,
        "expert_seen": expert_seen,
        "expired": gates.expired,
        "link": [iv.name for iv in tl.intervals if iv.track == "link"],
        "report": _check_report(tl, s.report()),
    }


def test_fibers_compute_the_next_microbatch_while_a_transfer_is_held(rank_pools):
    for rank, res in enumerate(rank_pools(2).run(_fibers_case)):
        assert res["link"] == ["dispatch@mb0.l0", "dispatch@mb1.l0", "combine@mb0.l0", "combine@mb1.l0"], rank
        assert res["route_seen"] == {1: True}, (rank, "mb1 was routed without mb0's dispatch on the link")
        assert res["expert_seen"] == {0: True, 1: True}, (rank, "experts ran without the held transfer on the link")
        assert res["expired"] == [], rank
        assert res["equal"], rank
        _assert_report(res["report"])
