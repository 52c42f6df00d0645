"""Reliability of the split ops over real gloo ranks (issue 5): bounded waits, dead peers, ranks
that disagree, handle misuse, buffer lifetime and the in-flight budget, and a short soak.

Every test here fails without the protection it checks: without a timeout the waiting rank hangs
(the pool's own bound fails the test), without the header exchange ranks that disagree hang or
return garbage, without private send buffers an overwrite corrupts the result, and so on. Each
multi-rank call bounds its run time (`timeout_s`). Tests that leave a group unusable (timeouts, a
dead rank) use their own process groups on a scratch pool that is closed at the end of the
module, so the session pools other tests share stay clean.
"""

from __future__ import annotations

import gc
import os
import queue
import time
from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist

from .carriers import CPU_CARRIERS, on
from .ranks import RankPool, exit_once_all_arrived
from .reference import Case, affine, build, common_kwargs, dense_reference, run_case

RUN_S = 60.0  # bound of one multi-rank call
SHORT_S = 0.5  # comm timeout of the tests that expect one


# --------------------------------------------------------------------------------------------
# Helpers (run on the ranks)
# --------------------------------------------------------------------------------------------


def _experts(case: Case, p: dict, rank: int, expand_x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """This rank's elementwise experts applied to its received rows (MoE ranks, quant 0)."""
    out = torch.zeros(expand_x.shape, dtype=case.dtype)
    start = 0
    for local, c in enumerate(counts.tolist()):
        ex = rank * case.local_experts + local
        out[start : start + c] = affine(expand_x[start : start + c].float(), p["a"][ex], p["b"][ex], case.dtype)
        start += c
    return out


def _chain(case: Case, hook=None, *, group: str | None = None) -> torch.Tensor:
    """run_case's chain (no shared-expert ranks, quant 0) with a `hook(stage, ctx)` after each setup
    and teardown, so a test can misuse handles or overwrite tensors in between. Returns x_out."""
    from overlap import ops

    rank, world = dist.get_rank(), dist.get_world_size()
    p = build(case)
    group = group or dist.group.WORLD.group_name
    kw = common_kwargs(case)
    ctx = dict(
        case=case, rank=rank, world=world, group=group, kw=kw, x=p["x"][rank], ids=p["ids"][rank], w=p["weights"][rank]
    )
    hook = hook or (lambda stage, ctx: None)
    ids, w = ctx["ids"], ctx["w"]
    ctx["y"], ctx["expand_idx"], ctx["cmd"] = ops.dispatch_setup(ctx["x"], ids, group, world, rank, case.experts, **kw)
    hook("dispatch_setup", ctx)
    expand_x, _, assist, counts = ops.dispatch_teardown(
        ctx["x"], ctx["y"], ids, ctx["cmd"], group, world, rank, case.experts, **kw
    )
    hook("dispatch_teardown", ctx)
    ctx["expand_x"] = _experts(case, p, rank, expand_x, counts)
    ctx["quant_x"], ctx["cmd2"] = ops.combine_setup(
        ctx["expand_x"], ids, assist, group, world, rank, case.experts, **kw
    )
    hook("combine_setup", ctx)
    return ops.combine_teardown(
        ctx["expand_x"], ctx["quant_x"], ids, ctx["expand_idx"], w, ctx["cmd2"], group, world, rank, case.experts, **kw
    )


def _outcome(fn, *args, **kwargs) -> tuple[str, str]:
    """`(exception type name, message)` of a call expected to raise; `("", "")` if it returned."""
    try:
        fn(*args, **kwargs)
    except Exception as exc:  # the test inspects the type by name (it crosses a process boundary)
        return type(exc).__name__, str(exc)
    return "", ""


# --------------------------------------------------------------------------------------------
# A scratch pool for tests that break groups or kill ranks
# --------------------------------------------------------------------------------------------


def _run_survivors(pool: RankPool, fn, *args, timeout_s: float = RUN_S) -> dict[int, tuple[bool, object]]:
    """Like `RankPool.run_outcomes`, but stops waiting as soon as every rank that has not answered
    is dead: `{rank: (ok, value)}` of the ranks that answered. Bounded by `timeout_s`."""
    if not pool._procs or not all(p.is_alive() for p in pool._procs):
        pool.close()
        pool._start()
    for q in pool._tasks:
        q.put((fn, args, {}))
    outcomes: dict[int, tuple[bool, object]] = {}
    deadline = time.monotonic() + timeout_s
    while len(outcomes) < pool.world:
        if time.monotonic() > deadline:
            pool.close()
            raise TimeoutError(
                f"ranks {sorted(set(range(pool.world)) - set(outcomes))} did not finish "
                f"{fn.__name__} within {timeout_s} s"
            )
        try:
            rank, ok, value = pool._results.get(timeout=0.05)
        except queue.Empty:
            missing = set(range(pool.world)) - set(outcomes)
            if all(not pool._procs[r].is_alive() for r in missing):
                break
            continue
        outcomes[rank] = (ok, value)
    return outcomes


@pytest.fixture(scope="module")
def scratch_pool():
    """Three gloo ranks whose groups the tests may leave broken; closed with the module."""
    pool = RankPool(3)
    yield pool
    pool.close()


# --------------------------------------------------------------------------------------------
# 1. Bounded waits
# --------------------------------------------------------------------------------------------

TIMEOUT_WAYS = ("comm_options", "configure", "env", "setup_only", "wrong_world_size")


def _timeout_case(silent_rank: int) -> dict:
    """Every rank makes one fresh group per way of setting the timeout; `silent_rank` then
    returns at once (or, for `wrong_world_size`, calls dispatch_setup with a wrong
    ep_world_size, which it refuses locally) while the others set up and tear down."""
    from overlap import ops
    from overlap.ops import context as _context

    rank, world = dist.get_rank(), dist.get_world_size()
    groups = {way: dist.new_group(list(range(world)), backend="gloo").group_name for way in TIMEOUT_WAYS}
    case = Case(world=world, batches=(4,) * world, experts=6)
    p = build(case)
    x, ids = p["x"][rank], p["ids"][rank]
    results: dict[str, tuple[str, str, float]] = {}
    if rank == silent_rank:
        g = groups["wrong_world_size"]
        results["wrong_world_size"] = (*_outcome(ops.dispatch_setup, x, ids, g, world + 1, rank, 12), 0.0)
        return results

    def attempt(way: str) -> None:
        g = groups[way]
        start = time.perf_counter()
        with _context.labelled("mb1"):
            if way == "setup_only":  # the setup's timeout bounds the worker; the teardown uses the default
                with ops.comm_options(timeout_s=SHORT_S):
                    y, _, cmd = ops.dispatch_setup(x, ids, g, world, rank, 6)
                outcome = _outcome(ops.dispatch_teardown, x, y, ids, cmd, g, world, rank, 6)
            else:
                with ops.comm_options(timeout_s=SHORT_S if way in ("comm_options", "wrong_world_size") else None):
                    y, _, cmd = ops.dispatch_setup(x, ids, g, world, rank, 6)
                    outcome = _outcome(ops.dispatch_teardown, x, y, ids, cmd, g, world, rank, 6)
        results[way] = (*outcome, time.perf_counter() - start)

    attempt("comm_options")
    attempt("setup_only")
    attempt("wrong_world_size")
    ops.configure(timeout_s=SHORT_S)
    try:
        attempt("configure")
    finally:
        ops.configure(timeout_s=None)
    os.environ["OVERLAP_TIMEOUT_S"] = str(SHORT_S)
    try:
        attempt("env")
    finally:
        del os.environ["OVERLAP_TIMEOUT_S"]
    return results


def test_current_timeout_precedence():
    """comm_options beats configure, which beats OVERLAP_TIMEOUT_S, which beats the default."""
    from overlap.ops import comm_options, configure, transport

    old = os.environ.pop("OVERLAP_TIMEOUT_S", None)
    try:
        assert transport.current_timeout() == transport.DEFAULT_TIMEOUT_S
        os.environ["OVERLAP_TIMEOUT_S"] = "7"
        assert transport.current_timeout() == 7.0
        configure(timeout_s=5.0)
        assert transport.current_timeout() == 5.0
        with comm_options(timeout_s=3.0):
            assert transport.current_timeout() == 3.0
        assert transport.current_timeout() == 5.0
        os.environ["OVERLAP_TIMEOUT_S"] = "soon"
        configure(timeout_s=None)
        with pytest.raises(ValueError, match="OVERLAP_TIMEOUT_S must be a number"):
            transport.current_timeout()
    finally:
        configure(timeout_s=None)
        os.environ.pop("OVERLAP_TIMEOUT_S", None)
        if old is not None:
            os.environ["OVERLAP_TIMEOUT_S"] = old


@pytest.mark.parametrize("carrier", CPU_CARRIERS)
def test_teardown_times_out_naming_op_microbatch_and_silent_peer(scratch_pool, carrier):
    """Rank 2 never sets up: ranks 0 and 1 get CommTimeoutError (a TimeoutError) within about the
    timeout, whichever way it was set, naming the op, the microbatch and rank 2 (and only rank 2:
    ranks 0 and 1 did deliver to each other)."""
    outcomes = _run_survivors(scratch_pool, on, carrier, _timeout_case, 2)
    assert set(outcomes) == {0, 1, 2}, outcomes
    for rank in (0, 1):
        ok, results = outcomes[rank]
        assert ok, results
        for way in ("comm_options", "configure", "env", "setup_only", "wrong_world_size"):
            type_name, message, elapsed = results[way]
            assert type_name == "CommTimeoutError", (rank, way, type_name, message)
            assert "dispatch" in message and "dispatch@mb1" in message, (way, message)
            assert "ranks [2] have not delivered" in message, (way, message)
            # The timeout that applied is the one set this way (not the 300 s default): the message
            # states it, and the wait lasted at least that long (a lower bound cannot flake).
            assert f"timed out after {SHORT_S:g} s" in message, (way, message)
            assert elapsed >= SHORT_S, (way, elapsed)
    ok, results = outcomes[2]
    assert ok and results["wrong_world_size"][0] == "ValueError", results
    assert "ep_world_size must equal the size of group" in results["wrong_world_size"][1]
    from overlap.errors import CommTimeoutError

    assert issubclass(CommTimeoutError, TimeoutError)


def _queued_case(silent_rank: int) -> tuple[str, str] | None:
    """Two dispatches on a fresh group whose `silent_rank` never takes part: the second one's
    teardown times out while it is still queued behind the first, and says so."""
    from overlap import ops

    rank, world = dist.get_rank(), dist.get_world_size()
    g = dist.new_group(list(range(world)), backend="gloo").group_name
    if rank == silent_rank:
        return None
    case = Case(world=world, batches=(4,) * world, experts=6)
    p = build(case)
    x, ids = p["x"][rank], p["ids"][rank]
    # The first exchange holds the group's worker far longer than the second teardown waits (no race
    # under load): the silent rank never answers it.
    with ops.comm_options(timeout_s=40 * SHORT_S):
        ops.dispatch_setup(x, ids, g, world, rank, 6)
    y, _, cmd = ops.dispatch_setup(x, ids, g, world, rank, 6)
    with ops.comm_options(timeout_s=SHORT_S / 2):
        return _outcome(ops.dispatch_teardown, x, y, ids, cmd, g, world, rank, 6)


def test_timeout_of_a_queued_exchange_says_it_is_queued(scratch_pool):
    # gloo only: exchanges queue on its thread; a window exchange never waits behind another one.
    outcomes = _run_survivors(scratch_pool, on, "gloo", _queued_case, 2)
    for rank in (0, 1):
        ok, (type_name, message) = outcomes[rank]
        assert ok and type_name == "CommTimeoutError", (rank, type_name, message)
        assert "still queued behind an earlier exchange" in message, message


# --------------------------------------------------------------------------------------------
# 2. A rank dies between setup and teardown
# --------------------------------------------------------------------------------------------


def _dying_rank_case(dead_rank: int, timeout_s: float) -> tuple[str, str, float]:
    """Everyone sets up a dispatch; `dead_rank` then exits its process. The survivors tear down
    and keep running full steps until one raises (the dead rank cannot take part in a combine)."""
    rank = dist.get_rank()
    group = dist.new_group(list(range(dist.get_world_size())), backend="gloo").group_name

    def after_setup() -> None:  # every rank has made the group and set up
        exit_once_all_arrived(group, rank == dead_rank, 17)

    return _dispatch_outcome(group, timeout_s, after_setup=after_setup, chains=3)


def _dispatch_outcome(
    group: str, timeout_s: float, *, after_setup: Callable[[], None] = lambda: None, chains: int = 0
) -> tuple[str, str, float]:
    """One dispatch of a 6-expert case on `group` (setup, `after_setup()`, teardown), then `chains`
    full steps, under `timeout_s`: `(exception type name, message, seconds)` of the first call that
    raised, `("", "", seconds)` if none did."""
    from overlap import ops

    rank, world = dist.get_rank(), dist.get_world_size()
    case = Case(world=world, batches=(4,) * world, experts=6)
    p = build(case)
    x, ids = p["x"][rank], p["ids"][rank]
    start = time.perf_counter()
    with ops.comm_options(timeout_s=timeout_s):
        y, _, cmd = ops.dispatch_setup(x, ids, group, world, rank, 6)
        after_setup()
        try:
            ops.dispatch_teardown(x, y, ids, cmd, group, world, rank, 6)
            for _ in range(chains):
                _chain(case, group=group)
        except Exception as exc:
            return type(exc).__name__, str(exc), time.perf_counter() - start
    return "", "", time.perf_counter() - start


@pytest.mark.parametrize("carrier", CPU_CARRIERS)
def test_dead_rank_gives_every_survivor_a_clear_error_quickly(scratch_pool, carrier):
    timeout_s = 10.0
    outcomes = _run_survivors(scratch_pool, on, carrier, _dying_rank_case, 2, timeout_s, timeout_s=RUN_S)
    assert set(outcomes) == {0, 1}, f"rank 2 should be missing (dead), got {sorted(outcomes)}"
    assert scratch_pool._procs[2].exitcode == 17
    for rank in (0, 1):
        ok, (type_name, message, elapsed) = outcomes[rank]
        assert ok
        assert type_name in ("CommError", "CommTimeoutError"), (rank, type_name, message)
        assert "rank 2" in message or "ranks [2]" in message, message
    scratch_pool.close()  # the next user gets fresh ranks


def _late_survivor_case(timeout_s: float) -> tuple[str, str, float]:
    """Rank 2 exits before anyone sets up; rank 1 sets up only once rank 2's process is gone and
    its gloo connection has had time to close. gloo then refuses to post anything to rank 2 on
    rank 1: rank 1 must still name rank 2 at once, and so must rank 0, whose exchange with rank 1
    is never completed (rank 1 gave up), instead of waiting out the timeout on rank 1."""
    from overlap.ops.window import _process_gone

    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.new_group(list(range(world)), backend="gloo").group_name
    store = dist.distributed_c10d._get_default_store()
    if rank == 2:
        store.set(f"tests/pid/{group}", str(os.getpid()))
    pid = int(store.get(f"tests/pid/{group}"))
    exit_once_all_arrived(group, rank == 2, 17)
    if rank == 1:
        gone_by = time.monotonic() + 30.0
        while not _process_gone(pid) and time.monotonic() < gone_by:  # rank 2 exits at once
            time.sleep(0.01)
        time.sleep(0.5)  # gloo's loop sees the closed connection
    return _dispatch_outcome(group, timeout_s)


def test_a_survivor_that_sets_up_after_the_death_and_its_peers_name_the_dead_rank_at_once(scratch_pool):
    timeout_s = 30.0
    outcomes = _run_survivors(scratch_pool, on, "gloo", _late_survivor_case, timeout_s, timeout_s=RUN_S)
    scratch_pool.close()  # a rank is gone: the next user gets fresh ranks
    assert set(outcomes) == {0, 1}, outcomes
    for rank in (0, 1):
        ok, (type_name, message, elapsed) = outcomes[rank]
        assert ok and type_name == "CommError", (rank, type_name, message)
        assert "rank 2 failed" in message, (rank, message)
        assert elapsed < timeout_s / 2, (rank, elapsed)  # named from the closed connection, not waited out


def _silent_survivor_case(timeout_s: float) -> tuple[str, str, float] | None:
    """One full step on all ranks; then rank 2 exits, rank 0 stays alive but sets up nothing (as
    a survivor does that gave up at a failure the others did not see), and rank 1 sets up a
    dispatch. Rank 1 must name the dead rank 2 at once, not wait out its timeout on rank 0 first."""
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.new_group(list(range(world)), backend="gloo").group_name
    store = dist.distributed_c10d._get_default_store()
    _chain(Case(world=world, batches=(4,) * world, experts=6), group=group)
    exit_once_all_arrived(group, rank == 2, 17)
    if rank == 0:  # alive and silent until rank 1 is done
        gone_by = time.monotonic() + 2 * timeout_s
        while not store.check([f"tests/done/{group}"]) and time.monotonic() < gone_by:
            time.sleep(0.01)
        return None
    try:
        return _dispatch_outcome(group, timeout_s)
    finally:
        store.set(f"tests/done/{group}", "1")


@pytest.mark.parametrize("carrier", CPU_CARRIERS)
def test_a_dead_rank_is_named_at_once_while_another_peer_is_silent(scratch_pool, carrier):
    timeout_s = 30.0
    outcomes = _run_survivors(scratch_pool, on, carrier, _silent_survivor_case, timeout_s, timeout_s=RUN_S)
    scratch_pool.close()  # a rank is gone: the next user gets fresh ranks
    assert set(outcomes) == {0, 1}, outcomes
    ok, (type_name, message, elapsed) = outcomes[1]
    assert ok and type_name == "CommError", (type_name, message)
    assert "rank 2" in message or "ranks [2]" in message, message
    assert elapsed < timeout_s / 2, elapsed  # seen from the closed connection, not after rank 0's timeout


# --------------------------------------------------------------------------------------------
# 3. Ranks disagree
# --------------------------------------------------------------------------------------------

# name -> (rank 0's setting, rank 1's setting); every setting passes local validation.
DISAGREEMENTS = {
    "moe_expert_num": (dict(experts=8), dict(experts=4)),
    "shared_expert_num": (dict(shared_num=1), dict(shared_num=2)),
    "shared_expert_rank_num": (dict(shared_ranks=0), dict(shared_ranks=1)),
    "global_bs": (dict(global_bs=0), dict(global_bs=16)),
    "quant_mode": (dict(quant=0), dict(quant=2)),
    "hidden": (dict(hidden=1024), dict(hidden=2048)),
    "BS": (dict(batches=(4, 6)), dict(batches=(4, 6))),  # global_bs = 0 with uneven BS
    "op order": (dict(first_op="dispatch"), dict(first_op="combine")),
}


def _disagreeing_case(name: str) -> tuple[str, str, torch.Tensor]:
    """This rank's half of a disagreement, then a correct chain on the same group."""
    from overlap import kernels, ops

    rank, world = dist.get_rank(), dist.get_world_size()
    settings = dict(DISAGREEMENTS[name][rank])
    first_op = settings.pop("first_op", "dispatch")
    base = dict(world=2, batches=(4, 4), experts=4)  # ids in [0, 4): valid for every expert count used
    case = Case(**{**base, **settings})
    p = build(case)
    group = dist.group.WORLD.group_name
    x, ids, w = p["x"][rank], p["ids"][rank], p["weights"][rank]
    experts = settings.get("experts", 4)
    kw = dict(shared_expert_num=case.shared_num, shared_expert_rank_num=case.shared_ranks, global_bs=case.global_bs)
    if first_op == "dispatch":
        y, _, cmd = ops.dispatch_setup(x, ids, group, world, rank, experts, quant_mode=case.quant, **kw)
        outcome = _outcome(
            ops.dispatch_teardown, x, y, ids, cmd, group, world, rank, experts, quant_mode=case.quant, **kw
        )
    else:  # a combine where the peer issues a dispatch: nothing to send, a well-formed call
        params = ops.MoeCommParams(
            group, world, rank, experts, shared_expert_num=case.shared_num, shared_expert_rank_num=case.shared_ranks
        )
        capacity = params.capacity(x.shape[0], ids.shape[1])
        expand_x = torch.zeros(capacity, case.hidden, dtype=case.dtype)
        assist = torch.zeros(capacity * 128, dtype=torch.int32)
        quant_x, cmd = ops.combine_setup(expand_x, ids, assist, group, world, rank, experts, **kw)
        expand_idx = kernels.expand_idx_from_ids(ids, experts)
        outcome = _outcome(
            ops.combine_teardown, expand_x, quant_x, ids, expand_idx, w, cmd, group, world, rank, experts, **kw
        )
    good = Case(world=2, batches=(3, 3), seed=5)
    return (*outcome, run_case(good)["x_out"])


@pytest.mark.parametrize(
    "name,kind", [(name, "window") for name in DISAGREEMENTS] + [("op order", "gloo"), ("hidden", "gloo")]
)
def test_disagreeing_ranks_all_raise_and_the_group_recovers(rank_pools, name, kind):
    results = rank_pools(2).run(on, kind, _disagreeing_case, name, timeout_s=RUN_S)
    reference = dense_reference(Case(world=2, batches=(3, 3), seed=5))
    for rank, (type_name, message, x_out) in enumerate(results):
        other = 1 - rank
        assert type_name == "_ParameterMismatch", (rank, type_name, message)  # a CommError
        if name == "op order":
            assert "ranks disagree on op order" in message, message
        elif name == "BS":
            assert "global_bs = 0 needs the same BS on all ranks" in message, message
            assert f"on rank {rank}" in message and f"on rank {other}" in message, message
        else:
            assert f"ranks disagree on {name} " in message, message
            mine, theirs = DISAGREEMENTS[name][rank], DISAGREEMENTS[name][other]
            assert f"rank {rank} has" in message and f"rank {other} has" in message, message
            mine, theirs = next(iter(mine.values())), next(iter(theirs.values()))
            assert f"rank {rank} has {mine}" in message and f"rank {other} has {theirs}" in message, message
        assert torch.equal(x_out, reference[rank]), f"rank {rank}: the group does not work after the error"


def test_parameter_mismatch_is_a_comm_error():
    from overlap.errors import CommError
    from overlap.ops.transport import _ParameterMismatch

    assert issubclass(_ParameterMismatch, CommError)


# --------------------------------------------------------------------------------------------
# 4. Handle misuse
# --------------------------------------------------------------------------------------------


def _misuse_case(case: Case) -> tuple[dict, torch.Tensor]:
    from overlap import ops

    errors: dict[str, tuple[str, str]] = {}

    def hook(stage: str, c: dict) -> None:
        args = (c["group"], c["world"], c["rank"], c["case"].experts)
        zeros = torch.zeros_like(c["cmd"])
        if stage == "dispatch_setup":
            errors["dispatch without setup"] = _outcome(
                ops.dispatch_teardown, c["x"], c["y"], c["ids"], zeros, *args, **c["kw"]
            )
            errors["combine given dispatch's"] = _outcome(
                ops.combine_teardown, *_combine_inputs(c), c["ids"], c["expand_idx"], c["w"], c["cmd"], *args, **c["kw"]
            )
        elif stage == "dispatch_teardown":
            errors["dispatch twice"] = _outcome(
                ops.dispatch_teardown, c["x"], c["y"], c["ids"], c["cmd"], *args, **c["kw"]
            )
            errors["dispatch twice, copied info"] = _outcome(
                ops.dispatch_teardown, c["x"], c["y"], c["ids"], c["cmd"].clone(), *args, **c["kw"]
            )
        elif stage == "combine_setup":
            errors["dispatch given combine's"] = _outcome(
                ops.dispatch_teardown, c["x"], c["y"], c["ids"], c["cmd2"], *args, **c["kw"]
            )
            errors["combine without setup"] = _outcome(
                ops.combine_teardown,
                c["expand_x"],
                c["quant_x"],
                c["ids"],
                c["expand_idx"],
                c["w"],
                torch.zeros_like(c["cmd2"]),
                *args,
                **c["kw"],
            )

    x_out = _chain(case, hook)
    x_out_next = run_case(case)["x_out"]  # a full correct chain right after
    return errors, torch.stack([x_out, x_out_next])


def _combine_inputs(c: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """A well-formed (expand_x, quant_expand_x) pair, so only the handle is wrong."""
    from overlap.ops import MoeCommParams

    case = c["case"]
    params = MoeCommParams(
        c["group"],
        c["world"],
        c["rank"],
        case.experts,
        shared_expert_num=case.shared_num,
        shared_expert_rank_num=case.shared_ranks,
        global_bs=case.global_bs,
    )
    capacity = params.capacity(c["x"].shape[0], c["ids"].shape[1])
    from overlap.ops.portable import _quant_expand_x_shape

    return (
        torch.zeros(capacity, case.hidden, dtype=case.dtype),
        torch.zeros(_quant_expand_x_shape(capacity, case.hidden), dtype=torch.int8),
    )


MISUSE_MESSAGES = {
    "dispatch without setup": "was not returned by dispatch_setup",
    "combine without setup": "was not returned by combine_setup",
    "combine given dispatch's": "combine_teardown was given the comm_cmd_info of a dispatch_setup",
    "dispatch given combine's": "dispatch_teardown was given the comm_cmd_info of a combine_setup",
    "dispatch twice": "already torn down",
    "dispatch twice, copied info": "already torn down",
}


def test_handle_misuse_raises_handle_error_and_leaves_the_group_usable(rank_pools):
    case = Case(world=2, batches=(5, 5), seed=11)
    results = rank_pools(2).run(_misuse_case, case, timeout_s=RUN_S)
    reference = dense_reference(case)
    for rank, (errors, x_outs) in enumerate(results):
        assert set(errors) == set(MISUSE_MESSAGES)
        for what, (type_name, message) in errors.items():
            assert type_name == "HandleError", (rank, what, type_name, message)
            assert MISUSE_MESSAGES[what] in message, (what, message)
        assert torch.equal(x_outs[0], reference[rank]), f"rank {rank}: the chain around the misuse is wrong"
        assert torch.equal(x_outs[1], reference[rank]), f"rank {rank}: the next chain is wrong"


# --------------------------------------------------------------------------------------------
# 5. Lifetime and the in-flight budget
# --------------------------------------------------------------------------------------------

_side_group = None


def _side_barrier() -> None:
    """A barrier on a group of its own, never the ops' group."""
    global _side_group
    # (conftest destroys the groups a test made once it ends: make it again then)
    if _side_group is None or _side_group not in dist.distributed_c10d._world.pg_map:
        _side_group = dist.new_group(list(range(dist.get_world_size())), backend="gloo")
    dist.barrier(group=_side_group)


def _overwrite_case(case: Case, dispatch_leader: int) -> torch.Tensor:
    """The caller overwrites x and y after dispatch_setup and expand_x after combine_setup, and
    drops its references. The leader of each exchange overwrites *before* its peer sets up, so its
    payload (sent only after the peer's header) certainly leaves after the overwrite."""
    rank = dist.get_rank()
    combine_leader = 1 - dispatch_leader

    def hook(stage: str, c: dict) -> None:
        if stage == "dispatch_setup":
            if rank != dispatch_leader:
                return
            c["x"].fill_(float("nan"))
            c["y"].fill_(-7.0)
            _side_barrier()
        elif stage == "combine_setup":
            if rank != combine_leader:
                return
            c["expand_x"].fill_(float("nan"))
            _side_barrier()
        gc.collect()

    return _chain_with_barriers(case, hook, dispatch_leader, combine_leader)


def _chain_with_barriers(case: Case, hook, dispatch_leader: int, combine_leader: int) -> torch.Tensor:
    """`_chain`, with the followers waiting on the side barrier before their setups and
    overwriting their own tensors right after (racing their payload: not checked strictly)."""
    from overlap import ops

    rank = dist.get_rank()
    real_dispatch_setup, real_combine_setup = ops.dispatch_setup, ops.combine_setup

    def dispatch_setup(*args, **kwargs):
        if rank != dispatch_leader:
            _side_barrier()
        return real_dispatch_setup(*args, **kwargs)

    def combine_setup(*args, **kwargs):
        if rank != combine_leader:
            _side_barrier()
        return real_combine_setup(*args, **kwargs)

    def all_hook(stage: str, c: dict) -> None:
        hook(stage, c)
        if stage == "dispatch_setup" and rank != dispatch_leader:
            c["x"].fill_(float("nan"))
            c["y"].fill_(-7.0)
        if stage == "combine_setup" and rank != combine_leader:
            c["expand_x"].fill_(float("nan"))

    ops.dispatch_setup, ops.combine_setup = dispatch_setup, combine_setup
    try:
        return _chain(case, all_hook)
    finally:
        ops.dispatch_setup, ops.combine_setup = real_dispatch_setup, real_combine_setup


def test_overwriting_caller_tensors_between_setup_and_teardown_changes_nothing(rank_pools):
    case = Case(world=2, batches=(6, 6), seed=3)
    reference = dense_reference(case)
    for leader in (0, 1):
        results = rank_pools(2).run(_overwrite_case, case, leader, timeout_s=RUN_S)
        for rank, x_out in enumerate(results):
            assert torch.equal(x_out, reference[rank]), f"rank {rank}, dispatch leader {leader}"


def _capacity_case(cases: list[Case]) -> dict:
    """Two microbatches in flight per op kind (the default budget); a third setup raises
    CapacityError on every rank before communicating; both microbatches still finish right."""
    from overlap import ops

    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.group.WORLD.group_name
    out: dict = {}
    ps = [build(c) for c in cases]
    e = cases[0].experts
    setups = [ops.dispatch_setup(p["x"][rank], p["ids"][rank], group, world, rank, e) for p in ps[:2]]
    out["in_flight_before"] = len(ops.in_flight(group))
    p3 = ps[2]
    out["dispatch_3rd"] = _outcome(ops.dispatch_setup, p3["x"][rank], p3["ids"][rank], group, world, rank, e)
    out["in_flight_after"] = len(ops.in_flight(group))
    received = []
    for p, (y, expand_idx, cmd) in zip(ps, setups):
        expand_x, _, assist, counts = ops.dispatch_teardown(p["x"][rank], y, p["ids"][rank], cmd, group, world, rank, e)
        received.append((_experts(cases[0], p, rank, expand_x, counts), assist, expand_idx))
    combines = [
        ops.combine_setup(ex, p["ids"][rank], assist, group, world, rank, e) for p, (ex, assist, _) in zip(ps, received)
    ]
    out["combine_3rd"] = _outcome(
        ops.combine_setup, received[0][0], ps[0]["ids"][rank], received[0][1], group, world, rank, e
    )
    x_outs = []
    for p, (ex, _, expand_idx), (quant_x, cmd) in zip(ps, received, combines):
        x_outs.append(
            ops.combine_teardown(
                ex, quant_x, p["ids"][rank], expand_idx, p["weights"][rank], cmd, group, world, rank, e
            )
        )
    ops.configure(max_in_flight=1)
    try:
        y, _, cmd = ops.dispatch_setup(ps[0]["x"][rank], ps[0]["ids"][rank], group, world, rank, e)
        out["budget_1"] = _outcome(ops.dispatch_setup, ps[0]["x"][rank], ps[0]["ids"][rank], group, world, rank, e)
        ops.dispatch_teardown(ps[0]["x"][rank], y, ps[0]["ids"][rank], cmd, group, world, rank, e)
    finally:
        ops.configure(max_in_flight=2)
    x_outs.append(run_case(cases[2])["x_out"])
    out["x_outs"] = x_outs
    out["in_flight_end"] = len(ops.in_flight(group))
    return out


@pytest.mark.parametrize("carrier", CPU_CARRIERS)
def test_in_flight_budget_raises_capacity_error_on_every_rank_and_recovers(rank_pools, carrier):
    cases = [Case(world=2, batches=(4, 4), seed=s) for s in (21, 22, 23)]
    results = rank_pools(2).run(on, carrier, _capacity_case, cases, timeout_s=RUN_S)
    references = [dense_reference(c) for c in cases]
    for rank, out in enumerate(results):
        assert out["in_flight_before"] == 2 and out["in_flight_after"] == 2
        for key in ("dispatch_3rd", "combine_3rd"):
            type_name, message = out[key]
            assert type_name == "CapacityError", (rank, key, out[key])
            assert "max_in_flight = 2" in message, message
        assert out["budget_1"][0] == "CapacityError" and "max_in_flight = 1" in out["budget_1"][1]
        for i, x_out in enumerate(out["x_outs"]):
            assert torch.equal(x_out, references[i][rank]), f"rank {rank}, microbatch {i}"
        assert out["in_flight_end"] == 0


# --------------------------------------------------------------------------------------------
# 6. Soak (short)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("carrier", CPU_CARRIERS)
def test_short_soak_matches_reference_and_leaks_no_transfers(rank_pools, carrier):
    from bench import soak

    results = rank_pools(2).run(on, carrier, soak.rank_loop, 50, 1234, 1, timeout_s=RUN_S)
    for stats in results:
        assert stats["steps"] == 50
        assert stats["checked"] == 50 and stats["mismatches"] == 0, stats
        assert stats["empty_receives"] > 0 and stats["idle_experts"] > 0, stats  # the edge cases happened
        assert stats["in_flight_end"] == 0 and stats["registry_end"] == 0, stats
        assert stats["workers_end"] == max(stats["workers_start"], 1), stats  # one worker per group, reused
