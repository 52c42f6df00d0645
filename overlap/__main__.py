"""`python -m overlap demo|bench`: the main job and the benchmark (see `overlap.demo`)."""

from __future__ import annotations

import argparse
import sys
import time


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m overlap", description=__doc__)
    sub = p.add_subparsers(dest="command")
    d = sub.add_parser("demo", help="run the reference MoE layer serial and overlapped, check, report, draw")
    d.add_argument("--ranks", type=int, default=2, help="local gloo ranks (default 2; ignored under torchrun)")
    d.add_argument("--microbatches", type=int, default=2)
    d.add_argument("--transport", choices=("gloo", "emulated"), default="emulated",
                   help="emulated (default): gloo moves the data, completion follows a modelled link")
    d.add_argument("--tokens", type=int, default=256, help="tokens per rank")
    d.add_argument("--out", default=None, help="output folder (default: a new overlap-demo-<time> folder)")
    b = sub.add_parser("bench", help="serial vs overlapped across microbatch counts and shapes")
    b.add_argument("--ranks", type=int, default=2)
    b.add_argument("--transport", choices=("gloo", "emulated"), default="emulated")
    b.add_argument("--microbatches", type=int, nargs="+", default=[1, 2, 4])
    b.add_argument("--reps", type=int, default=3, help="timed repetitions per case (median reported)")
    b.add_argument("--json", default=None, help="write the rows as JSON to this file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from . import demo
    from .launch import run_ranks, under_torchrun

    def is_printer() -> bool:  # under torchrun every process runs main(); rank 0 reports
        import torch.distributed as dist

        return not under_torchrun() or dist.get_rank() == 0

    if args.command in (None, "demo"):
        if args.command is None:
            args = _parser().parse_args(["demo"])
        out = args.out or time.strftime("overlap-demo-%Y%m%d-%H%M%S")
        if args.microbatches < 1:
            raise SystemExit(f"--microbatches must be >= 1, got {args.microbatches}")
        result = run_ranks(args.ranks, demo.demo_rank, args.microbatches, args.transport, out,
                           demo.Shape(tokens=args.tokens))
        if not is_printer():
            return 0 if result["outputs_equal"] else 1
        print(result["grid"])
        print()
        print(result["report"])
        print()
        print(demo.format_table([result]))
        print(f"\noutputs of the serial and overlapped layer {'agree (bit-exact)' if result['outputs_equal'] else 'DIFFER'}")
        print("wrote: " + ", ".join(result["files"]))
        return 0 if result["outputs_equal"] else 1
    if args.command == "bench":
        rows = run_ranks(args.ranks, demo.bench_rank, args.transport, tuple(args.microbatches), demo.BENCH_SHAPES,
                         args.reps)
        if not is_printer():
            return 0
        print(demo.format_table(rows))
        if args.json:
            demo.dump_json(rows, args.json)
            print(f"wrote {args.json}")
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
