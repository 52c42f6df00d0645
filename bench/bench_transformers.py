"""A transformers MoE model, expert parallel: transformers' "all_to_all" vs overlap, on CPU ranks.

Run:  torchrun --nproc-per-node 2 bench/bench_transformers.py [--tokens 500] [--bandwidth 2e7]

Same model (Qwen3-MoE from a config: hidden 1024, 2 layers, 8 experts, top-2, random bf16 weights,
seed 0), same prompt per rank (each rank its own batch: fsdp = ep = world), forward passes under
`torch.no_grad`, median of `--repeats` after one warm-up. Two comparisons:

1. gloo as is: "all_to_all" vs "overlap" (pipelined). On a CPU the transfers run on the same cores
   as the experts, so this measures overhead, not hiding.
2. the emulated link (`overlap.ops.EmulatedLink`: a transfer completes after latency + bytes /
   bandwidth, sleeping, no core used, like an SDMA engine): "overlap" with one microbatch vs
   pipelined. The bandwidth is chosen so that a layer's dispatch + combine take about as long as
   its experts; the report's hidden fraction = (transfer time under expert compute) / transfer time.

Rank 0 prints a table (times are the slowest rank's).
"""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Callable
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, Qwen3MoeConfig
from transformers.distributed import DistributedConfig

import overlap
import overlap.integrations.transformers as overlap_hf
import overlap.ops


def build(path: str, layers: int) -> None:
    config = Qwen3MoeConfig(hidden_size=1024, intermediate_size=256, moe_intermediate_size=128, num_experts=8,
                            num_experts_per_tok=2, num_hidden_layers=layers, num_attention_heads=8,
                            num_key_value_heads=2, head_dim=128, vocab_size=512, max_position_embeddings=4096,
                            eos_token_id=None)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(path)


def load(path: str, implementation: str):
    world = dist.get_world_size()
    config = DistributedConfig(fsdp_size=world, ep_size=world, ep_implementation=implementation)
    return AutoModelForCausalLM.from_pretrained(path, distributed_config=config, dtype=torch.bfloat16)


def timed_side_by_side(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, tuple[float, object]]:
    """Median seconds (slowest rank) of each run, the runs alternated within every repetition so a
    change of machine load hits them alike; with each run's last overlap report (or None)."""
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


def recorded(model, ids: torch.Tensor, num_microbatches: int | None):
    def run():
        with overlap_hf.record(model) as rec, overlap_hf.microbatches(num_microbatches):
            model(ids)
        return rec.report()
    return run


def two_batch(model, ids: torch.Tensor, fibers: int):
    """Two-batch overlap over the whole model: one half of the batch's attention and experts hide
    the other half's transfers (`overlap.wrap(model)` inside a scheduler context)."""
    wrapped = overlap.wrap(model)

    def run():
        with overlap.scheduler(microbatches=fibers, min_tokens=1) as s:
            wrapped(ids, use_cache=False)
        return s.report()
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=500, help="tokens per rank (<= 512: one microbatch fits)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bandwidth", type=float, default=2e7, help="emulated link, bytes/s")
    parser.add_argument("--latency", type=float, default=50e-6, help="emulated link, seconds")
    parser.add_argument("--pipelined", type=int, default=2, help="microbatches of the pipelined runs")
    parser.add_argument("--fibers", type=int, default=4, help="sequences (and fibers) of the two-batch overlap runs")
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    holder = [tempfile.mkdtemp(prefix="overlap-bench-") if rank == 0 else None]
    dist.broadcast_object_list(holder, src=0)
    path = holder[0]
    rows: list[tuple[str, float, object]] = []
    try:
        if rank == 0:
            build(path, args.layers)
        dist.barrier()
        torch.manual_seed(1 + rank)
        ids = torch.randint(0, 512, (1, args.tokens))

        a2a, model = load(path, "all_to_all"), load(path, "overlap")
        gloo = timed_side_by_side({"a2a": lambda: a2a(ids), "overlap": recorded(model, ids, args.pipelined)},
                                  args.repeats)
        (t_a2a, _), (t_ov, rep_ov) = gloo["a2a"], gloo["overlap"]
        rows += [("gloo  all_to_all (transformers)", t_a2a, None),
                 (f"gloo  overlap, {args.pipelined} microbatches", t_ov, rep_ov)]

        link = overlap.ops.EmulatedLink(latency_s=args.latency, bandwidth_bytes_per_s=args.bandwidth)
        overlap.ops.configure(link=link)
        f = args.fibers
        ids2 = ids[:, : args.tokens - args.tokens % f].reshape(f, -1)  # the same tokens as f sequences
        emulated = timed_side_by_side({
            "one": recorded(model, ids, 1), "pipe": recorded(model, ids, args.pipelined),
            "one2": recorded(model, ids2, 1), "tbo": two_batch(model, ids2, f)}, args.repeats)
        overlap.ops.configure(link=None)
        (t_one, rep_one), (t_pipe, rep_pipe) = emulated["one"], emulated["pipe"]
        (t_one2, rep_one2), (t_tbo, rep_tbo) = emulated["one2"], emulated["tbo"]
        label = f"link {args.bandwidth / 1e6:g} MB/s"
        rows += [(f"{label}  overlap, 1 microbatch", t_one, rep_one),
                 (f"{label}  overlap, {args.pipelined} microbatches", t_pipe, rep_pipe),
                 (f"{label}  {f} sequences, 1 microbatch", t_one2, rep_one2),
                 (f"{label}  {f} sequences, {f} fibers", t_tbo, rep_tbo)]

        if rank == 0:
            print(f"\n{world} ranks (gloo, CPU), {args.tokens} tokens per rank, {args.layers} layers, hidden 1024, "
                  f"8 experts top-2; median of {args.repeats} forwards, slowest rank\n")
            print(f"{'run':<44} {'forward ms':>11} {'compute ms':>11} {'comm ms':>9} {'hidden':>8}")
            for name, seconds, rep in rows:
                extra = ("" if rep is None else
                         f"{rep.compute_busy * 1e3:11.1f} {rep.comm_busy * 1e3:9.1f} {rep.hidden_fraction * 100:7.1f}%")
                print(f"{name:<44} {seconds * 1e3:11.1f} {extra}")
            print(f"\noverlap / all_to_all on gloo: {t_ov / t_a2a:.2f}x time; "
                  f"pipelined / 1 microbatch on the emulated link: {t_pipe / t_one:.2f}x time; "
                  f"{f}-fiber batch overlap / 1 microbatch: {t_tbo / t_one2:.2f}x time")
            print("(compute / comm / hidden: rank 0's last run; the two-batch rows count the whole model as compute)")
    finally:
        dist.barrier()
        if rank == 0:
            shutil.rmtree(path, ignore_errors=True)
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
