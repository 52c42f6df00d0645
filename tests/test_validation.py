"""Every documented constraint is refused before any communication, on every rank, with a message
naming the parameter, the value and the allowed range; afterwards the group still works (no rank
entered a collective that the others skipped)."""

from __future__ import annotations

import os
import re

import pytest
import torch
import torch.distributed as dist

from overlap.errors import CommError, HandleError, OverlapError
from overlap.ops import MoeCommParams

from .reference import Case, dense_reference, run_case

H = 1024


def _inputs(bs: int = 4, k: int = 2, experts: int = 8, hidden: int = H):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(bs, hidden, generator=g).to(torch.bfloat16)
    ids = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(bs)]).to(torch.int32)
    return x, ids


def _bad_calls(world: int, rank: int, group: str):
    """(label, call, exception type, message pattern) for every refusal."""
    from overlap import ops

    x, ids = _inputs()
    E = 8

    def ds(x=x, ids=ids, **kw):
        args = dict(group_ep=group, ep_world_size=world, ep_rank_id=rank, moe_expert_num=E)
        args.update({k: kw.pop(k) for k in list(kw) if k in args})
        return lambda: ops.dispatch_setup(
            x, ids, args["group_ep"], args["ep_world_size"], args["ep_rank_id"], args["moe_expert_num"], **kw
        )

    a = 4 * world * 2  # A for BS=4, K=2, L=4 (W=2)
    expand_x = torch.zeros(a, H, dtype=torch.bfloat16)
    assist = torch.zeros(a * 128, dtype=torch.int32)
    cs = lambda ex=expand_x, asi=assist, **kw: lambda: ops.combine_setup(ex, ids, asi, group, world, rank, E, **kw)
    qx = torch.zeros(a, 1536, dtype=torch.int8)
    eidx = torch.zeros(8, dtype=torch.int32)
    scales = torch.full((4, 2), 0.5)
    cmd = torch.zeros(64, dtype=torch.int32)
    ct = lambda ex=expand_x, sc=scales, ei=eidx, **kw: (
        lambda: ops.combine_teardown(ex, qx, ids, ei, sc, cmd, group, world, rank, E, **kw)
    )
    y = torch.zeros(12, 1024, dtype=torch.bfloat16)
    dt = lambda **kw: lambda: ops.dispatch_teardown(x, y, ids, cmd, group, world, rank, E, **kw)
    dup = ids.clone()
    dup[1, 1] = dup[1, 0]
    oob = ids.clone()
    oob[2, 0] = E
    V, T = ValueError, TypeError
    return [
        ("ep_world_size low", ds(ep_world_size=1), V, r"ep_world_size must be in \[2, 384\], got 1"),
        ("ep_world_size high", ds(ep_world_size=385), V, r"ep_world_size must be in \[2, 384\], got 385"),
        ("ep_world_size vs group", ds(ep_world_size=4), V, r"ep_world_size must equal the size of group"),
        ("ep_rank_id", ds(ep_rank_id=world), V, rf"ep_rank_id must be in \[0, {world}\), got {world}"),
        ("ep_rank_id vs group", ds(ep_rank_id=(rank + 1) % world), V, r"ep_rank_id must equal this process's rank"),
        ("moe_expert_num zero", ds(moe_expert_num=0), V, r"moe_expert_num must be in \(0, 512\], got 0"),
        ("moe_expert_num high", ds(moe_expert_num=514), V, r"moe_expert_num must be in \(0, 512\], got 514"),
        ("moe_expert_num divisible", ds(moe_expert_num=7), V, r"moe_expert_num must be divisible by .* = 2, got 7"),
        ("expert_shard_type", ds(expert_shard_type=1), V, r"expert_shard_type must be in \{0\}.*got 1"),
        ("shared_expert_num", ds(shared_expert_num=5), V, r"shared_expert_num must be in \[0, 4\], got 5"),
        (
            "shared_expert_rank_num",
            ds(shared_expert_rank_num=2),
            V,
            r"shared_expert_rank_num must be in \[0, ep_world_size / 2 = 1\], got 2",
        ),
        (
            "shared experts > shared ranks",
            ds(shared_expert_rank_num=1, shared_expert_num=2),
            V,
            r"shared_expert_num must be in \[1, shared_expert_rank_num = 1\], got 2",
        ),
        (
            "shared ranks without shared experts",
            ds(shared_expert_rank_num=1, shared_expert_num=0),
            V,
            r"shared_expert_num must be in \[1, shared_expert_rank_num = 1\].*got 0",
        ),
        (
            "hidden low",
            ds(x=torch.zeros(4, 1023, dtype=torch.bfloat16)),
            V,
            r"H \(hidden size\) must be in \[1024, 8192\], got 1023",
        ),
        (
            "hidden high",
            ds(x=torch.zeros(4, 8200, dtype=torch.bfloat16)),
            V,
            r"H \(hidden size\) must be in \[1024, 8192\], got 8200",
        ),
        (
            "batch high",
            ds(x=torch.zeros(513, H, dtype=torch.bfloat16), ids=torch.zeros(513, 2, dtype=torch.int32)),
            V,
            r"BS \(x.size\(0\)\) must be in \(0, 512\], got 513",
        ),
        (
            "batch zero",
            ds(x=torch.zeros(0, H, dtype=torch.bfloat16), ids=torch.zeros(0, 2, dtype=torch.int32)),
            V,
            r"BS \(x.size\(0\)\) must be in \(0, 512\], got 0",
        ),
        (
            "top_k high",
            ds(ids=torch.zeros(4, 17, dtype=torch.int32), moe_expert_num=32),
            V,
            r"K \(expert_ids.size\(1\)\) must be in \(0, 16\], got 17",
        ),
        (
            "top_k > experts",
            ds(ids=torch.zeros(4, 3, dtype=torch.int32), moe_expert_num=2),
            V,
            r"K .* must be in \(0, moe_expert_num = 2\], got 3",
        ),
        ("expert id range", ds(ids=oob), V, r"expert_ids values must be in \[0, moe_expert_num = 8\), got 8"),
        ("expert id duplicate", ds(ids=dup), V, r"expert_ids must hold distinct experts within a row, got row 1"),
        ("expert_ids dtype", ds(ids=ids.float()), T, r"expert_ids must have dtype in \{int32, int64\}, got float32"),
        ("expert_ids rows", ds(ids=ids[:3]), V, r"expert_ids must have shape \(4, \*\)"),
        ("x dtype", ds(x=x.float()), T, r"x must have dtype in \{float16, bfloat16\}, got float32"),
        ("x rank", ds(x=x[0]), V, r"x must be 2-D"),
        ("x type", ds(x=[[1.0]]), T, r"x must be a torch.Tensor, got list"),
        ("quant_mode static", ds(quant_mode=1), V, r"quant_mode must be 0 .* or 2 .*got 1"),
        ("quant_mode other", ds(quant_mode=7), V, r"quant_mode must be 0 .* or 2 .*got 7"),
        ("scales without quant", ds(scales=torch.ones(9, H)), V, r"scales must be None unless quant_mode = 2"),
        ("scales shape", ds(scales=torch.ones(8, H), quant_mode=2), V, r"scales must have shape \(9, 1024\)"),
        ("y_dtype", ds(y_dtype=torch.float16), V, r"y_dtype must be None or torch.bfloat16"),
        (
            "global_bs low",
            ds(global_bs=4 * world - 1),
            V,
            rf"global_bs must be 0 or in \[BS \* ep_world_size = {4 * world}, 512 \* ep_world_size = "
            rf"{512 * world}\], got {4 * world - 1}",
        ),
        ("global_bs high", ds(global_bs=512 * world + 1), V, r"global_bs must be 0 or in .*got"),
        ("comm_type", ds(comm_type=2), V, r"comm_type must be in \{0\}.*got 2"),
        ("comm_alg", ds(comm_alg="fullmesh"), V, r"comm_alg must be \"\" \(reserved\), got 'fullmesh'"),
        ("group_ep empty", ds(group_ep=""), V, r"group_ep length must be in \[1, 128\), got 0"),
        ("group_ep long", ds(group_ep="g" * 128), V, r"group_ep length must be in \[1, 128\), got 128"),
        ("group_ep unknown", ds(group_ep="no-such-group"), V, r"group_ep must name a torch.distributed process group"),
        ("group_ep type", ds(group_ep=dist.group.WORLD), T, r"group_ep must be a str"),
        (
            "x_active_mask prefix",
            ds(x_active_mask=torch.tensor([True, False, True, True])),
            V,
            r"x_active_mask must be a True-prefix",
        ),
        (
            "x_active_mask dtype",
            ds(x_active_mask=torch.ones(4, dtype=torch.int32)),
            T,
            r"x_active_mask must have dtype in \{bool\}",
        ),
        ("ep_world_size type", ds(ep_world_size=2.0), T, r"ep_world_size must be an int"),
        (
            "expert_token_nums_type",
            dt(expert_token_nums_type=2),
            V,
            r"expert_token_nums_type must be 0 .* or 1 .*got 2",
        ),
        (
            "y shape",
            lambda: ops.dispatch_teardown(x, y[:5], ids, cmd, group, world, rank, E),
            V,
            r"y must have shape \(12, 1024\)",
        ),
        ("teardown without setup", dt(), HandleError, r"comm_cmd_info was not returned by dispatch_setup"),
        ("comm_quant_mode", cs(comm_quant_mode=2), V, r"comm_quant_mode must be in \{0\}, got 2"),
        ("expand_x rows", cs(ex=expand_x[:-1]), V, rf"expand_x must have shape \({a}, 1024\)"),
        ("expand_x dtype", cs(ex=expand_x.float()), T, r"expand_x must have dtype in \{float16, bfloat16\}"),
        ("assist_info shape", cs(asi=assist[:-1]), V, rf"assist_info_for_combine must have shape \({a * 128},\)"),
        ("assist_info dtype", cs(asi=assist.long()), T, r"assist_info_for_combine must have dtype in \{int32\}"),
        ("expert_scales dtype", ct(sc=scales.double()), T, r"expert_scales must have dtype in \{float32\}"),
        ("expert_scales shape", ct(sc=scales[:, :1]), V, r"expert_scales must have shape \(4, 2\)"),
        ("expand_idx shape", ct(ei=eidx[:7]), V, r"expand_idx must have shape \(8,\)"),
        (
            "shared_expert_x with shared ranks",
            ct(shared_expert_x=x, shared_expert_rank_num=1),
            V,
            r"shared_expert_x must be None when shared_expert_rank_num > 0",
        ),
        ("shared_expert_x shape", ct(shared_expert_x=x[:2]), V, r"shared_expert_x must have shape \(4, 1024\)"),
    ]


