"""Kernel throughput beside the copy bandwidth measured in the same run.

Run: ``python bench/bench_kernels.py [--device cpu|cuda] [--repeats N] [--threads N]``. For each
shape (T tokens, top-K, hidden H, bf16) it times, best of ``--repeats`` (CPU: wall clock, the copy
and the kernels taken in turn so that they share the machine's load; CUDA: CUDA events around each
call, after a synchronize):

* ``copy_``: the `(T·K, H)` rows copied into a buffer allocated once, the 100 % (CPU also times
  ``clone`` and takes the better of the two);
* ``gather``: `gather_rows` of `(T, H)` tokens into send order `(T·K, H)` (dispatch's permute);
* ``scatter``: `scatter_rows` of `(T·K, H)` rows back through a permutation (the unpermute);
* ``combine``: `weighted_combine` of `(T·K, H)` expert outputs into `(T, H)` (K reads, one write);
* ``quantize``: `quantize_packed` of the `(T·K)` send-ordered rows into int8 staging rows;
  on CPU, ``combine`` and ``quantize`` run the compiled C kernels (`cpu_native`), and ``combine0``
  and ``quantize0`` the same calls as the torch reference (``OVERLAP_KERNELS=torch``);
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
from overlap.kernels import backend, cpu_native
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


def interleaved_times(fns: list[Callable[[], object]], repeats: int, slow: set[int]) -> list[float]:
    """Best seconds of each call, CPU wall clock, the calls taken in turn `repeats` times.

    Taking them in turn puts the copy and the kernels under the same load, so their ratio holds on a
    busy machine better than two separate best-ofs (a copy timed alone may see only busy moments).
    The calls in `slow` (the torch references, up to a second each) run 3 rounds only.
    """
    for fn in fns:
        fn()  # warm-up (allocator, first touch)
    times = [float("inf")] * len(fns)
    for round_ in range(repeats):
        for i, fn in enumerate(fns):
            if i in slow and round_ >= 3:
                continue
            start = time.perf_counter()
            fn()
            times[i] = min(times[i], time.perf_counter() - start)
    return times


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


def _reference(fn: Callable[[], object]) -> object:
    with backend.use("torch"):
        return fn()


def _bits(value: object) -> list[torch.Tensor]:
    """Outputs as raw integers, so that `torch.equal` compares bits (-0 against +0, NaN payloads)."""
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}
    return [t.view(ints[t.element_size()]) if t.is_floating_point() else t for t in _outputs(value)]


def bench_cpu(repeats: int) -> None:
    start = time.perf_counter()
    ready = cpu_native.available()  # builds the C kernels, or loads them from the disk cache
    print(
        f"compiled CPU kernels: {'yes' if ready else 'no (torch reference)'}, first call "
        f"{1e3 * (time.perf_counter() - start):.0f} ms (build or load)"
    )
    print(f"{'T x K x H':>18}  {'kernel':>9}  {'GB/s':>7}  {'% copy':>7}  same bits as reference")
    for tokens, top_k, hidden in CPU_SHAPES:
        inp = make_inputs(tokens, top_k, hidden, "cpu")
        rows = inp["rows"]
        copy_dst = torch.empty_like(rows)
        n_copy = 2 * rows.numel() * rows.element_size()
        label = f"{tokens} x {top_k} x {hidden}"
        cases = kernel_cases(inp, tokens, top_k, hidden)
        same = {}
        for name, fn, _ in cases:
            if name in ("combine", "quantize"):
                same[name] = all(torch.equal(a, b) for a, b in zip(_bits(fn()), _bits(_reference(fn))))
        for name in ("combine", "quantize"):  # the torch reference beside the compiled C path
            at, case = next((i, case) for i, case in enumerate(cases) if case[0] == name)
            cases.insert(at + 1, (name + "0", partial(_reference, case[1]), case[2]))
        calls = [("clone", rows.clone, n_copy), ("copy_", partial(copy_dst.copy_, rows), n_copy), *cases]
        times = interleaved_times(
            [fn for _, fn, _ in calls], repeats, slow={i for i, c in enumerate(calls) if c[0][-1] == "0"}
        )
        copy_rate = n_copy / min(times[0], times[1])
        print(f"{label:>18}  {'copy_':>9}  {copy_rate / 1e9:7.2f}  {100:6.0f}%")
        for (name, _, nbytes), seconds in list(zip(calls, times))[2:]:
            if nbytes:
                rate = nbytes / seconds
                bits = "" if name not in same else ("  yes" if same[name] else "  NO")
                print(f"{label:>18}  {name:>9}  {rate / 1e9:7.2f}  {100 * rate / copy_rate:6.0f}%{bits}")
            else:
                print(f"{label:>18}  {name:>9}  {seconds * 1e6:7.0f} µs")


def host_time(fn: Callable[[], object], repeats: int) -> float:
    """Seconds the host spends in the best of `repeats` calls (the launch, not the device work)."""
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    torch.cuda.synchronize()
    return best


def bench_cuda(repeats: int) -> None:
    if not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    print(f"{torch.cuda.get_device_name()}; Triton path: {backend.device_kernels(torch.empty(0, device='cuda'))}")
    print(
        f"{'T x K x H':>18}  {'kernel':>8}  {'triton':>14}  {'% copy':>7}  {'host µs':>7}  {'torch':>14}  "
        f"{'% copy':>7}  same bits"
    )
    lowest: tuple[float, str] = (float("inf"), "")
    layout_4096 = float("nan")
    differ = []
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
                    results.append(_bits(fn()))
                    host = f"{1e6 * host_time(fn, repeats):7.1f}" if mode == "auto" else ""
                if nbytes:
                    rate = nbytes / seconds
                    cells.append(f"{rate / 1e9:9.0f} GB/s  {100 * rate / copy_rate:6.0f}%")
                    if mode == "auto":
                        lowest = min(lowest, (100 * rate / copy_rate, f"{name} at {label}"))
                else:
                    cells.append(f"{seconds * 1e6:11.1f} µs  {'':>7}")
                    if mode == "auto" and tokens == 4096:
                        layout_4096 = seconds * 1e6
                if host:
                    cells[-1] += f"  {host}"
            same = all(torch.equal(a, b) for a, b in zip(*results))
            if not same:
                differ.append(f"{name} at {label}")
            print(f"{label:>18}  {name:>8}  {cells[0]}  {cells[1]}  {'yes' if same else 'NO'}")
    # One line each for bench/device_check.sh's summary (issue 21's targets).
    print(f"summary: layout at 4096 tokens {layout_4096:.1f} µs (target <= 50)")
    print(f"summary: lowest Triton kernel {lowest[0]:.0f}% of copy_, {lowest[1]} (target >= 60 at every shape)")
    print(f"summary: bits equal to the torch reference: {'all' if not differ else 'NO for ' + ', '.join(differ)}")


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
