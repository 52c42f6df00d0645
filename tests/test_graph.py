"""Tests of overlap.graph: nodes, passes, determinism, misuse errors, running, simulation."""

from __future__ import annotations

import json
import random
import threading
import time

import networkx as nx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overlap.errors import CommTimeoutError, DeadlockError, PlanError
from overlap.graph import Graph, Node, Plan, Step, check_same_order
from overlap.timeline import Timeline

# ---- nodes ---------------------------------------------------------------------------------------
ops = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,20}", fullmatch=True)
indices = st.none() | st.integers(min_value=0, max_value=10**6)


@given(op=ops, microbatch=indices, layer=indices)
@settings(max_examples=200, deadline=None)
def test_node_string_round_trips(op, microbatch, layer):
    node = Node(op, microbatch, layer)
    assert Node.parse(str(node)) == node
    assert hash(Node.parse(str(node))) == hash(node)


def test_node_examples_and_kinds():
    assert str(Node("combine_setup", 1)) == "combine_setup@mb1"
    assert str(Node("combine_setup", 1, 3)) == "combine_setup@mb1.l3"
    assert Node.parse("experts.l2") == Node("experts", None, 2)
    assert Node("combine_setup", 0).default_kind == "comm_issue"
    assert Node("dispatch_teardown", 0).default_kind == "comm_wait"
    assert Node("route", 0).default_kind == "compute"


@pytest.mark.parametrize("text", ["", "1op", "op@mb", "op@mb01", "op.l-1", "op@mb1@mb2", "op x"])
def test_node_parse_rejects_bad_strings(text):
    with pytest.raises(ValueError, match="text must look like"):
        Node.parse(text)


def test_node_rejects_bad_fields():
    with pytest.raises(ValueError, match="microbatch must be >= 0, got -1"):
        Node("route", -1)
    with pytest.raises(TypeError, match="layer must be an int or None"):
        Node("route", 0, "3")
    with pytest.raises(ValueError, match="op must match"):
        Node("route@mb1")


# ---- helpers -------------------------------------------------------------------------------------
MOE_CHAIN = ("route", "dispatch_setup", "dispatch_teardown", "experts", "combine_setup", "combine_teardown")


def moe_edges(num_microbatches: int = 2) -> list[tuple[str, str]]:
    edges = []
    for mb in range(num_microbatches):
        names = [f"{op}@mb{mb}" for op in MOE_CHAIN]
        edges += list(zip(names, names[1:]))
        edges.append((f"route@mb{mb}", f"combine_teardown@mb{mb}"))  # implied: no event
    return edges


def build(edges, seed: int | None = None, fns=None, **attrs) -> Graph:
    """Build a graph from edges, adding nodes and edges in an order shuffled by ``seed``."""
    nodes = sorted({n for e in edges for n in e})
    edges = list(edges)
    if seed is not None:
        rng = random.Random(seed)
        rng.shuffle(nodes)
        rng.shuffle(edges)
    g = Graph()
    for n in nodes:
        g.add(n, (fns or {}).get(n), **attrs.get(n, {}))
    for u, v in edges:
        g.add_edge(u, v)
    return g


# ---- planning ------------------------------------------------------------------------------------
def test_plan_is_deterministic_across_insertion_orders():
    plans = [build(moe_edges(), seed).plan() for seed in (None, 1, 2, 3, 4)]
    assert len({p.fingerprint() for p in plans}) == 1
    assert all(p == plans[0] for p in plans)
    assert len({str(p) for p in plans}) == 1
    check_same_order(plans)


def test_plan_interleaves_microbatches_and_uses_three_streams():
    plan = build(moe_edges()).plan()
    assert plan.streams == ("compute", "comm_setup", "comm_teardown")
    compute = [str(s.node) for s in plan.steps if s.stream == "compute"]
    assert compute == ["route@mb0", "route@mb1", "experts@mb0", "experts@mb1"]
    by_kind = {s.kind: s.stream for s in plan.steps}
    assert by_kind == {"compute": "compute", "comm_issue": "comm_setup", "comm_wait": "comm_teardown"}
    text = str(plan)
    assert "w:e0 dispatch_setup@mb0" in text and "route@mb0 r:e0" in text


