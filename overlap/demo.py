"""The main job and the benchmark: the reference MoE layer serial vs overlapped on local ranks.

Owns what `python -m overlap demo` and `python -m overlap bench` run on each rank; start-up is
`overlap.launch`, the command line `overlap.__main__`. Never used by the library itself.

The emulated link is "scaled to the problem": its bandwidth is chosen so that one dispatch of a
microbatch takes `LINK_SHARE` of the time the shared experts need for that microbatch — the
regime the split ops are built for (communication comparable to, and hideable behind, compute),
on whatever speed this machine's cores have. All ranks agree on the figure (one all-reduce).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import ops
from .moe import MoELayer
from .pipeline import scheduler

LINK_SHARE = 0.6
LATENCY_S = 20e-6


@dataclass(frozen=True)
class Shape:
    tokens: int = 256  # per rank
    hidden: int = 1024
    experts: int = 8
    top_k: int = 2
    intermediate: int = 1024
    shared: int = 1

    def __str__(self) -> str:
        return f"T{self.tokens} H{self.hidden} E{self.experts} K{self.top_k} I{self.intermediate} S{self.shared}"


def _progress(message: str) -> None:
    if dist.get_rank() == 0:
        print(f"[overlap] {message}", file=sys.stderr, flush=True)


def _calibrate_link(layer: MoELayer, x: torch.Tensor, microbatches: int) -> ops.EmulatedLink:
    """A link on which one microbatch's dispatch takes LINK_SHARE of its shared-expert compute."""
    mb = x[: max(x.shape[0] // microbatches, 1)]
    layer.moe_shared(mb)
    t0 = time.perf_counter()
    for _ in range(3):
        layer.moe_shared(mb) if layer.shared else layer.moe_experts(mb, torch.zeros(mb.shape[0]),
                                                                    torch.tensor([mb.shape[0]]))
    t = torch.tensor([(time.perf_counter() - t0) / 3])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    nbytes = mb.shape[0] * layer.top_k * x.shape[1] * x.element_size()
    return ops.EmulatedLink(latency_s=LATENCY_S, bandwidth_bytes_per_s=nbytes / (LINK_SHARE * float(t)))


def _timed_pair(first, second, reps: int) -> tuple[float, object, float, object]:
    """Median wall time (max over ranks) of two callables, alternated rep by rep so that a change
    in machine load hits both alike."""
    times: tuple[list[float], list[float]] = ([], [])
    outs: list[object] = [None, None]
    for _ in range(reps):
        for i, fn in enumerate((first, second)):
            dist.barrier()
            t0 = time.perf_counter()
            outs[i] = fn()
            times[i].append(time.perf_counter() - t0)
    t = torch.tensor([statistics.median(times[0]), statistics.median(times[1])])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t[0]), outs[0], float(t[1]), outs[1]


def measure(shape: Shape, microbatches: int, transport: str, reps: int = 3, quant_mode: int = 0) -> dict:
    """Serial vs overlapped forward of the reference layer on this rank's group; per-case figures."""
    rank = dist.get_rank()
    layer = MoELayer(shape.hidden, shape.experts, shape.top_k, shape.intermediate,
                     num_shared_experts=shape.shared, quant_mode=quant_mode, seed=1)
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(shape.tokens, shape.hidden, generator=g).to(torch.bfloat16)
    ops.configure(link=None)
    layer(x)  # warm-up
    link = _calibrate_link(layer, x, microbatches) if transport == "emulated" else None
    ops.configure(link=link)
    try:
        def overlapped():
            with scheduler(microbatches=microbatches) as s:
                return layer(x), s

        serial_s, serial_out, overlapped_s, (out, sched) = _timed_pair(lambda: layer(x), overlapped, reps)
    finally:
        ops.configure(link=None)
    report = sched.report()
    predicted = _predict(sched)
    figures = torch.tensor([report.compute_busy, report.comm_busy, report.overlap])
    dist.all_reduce(figures, op=dist.ReduceOp.MAX)
    compute, comm, hidden = (float(v) for v in figures)
    same = torch.tensor([float(torch.equal(out, serial_out))])
    dist.all_reduce(same, op=dist.ReduceOp.MIN)
    return {
        "shape": str(shape), "microbatches": microbatches, "transport": transport,
        "serial_s": serial_s, "overlapped_s": overlapped_s, "lower_bound_s": max(compute, comm),
        "compute_s": compute, "comm_s": comm, "hidden_fraction": hidden / comm if comm else 0.0,
        "speedup": serial_s / overlapped_s, "measured_makespan_s": report.makespan,
        "simulated_makespan_s": predicted, "outputs_equal": bool(same.item()),
        "link_bandwidth_GBps": None if link is None else link.bandwidth_bytes_per_s / 1e9,
        "_sched": sched,
    }


def _predict(sched) -> float:
    """Makespan the simulator predicts for the last plan, from its measured node and link times.

    A teardown's cost is only what it did after its transfer landed (the wait is the simulator's
    to model)."""
    costs, transfers, landed = {}, {}, {}
    for iv in sched.timeline.intervals:
        if iv.kind == "comm":  # link interval "dispatch@mb0.l0" belongs to node "dispatch_setup@mb0.l0"
            op, _, where = iv.name.partition("@")
            transfers[f"{op}_setup@{where}"] = iv.end - iv.start
            landed[f"{op}_teardown@{where}"] = iv.end
    for iv in sched.timeline.intervals:
        if iv.kind != "comm":
            costs[iv.name] = iv.end - max(iv.start, landed.get(iv.name, iv.start))
    nodes = {str(n) for n in sched.plan.nodes}
    return sched.plan.simulate({k: v for k, v in costs.items() if k in nodes},
                               transfers={k: v for k, v in transfers.items() if k in nodes}).makespan


def demo_rank(microbatches: int, transport: str, out_dir: str, shape: Shape) -> dict:
    _progress(f"{dist.get_world_size()} ranks up; {shape}; transport {transport}; warming up")
    result = measure(shape, microbatches, transport)
    sched = result.pop("_sched")
    if dist.get_rank() == 0:
        os.makedirs(out_dir, exist_ok=True)
        _progress("writing trace and pictures")
        sched.timeline.save_chrome_trace(os.path.join(out_dir, "trace.json"))
        files = ["trace.json"]
        try:
            sched.timeline.save_png(os.path.join(out_dir, "timeline.png"),
                                    title=f"rank 0, {microbatches} microbatches, {transport}")
            sched.plan.save_png(os.path.join(out_dir, "plan.png"))
            files += ["timeline.png", "plan.png"]
        except ImportError as exc:
            print(f"[overlap] pictures skipped: {exc}", file=sys.stderr)
        with open(os.path.join(out_dir, "plan.txt"), "w") as f:
            f.write(sched.plan.to_grid() + "\n")
        result["report"] = str(sched.report())
        result["files"] = [os.path.join(out_dir, f) for f in files + ["plan.txt"]]
        result["grid"] = sched.timeline.to_text()
    return result


BENCH_SHAPES = (
    Shape(tokens=256, hidden=1024, experts=8, top_k=2, intermediate=1024, shared=1),
    Shape(tokens=256, hidden=2048, experts=8, top_k=2, intermediate=1024, shared=1),
    Shape(tokens=512, hidden=1024, experts=4, top_k=1, intermediate=2048, shared=1),
)


def bench_rank(transport: str, microbatch_counts: tuple[int, ...], shapes: tuple[Shape, ...],
               reps: int = 3) -> list[dict]:
    rows = []
    for shape in shapes:
        for m in microbatch_counts:
            _progress(f"bench {shape} m={m}")
            row = measure(shape, m, transport, reps=reps)
            row.pop("_sched")
            rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    head = f"{'shape':<34} {'m':>2} {'serial ms':>10} {'overlap ms':>10} {'bound ms':>9} {'hidden':>7} {'speedup':>8} {'vs bound':>8} {'sim/meas':>8} equal"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['shape']:<34} {r['microbatches']:>2} {r['serial_s'] * 1e3:>10.1f} "
                     f"{r['overlapped_s'] * 1e3:>10.1f} {r['lower_bound_s'] * 1e3:>9.1f} "
                     f"{r['hidden_fraction'] * 100:>6.1f}% {r['speedup']:>7.2f}x "
                     f"{r['overlapped_s'] / r['lower_bound_s']:>7.2f}x "
                     f"{r['simulated_makespan_s'] / r['measured_makespan_s']:>8.2f} {r['outputs_equal']}")
    return "\n".join(lines)


def dump_json(rows: list[dict], path: str) -> None:
    with open(path, "w") as f:
        json.dump(rows, f, indent=2)


__all__ = ["Shape", "BENCH_SHAPES", "bench_rank", "demo_rank", "dump_json", "format_table", "measure"]
