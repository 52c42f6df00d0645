"""Kernel throughput beside the copy bandwidth measured in the same run.

Run: ``python bench/bench_kernels.py [--device cpu|cuda] [--repeats N] [--threads N]``. For each
shape (T tokens, top-K, hidden H, bf16) it times, best of ``--repeats`` (CPU: wall clock; CUDA:
CUDA events around each call, after a synchronize):

* ``copy_``: the `(T·K, H)` rows copied into a buffer allocated once, the 100 % (CPU also times
  ``clone`` and takes the better of the two);
* ``gather``: `gather_rows` of `(T, H)` tokens into send order `(T·K, H)` (dispatch's permute);
* ``scatter``: `scatter_rows` of `(T·K, H)` rows back through a permutation (the unpermute);
* ``combine``: `weighted_combine` of `(T·K, H)` expert outputs into `(T, H)` (K reads, one write);
  on CPU also ``combine0``, the same call with the compiled path off (the eager reference);
* ``quantize``: `quantize_packed` of the `(T·K)` send-ordered rows into int8 staging rows;
* ``layout``: `dispatch_layout` of the `(T, K)` routing (time, not bandwidth).

GB/s counts the bytes each kernel must read and write (index tensors excluded); ``% copy`` is that
rate over the copy rate of the same run. On CUDA every kernel runs twice, as Triton (the path
`overlap.kernels` takes there) and as the torch reference (``OVERLAP_KERNELS=torch``), and the
``same bits`` column says whether their outputs are bit-identical: the device check of the kernels.
A kernel well under 70 % of the copy rate is worth a look.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial

import torch

from overlap import kernels
from overlap.kernels import backend, cpu_combine
from overlap.kernels.quant import quantized_row_bytes

CPU_SHAPES = [(512, 8, 4096), (256, 8, 7168), (128, 4, 4096), (2048, 2, 2048)]
CUDA_SHAPES = [(512, 8, 4096), (256, 8, 7168), (2048, 2, 2048), (4096, 8, 7168)]
NUM_EXPERTS = 64


def best_time(fn: Callable[[], object], repeats: int, device: str) -> float:
    """Seconds of the fastest of `repeats` calls (after one warm-up call)."""
    fn()  # warm-up (allocator, first touch, Triton compile)
    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        for _ in range(repeats):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop) / 1e3)
        return min(times)
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def make_inputs(tokens: int, top_k: int, hidden: int, device: str) -> dict[str, object]:
    g = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16
    ids = torch.rand(tokens, NUM_EXPERTS, generator=g).argsort(dim=1)[:, :top_k]  # distinct experts per token
    send_token = torch.argsort(ids.reshape(-1), stable=True) // top_k  # dispatch's send order
    cpu = {
        "x": torch.randn(tokens, hidden, generator=g).to(dtype),
        "ids": ids.to(torch.int32),
        "send_token": send_token,
        "rows": torch.randn(tokens * top_k, hidden, generator=g).to(dtype),
        "perm": torch.randperm(tokens * top_k, generator=g),
        "positions": torch.randperm(tokens * top_k, generator=g).view(tokens, top_k),
        "weights": torch.rand(tokens, top_k, generator=g),
    }
    return {name: t.to(device) for name, t in cpu.items()}


def kernel_cases(inp: dict, tokens: int, top_k: int, hidden: int) -> list[tuple[str, Callable[[], object], int]]:
    """(name, call returning its output, bytes moved) for every kernel on these inputs."""
    x, rows = inp["x"], inp["rows"]
    item = rows.element_size()
    gathered = torch.empty_like(rows)
    scattered = torch.empty_like(rows)
    out = torch.empty(tokens, hidden, dtype=rows.dtype, device=rows.device)
    staging = torch.zeros(tokens * top_k, quantized_row_bytes(hidden), dtype=torch.int8, device=rows.device)
    n_rows = tokens * top_k * hidden * item  # bytes of the (T·K, H) side
    n_tok = tokens * hidden * item  # bytes of the (T, H) side
    return [
        ("gather", lambda: kernels.gather_rows(x, inp["send_token"], out=gathered), 2 * n_rows),
        ("scatter", lambda: kernels.scatter_rows(rows, inp["perm"], scattered), 2 * n_rows),
        ("combine", lambda: kernels.weighted_combine(rows, inp["positions"], inp["weights"], out=out), n_rows + n_tok),
        (
            "quantize",
            lambda: kernels.quantize_packed(x, inp["send_token"], staging),
            n_rows + tokens * top_k * (hidden + 4),
        ),
        (
            "layout",
            lambda: kernels.dispatch_layout(
                inp["ids"],
                num_active=tokens,
                ep_world_size=8,
                ep_rank_id=0,
                moe_expert_num=NUM_EXPERTS,
                shared_expert_num=0,
                shared_expert_rank_num=0,
            ),
            0,
        ),
    ]


def _outputs(value: object) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value.clone()]
    if isinstance(value, tuple):
        return [t.clone() for t in value]
    return [
        getattr(value, f).clone()
        for f in ("send_token", "send_scale_row", "send_counts", "expand_idx", "expert_counts")
    ]


def _eager(fn: Callable[[], object]) -> object:
    saved, cpu_combine._enabled = cpu_combine._enabled, False
    try:
        return fn()
    finally:
        cpu_combine._enabled = saved


def bench_cpu(repeats: int) -> None:
    print(f"{'T x K x H':>18}  {'kernel':>8}  {'GB/s':>7}  {'% copy':>7}")
    for tokens, top_k, hidden in CPU_SHAPES:
        inp = make_inputs(tokens, top_k, hidden, "cpu")
        rows = inp["rows"]
        copy_dst = torch.empty_like(rows)
        n_copy = 2 * rows.numel() * rows.element_size()
        copy_rate = n_copy / min(
            best_time(rows.clone, repeats, "cpu"), best_time(partial(copy_dst.copy_, rows), repeats, "cpu")
        )
        label = f"{tokens} x {top_k} x {hidden}"
        print(f"{label:>18}  {'copy_':>8}  {copy_rate / 1e9:7.2f}  {100:6.0f}%")
        cases = kernel_cases(inp, tokens, top_k, hidden)
        combine = next(case for case in cases if case[0] == "combine")
        cases.insert(3, ("combine0", partial(_eager, combine[1]), combine[2]))
        for name, fn, nbytes in cases:
            seconds = best_time(fn, repeats, "cpu")
            if nbytes:
                rate = nbytes / seconds
                print(f"{label:>18}  {name:>8}  {rate / 1e9:7.2f}  {100 * rate / copy_rate:6.0f}%")
            else:
                print(f"{label:>18}  {name:>8}  {seconds * 1e6:7.0f} µs")


def bench_cuda(repeats: int) -> None:
    if not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    print(f"{torch.cuda.get_device_name()}; Triton path: {backend.device_kernels(torch.empty(0, device='cuda'))}")
    print(f"{'T x K x H':>18}  {'kernel':>8}  {'triton':>14}  {'% copy':>7}  {'torch':>14}  {'% copy':>7}  same bits")
    for tokens, top_k, hidden in CUDA_SHAPES:
        inp = make_inputs(tokens, top_k, hidden, "cuda")
        rows = inp["rows"]
        copy_dst = torch.empty_like(rows)
        n_copy = 2 * rows.numel() * rows.element_size()
        copy_rate = n_copy / best_time(partial(copy_dst.copy_, rows), repeats, "cuda")
        label = f"{tokens} x {top_k} x {hidden}"
        print(f"{label:>18}  {'copy_':>8}  {copy_rate / 1e9:9.0f} GB/s  {100:6.0f}%")
        for name, fn, nbytes in kernel_cases(inp, tokens, top_k, hidden):
            cells, results = [], []
            for mode in ("auto", "torch"):
                with backend.use(mode):
                    seconds = best_time(fn, repeats, "cuda")
                    results.append(_outputs(fn()))
                if nbytes:
                    rate = nbytes / seconds
                    cells.append(f"{rate / 1e9:9.0f} GB/s  {100 * rate / copy_rate:6.0f}%")
                else:
                    cells.append(f"{seconds * 1e6:11.1f} µs  {'':>7}")
            same = all(torch.equal(a, b) for a, b in zip(*results))
            print(f"{label:>18}  {name:>8}  {cells[0]}  {cells[1]}  {'yes' if same else 'NO'}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--repeats", type=int, default=None, help="best of this many (default: 20 CPU, 10 CUDA)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.repeats is None:
        args.repeats = 10 if args.device == "cuda" else 20
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, bf16, best of {args.repeats}, "
        f"kernels mode {backend.mode()}"
    )
    if args.device == "cuda":
        bench_cuda(args.repeats)
    else:
        bench_cpu(args.repeats)


if __name__ == "__main__":
    main()
