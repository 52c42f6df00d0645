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
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .demo import Link, Shape

PROG = "python -m overlap"


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad value is one line (no usage block): `prog: error: message (see --help)`."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _range(flag: str) -> str:
    from .demo import range_text

    return range_text(flag)


def _shape_flags(p: argparse.ArgumentParser, defaults: dict[str, int]) -> None:
    from .demo import MAX_TOP_K

    g = p.add_argument_group("layer shape (per rank)")
    g.add_argument(
        "--tokens",
        type=int,
        default=defaults["tokens"],
        help=f"tokens per rank, in {_range('--tokens')} (default {defaults['tokens']})",
    )
    g.add_argument(
        "--hidden",
        type=int,
        default=defaults["hidden"],
        help=f"hidden size H, in {_range('--hidden')} (default {defaults['hidden']})",
    )
    g.add_argument(
        "--experts",
        type=int,
        default=defaults["experts"],
        help=f"routed experts E, in {_range('--experts')}, divisible by the ranks (default {defaults['experts']})",
    )
    low = _range("--top-k").split(",")[0]
    g.add_argument(
        "--top-k",
        type=int,
        default=defaults["top_k"],
        help=f"experts per token K, in {low}, min({MAX_TOP_K}, E)] (default {defaults['top_k']})",
    )
    g.add_argument(
        "--intermediate",
        type=int,
        default=defaults["intermediate"],
        help=f"intermediate size of each expert's gated MLP, in {_range('--intermediate')} "
        f"(default {defaults['intermediate']})",
    )
    g.add_argument(
        "--shared",
        type=int,
        default=defaults["shared"],
        help=f"shared experts, computed on every rank, in {_range('--shared')} (default {defaults['shared']})",
    )
    g.add_argument(
        "--quant",
        type=int,
        choices=(0, 2),
        default=0,
        help="dispatch quantisation: 0 none (bf16 rows), 2 dynamic int8 per row (default 0)",
    )


def _run_flags(p: argparse.ArgumentParser, *, microbatches: list[int] | int, reps: int) -> None:
    from .demo import DEFAULT_COMM_RATIO, DEFAULT_LATENCY_US

    g = p.add_argument_group("ranks and link")
    g.add_argument(
        "--ranks",
        type=int,
        default=None,
        help=f"local ranks to start, in {_range('--ranks')} (default 2; under torchrun the job's world size, "
        "which --ranks must then equal)",
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
        "window, gloo or nccl: that carrier, as fast as it moves the data (OVERLAP_TRANSPORT; no link model: "
        "the three link flags below need emulated)",
    )
    link = g.add_mutually_exclusive_group()
    link.add_argument(
        "--comm-ratio",
        type=float,
        default=None,
        metavar="R",
        help="scale the emulated link so that one serial layer's comm takes R x its compute, R in "
        f"{_range('--comm-ratio')} (default {DEFAULT_COMM_RATIO:g})",
    )
    link.add_argument(
        "--link-gbps",
        type=float,
        default=None,
        metavar="GBPS",
        help=f"emulated link bandwidth in GB/s (10^9 bytes per second), in {_range('--link-gbps')}, "
        "instead of --comm-ratio",
    )
    g.add_argument(
        "--latency-us",
        type=float,
        default=None,
        help=f"emulated link latency per exchange, microseconds, in {_range('--latency-us')} "
        f"(default {DEFAULT_LATENCY_US:g})",
    )
    if isinstance(microbatches, list):
        g.add_argument(
            "--microbatches",
            type=int,
            nargs="+",
            default=microbatches,
            metavar="M",
            help=f"microbatch counts to try, each in {_range('--microbatches')} "
            f"(default {' '.join(map(str, microbatches))})",
        )
    else:
        g.add_argument(
            "--microbatches",
            type=int,
            default=microbatches,
            metavar="M",
            help=f"microbatches of the overlapped run, in {_range('--microbatches')} (default {microbatches}; "
            "the scheduler keeps at least 32 tokens in each)",
        )
    g.add_argument(
        "--reps",
        type=int,
        default=reps,
        help=f"timed repetitions of each run, in {_range('--reps')}; the median and min-max are reported "
        f"(default {reps})",
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
    d.add_argument(
        "--out",
        default=None,
        metavar="FOLDER",
        help="output folder, created with its parents if missing; must not be a file, and its nearest "
        "existing folder must be writable (default: a new overlap-demo-<time> folder here)",
    )
    b = sub.add_parser(
        "bench",
        help="serial vs overlapped for your shape, link and microbatch counts",
        description="Time the reference layer serial and overlapped for each microbatch count "
        "(and, without shape flags, three built-in shapes).",
    )
    _shape_flags(b, defaults)
    _run_flags(b, microbatches=[1, 2, 4], reps=5)
    b.add_argument(
        "--json",
        default=None,
        metavar="FILE",
        help="also write the rows as JSON to FILE (replaced if it exists); its folder must exist and be writable",
    )
    return p


def _shape_given(argv: list[str]) -> bool:
    names = ("--tokens", "--hidden", "--experts", "--top-k", "--intermediate", "--shared", "--quant")
    return any(a.split("=")[0] in names for a in argv)


def _writable_folder(flag: str, value: str, folder: str) -> None:
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} must be under a folder you can write to, got {value!r} ({folder!r} is not writable)")


