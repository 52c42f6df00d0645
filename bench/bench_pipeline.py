"""Serial vs pipelined forward of the reference MoE layer, with the link scaled to a comm ratio.

Run: ``python bench/bench_pipeline.py [--ratios 0.25 0.5 1 2] [--microbatches 1 2 4] [--reps 5]
[--threads N] [--tokens 256]``. Two local gloo ranks (``overlap.launch.run_ranks``) each build
``overlap.moe.MoELayer`` and time, alternated rep by rep (median, max over ranks):

* ``serial``: ``layer(x)`` (the four ops back to back, on the emulated link);
* ``overlapped``: ``layer(x)`` inside ``with overlap.scheduler(microbatches=m)``.

The emulated link is scaled so that one layer's communication (its dispatch and its combine, as the
link models them) takes ``R ×`` the layer's serial compute, measured first on the bare transport.
``ideal`` is ``(1 + R) / max(1, R)``: what perfect overlap would give. ``compute x`` is the
overlapped run's compute busy time over the serial compute: above 1, splitting made compute dearer.
``--threads`` sets ``torch.set_num_threads`` on each rank (default: what ``overlap.launch`` set).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.distributed as dist

import overlap
from overlap import ops
from overlap.launch import run_ranks
from overlap.moe import MoELayer


def _timed(fns: list, reps: int) -> list[float]:
    """Median wall time (max over ranks) of each callable, alternated rep by rep."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for i, fn in enumerate(fns):
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - t0)
    t = torch.tensor([statistics.median(ts) for ts in times])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [float(v) for v in t]


def rank_main(tokens: int, ratios: list[float], microbatches: list[int], reps: int, threads: int) -> list[dict]:
    if threads > 0:
        torch.set_num_threads(threads)
    rank = dist.get_rank()
    layer = MoELayer(1024, 8, 2, 1024, num_shared_experts=1, seed=1)
    x = torch.randn(tokens, 1024, generator=torch.Generator().manual_seed(100 + rank)).to(torch.bfloat16)
    ops.configure(link=None)
    for _ in range(2):
        layer(x)  # warm-up
    (compute_s,) = _timed([lambda: layer(x)], reps)  # the bare transport moves bytes in ~no time
    nbytes = 2 * tokens * layer.top_k * x.shape[1] * x.element_size()  # dispatch + combine, upper bound
    rows = []
    for ratio in ratios:
        latency = 20e-6
        link = ops.EmulatedLink(
            latency_s=latency, bandwidth_bytes_per_s=nbytes / max(ratio * compute_s - 2 * latency, 1e-6)
        )
        ops.configure(link=link)
        try:
            fns = [lambda: layer(x)]
            scheds: dict[int, object] = {}

            def make(m: int, scheds: dict = scheds):
                def run() -> None:
                    with overlap.scheduler(microbatches=m, min_tokens=0) as s:
                        layer(x)
                    scheds[m] = s

                return run

            fns += [make(m) for m in microbatches]
            serial_s, *over = _timed(fns, reps)
        finally:
            ops.configure(link=None)
        for m, over_s in zip(microbatches, over):
            rep = scheds[m].report()
            f = torch.tensor([rep.compute_busy, rep.comm_busy, rep.overlap])
            dist.all_reduce(f, op=dist.ReduceOp.MAX)
            busy, comm, hidden = (float(v) for v in f)
            rows.append(
                {
                    "comm_ratio": ratio,
                    "microbatches": m,
                    "serial_s": serial_s,
                    "overlapped_s": over_s,
                    "compute_s": compute_s,
                    "comm_s": comm,
                    "overlapped_compute_s": busy,
                    "hidden_fraction": hidden / comm if comm else 0.0,
                    "speedup": serial_s / over_s,
                    "ideal_speedup": (1 + ratio) / max(1.0, ratio),
                    "threads": torch.get_num_threads(),
                }
            )
        if rank == 0:
            print(f"[bench_pipeline] R={ratio} done", file=sys.stderr, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5, 1.0, 2.0])
    parser.add_argument("--microbatches", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=0, help="torch threads per rank (0: launch's default)")
    args = parser.parse_args()
    rows = run_ranks(2, rank_main, args.tokens, args.ratios, args.microbatches, args.reps, args.threads)
    head = (
        f"{'R':>5} {'m':>2} {'serial ms':>10} {'overlap ms':>10} {'compute ms':>10} {'comm ms':>8} "
        f"{'compute x':>9} {'hidden':>7} {'speedup':>8} {'ideal':>6} {'thr':>4}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['comm_ratio']:>5.2f} {r['microbatches']:>2} {r['serial_s'] * 1e3:>10.1f} "
            f"{r['overlapped_s'] * 1e3:>10.1f} {r['compute_s'] * 1e3:>10.1f} {r['comm_s'] * 1e3:>8.1f} "
            f"{r['overlapped_compute_s'] / r['compute_s']:>8.2f}x {r['hidden_fraction'] * 100:>6.1f}% "
            f"{r['speedup']:>7.2f}x {r['ideal_speedup']:>5.2f}x {r['threads']:>4}"
        )


if __name__ == "__main__":
    main()
