"""Soak: many consecutive MoE steps over local gloo ranks, every checked step equal to the dense
reference, with resident memory reported first vs last.

Run: ``python bench/soak.py [--steps 2000] [--world 2] [--check-every 1] [--seed 0] [--transport window|gloo]``.

Each step draws (from a generator every rank seeds alike) a batch size per rank, top-K, the routing
mode and options, then runs dispatch -> elementwise experts -> combine with the four ops:

* routing ``random`` (experts drawn from all), ``one-rank`` (only rank 0's experts: the other
  ranks receive nothing) or ``few`` (two experts: most experts get no tokens);
* sometimes an ``x_active_mask`` (possibly all False), int8 dispatch (quant_mode 2) or
  ``shared_expert_x``;
* uneven batch sizes with ``global_bs = max_bs · W``.

The reference is the unsplit MoE for this rank's tokens, vectorised over tokens and summed in the
contract's order (k ascending in fp32, then shared_expert_x, one cast), so the comparison is exact.
Resident memory (VmRSS) is read after the first step, after the warm-up (10 % of the steps) and
after the last. `rank_loop` is also what the test suite runs (a short soak, on its rank pool).
"""

from __future__ import annotations

import argparse
import threading
import time

import torch
import torch.distributed as dist

from overlap.launch import RankPool

HIDDEN = 1024
EXPERTS = 8
MAX_BS = 16


def rss_mb() -> float:
    """Resident set size of this process in MiB (VmRSS)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _affine(v: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (v.float() * a + b).to(torch.bfloat16)


def _quant_dequant(x: torch.Tensor) -> torch.Tensor:
    """The contract's per-row int8 round trip, written independently of the kernels."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True)
    # tensor / tensor divisions: `127.0 / amax` would run as `127 · amax.reciprocal()`, one
    # rounding more than the contract's d = 127 / max|xf| and scale = 1 / d
    d = torch.where(amax == 0, torch.ones_like(amax), torch.full_like(amax, 127.0) / amax)
    q = torch.round(xf * d)
    return torch.where(amax == 0, torch.zeros_like(xf), q * (torch.ones_like(d) / d))


def _draw_step(g: torch.Generator, world: int) -> dict:
    """One step's problem, identical on every rank."""

    def pick(n: int) -> int:
        return int(torch.randint(n, (1,), generator=g))

    top_k = (1, 2, 4)[pick(3)]
    batches = [1 + pick(MAX_BS) for _ in range(world)]
    mode = ("random", "random", "one-rank", "few")[pick(4)]
    local = EXPERTS // world
    pool = {
        "random": torch.arange(EXPERTS),
        "one-rank": torch.arange(local),
        "few": torch.randperm(EXPERTS, generator=g)[: max(2, top_k)],
    }[mode]
    xs, ids, ws, active = [], [], [], []
    for bs in batches:
        xs.append(torch.randn(bs, HIDDEN, generator=g).to(torch.bfloat16))
        keys = torch.rand(bs, pool.numel(), generator=g)
        ids.append(pool[keys.argsort(dim=1)[:, :top_k]].to(torch.int32))
        w = torch.rand(bs, top_k, generator=g)
        ws.append((w / w.sum(-1, keepdim=True)).float())
        active.append(pick(bs + 1) if pick(4) == 0 else None)
    return dict(
        top_k=top_k,
        batches=batches,
        mode=mode,
        x=xs,
        ids=ids,
        w=ws,
        active=active,
        quant=2 if pick(4) == 0 else 0,
        shared_x=pick(3) == 0,
    )


def _reference(
    step: dict, rank: int, a: torch.Tensor, b: torch.Tensor, sa: torch.Tensor, sb: torch.Tensor
) -> torch.Tensor:
    x, ids, w = step["x"][rank], step["ids"][rank], step["w"][rank]
    n = x.shape[0] if step["active"][rank] is None else step["active"][rank]
    inp = _quant_dequant(x) if step["quant"] == 2 else x.float()
    acc = torch.zeros(x.shape)
    for k in range(step["top_k"]):
        e = ids[:, k].long()
        acc = acc + w[:, k : k + 1] * _affine(inp, a[e], b[e]).float()
    if step["shared_x"]:
        acc = acc + _affine(x.float(), sa, sb).float()
    acc[n:] = 0
    return acc.to(torch.bfloat16)


def _run_step(
    step: dict, rank: int, world: int, group: str, a: torch.Tensor, b: torch.Tensor, sa: torch.Tensor, sb: torch.Tensor
) -> tuple[torch.Tensor, int]:
    """The four ops and the experts: `(x_out, rows this rank received)`."""
    from overlap import ops

    x, ids, w = step["x"][rank], step["ids"][rank], step["w"][rank]
    mask = None if step["active"][rank] is None else torch.arange(x.shape[0]) < step["active"][rank]
    kw = dict(global_bs=MAX_BS * world)
    y, expand_idx, cmd = ops.dispatch_setup(
        x, ids, group, world, rank, EXPERTS, x_active_mask=mask, quant_mode=step["quant"], **kw
    )
    expand_x, scales, assist, counts = ops.dispatch_teardown(
        x, y, ids, cmd, group, world, rank, EXPERTS, quant_mode=step["quant"], **kw
    )
    local = EXPERTS // world
    total = int(counts.sum())
    expert = rank * local + torch.repeat_interleave(torch.arange(local), counts)  # global expert of each row
    inp = expand_x[:total].float() * scales[:total, None] if step["quant"] == 2 else expand_x[:total].float()
    out = torch.zeros(expand_x.shape, dtype=torch.bfloat16)
    out[:total] = _affine(inp, a[expert], b[expert])
    quant_x, cmd2 = ops.combine_setup(out, ids, assist, group, world, rank, EXPERTS, **kw)
    shared_x = _affine(x.float(), sa, sb) if step["shared_x"] else None
    x_out = ops.combine_teardown(
        out,
        quant_x,
        ids,
        expand_idx,
        w,
        cmd2,
        group,
        world,
        rank,
        EXPERTS,
        x_active_mask=mask,
        shared_expert_x=shared_x,
        **kw,
    )
    return x_out, total


