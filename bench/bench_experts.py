"""Experts as one grouped GEMM per projection against the per-expert loop (overlap.moe.expert_mlps).

    python bench/bench_experts.py                       # cpu, 8 experts over 2048 rows, 1024 -> 512, bf16
    python bench/bench_experts.py --device cuda --experts 16 --rows 8192 --hidden 4096 --inter 1536
    python bench/bench_experts.py --device cuda --experts 8 --rows 512 --hidden 4096 --inter 1536 --cuda-graph

Both run side by side (alternating, `--repeat` times each) on the same rows, routed unevenly
(one expert empty); prints, and writes as JSON with `--json`: the median and spread of each, the
ratio, achieved TFLOP/s, whether the two are bit-equal and their worst difference in ulps.

`--cuda-graph` (cuda, where torch has the grouped GEMM) is the CUDA-graphs trial of a microbatch's
routed experts: their shapes are static (the padded rows, the counts on the device), so the grouped
path is captured once in a CUDA graph and its replay timed beside the eager calls; the result says
whether the replay is bit-equal and its speedup. Small `--rows` are the launch-bound regime that a
graph could win; the layer adopts graphs only where this shows they do.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from overlap import moe
from overlap.numerics import compare


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


GRAPHED = "grouped_mm+cuda_graph"


def _captured(call: Callable[[], torch.Tensor], device: torch.device) -> tuple[torch.Tensor, Callable[[], None]]:
    """`call` captured once in a CUDA graph (after warm-up runs on the capturing side stream, as
    torch's docs ask): its output (the graph's static tensor, refreshed by every replay) and the replay."""
    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            call()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = call()
    graph.replay()
    return static, graph.replay


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--rows", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--inter", type=int, default=512)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--json", default=None, help="also write the result here")
    p.add_argument("--cuda-graph", action="store_true", help="also time the grouped path replayed from a CUDA graph")
    args = p.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.cuda_graph and (device.type != "cuda" or not moe.has_grouped_mm(device, dtype)):
        p.error(f"--cuda-graph needs --device cuda and torch's grouped GEMM for {args.dtype} there, got {device}")
    g = torch.Generator().manual_seed(0)
    E, A, H, inter = args.experts, args.rows, args.hidden, args.inter
    gate = (torch.randn(E, inter, H, generator=g) / H**0.5).to(dtype).to(device)
    up = (torch.randn(E, inter, H, generator=g) / H**0.5).to(dtype).to(device)
    down = (torch.randn(E, H, inter, generator=g) / inter**0.5).to(dtype).to(device)
    x = torch.randn(A, H, generator=g).to(dtype).to(device)
    weights = torch.rand(E, generator=g)
    weights[E // 2] = 0  # one expert receives nothing
    counts = (weights / weights.sum() * A).floor().long()
    counts[0] += A - counts.sum()
    nums = counts.to(device)
    has_grouped = moe.has_grouped_mm(device, dtype)
    packable = device.type == "cpu" and moe.can_pack(dtype)
    impls = ["loop"] + (["grouped_mm"] if has_grouped else []) + (["packed"] if packable else [])
    # The packed weights are built once, as MoELayer keeps them: the timed calls only run them.
    packed = moe.PackedExperts(gate, up, down) if packable else None
    calls = {i: (lambda i=i: moe.expert_mlps(x, gate, up, down, nums, implementation=i, packed=packed)) for i in impls}
    out = {i: call() for i, call in calls.items()}  # warm up
    if args.cuda_graph:  # checked with the arguments: cuda, grouped GEMM there
        out[GRAPHED], calls[GRAPHED] = _captured(calls["grouped_mm"], device)
        impls.append(GRAPHED)
    times: dict[str, list[float]] = {i: [] for i in impls}
    for _ in range(args.repeat):
        for i in impls:
            _sync(device)
            t0 = time.perf_counter()
            calls[i]()
            _sync(device)
            times[i].append(time.perf_counter() - t0)
    flops = 2 * A * H * inter * 3
    result: dict = {
        "device": str(device),
        "dtype": args.dtype,
        "shape": {"experts": E, "rows": A, "hidden": H, "inter": inter},
        "torch": torch.__version__,
        "has_grouped_mm": has_grouped,
    }
    for i in impls:
        med = statistics.median(times[i])
        result[i] = {
            "median_ms": med * 1e3,
            "min_ms": min(times[i]) * 1e3,
            "max_ms": max(times[i]) * 1e3,
            "tflops": flops / med / 1e12,
        }
    if has_grouped:
        result["loop_over_grouped"] = result["loop"]["median_ms"] / result["grouped_mm"]["median_ms"]
        result["bit_equal"] = bool(torch.equal(out["grouped_mm"], out["loop"]))
        result["worst_ulps"] = compare(out["grouped_mm"].cpu(), out["loop"].cpu().double(), dtype).worst_ulps
    if GRAPHED in impls:
        result["eager_over_graph"] = result["grouped_mm"]["median_ms"] / result[GRAPHED]["median_ms"]
        result["graph_bit_equal"] = bool(torch.equal(out[GRAPHED], out["grouped_mm"]))
    if packable:
        result["loop_over_packed"] = result["loop"]["median_ms"] / result["packed"]["median_ms"]
        result["packed_bit_equal"] = bool(torch.equal(out["packed"], out["loop"]))
    for i in impls:
        r = result[i]
        print(
            f"{i:>10}: {r['median_ms']:9.3f} ms median ({r['min_ms']:.3f}-{r['max_ms']:.3f}), {r['tflops']:.3f} TFLOP/s"
        )
    if has_grouped:
        print(
            f"loop / grouped = {result['loop_over_grouped']:.2f}x; bit-equal: {result['bit_equal']}; "
            f"worst difference {result['worst_ulps']:.2f} ulp"
        )
    if GRAPHED in impls:
        print(
            f"grouped eager / CUDA graph replay = {result['eager_over_graph']:.2f}x; "
            f"bit-equal: {result['graph_bit_equal']}"
        )
    if packable:
        print(f"loop / packed = {result['loop_over_packed']:.2f}x; bit-equal: {result['packed_bit_equal']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