def _refusals(world: int) -> list[tuple[str, str | None]]:
    rank = dist.get_rank()
    group = dist.group.WORLD.group_name
    out = []
    for label, call, exc_type, pattern in _bad_calls(world, rank, group):
        try:
            call()
        except exc_type as exc:
            out.append((label, None if re.search(pattern, str(exc)) else f"{type(exc).__name__}: {exc}"))
        except Exception as exc:  # the wrong kind of error
            out.append((label, f"wrong type {type(exc).__name__}: {exc}"))
        else:
            out.append((label, "no error"))
    return out


def test_every_constraint_is_refused_on_every_rank_and_the_group_survives(rank_pools):
    pool = rank_pools(2)
    per_rank = pool.run(_refusals, 2)
    for rank, outcomes in enumerate(per_rank):
        failures = [(label, why) for label, why in outcomes if why is not None]
        assert not failures, f"rank {rank}: {failures}"
    case = Case(world=2, batches=(4, 4))
    results = pool.run(run_case, case)
    reference = dense_reference(case)
    assert all(torch.equal(r["x_out"], reference[i]) for i, r in enumerate(results))


def _hccl_buffsize(megabytes: str) -> str | None:
    from overlap import ops

    os.environ["HCCL_BUFFSIZE"] = megabytes
    try:
        x, ids = _inputs(bs=256, k=8, experts=16, hidden=4096)
        rank, world = dist.get_rank(), dist.get_world_size()
        try:
            ops.dispatch_setup(x, ids, dist.group.WORLD.group_name, world, rank, 16)
        except ValueError as exc:
            return str(exc)
        raise AssertionError("HCCL_BUFFSIZE too small was accepted")
    finally:
        del os.environ["HCCL_BUFFSIZE"]


