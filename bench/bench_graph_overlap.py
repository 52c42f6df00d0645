"""How much a planned graph overlaps when it really runs: the MoE-shaped two-microbatch graph of
`tests/test_graph.py`, with busy-wait compute and a synthetic FIFO link that sleeps (no core
used), measured against the plan's own simulation. Prints ratios side by side; asserts nothing.

    python bench/bench_graph_overlap.py [--compute-ms 30] [--transfer-ms 20] [--repeats 5]

Analytically (defaults): 4 transfers of 20 ms, the last one exposed -> 75 % hidden, makespan
140 ms. A loaded machine stretches the compute and lowers the measured numbers.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

from overlap.graph import Graph, Node
from overlap.timeline import Timeline

MOE_CHAIN = ("route", "dispatch_setup", "dispatch_teardown", "experts", "combine_setup", "combine_teardown")


def moe_edges(num_microbatches: int) -> list[tuple[str, str]]:
    edges = []
    for mb in range(num_microbatches):
        names = [f"{op}@mb{mb}" for op in MOE_CHAIN]
        edges += list(zip(names, names[1:]))
        edges.append((f"route@mb{mb}", f"combine_teardown@mb{mb}"))
    return edges


class SyntheticLink:
    """FIFO link: a transfer starts when issued and the link is free, lands on a timer thread."""

    def __init__(self, timeline: Timeline, transfer_s: float) -> None:
        self.timeline, self.transfer_s = timeline, transfer_s
        self.free_at = 0.0
        self.lock = threading.Lock()

    def issue(self, name: str):
        def fn(inputs):
            now = time.perf_counter()
            with self.lock:
                start = max(now, self.free_at)
                self.free_at = end = start + self.transfer_s
            landed = threading.Event()
            threading.Timer(end - now, landed.set).start()
            self.timeline.add("link", name, start, end, "comm")
            return landed

        return fn

    @staticmethod
    def wait(inputs):
        (landed,) = [v for k, v in inputs.items() if k.op.endswith("_setup")]
        if not landed.wait(60):
            raise TimeoutError("synthetic transfer never landed")


def busy(seconds: float):
    def fn(inputs):
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass

    return fn


def graph(timeline: Timeline, compute_s: float, transfer_s: float, microbatches: int) -> Graph:
    link = SyntheticLink(timeline, transfer_s)
    edges = moe_edges(microbatches)
    g = Graph()
    for n in sorted({n for e in edges for n in e}):
        kind = Node.parse(n).default_kind
        if kind == "compute":
            g.add(n, busy(compute_s), cost=compute_s)
        elif kind == "comm_issue":
            g.add(n, link.issue(n), transfer=transfer_s)
        else:
            g.add(n, SyntheticLink.wait)
    for u, v in edges:
        g.add_edge(u, v)
    return g


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--compute-ms", type=float, default=30.0)
    ap.add_argument("--transfer-ms", type=float, default=20.0)
    ap.add_argument("--microbatches", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    compute_s, transfer_s = args.compute_ms / 1e3, args.transfer_ms / 1e3
    rows = []
    for _ in range(args.repeats):
        measured = Timeline()
        plan = graph(measured, compute_s, transfer_s, args.microbatches).plan()
        sim = plan.simulate().report()
        plan.run(timeline=measured, timeout=120)
        meas = measured.report()
        rows.append(
            (meas.hidden_fraction, sim.hidden_fraction, meas.speedup, sim.speedup, meas.makespan / sim.makespan)
        )
    print(
        f"{'run':>3}  {'hidden meas':>11}  {'hidden sim':>10}  {'speedup meas':>12}  {'speedup sim':>11}  "
        f"{'makespan meas/sim':>17}"
    )
    for i, r in enumerate(rows):
        print(f"{i:>3}  {r[0]:>11.3f}  {r[1]:>10.3f}  {r[2]:>12.3f}  {r[3]:>11.3f}  {r[4]:>17.3f}")
    med = [statistics.median(c) for c in zip(*rows)]
    print(f"{'med':>3}  {med[0]:>11.3f}  {med[1]:>10.3f}  {med[2]:>12.3f}  {med[3]:>11.3f}  {med[4]:>17.3f}")


if __name__ == "__main__":
    main()
