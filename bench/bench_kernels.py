"""Kernel throughput beside the copy bandwidth measured in the same run.

Run: ``python bench/bench_kernels.py [--repeats 20] [--threads N]``. For each shape (T tokens,
top-K, hidden H, bf16) it times, best of ``--repeats``:

* ``clone``: `t.clone()` of a `(T·K, H)` tensor, the physical limit (bytes read + written), and
  ``copy_``: the same bytes copied into a buffer allocated once (no page faults, as the kernels
  writing into `out=`); the better of the two is the 100 %;
* ``gather``: `gather_rows` of `(T, H)` tokens into send order `(T·K, H)` (dispatch's permute);
* ``scatter``: `scatter_rows` of `(T·K, H)` rows back through a permutation (the unpermute);
* ``combine``: `weighted_combine` of `(T·K, H)` expert outputs into `(T, H)` (K reads, one write).

GB/s counts the bytes each kernel must read and write (index tensors excluded); ``% copy`` is that
rate over clone's. A kernel well under 70 % of the copy rate is worth a look.
"""

from __future__ import annotations

import argparse
import time

import torch

from overlap import kernels

SHAPES = [(512, 8, 4096), (256, 8, 7168), (128, 4, 4096), (2048, 2, 2048)]


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up (allocator, first-touch)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_shape(tokens: int, top_k: int, hidden: int, repeats: int) -> list[tuple[str, float, float]]:
    g = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16
    item = torch.finfo(dtype).bits // 8
    x = torch.randn(tokens, hidden, generator=g).to(dtype)
    ids = torch.rand(tokens, 64, generator=g).argsort(dim=1)[:, :top_k]  # distinct experts per token
    send_token = torch.argsort(ids.reshape(-1), stable=True) // top_k  # dispatch's send order
    rows = torch.randn(tokens * top_k, hidden, generator=g).to(dtype)
    perm = torch.randperm(tokens * top_k, generator=g)
    positions = torch.randperm(tokens * top_k, generator=g).view(tokens, top_k)
    weights = torch.rand(tokens, top_k, generator=g)
    gathered = torch.empty(tokens * top_k, hidden, dtype=dtype)
    scattered = torch.empty_like(rows)
    out = torch.empty(tokens, hidden, dtype=dtype)

    n_rows = tokens * top_k * hidden * item  # bytes of the (T·K, H) side
    n_tok = tokens * hidden * item  # bytes of the (T, H) side
    copy_dst = torch.empty_like(rows)
    cases = [
        ("clone", lambda: rows.clone(), 2 * n_rows),
        ("copy_", lambda: copy_dst.copy_(rows), 2 * n_rows),
        ("gather", lambda: kernels.gather_rows(x, send_token, out=gathered), 2 * n_rows),
        ("scatter", lambda: kernels.scatter_rows(rows, perm, scattered), 2 * n_rows),
        ("combine", lambda: kernels.weighted_combine(rows, positions, weights, out=out), n_rows + n_tok),
    ]
    return [(name, nbytes / best_time(fn, repeats) / 1e9) for name, fn, nbytes in cases]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, bf16, best of {args.repeats}")
    print(f"{'T x K x H':>18}  {'kernel':>8}  {'GB/s':>7}  {'% copy':>7}")
    for tokens, top_k, hidden in SHAPES:
        results = bench_shape(tokens, top_k, hidden, args.repeats)
        copy = max(results[0][1], results[1][1])  # the better of clone and copy_ into a warm buffer
        for name, rate in results:
            print(f"{f'{tokens} x {top_k} x {hidden}':>18}  {name:>8}  {rate:7.2f}  {100 * rate / copy:6.0f}%")


if __name__ == "__main__":
    main()
