"""A graph of op nodes, lowered by pure passes into a frozen `Plan` that runs, simulates and draws.

Owns: `Node` (a frozen value with a canonical string), `Graph` (wraps an ``nx.DiGraph``), the
passes `validate → assign_streams → insert_events → order`, `Plan` (run blocking or under asyncio,
simulate on a cost model, print, fingerprint, export), `check_same_order` and the device-to-host
clock conversion of a run's timeline (`device_to_host_clock`).

**Nodes.** ``Node(op, microbatch=None, layer=None)``; its canonical string follows the grammar::

    node  := op [ "@mb" INT ] [ ".l" INT ]      e.g.  route   combine_setup@mb1   experts@mb0.l3
    op    := [A-Za-z_][A-Za-z0-9_]*
    INT   := "0" | [1-9][0-9]*

and ``Node.parse(str(n)) == n``. A node's *kind* is a graph attribute: ``"compute"``,
``"comm_issue"`` (a setup: returns at once with a handle) or ``"comm_wait"`` (a teardown: waits for
the handle and post-processes); by default ``*_setup``/``*_issue`` ops are comm_issue,
``*_teardown``/``*_wait`` ops comm_wait, everything else compute. Other attributes, under named
keys: ``fn``, ``cost`` (seconds), ``transfer`` (seconds on the link, comm_issue only),
``priority`` (ordering hint).

**Calling convention.** A node's ``fn(inputs)`` gets ``inputs: dict[Node, Any]`` mapping each
predecessor to its result and returns the node's result. A comm_wait receives its setup's
result (the handle) among its inputs. ``Plan.run`` returns ``{node: result}`` in plan order.

**Streams.** compute → ``"compute"``; comm_issue → ``"comm_setup"``; comm_wait →
``"comm_teardown"``: a fixed pool of three, whatever the number of layers or microbatches. Setups
and teardowns are kept apart because a teardown *blocks* until its transfer lands: on one shared
queue the setup of microbatch i+1 (ready as soon as its compute is) would sit behind the teardown
of microbatch i, serialising exactly the communication we want in flight. With separate queues a
setup is never delayed by a teardown; the two are joined only by the events of their edges.

**Passes** (each pure, each returns a new frozen value):

* `validate`: kinds known; no cycle (PlanError naming it); every comm_wait has exactly one
  comm_issue predecessor (its setup); every comm_issue is torn down by exactly one comm_wait.
* `assign_streams`: the ``stream`` attribute, from the kind.
* `insert_events`: transitive reduction; every remaining edge between different streams gets one
  record/wait pair (an ``event`` edge attribute); same-stream edges get none (stream order covers
  them), nor does an edge implied by a path (the path's events cover it).
* `order`: ``nx.lexicographical_topological_sort`` keyed on ``(priority, canonical string)``,
  priority defaulting to the node's depth (longest path from a source). Depth first interleaves
  microbatches (route@mb1 comes before experts@mb0), so mb1's compute overlaps mb0's transfers;
  the string breaks ties, so the same graph always gives the same plan, whatever the insertion
  order. Events are numbered in order of their record.

**Running** (`Plan.run`, `Plan.run_async`): walk the steps in order; a step waits its events on its
stream, is submitted to its stream, and records its events. Runs of consecutive steps of one
stream with no event in between are one job (no handoff between them). Compute runs on the
caller's thread: on cpu the host stream (the caller waits for the events a compute step needs,
then runs it inline: no thread handoff on the compute path), on npu/cuda the current stream. The
comm streams are the device's pooled streams (`overlap.streams.pooled`: made once per device,
reused by every run). `run_async`, and `run` with a timeout, put cpu compute on a pooled worker
too, so that neither the event loop nor a caller that must give up ever runs a node itself. A
plan in which a step waits for an event recorded later in plan order would deadlock: it is refused
(`DeadlockError`) before anything runs. Timeline rows are collected while the plan runs and added
once it finished: on cpu host ``perf_counter`` times around each call; on npu/cuda the device
times of timing events recorded around each node on its stream, moved onto the host clock by one
calibration per device (`device_to_host_clock`), and read only when the timeline is read
(`Timeline.add_pending`): a run never waits for the device. Nodes are labelled for ``torch.profiler`` when it
is recording.

**Simulation** (`Plan.simulate`): a discrete-event run of the same steps on the same streams, with
node costs and transfers on one FIFO ``"link"`` resource; a comm_wait ends no earlier than its
transfer plus its own cost. It returns a `Timeline` like a measured run.

This module must never mutate a graph it was given, never create streams per node or layer, and
never let the runtime reorder what the plan says.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import functools
import hashlib
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch

from . import streams as _streams
from .errors import CommTimeoutError, DeadlockError, PlanError, add_note
from .timeline import Timeline

__all__ = [
    "Node",
    "Graph",
    "Plan",
    "Step",
    "EventSpec",
    "validate",
    "assign_streams",
    "insert_events",
    "order",
    "check_same_order",
    "device_to_host_clock",
    "KINDS",
    "STREAMS",
]

KINDS = ("compute", "comm_issue", "comm_wait")
STREAMS = ("compute", "comm_setup", "comm_teardown")
STREAM_OF_KIND = {"compute": "compute", "comm_issue": "comm_setup", "comm_wait": "comm_teardown"}

_OP = r"[A-Za-z_][A-Za-z0-9_]*"
_INT = r"0|[1-9][0-9]*"
_NODE_RE = re.compile(rf"({_OP})(?:@mb({_INT}))?(?:\.l({_INT}))?")
_OP_RE = re.compile(_OP)


# ---- nodes ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Node:
    """One op of the graph, as a hashable value.

    Args:
        op: the op name, ``[A-Za-z_][A-Za-z0-9_]*`` (``combine_setup``, ``experts``).
        microbatch: the microbatch index (>= 0), or None.
        layer: the layer index (>= 0), or None.
    """

    op: str
    microbatch: int | None = None
    layer: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.op, str) or not _OP_RE.fullmatch(self.op):
            raise ValueError(f"op must match [A-Za-z_][A-Za-z0-9_]*, got {self.op!r}")
        for name in ("microbatch", "layer"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int or None, got {type(value).__name__}")
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")

    def __str__(self) -> str:
        text = self.op
        if self.microbatch is not None:
            text += f"@mb{self.microbatch}"
        if self.layer is not None:
            text += f".l{self.layer}"
        return text

    @classmethod
    def parse(cls, text: str) -> Node:
        """Parse a canonical string (``"combine_setup@mb1.l3"``) back into a `Node`.

        Raises:
            TypeError: ``text`` is not a str.
            ValueError: ``text`` does not follow the grammar (see the module docstring).
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        match = _NODE_RE.fullmatch(text)
        if match is None:
            raise ValueError(f"text must look like 'op', 'op@mb<i>' or 'op@mb<i>.l<j>', got {text!r}")
        op, mb, layer = match.groups()
        return cls(op, None if mb is None else int(mb), None if layer is None else int(layer))

    @property
    def default_kind(self) -> str:
        """The kind implied by the op name: ``*_setup``/``*_issue`` → comm_issue,
        ``*_teardown``/``*_wait`` → comm_wait, else compute."""
        if self.op.endswith(("_setup", "_issue")):
            return "comm_issue"
        if self.op.endswith(("_teardown", "_wait")):
            return "comm_wait"
        return "compute"


