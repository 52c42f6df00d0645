"""The device path of the portable ops, run on CPU: setups that read no tensor values on the caller's
thread, sizes and input checks resolved on the transport's thread, and the staged transport's
sequence (ready → copy to host → exchange → copy back → done), over real gloo ranks.

`staging.simulate_device()` makes cpu tensors take the device path. `HostReads` proves the setups
never read a tensor's values on the caller's thread: a torch function mode catches `.item()`,
`.tolist()`, `bool(t)`, `int(t)`, `.cpu()`, ... and a torch dispatch mode catches the aten ops that
wait for the device on CUDA (`_local_scalar_dense`, `nonzero`, `bincount`, `repeat_interleave`
without an output size, boolean indexing, `unique`, ...). Both modes are per thread, so the
transport's thread (which may read) is not watched.
"""

from __future__ import annotations

import threading

import pytest
import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from .reference import Case, affine, build, common_kwargs, dense_reference, rank_experts, run_case

# --------------------------------------------------------------------------------------------
# The host-read detector
# --------------------------------------------------------------------------------------------

_READ_METHODS = {
    "item",
    "tolist",
    "numpy",
    "cpu",
    "__bool__",
    "__int__",
    "__index__",
    "__float__",
    "__complex__",
    "__format__",
    "__repr__",
    "__str__",
    "__array__",
    "__iter__",
}
_SYNC_OPS = {
    "_local_scalar_dense",
    "nonzero",
    "bincount",
    "masked_select",
    "_unique",
    "_unique2",
    "unique_dim",
    "unique_consecutive",
    "equal",
    "is_nonzero",
    "histc",
    "_assert_async",
}


class _FunctionReads(TorchFunctionMode):
    def __init__(self, log: list[str]) -> None:
        super().__init__()
        self.log = log

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in _READ_METHODS:
            self.log.append(name)
        elif name == "to" and any(_is_cpu(a) for a in (*args[1:], *kwargs.values())):
            self.log.append("to(cpu)")
        return func(*args, **kwargs)


def _is_cpu(value: object) -> bool:
    return (isinstance(value, str) and value.startswith("cpu")) or (
        isinstance(value, torch.device) and value.type == "cpu"
    )


class _DispatchReads(TorchDispatchMode):
    def __init__(self, log: list[str]) -> None:
        super().__init__()
        self.log = log

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        base = func._schema.name.split("::")[-1]
        if base in _SYNC_OPS:
            self.log.append(base)
        elif base == "repeat_interleave" and func._overloadname == "Tensor" and kwargs.get("output_size") is None:
            self.log.append("repeat_interleave(tensor)")
        elif base in ("index", "index_put", "index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ()) if i is not None
        ):
            self.log.append(f"{base}(bool mask)")
        return func(*args, **kwargs)


class HostReads:
    """`with HostReads() as reads: ...`: `reads.log` lists every host read made on this thread."""

    def __init__(self) -> None:
        self.log: list[str] = []
        self._modes = (_FunctionReads(self.log), _DispatchReads(self.log))

    def __enter__(self) -> HostReads:
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)


@pytest.mark.parametrize(
    "read",
    [
        lambda t: t.tolist(),
        lambda t: t.sum().item(),
        lambda t: bool((t > 1).any()),
        lambda t: int(t.sum()),
        lambda t: t.cpu(),
        lambda t: torch.bincount(t, minlength=4),
        lambda t: t[t > 1],
        lambda t: t.nonzero(),
        lambda t: torch.repeat_interleave(t, t),
        lambda t: f"{t.sum()}",
        lambda t: range(t[0]),
    ],
    ids=[
        "tolist",
        "item",
        "bool",
        "int",
        "cpu",
        "bincount",
        "bool-index",
        "nonzero",
        "repeat_interleave",
        "format",
        "index",
    ],
)
def test_host_read_detector_catches_each_kind_of_read(read):
    t = torch.tensor([1, 2, 3])
    with HostReads() as reads:
        read(t)
    assert reads.log, "the detector missed a host read"


def test_host_read_detector_ignores_fixed_shape_work_and_other_threads():
    t = torch.tensor([3, 1, 2])
    with HostReads() as reads:
        torch.argsort(t, stable=True).cumsum(0)
        torch.zeros(4, dtype=torch.int64).scatter_add_(0, t, torch.ones_like(t))
        other = threading.Thread(target=lambda: t.tolist())
        other.start()
        other.join()
    assert reads.log == []


