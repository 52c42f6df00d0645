"""The header cross-check: a peer that differs from this rank in one header field alone (the op, the
exchange number, any shared parameter, or BS with `global_bs = 0`) makes every rank raise
`CommError` naming that field, before any payload moves (`docs/ops.md`, "Ranks are cross-checked").

Two layers:
- one unit test per header field, on the check itself (`header_check` below, the only place that
  reaches inside the transport: repoint it if the transport's protocol moves);
- the public ops on two real ranks over gloo: every field a caller can make differ through the ops,
  all in one launch, each on a fresh group.
"""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from overlap.errors import CommError

from .carriers import CPU_CARRIERS, on

# ---- the one place that reaches inside the transport ---------------------------------------------


def header_fields() -> tuple[str, ...]:
    """The shared parameters a header carries (besides op, exchange number and BS)."""
    from overlap.ops import protocol

    return tuple(protocol.PARAM_FIELDS)


def header_check(mine: dict, theirs: dict) -> BaseException | None:
    """Run the transport's check of a peer's header against this rank's: the error it raises, or None.

    A header here is `{"op", "seq", "batch", "params": {field: value}}`."""
    from overlap.ops import protocol

    def make(h: dict) -> torch.Tensor:
        header = protocol.make_header(h["op"], h["params"], h["batch"], 1)
        header[protocol._H_SEQ] = h["seq"]
        return header

    transfer = SimpleNamespace(header=make(mine), plan=None, op=mine["op"], group_name="g", label="", seq=mine["seq"])
    try:
        protocol.check_headers(transfer, {1: make(theirs)}, 0)
    except Exception as exc:  # noqa: BLE001 - returned for the test to judge
        return exc
    return None


# ---- unit tests: one per field -------------------------------------------------------------------

BASE_PARAMS = {
    "ep_world_size": 2,
    "moe_expert_num": 8,
    "expert_shard_type": 0,
    "shared_expert_num": 1,
    "shared_expert_rank_num": 0,
    "global_bs": 0,
    "quant_mode": 0,
    "comm_quant_mode": 0,
    "comm_type": 0,
    "hidden": 1024,
    "row_bytes": 2048,
}


def _header(**changes) -> dict:
    params = {name: BASE_PARAMS.get(name, 0) for name in header_fields()}
    header = {"op": "dispatch", "seq": 5, "batch": 4, "params": params}
    for key, value in changes.items():
        if key in header:
            header[key] = value
        else:
            params[key] = value
    return header


def _differing(value: int) -> int:
    return value + 3


def test_identical_headers_pass_and_bs_may_differ_with_global_bs():
    assert header_check(_header(), _header()) is None
    assert header_check(_header(global_bs=16, batch=4), _header(global_bs=16, batch=7)) is None


@pytest.mark.parametrize("field", header_fields())
def test_a_peer_differing_in_one_shared_parameter_is_refused_with_the_field_named(field):
    mine = _header()
    theirs = _header(**{field: _differing(mine["params"][field])})
    for a, b, me, peer in [(mine, theirs, 0, 1), (theirs, mine, 0, 1)]:  # both ranks' points of view
        err = header_check(a, b)
        assert isinstance(err, CommError), (field, err)
        mine_v, theirs_v = a["params"][field], b["params"][field]
        assert re.search(rf"disagree on {field} .*rank {me} has {mine_v}, rank {peer} has {theirs_v}", str(err)), err


def test_a_peer_at_another_exchange_number_of_the_same_op_is_refused():
    for mine_seq, theirs_seq in [(5, 6), (6, 5), (0, 1)]:
        err = header_check(_header(seq=mine_seq), _header(seq=theirs_seq))
        assert isinstance(err, CommError), (mine_seq, theirs_seq, err)
        assert re.search(rf"op order .*#{mine_seq} \(dispatch\).*#{theirs_seq} \(dispatch\)", str(err)), err


def test_a_peer_running_another_op_is_refused():
    for mine_op, theirs_op in [("dispatch", "combine"), ("combine", "dispatch")]:
        err = header_check(_header(op=mine_op), _header(op=theirs_op))
        assert isinstance(err, CommError), err
        assert re.search(rf"op order .*#5 \({mine_op}\).*#5 \({theirs_op}\)", str(err)), err


def test_a_peer_with_another_bs_under_global_bs_zero_is_refused():
    err = header_check(_header(batch=4), _header(batch=5))
    assert isinstance(err, CommError), err
    assert re.search(r"global_bs = 0 needs the same BS .*BS = 4 on rank 0 and 5 on rank 1", str(err)), err


