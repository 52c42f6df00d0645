"""The window carrier (issue 20) on its own: a window too small for an exchange refuses it before
anything is sent; slots are reused under the in-flight budget however far one rank runs ahead and
in whatever order its teardowns come; a dead peer is named at once; shared-memory files never
outlive their group. Every case runs over real rank processes (the carrier forced with
`OVERLAP_TRANSPORT=window`); the protocol tests (faults, reliability, the link) run on it too."""

from __future__ import annotations

import glob
import os
import shutil
import time

import pytest
import torch
import torch.distributed as dist

from overlap.launch import RankPool

from .carriers import on
from .reference import Case, build, dense_reference

RUN_S = 120.0
GOOD = Case(world=2, batches=(4, 4), seed=11)


def _fresh_group() -> str:
    return dist.new_group(list(range(dist.get_world_size())), backend="gloo").group_name


def _outcome(fn, *args, **kwargs) -> tuple[str, str]:
    try:
        fn(*args, **kwargs)
    except Exception as exc:
        return type(exc).__name__, str(exc)
    return "", ""


def _chain(group: str, case: Case) -> torch.Tensor:
    from .test_faults import _chain as chain

    return chain(group, case)


# --------------------------------------------------------------------------------------------
# Size
# --------------------------------------------------------------------------------------------


def _too_small_case() -> dict:
    """HCCL_BUFFSIZE = 10 MB passes the ops' own rule for this batch, but split into 32 slots (max_in_flight
    16) a slot's region holds 320 KB, less than the 512 KB each rank sends its peer: every rank's setup
    raises ValueError, takes no exchange number and sends nothing; then a small exchange on the same
    group works."""
    from overlap import ops
    from overlap.ops import transport

    rank, world = dist.get_rank(), dist.get_world_size()
    os.environ["HCCL_BUFFSIZE"] = "10"
    ops.configure(max_in_flight=16)
    out: dict = {}
    try:
        g = _fresh_group()
        x = torch.randn(32, 4096).to(torch.bfloat16)
        ids = torch.tensor([[2, 3] if rank == 0 else [0, 1]] * 32, dtype=torch.int32)  # every row to the peer
        out["big"] = _outcome(ops.dispatch_setup, x, ids, g, world, rank, 4)
        lane = transport._workers[g]["window"]
        out["after"] = (len(ops.in_flight(g)), ops.group_status(g).next_exchange, lane.writes == [])
        out["peer_slot_untouched"] = all(
            int(lane.own.words[lane.layout.counter(r, s)]) == 0 for r in range(world) for s in range(lane.slots)
        )
        out["x_out"] = _chain(g, GOOD)
        out["kind"] = ops.transport_kind(g)
    finally:
        del os.environ["HCCL_BUFFSIZE"]
        ops.configure(max_in_flight=2)
    return out


def test_a_window_too_small_refuses_the_setup_before_anything_is_sent(rank_pools):
    results = rank_pools(2).run(on, "window", _too_small_case, timeout_s=RUN_S)
    reference = dense_reference(GOOD)
    for rank, out in enumerate(results):
        type_name, message = out["big"]
        assert type_name == "ValueError", out["big"]
        assert "HCCL_BUFFSIZE is too small for the window carrier" in message, message
        assert f"for rank {1 - rank} do not fit" in message and "32 slots x 1 peers" in message, message
        assert "OVERLAP_TRANSPORT=gloo" in message
        assert out["after"] == (0, 0, True)  # no slot, no number, nothing queued
        assert out["peer_slot_untouched"]  # the peer wrote nothing into this rank's window either
        assert torch.equal(out["x_out"], reference[rank]) and out["kind"] == "window"


# --------------------------------------------------------------------------------------------
# Slot reuse
# --------------------------------------------------------------------------------------------

ROW = 64


def _start(g: str, op: str, tag: int):
    """A raw exchange: 3 rows of ROW bytes to every rank, each byte = (tag, this rank, the peer)."""
    from overlap.ops import transport

    pg = dist.distributed_c10d._resolve_process_group(g)
    rank, world = dist.get_rank(pg), dist.get_world_size(pg)
    buf = torch.cat([torch.full((3, ROW), (tag * 16 + rank * 4 + r) % 251, dtype=torch.uint8) for r in range(world)])
    values = dict.fromkeys(transport.PARAM_FIELDS, 0) | {"ep_world_size": world, "row_bytes": ROW}
    header = transport.make_header(op, values, 3, 1)
    counts = torch.full((world, 1), 3, dtype=torch.int64)
    return transport.start(op, pg, g, send_buf=buf, send_rows=[3] * world, block_counts=counts, header=header)