def test_hccl_buffsize_is_checked_where_set(rank_pools):
    messages = rank_pools(2).run(_hccl_buffsize, "1")
    for m in messages:
        assert re.search(r"HCCL_BUFFSIZE must be >= \d+ MB .* got 1", m), m


def test_params_rules_without_a_group():
    """The scalar rules hold for configurations bigger than the test machine can spawn."""
    p = MoeCommParams("g", 16, 3, 48, shared_expert_num=2, shared_expert_rank_num=4)
    assert (p.is_shared_rank, p.num_local_experts, p.num_shared_replicas) == (True, 1, 2)
    assert p.capacity(batch=8, top_k=4) == 8 * 16 * 2 // 4
    with pytest.raises(
        ValueError, match=r"moe_expert_num must be divisible by ep_world_size - shared_expert_rank_num = 12, got 64"
    ):
        MoeCommParams("g", 16, 9, 64, shared_expert_num=2, shared_expert_rank_num=4)
    with pytest.raises(ValueError, match=r"shared_expert_rank_num must be divisible by shared_expert_num = 2, got 3"):
        MoeCommParams("g", 8, 0, 10, shared_expert_num=2, shared_expert_rank_num=3)
    r = MoeCommParams("g", 8, 5, 12, shared_expert_num=1, shared_expert_rank_num=2)
    assert (r.num_local_experts, r.capacity(batch=4, top_k=8)) == (2, 32 * 2)
    with pytest.raises(ValueError, match=r"do not divide ep_world_size = 5"):
        MoeCommParams("g", 5, 0, 3, shared_expert_num=1, shared_expert_rank_num=2, global_bs=10)


