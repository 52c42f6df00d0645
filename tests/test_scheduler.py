"""The scheduler context over real gloo ranks: the pipelined layer equals the plain layer (and the
dense single-process reference), the plan interleaves microbatches as documented, and every rank
builds the same plan."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import overlap
from overlap.errors import HandleError
from overlap.scheduler import PIPELINE_STEP, microbatch_count


def _layer_case(m: int, tokens: tuple[int, ...], shared: int, quant: int, experts: int = 4, top_k: int = 2) -> dict:
    rank = dist.get_rank()
    layer = overlap.MoELayer(1024, experts, top_k, 256, num_shared_experts=shared, quant_mode=quant, seed=5)
    x = torch.randn(tokens[rank], 1024, generator=torch.Generator().manual_seed(rank)).to(torch.bfloat16)
    plain = layer(x)
    with overlap.scheduler(microbatches=m) as s:
        out = layer(x)
    steps = [str(step.node) for step in s.plan.steps]
    return {"plain": plain, "out": out, "dense": layer.dense_forward(x), "fingerprint": s.plan.fingerprint(),
            "steps": steps, "report": s.report()}


@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("shared,quant", [(0, 0), (1, 0), (2, 2)], ids=["routed", "shared", "two-shared-int8"])
def test_wrapped_layer_equals_plain_layer(rank_pools, m, shared, quant):
    results = rank_pools(2).run(_layer_case, m, (160, 130), shared, quant)
    for res in results:
        # Same arithmetic row by row, so equal bit for bit.
        assert torch.equal(res["out"], res["plain"])
        if quant == 0:
            # bf16 GEMMs of other batch compositions: within 2 bf16 ulps of O(1) values.
            torch.testing.assert_close(res["out"].float(), res["dense"].float(), rtol=1.6e-2, atol=1.6e-2)
    assert results[0]["fingerprint"] == results[1]["fingerprint"]
    count = microbatch_count(160, m, 32)
    assert sum(s.startswith("dispatch_setup@") for s in results[0]["steps"]) == count


def test_four_ranks_uneven_batches_and_long_prefill(rank_pools):
    results = rank_pools(4).run(_layer_case, 2, (600, 40, 3, 300), 1, 0, 8, 3)
    for res in results:
        assert torch.equal(res["out"], res["plain"])
    assert len({r["fingerprint"] for r in results}) == 1
    # 600 tokens on the largest rank: ceil(600 / 512) = 2 microbatches of 300 (padded) each.
    assert sum(s.startswith("dispatch_setup@") for s in results[0]["steps"]) == 2


def test_plan_interleaves_microbatches(rank_pools):
    steps = rank_pools(2).run(_layer_case, 2, (128, 128), 1, 0)[0]["steps"]
    pos = {s: i for i, s in enumerate(steps)}
    # mb1's dispatch is issued before mb0's dispatch is waited for, mb0's combine before mb1's experts,
    # and the shared experts of the last microbatch run while its combine travels.
    assert pos["dispatch_setup@mb1.l0"] < pos["dispatch_teardown@mb0.l0"]
    assert pos["combine_setup@mb0.l0"] < pos["experts@mb1.l0"]
    assert pos["combine_setup@mb1.l0"] < pos["shared@mb1.l0"] < pos["combine_teardown@mb1.l0"]
    assert pos["dispatch_setup@mb0.l0"] < pos["shared@mb0.l0"] < pos["experts@mb0.l0"]


def test_microbatch_rule():
    assert microbatch_count(10, 4, 32) == 1  # too small to split
    assert microbatch_count(64, 4, 32) == 2
    assert microbatch_count(1000, 1, 32) == 2  # never more than 512 tokens a call
    assert microbatch_count(256, 4, 0) == 4
    assert [name for name, _ in PIPELINE_STEP][:2] == ["route", "dispatch_setup"]
    with pytest.raises(ValueError, match=r"microbatches must be an int >= 1, got 0"):
        overlap.scheduler(microbatches=0)


def _leak_case() -> str:
    from overlap import ops

    rank, world = dist.get_rank(), dist.get_world_size()
    g = dist.group.WORLD.group_name
    x = torch.randn(4, 1024).to(torch.bfloat16)
    ids = torch.tensor([[0, 1]] * 4, dtype=torch.int32)
    try:
        with overlap.scheduler():
            y, _, cmd = ops.dispatch_setup(x, ids, g, world, rank, 2)
    except HandleError as exc:
        message = str(exc)
    else:
        message = "no error"
    ops.dispatch_teardown(x, y, ids, cmd, g, world, rank, 2)  # the group is still usable
    return message


def test_setup_left_in_flight_at_exit_raises(rank_pools):
    for message in rank_pools(2).run(_leak_case):
        assert "setups never torn down" in message
