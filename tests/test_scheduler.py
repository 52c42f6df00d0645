"""The scheduler context over real gloo ranks: the pipelined layer equals the plain layer (and the
dense single-process reference), the plan interleaves microbatches as documented, and every rank
builds the same plan."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.distributed as dist

import overlap
from overlap.errors import HandleError
from overlap.pipeline import TWO_BATCH, split


@contextlib.contextmanager
def _linear_rounding_per_row_count(enabled: bool):
    """Make bf16 GEMMs round differently per row count, as on an AMX host: F.linear's result is moved
    one bf16 ulp up when its input has an odd number of rows (in this rank process, for the block)."""
    import torch.nn.functional as F

    from overlap import moe

    real, real_packed = F.linear, moe._linear_pointwise

    def perturbed(gemm):
        def run(x, *args):
            out = gemm(x, *args)
            if out.dtype == torch.bfloat16 and x.shape[0] % 2:
                out = torch.nextafter(out, torch.full_like(out, float("inf")))
            return out

        return run

    # Both GEMM paths of the layer: F.linear, and the prepacked one of the CPU experts.
    F.linear = perturbed(real) if enabled else real
    moe._linear_pointwise = (lambda: perturbed(real_packed())) if enabled else real_packed  # type: ignore[assignment]
    try:
        yield
    finally:
        F.linear, moe._linear_pointwise = real, real_packed


def _layer_case(
    m: int, tokens: tuple[int, ...], shared: int, quant: int, experts: int = 4, top_k: int = 2, perturb: bool = False
) -> dict:
    from overlap.numerics import compare

    with _linear_rounding_per_row_count(perturb):
        return _layer_run(m, tokens, shared, quant, experts, top_k, compare)


def _layer_run(m, tokens, shared, quant, experts, top_k, compare) -> dict:
    rank = dist.get_rank()
    layer = overlap.MoELayer(1024, experts, top_k, 256, num_shared_experts=shared, quant_mode=quant, seed=5)
    x = torch.randn(tokens[rank], 1024, generator=torch.Generator().manual_seed(rank)).to(torch.bfloat16)
    plain = layer(x)
    with overlap.scheduler(microbatches=m) as s:
        out = layer(x)
    steps = [str(step.node) for step in s.plan.steps]
    dense = layer.dense_forward(x, dtype=torch.float32)
    return {
        "plain": plain,
        "out": out,
        "vs_dense": compare(out, dense),
        "plain_vs_dense": compare(plain, dense),
        "fingerprint": s.plan.fingerprint(),
        "steps": steps,
        "report": s.report(),
    }


@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("shared,quant", [(0, 0), (1, 0), (2, 2)], ids=["routed", "shared", "two-shared-int8"])
def test_wrapped_layer_equals_plain_layer(rank_pools, m, shared, quant):
    results = rank_pools(2).run(_layer_case, m, (160, 130), shared, quant)
    for res in results:
        # Split differently (microbatches vs one batch): both within the dtype's tolerance of the
        # dense fp32 reference, never required to be bit-equal (GEMMs round per row count).
        assert res["vs_dense"].ok, str(res["vs_dense"])
        assert res["plain_vs_dense"].ok, str(res["plain_vs_dense"])
    assert results[0]["fingerprint"] == results[1]["fingerprint"]
    # 160 tokens on the largest rank, 32 at least per microbatch: up to 5 microbatches.
    assert sum(s.startswith("dispatch_setup@") for s in results[0]["steps"]) == m


def test_four_ranks_uneven_batches_and_long_prefill(rank_pools):
    results = rank_pools(4).run(_layer_case, 2, (600, 40, 3, 300), 1, 0, 8, 3)
    for res in results:
        assert res["vs_dense"].ok, str(res["vs_dense"])
    assert len({r["fingerprint"] for r in results}) == 1
    # 600 tokens on the largest rank: ceil(600 / 512) = 2 microbatches of 300 (padded) each.
    assert sum(s.startswith("dispatch_setup@") for s in results[0]["steps"]) == 2


def test_split_layer_passes_where_gemms_round_per_row_count(rank_pools):
    # 131 and 97 tokens: odd and even microbatches, so the perturbed GEMMs round differently in the
    # pipelined and the serial run. Both stay within tolerance of the dense reference.
    results = rank_pools(2).run(_layer_case, 2, (131, 97), 1, 0, perturb=True)
    for res in results:
        assert res["vs_dense"].ok and res["plain_vs_dense"].ok, (str(res["vs_dense"]), str(res["plain_vs_dense"]))
    assert any(not torch.equal(r["out"], r["plain"]) for r in results)  # the perturbation did bite


def _wrong_weight_case() -> dict:
    from overlap.numerics import compare

    rank = dist.get_rank()
    layer = overlap.MoELayer(1024, 4, 2, 256, seed=5)
    x = torch.randn(64, 1024, generator=torch.Generator().manual_seed(rank)).to(torch.bfloat16)
    dense = layer.dense_forward(x, dtype=torch.float32)
    with torch.no_grad():
        layer.down[0].mul_(1.05)  # a real error: 5 % off in one expert
    with overlap.scheduler() as s:
        out = layer(x)
    return {"ok": compare(out, dense).ok, "ran": len(s.plans)}


def test_tolerance_still_catches_a_real_error(rank_pools):
    for res in rank_pools(2).run(_wrong_weight_case):
        assert res["ran"] == 1 and not res["ok"]


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
    assert (split(10, 4, 32).count, split(10, 4, 32).size) == (1, 10)  # too small to split
    assert (split(64, 4, 32).count, split(64, 4, 32).size) == (2, 32)
    assert (split(1000, 1, 32).count, split(1000, 1, 32).size) == (2, 500)  # never more than 512 tokens a call
    assert (split(256, 4, 0).count, split(256, 4, 0).size) == (4, 64)
    assert (split(2048, 2, 32).count, split(2048, 2, 32).size) == (4, 512)
    assert (split(1100, 2, 32).count, split(1100, 2, 32).size) == (3, 367)
    assert (split(0, 2, 32).count, split(1, 2, 32).count) == (0, 1)
    assert TWO_BATCH.order(2) == [
        ("route", 0),
        ("dispatch_setup", 0),
        ("shared", 0),
        ("route", 1),
        ("dispatch_setup", 1),
        ("dispatch_teardown", 0),
        ("experts", 0),
        ("combine_setup", 0),
        ("dispatch_teardown", 1),
        ("experts", 1),
        ("combine_setup", 1),
        ("combine_teardown", 0),
        ("shared", 1),
        ("combine_teardown", 1),
    ]
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
                out[start : start + c] = (expand_x[start : start + c].float() * self.a[g] + self.b[g]).to(x.dtype)
                start += c
            qx, cmd2 = ops.combine_setup(out, ids, assist, *args, **kw)
            x = ops.combine_teardown(out, qx, ids, expand_idx, w, cmd2, *args, **kw)
        return x


def _op_layer_case(m: int, tokens: tuple[int, ...], num_layers: int, min_tokens: int = 32) -> dict:
    rank = dist.get_rank()
    layer = OpCallingLayer(num_layers=num_layers)
    x = torch.randn(tokens[rank], 1024, generator=torch.Generator().manual_seed(rank)).to(torch.bfloat16)
    plain = layer(x)
    with overlap.scheduler(microbatches=m, min_tokens=min_tokens) as s:
        out = overlap.wrap(layer)(x)
    return {"equal": torch.equal(plain, out), "steps": s.recording.order(), "left": len(overlap.ops.in_flight())}


@pytest.mark.parametrize("m,num_layers", [(1, 1), (2, 1), (2, 2), (4, 2)])
def test_unmodified_op_calling_layer_is_pipelined_and_unchanged(rank_pools, m, num_layers):
    results = rank_pools(2).run(_op_layer_case, m, (130, 97), num_layers)
    for res in results:
        assert res["equal"] and res["left"] == 0
    ops_only = [[s for s in r["steps"] if not s.startswith("compute")] for r in results]
    assert ops_only[0] == ops_only[1]  # every rank made the same op calls in the same order
    steps = results[0]["steps"]
    count = min(m, 4)  # 130 tokens on the largest rank: at most 130 // 32 = 4 microbatches
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
    return {"equal": torch.equal(plain, out), "steps": s.recording.order()}


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
    return {"equal": torch.equal(plain, out), "steps": s.recording.order(), "comm_busy": s.report().comm_busy}


def test_unwrapped_op_calls_in_a_context_are_recorded(rank_pools):
    for res in rank_pools(2).run(_unwrapped_case):
        assert res["equal"] and res["comm_busy"] > 0
        ops_run = [s.split("@")[0] for s in res["steps"] if not s.startswith("compute")]
        assert ops_run == ["dispatch_setup", "dispatch_teardown", "combine_setup", "combine_teardown"]


def _op_layer_reference(layer: OpCallingLayer, x: torch.Tensor) -> torch.Tensor:
    """The op-calling layer computed densely in one process: for each token, its K experts'
    elementwise outputs (rounded to x's dtype, as the experts return them), summed in fp32 with the
    routing weights in k order, then one cast: what combine_teardown does, bit for bit."""
    w, ids = torch.topk(torch.softmax(x.float() @ layer.router.t(), -1), layer.top_k, -1)
    acc = torch.zeros(x.shape, dtype=torch.float32)
    for k in range(layer.top_k):
        e = ids[:, k]
        acc += w[:, k : k + 1] * (x.float() * layer.a[e] + layer.b[e]).to(x.dtype).float()
    return acc.to(x.dtype)


def _long_batch_case(tokens: tuple[int, ...], m: int) -> dict:
    rank = dist.get_rank()
    layer = OpCallingLayer()
    x = torch.randn(tokens[rank], 1024, generator=torch.Generator().manual_seed(rank)).to(torch.bfloat16)
    with overlap.scheduler(microbatches=m) as s:
        out = overlap.wrap(layer)(x)
    setups = sum(name.startswith("dispatch_setup") for name in s.recording.order())
    return {
        "equal": torch.equal(out, _op_layer_reference(layer, x)),
        "rows": out.shape[0],
        "setups": setups,
        "left": len(overlap.ops.in_flight()),
    }


@pytest.mark.parametrize(
    "tokens,setups", [((2048, 1600), 4), ((40, 1100), 3), ((0, 700), 2)], ids=["2048-1600", "40-1100", "0-700"]
)
def test_wrapped_layer_never_sends_more_than_512_rows(rank_pools, tokens, setups):
    # The largest rank's batch sets the cut: ceil(T / 512) microbatches at least, every rank padded
    # to the same count (a rank with 40 or 0 tokens runs the same exchanges with zero rows).
    results = rank_pools(2).run(_long_batch_case, tokens, 2, timeout_s=300)
    for rank, res in enumerate(results):
        assert res["equal"] and res["rows"] == tokens[rank] and res["left"] == 0
        assert res["setups"] == setups


def test_a_device_plan_runs_on_the_callers_stream(monkeypatch):
    """The CPU twin of the device-time fix: on cpu every plan stream is the calling thread (the host
    stream; the defaults, None, when CPU_ON_CALLER is off); on a device every plan stream is the
    caller's current stream, whose timing events time each node."""
    from overlap import streams
    from overlap.graph import Graph
    from overlap.pipeline import planned

    g = Graph()
    g.add("route@mb0", lambda inputs: None)
    g.add("dispatch_setup@mb0", lambda inputs: None, after=["route@mb0"], kind="comm_issue")
    g.add("dispatch_teardown@mb0", lambda inputs: None, after=["dispatch_setup@mb0"], kind="comm_wait")
    plan = g.plan()
    on_cpu = planned.streams_for(plan, torch.device("cpu"))
    assert on_cpu == {name: streams.host_stream() for name in plan.streams}
    monkeypatch.setattr(planned, "CPU_ON_CALLER", False)
    assert planned.streams_for(plan, torch.device("cpu")) is None
    asked = []
    monkeypatch.setattr(streams, "current_stream", lambda device=None: asked.append(device) or "the caller's stream")
    chosen = planned.streams_for(plan, torch.device("cuda", 0))
    assert chosen == {name: "the caller's stream" for name in plan.streams} and len(plan.streams) == 3
    assert asked == [torch.device("cuda", 0)]


def _streams_asked_case() -> list[str]:
    from overlap.pipeline import planned

    real, asked = planned.streams_for, []
    planned.streams_for = lambda plan, device: asked.append(str(device)) or real(plan, device)
    try:
        layer = overlap.MoELayer(1024, 4, 2, 256, seed=5)
        with overlap.scheduler(microbatches=2):
            layer(torch.randn(64, 1024).to(torch.bfloat16))
    finally:
        planned.streams_for = real
    return asked


def test_the_scheduler_runs_each_plan_on_its_input_device(rank_pools):
    assert rank_pools(2).run(_streams_asked_case) == [["cpu"], ["cpu"]]
