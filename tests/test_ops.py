"""The four ops chained over real gloo ranks equal the dense single-process reference, bit for bit
(elementwise experts make every output row depend on its input row only, so no tolerance is
needed); plus the shapes and dtypes of every output and the fire-and-forget behaviour."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from .gates import LinkGates
from .reference import Case, build, dense_reference, run_case

CASES = [
    pytest.param(Case(world=2, batches=(4, 4)), id="w2-plain"),
    pytest.param(Case(world=2, batches=(5, 5), use_shared_x=True), id="w2-shared_expert_x"),
    pytest.param(Case(world=2, batches=(4, 4), shared_num=0, hidden=2048), id="w2-no-shared-h2048"),
    pytest.param(Case(world=2, batches=(3, 6), global_bs=12), id="w2-uneven-bs"),
    pytest.param(Case(world=2, batches=(4, 4), token_nums_type=0), id="w2-cumulative-token-nums"),
    pytest.param(Case(world=2, batches=(6, 6), top_k=1), id="w2-k1"),
    pytest.param(Case(world=2, batches=(4, 4), experts=16, top_k=8), id="w2-k8"),
    pytest.param(Case(world=2, batches=(4, 4), quant=2), id="w2-int8"),
    pytest.param(Case(world=2, batches=(4, 4), quant=2, with_scales=True), id="w2-int8-scales"),
    pytest.param(Case(world=2, batches=(5, 5), active=(3, 0)), id="w2-active-mask-empty-rank"),
    pytest.param(Case(world=2, batches=(4, 4), dtype=torch.float16), id="w2-fp16"),
    pytest.param(Case(world=4, batches=(4,) * 4, shared_ranks=2, experts=4), id="w4-shared-ranks-R2"),
    pytest.param(Case(world=4, batches=(3,) * 4, shared_ranks=2, shared_num=2, experts=4), id="w4-two-shared-experts"),
    pytest.param(Case(world=4, batches=(2, 7, 1, 5), global_bs=28, experts=8, top_k=3), id="w4-uneven"),
    pytest.param(Case(world=4, batches=(4,) * 4, skip_ranks=(2,)), id="w4-rank-receives-nothing"),
    pytest.param(
        Case(world=4, batches=(4,) * 4, shared_ranks=2, quant=2, with_scales=True, experts=4),
        id="w4-shared-int8-scales",
    ),
    pytest.param(Case(world=8, batches=(3,) * 8, experts=16, top_k=4), id="w8-plain"),
    pytest.param(
        Case(
            world=8,
            batches=(2, 3, 1, 4, 2, 3, 4, 1),
            global_bs=32,
            shared_ranks=4,
            shared_num=2,
            experts=8,
            top_k=2,
            quant=2,
        ),
        id="w8-shared-uneven-int8",
    ),
]


def _expected_counts(case: Case, rank: int) -> torch.Tensor:
    """Rows rank `rank` should receive per local expert, from the routing alone."""
    p = build(case)
    if rank < case.shared_ranks:
        replicas = case.shared_ranks // case.shared_num
        return torch.tensor(
            [sum((case.active or case.batches)[r] for r in range(case.world) if r % replicas == rank % replicas)]
        )
    lo = (rank - case.shared_ranks) * case.local_experts
    counts = torch.zeros(case.local_experts, dtype=torch.int64)
    for r, ids in enumerate(p["ids"]):
        n = ids.shape[0] if case.active is None else case.active[r]
        for e in ids[:n].flatten().tolist():
            if lo <= e < lo + case.local_experts:
                counts[e - lo] += 1
    return counts


@pytest.mark.parametrize("case", CASES)
def test_chain_equals_dense_reference(rank_pools, case):
    results = rank_pools(case.world).run(run_case, case)
    reference = dense_reference(case)
    g = case.global_bs or case.batches[0] * case.world
    for rank, res in enumerate(results):
        assert torch.equal(res["x_out"], reference[rank]), f"rank {rank} differs from the dense reference"
        counts = _expected_counts(case, rank)
        token_nums = res["expert_token_nums"]
        assert token_nums.dtype == torch.int64
        assert torch.equal(token_nums, counts if case.token_nums_type == 1 else torch.cumsum(counts, 0))
        bs, k = case.batches[rank], case.top_k
        is_shared = rank < case.shared_ranks
        local = 1 if is_shared else case.local_experts
        a = -(-g * case.shared_num // case.shared_ranks) if is_shared else g * min(local, k)
        assert res["expand_x_shape"] == (a, case.hidden)
        row = -(-(-(-case.hidden // 32) * 32 + 4) // 512) * 512 if case.quant == 2 else -(-case.hidden // 256) * 256
        assert res["y_shape"] == (bs * (k + case.shared_num), row)
        assert res["y_dtype"] == (torch.int8 if case.quant == 2 else case.dtype)
        assert res["cmd_shapes"] == (
            ((bs * (k + case.shared_num) + case.world * local) * 16,),
            ((a + case.world) * 16,),
        )
        q_width = -(-(-(-case.hidden // 32) * 32 + -(-case.hidden // 8) * 8 // 8 * 4) // 512) * 512
        assert res["quant_shape"] == (a, q_width)
        # assist_info: inclusive cumulative counts per (local expert, source rank) block.
        assert int(res["assist"][-1]) == int(counts.sum()) == res["received"]
        assert bool((torch.diff(res["assist"].long()) >= 0).all())


def _expand_idx_case(case: Case) -> list[torch.Tensor]:
    from overlap.ops import dispatch_setup, dispatch_teardown

    rank, world = dist.get_rank(), dist.get_world_size()
    p = build(case)
    g = dist.group.WORLD.group_name
    x, ids = p["x"][rank], p["ids"][rank]
    y, expand_idx, cmd = dispatch_setup(x, ids, g, world, rank, case.experts)
    dispatch_teardown(x, y, ids, cmd, g, world, rank, case.experts)
    return expand_idx


def test_expand_idx_counts_earlier_entries_to_the_same_expert(rank_pools):
    case = Case(world=2, batches=(6, 6), experts=4, top_k=3, seed=3)
    results = rank_pools(2).run(_expand_idx_case, case)
    p = build(case)
    for rank, expand_idx in enumerate(results):
        flat = p["ids"][rank].flatten().tolist()
        expected = [flat[:i].count(e) for i, e in enumerate(flat)]
        assert expand_idx.dtype == torch.int32 and expand_idx.tolist() == expected


def _in_flight_case(case: Case) -> dict:
    """Setup returns while its transfer is held open on the link (a gate, not a time); dropping and
    overwriting every caller tensor before the teardowns leaves the result unchanged."""
    from overlap import ops

    gates = LinkGates(hold={0, 1})  # exchange 0: the dispatch, 1: the combine
    ops.configure(link=gates.link())
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        p = build(case)
        g = dist.group.WORLD.group_name
        x, ids = p["x"][rank].clone(), p["ids"][rank].clone()
        y, expand_idx, cmd = ops.dispatch_setup(x, ids, g, world, rank, case.experts)
        was_in_flight = [not t.is_complete for t in ops.in_flight(g)]
        x.fill_(7.0)  # overwrite the caller's tokens and the staging buffer: the send keeps its copy
        y.fill_(0)
        del x
        gates.release(0)
        expand_x, _, assist, nums = ops.dispatch_teardown(p["x"][rank], y, ids, cmd, g, world, rank, case.experts)
        out = torch.zeros_like(expand_x)
        start = 0
        for local, c in enumerate(nums.tolist()):
            e = rank * case.local_experts + local
            out[start : start + c] = (expand_x[start : start + c].float() * p["a"][e] + p["b"][e]).to(case.dtype)
            start += c
        qx, cmd2 = ops.combine_setup(out, ids, assist, g, world, rank, case.experts)
        combine_in_flight = [not t.is_complete for t in ops.in_flight(g)]
        out.fill_(3.0)  # expand_x may be reused as soon as combine_setup returns
        gates.release(1)
        x_out = ops.combine_teardown(out, qx, ids, expand_idx, p["weights"][rank], cmd2, g, world, rank, case.experts)
        return {
            "in_flight": was_in_flight,
            "combine_in_flight": combine_in_flight,
            "x_out": x_out,
            "remaining": len(ops.in_flight(g)),
            "expired": gates.expired,
        }
    finally:
        gates.release_all()
        ops.configure(link=None)


def test_setup_returns_before_the_transfer_lands_and_owns_its_buffers(rank_pools):
    case = Case(world=2, batches=(4, 4))
    results = rank_pools(2).run(_in_flight_case, case)
    reference = dense_reference(case)
    for rank, res in enumerate(results):
        # Each setup returned while its gate was closed: the transfer could not have landed yet.
        assert res["in_flight"] == [True] and res["combine_in_flight"] == [True]
        assert res["expired"] == []  # no setup waited for its own transfer
        assert res["remaining"] == 0
        assert torch.equal(res["x_out"], reference[rank])


def _await_case(case: Case) -> dict:
    """An in-flight transfer is awaitable under asyncio without blocking the event loop: while one
    task awaits the held transfer, another task on the same loop runs and opens the gate."""
    import asyncio

    from overlap import ops

    gates = LinkGates(hold={0})
    ops.configure(link=gates.link())
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        p = build(case)
        g = dist.group.WORLD.group_name
        x, ids = p["x"][rank], p["ids"][rank]

        async def main() -> dict:
            y, _, cmd = ops.dispatch_setup(x, ids, g, world, rank, case.experts)
            handle = ops.transfer_of(cmd)
            seen = {}

            async def opener() -> None:
                await asyncio.sleep(0)
                seen["pending_while_loop_ran"] = not waiter.done() and not handle.is_complete
                gates.release(0)

            async def wait() -> None:
                await handle

            waiter = asyncio.ensure_future(wait())
            await asyncio.gather(waiter, opener())
            seen["landed"] = handle.is_complete
            ops.dispatch_teardown(x, y, ids, cmd, g, world, rank, case.experts)
            return seen

        seen = asyncio.run(main())
        seen["expired"] = gates.expired
        return seen
    finally:
        gates.release_all()
        ops.configure(link=None)


def test_transfer_handles_are_awaitable_without_blocking_the_loop(rank_pools):
    for res in rank_pools(2).run(_await_case, Case(world=2, batches=(4, 4))):
        assert res == {"pending_while_loop_ran": True, "landed": True, "expired": []}