# ---- HCCL_BUFFSIZE: the factor-2 rule at its boundary ---------------------------------------------
# BS = 256, K = 8, E = 16 over W = 2 (L = 8), H = 4096, S_n = 1, written out:
#   2 · (L · BS · W · Align512(Align32(2H) + 44) + (K + S_n) · BS · Align512(2H))
#   = 2 · (8 · 256 · 2 · 8704 + 9 · 256 · 8192) = 2 · (35_651_584 + 18_874_368) = 109_051_904 bytes
#   = 104 MB exactly (the factor-4 rule of CANN's 2026 page would need 208 MB).
BUFFSIZE_NEED_MB = 104


@pytest.mark.parametrize(
    "megabytes,accepted", [(BUFFSIZE_NEED_MB, True), (BUFFSIZE_NEED_MB - 1, False), (200, True), (1, False)]
)
def test_hccl_buffsize_factor_two_boundary(monkeypatch, megabytes, accepted):
    monkeypatch.setenv("HCCL_BUFFSIZE", str(megabytes))
    params = MoeCommParams("g", 2, 0, 16)
    if accepted:
        params.check_batch(256, 8, 4096)
    else:
        with pytest.raises(
            ValueError, match=rf"HCCL_BUFFSIZE must be >= 104 MB \(109051904 bytes .*factor-2.*got {megabytes}$"
        ):
            params.check_batch(256, 8, 4096)


def test_hccl_buffsize_must_be_an_integer(monkeypatch):
    monkeypatch.setenv("HCCL_BUFFSIZE", "lots")
    with pytest.raises(ValueError, match=r"HCCL_BUFFSIZE must be an integer number of MB, got 'lots'"):
        MoeCommParams("g", 2, 0, 16).check_batch(4, 2, 1024)


def _hccl_buffsize_adequate(megabytes: str) -> bool:
    """An adequate HCCL_BUFFSIZE lets the exchange run; the result is still right."""
    from overlap import ops

    os.environ["HCCL_BUFFSIZE"] = megabytes
    try:
        x, ids = _inputs(bs=256, k=8, experts=16, hidden=4096)
        rank, world, g = dist.get_rank(), dist.get_world_size(), dist.group.WORLD.group_name
        y, _, cmd = ops.dispatch_setup(x, ids, g, world, rank, 16)
        _, _, _, nums = ops.dispatch_teardown(x, y, ids, cmd, g, world, rank, 16)
        return int(nums.sum())
    finally:
        del os.environ["HCCL_BUFFSIZE"]


