"""transformers MoE models, expert parallel on CPU ranks: transformers' "all_to_all" vs overlap.

Run:  torchrun --nproc-per-node 2 bench/bench_transformers.py [--families olmoe gpt_oss ...]
          [--tokens 64 256 640] [--repeats 5] [--bandwidth 2e7] [--decode-steps 4]

Models: one tiny model per family (hidden 1024, 1 layer, 8 experts, top-2, random bf16 weights,
seed 0; GPT-OSS is issue 15's 2-layer model), each rank its own batch (fsdp = ep = world), under
`torch.no_grad`, median of `--repeats` after one warm-up, the compared runs alternated within every
repetition so a change of machine load hits them alike; times are the slowest rank's.

1. gloo as is, per family and tokens per rank: "all_to_all" vs "overlap" (its default microbatch
   rule) vs "overlap" forced to 1 microbatch, each a plain `model(ids)` call (nothing recorded).
   On a CPU the transfers run on the same cores as the experts, so this measures overhead.
2. The emulated link (`overlap.ops.EmulatedLink`: a transfer completes after latency + bytes /
   bandwidth, sleeping, no core used), first family only:
   - prefill, `--tokens` max: one microbatch vs the pipelined EP calls (compute = the experts) vs
     two-batch overlap over the whole model (`--parts` sequences as fibers);
   - decode with a KV cache: `overlap.integrations.transformers.generate` with 1 part vs `--parts`
     parts (`--decode-steps` steps, `--parts` sequences of 16 prompt tokens).
   "hidden" = transfer time under compute / transfer time; "of hideable" divides by
   min(transfer time, compute time), the most any schedule could hide.

Rank 0 prints the tables.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

import overlap
import overlap.integrations.transformers as overlap_hf
import overlap.ops
from overlap.integrations import tiny_models

VOCAB = 512


FAMILIES = tuple(f for f in tiny_models.FAMILIES if f != "mixtral")


def build(path: str, family: str) -> None:
    """The bench's model of each family: 8 experts, top-2, hidden 1024, experts of 128."""
    tiny_models.save_random_model(tiny_models.family_config(family, moe_intermediate=128, vocab_size=VOCAB), path)


def load(path: str, implementation: str):
    return tiny_models.load_expert_parallel(path, implementation, layout="dp")