@pytest.mark.parametrize("num_microbatches", [1, 2, 3])
def test_one_event_per_cross_stream_edge_of_the_transitive_reduction(num_microbatches):
    g = build(moe_edges(num_microbatches))
    plan = g.plan()
    reduced = nx.transitive_reduction(g.nx)
    stream = {s.node: s.stream for s in plan.steps}
    cross = {(u, v) for u, v in reduced.edges if stream[u] != stream[v]}
    assert {(e.src, e.dst) for e in plan.events} == cross
    assert len(plan.events) == 5 * num_microbatches  # the route->combine_teardown edge is implied
    assert all(e.src_stream != e.dst_stream for e in plan.events)
    waits = sorted(e for s in plan.steps for e in s.waits)
    records = sorted(e for s in plan.steps for e in s.records)
    assert waits == records == list(range(len(plan.events)))


def test_same_stream_edge_gets_no_event():
    plan = build([("a", "b"), ("b", "c")]).plan()
    assert plan.events == () and plan.streams == ("compute",)


def test_cycle_is_named():
    g = build([("a", "b"), ("b", "c"), ("c", "a")])
    with pytest.raises(PlanError, match=r"cycle: .*a -> b -> c|cycle: .*b -> c -> a|cycle: c -> a"):
        g.plan()


def test_teardown_without_setup():
    g = build([("route@mb0", "dispatch_teardown@mb0")])
    with pytest.raises(PlanError, match=r"dispatch_teardown@mb0 .* dispatch_setup@mb0\) is missing"):
        g.plan()


def test_handle_consumed_twice():
    g = build([("x_setup@mb0", "x_teardown@mb0"), ("x_setup@mb0", "y_teardown@mb0")])
    with pytest.raises(PlanError, match=r"x_setup@mb0's handle is consumed by 2 comm_waits"):
        g.plan()


def test_setup_never_torn_down_and_edge_to_unknown_node():
    with pytest.raises(PlanError, match="never torn down"):
        build([("route@mb0", "x_setup@mb0")]).plan()
    g = Graph()
    g.add("a", after=["ghost"])
    with pytest.raises(PlanError, match="ghost was used in an edge but never added"):
        g.plan()


def test_graph_add_rejects_bad_values():
    g = Graph()
    with pytest.raises(ValueError, match="kind must be one of"):
        g.add("a", kind="gpu")
    with pytest.raises(ValueError, match="cost of a must be >= 0 seconds, got -1"):
        g.add("a", cost=-1)
    with pytest.raises(ValueError, match="transfer is only for comm_issue"):
        g.add("a", transfer=1.0)
    with pytest.raises(TypeError, match="fn must be callable"):
        g.add("a", fn=3)
    g.add("a")
    with pytest.raises(ValueError, match="already added"):
        g.add("a")


def test_check_same_order_names_first_differing_step():
    a = build(moe_edges()).plan()
    g = build(moe_edges(), **{"dispatch_setup@mb1": {"priority": 0}})
    b = g.plan()
    assert a.fingerprint() != b.fingerprint()
    with pytest.raises(
        PlanError,
        match=r"plan 1 .* comm step 0 is dispatch_setup@mb1 in plan 1 "
        r"but dispatch_setup@mb0 in plan 0",
    ):
        check_same_order([a, b])
    with pytest.raises(TypeError, match=r"plans\[1\] must be a Plan"):
        check_same_order([a, "plan"])


# ---- running -------------------------------------------------------------------------------------
def recording_fns(nodes, log, lock):
    def make(name):
        def fn(inputs):
            with lock:
                log.append(name)
            return (name, sorted(str(k) for k in inputs))

        return fn

    return {n: make(n) for n in nodes}


def test_run_passes_predecessor_results_in_plan_order():
    edges = moe_edges()
    nodes = sorted({n for e in edges for n in e})
    log: list[str] = []
    plan = build(edges, fns=recording_fns(nodes, log, threading.Lock())).plan()
    results = plan.run(timeout=30)
    assert list(results) == list(plan.nodes)
    assert results[Node.parse("combine_teardown@mb1")] == ("combine_teardown@mb1", ["combine_setup@mb1", "route@mb1"])
    position = {n: i for i, n in enumerate(log)}
    for u, v in edges:
        assert position[u] < position[v]


def test_worker_exception_reaches_the_caller_and_streams_recover():
    def explode(inputs):
        raise KeyError("expert 7 missing")

    edges = moe_edges(1)
    plan = build(edges, fns={"experts@mb0": explode}).plan()
    with pytest.raises(KeyError, match="expert 7 missing") as info:
        plan.run(timeout=30)
    assert any("experts@mb0" in n for n in info.value.__notes__)
    assert len(build(edges).plan().run(timeout=30)) == 6  # the cached streams are clean again