def _as_node(value: Node | str, what: str = "node") -> Node:
    if isinstance(value, Node):
        return value
    if isinstance(value, str):
        return Node.parse(value)
    raise TypeError(f"{what} must be a Node or its canonical str, got {type(value).__name__}")


def _check_seconds(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a number of seconds, got {type(value).__name__}")
    if not value >= 0:
        raise ValueError(f"{what} must be >= 0 seconds, got {value}")
    return float(value)


# ---- the graph -----------------------------------------------------------------------------------
class Graph:
    """A mutable graph of op nodes; ``plan()`` lowers it to a frozen `Plan`.

    Wraps (does not subclass) an ``nx.DiGraph`` whose nodes are `Node` values with attributes
    ``kind``, ``fn``, ``cost``, ``transfer`` and ``priority``.
    """

    def __init__(self) -> None:
        self._g = nx.DiGraph()

    def add(
        self,
        node: Node | str,
        fn: Callable[[dict[Node, Any]], Any] | None = None,
        *,
        after: Iterable[Node | str] = (),
        kind: str | None = None,
        cost: float | None = None,
        transfer: float | None = None,
        priority: float | None = None,
    ) -> Node:
        """Add ``node`` (with edges from each of ``after``) and return it as a `Node`.

        Args:
            node: the node or its canonical string.
            fn: ``fn(inputs: dict[Node, Any]) -> result``; None for a node that returns None.
            after: predecessors (added as bare nodes if new).
            kind: one of `KINDS`; None: ``node.default_kind``.
            cost: seconds of work on its stream, for `Plan.simulate` (default 0).
            transfer: seconds on the link after a comm_issue, for `Plan.simulate`.
            priority: overrides the node's depth in the ordering key.

        Raises:
            ValueError: ``kind`` unknown, ``node`` already added, a negative cost or transfer, or
                a transfer on a node that is not a comm_issue.
            TypeError: ``fn`` not callable.
        """
        node = _as_node(node)
        kind = node.default_kind if kind is None else kind
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r} for {node}")
        if fn is not None and not callable(fn):
            raise TypeError(f"fn must be callable or None, got {type(fn).__name__} for {node}")
        if self._g.nodes.get(node, {}).get("kind") is not None:
            raise ValueError(f"node {node} was already added")
        attrs: dict[str, Any] = {"kind": kind, "fn": fn}
        if cost is not None:
            attrs["cost"] = _check_seconds(cost, f"cost of {node}")
        if transfer is not None:
            if kind != "comm_issue":
                raise ValueError(f"transfer is only for comm_issue nodes, got one on {kind} {node}")
            attrs["transfer"] = _check_seconds(transfer, f"transfer of {node}")
        if priority is not None:
            attrs["priority"] = priority
        self._g.add_node(node, **attrs)
        for pred in after:
            self.add_edge(pred, node)
        return node

    def add_edge(self, src: Node | str, dst: Node | str) -> None:
        """Make ``dst`` depend on ``src`` (``dst``'s fn receives ``src``'s result)."""
        self._g.add_edge(_as_node(src, "src"), _as_node(dst, "dst"))

    @property
    def nx(self) -> nx.DiGraph:
        """A read-only view of the wrapped ``nx.DiGraph``."""
        return nx.freeze(self._g.copy(as_view=True))

    def __contains__(self, node: object) -> bool:
        return node in self._g

    def __len__(self) -> int:
        return len(self._g)

    def plan(self) -> Plan:
        """``order(insert_events(assign_streams(validate(self))))``."""
        return order(insert_events(assign_streams(validate(self))))