def timed_side_by_side(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, tuple[float, object]]:
    """Median seconds (slowest rank) of each run, alternated within every repetition, with each
    run's last return value (an overlap report, or None)."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    reports: dict[str, object] = {}
    with torch.no_grad():
        for fn in runs.values():
            fn()  # warm-up
        for _ in range(repeats):
            for name, fn in runs.items():
                dist.barrier()
                start = time.perf_counter()
                reports[name] = fn()
                elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
                times[name].append(float(elapsed))
    return {name: (statistics.median(t), reports[name]) for name, t in times.items()}


def plain(model, ids: torch.Tensor, num_microbatches: int | None):
    """`model(ids)` as a user calls it (no recording: the gloo table times what a user gets),
    with `num_microbatches` forced (None: the integration's rule)."""

    def run():
        with overlap_hf.microbatches(num_microbatches):
            model(ids)

    return run


def recorded(model, ids: torch.Tensor, num_microbatches: int | None):
    def run():
        with overlap_hf.record(model) as rec, overlap_hf.microbatches(num_microbatches):
            model(ids)
        return rec.report()

    return run


def two_batch(model, ids: torch.Tensor, parts: int):
    """Two-batch overlap over the whole model (`overlap.wrap(model)` in a scheduler context)."""
    wrapped = overlap.wrap(model)

    def run():
        with overlap_hf.record(model) as rec, overlap.scheduler(microbatches=parts, min_tokens=1) as s:
            wrapped(ids, use_cache=False)
        return _with_fibers(rec, s)

    return run


def _with_fibers(rec, s):
    """The recorder's whole-run makespan with the fibers' own timeline (recorded in `s`)."""
    inner = s.report()
    outer = rec.report()
    return overlap_hf.ForwardReport(
        makespan=outer.makespan,
        compute_busy=inner.compute_busy,
        comm_busy=inner.comm_busy,
        overlap=inner.overlap,
        hidden_fraction=inner.hidden_fraction,
        serial_time=outer.makespan + inner.overlap,
        speedup=(outer.makespan + inner.overlap) / outer.makespan,
        comm_source=inner.comm_source,
        compute_covers="whole model",
    )


def decoding(model, ids: torch.Tensor, parts: int, steps: int):
    def run():
        with overlap_hf.record(model) as rec:
            overlap_hf.generate(model, ids, max_new_tokens=steps, parts=parts, do_sample=False)
        return rec.report()

    return run


def hideable(rep) -> float:
    limit = min(rep.comm_busy, rep.compute_busy)
    return rep.overlap / limit if limit > 0 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--tokens", nargs="+", type=int, default=[64, 256, 640], help="tokens per rank")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bandwidth", type=float, default=2e7, help="emulated link, bytes/s")
    parser.add_argument("--latency", type=float, default=50e-6, help="emulated link, seconds")
    parser.add_argument("--parts", type=int, default=2, help="sequences (fibers) of the two-batch runs")
    parser.add_argument("--decode-steps", type=int, default=4)
    parser.add_argument("--skip-link", action="store_true", help="only the gloo table")
    args = parser.parse_args()
    if any(t < 1 for t in args.tokens) or args.repeats < 1 or args.parts < 1 or args.decode_steps < 1:
        parser.error("--tokens, --repeats, --parts and --decode-steps must be >= 1")

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    holder = [tempfile.mkdtemp(prefix="overlap-bench-") if rank == 0 else None]
    dist.broadcast_object_list(holder, src=0)
    root = holder[0]
    gloo_rows: list[tuple[str, int, float, float, float]] = []
    link_rows: list[tuple[str, float, object]] = []
    try:
        for family in args.families:
            path = f"{root}/{family}"
            if rank == 0:
                build(path, family)
            dist.barrier()
            a2a, ours = load(path, "all_to_all"), load(path, "overlap")
            for tokens in args.tokens:
                torch.manual_seed(1 + rank)
                ids = torch.randint(0, VOCAB, (1, tokens))
                timed = timed_side_by_side(
                    {
                        "a2a": lambda m=a2a, x=ids: m(x),
                        "overlap": plain(ours, ids, None),
                        "one": plain(ours, ids, 1),
                    },
                    args.repeats,
                )
                gloo_rows.append((family, tokens, timed["a2a"][0], timed["overlap"][0], timed["one"][0]))
                if rank == 0:
                    print(f"[bench] {family} {tokens} tokens: done", flush=True)
            if family != args.families[0] or args.skip_link:
                continue
            link = overlap.ops.EmulatedLink(latency_s=args.latency, bandwidth_bytes_per_s=args.bandwidth)
            overlap.ops.configure(link=link)
            try:
                n, p = max(args.tokens), args.parts
                torch.manual_seed(1 + rank)
                ids = torch.randint(0, VOCAB, (1, n))
                seqs = ids[:, : n - n % p].reshape(p, -1)  # the same tokens as p sequences
                prefill = timed_side_by_side(
                    {"one": recorded(ours, ids, 1), "pipe": recorded(ours, ids, None), "tbo": two_batch(ours, seqs, p)},
                    args.repeats,
                )
                prompts = torch.randint(0, VOCAB, (p, 16))
                decode = timed_side_by_side(
                    {
                        "one": decoding(ours, prompts, 1, args.decode_steps),
                        "split": decoding(ours, prompts, p, args.decode_steps),
                    },
                    args.repeats,
                )
            finally:
                overlap.ops.configure(link=None)
            label = f"{args.bandwidth / 1e6:g} MB/s"
            link_rows += [
                (f"prefill {n} tok, 1 microbatch ({label})", *prefill["one"]),
                (f"prefill {n} tok, pipelined EP calls", *prefill["pipe"]),
                (f"prefill {n} tok as {p} seqs, {p} fibers", *prefill["tbo"]),
                (f"decode {p} seqs x {args.decode_steps} steps, 1 part", *decode["one"]),
                (f"decode {p} seqs x {args.decode_steps} steps, {p} parts", *decode["split"]),
            ]

        if rank == 0:
            print(f"\n{world} ranks (gloo, CPU); median of {args.repeats}, slowest rank; each rank its own batch\n")
            print(
                f"{'family':<12} {'tokens/rank':>11} {'all_to_all ms':>14} {'overlap ms':>11} {'overlap/a2a':>12} "
                f"{'1 microbatch/a2a':>17}"
            )
            for family, tokens, t_a2a, t_ov, t_one in gloo_rows:
                print(
                    f"{family:<12} {tokens:>11} {t_a2a * 1e3:14.1f} {t_ov * 1e3:11.1f} {t_ov / t_a2a:11.2f}x "
                    f"{t_one / t_a2a:16.2f}x"
                )
            if link_rows:
                print(
                    f"\nemulated link, {args.families[0]} (compute: experts for EP-call rows, whole model for "
                    "fiber rows)\n"
                )
                print(f"{'run':<42} {'ms':>8} {'compute ms':>11} {'comm ms':>8} {'hidden':>7} {'of hideable':>12}")
                for name, seconds, rep in link_rows:
                    print(
                        f"{name:<42} {seconds * 1e3:8.1f} {rep.compute_busy * 1e3:11.1f} {rep.comm_busy * 1e3:8.1f} "
                        f"{rep.hidden_fraction * 100:6.1f}% {hideable(rep) * 100:11.1f}%"
                    )
                t = [seconds for _, seconds, _ in link_rows]
                print(
                    f"\ntime vs 1 microbatch / 1 part: pipelined EP calls {t[1] / t[0]:.2f}x, {args.parts} fibers "
                    f"{t[2] / t[0]:.2f}x (prefill); {args.parts} parts {t[4] / t[3]:.2f}x (decode)"
                )
    finally:
        dist.barrier()
        if rank == 0:
            shutil.rmtree(root, ignore_errors=True)
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