def rank_loop(steps: int, seed: int = 0, check_every: int = 1) -> dict:
    """Run `steps` MoE steps on this rank of the default process group; return statistics."""
    from overlap import ops
    from overlap.ops import in_flight, transport

    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.group.WORLD.group_name
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(EXPERTS, HIDDEN, generator=g) * 0.5, torch.randn(EXPERTS, HIDDEN, generator=g) * 0.1
    sa, sb = torch.randn(HIDDEN, generator=g) * 0.5, torch.randn(HIDDEN, generator=g) * 0.1
    stats = dict(
        rank=rank,
        steps=0,
        checked=0,
        mismatches=0,
        first_mismatch=None,
        empty_receives=0,
        idle_experts=0,
        workers_start=len(transport._workers),
        threads_start=threading.active_count(),
    )
    warmup = max(1, steps // 10)
    start = time.perf_counter()
    for i in range(steps):
        step = _draw_step(g, world)
        x_out, received = _run_step(step, rank, world, group, a, b, sa, sb)
        stats["steps"] += 1
        stats["empty_receives"] += received == 0
        routed = torch.cat(
            [ids[: (ids.shape[0] if n is None else n)].flatten() for ids, n in zip(step["ids"], step["active"])]
        )
        stats["idle_experts"] += EXPERTS - int(torch.unique(routed).numel())
        if check_every and i % check_every == 0:
            stats["checked"] += 1
            if not torch.equal(x_out, _reference(step, rank, a, b, sa, sb)):
                stats["mismatches"] += 1
                if stats["first_mismatch"] is None:
                    stats["first_mismatch"] = i
        if i == 0:
            stats["rss_first_mb"] = rss_mb()
        if i + 1 == warmup:
            stats["rss_warm_mb"] = rss_mb()
    stats["seconds"] = time.perf_counter() - start
    stats["rss_last_mb"] = rss_mb()
    stats["in_flight_end"] = len(in_flight(group))
    stats["registry_end"] = len(transport._registry)
    stats["workers_end"] = len(transport._workers)
    stats["threads_end"] = threading.active_count()
    stats["transport"] = ops.transport_kind(group)
    return stats


def with_transport(kind: str | None, fn, *args):  # type: ignore[no-untyped-def]
    """`fn(*args)` in a rank process with `OVERLAP_TRANSPORT=kind` (None: the default carrier)."""
    import os

    if kind is not None:
        os.environ["OVERLAP_TRANSPORT"] = kind
    try:
        return fn(*args)
    finally:
        os.environ.pop("OVERLAP_TRANSPORT", None)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--check-every", type=int, default=1, help="compare to the reference every k steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--transport", choices=("window", "gloo"), default=None, help="carrier (default: window)")
    args = parser.parse_args(argv)
    if EXPERTS % args.world:
        parser.error(f"--world must divide {EXPERTS}")
    with RankPool(args.world) as pool:  # a rank that raises, hangs or dies fails the run
        stats = pool.run(
            with_transport, args.transport, rank_loop, args.steps, args.seed, args.check_every, timeout_s=24 * 3600.0
        )
    print(
        f"soak: {args.steps} steps on {args.world} ranks over {stats[0]['transport']}, reference checked every "
        f"{args.check_every}"
    )
    print(
        "rank  seconds  ms/step  checked  mismatches  empty-recv  idle-experts  "
        "RSS first / warm / last MiB  growth after warm-up"
    )
    for s in stats:
        print(
            f"{s['rank']:>4}  {s['seconds']:7.1f}  {1e3 * s['seconds'] / s['steps']:7.2f}  {s['checked']:7d}  "
            f"{s['mismatches']:10d}  {s['empty_receives']:10d}  {s['idle_experts']:12d}  "
            f"{s['rss_first_mb']:7.1f} / {s['rss_warm_mb']:6.1f} / {s['rss_last_mb']:6.1f}  "
            f"{s['rss_last_mb'] - s['rss_warm_mb']:+.1f} MiB"
        )
        print(
            f"      in flight at end: {s['in_flight_end']}, workers {s['workers_start']} -> {s['workers_end']}, "
            f"threads {s['threads_start']} -> {s['threads_end']}"
        )
    if any(s["mismatches"] for s in stats):
        raise SystemExit("soak: outputs differ from the dense reference")
    return stats


if __name__ == "__main__":
    main()