# --------------------------------------------------------------------------------------------
# The ops, device path, on ranks
# --------------------------------------------------------------------------------------------


def run_case_on(case: Case, device: str = "cpu", simulate: bool = True, watch: bool = True) -> dict:
    """`reference.run_case` with the tensors on `device` (on cpu under `simulate_device` when
    `simulate`), the setups watched by `HostReads`. Returns cpu tensors and what was seen."""
    from overlap import ops
    from overlap.ops import staging

    rank, world = dist.get_rank(), dist.get_world_size()
    p = build(case)
    dev = torch.device(device)
    group = dist.group.WORLD.group_name
    x, ids, w = p["x"][rank].to(dev), p["ids"][rank].to(dev), p["weights"][rank].to(dev)
    mask = None if case.active is None else (torch.arange(x.shape[0]) < case.active[rank]).to(dev)
    smooth = None if p["smooth"] is None else p["smooth"].to(dev)
    kw = common_kwargs(case)
    reads: list[str] = []

    def watched(fn, *args, **kwargs):
        with staging.simulate_device() if simulate else _nothing(), HostReads() if watch else _nothing() as seen:
            out = fn(*args, **kwargs)
        reads.extend(seen.log if watch else [])
        return out

    y, expand_idx, cmd = watched(
        ops.dispatch_setup,
        x,
        ids,
        group,
        world,
        rank,
        case.experts,
        scales=smooth,
        x_active_mask=mask,
        quant_mode=case.quant,
        **kw,
    )
    handle = ops.transfer_of(cmd)
    expand_x, dyn_scales, assist, token_nums = ops.dispatch_teardown(
        x,
        y,
        ids,
        cmd,
        group,
        world,
        rank,
        case.experts,
        quant_mode=case.quant,
        expert_token_nums_type=case.token_nums_type,
        **kw,
    )
    dispatch_trace = list(handle.plan.trace)
    out = rank_experts(case, p, rank, expand_x, dyn_scales, token_nums).to(dev)
    quant_x, cmd2 = watched(ops.combine_setup, out, ids, assist, group, world, rank, case.experts, **kw)
    handle2 = ops.transfer_of(cmd2)
    shared_x = affine(p["x"][rank].float(), p["sa"][0], p["sb"][0], case.dtype).to(dev) if case.use_shared_x else None
    x_out = ops.combine_teardown(
        out,
        quant_x,
        ids,
        expand_idx,
        w,
        cmd2,
        group,
        world,
        rank,
        case.experts,
        x_active_mask=mask,
        shared_expert_x=shared_x,
        **kw,
    )
    return {
        "x_out": x_out.cpu(),
        "y": y.cpu(),
        "expand_idx": expand_idx.cpu(),
        "expand_x": expand_x.cpu(),
        "assist": assist.cpu(),
        "token_nums": token_nums.cpu(),
        "reads": reads,
        "kind": staging.transport_kind(group),
        "traces": (dispatch_trace, list(handle2.plan.trace)),
        "devices": (y.device.type, x_out.device.type, expand_x.device.type),
    }


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _host_path_case(case: Case) -> dict:
    """The same chain on the host path (no simulation): outputs to compare, and its host reads."""
    res = run_case_on(case, "cpu", simulate=False)
    plain = run_case(case)
    return {**res, "plain_x_out": plain["x_out"]}


DEVICE_CASES = [
    pytest.param(Case(world=2, batches=(4, 4)), id="w2-plain"),
    pytest.param(Case(world=2, batches=(3, 6), global_bs=12, use_shared_x=True), id="w2-uneven-shared-x"),
    pytest.param(Case(world=2, batches=(5, 5), active=(3, 0)), id="w2-active-mask-empty-rank"),
    pytest.param(Case(world=2, batches=(4, 4), quant=2, with_scales=True), id="w2-int8-scales"),
    pytest.param(
        Case(world=4, batches=(3,) * 4, shared_ranks=2, shared_num=2, experts=4, active=(3, 1, 0, 2)),
        id="w4-two-shared-experts-mask",
    ),
    pytest.param(Case(world=4, batches=(2, 7, 1, 5), global_bs=28, experts=8, top_k=3, quant=2), id="w4-uneven-int8"),
    pytest.param(Case(world=4, batches=(4,) * 4, skip_ranks=(2,)), id="w4-rank-receives-nothing"),
]