def test_run_timeout_names_unfinished_nodes():
    gate = threading.Event()
    plan = build([("a", "b")], fns={"a": lambda inputs: gate.wait()}).plan()
    with pytest.raises(CommTimeoutError, match=r"2 nodes unfinished: a, b"):
        plan.run(timeout=0.05)
    gate.set()
    plan.run(timeout=30)


@pytest.mark.asyncio
async def test_run_async_does_not_block_the_event_loop():
    import asyncio

    gate = threading.Event()
    fns = {"dispatch_teardown@mb0": lambda inputs: "landed" if gate.wait(30) else "the loop never opened the gate"}
    plan = build(moe_edges(1), fns=fns).plan()

    async def opener():
        await asyncio.sleep(0)
        gate.set()  # runs only if the plan's run left the event loop free

    results, _ = await asyncio.gather(plan.run_async(timeout=60), opener())
    assert results[Node.parse("dispatch_teardown@mb0")] == "landed"


# ---- the MoE-shaped overlap check ----------------------------------------------------------------
COMPUTE_S = 0.03
TRANSFER_S = 0.02


class SyntheticLink:
    """A FIFO link: a transfer starts when issued and the link is free, and completes on a timer
    thread after TRANSFER_S (no CPU used). Transfer intervals go into the timeline as kind comm."""

    def __init__(self, timeline: Timeline):
        self.timeline = timeline
        self.free_at = 0.0
        self.lock = threading.Lock()

    def issue(self, name):
        def fn(inputs):
            now = time.perf_counter()
            with self.lock:
                start = max(now, self.free_at)
                self.free_at = end = start + TRANSFER_S
            landed = threading.Event()
            threading.Timer(end - now, landed.set).start()
            self.timeline.add("link", name, start, end, "comm")
            return landed

        return fn

    @staticmethod
    def wait(inputs):
        (landed,) = [v for k, v in inputs.items() if k.op.endswith("_setup")]
        if not landed.wait(10):
            raise TimeoutError("synthetic transfer never landed")


def busy(seconds):
    def fn(inputs):
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass

    return fn


def moe_graph(timeline: Timeline) -> Graph:
    link = SyntheticLink(timeline)
    fns, attrs = {}, {}
    for u, v in moe_edges():
        for n in (u, v):
            kind = Node.parse(n).default_kind
            if kind == "compute":
                fns[n], attrs[n] = busy(COMPUTE_S), {"cost": COMPUTE_S}
            elif kind == "comm_issue":
                fns[n], attrs[n] = link.issue(n), {"transfer": TRANSFER_S}
            else:
                fns[n] = SyntheticLink.wait
    return build(moe_edges(), fns=fns, **attrs)


def test_moe_two_microbatches_simulation_and_run_agree_on_order(tmp_path):
    """The simulator's analytic answer, and the run's per-stream and link order equal to the
    simulated ones. How much the run overlapped (and its speed) is measured by
    `bench/bench_graph_overlap.py`, not asserted: timing is not a test."""
    measured = Timeline()
    plan = moe_graph(measured).plan()
    simulated = plan.simulate()
    plan.run(timeline=measured, timeout=30)

    sim, meas = simulated.report(), measured.report()
    # Analytically: 4 transfers of 20 ms, the last one exposed -> 75 % hidden, makespan 140 ms.
    assert sim.hidden_fraction == pytest.approx(0.75)
    assert sim.makespan == pytest.approx(0.140)
    assert meas.comm_source == "comm"
    assert [iv.name for iv in measured.intervals if iv.kind == "comm"] == [
        "dispatch_setup@mb0",
        "dispatch_setup@mb1",
        "combine_setup@mb0",
        "combine_setup@mb1",
    ]
    for track in plan.streams:
        assert simulated.order(track) == measured.order(track)
    assert simulated.order("link") == measured.order("link")

    trace = measured.to_chrome_trace()
    json.dumps(trace)
    names = {e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "thread_name"}
    assert names == {"compute", "comm_setup", "comm_teardown", "link"}
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert len(spans) == 12 + 4 and all(e["dur"] >= 0 and e["ts"] >= 0 for e in spans)
    assert len({e["tid"] for e in spans}) == 4

    for name, draw in [
        ("plan.png", plan.save_png),
        ("measured.png", measured.save_png),
        ("simulated.png", simulated.save_png),
    ]:
        draw(tmp_path / name)
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print(f"\nmeasured:\n{measured.to_text()}\n{meas}\nsimulated:\n{simulated.to_text()}\n{sim}")


