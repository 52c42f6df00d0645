"""overlap.moe's experts: one grouped GEMM per projection against the per-expert loop, on CPU.

The grouped path (`torch.nn.functional.grouped_mm` / `torch._grouped_mm`, offsets on the device)
must give what the loop gives within 1 ulp (torch 2.13 on this CPU: bit-equal in bf16 and fp16,
0.5 ulp apart in fp32), and both stay within the dtype's tolerance of the fp32 dense reference.
The loop stays as the fallback for torch without a grouped GEMM.
"""

from __future__ import annotations

import pytest
import torch

from overlap import moe
from overlap.numerics import compare

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
COUNTS = [
    pytest.param([5, 0, 17, 3], 40, id="irregular-with-empty-expert-and-tail"),
    pytest.param([0, 0, 0, 0], 8, id="no-rows"),
    pytest.param([64, 1, 1, 62], 128, id="full"),
    pytest.param([33], 33, id="one-expert"),
]


def _weights(num_experts: int, hidden: int, inter: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    gate = (torch.randn(num_experts, inter, hidden, generator=g) / hidden**0.5).to(dtype)
    up = (torch.randn(num_experts, inter, hidden, generator=g) / hidden**0.5).to(dtype)
    down = (torch.randn(num_experts, hidden, inter, generator=g) / inter**0.5).to(dtype)
    x = torch.randn(1, hidden, generator=g)
    return gate, up, down, x


def _dense(x: torch.Tensor, gate, up, down, counts: list[int]) -> torch.Tensor:
    """The fp32 reference: each expert's rows through its MLP in fp32, rows past the counts 0."""
    out = torch.zeros(x.shape[0], down.shape[1])
    start = 0
    for e, c in enumerate(counts):
        rows = slice(start, start + c)
        out[rows] = moe.gated_mlp(x[rows].float(), gate[e].float(), up[e].float(), down[e].float())
        start += c
    return out


@pytest.mark.skipif(not moe.has_grouped_mm(torch.device("cpu"), torch.bfloat16), reason="torch has no CPU grouped_mm")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("counts,rows", COUNTS)
def test_grouped_gemm_equals_the_expert_loop(dtype, counts, rows):
    gate, up, down, _ = _weights(len(counts), 64, 48, dtype)
    x = torch.randn(rows, 64, generator=torch.Generator().manual_seed(1)).to(dtype)
    x[sum(counts) :] = float("nan")  # rows past the counts are ignored, whatever they hold
    nums = torch.tensor(counts, dtype=torch.int64)
    grouped = moe.expert_mlps(x, gate, up, down, nums, implementation="grouped_mm")
    looped = moe.expert_mlps(x, gate, up, down, nums, implementation="loop")
    assert grouped.shape == looped.shape == (rows, 64) and grouped.dtype == dtype
    assert torch.equal(grouped[sum(counts) :], torch.zeros_like(grouped[sum(counts) :]))
    # Seen with torch 2.13 on this CPU: bit-equal in bf16 and fp16, up to 0.5 ulp apart in fp32 (the
    # kernel blocks the fp32 dot products differently). Never more than 1 ulp of the row's scale.
    between = compare(grouped, looped.double(), dtype, max_ulps=1.0)
    assert between.ok, f"grouped vs loop: {between}"
    dense = _dense(x, gate, up, down, counts)
    closeness = compare(grouped, dense, dtype)
    assert closeness.ok, str(closeness)


def test_the_layer_uses_the_grouped_gemm_and_reads_no_count_on_the_host(monkeypatch):
    """Where a host read would wait for a device (`simulate_device()` stands in for one here)."""
    from overlap.ops import staging

    from .test_staging import HostReads

    layer = _layer_without_group(monkeypatch, experts_implementation="auto")
    x = torch.randn(24, 1024, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    nums = torch.tensor([10, 0, 9, 5])
    with staging.simulate_device():
        assert moe.resolve_implementation("auto", x) == "grouped_mm"
        with HostReads() as reads:
            grouped = layer.moe_experts(x, torch.ones(24), nums)
    assert reads.log == []
    looped = moe.looped_gated_mlp(x, layer.gate, layer.up, layer.down, nums)
    assert torch.equal(grouped, looped)


def test_without_a_grouped_gemm_the_layer_loops(monkeypatch):
    """torch without grouped_mm (older than 2.8): "auto" takes the loop on a device, "grouped_mm" refuses."""
    from overlap.ops import staging

    monkeypatch.setattr(moe, "_GROUPED_MM", None)
    layer = _layer_without_group(monkeypatch, experts_implementation="auto")
    x = torch.randn(12, 1024, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    nums = torch.tensor([4, 4, 0, 4])
    calls = []
    real = moe.looped_gated_mlp
    monkeypatch.setattr(moe, "looped_gated_mlp", lambda *a: calls.append(1) or real(*a))
    with staging.simulate_device():
        out = layer.moe_experts(x, torch.ones(12), nums)
    assert calls == [1] and out.shape == (12, 1024)
    with pytest.raises(ValueError, match="implementation 'grouped_mm' needs torch's grouped GEMM"):
        moe.expert_mlps(x, layer.gate, layer.up, layer.down, nums, implementation="grouped_mm")


needs_packing = pytest.mark.skipif(not moe.can_pack(torch.bfloat16), reason="this CPU's oneDNN does not pack bf16")


@needs_packing
@pytest.mark.parametrize("counts,rows", COUNTS)
@pytest.mark.parametrize("hidden,inter", [(64, 48), (1024, 1000), (1536, 96)])
def test_packed_experts_equal_the_loop_bit_for_bit(counts, rows, hidden, inter):
    """Prepacked oneDNN weights, [gate; up] as one GEMM, each expert on its own rows only: the same
    bits as the loop (seen with torch 2.13 at several shapes); rows past the counts are 0."""
    gate, up, down, _ = _weights(len(counts), hidden, inter, torch.bfloat16)
    x = torch.randn(rows, hidden, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    x[sum(counts) :] = float("nan")
    nums = torch.tensor(counts, dtype=torch.int64)
    packed = moe.expert_mlps(x, gate, up, down, nums, implementation="packed")
    looped = moe.expert_mlps(x, gate, up, down, nums, implementation="loop")
    assert packed.shape == looped.shape == (rows, hidden) and packed.dtype == torch.bfloat16
    assert torch.equal(packed, looped)
    assert compare(packed, _dense(x, gate, up, down, counts), torch.bfloat16).ok


@needs_packing
def test_the_layer_packs_its_weights_once_and_again_when_they_change(monkeypatch):
    layer = _layer_without_group(monkeypatch, experts_implementation="auto", num_shared_experts=2)
    x = torch.randn(20, 1024, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    nums = torch.tensor([6, 0, 9, 5])
    assert moe.resolve_implementation("auto", x) == "packed"
    built = []
    real = moe.PackedExperts.__init__
    monkeypatch.setattr(moe.PackedExperts, "__init__", lambda self, *a, **k: built.append(1) or real(self, *a, **k))
    with torch.no_grad():
        first = layer.moe_experts(x, torch.ones(20), nums)
        shared = layer.moe_shared(x)
        assert torch.equal(layer.moe_experts(x, torch.ones(20), nums), first) and len(built) == 2  # kept
        assert torch.equal(first, moe.looped_gated_mlp(x, layer.gate, layer.up, layer.down, nums))
        w = list(layer.shared_experts)
        plain = sum(moe.gated_mlp(x, *w[i : i + 3]).float() for i in (0, 3)).to(torch.bfloat16)
        assert torch.equal(shared, plain)
        layer.down.mul_(2)  # new values: the packed copy is stale
        again = layer.moe_experts(x, torch.ones(20), nums)
    assert len(built) == 3
    assert torch.equal(again, moe.looped_gated_mlp(x, layer.gate, layer.up, layer.down, nums))


def test_packed_is_refused_where_it_cannot_run_and_auto_loops_under_autograd():
    gate, up, down, _ = _weights(2, 64, 32, torch.float16)
    x = torch.randn(4, 64).to(torch.float16)
    if not moe.can_pack(torch.float16):
        with pytest.raises(ValueError, match="implementation 'packed' needs bf16 cpu tensors"):
            moe.expert_mlps(x, gate, up, down, torch.tensor([2, 2]), implementation="packed")
    gate, up, down, _ = _weights(2, 64, 32, torch.bfloat16)
    gate.requires_grad_(True)
    assert moe.resolve_implementation("auto", x.bfloat16(), gate, up, down) == "loop"  # no backward when packed
    with torch.no_grad():
        assert moe.resolve_implementation("auto", x.bfloat16(), gate, up, down) == (
            "packed" if moe.can_pack(torch.bfloat16) else "loop"
        )


def test_bad_experts_implementation_is_refused(monkeypatch):
    with pytest.raises(ValueError, match="experts_implementation must be one of .*got 'fast'"):
        _layer_without_group(monkeypatch, experts_implementation="fast")
    gate, up, down, _ = _weights(2, 8, 8, torch.float32)
    with pytest.raises(ValueError, match="implementation must be one of .*got 'x'"):
        moe.expert_mlps(torch.zeros(2, 8), gate, up, down, torch.tensor([1, 1]), implementation="x")


def _layer_without_group(monkeypatch, **kwargs) -> moe.MoELayer:
    """A 4-expert layer of a one-rank group, built without torch.distributed (only moe_experts runs)."""
    import torch.distributed as dist

    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 1)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    return moe.MoELayer(1024, 4, 2, 256, group=object(), seed=7, **kwargs)  # type: ignore[arg-type]