@pytest.mark.parametrize("case", DEVICE_CASES)
def test_device_path_setups_read_nothing_on_the_host_and_equal_the_reference(rank_pools, case):
    results = rank_pools(case.world).run(run_case_on, case)
    host = rank_pools(case.world).run(_host_path_case, case)
    reference = dense_reference(case)
    for rank, (res, eager) in enumerate(zip(results, host)):
        assert res["reads"] == [], f"rank {rank}: a setup read tensor values on the caller's thread: {res['reads']}"
        assert eager["reads"], "the host path reads values (it may on cpu): the detector must see them"
        assert torch.equal(res["x_out"], reference[rank]), f"rank {rank} differs from the dense reference"
        assert torch.equal(eager["x_out"], eager["plain_x_out"])
        # Data movement is bit-exact against the host path: the same staging rows and layout.
        for name in ("y", "expand_x", "assist", "token_nums"):
            assert torch.equal(res[name], eager[name]), f"rank {rank}: {name} differs from the host path"
        n = case.batches[rank] if case.active is None else case.active[rank]
        assert torch.equal(res["expand_idx"][: n * case.top_k], eager["expand_idx"][: n * case.top_k])
        assert res["kind"] == "gloo-staged" and eager["kind"] == "window"  # window: the cpu default
        for trace in res["traces"]:
            assert trace == ["ready", "resolve", "to_host", "exchange", "to_device", "done"]
        for trace in eager["traces"]:
            assert trace == ["exchange", "done"]  # the window carrier: written at the setup, read at the teardown


def _pipeline_case(microbatches: int) -> dict:
    """The scheduler's pipeline over the device path: the simulate flag follows the ops onto the
    pipeline's threads, every exchange is staged, and the output equals the host path's."""
    import overlap
    from overlap.ops import staging

    rank = dist.get_rank()
    layer = overlap.MoELayer(1024, 4, 2, 256, num_shared_experts=1, seed=5)
    x = torch.randn(96, 1024, generator=torch.Generator().manual_seed(rank)).to(torch.bfloat16)
    g = dist.group.WORLD.group_name
    with overlap.scheduler(microbatches=microbatches):
        host = layer(x)
    host_kind = staging.transport_kind(g)
    with staging.simulate_device(), overlap.scheduler(microbatches=microbatches) as s:
        staged = layer(x)
    return {
        "equal": torch.equal(staged, host),
        "kinds": (host_kind, staging.transport_kind(g)),
        "setups": sum(str(step.node).startswith("dispatch_setup@") for step in s.plan.steps),
    }


@pytest.mark.parametrize("microbatches", [1, 2])
def test_pipeline_over_the_device_path_equals_the_host_path(rank_pools, microbatches):
    for res in rank_pools(2).run(_pipeline_case, microbatches):
        # The same microbatches through the same GEMMs: only the transport path differs.
        assert res["equal"]
        assert res["kinds"] == ("window", "gloo-staged")
        assert res["setups"] == microbatches


# --------------------------------------------------------------------------------------------
# Deferred input checks: every rank stops at the headers, the bad rank raises its ValueError
# --------------------------------------------------------------------------------------------


def _bad_input_case(bad_rank: int, what: str) -> dict:
    from overlap import ops
    from overlap.errors import CommError
    from overlap.ops import staging

    rank, world = dist.get_rank(), dist.get_world_size()
    case = Case(world=world, batches=(4,) * world)
    p = build(case)
    g = dist.group.WORLD.group_name
    x, ids = p["x"][rank], p["ids"][rank].clone()
    mask = None
    if rank == bad_rank:
        if what == "range":
            ids[2, 1] = case.experts + 3
        elif what == "duplicate":
            ids[1, 1] = ids[1, 0]
        elif what == "mask":
            mask = torch.tensor([True, False, True, False])
    with staging.simulate_device(), HostReads() as seen:
        y, expand_idx, cmd = ops.dispatch_setup(x, ids, g, world, rank, case.experts, x_active_mask=mask)
    outcome = {"reads": seen.log}
    try:
        ops.dispatch_teardown(x, y, ids, cmd, g, world, rank, case.experts)
        outcome["error"] = None
    except ValueError as exc:
        outcome["error"] = ("ValueError", str(exc), isinstance(exc, CommError))
    except CommError as exc:
        outcome["error"] = ("CommError", str(exc), True)
    # The group stays usable: a good exchange right after works on every rank.
    res = run_case_on(case, "cpu")
    outcome["after_ok"] = torch.equal(res["x_out"], dense_reference(case)[rank])
    return outcome