# ---- passes --------------------------------------------------------------------------------------
def validate(graph: Graph | nx.DiGraph) -> nx.DiGraph:
    """Check a graph can become a plan; return a frozen copy with each comm_wait's ``setup``.

    Raises:
        PlanError: a cycle (named), a node added only as an edge end, a comm_wait without
            exactly one comm_issue predecessor, or a comm_issue not torn down by exactly one
            comm_wait.
    """
    g = (graph._g if isinstance(graph, Graph) else graph).copy()
    try:
        cycle = nx.find_cycle(g)
    except nx.NetworkXNoCycle:
        cycle = None
    if cycle:
        path = " -> ".join(str(u) for u, _ in cycle) + f" -> {cycle[0][0]}"
        raise PlanError(f"graph has a cycle: {path}")
    for node in sorted(g, key=str):
        attrs = g.nodes[node]
        if attrs.get("kind") not in KINDS:
            raise PlanError(f"node {node} was used in an edge but never added (Graph.add)")
        if attrs["kind"] == "comm_wait":
            setups = sorted((p for p in g.pred[node] if g.nodes[p]["kind"] == "comm_issue"), key=str)
            if len(setups) != 1:
                guess = re.sub(r"_(teardown|wait)$", "_setup", node.op)
                expected = Node(guess, node.microbatch, node.layer)
                detail = (
                    f"its setup (e.g. {expected}) is missing"
                    if not setups
                    else f"it has {len(setups)}: {', '.join(map(str, setups))}"
                )
                raise PlanError(f"comm_wait {node} must have exactly one comm_issue predecessor; {detail}")
            attrs["setup"] = setups[0]
        elif attrs["kind"] == "comm_issue":
            waits = sorted((s for s in g.succ[node] if g.nodes[s]["kind"] == "comm_wait"), key=str)
            if len(waits) > 1:
                raise PlanError(
                    f"comm_issue {node}'s handle is consumed by {len(waits)} comm_waits "
                    f"({', '.join(map(str, waits))}); a handle is torn down exactly once"
                )
            if not waits:
                raise PlanError(f"comm_issue {node} is never torn down: add its comm_wait")
    return nx.freeze(g)


def assign_streams(g: nx.DiGraph) -> nx.DiGraph:
    """Return a frozen copy with a ``stream`` attribute on every node (see `STREAM_OF_KIND`)."""
    g = g.copy()
    for _node, attrs in g.nodes(data=True):
        attrs["stream"] = STREAM_OF_KIND[attrs["kind"]]
    return nx.freeze(g)


def insert_events(g: nx.DiGraph) -> nx.DiGraph:
    """Return a frozen copy whose edges carry ``event=True`` exactly on the cross-stream edges of
    the transitive reduction (one record/wait pair each), ``event=False`` elsewhere."""
    g = g.copy()
    implied = _implied_edges(g)
    for u, v, attrs in g.edges(data=True):
        attrs["event"] = (u, v) not in implied and g.nodes[u]["stream"] != g.nodes[v]["stream"]
    return nx.freeze(g)


def _implied_edges(g: nx.DiGraph) -> set[tuple[Node, Node]]:
    """Edges ``u → v`` also implied by a longer path (those the transitive reduction drops).

    Ancestor sets as int bitsets in topological order: ``u → v`` is implied iff ``u`` is an
    ancestor of another predecessor of ``v``. O(E · deg + N² / 64), unlike networkx's
    ``transitive_reduction`` (a DFS per node), which is quadratic on long chains.
    """
    topo = list(nx.topological_sort(g))
    bit = {n: 1 << i for i, n in enumerate(topo)}
    ancestors: dict[Node, int] = {}
    implied = set()
    for v in topo:
        preds = list(g.pred[v])
        mask = 0
        for p in preds:
            mask |= ancestors[p] | bit[p]
        ancestors[v] = mask
        if len(preds) > 1:
            for u in preds:
                if any(ancestors[p] & bit[u] for p in preds if p is not u):
                    implied.add((u, v))
    return implied


@dataclass(frozen=True)
class EventSpec:
    """A record/wait pair: recorded on ``src_stream`` after ``src``, waited on ``dst_stream``
    before ``dst``."""

    index: int
    src: Node
    dst: Node
    src_stream: str
    dst_stream: str

    def __str__(self) -> str:
        return f"e{self.index}"


