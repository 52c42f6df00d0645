"""One exchange between local ranks, carrier against carrier and against `copy_` of the same bytes.

Run: ``python bench/bench_exchange.py [--ranks 2] [--rows 4096] [--hidden 7168] [--reps 7]
[--transports window gloo]``. The default is issue 20's case: 2 ranks, 512 tokens x top-8 = 4096
bf16 rows of H 7168 (14336 bytes) from each rank, split evenly over the ranks; bytes per exchange
are what one rank sends to its peers. Each carrier runs in the same rank processes, one after the
other, with `copy_` of the same bytes timed beside every exchange (`overlap.ops.rates`). Prints
one line per carrier and the ratios (window / gloo, window / copy_); the load average is printed
with them, as the figures move with it.
"""

from __future__ import annotations

import argparse
import json
import os

from overlap.launch import RankPool


def rank_rates(kinds: list[str], rows: int, row_bytes: int, reps: int) -> list[dict]:
    import torch.distributed as dist

    from overlap.ops import rates

    out = []
    for kind in kinds:
        os.environ["OVERLAP_TRANSPORT"] = kind
        try:
            group = dist.new_group(list(range(dist.get_world_size())), backend="gloo")
            out.append(rates.exchange_rates(group, rows, row_bytes, reps=reps))
        finally:
            os.environ.pop("OVERLAP_TRANSPORT", None)
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--rows", type=int, default=512 * 8, help="rows each rank sends (tokens x top-k)")
    parser.add_argument("--hidden", type=int, default=7168, help="bf16 elements per row")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--transports", nargs="+", default=["window", "gloo"], choices=("window", "gloo"))
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args(argv)
    row_bytes = args.hidden * 2
    with RankPool(args.ranks) as pool:
        results = pool.run(rank_rates, args.transports, args.rows, row_bytes, args.reps, timeout_s=1800.0)[0]
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
    if "window" in by and "gloo" in by:
        print(f"window / gloo: {by['window']['exchange_GBps'] / by['gloo']['exchange_GBps']:.1f}x (target >= 5x)")
    if "window" in by:
        w = by["window"]
        print(f"window / copy_: {100 * w['exchange_GBps'] / w['copy_GBps']:.0f} % (target >= 40 %)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