@pytest.mark.parametrize(
    "what, match",
    [
        ("range", r"expert_ids values must be in \[0, moe_expert_num = 8\), got 11"),
        ("duplicate", r"expert_ids must hold distinct experts within a row, got row 1"),
        ("mask", r"x_active_mask must be a True-prefix .* got 2 True values"),
    ],
)
def test_deferred_check_raises_value_error_on_the_bad_rank_and_comm_error_on_its_peers(rank_pools, what, match):
    import re

    results = rank_pools(2).run(_bad_input_case, 1, what)
    good, bad = results
    assert good["reads"] == [] and bad["reads"] == []
    assert bad["error"][0] == "ValueError" and re.search(match, bad["error"][1]), bad["error"]
    assert good["error"][0] == "CommError" and "rank 1 gave dispatch_setup invalid input" in good["error"][1]
    assert good["after_ok"] and bad["after_ok"]


def _same_errors_and_link_case(simulate: bool, latency_s: float) -> dict:
    """A parameter disagreement, then a good exchange on the emulated link, staged or not."""
    from overlap import ops
    from overlap.errors import CommError
    from overlap.ops import staging

    rank, world = dist.get_rank(), dist.get_world_size()
    case = Case(world=world, batches=(4,) * world)
    p = build(case)
    g = dist.group.WORLD.group_name
    x, ids = p["x"][rank], p["ids"][rank]
    sim = staging.simulate_device if simulate else _nothing
    with sim():
        y, _, cmd = ops.dispatch_setup(x, ids, g, world, rank, case.experts, global_bs=8 * (rank + 1))
    try:
        ops.dispatch_teardown(x, y, ids, cmd, g, world, rank, case.experts, global_bs=8 * (rank + 1))
        mismatch = None
    except CommError as exc:
        mismatch = str(exc)
    ops.configure(link=ops.EmulatedLink(latency_s=latency_s, bandwidth_bytes_per_s=1e12))
    try:
        with sim():
            y, _, cmd = ops.dispatch_setup(x, ids, g, world, rank, case.experts)
        handle = ops.transfer_of(cmd)
        ops.dispatch_teardown(x, y, ids, cmd, g, world, rank, case.experts)
    finally:
        ops.configure(link=None)
    return {"mismatch": mismatch, "link_s": handle.finished_at - handle.started_at, "kind": handle.plan.kind}


def test_staged_exchange_keeps_the_header_check_and_the_emulated_link(rank_pools):
    latency_s = 0.2
    staged = rank_pools(2).run(_same_errors_and_link_case, True, latency_s)
    plain = rank_pools(2).run(_same_errors_and_link_case, False, latency_s)
    for s, h in zip(staged, plain):
        assert s["kind"] == "gloo-staged" and h["kind"] == "window"
        assert s["mismatch"] is not None and s["mismatch"] == h["mismatch"]
        assert "ranks disagree on global_bs" in s["mismatch"]
        # The worker sleeps until the modelled completion: never shorter than the latency.
        assert s["link_s"] >= latency_s and h["link_s"] >= latency_s


def _bad_assist_case() -> dict:
    from overlap import ops
    from overlap.ops import staging

    rank, world = dist.get_rank(), dist.get_world_size()
    case = Case(world=world, batches=(4,) * world)
    p = build(case)
    g = dist.group.WORLD.group_name
    x, ids = p["x"][rank], p["ids"][rank]
    y, expand_idx, cmd = ops.dispatch_setup(x, ids, g, world, rank, case.experts)
    expand_x, _, assist, _ = ops.dispatch_teardown(x, y, ids, cmd, g, world, rank, case.experts)
    assist = assist.clone()
    if rank == 0:
        assist[1] = assist[0] - 1  # a negative count
    with staging.simulate_device(), HostReads() as seen:
        qx, cmd2 = ops.combine_setup(expand_x, ids, assist, g, world, rank, case.experts)
    try:
        ops.combine_teardown(expand_x, qx, ids, expand_idx, p["weights"][rank], cmd2, g, world, rank, case.experts)
        return {"reads": seen.log, "error": None}
    except Exception as exc:
        return {"reads": seen.log, "error": (type(exc).__name__, str(exc), isinstance(exc, ValueError))}


