"""The scheduler's int8 (quant_mode 2) cases against an independent single-process reference
(`tests/reference.moe_layer_reference`: the contract's quantisation written out, every expert in
one process), not against the library's own serial path. The GEMMs see other batch compositions
than in the split run, so the tolerance is that of bf16 GEMMs: 2 bf16 ulps of O(1) values."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import overlap

from .reference import moe_layer_reference

TOL = 1.6e-2  # 2 bf16 ulps at 1 (2 · 2^-7)


def _int8_case(m: int, tokens: tuple[int, ...], shared: int) -> dict:
    rank = dist.get_rank()
    layer = overlap.MoELayer(1024, 4, 2, 256, num_shared_experts=shared, quant_mode=2, seed=5)
    x = torch.randn(tokens[rank], 1024, generator=torch.Generator().manual_seed(rank)).to(torch.bfloat16)
    with overlap.scheduler(microbatches=m):
        out = layer(x)
    return {"out": out, "reference": moe_layer_reference(layer, x)}


@pytest.mark.parametrize("m,shared", [(1, 0), (2, 2), (3, 1)], ids=["m1-routed", "m2-two-shared", "m3-shared"])
def test_int8_scheduler_equals_the_independent_reference(rank_pools, m, shared):
    for rank, res in enumerate(rank_pools(2).run(_int8_case, m, (160, 130), shared)):
        torch.testing.assert_close(
            res["out"].float(),
            res["reference"].float(),
            rtol=TOL,
            atol=TOL,
            msg=lambda text, rank=rank: f"rank {rank}: {text}",
        )


def test_reference_quantisation_matters():
    """The reference is sensitive to the int8 step: with quantisation off it differs by more than the
    tolerance somewhere, so a scheduler that skipped or mis-scaled quantisation would fail above."""

    class Layer:  # the fields moe_layer_reference reads, without a process group
        seed, num_experts, num_shared_experts, hidden_size, intermediate_size = 5, 4, 0, 1024, 256
        dtype, top_k = torch.bfloat16, 2

    x = torch.randn(64, 1024, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    q, f = Layer(), Layer()
    q.quant_mode, f.quant_mode = 2, 0
    with pytest.raises(AssertionError, match="Mismatched elements"):
        torch.testing.assert_close(
            moe_layer_reference(q, x).float(), moe_layer_reference(f, x).float(), rtol=TOL, atol=TOL
        )