def test_simulator_detects_deadlock():
    plan = build(
        [
            ("a_setup@mb0", "a_teardown@mb0"),
            ("a_teardown@mb0", "b@mb0"),
            ("b@mb0", "c_setup@mb0"),
            ("c_setup@mb0", "c_teardown@mb0"),
        ]
    ).plan()
    # Hand-break the plan: the setup stream runs c_setup (waits for b) before a_setup.
    steps = list(plan.steps)
    a, c = steps[0], steps[3]
    steps[0] = Step(0, c.node, c.kind, c.stream, c.waits, c.records)
    steps[3] = Step(3, a.node, a.kind, a.stream, a.waits, a.records)
    broken = Plan(plan.streams, tuple(steps), plan.events, plan.graph)
    with pytest.raises(DeadlockError, match=r"cannot progress(.|\n)*>> +0 \|"):
        broken.simulate()


def test_simulate_costs_argument_overrides_attributes():
    plan = build([("a", "b")], **{"a": {"cost": 1.0}}).plan()
    tl = plan.simulate({"b": 0.5})
    assert tl.makespan == pytest.approx(1.5)
    with pytest.raises(ValueError, match="costs key z is not a node"):
        plan.simulate({"z": 1.0})
    with pytest.raises(ValueError, match="cost of b must be >= 0"):
        plan.simulate({"b": -2})


def test_dot_marks_event_edges_dashed():
    plan = build(moe_edges(1)).plan()
    dot = plan.to_dot()
    assert dot.count("style=dashed") == len(plan.events) == 5
    assert '"route@mb0" -> "combine_teardown@mb0";' in dot
    assert dot == build(moe_edges(1), seed=7).plan().to_dot()


# ---- host-inline compute, pooled streams, deadlock, device clock (appended) ---------------------
def thread_recording_fns(nodes):
    seen: dict[str, int] = {}

    def make(name):
        def fn(inputs):
            seen[name] = threading.get_ident()
            return name

        return fn

    return {n: make(n) for n in nodes}, seen


def test_compute_runs_on_the_calling_thread_and_comm_streams_are_reused():
    edges = moe_edges(2)
    nodes = sorted({n for e in edges for n in e})
    comm_threads = []
    for _ in range(3):
        fns, seen = thread_recording_fns(nodes)
        build(edges, fns=fns).plan().run()
        me = threading.get_ident()
        compute = {n for n in nodes if Node.parse(n).default_kind == "compute"}
        assert {seen[n] for n in compute} == {me}
        setup = {seen[n] for n in nodes if Node.parse(n).default_kind == "comm_issue"}
        teardown = {seen[n] for n in nodes if Node.parse(n).default_kind == "comm_wait"}
        assert len(setup) == len(teardown) == 1 and me not in setup | teardown and setup != teardown
        comm_threads.append((setup.pop(), teardown.pop()))
    assert len(set(comm_threads)) == 1  # the same two workers every run: made once, reused
    before = threading.active_count()
    for _ in range(10):
        build(edges).plan().run()
    assert threading.active_count() == before


def test_run_with_a_timeout_runs_compute_on_a_worker():
    fns, seen = thread_recording_fns(["a", "b"])
    build([("a", "b")], fns=fns).plan().run(timeout=30)
    assert seen["a"] == seen["b"] != threading.get_ident()


def test_run_rejects_a_plan_that_would_deadlock():
    plan = build(
        [
            ("a_setup@mb0", "a_teardown@mb0"),
            ("a_teardown@mb0", "b@mb0"),
            ("b@mb0", "c_setup@mb0"),
            ("c_setup@mb0", "c_teardown@mb0"),
        ]
    ).plan()
    steps = list(plan.steps)
    a, c = steps[0], steps[3]
    steps[0] = Step(0, c.node, c.kind, c.stream, c.waits, c.records)
    steps[3] = Step(3, a.node, a.kind, a.stream, a.waits, a.records)
    broken = Plan(plan.streams, tuple(steps), plan.events, plan.graph)
    with pytest.raises(
        DeadlockError,
        match=r"step 0 \(c_setup@mb0\) waits for e\d, recorded only after "
        r"step 2 \(b@mb0\)(.|\n)*>> +0 \|",
    ):
        broken.run()


