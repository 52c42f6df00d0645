"""`python -m overlap demo|bench`: the command line of the main job and the benchmark.

Owns the flags, their help, and the checks of their values before any rank starts (one
argparse-style line naming the flag, its range and the value; exit status 2). What runs on the
ranks is `overlap.demo`; start-up is `overlap.launch`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

PROG = "python -m overlap"


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad value is one line (no usage block): `prog: error: message (see --help)`."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _shape_flags(p: argparse.ArgumentParser, defaults: dict[str, int]) -> None:
    g = p.add_argument_group("layer shape (per rank)")
    g.add_argument(
        "--tokens",
        type=int,
        default=defaults["tokens"],
        help=f"tokens per rank, in [1, 8192] (default {defaults['tokens']})",
    )
    g.add_argument(
        "--hidden",
        type=int,
        default=defaults["hidden"],
        help=f"hidden size H, in [1024, 8192] (default {defaults['hidden']})",
    )
    g.add_argument(
        "--experts",
        type=int,
        default=defaults["experts"],
        help=f"routed experts E, in (0, 512], divisible by the ranks (default {defaults['experts']})",
    )
    g.add_argument(
        "--top-k",
        type=int,
        default=defaults["top_k"],
        help=f"experts per token K, in (0, min(16, E)] (default {defaults['top_k']})",
    )
    g.add_argument(
        "--intermediate",
        type=int,
        default=defaults["intermediate"],
        help=f"intermediate size of each expert's gated MLP (default {defaults['intermediate']})",
    )
    g.add_argument(
        "--shared",
        type=int,
        default=defaults["shared"],
        help=f"shared experts, computed on every rank, in [0, 4] (default {defaults['shared']})",
    )
    g.add_argument(
        "--quant",
        type=int,
        choices=(0, 2),
        default=0,
        help="dispatch quantisation: 0 none (bf16 rows), 2 dynamic int8 per row (default 0)",
    )


def _run_flags(p: argparse.ArgumentParser, *, microbatches: list[int] | int, reps: int) -> None:
    g = p.add_argument_group("ranks and link")
    g.add_argument(
        "--ranks",
        type=int,
        default=2,
        help="local ranks to start, in [2, 384] (default 2; under torchrun the job's world size)",
    )
    g.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where each rank computes: cpu (gloo group; default) or cuda (rank r on cuda:(r %% G), "
        "LOCAL_RANK %% G under torchrun; NCCL group)",
    )
    g.add_argument(
        "--transport",
        choices=("emulated", "window", "gloo", "nccl"),
        default="emulated",
        help="emulated (default): the default carrier moves the data, completion follows a modelled link; "
        "window, gloo or nccl: that carrier, as fast as it moves the data (OVERLAP_TRANSPORT)",
    )
    link = g.add_mutually_exclusive_group()
    link.add_argument(
        "--comm-ratio",
        type=float,
        default=None,
        metavar="R",
        help="scale the emulated link so that one serial layer's comm takes R x its compute (default 1)",
    )
    link.add_argument(
        "--link-gbps",
        type=float,
        default=None,
        metavar="GBPS",
        help="emulated link bandwidth in GB/s (10^9 bytes per second), instead of --comm-ratio",
    )
    g.add_argument(
        "--latency-us", type=float, default=20.0, help="emulated link latency per exchange, microseconds (default 20)"
    )
    if isinstance(microbatches, list):
        g.add_argument(
            "--microbatches",
            type=int,
            nargs="+",
            default=microbatches,
            metavar="M",
            help=f"microbatch counts to try, each in [1, 64] (default {' '.join(map(str, microbatches))})",
        )
    else:
        g.add_argument(
            "--microbatches",
            type=int,
            default=microbatches,
            metavar="M",
            help=f"microbatches of the overlapped run, in [1, 64] (default {microbatches}; "
            "the scheduler keeps at least 32 tokens in each)",
        )
    g.add_argument(
        "--reps",
        type=int,
        default=reps,
        help=f"timed repetitions of each run; the median and min-max are reported (default {reps})",
    )


def parser() -> argparse.ArgumentParser:
    """The command line (`python -m overlap --help`)."""
    from .demo import Shape

    defaults = Shape().__dict__
    p = _Parser(
        prog=PROG,
        description="Hide MoE expert-parallel communication behind compute: "
        "the reference layer serial vs overlapped on local ranks.",
    )
    sub = p.add_subparsers(dest="command", metavar="{demo,bench}")
    d = sub.add_parser(
        "demo",
        help="run one case, check it against the dense fp32 reference, report, draw (default)",
        description="Run the reference MoE layer serial and overlapped, check both against the "
        "dense fp32 reference, print the table, write a trace and two pictures.",
    )
    _shape_flags(d, defaults)
    _run_flags(d, microbatches=2, reps=5)
    d.add_argument("--out", default=None, help="output folder (default: a new overlap-demo-<time> folder)")
    b = sub.add_parser(
        "bench",
        help="serial vs overlapped for your shape, link and microbatch counts",
        description="Time the reference layer serial and overlapped for each microbatch count "
        "(and, without shape flags, three built-in shapes).",
    )
    _shape_flags(b, defaults)
    _run_flags(b, microbatches=[1, 2, 4], reps=5)
    b.add_argument("--json", default=None, metavar="FILE", help="also write the rows as JSON to FILE")
    return p


def _shape_given(argv: list[str]) -> bool:
    names = ("--tokens", "--hidden", "--experts", "--top-k", "--intermediate", "--shared", "--quant")
    return any(a.split("=")[0] in names for a in argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["demo", *argv]
    p = parser()
    args = p.parse_args(argv)
    from . import demo
    from .launch import RankError, run_ranks, under_torchrun

    shape = demo.Shape(args.tokens, args.hidden, args.experts, args.top_k, args.intermediate, args.shared, args.quant)
    ratio = args.comm_ratio if args.comm_ratio is not None or args.link_gbps is not None else demo.DEFAULT_COMM_RATIO
    link = demo.Link(args.transport, ratio, args.link_gbps, args.latency_us)
    ranks = int(os.environ["WORLD_SIZE"]) if under_torchrun() else args.ranks
    counts = args.microbatches if isinstance(args.microbatches, list) else [args.microbatches]
    shapes = (shape,) if args.command == "demo" or _shape_given(argv) else demo.DEFAULT_BENCH_SHAPES
    try:
        for s in shapes:
            demo.check_args(s, ranks, counts, link, args.reps, args.device)
    except ValueError as exc:
        print(f"{PROG} {args.command}: error: {exc} (see --help)", file=sys.stderr)
        return 2

    def is_printer() -> bool:  # under torchrun every process runs main(); rank 0 reports
        import torch.distributed as dist

        return not under_torchrun() or dist.get_rank() == 0

    try:
        if args.command == "demo":
            out = args.out or time.strftime("overlap-demo-%Y%m%d-%H%M%S")
            row = run_ranks(ranks, demo.demo_rank, shape, args.microbatches, link, args.reps, args.device, out)
            return _print_demo(row) if is_printer() else (0 if row["within_tolerance"] else 1)
        rows = run_ranks(ranks, demo.bench_rank, shapes, tuple(counts), link, args.reps, args.device)
    except RankError as exc:
        if exc.type_name != "ValueError":  # a bug or a broken group: the whole traceback
            raise
        print(f"{PROG} {args.command}: error: {exc.message}", file=sys.stderr)  # a value found only at run time
        return 2
    if not is_printer():
        return 0
    print(demo.format_table(rows))
    for r in rows:  # issue 20: which carrier ran, and how fast it moves one dispatch against copy_
        print(
            f"transport {r['transport']}: {r['shape']}: exchange {r['exchange_GBps']:.2f} GB/s, "
            f"copy_ {r['copy_GBps']:.2f} GB/s of the same bytes"
        )
    if args.json:
        demo.dump_json(rows, args.json)
        print(f"wrote {args.json}")
    return 0 if all(r["within_tolerance"] for r in rows) else 1


def _print_demo(row: dict) -> int:
    """The demo's results, after every progress line: the timeline, the table, the check, the files."""
    from . import demo

    print(f"overlapped run, rank {row['pictured_rank']}, median repetition (# compute, > setup, < teardown, = link):")
    print(row["timeline_text"])
    print()
    print(demo.format_table([row]))
    print()
    print(
        f"transport: {row['transport']} (device {row['device']}; window: shared-memory windows of the ranks of "
        "one machine, gloo: cpu tensors over gloo, gloo-staged: device tensors through pinned host buffers over "
        f"gloo, nccl: device tensors over NCCL); exchange {row['exchange_GBps']:.2f} GB/s, copy_ "
        f"{row['copy_GBps']:.2f} GB/s of the same bytes"
    )
    ok = row["within_tolerance"]
    print(
        f"serial and overlapped outputs {'within' if ok else 'OUTSIDE'} the tolerance of the dense fp32 "
        f"reference: worst {max(row['worst_ulps_serial'], row['worst_ulps_overlapped']):.2f} bf16 ulp "
        f"(serial {row['worst_ulps_serial']:.2f}, overlapped {row['worst_ulps_overlapped']:.2f}; "
        f"tolerance {row['tolerance_ulps']:g})"
    )
    print("wrote: " + ", ".join(row["files"]))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