def check_out(value: str) -> None:
    """The demo's output folder, before any rank starts: a folder, or a path that can be made one
    (its nearest existing ancestor is a writable folder).

    Raises:
        ValueError: names --out, the value and why (one line).
    """
    path = os.path.abspath(value)
    if os.path.lexists(path) and not os.path.isdir(path):
        raise ValueError(f"--out must be a folder or a path that does not exist yet, got {value!r} (a file)")
    above = path
    while not os.path.lexists(above):
        above = os.path.dirname(above)
    if not os.path.isdir(above):
        raise ValueError(f"--out must be a path under folders, got {value!r} ({above!r} is a file, not a folder)")
    _writable_folder("--out", value, above)


def check_json(value: str) -> None:
    """The bench's JSON file, before any rank starts: not a folder, in an existing writable folder.

    Raises:
        ValueError: names --json, the value and why (one line).
    """
    path = os.path.abspath(value)
    if os.path.isdir(path):
        raise ValueError(f"--json must be a file name, got {value!r} (a folder)")
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        what = "is a file" if os.path.lexists(folder) else "does not exist"
        raise ValueError(f"--json must be in an existing folder, got {value!r} ({folder!r} {what})")
    _writable_folder("--json", value, folder)
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise ValueError(f"--json must be a file you can write, got {value!r} (it exists, read-only)")


def checked(args: argparse.Namespace, argv: list[str]) -> tuple[tuple[Shape, ...], int, list[int], Link, str | None]:
    """What the parsed flags ask for, every value checked before any rank starts: (shapes, ranks,
    microbatch counts, link, output folder or JSON file).

    Raises:
        ValueError: one line naming the flag, its value and the allowed range or the reason.
    """
    from . import demo
    from .launch import under_torchrun

    shape = demo.Shape(args.tokens, args.hidden, args.experts, args.top_k, args.intermediate, args.shared, args.quant)
    link = demo.link_from_flags(args.transport, args.comm_ratio, args.link_gbps, args.latency_us)
    ranks = 2 if args.ranks is None else args.ranks
    if under_torchrun():
        world = int(os.environ["WORLD_SIZE"])
        if args.ranks is not None and args.ranks != world:
            raise ValueError(f"--ranks must equal torchrun's world size ({world}) or be left out, got {args.ranks}")
        ranks = world
    counts = args.microbatches if isinstance(args.microbatches, list) else [args.microbatches]
    if args.command == "demo" and not _shape_given([a for a in argv if not a.startswith("--quant")]):
        shape = demo.default_shape(args.device, args.quant)  # on cuda a shape that gives the GPU work
    shapes = (shape,) if args.command == "demo" or _shape_given(argv) else demo.DEFAULT_BENCH_SHAPES
    for s in shapes:
        demo.check_args(s, ranks, counts, link, args.reps, args.device)
    target = None
    if args.command == "demo":
        target = args.out or time.strftime("overlap-demo-%Y%m%d-%H%M%S")
        check_out(target)
    elif args.json:
        target = args.json
        check_json(target)
    return shapes, ranks, counts, link, target


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["demo", *argv]
    p = parser()
    args = p.parse_args(argv)
    from . import demo
    from .launch import RankError, run_ranks, under_torchrun

    try:
        shapes, ranks, counts, link, target = checked(args, argv)
    except ValueError as exc:
        print(f"{PROG} {args.command}: error: {exc} (see --help)", file=sys.stderr)
        return 2

    def is_printer() -> bool:  # under torchrun every process runs main(); rank 0 reports
        import torch.distributed as dist

        return not under_torchrun() or dist.get_rank() == 0

    try:
        if args.command == "demo":
            row = run_ranks(ranks, demo.demo_rank, shapes[0], args.microbatches, link, args.reps, args.device, target)
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
    for r in rows:  # which carrier ran, and how fast it moves one dispatch against copy_
        print(
            f"transport {r['transport']}: {r['shape']}: exchange {r['exchange_GBps']:.2f} GB/s, "
            f"copy_ {r['copy_GBps']:.2f} GB/s of the same bytes"
        )
    if target:
        demo.dump_json(rows, target)
        print(f"wrote {target}")
    return 0 if all(r["within_tolerance"] for r in rows) else 1


def _print_demo(row: dict) -> int:
    """The demo's results, after every progress line: the timeline, the table, the check, the files."""
    from . import demo

    print(
        f"overlapped run, rank {row['pictured_rank']}, median repetition, over the table's overlapped time "
        f"{row['overlapped_s'] * 1e3:.1f} ms (# compute, > setup, < teardown, = link):"
    )
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