def test_host_compute_error_stops_the_run_and_names_the_step():
    ran: list[str] = []

    def log(name):
        return lambda inputs: ran.append(name)

    def explode(inputs):
        raise ZeroDivisionError("expert kernel failed")

    edges = moe_edges(2)
    nodes = sorted({n for e in edges for n in e})
    fns = {n: log(n) for n in nodes}
    fns["experts@mb0"] = explode
    plan = build(edges, fns=fns).plan()
    with pytest.raises(ZeroDivisionError, match="expert kernel failed") as info:
        plan.run()
    assert any("experts@mb0" in n and "'compute'" in n for n in info.value.__notes__)
    after = [str(s.node) for s in plan.steps[[str(s.node) for s in plan.steps].index("experts@mb0") + 1 :]]
    assert not set(after) & set(ran)  # nothing after the failed step was started
    assert len(build(edges).plan().run()) == 12  # the pooled streams are clean again


def test_worker_error_reaches_the_host_wait_and_stops_the_run():
    ran: list[str] = []

    def explode(inputs):
        raise ConnectionResetError("peer gone")

    edges = moe_edges(1)
    fns = {"dispatch_teardown@mb0": explode, "experts@mb0": lambda inputs: ran.append("experts")}
    with pytest.raises(ConnectionResetError, match="peer gone") as info:
        build(edges, fns=fns).plan().run()
    assert any("dispatch_teardown@mb0" in n for n in info.value.__notes__)
    assert ran == []
    assert len(build(edges).plan().run()) == 6


def test_host_wait_honours_the_timeout():
    from overlap import streams as st

    gate = threading.Event()
    fns = {"dispatch_teardown@mb0": lambda inputs: gate.wait(30)}
    plan = build(moe_edges(1), fns=fns).plan()
    given = {
        "compute": st.host_stream(),
        "comm_setup": st.Stream("cpu", name="t_setup"),
        "comm_teardown": st.Stream("cpu", name="t_teardown"),
    }
    try:
        with pytest.raises(
            CommTimeoutError,
            match=r"within 0.05 s; 4 nodes unfinished: "
            r"dispatch_teardown@mb0, experts@mb0,",
        ):
            plan.run(given, timeout=0.05)
        gate.set()
        assert len(plan.run(given, timeout=30)) == 6
    finally:
        gate.set()
        for name in ("comm_setup", "comm_teardown"):
            given[name].close()


def test_timeline_gets_one_interval_per_node_after_the_run():
    edges = moe_edges(2)
    plan = build(edges).plan()
    tl = Timeline()
    t0 = time.perf_counter()
    plan.run(timeline=tl)
    t1 = time.perf_counter()
    ivs = tl.intervals
    assert sorted(iv.name for iv in ivs) == sorted(str(n) for n in plan.nodes)
    assert all(t0 <= iv.start <= iv.end <= t1 for iv in ivs)
    assert {iv.track: iv.kind for iv in ivs} == {
        "compute": "compute",
        "comm_setup": "comm_issue",
        "comm_teardown": "comm_wait",
    }
    assert tl.order("compute") == [str(s.node) for s in plan.steps if s.stream == "compute"]
    assert tl.tracks[:3] == plan.streams


def test_device_to_host_clock_and_calibration_are_pure():
    from overlap.graph import _calibrate, device_to_host_clock

    # Intervals in ms after the reference event; the reference completed at host second 100.
    assert device_to_host_clock(100.0, [(0.0, 2.5), (1.0, 1.0), (3.0, 2.999)]) == [
        (100.0, 100.0025),
        (100.001, 100.001),
        (100.003, 100.003),
    ]
    # Brackets of width 4, 1, 3 (fake clock): the tightest one's midpoint and its event win.
    ticks = iter([0.0, 4.0, 10.0, 11.0, 20.0, 23.0])
    events = iter(["e0", "e1", "e2"])
    assert _calibrate(lambda: next(events), clock=lambda: next(ticks), tries=3) == ("e1", 10.5)


class _FakeDevice:
    """A stand-in for torch.cuda on CPU: kernels 'run' at launch, advancing a device clock (ms)."""

    now_ms = 0.0
    event_waits = 0

    class Event:
        def __init__(self, enable_timing: bool = False) -> None:
            self.t = None

        def record(self, stream=None) -> None:
            self.t = _FakeDevice.now_ms

        def elapsed_time(self, other) -> float:
            return other.t - self.t

        def synchronize(self) -> None:
            _FakeDevice.event_waits += 1

        def query(self) -> bool:
            return True

    class Stream:
        def __init__(self) -> None:
            self.synced = 0

        def wait_event(self, event) -> None:
            pass

        def synchronize(self) -> None:
            self.synced += 1

        def query(self) -> bool:
            return True

    @staticmethod
    def stream(s):
        import contextlib

        return contextlib.nullcontext()


