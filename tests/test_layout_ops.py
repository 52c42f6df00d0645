"""dispatch_teardown's outputs, entry by entry, against the layout written out from the routing
(`tests/reference.expected_dispatch`: plain loops, none of the library's kernels): expand_x rows in
the promised order (local expert, then source rank, then source token), assist_info_for_combine in
full (the used entries and the zeros after them), expert_token_nums of both types, and
dynamic_scales against the contract's per-row quantisation."""

from __future__ import annotations

import pytest
import torch

from . import reference
from .reference import Case, build, expected_dispatch, run_dispatch

CASES = [
    pytest.param(Case(world=2, batches=(6, 6), seed=1), id="w2-plain"),
    pytest.param(Case(world=2, batches=(3, 7), global_bs=14, seed=2), id="w2-uneven"),
    pytest.param(Case(world=2, batches=(5, 5), token_nums_type=0, seed=3), id="w2-cumulative"),
    pytest.param(Case(world=2, batches=(6, 6), active=(4, 0), seed=4), id="w2-masked-empty-source"),
    pytest.param(Case(world=2, batches=(5, 5), use_shared_x=True, seed=5), id="w2-shared_expert_x"),
    pytest.param(Case(world=2, batches=(6, 6), quant=2, seed=6), id="w2-int8"),
    pytest.param(
        Case(world=2, batches=(4, 6), global_bs=12, quant=2, with_scales=True, active=(3, 6), seed=7),
        id="w2-int8-scales-uneven-masked",
    ),
    pytest.param(Case(world=3, batches=(2, 5, 4), global_bs=15, experts=6, top_k=3, seed=8), id="w3-uneven"),
    pytest.param(Case(world=3, batches=(4, 4, 4), shared_ranks=1, experts=4, seed=9), id="w3-shared-rank"),
    pytest.param(
        Case(world=3, batches=(5, 3, 4), global_bs=15, experts=6, skip_ranks=(1,), token_nums_type=0, seed=10),
        id="w3-rank-receives-nothing",
    ),
    pytest.param(
        Case(world=4, batches=(3, 5, 2, 4), global_bs=20, shared_ranks=2, experts=4, active=(3, 2, 0, 4), seed=11),
        id="w4-shared-R2-uneven-masked",
    ),
    pytest.param(
        Case(world=4, batches=(4,) * 4, shared_ranks=2, shared_num=2, experts=4, quant=2, with_scales=True, seed=12),
        id="w4-two-shared-int8-scales",
    ),
]


@pytest.mark.parametrize("case", CASES)
def test_dispatch_outputs_match_the_layout_from_the_routing(rank_pools, case):
    results = rank_pools(case.world).run(run_dispatch, case)
    for rank, got in enumerate(results):
        want = expected_dispatch(case, rank)
        where = f"rank {rank}"
        assert got["expand_x"].dtype == want["expand_x"].dtype, where
        assert got["expand_x"].shape == want["expand_x"].shape, where
        bad = [i for i in range(want["expand_x"].shape[0]) if not torch.equal(got["expand_x"][i], want["expand_x"][i])]
        rows = want["rows"]
        assert not bad, (
            f"{where}: expand_x rows {bad[:8]} differ; row i should be (source rank, token, expert) "
            f"{[rows[i] if i < len(rows) else 'zeros' for i in bad[:8]]}"
        )
        assert got["assist"].dtype == torch.int32 and torch.equal(got["assist"], want["assist"]), (
            f"{where}: assist_info {got['assist'][:16].tolist()} != {want['assist'][:16].tolist()} (first 16)"
        )
        assert got["expert_token_nums"].dtype == torch.int64, where
        assert torch.equal(got["expert_token_nums"], want["expert_token_nums"]), (
            f"{where}: expert_token_nums {got['expert_token_nums'].tolist()} != {want['expert_token_nums'].tolist()}"
        )
        assert got["dynamic_scales"].dtype == torch.float32, where
        assert torch.equal(got["dynamic_scales"], want["dynamic_scales"]), (
            f"{where}: dynamic_scales differ at "
            f"{(got['dynamic_scales'] != want['dynamic_scales']).nonzero().flatten()[:8].tolist()}"
        )


def test_reference_layout_on_a_hand_worked_routing(monkeypatch):
    """The reference itself, on a routing small enough to write down: W = 2, E = 4 (L = 2), K = 2."""
    case = Case(world=2, batches=(3, 3), experts=4, top_k=2, seed=0)
    p = build(case)
    p["ids"][0][:] = torch.tensor([[1, 2], [0, 1], [3, 1]], dtype=torch.int32)
    p["ids"][1][:] = torch.tensor([[1, 0], [2, 3], [1, 2]], dtype=torch.int32)
    monkeypatch.setattr(reference, "build", lambda c: p)
    rank0 = expected_dispatch(case, 0)
    rank1 = expected_dispatch(case, 1)
    # rank 0 holds experts 0 and 1: expert 0 gets (r0,t1), (r1,t0);
    # expert 1 gets (r0,t0), (r0,t1), (r0,t2), (r1,t0), (r1,t2)
    assert rank0["rows"] == [(0, 1, 0), (1, 0, 0), (0, 0, 1), (0, 1, 1), (0, 2, 1), (1, 0, 1), (1, 2, 1)]
    assert rank0["assist"][:5].tolist() == [1, 2, 5, 7, 0]
    assert rank0["expert_token_nums"].tolist() == [2, 5]
    # rank 1 holds experts 2 and 3: expert 2 gets (r0,t0), (r1,t1), (r1,t2); expert 3 gets (r0,t2), (r1,t1)
    assert rank1["rows"] == [(0, 0, 2), (1, 1, 2), (1, 2, 2), (0, 2, 3), (1, 1, 3)]
    assert rank1["assist"][:5].tolist() == [1, 3, 4, 5, 0]
    assert torch.equal(rank1["expand_x"][1], p["x"][1][1]) and not rank1["expand_x"][5:].any()