# ---- the public ops on two ranks -----------------------------------------------------------------
# Each case: {rank: (op, BS, H, E, keyword arguments)}; rank 1 differs from rank 0 in one field.
K = 2
SAME = ("dispatch", 4, 1024, 8, {})
RANK_CASES = {
    "moe_expert_num": {0: SAME, 1: ("dispatch", 4, 1024, 4, {})},
    "shared_expert_num": {0: SAME, 1: ("dispatch", 4, 1024, 8, {"shared_expert_num": 0})},
    "shared_expert_rank_num": {
        0: ("dispatch", 4, 1024, 2, {"shared_expert_rank_num": 1}),
        1: ("dispatch", 4, 1024, 2, {}),
    },
    "global_bs": {0: SAME, 1: ("dispatch", 4, 1024, 8, {"global_bs": 16})},
    "quant_mode": {0: SAME, 1: ("dispatch", 4, 1024, 8, {"quant_mode": 2})},
    "hidden": {0: SAME, 1: ("dispatch", 4, 2048, 8, {})},
    "BS": {0: SAME, 1: ("dispatch", 3, 1024, 8, {})},
    "op": {0: SAME, 1: ("combine", 4, 1024, 8, {})},
    "seq": {0: SAME, 1: ("restart", 4, 1024, 8, {})},  # rank 1's transport restarted: its numbers start over
    "dtype": {0: SAME, 1: ("dispatch", 4, 1024, 8, {"_dtype": "float16"})},  # same row bytes as bf16
}
EXPECTED = {
    "moe_expert_num": r"ranks disagree on moe_expert_num .*rank {me} has {mine}, rank {peer} has {theirs}",
    "shared_expert_num": r"ranks disagree on shared_expert_num .*rank {me} has {mine}, rank {peer} has {theirs}",
    "shared_expert_rank_num": r"ranks disagree on shared_expert_rank_num .*rank {me} has {mine}, rank {peer}",
    "global_bs": r"ranks disagree on global_bs .*rank {me} has {mine}, rank {peer} has {theirs}",
    "quant_mode": r"ranks disagree on quant_mode .*rank {me} has {mine}, rank {peer} has {theirs}",
    "hidden": r"ranks disagree on hidden .*rank {me} has {mine}, rank {peer} has {theirs}",
    "BS": r"global_bs = 0 needs the same BS on all ranks, got BS = {mine} on rank {me} and {theirs} on rank {peer}",
    "op": r"ranks disagree on op order .*rank {me} is at exchange #0 \({mine}\), rank {peer} at #0 \({theirs}\)",
    "seq": r"ranks disagree on op order .*rank {me} is at exchange #{mine} \(dispatch\), rank {peer} at #{theirs}",
    "dtype": r"ranks disagree on dtype .*rank {me} has {mine}, rank {peer} has {theirs} \((bfloat16|float16) vs ",
}


def _ids(batch: int) -> torch.Tensor:
    return torch.tensor([[t % 2, 1 - t % 2] for t in range(batch)], dtype=torch.int32)


def _round_trip(group: str, op: str, batch: int, hidden: int, experts: int, kw: dict) -> None:
    """One exchange of `op` (its setup and teardown) on `group`; raises what the teardown raises."""
    from overlap import ops
    from overlap.ops import MoeCommParams

    rank, world = dist.get_rank(), dist.get_world_size()
    kw = dict(kw)
    dtype = getattr(torch, kw.pop("_dtype", "bfloat16"))
    x, ids = torch.ones(batch, hidden, dtype=dtype), _ids(batch)
    if op == "dispatch":
        y, _, cmd = ops.dispatch_setup(x, ids, group, world, rank, experts, **kw)
        ops.dispatch_teardown(x, y, ids, cmd, group, world, rank, experts, **kw)
        return
    a = MoeCommParams(group, world, rank, experts, **kw).capacity(batch, K)
    expand_x = torch.zeros(a, hidden, dtype=torch.bfloat16)
    qx, cmd = ops.combine_setup(expand_x, ids, torch.zeros(a * 128, dtype=torch.int32), group, world, rank, experts)
    idx, scales = torch.zeros(batch * K, dtype=torch.int32), torch.ones(batch, K)
    ops.combine_teardown(expand_x, qx, ids, idx, scales, cmd, group, world, rank, experts)


