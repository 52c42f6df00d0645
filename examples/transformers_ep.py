"""A transformers MoE model, expert parallel through overlap, on CPU ranks over gloo.

Run:  torchrun --nproc-per-node 2 examples/transformers_ep.py [--layout dp|tp] [--tokens 600]

Builds a small Qwen3-MoE model from a config (random bf16 weights, seed 0; nothing is downloaded),
saves it to a temporary folder, loads it on every rank twice, with `ep_implementation="all_to_all"`
(transformers' blocking exchange) and `"overlap"` (this library's pipelined split ops), runs the same
prompt through both, checks that the logits agree and prints overlap's report of the run.

Layouts: ``dp``: every rank holds its own batch (FSDP2 for the dense weights: fsdp = ep = world);
``tp``: the ranks share one batch (tensor-parallel attention: tp = ep = world).
"""

from __future__ import annotations

import argparse
import math
import shutil
import tempfile
import time

import torch
import torch.distributed as dist

import overlap.integrations.transformers as overlap_hf  # registers ep_implementation="overlap"
from overlap.integrations.tiny_models import family_config, load_expert_parallel, save_random_model

# overlap rounds each weighted expert output in the model's dtype as transformers does, so with the same
# expert GEMMs the logits are bit-equal to "all_to_all". Hosts whose GEMMs round differently per row count
# (microbatches) move a token by about 1 ulp of the logits; we allow 8 ulp of the largest |logit| per token
# (bf16 at |logit| ~ 3: 0.125). A wrong row, weight or route moves a token by O(1).
TOL_ULPS = 8


def tolerance(dtype: torch.dtype, scale: float) -> float:
    """TOL_ULPS ulp of `scale` in `dtype` (bf16: 8 bits of precision, fp16: 11)."""
    bits = {torch.bfloat16: 7, torch.float16: 10}[dtype]
    return TOL_ULPS * 2.0 ** (math.floor(math.log2(max(scale, 2.0**-126))) - bits)


def build(path: str, layers: int) -> None:
    """A random Qwen3-MoE of `layers` layers (8 experts of 128, top-2, hidden 1024)."""
    save_random_model(family_config("qwen3_moe", layers=layers, moe_intermediate=128, vocab_size=512), path)


def load(path: str, layout: str, implementation: str):
    return load_expert_parallel(path, implementation, layout=layout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layout", choices=("dp", "tp"), default="dp")
    parser.add_argument("--tokens", type=int, default=600, help="prompt length (per rank under dp)")
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    holder = [tempfile.mkdtemp(prefix="overlap-hf-") if rank == 0 else None]
    dist.broadcast_object_list(holder, src=0)
    path = holder[0]
    try:
        if rank == 0:
            build(path, args.layers)
        dist.barrier()
        torch.manual_seed(1 + (rank if args.layout == "dp" else 0))  # dp: each rank its own prompt
        ids = torch.randint(0, 512, (1, args.tokens - (rank * 37 if args.layout == "dp" else 0)))

        logits, times = {}, {}
        for implementation in ("all_to_all", "overlap"):
            model = load(path, args.layout, implementation)
            with torch.no_grad():  # FSDP2 (dp layout) refuses torch.inference_mode
                model(ids[:, :8])  # warm up
                dist.barrier()
                with overlap_hf.record(model) as rec:
                    start = time.perf_counter()
                    logits[implementation] = model(ids).logits.float()
                    times[implementation] = time.perf_counter() - start

        per_token = (logits["overlap"] - logits["all_to_all"]).abs().amax(-1)  # (1, T): each token's worst logit
        diff, tol = per_token.max().item(), tolerance(torch.bfloat16, logits["all_to_all"].abs().max().item())
        ok = diff <= tol
        equal = torch.equal(logits["overlap"], logits["all_to_all"])
        verdict = ("bit-equal" if equal else "agree") if ok else "DISAGREE"
        for r in range(dist.get_world_size()):
            if r == rank:
                print(
                    f"rank {rank}: {ids.shape[1]} tokens, logits {verdict} (worst token |Δ| {diff:.4f} <= "
                    f"{tol:.4f}, {TOL_ULPS} ulp); all_to_all {times['all_to_all'] * 1e3:.1f} ms, overlap "
                    f"{times['overlap'] * 1e3:.1f} ms",
                    flush=True,
                )
            dist.barrier()
        if rank == 0:
            print("\noverlap run on rank 0 (makespan = the whole forward, compute = the experts, link = transfers):")
            print(rec.report())
            # The axis spans the recorded block, as the report's makespan does (before the first MoE
            # layer, attention and routers ran: blank).
            print(rec.timeline.to_text(width=96, start=rec.started, end=rec.ended))
        if not ok:
            raise SystemExit(1)
    finally:
        dist.barrier()
        if rank == 0:
            shutil.rmtree(path, ignore_errors=True)
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
