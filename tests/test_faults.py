"""Faults over real gloo ranks (issue 10): a refused setup changes no state, options follow the
caller's context onto other threads, an abort reaches the peers at once and leaves the group usable
(the same state on every rank), a timed-out group is rebuilt by `recover`, the library raises only
its own errors, and tickets are bound to their group and process.

Each test makes its own process groups, so the numbering it checks starts from zero and a group it
breaks is never used again. The comm timeout of every test that expects an abort is long
(`LONG_S`): a peer that waited it out would raise `CommTimeoutError`, so "a `CommError` naming the
aborting rank" proves the abort arrived first, without timing anything. Tests that break groups run
on a scratch pool closed with the module. Every multi-rank call is bounded by `RUN_S`.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import threading
import time

import pytest
import torch
import torch.distributed as dist

import overlap

from .carriers import CPU_CARRIERS, on
from .ranks import RankPool, exit_once_all_arrived
from .reference import Case, build, common_kwargs, dense_reference

RUN_S = 90.0  # bound of one multi-rank call
LONG_S = 40.0  # comm timeout of tests where only an abort can end a wait in time
SHORT_S = 0.5  # comm timeout of tests that expect a timeout


def _outcome(fn, *args, **kwargs) -> tuple[str, str]:
    """`(exception type name, message)` of a call expected to raise; `("", "")` if it returned."""
    try:
        fn(*args, **kwargs)
    except Exception as exc:  # the test inspects the type by name (it crosses a process boundary)
        return type(exc).__name__, str(exc)
    return "", ""


def _fresh_group() -> str:
    return dist.new_group(list(range(dist.get_world_size())), backend="gloo").group_name


def _case_inputs(case: Case) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    p = build(case)
    rank = dist.get_rank()
    return p["x"][rank], p["ids"][rank], p["weights"][rank]


def _chain(group: str, case: Case) -> torch.Tensor:
    from overlap import ops

    from .test_reliability import _experts

    pg = dist.distributed_c10d._resolve_process_group(group)
    rank, world = dist.get_rank(pg), dist.get_world_size(pg)
    p = build(case)
    x, ids, w = p["x"][rank], p["ids"][rank], p["weights"][rank]
    e, kw = case.experts, common_kwargs(case)
    y, expand_idx, cmd = ops.dispatch_setup(x, ids, group, world, rank, e, **kw)
    expand_x, _, assist, counts = ops.dispatch_teardown(x, y, ids, cmd, group, world, rank, e, **kw)
    out = _experts(case, p, rank, expand_x, counts)
    qx, cmd2 = ops.combine_setup(out, ids, assist, group, world, rank, e, **kw)
    return ops.combine_teardown(out, qx, ids, expand_idx, w, cmd2, group, world, rank, e, **kw)


@contextlib.contextmanager
def _timeout(seconds: float | None):
    from overlap import ops

    ops.configure(timeout_s=seconds)
    try:
        yield
    finally:
        ops.configure(timeout_s=None)


def _status(group: str) -> tuple[int, int, str | None, str | None]:
    from overlap import ops

    s = ops.group_status(group, wait_s=LONG_S)
    return s.next_exchange, s.in_flight, s.aborted, s.broken


GOOD = Case(world=2, batches=(5, 5), seed=5)


# --------------------------------------------------------------------------------------------
# 1. Validate before taking a number
# --------------------------------------------------------------------------------------------


def _refused_case(refusing: tuple[int, ...]) -> dict:
    """Ranks in `refusing` call dispatch_setup with OVERLAP_TIMEOUT_S=0 (refused), then with a bad
    tensor (refused); then every rank runs two correct chains on the same group."""
    from overlap import ops

    rank, world = dist.get_rank(), dist.get_world_size()
    g = _fresh_group()
    x, ids, _ = _case_inputs(GOOD)
    out: dict = {}
    if rank in refusing:
        os.environ["OVERLAP_TIMEOUT_S"] = "0"
        try:
            out["env"] = _outcome(ops.dispatch_setup, x, ids, g, world, rank, GOOD.experts)
        finally:
            del os.environ["OVERLAP_TIMEOUT_S"]
        out["tensor"] = _outcome(ops.dispatch_setup, x.float(), ids, g, world, rank, GOOD.experts)
        out["after_refusals"] = (len(ops.in_flight(g)), ops.group_status(g).next_exchange)
    out["x_outs"] = [_chain(g, GOOD), _chain(g, GOOD)]
    out["status"] = _status(g)
    return out


@pytest.mark.parametrize("refusing", [(1,), (0, 1)], ids=["one-rank", "every-rank"])
@pytest.mark.parametrize("carrier", CPU_CARRIERS)
def test_refused_setup_takes_no_exchange_number(rank_pools, refusing, carrier):
    results = rank_pools(2).run(on, carrier, _refused_case, refusing, timeout_s=RUN_S)
    reference = dense_reference(GOOD)
    for rank, out in enumerate(results):
        if rank in refusing:
            assert out["env"][0] == "ValueError" and "OVERLAP_TIMEOUT_S must be > 0" in out["env"][1], out["env"]
            assert out["tensor"][0] == "TypeError" and "x must have dtype" in out["tensor"][1], out["tensor"]
            assert out["after_refusals"] == (0, 0)  # no slot, no exchange number taken
        for x_out in out["x_outs"]:
            assert torch.equal(x_out, reference[rank]), f"rank {rank}: the group fell out of step"
        assert out["status"] == (4, 0, None, None), out["status"]  # 2 chains x 2 exchanges, on every rank


# --------------------------------------------------------------------------------------------
# 2. Options follow the caller's context
# --------------------------------------------------------------------------------------------


def test_comm_options_follow_copied_contexts_not_bare_threads():
    from overlap.ops import EmulatedLink, comm_options, transport

    link = EmulatedLink(latency_s=1e-3)
    seen: dict[str, object] = {}

    def look(key: str) -> None:
        seen[key] = (transport.current_timeout(), transport.current_link(), transport.teardown_timeout())

    with comm_options(timeout_s=3.0, link=link):
        ctx = contextvars.copy_context()
        copied = threading.Thread(target=ctx.run, args=(look, "copied"))
        bare = threading.Thread(target=look, args=("bare",))
        copied.start(), bare.start()
        copied.join(), bare.join()
        look("here")
    look("after")
    assert seen["copied"] == (3.0, link, 3.0) and seen["here"] == (3.0, link, 3.0)
    default = transport.current_timeout()
    assert seen["bare"] == (default, None, None) and seen["after"] == (default, None, None)
    with comm_options(link=None):  # an explicit "plain transport" override beats configure(link=...)
        transport.configure(link=link)
        try:
            assert transport.current_link() is None
        finally:
            transport.configure(link=None)
    with pytest.raises(TypeError, match="link must be an EmulatedLink, None or 'keep', got int"):
        with comm_options(link=3):
            pass


def _setup_options_case(silent_rank: int) -> dict:
    """The setup runs in a comm_options(timeout_s=SHORT_S) block on a copied context; its
    teardown runs on a bare thread: the setup's timeout still applies (rank `silent_rank` never
    takes part, so only a timeout can end the wait)."""
    from overlap import ops

    rank, world = dist.get_rank(), dist.get_world_size()
    g = _fresh_group()
    if rank == silent_rank:
        return {}
    x, ids, _ = _case_inputs(Case(world=world, batches=(4,) * world, experts=6))
    with ops.comm_options(timeout_s=SHORT_S):
        box: dict = {}
        ctx = contextvars.copy_context()
        t = threading.Thread(
            target=ctx.run, args=(lambda: box.update(out=ops.dispatch_setup(x, ids, g, world, rank, 6)),)
        )
        t.start(), t.join()
    y, _, cmd = box["out"]
    result: dict = {}
    t = threading.Thread(
        target=lambda: result.update(out=_outcome(ops.dispatch_teardown, x, y, ids, cmd, g, world, rank, 6))
    )
    t.start()
    t.join(RUN_S / 2)
    return {"teardown": result.get("out", ("still waiting", ""))}


# --------------------------------------------------------------------------------------------
# 3. Abort
# --------------------------------------------------------------------------------------------


def _abort_case(failing: int) -> dict:
    """Every rank sets up dispatch A; every rank but `failing` also sets up B and waits on it.
    `failing` aborts instead (its layer "raised"). The waiting ranks get CommError naming it and
    its error; each answers with its own abort; then two correct chains run on the same group."""
    from overlap import ops

    rank, world = dist.get_rank(), dist.get_world_size()
    g = _fresh_group()
    case = Case(world=world, batches=(4,) * world, experts=2 * world)
    x, ids, _ = _case_inputs(case)
    e = case.experts
    out: dict = {}
    with _timeout(LONG_S):
        y, _, cmd_a = ops.dispatch_setup(x, ids, g, world, rank, e)
        if rank == failing:
            ops.transfer_of(cmd_a).wait()  # A has landed (not torn down): the abort cancels it, no exchange
            error = RuntimeError("layer failed on call 3")
            out["cancelled"] = ops.abort(g, error)
            out["in_flight_after_abort"] = len(ops.in_flight(g))
            out["teardown_a"] = _outcome(ops.dispatch_teardown, x, y, ids, cmd_a, g, world, rank, e)
            out["abort_again"] = ops.abort(g, error)  # the same failure twice: nothing more happens
        else:
            ops.dispatch_teardown(x, y, ids, cmd_a, g, world, rank, e)
            y, _, cmd_b = ops.dispatch_setup(x, ids, g, world, rank, e)
            out["teardown_b"] = _outcome(ops.dispatch_teardown, x, y, ids, cmd_b, g, world, rank, e)
            out["setup_before_ack"] = _outcome(ops.dispatch_setup, x, ids, g, world, rank, e)
            ops.abort(g, RuntimeError(out["teardown_b"][1]))
        good = Case(world=world, batches=(4,) * world, experts=2 * world, seed=7)
        out["x_outs"] = [_chain(g, good), _chain(g, good)]
        out["status"] = _status(g)
    return out


@pytest.mark.parametrize("world,failing", [(2, 0), (3, 1)])
@pytest.mark.parametrize("carrier", CPU_CARRIERS)
def test_abort_reaches_waiting_peers_and_the_group_goes_on(rank_pools, world, failing, carrier):
    results = rank_pools(world).run(on, carrier, _abort_case, failing, timeout_s=RUN_S)
    reference = dense_reference(Case(world=world, batches=(4,) * world, experts=2 * world, seed=7))
    for rank, out in enumerate(results):
        if rank == failing:
            assert out["cancelled"] and out["in_flight_after_abort"] == 0  # the budget is back
            assert out["teardown_a"][0] == "CommError" and "cancelled by overlap.ops.abort" in out["teardown_a"][1]
            assert out["abort_again"] == []
        else:
            type_name, message = out["teardown_b"]
            assert type_name == "CommError", (rank, out["teardown_b"])  # not CommTimeoutError: no wait-out
            assert f"aborted by rank {failing}" in message and "RuntimeError: layer failed on call 3" in message
            assert out["setup_before_ack"][0] == "CommError" and "call overlap.ops.abort" in out["setup_before_ack"][1]
        for x_out in out["x_outs"]:
            assert torch.equal(x_out, reference[rank]), f"rank {rank}: the group does not work after the abort"
    statuses = {out["status"] for out in results}
    assert len(statuses) == 1 and next(iter(statuses))[1:] == (0, None, None), statuses  # the same on every rank


def _every_rank_aborts_case(extra_setups: tuple[int, ...]) -> dict:
    """Every rank fails with a different number of setups in flight (`extra_setups[rank]` beyond
    one common exchange) and aborts; then a correct chain runs."""
    from overlap import ops

    from .test_reliability import _side_barrier

    rank, world = dist.get_rank(), dist.get_world_size()
    g = _fresh_group()
    case = Case(world=world, batches=(4,) * world, experts=2 * world)
    x, ids, _ = _case_inputs(case)
    with _timeout(LONG_S):
        y, _, cmd = ops.dispatch_setup(x, ids, g, world, rank, case.experts)
        ops.dispatch_teardown(x, y, ids, cmd, g, world, rank, case.experts)
        for _ in range(extra_setups[rank]):
            ops.dispatch_setup(x, ids, g, world, rank, case.experts)
        _side_barrier()  # every rank has failed (and made its setups) before any aborts
        cancelled = ops.abort(g, ValueError(f"rank {rank} failed"))
        x_out = _chain(g, GOOD)
        return {"cancelled": len(cancelled), "x_out": x_out, "status": _status(g)}


@pytest.mark.parametrize("carrier", CPU_CARRIERS)
def test_every_rank_aborting_with_different_setups_in_flight_agrees(rank_pools, carrier):
    results = rank_pools(2).run(on, carrier, _every_rank_aborts_case, (2, 0), timeout_s=RUN_S)
    reference = dense_reference(GOOD)
    assert [r["cancelled"] for r in results] == [2, 0]
    for rank, out in enumerate(results):
        assert torch.equal(out["x_out"], reference[rank])
    assert len({r["status"] for r in results}) == 1, [r["status"] for r in results]


def _idle_peer_case() -> dict:
    """Rank 0 aborts while rank 1 has nothing in flight: rank 1's next exchange raises CommError
    naming rank 0; rank 1 answers with its own abort; both go on."""
    from overlap import ops

    from .test_reliability import _side_barrier

    rank = dist.get_rank()
    g = _fresh_group()
    out: dict = {}
    with _timeout(LONG_S):
        if rank == 0:
            ops.abort(g, KeyError("missing expert"))
            _side_barrier()
        else:
            _side_barrier()
            out["next"] = _outcome(_chain, g, GOOD)
            ops.abort(g, RuntimeError(out["next"][1]))
        out["x_out"] = _chain(g, GOOD)
        out["status"] = _status(g)
    return out


@pytest.mark.parametrize("carrier", CPU_CARRIERS)
def test_abort_reaches_an_idle_peer_at_its_next_exchange(rank_pools, carrier):
    results = rank_pools(2).run(on, carrier, _idle_peer_case, timeout_s=RUN_S)
    reference = dense_reference(GOOD)
    type_name, message = results[1]["next"]
    assert type_name == "CommError" and "aborted by rank 0" in message and "KeyError" in message, message
    for rank, out in enumerate(results):
        assert torch.equal(out["x_out"], reference[rank])
    assert results[0]["status"] == results[1]["status"]


def _settle_case(failing: int) -> dict:
    """Every rank completes its exchanges; then `failing` fails (after its last teardown) and
    every rank settles: the others learn of it and raise; the next chain works everywhere."""
    from overlap import ops

    rank = dist.get_rank()
    g = _fresh_group()
    out: dict = {}
    with _timeout(LONG_S):
        out["first"] = _chain(g, GOOD)
        error = RuntimeError("loss is nan") if rank == failing else None
        out["settle"] = _outcome(ops.settle, g, error)
        out["x_out"] = _chain(g, GOOD)
        out["settle_ok"] = _outcome(ops.settle, g, None)
        out["status"] = _status(g)
    return out


@pytest.mark.parametrize("carrier", CPU_CARRIERS)
def test_settle_tells_ranks_that_did_not_fail(rank_pools, carrier):
    results = rank_pools(2).run(on, carrier, _settle_case, 1, timeout_s=RUN_S)
    reference = dense_reference(GOOD)
    assert results[1]["settle"] == ("", "")  # the failed rank returns; its caller re-raises its own error
    type_name, message = results[0]["settle"]
    assert type_name == "CommError" and "rank 1 failed" in message and "RuntimeError: loss is nan" in message
    for rank, out in enumerate(results):
        assert torch.equal(out["first"], reference[rank]) and torch.equal(out["x_out"], reference[rank])
        assert out["settle_ok"] == ("", "")
    assert results[0]["status"] == results[1]["status"]


# --------------------------------------------------------------------------------------------
# 4. Tickets and messages
# --------------------------------------------------------------------------------------------


def _ticket_case() -> dict:
    from overlap import ops

    rank, world = dist.get_rank(), dist.get_world_size()
    g1, g2 = _fresh_group(), _fresh_group()
    case = Case(world=world, batches=(4,) * world, experts=4)
    x, ids, _ = _case_inputs(case)
    e = case.experts
    errors: dict = {}
    with _timeout(LONG_S):
        y1, _, cmd1 = ops.dispatch_setup(x, ids, g1, world, rank, e)
        y2, _, cmd2 = ops.dispatch_setup(x, ids, g2, world, rank, e)
        errors["other group"] = _outcome(ops.dispatch_teardown, x, y1, ids, cmd2, g1, world, rank, e)
        forged = cmd1.clone()
        forged[1] += 1000
        errors["forged"] = _outcome(ops.dispatch_teardown, x, y1, ids, forged, g1, world, rank, e)
        foreign = cmd1.clone()
        foreign[4] ^= 1  # another process's nonce
        errors["foreign"] = _outcome(ops.dispatch_teardown, x, y1, ids, foreign, g1, world, rank, e)
        r1 = ops.dispatch_teardown(x, y1, ids, cmd1, g1, world, rank, e)
        r2 = ops.dispatch_teardown(x, y2, ids, cmd2, g2, world, rank, e)
        errors["twice"] = _outcome(ops.dispatch_teardown, x, y1, ids, cmd1.clone(), g1, world, rank, e)
    return {"errors": errors, "same": torch.equal(r1[0], r2[0]), "in_flight": len(ops.in_flight())}


def test_tickets_are_bound_to_their_group_and_process(rank_pools):
    for out in rank_pools(2).run(_ticket_case, timeout_s=RUN_S):
        errors = out["errors"]
        assert errors["other group"][0] == "HandleError", errors
        assert "was given the comm_cmd_info of an exchange on group" in errors["other group"][1]
        for key in ("forged", "foreign"):
            assert errors[key][0] == "HandleError" and "this process never issued" in errors[key][1], errors[key]
            assert "already torn down" not in errors[key][1]
        assert errors["twice"][0] == "HandleError" and "already torn down" in errors["twice"][1]
        assert out["same"] and out["in_flight"] == 0  # the refused teardowns took nothing


# --------------------------------------------------------------------------------------------
# 5. Timeouts, broken groups, recovery (scratch pool)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scratch_pool():
    """Three gloo ranks whose groups the tests leave broken; closed with the module."""
    pool = RankPool(3)
    yield pool
    pool.close()


def test_setup_timeout_applies_to_a_teardown_on_another_thread(scratch_pool):
    results = scratch_pool.run(_setup_options_case, 2, timeout_s=RUN_S)
    for rank in (0, 1):
        type_name, message = results[rank]["teardown"]
        assert type_name == "CommTimeoutError", results[rank]
        assert f"timed out after {SHORT_S:g} s" in message and "ranks [2] have not delivered" in message, message


def _recover_case(silent_rank: int) -> dict:
    """Rank `silent_rank` stays silent: the others time out and the group is broken for good
    (gloo closes the pairs). Every use of it raises our errors, never a raw backend one, and the
    message does not nest; `recover` on every rank builds a new group that works."""
    from overlap import ops

    rank, world = dist.get_rank(), dist.get_world_size()
    g = _fresh_group()
    case = Case(world=world, batches=(4,) * world, experts=6)
    x, ids, _ = _case_inputs(case)
    out: dict = {}
    with _timeout(SHORT_S):
        if rank != silent_rank:
            y, _, cmd = ops.dispatch_setup(x, ids, g, world, rank, 6)
            out["timeout"] = _outcome(ops.dispatch_teardown, x, y, ids, cmd, g, world, rank, 6)
            time.sleep(2 * SHORT_S)  # the worker's own deadline has passed too: the group is broken
            out["setup_1"] = _outcome(ops.dispatch_setup, x, ids, g, world, rank, 6)
            out["setup_2"] = _outcome(ops.dispatch_setup, x, ids, g, world, rank, 6)
        else:
            time.sleep(4 * SHORT_S)
        t = torch.ones(1)
        out["collective"] = _outcome(
            ops.collective,
            lambda: dist.all_reduce(t, group=dist.distributed_c10d._resolve_process_group(g), async_op=True),
            "token count all-reduce",
            g,
        )
    new = ops.recover(g)
    out["old_name"] = _outcome(ops.dispatch_setup, x, ids, g, world, rank, 6)
    good = Case(world=world, batches=(4,) * world, experts=6, seed=9)
    with _timeout(LONG_S):
        out["x_out"] = _chain(new.group_name, good)
    out["status"] = _status(new.group_name)
    return out


@pytest.mark.parametrize("carrier", CPU_CARRIERS)
def test_after_a_timeout_recover_builds_a_group_that_works(scratch_pool, carrier):
    results = scratch_pool.run(on, carrier, _recover_case, 2, timeout_s=RUN_S)
    reference = dense_reference(Case(world=3, batches=(4, 4, 4), experts=6, seed=9))
    for rank, out in enumerate(results):
        if rank != 2:
            assert out["timeout"][0] == "CommTimeoutError", out["timeout"]
            for key in ("setup_1", "setup_2"):
                type_name, message = out[key]
                assert type_name == "CommError" and "call overlap.ops.recover(group)" in message, out[key]
                assert message.count("unusable") == 1, message  # never nested
        assert out["collective"][0] in ("CommError", "CommTimeoutError"), (rank, out["collective"])
        assert "replaced by overlap.ops.recover" in out["old_name"][1], out["old_name"]
        assert torch.equal(out["x_out"], reference[rank]), f"rank {rank}: the recovered group is wrong"
        assert out["status"] == (2, 0, None, None)


# --------------------------------------------------------------------------------------------
# 6. The scheduler (issue item 1, and item 4 inside a scheduled run)
# --------------------------------------------------------------------------------------------


class FailingLayer(overlap.MoELayer):
    """The reference protocol layer, whose moe_experts raises on call `fail_on` of this rank once
    armed (`arm(n)`), so that the plain forward that makes the reference never fails."""

    fail_on: int | None = None
    calls = 0
    seen: list | None = None  # when a list: (current_timeout(), timeouts of the group's transfers) per call

    def arm(self, n: int | None) -> None:
        self.fail_on, self.calls = n, 0

    def moe_experts(self, *args, **kwargs):
        from overlap import ops

        self.calls += 1
        if self.seen is not None:
            in_flight = ops.in_flight(self.group.group_name)
            self.seen.append((ops.transport.current_timeout(), sorted({t.timeout_s for t in in_flight})))
        if self.fail_on is not None and self.calls == self.fail_on:
            raise RuntimeError(f"expert kernel failed on call {self.calls}")
        return super().moe_experts(*args, **kwargs)


def _scheduler_fault_case(failing: tuple[int, ...], timeout_s: float) -> dict:
    """A 3-microbatch scheduled run (96 tokens) whose layer raises on its 3rd moe_experts call on
    the ranks in `failing`; then a correct run on the same group."""
    from overlap import ops
    from overlap.numerics import compare

    rank = dist.get_rank()
    group = dist.new_group(list(range(dist.get_world_size())), backend="gloo")
    layer = FailingLayer(1024, 4, 2, 64, group=group, seed=3)
    x = torch.randn(96, 1024, generator=torch.Generator().manual_seed(rank)).to(torch.bfloat16)
    dense = layer.dense_forward(x)
    context = lambda: overlap.scheduler(group, microbatches=3)  # noqa: E731
    out: dict = {}
    with _timeout(timeout_s):
        layer.arm(3 if rank in failing else None)
        start = time.perf_counter()
        try:
            with context():
                layer(x)
            out["first"] = ("", "")
        except Exception as exc:
            out["first"] = (type(exc).__name__, str(exc))
        out["noticed_s"] = time.perf_counter() - start  # reported, never asserted
        out["in_flight"] = len(ops.in_flight(group.group_name))
        layer.arm(None)
        try:
            with context():
                again = layer(x)
            closeness = compare(again, dense)  # split GEMMs may round differently: a tolerance in ulps
            out["again"] = True if closeness.ok else str(closeness)
        except Exception as exc:
            out["again"] = (type(exc).__name__, str(exc))
        out["status"] = _status(group.group_name)
    return out


def _check_scheduler_fault(results: list[dict], failing: tuple[int, ...]) -> None:
    for rank, out in enumerate(results):
        type_name, message = out["first"]
        if rank in failing:
            assert type_name == "RuntimeError" and "expert kernel failed on call 3" in message, out["first"]
        else:
            assert type_name == "CommError", out["first"]  # not CommTimeoutError: the abort came first
            assert f"rank {failing[0]}" in message and "expert kernel failed on call 3" in message, message
        assert out["in_flight"] == 0, f"rank {rank}: the aborted context leaked setups"
        assert out["again"] is True, f"rank {rank}: the next context failed: {out['again']}"
    assert len({out["status"] for out in results}) == 1, [out["status"] for out in results]


@pytest.mark.parametrize("failing", [(0, 1), (0,)], ids=["every-rank", "rank-0"])
@pytest.mark.parametrize("carrier", CPU_CARRIERS)
def test_scheduler_exit_aborts_agrees_and_the_next_context_works(rank_pools, failing, carrier):
    # The teardown timeout is long (LONG_S): the peers must learn of the failure from the abort,
    # not by waiting the timeout out.
    results = rank_pools(2).run(on, carrier, _scheduler_fault_case, failing, LONG_S, timeout_s=RUN_S)
    print("scheduler fault noticed after (s):", [round(r["noticed_s"], 3) for r in results])
    _check_scheduler_fault(results, failing)


def _broken_group_scheduler_case() -> tuple[str, str]:
    """A scheduler context on a group broken by a timeout: its token-count all-reduce must raise
    our CommError, not gloo's RuntimeError."""
    from overlap import ops

    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.new_group(list(range(world)), backend="gloo")
    layer = overlap.MoELayer(1024, 6, 2, 64, group=group, seed=3)
    x = torch.randn(8, 1024).to(torch.bfloat16)
    with _timeout(SHORT_S):
        if rank == 0:
            ids = torch.tensor([[0, 3]] * 8, dtype=torch.int32)
            y, _, cmd = ops.dispatch_setup(x, ids, group.group_name, world, rank, 6)
            _outcome(ops.dispatch_teardown, x, y, ids, cmd, group.group_name, world, rank, 6)
        time.sleep(3 * SHORT_S)
        try:
            with overlap.scheduler(group):
                layer(x)
        except Exception as exc:
            return type(exc).__name__, str(exc)
    return "", ""


