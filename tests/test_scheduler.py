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


class OpCallingLayer(torch.nn.Module):
    """An MoE layer written against the ops directly, as a user would (no protocol): softmax top-K
    router, elementwise experts, `num_layers` MoE layers chained in one forward."""

    def __init__(self, experts: int = 4, top_k: int = 2, hidden: int = 1024, num_layers: int = 1) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.experts, self.top_k, self.num_layers = experts, top_k, num_layers
        self.router = torch.randn(experts, hidden, generator=g)
        self.a, self.b = torch.randn(experts, hidden, generator=g), torch.randn(experts, hidden, generator=g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from overlap import ops

        rank, world, group = dist.get_rank(), dist.get_world_size(), dist.group.WORLD.group_name
        args, kw = (group, world, rank, self.experts), dict(global_bs=512 * world)
        local = self.experts // world
        for _ in range(self.num_layers):
            w, ids = torch.topk(torch.softmax(x.float() @ self.router.t(), -1), self.top_k, -1)
            ids = ids.to(torch.int32)
            y, expand_idx, cmd = ops.dispatch_setup(x, ids, *args, **kw)
            expand_x, _, assist, nums = ops.dispatch_teardown(x, y, ids, cmd, *args, **kw)
            out, start = torch.zeros_like(expand_x), 0
            for e, c in enumerate(nums.tolist()):
                g = rank * local + e
                out[start:start + c] = (expand_x[start:start + c].float() * self.a[g] + self.b[g]).to(x.dtype)
                start += c
            qx, cmd2 = ops.combine_setup(out, ids, assist, *args, **kw)
            x = ops.combine_teardown(out, qx, ids, expand_idx, w, cmd2, *args, **kw)
        return x


def _op_layer_case(m: int, tokens: tuple[int, ...], num_layers: int, min_tokens: int = 32) -> dict:
    from overlap.scheduler import wrap

    rank = dist.get_rank()
    layer = OpCallingLayer(num_layers=num_layers)
    x = torch.randn(tokens[rank], 1024, generator=torch.Generator().manual_seed(rank)).to(torch.bfloat16)
    plain = layer(x)
    with overlap.scheduler(microbatches=m, min_tokens=min_tokens) as s:
        out = wrap(layer)(x)
    return {"equal": torch.equal(plain, out), "steps": [str(step.node) for step in s.plan.steps],
            "fingerprint": s.plan.fingerprint(), "left": len(overlap.ops.in_flight())}


@pytest.mark.parametrize("m,num_layers", [(1, 1), (2, 1), (2, 2), (4, 2)])
def test_unmodified_op_calling_layer_is_pipelined_and_unchanged(rank_pools, m, num_layers):
    results = rank_pools(2).run(_op_layer_case, m, (130, 97), num_layers)
    for res in results:
        assert res["equal"] and res["left"] == 0
    assert results[0]["fingerprint"] == results[1]["fingerprint"]
    steps = results[0]["steps"]
    count = min(m, 97 // 32)
    assert sum(s.startswith("dispatch_setup@") for s in steps) == count * num_layers
    if count > 1:
        pos = {s: i for i, s in enumerate(steps)}
        # mb1's dispatch is issued before mb0 waits for its own; mb0's combine travels during mb1's experts.
        assert pos["dispatch_setup@mb1.l0"] < pos["dispatch_teardown@mb0.l0"]
        assert pos["combine_setup@mb0.l0"] < pos["dispatch_teardown@mb1.l0"] < pos["combine_teardown@mb0.l0"]


def test_op_calling_layer_respects_the_in_flight_budget(rank_pools):
    # Four microbatches: a fifth-in-line dispatch would exceed the double buffer; the fibers wait
    # their turn instead of raising.
    results = rank_pools(2).run(_op_layer_case, 4, (64, 64), 1, 0)
    for res in results:
        assert res["equal"] and res["left"] == 0
    assert sum(s.startswith("dispatch_setup@") for s in results[0]["steps"]) == 4


class TwoMoELayers(torch.nn.Module):
    """A model-like module: two reference MoE layers with a token-wise op between them."""

    def __init__(self) -> None:
        super().__init__()
        self.first = overlap.MoELayer(1024, 4, 2, 256, num_shared_experts=1, seed=3)
        self.second = overlap.MoELayer(1024, 4, 1, 256, seed=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.tanh(self.first(x)))


def _model_case(tokens: tuple[int, ...]) -> dict:
    rank = dist.get_rank()
    model = TwoMoELayers()
    x = torch.randn(tokens[rank], 1024, generator=torch.Generator().manual_seed(rank)).to(torch.bfloat16)
    plain = model(x)
    with overlap.scheduler(microbatches=2) as s:
        out = overlap.wrap(model)(x)
    return {"equal": torch.equal(plain, out), "steps": [str(step.node) for step in s.plan.steps]}


def test_module_holding_protocol_layers_runs_as_fibers(rank_pools):
    """Protocol layers called inside fibers use the plain op sequence (no extra collective while
    another microbatch's exchange is in flight); the two layers of each microbatch interleave."""
    results = rank_pools(2).run(_model_case, (96, 80))
    for res in results:
        assert res["equal"]
    pos = {s: i for i, s in enumerate(results[0]["steps"])}
    assert pos["dispatch_setup@mb1.l1"] < pos["dispatch_teardown@mb0.l1"]


def _unwrapped_case() -> dict:
    rank = dist.get_rank()
    layer = OpCallingLayer()
    x = torch.randn(64, 1024, generator=torch.Generator().manual_seed(rank)).to(torch.bfloat16)
    plain = layer(x)
    with overlap.scheduler() as s:
        out = layer(x)  # not wrapped: runs as written, recorded
    return {"equal": torch.equal(plain, out), "steps": [str(step.node) for step in s.plan.steps],
            "comm_busy": s.report().comm_busy}


def test_unwrapped_op_calls_in_a_context_are_recorded(rank_pools):
    for res in rank_pools(2).run(_unwrapped_case):
        assert res["equal"] and res["comm_busy"] > 0
        ops_run = [s.split("@")[0] for s in res["steps"] if not s.startswith("compute")]
        assert ops_run == ["dispatch_setup", "dispatch_teardown", "combine_setup", "combine_teardown"]