def _mismatched_exchanges(cases: dict) -> dict:
    """Every case on a fresh group: {case: (error type, message, is CommError) or None}; then a
    correct exchange on the last group (it stays usable after a refused exchange)."""
    from overlap import ops

    rank, world = dist.get_rank(), dist.get_world_size()
    out = {}
    with ops.comm_options(timeout_s=120):
        for name, per_rank in cases.items():
            group = dist.new_group(ranks=list(range(world))).group_name
            op, batch, hidden, experts, kw = per_rank.get(rank, SAME)
            try:
                if any(spec[0] == "restart" for spec in per_rank.values()):  # one exchange on every rank, then
                    _round_trip(group, "dispatch", batch, hidden, experts, kw)  # only this rank's transport
                    if op == "restart":  # restarts: its exchange numbers start over
                        ops.shutdown()
                        op = "dispatch"
                _round_trip(group, op, batch, hidden, experts, kw)
                out[name] = None
            except Exception as exc:  # noqa: BLE001 - judged by the test
                out[name] = (type(exc).__name__, str(exc), isinstance(exc, CommError))
        ops.shutdown()  # every rank's exchange numbers start over together (the "seq" case left them apart)
        group = dist.new_group(ranks=list(range(world))).group_name
        _round_trip(group, *SAME)
    return out


def _shown(case: str, rank: int) -> tuple:
    """What rank `rank`'s message must show of its own and its peer's value."""
    if case == "seq":
        return (1, 0) if rank == 0 else (0, 1)
    if case == "dtype":  # the header's dtype codes: bfloat16 on rank 0, float16 on rank 1
        from overlap.ops.protocol import DTYPE_CODES

        codes = (DTYPE_CODES[torch.bfloat16], DTYPE_CODES[torch.float16])
        return codes if rank == 0 else codes[::-1]
    mine, theirs = RANK_CASES[case][rank], RANK_CASES[case][1 - rank]
    if case == "op":
        return mine[0], theirs[0]
    if case == "BS":
        return mine[1], theirs[1]
    if case == "hidden":
        return mine[2], theirs[2]
    if case == "moe_expert_num":
        return mine[3], theirs[3]
    defaults = {"shared_expert_num": 1, "shared_expert_rank_num": 0, "global_bs": 0, "quant_mode": 0}
    return mine[4].get(case, defaults[case]), theirs[4].get(case, defaults[case])


def _cases_on(carrier: str, cases: dict) -> dict:
    """The window carrier numbers its slots by exchange number: a peer at another number never lands
    in the slot this rank waits on, so it surfaces as a bounded CommTimeoutError naming that rank
    (docs/faults.md), not as a header mismatch; that case runs on gloo, whose headers carry it."""
    return cases if carrier == "gloo" else {k: v for k, v in cases.items() if k != "seq"}


@pytest.mark.parametrize("carrier", CPU_CARRIERS)
def test_every_rank_refuses_a_peer_differing_in_one_field_through_the_public_ops(rank_pools, carrier):
    cases = _cases_on(carrier, RANK_CASES)
    results = rank_pools(2).run(on, carrier, _mismatched_exchanges, cases)
    for rank, per_case in enumerate(results):
        for case in cases:
            got = per_case[case]
            assert got is not None, f"rank {rank} accepted a peer differing in {case}"
            type_name, message, is_comm_error = got
            assert is_comm_error, (rank, case, type_name, message)
            mine, theirs = _shown(case, rank)
            pattern = EXPECTED[case].format(me=rank, peer=1 - rank, mine=mine, theirs=theirs)
            assert re.search(pattern, message), (rank, case, message)


def test_on_four_ranks_the_ranks_that_agree_refuse_the_one_that_differs_too(rank_pools):
    """Rank 3 alone has another moe_expert_num; rank 2 alone restarted (another exchange number):
    the ranks that agree with each other raise as well, naming the odd one."""
    cases = {
        "moe_expert_num": {3: ("dispatch", 4, 1024, 4, {})},
        "seq": {2: ("restart", 4, 1024, 8, {})},
    }
    results = rank_pools(4).run(on, "gloo", _mismatched_exchanges, cases)  # "seq" needs gloo (_cases_on)
    for rank, per_case in enumerate(results):
        message = per_case["moe_expert_num"][1]
        want = r"rank 3 has 4, rank 0 has 8" if rank == 3 else rf"rank {rank} has 8, rank 3 has 4"
        assert re.search(r"ranks disagree on moe_expert_num .*" + want, message), (rank, message)
        message = per_case["seq"][1]
        want = (
            r"rank 2 is at exchange #0 \(dispatch\), rank 0 at #1"
            if rank == 2
            else rf"rank {rank} is at exchange #1 \(dispatch\), rank 2 at #0"
        )
        assert re.search(r"ranks disagree on op order .*" + want, message), (rank, message)
        assert per_case["moe_expert_num"][2] and per_case["seq"][2]  # CommError on every rank