def test_scheduler_on_a_broken_group_raises_comm_error(scratch_pool):
    for type_name, message in scratch_pool.run(_broken_group_scheduler_case, timeout_s=RUN_S):
        assert type_name in ("CommError", "CommTimeoutError"), (type_name, message)


def _dead_peer_case(dying: int) -> dict:
    """Rank `dying` exits; the others raise CommError naming it at once, and `recover` with the
    survivors builds a smaller group that works."""
    from overlap import ops

    rank, world = dist.get_rank(), dist.get_world_size()
    g = _fresh_group()
    exit_once_all_arrived(g, rank == dying)  # not while a peer still connects to it
    case = Case(world=world, batches=(4,) * world, experts=6)
    x, ids, _ = _case_inputs(case)
    out: dict = {}
    with _timeout(LONG_S):
        y, _, cmd = ops.dispatch_setup(x, ids, g, world, rank, 6)
        out["dead"] = _outcome(ops.dispatch_teardown, x, y, ids, cmd, g, world, rank, 6)
        survivors = [r for r in range(world) if r != dying]
        new = ops.recover(g, ranks=survivors)
        out["x_out"] = _chain(new.group_name, Case(world=len(survivors), batches=(4,) * len(survivors), seed=4))
    return out


def test_after_a_peer_died_recover_builds_a_group_of_the_survivors(scratch_pool):
    from .test_reliability import _run_survivors

    # gloo only: its closed connection names the dead rank at once. The window carrier learns of a
    # death from the process id a peer published with its window; this rank died before making one,
    # so there it is a timeout (tests/test_window.py covers a death after the window exists).
    outcomes = _run_survivors(scratch_pool, on, "gloo", _dead_peer_case, 2, timeout_s=RUN_S)
    scratch_pool.close()  # a rank is gone: the next user gets a fresh pool
    reference = dense_reference(Case(world=2, batches=(4, 4), seed=4))
    assert set(outcomes) == {0, 1}, outcomes
    for rank, (ok, out) in outcomes.items():
        assert ok, out
        type_name, message = out["dead"]
        assert type_name == "CommError" and "rank 2" in message, out["dead"]
        assert torch.equal(out["x_out"], reference[rank]), f"rank {rank}: the survivors' group is wrong"