@dataclass(frozen=True)
class Step:
    """One step of a plan: wait ``waits`` on ``stream``, run ``node``, record ``records``."""

    index: int
    node: Node
    kind: str
    stream: str
    waits: tuple[int, ...] = ()
    records: tuple[int, ...] = ()


def order(g: nx.DiGraph) -> Plan:
    """Order the nodes deterministically and build the `Plan` (see the module docstring)."""
    depth: dict[Node, int] = {}
    for node in nx.topological_sort(g):
        depth[node] = max((depth[p] + 1 for p in g.pred[node]), default=0)
    key = {n: (g.nodes[n].get("priority", depth[n]), str(n)) for n in g}
    nodes = list(nx.lexicographical_topological_sort(g, key=key.__getitem__))
    position = {n: i for i, n in enumerate(nodes)}
    edges = sorted(
        ((u, v) for u, v, ev in g.edges(data="event") if ev),
        key=lambda e: (position[e[0]], position[e[1]]),
    )
    events = tuple(EventSpec(i, u, v, g.nodes[u]["stream"], g.nodes[v]["stream"]) for i, (u, v) in enumerate(edges))
    waits: dict[Node, list[int]] = {}
    records: dict[Node, list[int]] = {}
    for ev in events:
        records.setdefault(ev.src, []).append(ev.index)
        waits.setdefault(ev.dst, []).append(ev.index)
    steps = tuple(
        Step(i, n, g.nodes[n]["kind"], g.nodes[n]["stream"], tuple(waits.get(n, ())), tuple(records.get(n, ())))
        for i, n in enumerate(nodes)
    )
    used = {s.stream for s in steps}
    return Plan(
        streams=tuple(s for s in STREAMS if s in used),
        steps=steps,
        events=events,
        graph=g,
    )


# ---- the plan ------------------------------------------------------------------------------------
def _default_streams(names: Sequence[str], device: Any, *, inline: bool) -> dict[str, _streams.Stream]:
    """The streams a plan runs on when the caller gives none.

    compute: on npu/cuda the current stream; on cpu the host stream (the calling thread runs the
    compute itself, no handoff) when ``inline``, else the pooled ``"compute"`` worker. The comm
    streams are the device's pooled workers / torch streams (made once per device, see
    `overlap.streams.pooled`).
    """
    dev = _streams.resolve_device(device)
    out = {}
    for name in names:
        if name == "compute" and dev.type != "cpu":
            out[name] = _streams.current_stream(dev)
        elif name == "compute" and inline:
            out[name] = _streams.host_stream()
        else:
            out[name] = _streams.pooled(name, dev)
    return out


@dataclass(frozen=True)
class _Job:
    stream: str
    steps: tuple[Step, ...]
    # (node, kind, fn, predecessors, label) per step, computed once per plan
    entries: tuple[tuple[Node, str, Any, tuple[Node, ...], str], ...] = ()