def _expected(tag: int, rank: int, world: int) -> torch.Tensor:
    return torch.cat([torch.full((3, ROW), (tag * 16 + r * 4 + rank) % 251, dtype=torch.uint8) for r in range(world)])


def _slot_reuse_case(steps: int) -> dict:
    """max_in_flight 1 (2 slots). Rank 0 keeps a dispatch and a combine in flight and sets up the
    next pair as soon as it has torn the previous one down; rank 1 sleeps before each step and
    tears its pair down in reverse order. Rank 0 thus runs ahead of what rank 1 has consumed: its
    writes wait for the slot (they never overwrite an unread one) and every byte arrives."""
    from overlap import ops
    from overlap.ops import transport

    rank, world = dist.get_rank(), dist.get_world_size()
    ops.configure(max_in_flight=1, timeout_s=20.0)  # a broken guard fails within the test's bound
    g = _fresh_group()
    ok, deferred = [], 0
    try:
        for step in range(steps):
            if rank == 1:
                time.sleep(0.03)
            pair = [_start(g, "dispatch", 2 * step), _start(g, "combine", 2 * step + 1)]
            deferred += len(transport._workers[g]["window"].writes)
            order = [1, 0] if rank == 1 else [0, 1]
            for i in order:
                if rank == 1 and i == 0:
                    # Between its two reads: rank 0, done with this pair, sets up the next one and
                    # its dispatch finds this slot unread (a guard that let it write would corrupt it).
                    time.sleep(0.03)
                rows, counts = pair[i].take()
                ok.append(torch.equal(rows, _expected(2 * step + i, rank, world)) and int(counts.sum()) == 3 * world)
                with transport._registry_lock:  # a teardown's claim: the budget is free again
                    transport._registry.pop(pair[i].ticket, None)
    finally:
        ops.configure(max_in_flight=2, timeout_s=None)
    lane = transport._workers[g]["window"]
    return {"ok": ok, "deferred": deferred, "slots": lane.slots, "next": lane.next_seq}


def test_slots_are_reused_under_the_budget_without_overwriting_an_unread_one(rank_pools):
    steps = 8
    results = rank_pools(2).run(on, "window", _slot_reuse_case, steps, timeout_s=RUN_S)
    for rank, out in enumerate(results):
        assert out["slots"] == 2 and out["next"] == 2 * steps  # 16 exchanges through 2 slots
        assert out["ok"] == [True] * (2 * steps), (rank, out["ok"])
    assert results[0]["deferred"] > 0, "rank 0 never ran ahead: the slot guard was not exercised"


# --------------------------------------------------------------------------------------------
# Dead peers, shared-memory files
# --------------------------------------------------------------------------------------------


def _dead_peer_case(timeout_s: float) -> tuple[str, str, float] | None:
    """Both ranks make their windows (one exchange), then rank 1 exits: rank 0's next teardown
    names it as soon as its process is gone, long before the timeout."""
    from overlap import ops

    rank, world = dist.get_rank(), dist.get_world_size()
    g = _fresh_group()
    _chain(g, GOOD)
    if rank == 1:
        os._exit(3)
    x, ids = build(GOOD)["x"][rank], build(GOOD)["ids"][rank]
    with ops.comm_options(timeout_s=timeout_s):
        start = time.perf_counter()
        y, _, cmd = ops.dispatch_setup(x, ids, g, world, rank, GOOD.experts)
        name, message = _outcome(ops.dispatch_teardown, x, y, ids, cmd, g, world, rank, GOOD.experts)
        return name, message, time.perf_counter() - start


def test_a_dead_peer_is_named_at_once():
    from .test_reliability import _run_survivors

    timeout_s = 60.0
    with RankPool(2, threads=1) as pool:
        outcomes = _run_survivors(pool, on, "window", _dead_peer_case, timeout_s, timeout_s=RUN_S)
        # The parent reaps the dead rank late on purpose: a zombie counts as gone.
        assert set(outcomes) == {0}, outcomes
        ok, (name, message, elapsed) = outcomes[0]
        assert ok and name == "CommError", (name, message)
        assert "ranks [1] exited" in message and "have not delivered" in message, message
        assert elapsed < timeout_s / 2, elapsed  # seen from the process table, not waited out


