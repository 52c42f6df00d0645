"""One exchange between local ranks, carrier against carrier and against `copy_` of the same bytes.

Run: ``python bench/bench_exchange.py [--ranks 2] [--rows 4096] [--hidden 7168] [--reps 7]
[--transports window gloo] [--device cpu|cuda] [--host-checks]``. The default is issue 20's
case: 2 ranks, 512 tokens x top-8 = 4096 bf16 rows of H 7168 (14336 bytes) from each rank, split
evenly over the ranks; bytes per exchange are what one rank sends to its peers. Each carrier runs
in the same rank processes, one after the other, with `copy_` of the same bytes timed beside every
exchange (`overlap.ops.rates`). Prints one line per carrier and the ratios (window / gloo,
window / copy_); the load average is printed with them, as the figures move with it.

With ``--device cuda`` the rows live on the GPU (ranks share it: rank r on cuda:(r % G)); the
carriers are the CUDA IPC window (`window`, opt-in: OVERLAP_TRANSPORT=window) and `gloo-staged`
(``gloo``: the default for cuda on a gloo group); the kind is printed. ``--host-checks`` (cuda)
also prints, per rank and carrier, the host time of a dispatch_setup and a
combine_setup made behind a queued 200 ms kernel (issue 20's bound: <= 100 us) and whether an
exchange made under ``torch.cuda.set_sync_debug_mode("error")`` synchronised the host (the bound:
never). These are issue 20's GPU figures; `bench/device_check.sh` runs them.
"""

from __future__ import annotations

import argparse
import json
import os

from overlap.launch import RankPool


def rank_rates(kinds: list[str], rows: int, row_bytes: int, reps: int, device: str = "cpu") -> list[dict]:
    import torch.distributed as dist

    from overlap.launch import rank_device
    from overlap.ops import rates

    dev = rank_device(device, dist.get_rank())
    if dev.type == "cuda":
        import torch

        torch.cuda.set_device(dev)
    out = []
    for kind in kinds:
        if kind != "default":
            os.environ["OVERLAP_TRANSPORT"] = kind
        try:
            group = dist.new_group(list(range(dist.get_world_size())), backend="gloo")
            out.append(rates.exchange_rates(group, rows, row_bytes, reps=reps, device=dev))
        finally:
            os.environ.pop("OVERLAP_TRANSPORT", None)
    return out


def rank_host_checks(queued_s: float = 0.2, kind: str = "default") -> dict:
    """cuda: the host time of a dispatch_setup and a combine_setup made behind a queued kernel of
    `queued_s`, and whether an exchange under set_sync_debug_mode("error") synchronised the host;
    over the carrier `kind` (OVERLAP_TRANSPORT; "default": the group's own)."""
    if kind != "default":
        os.environ["OVERLAP_TRANSPORT"] = kind
    try:
        return _host_checks(queued_s)
    finally:
        os.environ.pop("OVERLAP_TRANSPORT", None)


def _host_checks(queued_s: float) -> dict:
    import time

    import torch
    import torch.distributed as dist

    from overlap import ops
    from overlap.launch import rank_device

    rank, world = dist.get_rank(), dist.get_world_size()
    dev = rank_device("cuda", rank)
    torch.cuda.set_device(dev)
    g = dist.new_group(list(range(world)), backend="gloo").group_name
    experts, bs, hidden, k = 2 * world, 64, 1024, 2
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(bs, hidden, generator=gen).to(dev, torch.bfloat16)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(bs)]).to(dev, torch.int32)
    w = torch.full((bs, k), 0.5, device=dev)
    khz = getattr(torch.cuda.get_device_properties(dev), "clock_rate", 0) or 1_500_000
    cycles = int(queued_s * khz * 1e3)
    out: dict = {"rank": rank}
    for _ in range(2):  # the first warms the lanes up
        torch.cuda.synchronize()
        dist.barrier()
        torch.cuda._sleep(cycles)
        t0 = time.perf_counter()
        y, expand_idx, cmd = ops.dispatch_setup(x, ids, g, world, rank, experts)
        out["dispatch_setup_us"] = (time.perf_counter() - t0) * 1e6
        expand_x, _, assist, _ = ops.dispatch_teardown(x, y, ids, cmd, g, world, rank, experts)
        torch.cuda.synchronize()
        dist.barrier()
        torch.cuda._sleep(cycles)
        t0 = time.perf_counter()
        qx, cmd2 = ops.combine_setup(expand_x, ids, assist, g, world, rank, experts)
        out["combine_setup_us"] = (time.perf_counter() - t0) * 1e6
        ops.combine_teardown(expand_x, qx, ids, expand_idx, w, cmd2, g, world, rank, experts)
    torch.cuda.synchronize()
    dist.barrier()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y, expand_idx, cmd = ops.dispatch_setup(x, ids, g, world, rank, experts)
        ops.dispatch_teardown(x, y, ids, cmd, g, world, rank, experts)
        out["host_sync"] = "none"
    except RuntimeError as exc:  # the sync debug mode raises at the first synchronising call
        out["host_sync"] = str(exc).splitlines()[0][:120]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    out["transport"] = ops.transport_kind(g)
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--rows", type=int, default=512 * 8, help="rows each rank sends (tokens x top-k)")
    parser.add_argument("--hidden", type=int, default=7168, help="bf16 elements per row")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument(
        "--transports", nargs="+", default=None, choices=("window", "gloo", "default"), help="default: the group's own"
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--host-checks", action="store_true", help="cuda: setup host time, host syncs")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args(argv)
    row_bytes = args.hidden * 2
    kinds = args.transports or ["window", "gloo"]  # cuda: the CUDA IPC window (opt-in) and gloo-staged
    with RankPool(args.ranks) as pool:
        results = pool.run(rank_rates, kinds, args.rows, row_bytes, args.reps, args.device, timeout_s=1800.0)[0]
        checks = []
        if args.host_checks and args.device == "cuda":
            for kind in kinds:
                checks += pool.run(rank_host_checks, 0.2, kind, timeout_s=600.0)
    load = os.getloadavg()
    print(
        f"exchange: {args.ranks} ranks, {args.rows} rows x {row_bytes} B from each rank; "
        f"median of {args.reps}; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    print("transport  MB/exchange  exchange ms  exchange GB/s  copy_ ms  copy_ GB/s  exchange/copy_")
    for r in results:
        print(
            f"{r['transport']:<9}  {r['exchange_bytes'] / 1e6:11.1f}  {r['exchange_s'] * 1e3:11.2f}  "
            f"{r['exchange_GBps']:13.2f}  {r['copy_s'] * 1e3:8.2f}  {r['copy_GBps']:10.2f}  "
            f"{r['exchange_GBps'] / r['copy_GBps']:14.2f}"
        )
    by = {r["transport"]: r for r in results}
    gloo = by.get("gloo") or by.get("gloo-staged")
    if "window" in by and gloo is not None:
        ratio = by["window"]["exchange_GBps"] / gloo["exchange_GBps"]
        print(f"window / {gloo['transport']}: {ratio:.1f}x (target >= 5x)")
    if "window" in by:
        w = by["window"]
        print(f"window / copy_: {100 * w['exchange_GBps'] / w['copy_GBps']:.0f} % (target >= 40 %)")
    for c in checks:
        print(
            f"rank {c['rank']} ({c['transport']}): setup behind a queued 200 ms kernel: dispatch "
            f"{c['dispatch_setup_us']:.0f} us, combine {c['combine_setup_us']:.0f} us (bound 100 us); "
            f"host syncs in an exchange: {c['host_sync']}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