def device_to_host_clock(ref_host_s: float, marks_ms: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Convert device-event intervals onto the host ``time.perf_counter`` clock.

    Args:
        ref_host_s: the host time at which the reference device event completed (`_calibrate`).
        marks_ms: per interval, ``(start, end)`` in milliseconds after the reference event (what
            ``ref.elapsed_time(event)`` returns on cuda/npu).

    Returns:
        list[tuple[float, float]]: ``(start, end)`` host seconds; an end the device timestamped
        before its start (timer resolution) is clamped to the start.
    """
    out = []
    for start_ms, end_ms in marks_ms:
        start = ref_host_s + start_ms * 1e-3
        out.append((start, max(start, ref_host_s + end_ms * 1e-3)))
    return out


def _calibrate(
    record_and_wait: Callable[[], Any], clock: Callable[[], float] = time.perf_counter, tries: int = 5
) -> tuple[Any, float]:
    """Tie a device event to the host clock: ``(event, host seconds at which it completed)``.

    ``record_and_wait()`` records a timing event on an idle stream and blocks until it completed;
    the event's instant lies between the host times taken before and after, so the midpoint of
    the tightest of ``tries`` such brackets is used (error at most half its width).
    """
    best: tuple[float, Any, float] | None = None
    for _ in range(tries):
        before = clock()
        event = record_and_wait()
        after = clock()
        if best is None or after - before < best[0]:
            best = (after - before, event, (before + after) / 2)
    assert best is not None
    return best[1], best[2]


_CLOCKS: dict[torch.device, tuple[Any, float]] = {}


def _device_clock(dev: torch.device) -> tuple[Any, float]:
    """The calibration of ``dev`` (npu/cuda), made once per device and reused."""
    if dev not in _CLOCKS:
        module = _streams._torch_module(dev)
        module.synchronize(dev)

        def record_and_wait() -> Any:
            event = module.Event(enable_timing=True)
            event.record(module.current_stream(dev))
            event.synchronize()
            return event

        _CLOCKS[dev] = _calibrate(record_and_wait)
    return _CLOCKS[dev]


class _Run:
    """The state of one run of a plan: results, submitted jobs, what the timeline will get."""

    def __init__(self, plan: Plan, resolved: dict[str, _streams.Stream], timeline: Timeline | None) -> None:
        self.plan = plan
        self.resolved = resolved
        self.timeline = timeline
        self.results: dict[Node, Any] = {}
        self.submitted: list[tuple[_Job, cf.Future]] = []
        self.rows: list[tuple[str, str, float, float, str]] = []  # host-clock intervals
        self.marks: list[tuple[str, str, str, Any, Any]] = []  # device events (npu/cuda)
        if timeline is not None:
            timeline.add_tracks(plan.streams)

    def job_fn(self, job: _Job, stream: _streams.Stream) -> Callable[[], None]:
        results, entries, track = self.results, job.entries, job.stream
        rows = self.rows.append if self.timeline is not None else None
        timer = None
        if rows is not None and isinstance(stream, _streams._TorchStream):
            timer = (stream._module, stream._torch, self.marks.append)

        def run_job() -> None:
            profiling = torch.autograd._profiler_enabled()
            clock = time.perf_counter
            for node, kind, fn, ps, label in entries:
                inputs = {p: results[p] for p in ps}
                if timer is not None:
                    begin, finish = timer[0].Event(enable_timing=True), timer[0].Event(enable_timing=True)
                    begin.record(timer[1])
                start = clock()
                if fn is None:
                    out = None
                elif profiling:
                    with torch.profiler.record_function(label):
                        out = fn(inputs)
                else:
                    out = fn(inputs)
                results[node] = out
                if timer is not None:
                    finish.record(timer[1])
                    timer[2]((track, label, kind, begin, finish))
                elif rows is not None:
                    rows((track, label, start, clock(), kind))

        return run_job

    def flush_timeline(self) -> None:
        """Give the timeline what ran: host intervals, or device intervals once the device is done."""
        if self.timeline is None:
            return
        self.timeline.add_many(self.rows)
        if self.marks:  # device times: read when the timeline is, never waited for here (no host sync)
            dev = next(iter(self.resolved.values())).device
            marks, after_ref = list(self.marks), dev in _CLOCKS
            self.timeline.add_pending(functools.partial(_device_rows, marks, dev, after_ref))


def _device_rows(marks: list[tuple[str, str, str, Any, Any]], dev: torch.device, after_ref: bool) -> list[tuple]:
    """The rows of a run's device timing events, on the host clock; waits for each end event.
    `after_ref`: the device's clock was calibrated before the run (else it is now, after it: each
    time is then measured from the event to the reference, and negated)."""
    for *_, finish in marks:
        finish.synchronize()  # an event wait, when the timeline is read (not a stream sync in the run)
    ref, ref_host = _device_clock(dev)

    def ms(event: Any) -> float:
        return ref.elapsed_time(event) if after_ref else -event.elapsed_time(ref)

    spans = device_to_host_clock(ref_host, [(ms(b), ms(e)) for _, _, _, b, e in marks])
    return [(track, label, a, b, kind) for (track, label, kind, _, _), (a, b) in zip(marks, spans)]


@dataclass(frozen=True, eq=False)
class Plan:
    """A frozen, ordered schedule: steps on named streams joined by events.

    Attributes:
        streams: the stream names used, in `STREAMS` order.
        steps: the steps in plan order (a topological order).
        events: the record/wait pairs, numbered in order of their record.
        graph: the frozen annotated ``nx.DiGraph`` (attributes kind, fn, cost, transfer,
            stream, setup; edge attribute event).

    Plans compare equal when their `canonical` forms are equal (fns are not compared).
    """

    streams: tuple[str, ...]
    steps: tuple[Step, ...]
    events: tuple[EventSpec, ...]
    graph: nx.DiGraph = field(repr=False)

    # -- identity --
    def canonical(self) -> str:
        """A stable text form: streams, steps with their events, events, data edges."""
        lines = [f"plan v1 streams={','.join(self.streams)}"]
        for s in self.steps:
            lines.append(
                f"{s.index} {s.stream} {s.node} {s.kind} wait={','.join(f'e{e}' for e in s.waits)}"
                f" record={','.join(f'e{e}' for e in s.records)}"
            )
        lines += [f"e{e.index} {e.src}->{e.dst}" for e in self.events]
        lines += sorted(f"edge {u}->{v}" for u, v in self.graph.edges)
        return "\n".join(lines)

    def fingerprint(self) -> str:
        """A 16-hex-digit hash of `canonical`: equal on every rank that built the same plan."""
        return hashlib.sha256(self.canonical().encode()).hexdigest()[:16]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Plan) and self.canonical() == other.canonical()

    def __hash__(self) -> int:
        return hash(self.canonical())

    @property
    def nodes(self) -> tuple[Node, ...]:
        """Nodes in plan order."""
        return tuple(s.node for s in self.steps)

    def comm_order(self) -> tuple[Step, ...]:
        """The comm_issue and comm_wait steps in plan order (what must agree across ranks)."""
        return tuple(s for s in self.steps if s.kind != "compute")

    # -- text --
    def to_grid(self, mark: Iterable[int] = ()) -> str:
        """A text grid: one column per stream, one row per step; ``w:`` events waited before the
        node, ``r:`` events recorded after it; rows in ``mark`` are flagged ``>>``."""
        marked = set(mark)
        cells = []
        for s in self.steps:
            text = str(s.node)
            if s.waits:
                text = "w:" + ",".join(f"e{e}" for e in s.waits) + " " + text
            if s.records:
                text += " r:" + ",".join(f"e{e}" for e in s.records)
            cells.append(text)
        width = {
            st: max([len(st)] + [len(c) for c, s in zip(cells, self.steps) if s.stream == st]) for st in self.streams
        }
        num = len(str(max(len(self.steps) - 1, 0)))
        head = "   " + " " * num + " | " + " | ".join(f"{st:<{width[st]}}" for st in self.streams)
        rule = "-" * len(head)
        rows = [head, rule]
        for cell, s in zip(cells, self.steps):
            row = " | ".join(f"{cell if st == s.stream else '':<{width[st]}}" for st in self.streams)
            rows.append(f"{'>>' if s.index in marked else '  '} {s.index:>{num}} | {row}".rstrip())
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.to_grid()

    # -- running --
    def _jobs(self) -> list[_Job]:
        """Group consecutive same-stream steps: a job may wait only before its first step and
        record only after its last. Computed once per plan (with each step's fn and inputs)."""
        cached = self.__dict__.get("_jobs_cache")
        if cached is not None:
            return cached
        g = self.graph

        def job(steps: list[Step]) -> _Job:
            entries = tuple((s.node, s.kind, g.nodes[s.node]["fn"], tuple(g.pred[s.node]), str(s.node)) for s in steps)
            return _Job(steps[0].stream, tuple(steps), entries)

        jobs: list[_Job] = []
        current: list[Step] = []
        for s in self.steps:
            if current and (s.stream != current[-1].stream or s.waits or current[-1].records):
                jobs.append(job(current))
                current = []
            current.append(s)
        if current:
            jobs.append(job(current))
        object.__setattr__(self, "_jobs_cache", jobs)  # frozen: a private cache, not state
        return jobs

    def _check_runnable(self) -> None:
        """A plan runs without deadlock iff every event is recorded before it is waited for, in
        plan order (each stream runs its steps in plan order, a wait only sees earlier records).

        Raises:
            DeadlockError: names the first step that waits for an event recorded later.
        """
        position = {s.node: s.index for s in self.steps}
        for s in self.steps:
            for e in s.waits:
                src = position[self.events[e].src]
                if src >= s.index:
                    raise DeadlockError(
                        f"plan cannot run: step {s.index} ({s.node}) waits for e{e}, recorded only "
                        f"after step {src} ({self.events[e].src}) later in plan order\n" + self.to_grid(mark=[s.index])
                    )

    def _resolve(
        self, streams: Mapping[str, _streams.Stream] | None, device: Any, inline: bool
    ) -> dict[str, _streams.Stream]:
        if streams is None:
            return _default_streams(self.streams, device, inline=inline)
        missing = [s for s in self.streams if s not in streams]
        if missing:
            raise ValueError(f"streams must map every plan stream {self.streams}, missing {missing}")
        return {name: streams[name] for name in self.streams}

    def _submit(self, run: _Run, deadline: float | None, timeout: float | None = None) -> None:
        """Queue every worker job in plan order, then run the host jobs here, inline, in order.

        The host's records are deferred (`overlap.streams.defer_record`): a worker job that waits
        for a host step is queued at once and released when the host reaches that step, so the
        workers run as far ahead as the plan's events allow, exactly as if compute were a worker.
        A host job first waits (here, bounded by ``deadline``) for the worker events it needs.
        When the host stops (a failure, or the deadline), its remaining records are reached with
        the error, so that the workers skip what depended on them, and are then cleared.
        """
        self._check_runnable()
        resolved = run.resolved
        dev = next(iter(resolved.values())).device if resolved else _streams.resolve_device(None)
        events = [_streams.Event(dev, name=f"e{e.index}") for e in self.events]
        host_jobs: list[tuple[_Job, _streams.Stream]] = []
        promises: dict[int, Callable[[BaseException | None], None]] = {}
        for job in self._jobs():
            stream = resolved[job.stream]
            if stream.is_host:
                host_jobs.append((job, stream))
                for e in job.steps[-1].records:
                    promises[e] = _streams.defer_record(events[e])
                continue
            for e in job.steps[0].waits:
                stream.wait_event(events[e])
            run.submitted.append((job, stream.submit(run.job_fn(job, stream))))
            for e in job.steps[-1].records:
                stream.record_event(events[e])
        error: BaseException | None = None
        try:
            for job, stream in host_jobs:
                try:
                    for e in job.steps[0].waits:
                        left = None if deadline is None else max(0.0, deadline - time.perf_counter())
                        events[e].synchronize(left)
                except CommTimeoutError as exc:
                    error = exc
                    raise CommTimeoutError(self._timeout_message(run.results, timeout)) from None
                except BaseException as exc:  # noqa: BLE001 - a worker's failure: its future carries it
                    error = exc
                    return
                try:
                    run.job_fn(job, stream)()
                except BaseException as exc:  # noqa: BLE001 - raised by `_finish`, with a note
                    error = exc
                    future: cf.Future = cf.Future()
                    future.set_exception(exc)
                    run.submitted.append((job, future))
                    return
                for e in job.steps[-1].records:
                    promises.pop(e)(None)
        finally:
            if promises:
                for reach in promises.values():
                    reach(error)
                for stream in resolved.values():
                    stream.clear_after()

    def _finish(self, run: _Run) -> dict[Node, Any]:
        error: BaseException | None = None
        failed_job: _Job | None = None
        # Errors only travel forward in plan order: the earliest failed step is where it arose.
        for job, future in sorted(run.submitted, key=lambda jf: jf[0].steps[0].index):
            exc = future.exception()
            if exc is not None and error is None:
                error, failed_job = exc, job
        if error is not None:
            assert failed_job is not None
            for stream in run.resolved.values():  # clear the poison so the streams can be reused
                try:
                    stream.synchronize()
                except BaseException:  # noqa: BLE001 - the same error, reported below
                    pass
            run.flush_timeline()
            failed = next((s.node for s in failed_job.steps if s.node not in run.results), failed_job.steps[0].node)
            note = f"(while running plan step {failed} on stream {failed_job.stream!r})"
            add_note(error, note)
            raise error
        run.flush_timeline()
        results = run.results
        return {s.node: results[s.node] for s in self.steps}

    def run(
        self,
        streams: Mapping[str, _streams.Stream] | None = None,
        *,
        device: Any = None,
        timeline: Timeline | None = None,
        timeout: float | None = None,
    ) -> dict[Node, Any]:
        """Run the plan and block until every node has finished.

        Args:
            streams: a `Stream` per plan stream name; None: the defaults for ``device``: compute
                on the calling thread (cpu: the host stream, no handoff; npu/cuda: the current
                stream), comm on the device's pooled streams (made once, reused by every run).
                With a ``timeout`` on cpu, compute runs on a pooled worker instead, so that the
                caller can give up on a node that never returns.
            device: the device when ``streams`` is None (None: ``torch.get_default_device()``).
            timeline: if given, one interval per node is added (track = stream name, kind =
                node kind, ``time.perf_counter`` seconds). On cpu the host times around the
                node's call; on npu/cuda the device times of events recorded around it on its
                stream, read once the plan finished and moved onto the host clock.
            timeout: seconds to wait for the whole plan; None waits forever.

        Returns:
            dict[Node, Any]: every node's result, in plan order.

        Raises:
            BaseException: the first exception raised by a node (original traceback, with a note
                naming the step); the streams are clean again afterwards.
            CommTimeoutError: ``timeout`` passed; the message names the unfinished nodes.
            DeadlockError: a step waits for an event recorded later in plan order.
        """
        if timeout is not None:
            _check_seconds(timeout, "timeout")
        deadline = None if timeout is None else time.perf_counter() + timeout
        run = _Run(self, self._resolve(streams, device, inline=timeout is None), timeline)
        self._submit(run, deadline, timeout)
        left = None if deadline is None else max(0.0, deadline - time.perf_counter())
        _, pending = cf.wait([f for _, f in run.submitted], timeout=left)
        if pending:
            raise CommTimeoutError(self._timeout_message(run.results, timeout))
        return self._finish(run)

    async def run_async(
        self,
        streams: Mapping[str, _streams.Stream] | None = None,
        *,
        device: Any = None,
        timeline: Timeline | None = None,
        timeout: float | None = None,
    ) -> dict[Node, Any]:
        """Like `run`, but ``await``-able: the event loop is never blocked (on cpu every step
        runs on a worker stream, compute included; this coroutine awaits their futures).

        Raises:
            ValueError: a stream in ``streams`` is the host stream (it would run on the loop).
        """
        if timeout is not None:
            _check_seconds(timeout, "timeout")
        if streams is not None:
            hosts = [name for name, s in streams.items() if s.is_host]
            if hosts:
                raise ValueError(f"streams must be worker streams under asyncio, got host for {hosts}")
        run = _Run(self, self._resolve(streams, device, inline=False), timeline)
        self._submit(run, None)
        waiters = [asyncio.wrap_future(f) for _, f in run.submitted]
        if waiters:
            _, pending = await asyncio.wait(waiters, timeout=timeout)
            if pending:
                raise CommTimeoutError(self._timeout_message(run.results, timeout))
        return self._finish(run)

    def _timeout_message(self, results: Mapping[Node, Any], timeout: float | None) -> str:
        left = [str(s.node) for s in self.steps if s.node not in results]
        shown = ", ".join(left[:8]) + (" ..." if len(left) > 8 else "")
        return f"plan did not finish within {timeout} s; {len(left)} nodes unfinished: {shown}"

    # -- simulation --
    def simulate(
        self,
        costs: Mapping[Node | str, float] | None = None,
        *,
        transfers: Mapping[Node | str, float] | None = None,
    ) -> Timeline:
        """Predict the timeline by a discrete-event simulation of the plan on its streams.

        Each stream runs its steps in plan order; a step starts when its stream is free and its
        waited events are recorded. A comm_issue's transfer then occupies the FIFO ``"link"``
        (concurrently with every stream); its comm_wait ends at ``max(start, transfer end) +
        cost``.

        Args:
            costs: seconds per node (Node or canonical str); missing nodes use their ``cost``
                attribute, else 0.
            transfers: seconds on the link per comm_issue; missing ones use the ``transfer``
                attribute, else 0 (no link interval).

        Returns:
            Timeline: ``source="simulated"``, starting at 0; node intervals on stream tracks,
            transfers (kind ``"comm"``, named after their comm_issue) on track ``"link"``.

        Raises:
            DeadlockError: no stream can make progress (the grid marks each blocked step).
            ValueError / TypeError: a negative or non-numeric cost.
        """
        g = self.graph
        cost_of = {n: _check_seconds(g.nodes[n].get("cost", 0.0), f"cost of {n}") for n in g}
        transfer_of = {n: g.nodes[n].get("transfer", 0.0) for n in g}
        for table, target, what in ((costs, cost_of, "cost"), (transfers, transfer_of, "transfer")):
            for key, value in (table or {}).items():
                node = _as_node(key, f"{what}s key")
                if node not in g:
                    raise ValueError(f"{what}s key {node} is not a node of the plan")
                target[node] = _check_seconds(value, f"{what} of {node}")
        queues = {st: [s for s in self.steps if s.stream == st] for st in self.streams}
        head = dict.fromkeys(self.streams, 0)
        free = dict.fromkeys(self.streams, 0.0)
        event_time: dict[int, float] = {}
        transfer_end: dict[Node, float] = {}
        link_free = 0.0
        timeline = Timeline(self.streams, source="simulated")
        remaining = len(self.steps)
        while remaining:
            best: tuple[float, int, str] | None = None
            for rank, st in enumerate(self.streams):
                if head[st] == len(queues[st]):
                    continue
                step = queues[st][head[st]]
                if all(e in event_time for e in step.waits):
                    start = max([free[st]] + [event_time[e] for e in step.waits])
                    if best is None or (start, rank) < best[:2]:
                        best = (start, rank, st)
            if best is None:
                blocked = [queues[st][head[st]].index for st in self.streams if head[st] < len(queues[st])]
                raise DeadlockError(
                    "plan cannot progress: every stream waits for an event not yet recorded\n"
                    + self.to_grid(mark=blocked)
                )
            start, _, st = best
            step = queues[st][head[st]]
            node = step.node
            if step.kind == "comm_wait":
                end = max(start, transfer_end.get(g.nodes[node]["setup"], start)) + cost_of[node]
            else:
                end = start + cost_of[node]
            if step.kind == "comm_issue":
                t_start = max(end, link_free)
                transfer_end[node] = link_free = t_start + transfer_of[node]
                if transfer_of[node] > 0:
                    timeline.add("link", str(node), t_start, link_free, "comm")
            timeline.add(st, str(node), start, end, step.kind)
            for e in step.records:
                event_time[e] = end
            free[st] = end
            head[st] += 1
            remaining -= 1
        return timeline

    # -- drawing --
    def to_dot(self) -> str:
        """Graphviz DOT text (no graphviz needed): one cluster per stream, nodes coloured by
        stream, data edges solid, event edges dashed red and labelled ``e<i>`` (`overlap.drawing`)."""
        from .drawing import plan_to_dot

        return plan_to_dot(self)

    def save_png(self, path: str | os.PathLike, *, title: str | None = None) -> None:
        """Draw the plan to PNG (`overlap.drawing.save_plan_png`): x = step, one lane per stream,
        data and event edges told apart in the legend, a caption reading the node names.

        Raises:
            ImportError: matplotlib is not installed (``pip install moe-overlap[viz]``).
        """
        from .drawing import save_plan_png

        save_plan_png(self, path, title=title)


def check_same_order(plans: Sequence[Plan]) -> None:
    """Reject plans (one per rank) whose comm steps come in different orders.

    Raises:
        TypeError: an element is not a `Plan`.
        PlanError: names the first plan and comm step that differ from plan 0, with both grids.
    """
    plans = list(plans)
    for i, p in enumerate(plans):
        if not isinstance(p, Plan):
            raise TypeError(f"plans[{i}] must be a Plan, got {type(p).__name__}")
    if not plans:
        return
    ref = [(str(s.node), s.kind) for s in plans[0].comm_order()]
    for k, plan in enumerate(plans[1:], start=1):
        mine = [(str(s.node), s.kind) for s in plan.comm_order()]
        if mine == ref:
            continue
        i = next((j for j, (a, b) in enumerate(zip(ref, mine)) if a != b), min(len(ref), len(mine)))
        a = ref[i][0] if i < len(ref) else "<end>"
        b = mine[i][0] if i < len(mine) else "<end>"
        step_ref = plans[0].comm_order()[i].index if i < len(ref) else None
        step_mine = plan.comm_order()[i].index if i < len(mine) else None
        raise PlanError(
            f"plan {k} issues communication in a different order than plan 0: comm step {i} is "
            f"{b} in plan {k} but {a} in plan 0\nplan 0:\n"
            f"{plans[0].to_grid(mark=[step_ref] if step_ref is not None else [])}\nplan {k}:\n"
            f"{plan.to_grid(mark=[step_mine] if step_mine is not None else [])}"
        )
