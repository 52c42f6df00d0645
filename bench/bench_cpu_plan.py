"""Side by side, in one run: what the CPU plan's two changes are worth (issue 22, items 1 and 3).

    python bench/bench_cpu_plan.py [--reps 9] [--microbatches 1 2 4] [--threads 1] [--transport emulated]

1. **Where the comm stages run** (`overlap.pipeline.planned.CPU_ON_CALLER`): every repetition
   times, back to back on 2 ranks, the serial forward, the planned forward with every stage on the
   caller's thread ("caller") and with the setups/teardowns on the pooled comm workers ("workers").
2. **The ranks' OpenMP environment** (`overlap.launch.rank_env`): three rank pools, alternated
   round by round: the environment as it is ("as is": libgomp spins after each region, and every
   thread but the rank's main one gets a team of all cores), a passive wait only ("passive"), and
   what the library sets ("passive+n": passive and OMP_NUM_THREADS = the rank's threads).

Each figure is a ratio: the median of the per-repetition ratios (each repetition timed on its
slowest rank) and its [min-max]. Prints `uptime`'s load first: on a loaded machine treat the
figures as indicative. Asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist

from overlap import demo, ops
from overlap.launch import PASSIVE_ENV, RankPool, rank_env
from overlap.pipeline import planned, scheduler, serial_forward

SHAPE = demo.Shape()


def _times(microbatches: tuple[int, ...], reps: int, transport: str, gbps: float | None) -> dict:
    """On each rank: per m, per variant, the per-rep wall times (max over ranks), and the link's
    bandwidth (`gbps` as given, or calibrated here to comm = compute)."""
    group = dist.group.WORLD
    layer = demo.MoELayer(
        SHAPE.hidden, SHAPE.experts, SHAPE.top_k, SHAPE.intermediate, num_shared_experts=SHAPE.shared, seed=1
    )
    x = torch.randn(SHAPE.tokens, SHAPE.hidden, generator=torch.Generator().manual_seed(dist.get_rank()))
    x = x.to(torch.bfloat16)

    def serial():
        with scheduler(group=group) as s:
            serial_forward(layer, x)
        return None, s

    def overlapped(m: int, on_caller: bool):
        def run():
            planned.CPU_ON_CALLER = on_caller
            try:
                with scheduler(group=group, microbatches=m):
                    layer(x)
            finally:
                planned.CPU_ON_CALLER = True

        return run

    _, s = serial()
    compute = demo._max([s.report().compute_busy], group)[0]
    wanted = demo.Link(transport=transport, gbps=gbps)
    link = demo._calibrate(layer, x, wanted, group, torch.device("cpu"), serial, compute)
    ops.configure(link=link)
    out: dict = {}
    try:
        for m in microbatches:
            variants = {"serial": serial, "caller": overlapped(m, True), "workers": overlapped(m, False)}
            for fn in variants.values():  # warm-up
                fn()
            times: dict[str, list[float]] = {k: [] for k in variants}
            for r in range(reps):
                names = list(variants)[r % 3 :] + list(variants)[: r % 3]  # rotate the order
                for name in names:
                    dist.barrier()
                    t0 = time.perf_counter()
                    variants[name]()
                    times[name].append(time.perf_counter() - t0)
            out[m] = {k: demo._max(v, group) for k, v in times.items()}
    finally:
        ops.configure(link=None)
    out["gbps"] = None if link is None else link.bandwidth_bytes_per_s / 1e9
    return out


def _ratio(num: list[float], den: list[float]) -> str:
    ratios = [a / b for a, b in zip(num, den)]
    return f"{statistics.median(ratios):.2f}x [{min(ratios):.2f}-{max(ratios):.2f}]"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--microbatches", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads per rank (default 1)")
    p.add_argument("--transport", choices=demo.TRANSPORTS, default="emulated")
    p.add_argument("--rounds", type=int, default=3, help="rounds over the three OpenMP pools (default 3)")
    args = p.parse_args()
    print(f"load: {os.popen('uptime').read().strip()}", flush=True)
    for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS"):
        if k in os.environ:
            print(f"note: {k}={os.environ[k]} in this environment: every pool inherits it")
    pools = {
        "as is": RankPool(2, threads=args.threads, env={}),
        "passive": RankPool(2, threads=args.threads, env=dict(PASSIVE_ENV)),
        "passive+n": RankPool(2, threads=args.threads, env=rank_env(args.threads, {})),
    }
    results: dict[str, list[dict]] = {k: [] for k in pools}
    names = list(pools)
    gbps = None  # calibrated once (comm = compute), then the same link for every pool
    try:
        for r in range(args.rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:  # rotate the pools' order
                row = pools[name].run(_times, tuple(args.microbatches), args.reps, args.transport, gbps)[0]
                gbps = row.pop("gbps")
                results[name].append(row)
    finally:
        for pool in pools.values():
            pool.close()
    print(f"2 ranks, {args.threads} thread(s) each, {SHAPE}, {args.transport}, {args.reps} reps x {args.rounds} rounds")
    print(f"{'omp env':>9} {'m':>2} {'serial/caller':>22} {'serial/workers':>22} {'workers/caller':>22}  serial ms")
    merged: dict[str, dict[int, dict[str, list[float]]]] = {}
    for name, rounds in results.items():
        merged[name] = {
            m: {k: sum((r[m][k] for r in rounds), []) for k in ("serial", "caller", "workers")}
            for m in args.microbatches
        }
        for m, t in merged[name].items():
            print(
                f"{name:>9} {m:>2} {_ratio(t['serial'], t['caller']):>22} {_ratio(t['serial'], t['workers']):>22} "
                f"{_ratio(t['workers'], t['caller']):>22}  {statistics.median(t['serial']) * 1e3:.1f}"
            )
    print("OpenMP environment, same run (as-is time / this pool's time, medians of each variant):")
    for name in ("passive", "passive+n"):
        for m in args.microbatches:
            cells = []
            for k in ("serial", "caller", "workers"):
                a, b = merged["as is"][m][k], merged[name][m][k]
                cells.append(f"{k} {statistics.median(a) / statistics.median(b):.2f}x")
            print(f"  {name:>9} m={m}: " + ", ".join(cells))
    print(f"load after: {os.popen('uptime').read().strip()}")


if __name__ == "__main__":
    main()
