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


# ---- the plan hides what it claims: orderings on the caller's thread ---------------------------


class LoggedLayer(overlap.MoELayer):
    """The reference layer whose shared experts (first call) hold the first dispatch (exchange 0)
    and whose calls are logged with the thread that made them."""

    holds: Holds | None = None
    log: list | None = None

    def _note(self, what: str) -> None:
        if self.log is not None:
            self.log.append((what, threading.get_ident()))

    def moe_shared(self, x):
        self._note("shared")
        parent = super().moe_shared
        return parent(x) if self.holds is None else self.holds.around(parent, x)

    def moe_experts(self, expand_x, dynamic_scales, expert_token_nums):
        self._note("experts")
        return super().moe_experts(expand_x, dynamic_scales, expert_token_nums)


def _ordering_case(microbatches: int, on_caller: bool = True) -> dict:
    from overlap.pipeline import planned

    rank = dist.get_rank()
    layer = LoggedLayer(HIDDEN, EXPERTS, TOP_K, INTER, num_shared_experts=1, seed=5)
    x = torch.randn(16 * microbatches, HIDDEN, generator=torch.Generator().manual_seed(30 + rank)).to(torch.bfloat16)
    gates = LinkGates(hold={0})
    layer.holds, layer.log = Holds(gates, {0: 0}), []
    log = layer.log
    real = {name: getattr(ops, name) for name in ("dispatch_setup", "dispatch_teardown")}

    def logged(name):
        def call(*args, **kwargs):
            log.append((name, threading.get_ident()))
            return real[name](*args, **kwargs)

        return call

    for name in real:
        setattr(ops, name, logged(name))
    ops.configure(link=gates.link())
    planned.CPU_ON_CALLER = on_caller
    try:
        with overlap.scheduler(microbatches=microbatches, min_tokens=1) as s:
            layer(x)
        resolved = planned.streams_for(s.plan, x.device) or {}
    finally:
        planned.CPU_ON_CALLER = True
        gates.release_all()
        ops.configure(link=None)
        for name, fn in real.items():
            setattr(ops, name, fn)
        holds, layer.holds, layer.log = layer.holds, None, None
    plan = s.plan
    spans = {iv.name: (iv.start, iv.end) for iv in s.timeline.intervals if iv.track != "link"}
    link = {iv.name: (iv.start, iv.end) for iv in s.timeline.intervals if iv.track == "link"}
    return {
        "log": [what for what, _ in log],
        "threads": len({ident for _, ident in log}),
        "caller_only": all(ident == threading.get_ident() for _, ident in log),
        "seen": holds.seen,
        "expired": gates.expired,
        "spans": spans,
        "link": link,
        "names": [iv.name for iv in s.timeline.intervals if iv.track != "link"],
        # cross-stream events whose two streams are different threads: each is a thread handoff
        "handoffs": sum(
            1
            for e in plan.events
            if resolved.get(e.src_stream, e.src_stream) is not resolved.get(e.dst_stream, e.dst_stream)
        ),
        "count": sum(1 for n in plan.nodes if n.op == "dispatch_setup"),
    }


@pytest.mark.parametrize("microbatches", [1, 2, 4])
def test_the_plan_issues_the_first_dispatch_before_the_shared_experts_and_feeds_experts_without_a_handoff(
    rank_pools, microbatches
):
    for rank, r in enumerate(rank_pools(2).run(_ordering_case, microbatches)):
        m = r["count"]
        assert m == microbatches, rank
        assert r["expired"] == [] and r["seen"] == {0: True}, (rank, "the shared experts ran without dispatch mb0 out")
        # 1. the first dispatch is issued before the shared experts, which then run while it travels
        assert r["log"].index("dispatch_setup") < r["log"].index("shared"), r["log"]
        s, d = r["spans"], r["link"]
        assert s["dispatch_setup@mb0.l0"][1] <= s["shared@mb0.l0"][0], rank
        shared0, dispatch0 = s["shared@mb0.l0"], d["dispatch@mb0.l0"]
        assert min(shared0[1], dispatch0[1]) > max(shared0[0], dispatch0[0]), (
            rank,
            "shared mb0 not under dispatch mb0",
        )
        # 2. each microbatch's experts run right after its dispatch teardown, on the same thread
        log = r["log"]
        experts_at = [i for i, what in enumerate(log) if what == "experts"]
        assert len(experts_at) == m and all(log[i - 1] == "dispatch_teardown" for i in experts_at), log
        names = r["names"]
        for i in range(m):
            teardown, experts = f"dispatch_teardown@mb{i}.l0", f"experts@mb{i}.l0"
            assert names.index(experts) == names.index(teardown) + 1, names  # nothing runs between them
            assert s[teardown][1] <= s[experts][0], rank
        # 3. no thread handoff inside the plan, whatever m: every stage on the caller's thread
        assert r["caller_only"] and r["threads"] == 1 and r["handoffs"] == 0, rank


def test_comm_workers_would_hand_off_at_every_cross_stream_edge(rank_pools):
    """The counter-case: with the comm stages on worker threads (as on a device), the same plan
    makes thread handoffs (one per cross-stream event, at least three per microbatch), so the
    caller-thread test above can fail."""
    for r in rank_pools(2).run(_ordering_case, 2, False):
        assert r["threads"] > 1 and not r["caller_only"]
        assert r["handoffs"] >= 3 * r["count"], r["handoffs"]


def _cached_plan_case() -> dict:
    from overlap.pipeline import planned, policy
    from overlap.pipeline.protocol import LayerCall

    rank = dist.get_rank()
    layer = overlap.MoELayer(HIDDEN, EXPERTS, TOP_K, INTER, num_shared_experts=1, seed=6)
    xs = [
        torch.randn(64, HIDDEN, generator=torch.Generator().manual_seed(40 + 2 * rank + k)).to(torch.bfloat16)
        for k in range(2)
    ]
    plain = [layer(x) for x in xs]  # serial, outside a context
    with overlap.scheduler(microbatches=2, min_tokens=1) as s:
        outs = [layer(x) for x in xs]  # two calls of one shape, layers 0 and 1
        again = layer(xs[0])  # layer 2: the same shape and input as layer 0
    fresh, _, _ = planned.build(layer, LayerCall.of(layer), xs[0], None, policy.split(64, 2, 1), 2)
    return {
        "close": [torch.allclose(o.float(), p.float(), rtol=1.6e-2, atol=1.6e-2) for o, p in zip(outs, plain)],
        "again_equal": torch.equal(again, outs[0]),
        "reused": s.plans[2] is planned.cached_plan(2, 2, policy.in_flight_budget(), planned.TWO_BATCH),
        "distinct_layers": s.plans[0] is not s.plans[1],
        "same_as_fresh": fresh.plan() == s.plans[2],
    }


def test_a_cached_plan_per_shape_gives_the_same_plan_and_results_as_a_fresh_one(rank_pools):
    for r in rank_pools(2).run(_cached_plan_case):
        assert r["close"] == [True, True] and r["again_equal"], r
        assert r["reused"] and r["distinct_layers"] and r["same_as_fresh"], r