def test_combine_deferred_assist_info_check(rank_pools):
    bad, good = rank_pools(2).run(_bad_assist_case)
    assert bad["reads"] == [] and good["reads"] == []
    assert bad["error"][2]
    assert "assist_info_for_combine must hold the non-decreasing cumulative counts" in bad["error"][1]
    assert good["error"][0] == "_ParameterMismatch" and "rank 0 gave combine_setup invalid input" in good["error"][1]


# --------------------------------------------------------------------------------------------
# Units: kinds, backend choice, the stager's sequence
# --------------------------------------------------------------------------------------------


def test_backend_for_gives_nccl_only_when_every_rank_has_its_own_gpu():
    from overlap.ops.staging import backend_for

    assert backend_for("cpu", 4) == "gloo"
    assert backend_for("cuda", 2, num_gpus=2) == "nccl"
    assert backend_for("cuda", 4, num_gpus=2) == "gloo"
    assert backend_for("cuda", 2, num_gpus=1) == "gloo"
    with pytest.raises(ValueError, match="local_world_size must be >= 1, got 0"):
        backend_for("cuda", 0, num_gpus=1)


def _kinds_case() -> dict:
    from overlap.ops import staging

    group = dist.group.WORLD
    out = {
        "cpu": staging.kind_for(group, torch.device("cpu")),
        "cuda-over-gloo": staging.kind_for(group, torch.device("cuda", 0)),
    }
    with staging.simulate_device():
        out["simulated"] = staging.kind_for(group, torch.device("cpu"))
    try:
        staging.kind_for(group, torch.device("meta"))
    except ValueError as exc:
        out["meta"] = str(exc)
    import os

    os.environ["OVERLAP_TRANSPORT"] = "window"
    try:
        out["window-cuda"] = staging.kind_for(group, torch.device("cuda", 0))  # the CUDA IPC window, opt-in
    except ValueError as exc:
        out["window-cuda"] = str(exc)
    finally:
        del os.environ["OVERLAP_TRANSPORT"]
    for forced in ("gloo", "window", "nccl", "tcp"):
        os.environ["OVERLAP_TRANSPORT"] = forced
        try:
            out[f"forced-{forced}"] = staging.kind_for(group, torch.device("cpu"))
        except ValueError as exc:
            out[f"forced-{forced}"] = str(exc)
        finally:
            del os.environ["OVERLAP_TRANSPORT"]
    return out


def test_transport_kind_follows_the_tensors_and_the_backend(rank_pools):
    res = rank_pools(2).run(_kinds_case)[0]
    assert res["cpu"] == "window" and res["cuda-over-gloo"] == "gloo-staged" and res["simulated"] == "gloo-staged"
    assert res["forced-gloo"] == "gloo" and res["forced-window"] == "window"
    assert res["window-cuda"] == "window"  # forced: cuda tensors on a gloo group take the CUDA IPC window
    assert "OVERLAP_TRANSPORT=nccl needs cuda tensors on an nccl group" in res["forced-nccl"]
    assert "OVERLAP_TRANSPORT must be one of ('gloo', 'window', 'nccl'), got 'tcp'" in res["forced-tcp"]
    assert "cpu or cuda tensors, got device meta" in res["meta"]


def test_stager_copies_to_host_and_back_around_the_exchange():
    from overlap.ops.staging import Stager

    class FakeTransfer:
        send_buf = torch.arange(12, dtype=torch.uint8).view(3, 4)

    transfer = FakeTransfer()
    original = transfer.send_buf
    seen = {}

    def exchange(t):
        seen["buf"] = t.send_buf
        return t.send_buf * 2, torch.zeros(1, 1, dtype=torch.int64)

    trace: list[str] = []
    rows, _ = Stager(None, trace).exchange(transfer, exchange)
    assert trace == ["to_host", "exchange", "to_device"]
    assert seen["buf"].data_ptr() != original.data_ptr() and torch.equal(seen["buf"], original)
    assert transfer.send_buf is original  # restored for the teardown
    assert torch.equal(rows, original * 2)