def test_device_timeline_path_with_a_fake_device(monkeypatch):
    """The npu/cuda branch of Plan.run (events around each node, read after, moved onto the host
    clock) on CPU, with a fake device whose kernels advance its clock by each node's cost."""
    import torch

    from overlap import graph as graph_mod
    from overlap import streams as st

    monkeypatch.setattr(st, "_torch_module", lambda dev: _FakeDevice)
    ref = _FakeDevice.Event()
    ref.record()  # the reference event at device time 0 ms completed at host second 50
    monkeypatch.setitem(graph_mod._CLOCKS, torch.device("cuda"), (ref, 50.0))
    cost_ms = {
        "route@mb0": 3.0,
        "dispatch_setup@mb0": 0.5,
        "dispatch_teardown@mb0": 2.0,
        "experts@mb0": 7.0,
        "combine_setup@mb0": 0.5,
        "combine_teardown@mb0": 1.0,
    }

    def kernel(name):
        def fn(inputs):
            _FakeDevice.now_ms += cost_ms[name]
            return name

        return fn

    plan = build(moe_edges(1), fns={n: kernel(n) for n in cost_ms}).plan()
    given = {name: st._TorchStream("cuda", name=name, torch_stream=_FakeDevice.Stream()) for name in plan.streams}
    tl = Timeline()
    waits = _FakeDevice.event_waits
    out = plan.run(given, timeline=tl)
    assert out[Node.parse("experts@mb0")] == "experts@mb0"
    # The run never waits for the device (no host sync in a forward): the device times are read,
    # after waiting for each node's end event, when the timeline is read.
    assert all(s._torch.synced == 0 for s in given.values()) and _FakeDevice.event_waits == waits
    assert len(tl.intervals) == len(plan.steps)
    assert _FakeDevice.event_waits == waits + len(plan.steps)
    expected, t = {}, 0.0
    for s in plan.steps:  # every node is launched in plan order; the fake device runs it at once
        expected[str(s.node)] = (s.stream, 50.0 + t / 1e3, 50.0 + (t + cost_ms[str(s.node)]) / 1e3)
        t += cost_ms[str(s.node)]
    got = {iv.name: (iv.track, iv.start, iv.end) for iv in tl.intervals}
    assert got.keys() == expected.keys()
    for name, (track, start, end) in expected.items():
        assert got[name][0] == track
        assert got[name][1:] == pytest.approx((start, end), abs=1e-9)


def test_device_times_when_the_clock_is_calibrated_after_the_run(monkeypatch):
    """The first timed run on a device calibrates its clock when the timeline is read, after the
    run's events: each node's time is then measured from its event to the later reference."""
    import torch

    from overlap import graph as graph_mod
    from overlap import streams as st

    monkeypatch.setattr(st, "_torch_module", lambda dev: _FakeDevice)
    monkeypatch.delitem(graph_mod._CLOCKS, torch.device("cuda"), raising=False)
    calibrated = []

    def clock(dev):  # the reference: recorded once the device ran everything, at host second 90
        ref = _FakeDevice.Event()
        ref.record()
        calibrated.append(ref.t)
        return ref, 90.0

    monkeypatch.setattr(graph_mod, "_device_clock", clock)
    g = Graph()
    start = _FakeDevice.now_ms
    g.add("route@mb0", lambda inputs: setattr(_FakeDevice, "now_ms", _FakeDevice.now_ms + 4.0))
    g.add("experts@mb0", lambda inputs: setattr(_FakeDevice, "now_ms", _FakeDevice.now_ms + 6.0), after=["route@mb0"])
    plan = g.plan()
    given = {name: st._TorchStream("cuda", name=name, torch_stream=_FakeDevice.Stream()) for name in plan.streams}
    tl = Timeline()
    plan.run(given, timeline=tl)
    assert calibrated == []  # nothing read yet
    got = {iv.name: (iv.start, iv.end) for iv in tl.intervals}
    assert calibrated == [start + 10.0]
    assert got["route@mb0"] == pytest.approx((90.0 - 0.010, 90.0 - 0.006), abs=1e-9)
    assert got["experts@mb0"] == pytest.approx((90.0 - 0.006, 90.0), abs=1e-9)
