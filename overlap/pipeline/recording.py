"""What an unplanned run did: the op calls (and the compute between them) in the order they ran.

Owns: `Recording`, filled by the fibers and by the scheduler context's own thread (op calls a layer
makes directly), and turned into timeline intervals and a `Graph` that can be drawn. A recording
is not a plan: nothing was planned, it is what happened. Never runs anything.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from ..graph import Graph, Node
from ..ops import transport
from ..timeline import Timeline

TRACK_OF_KIND = {"compute": "compute", "comm_issue": "comm_setup", "comm_wait": "comm_teardown"}


@dataclass(frozen=True)
class Entry:
    """One recorded interval: an op call (`comm_issue` / `comm_wait`) or the compute segment that
    led up to it (`compute`), on the `time.perf_counter` clock."""

    node: Node
    kind: str
    start: float
    end: float


@dataclass
class Recording:
    """The calls of one run, in the order they finished; thread-safe to append to."""

    entries: list[Entry] = field(default_factory=list)
    transfers: list[transport.Transfer] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, node: Node, kind: str, start: float, end: float | None = None) -> None:
        with self._lock:
            self.entries.append(Entry(node, kind, start, time.perf_counter() if end is None else end))

    def add_transfer(self, result: object) -> None:
        """Keep the transfer a setup's result names (its `comm_cmd_info` is the last element)."""
        transfer = transport.transfer_of(result[-1]) if isinstance(result, tuple) else None  # type: ignore[index]
        if transfer is not None:
            with self._lock:
                self.transfers.append(transfer)

    @property
    def has_ops(self) -> bool:
        return any(e.kind != "compute" for e in self.entries)

    def order(self) -> list[str]:
        """Canonical names of the recorded op calls and compute segments, in the order they ran."""
        return [str(e.node) for e in self.entries]

    def commit(self, timeline: Timeline) -> None:
        """Add every interval (and the link's transfer intervals) to `timeline`."""
        for e in self.entries:
            timeline.add(TRACK_OF_KIND[e.kind], str(e.node), e.start, e.end, kind=e.kind)
        add_transfers(timeline, self.transfers)

    def graph(self) -> Graph:
        """The calls as a graph (for drawing and simulation): each microbatch's entries in program
        order, every teardown after its setup; priorities reproduce the recorded order."""
        g = Graph()
        previous: dict[int | None, Node] = {}
        setups: dict[tuple[str, int | None, int | None], Node] = {}
        for index, e in enumerate(self.entries):
            node, mb = e.node, e.node.microbatch
            after = [previous[mb]] if mb in previous else []
            key = (node.op.split("_")[0], mb, node.layer)
            if e.kind == "comm_issue":
                setups[key] = node
            elif e.kind == "comm_wait" and key in setups and setups[key] not in after:
                after.append(setups[key])
            g.add(node, after=after, kind=e.kind, priority=index)
            previous[mb] = node
        return g


def add_transfers(timeline: Timeline, transfers: list[transport.Transfer]) -> None:
    """One `link` interval per transfer that reached and left the link."""
    for t in transfers:
        if t.started_at is not None and t.finished_at is not None:
            timeline.add("link", t.label or t.op, t.started_at, t.finished_at, kind="comm")


class LaneRecorder:
    """Records one lane of op calls (a fiber's microbatch, or the context's own thread): before
    each op the compute segment since the previous one, then the op call itself. The layer of a
    node is `layer_base` plus how many calls of that op the lane made before it."""

    def __init__(self, recording: Recording, microbatch: int, layer_base: int) -> None:
        self.recording, self.microbatch, self.layer_base = recording, microbatch, layer_base
        self.calls: dict[str, int] = {}
        self.segments = 0
        self.segment_start = time.perf_counter()

    @property
    def num_layers(self) -> int:
        """Layers this lane went through: the most calls of any one op."""
        return max(self.calls.values(), default=0)

    def close_segment(self, before: str) -> None:
        """Record the compute since the lane's last op call (named for the layer of the op `before`,
        or of the last op for `before == "end"`)."""
        calls = self.calls.get(before, 0) if before != "end" else max(self.num_layers - 1, 0)
        node = Node(f"compute{self.segments}", microbatch=self.microbatch, layer=self.layer_base + calls)
        self.segments += 1
        self.recording.add(node, "compute", self.segment_start)

    def next_node(self, name: str) -> Node:
        """The node of the lane's next call of op `name`."""
        return Node(name, microbatch=self.microbatch, layer=self.layer_base + self.calls.get(name, 0))

    def op_done(self, name: str, start: float, result: object) -> None:
        """Record a finished op call that started at `start` and returned `result`."""
        node = self.next_node(name)
        self.calls[name] = self.calls.get(name, 0) + 1
        is_setup = name.endswith("_setup")
        self.recording.add(node, "comm_issue" if is_setup else "comm_wait", start)
        if is_setup:
            self.recording.add_transfer(result)
        self.segment_start = time.perf_counter()