def _options_in_scheduler_case() -> dict:
    """comm_options around a scheduler context reaches the ops its plan runs on other threads: the
    experts (a plan node) see the timeout, and every transfer the plan set up captured it."""
    from overlap import ops
    from overlap.ops import transport

    rank = dist.get_rank()
    group = dist.new_group(list(range(dist.get_world_size())), backend="gloo")
    layer = FailingLayer(1024, 4, 2, 64, group=group, seed=3)
    layer.seen = []
    x = torch.randn(96, 1024, generator=torch.Generator().manual_seed(rank)).to(torch.bfloat16)
    started: list[tuple[str, float]] = []
    real_start = transport.start

    def start(*args, **kwargs):
        t = real_start(*args, **kwargs)
        started.append((threading.current_thread().name, t.timeout_s))
        return t

    from overlap.pipeline import planned

    transport.start = start
    planned.CPU_ON_CALLER = False  # the comm stages on the pooled workers, as on a device
    try:
        with ops.comm_options(timeout_s=7.5), overlap.scheduler(group, microbatches=3):
            layer(x)
    finally:
        transport.start = real_start
        planned.CPU_ON_CALLER = True
    return {
        "experts": [timeout for timeout, _ in layer.seen],
        "started": started,
        "caller": threading.current_thread().name,
    }


def test_comm_options_reach_the_ops_a_scheduler_runs_on_other_threads(rank_pools):
    for out in rank_pools(2).run(_options_in_scheduler_case, timeout_s=RUN_S):
        assert out["experts"] == [7.5, 7.5, 7.5], out
        assert len(out["started"]) == 6 and {t for _, t in out["started"]} == {7.5}, out  # 3 dispatches, 3 combines
        assert any(name != out["caller"] for name, _ in out["started"]), out  # set up on other threads