def _files_case(silent: int) -> dict:
    """A group where every rank exchanged (its window file is unlinked once every peer mapped it),
    and one where rank `silent` never takes part (the others' files stay until shutdown)."""
    from overlap import ops
    from overlap.ops import transport

    rank = dist.get_rank()
    g = _fresh_group()
    _chain(g, GOOD)
    lane = transport._workers[g]["window"]
    out = {"pid": os.getpid(), "unlinked_after_exchange": not os.path.exists(lane.path) and lane.unlinked}
    h = _fresh_group()
    if rank != silent:
        x, ids = build(GOOD)["x"][rank], build(GOOD)["ids"][rank]
        with ops.comm_options(timeout_s=0.3):
            y, _, cmd = ops.dispatch_setup(x, ids, h, dist.get_world_size(), rank, GOOD.experts)
            out["silent"] = _outcome(
                ops.dispatch_teardown, x, y, ids, cmd, h, dist.get_world_size(), rank, GOOD.experts
            )
        out["kept_while_a_peer_never_mapped"] = os.path.exists(transport._workers[h]["window"].path)
    return out


def test_window_files_are_gone_after_use_and_after_shutdown():
    pool = RankPool(2, threads=1)
    try:
        results = pool.run(on, "window", _files_case, 1, timeout_s=RUN_S)
    finally:
        pool.close()  # each rank calls ops.shutdown() on its way out
    pids = [out["pid"] for out in results]
    assert all(out["unlinked_after_exchange"] for out in results), results
    assert results[0]["silent"][0] == "CommTimeoutError" and "ranks [1] have not delivered" in results[0]["silent"][1]
    assert results[0]["kept_while_a_peer_never_mapped"]
    left = [f for pid in pids for f in glob.glob(f"/dev/shm/overlap-win-{pid}-*")]
    assert left == [], left


def _sweep_case(stale: str) -> dict:
    from overlap.ops import window

    g = _fresh_group()
    _chain(g, GOOD)  # the first window of a fresh process sweeps
    return {"stale_left": os.path.exists(stale), "again": window.sweep_stale_windows()}


def test_windows_of_killed_processes_are_swept():
    import subprocess

    gone = subprocess.Popen(["true"])
    gone.wait()
    stale = f"/dev/shm/overlap-win-{gone.pid}-7"
    with open(stale, "wb") as f:
        f.write(b"\0" * 4096)
    pool = RankPool(2, threads=1)
    try:
        results = pool.run(on, "window", _sweep_case, stale, timeout_s=RUN_S)
    finally:
        pool.close()
        if os.path.exists(stale):
            os.unlink(stale)
    assert [r["stale_left"] for r in results] == [False, False], results
    assert all(stale.rsplit("/", 1)[1] not in r["again"] for r in results)


@pytest.mark.parametrize("world", [3])
def test_three_ranks_with_uneven_batches_match_the_reference(rank_pools, world):
    from .reference import run_case

    case = Case(world=world, batches=(2, 7, 3), active=(2, 7, 0), global_bs=21, experts=6, top_k=3, quant=2, seed=3)
    results = rank_pools(world).run(on, "window", run_case, case, timeout_s=RUN_S)
    reference = dense_reference(case)
    for rank, res in enumerate(results):
        assert torch.equal(res["x_out"], reference[rank])


def test_the_default_takes_the_window_only_where_shared_memory_could_hold_every_window(monkeypatch, tmp_path):
    """A write past a full /dev/shm (a container's 64 MB) is a SIGBUS, not an error: the default
    choice checks the room for W whole windows first, and falls back to gloo without the folder."""
    from overlap.ops import staging, window

    free = shutil.disk_usage(window.SHM_DIR).free
    monkeypatch.setenv("HCCL_BUFFSIZE", str(max(1, free // 2**20 // 4)))
    assert staging.shm_has_room(2)
    assert not staging.shm_has_room(8)
    monkeypatch.setattr(window, "SHM_DIR", str(tmp_path / "missing"))
    assert not staging.shm_has_room(2)


def _release_case() -> dict:
    from overlap import ops
    from overlap.ops import transport

    from .carriers import forced

    case = Case(world=dist.get_world_size(), batches=(8,) * dist.get_world_size(), experts=4, top_k=2, seed=3)
    p = build(case)
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.new_group(list(range(world)), backend="gloo")
    g = group.group_name
    x, ids = p["x"][rank], p["ids"][rank]
    with forced("window"):
        y, _, cmd = ops.dispatch_setup(x, ids, g, world, rank, case.experts)
        ops.dispatch_teardown(x, y, ids, cmd, g, world, rank, case.experts)
    lanes = transport._lanes_of(g)
    path = lanes[0].path
    dist.barrier()  # every rank is done with the group
    ops.release(group)
    left = transport._lanes_of(g)
    dist.destroy_process_group(group)
    return {"lanes_before": len(lanes), "lanes_after": len(left), "file_left": os.path.exists(path)}


def test_release_retires_a_groups_lanes_before_it_is_destroyed(rank_pools):
    for res in rank_pools(2).run(_release_case):
        assert res == {"lanes_before": 1, "lanes_after": 0, "file_left": False}