def test_adequate_hccl_buffsize_is_accepted_by_the_op(rank_pools):
    received = rank_pools(2).run(_hccl_buffsize_adequate, str(BUFFSIZE_NEED_MB))
    assert sum(received) == 2 * 256 * 8  # every routed row arrived somewhere (both ranks route alike)


# ---- handles ------------------------------------------------------------------------------------


def _handle_misuse() -> dict:
    from overlap import ops

    x, ids = _inputs()
    rank, world, g = dist.get_rank(), dist.get_world_size(), dist.group.WORLD.group_name
    out = {}
    y, expand_idx, cmd = ops.dispatch_setup(x, ids, g, world, rank, 8)
    expand_x, _, assist, _ = ops.dispatch_teardown(x, y, ids, cmd, g, world, rank, 8)
    try:
        ops.dispatch_teardown(x, y, ids, cmd, g, world, rank, 8)
    except Exception as exc:
        out["twice"] = (type(exc).__name__, isinstance(exc, OverlapError), str(exc))
    qx, cmd2 = ops.combine_setup(expand_x, ids, assist, g, world, rank, 8)
    scales = torch.full((4, 2), 0.5)
    y2, expand_idx2, cmd3 = ops.dispatch_setup(x, ids, g, world, rank, 8)
    try:  # a combine teardown given a dispatch's handle
        ops.combine_teardown(expand_x, qx, ids, expand_idx2, scales, cmd3, g, world, rank, 8)
    except Exception as exc:
        out["wrong op"] = (type(exc).__name__, isinstance(exc, OverlapError), str(exc))
    ops.combine_teardown(expand_x, qx, ids, expand_idx, scales, cmd2, g, world, rank, 8)
    ops.dispatch_teardown(x, y2, ids, cmd3, g, world, rank, 8)  # the misuse left the handle usable
    out["left"] = len(ops.in_flight(g))
    return out


def test_handle_misuse_raises_handle_error_and_leaves_the_handle_usable(rank_pools):
    for res in rank_pools(2).run(_handle_misuse):
        name, is_overlap_error, message = res["twice"]
        assert (name, is_overlap_error) == ("HandleError", True)
        assert re.search(r"ticket \d+ was already torn down", message), message
        name, is_overlap_error, message = res["wrong op"]
        assert (name, is_overlap_error) == ("HandleError", True)
        assert re.search(r"combine_teardown was given the comm_cmd_info of a dispatch_setup", message), message
        assert res["left"] == 0


# ---- a foreign message on the group during an exchange -------------------------------------------


def _foreign_p2p() -> tuple[str, str] | None:
    """Rank 0 starts a dispatch on a fresh group; rank 1 instead sends a plain tensor of a header's
    size to rank 0 on that group (another job's traffic). Rank 0's teardown must say so."""
    from overlap import ops

    group = dist.new_group(ranks=[0, 1])
    name = group.group_name
    rank, world = dist.get_rank(), dist.get_world_size()
    x, ids = _inputs()
    if rank == 1:
        dist.send(torch.zeros(32, dtype=torch.int64), dst=0, group=group)
        dist.recv(torch.empty(32, dtype=torch.int64), src=0, group=group)  # rank 0's header
        return None
    y, _, cmd = ops.dispatch_setup(x, ids, name, world, rank, 8)
    try:
        with ops.comm_options(timeout_s=60):
            ops.dispatch_teardown(x, y, ids, cmd, name, world, rank, 8)
    except Exception as exc:
        return type(exc).__name__, str(exc), isinstance(exc, CommError)
    return "no error", "", False


def test_a_foreign_message_on_the_group_is_detected(rank_pools):
    from .carriers import on  # gloo: a foreign point-to-point message can only meet that carrier

    res = rank_pools(2).run(on, "gloo", _foreign_p2p)
    assert res[1] is None
    name, message, is_comm_error = res[0]
    assert is_comm_error, (name, message)
    assert re.search(r"rank 1 sent no overlap header on group .*another collective ran on the group", message), message
