"""Scheduler overhead per node: a plan of trivial nodes replayed vs the same calls made directly.

Run: ``python bench/bench_scheduler.py [--nodes 1000] [--repeats 5]``. Prints µs per node for

* ``direct``: the node functions called in a loop, with the same ``inputs`` dicts;
* ``single-stream chain``: N compute nodes in a chain (one job: no thread handoff);
* ``two-stream alternating chain``: N nodes alternating compute / comm_setup, each depending on
  the previous one, so every node is a cross-stream event wait; the setups' teardowns hang off
  the chain on the third stream;
* ``simulate`` of the single-stream chain and ``plan()`` (the passes) for reference.

Each chain runs twice, side by side in one process: ``host`` is the default (compute inline on
the calling thread, comm on the pooled workers); ``worker`` puts compute on a worker thread too
(what ``Plan.run`` did before compute became host-inline). A ``lock ping-pong`` row gives this
machine's floor: half the round trip of two threads handing one lock back and forth (no
scheduler at all), i.e. the cost of one thread wake-up here and now.

Overhead = (plan time - direct time) / N, best of ``--repeats``.
"""

from __future__ import annotations

import _thread
import argparse
import threading
import time

from overlap import streams
from overlap.graph import Graph, Node


def trivial(inputs: dict) -> int:
    return len(inputs)


def chain(num_nodes: int, alternate: bool) -> Graph:
    g = Graph()
    prev = None
    for i in range(num_nodes):
        # Odd nodes are comm_issue (stream comm_setup), so every chain edge crosses streams.
        kind = "comm_issue" if alternate and i % 2 else "compute"
        node = g.add(Node("n", i), trivial, after=[prev] if prev else [], kind=kind)
        prev = node
    if alternate:  # each setup needs its teardown; they hang off the chain (their own stream)
        for i in range(1, num_nodes, 2):
            g.add(Node("n_teardown", i), trivial, after=[Node("n", i)])
    return g


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def direct(plan) -> float:
    preds = {n: tuple(plan.graph.pred[n]) for n in plan.graph}

    def go() -> None:
        results = {}
        for node in plan.nodes:
            results[node] = trivial({p: results[p] for p in preds[node]})

    return go


def ping_pong(rounds: int) -> float:
    """Seconds per one-way handoff of a lock between two threads."""
    a, b = _thread.allocate_lock(), _thread.allocate_lock()
    a.acquire()
    b.acquire()

    def other() -> None:
        for _ in range(rounds):
            a.acquire()
            b.release()

    t = threading.Thread(target=other)
    t.start()
    start = time.perf_counter()
    for _ in range(rounds):
        a.release()
        b.acquire()
    elapsed = time.perf_counter() - start
    t.join()
    return elapsed / (2 * rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.nodes < 2:
        raise SystemExit(f"--nodes must be >= 2, got {args.nodes}")
    n = args.nodes
    worker = {name: streams.pooled(name, "cpu") for name in ("compute", "comm_setup", "comm_teardown")}
    rows = []
    for label, alternate in (("single-stream chain", False), ("two-stream alternating chain", True)):
        g = chain(n, alternate)
        t_plan = best_of(1, g.plan)
        plan = g.plan()
        given = {name: worker[name] for name in plan.streams}
        plan.run()  # warm the pooled worker streams
        plan.run(given)
        count = len(plan.steps)
        t_direct = best_of(args.repeats, direct(plan))
        t_host, t_worker = [], []
        for _ in range(args.repeats):  # alternated, so that a change in load hits both alike
            t_host.append(best_of(1, plan.run))
            t_worker.append(best_of(1, lambda plan=plan, given=given: plan.run(given)))
        rows.append((f"{label}, host", count, len(plan.events), t_direct, min(t_host), t_plan))
        rows.append((f"{label}, worker", count, len(plan.events), t_direct, min(t_worker), t_plan))
    sim_plan = chain(n, False).plan()
    t_sim = best_of(args.repeats, sim_plan.simulate)
    t_pp = min(ping_pong(2000) for _ in range(args.repeats))

    print(f"{'':<38} {'nodes':>6} {'events':>6} {'direct':>10} {'plan.run':>10} {'overhead':>10} {'plan()':>10}")
    for label, count, events, t_direct, t_run, t_plan in rows:
        print(
            f"{label:<38} {count:>6} {events:>6} {t_direct / count * 1e6:>7.2f} µs "
            f"{t_run / count * 1e6:>7.2f} µs {(t_run - t_direct) / count * 1e6:>7.2f} µs "
            f"{t_plan / count * 1e6:>7.1f} µs"
        )
    print(f"simulate, single-stream chain: {t_sim / n * 1e6:.2f} µs/node")
    print(f"lock ping-pong (one thread wake-up, this machine now): {t_pp * 1e6:.2f} µs")


if __name__ == "__main__":
    main()
