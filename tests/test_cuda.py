"""On a CUDA GPU: the ops, the scheduler, the device-time report and the transformers integration,
with 2 and 4 ranks sharing one GPU (their exchanges are staged through pinned host buffers over
gloo: NCCL refuses two ranks on one GPU). Skipped, with the reason, where no GPU is present;
`bash bench/device_check.sh` runs them on a lent GPU machine.

Every rank process uses `cuda:(rank % device_count)`.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

from .reference import Case, affine, build, dense_reference
from .test_staging import HostReads, run_case_on

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA GPU (run bash bench/device_check.sh on one)"
    ),
]


def _device() -> str:
    from overlap.launch import rank_device

    device = rank_device("cuda", dist.get_rank())  # cuda:(rank % G): the ranks share the GPUs there are
    torch.cuda.set_device(device)
    return str(device)


def _cuda_case(case: Case) -> dict:
    return run_case_on(case, _device(), simulate=False)


def _sleep_cycles(seconds: float) -> int:
    """GPU clock cycles for `torch.cuda._sleep` to spin about `seconds`, measured with timing events.

    (The device properties' `clock_rate` is gone with CUDA 13: its old 1.5 GHz fallback made the
    "20 ms" sleeps 15 ms on a 1.98 GHz H200, half of why the device-time report saw 29 ms.)
    """
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    cycles = 20_000_000
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    end.synchronize()
    return int(cycles / (start.elapsed_time(end) * 1e-3) * seconds)


# --------------------------------------------------------------------------------------------
# The ops against the dense reference, ranks sharing one GPU
# --------------------------------------------------------------------------------------------

CASES = [
    pytest.param(Case(world=2, batches=(4, 4)), id="w2-plain"),
    pytest.param(Case(world=2, batches=(5, 5), active=(3, 0)), id="w2-active-mask-empty-rank"),
    pytest.param(Case(world=2, batches=(4, 4), quant=2, with_scales=True), id="w2-int8-scales"),
    pytest.param(Case(world=4, batches=(4,) * 4, shared_ranks=2, experts=4), id="w4-shared-ranks"),
    pytest.param(Case(world=4, batches=(2, 7, 1, 5), global_bs=28, experts=8, top_k=3), id="w4-uneven"),
]


@pytest.mark.parametrize("case", CASES)
def test_ops_equal_the_dense_reference_with_ranks_sharing_one_gpu(rank_pools, case):
    results = rank_pools(case.world).run(_cuda_case, case)
    reference = dense_reference(case)
    for rank, res in enumerate(results):
        assert res["devices"] == ("cuda", "cuda", "cuda")
        assert res["kind"] == "gloo-staged"
        assert res["reads"] == [], f"rank {rank}: a setup read device values on the host: {res['reads']}"
        assert torch.equal(res["x_out"], reference[rank]), f"rank {rank} differs from the dense reference"
        for trace in res["traces"]:
            assert trace == ["ready", "resolve", "to_host", "exchange", "to_device", "done"]


# --------------------------------------------------------------------------------------------
# Fire-and-forget: a setup returns while a kernel queued before it still runs
# --------------------------------------------------------------------------------------------


def _queued_kernel_case() -> dict:
    from overlap import ops

    dev = _device()
    rank, world = dist.get_rank(), dist.get_world_size()
    case = Case(world=world, batches=(8,) * world)
    p = build(case)
    g = dist.group.WORLD.group_name
    x, ids, w = p["x"][rank].to(dev), p["ids"][rank].to(dev), p["weights"][rank].to(dev)
    y, _, cmd = ops.dispatch_setup(x, ids, g, world, rank, case.experts)  # warm up: allocator, streams, worker
    ops.dispatch_teardown(x, y, ids, cmd, g, world, rank, case.experts)
    torch.cuda.synchronize()
    dist.barrier()
    torch.cuda._sleep(_sleep_cycles(0.05))
    slept = torch.cuda.Event()
    slept.record()
    t0 = time.perf_counter()
    y, expand_idx, cmd = ops.dispatch_setup(x, ids, g, world, rank, case.experts)
    host_s = time.perf_counter() - t0
    still_running = not slept.query()
    expand_x, _, assist, _ = ops.dispatch_teardown(x, y, ids, cmd, g, world, rank, case.experts)
    torch.cuda.synchronize()
    dist.barrier()
    torch.cuda._sleep(_sleep_cycles(0.05))
    slept2 = torch.cuda.Event()
    slept2.record()
    t1 = time.perf_counter()
    qx, cmd2 = ops.combine_setup(expand_x, ids, assist, g, world, rank, case.experts)
    combine_host_s = time.perf_counter() - t1
    combine_still_running = not slept2.query()
    x_out = ops.combine_teardown(expand_x, qx, ids, expand_idx, w, cmd2, g, world, rank, case.experts)
    return {
        "host_s": host_s,
        "still_running": still_running,
        "combine_host_s": combine_host_s,
        "combine_still_running": combine_still_running,
        "finite": bool(torch.isfinite(x_out.float()).all()),
    }


def test_setup_returns_while_a_queued_50ms_kernel_still_runs(rank_pools):
    results = rank_pools(2).run(_queued_kernel_case)
    for rank, res in enumerate(results):
        print(
            f"rank {rank}: dispatch_setup {res['host_s'] * 1e3:.2f} ms, combine_setup "
            f"{res['combine_host_s'] * 1e3:.2f} ms of host time behind a 50 ms kernel"
        )
        assert res["still_running"], f"rank {rank}: dispatch_setup waited for the queued kernel"
        assert res["combine_still_running"], f"rank {rank}: combine_setup waited for the queued kernel"
        assert res["finite"]


# --------------------------------------------------------------------------------------------
# Lifetime across streams under allocator pressure
# --------------------------------------------------------------------------------------------


def _pressure_case(iterations: int) -> dict:
    """Each iteration: a long kernel delays the caller's stream, the setups return, then another
    stream churns the caching allocator (allocate, fill with NaN, free) while the exchanges are in
    flight and while their received rows are read; every result is checked."""
    from overlap import ops

    dev = _device()
    rank, world = dist.get_rank(), dist.get_world_size()
    case = Case(world=world, batches=(6,) * world)
    p = build(case)
    reference = dense_reference(case)[rank].to(dev)
    g = dist.group.WORLD.group_name
    other = torch.cuda.Stream()
    bad = 0
    for _ in range(iterations):
        x, ids, w = p["x"][rank].to(dev), p["ids"][rank].to(dev), p["weights"][rank].to(dev)
        torch.cuda._sleep(_sleep_cycles(0.002))
        y, expand_idx, cmd = ops.dispatch_setup(x, ids, g, world, rank, case.experts)
        del x  # the transfer keeps what it needs
        _churn(other, dev)
        expand_x, _, assist, nums = ops.dispatch_teardown(
            p["x"][rank].to(dev), y, ids, cmd, g, world, rank, case.experts
        )
        _churn(other, dev)
        out = torch.empty_like(expand_x)
        start = 0
        for local, c in enumerate(nums.tolist()):
            e = rank * case.local_experts + local
            out[start : start + c] = affine(
                expand_x[start : start + c], p["a"][e].to(dev), p["b"][e].to(dev), case.dtype
            )
            start += c
        out[start:] = 0
        del expand_x
        qx, cmd2 = ops.combine_setup(out, ids, assist, g, world, rank, case.experts)
        out_copy = out.clone()
        out.fill_(float("nan"))  # the transfer owns its copy
        _churn(other, dev)
        x_out = ops.combine_teardown(out_copy, qx, ids, expand_idx, w, cmd2, g, world, rank, case.experts)
        _churn(other, dev)
        bad += int(not torch.equal(x_out, reference))
    return {"bad": bad}


def _churn(stream: torch.cuda.Stream, dev: str) -> None:
    with torch.cuda.stream(stream):
        for n in (1 << 12, 1 << 16, 1 << 20):
            t = torch.empty(n, dtype=torch.bfloat16, device=dev)
            t.fill_(float("nan"))
            del t


def test_tensors_crossing_streams_survive_allocator_pressure(rank_pools):
    results = rank_pools(2).run(_pressure_case, 30, timeout_s=300)
    assert [r["bad"] for r in results] == [0, 0]


# --------------------------------------------------------------------------------------------
# The scheduler against the plain layer, and the device-time report
# --------------------------------------------------------------------------------------------


def _scheduler_case(microbatches: int) -> dict:
    import overlap
    from overlap.numerics import compare

    dev = _device()
    rank = dist.get_rank()
    layer = overlap.MoELayer(1024, 4, 2, 256, num_shared_experts=1, seed=5).to(dev)
    x = torch.randn(160, 1024, generator=torch.Generator().manual_seed(rank)).to(torch.bfloat16).to(dev)
    plain = layer(x)
    with overlap.scheduler(microbatches=microbatches) as s:
        out = layer(x)
    dense = layer.dense_forward(x, dtype=torch.float32)
    return {
        "vs_dense": compare(out.cpu(), dense.cpu()),
        "plain_vs_dense": compare(plain.cpu(), dense.cpu()),
        "device": out.device.type,
        "text": str(s.report()),
    }


@pytest.mark.parametrize("microbatches", [1, 2])
def test_scheduler_equals_the_plain_layer_on_cuda(rank_pools, microbatches):
    for res in rank_pools(2).run(_scheduler_case, microbatches):
        assert res["device"] == "cuda"
        # Split differently (microbatches vs one batch): both within the dtype's tolerance of the
        # dense fp32 reference (GPU GEMMs round per row count, so never required to be bit-equal).
        assert res["vs_dense"].ok, str(res["vs_dense"])
        assert res["plain_vs_dense"].ok, str(res["plain_vs_dense"])


def _no_sync_case(microbatches: int, quant: int) -> dict:
    """Whole overlapped forwards under `torch.cuda.set_sync_debug_mode`: every CUDA call that
    synchronises the host with the device (a device value read on the host, a blocking copy, a
    stream sync) is reported, with the thread that made it.

    The debug mode is process-wide. In "warn" mode each report is a Python warning raised on the
    thread that synchronised, so it is attributed: none may come from the thread that issues the
    forward's kernels (the caller's: on cuda a layer's plan runs there). The gloo-staged carrier's
    transport thread waits for its device-to-host copies by design (allowed, docs/gpu.md); where the
    window transport carries the exchange nothing may synchronise at all, so the forwards also run
    in "error" mode."""
    import threading
    import warnings

    import overlap
    from overlap import ops
    from overlap.numerics import compare

    dev = _device()
    rank = dist.get_rank()
    layer = overlap.MoELayer(1024, 8, 2, 512, num_shared_experts=1, quant_mode=quant, seed=5).to(dev)
    x = torch.randn(256, 1024, generator=torch.Generator().manual_seed(rank)).to(torch.bfloat16).to(dev)
    with overlap.scheduler(microbatches=microbatches) as s:  # warm up: allocator, streams, clock
        layer(x)
    s.report()
    torch.cuda.synchronize()
    kind = ops.transport_kind(dist.group.WORLD.group_name)
    syncs: list[str] = []

    def show(message, category, filename, lineno, file=None, line=None):
        if "synchronizing CUDA operation" in str(message):
            syncs.append(threading.current_thread().name)

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(2):
                with overlap.scheduler(microbatches=microbatches):
                    layer(x)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    error = None
    if kind == "window":
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(2):
                with overlap.scheduler(microbatches=microbatches):
                    layer(x)
        except Exception as exc:  # noqa: BLE001 - reported with the rank's result
            error = f"{type(exc).__name__}: {exc}"
        finally:
            torch.cuda.set_sync_debug_mode(0)
    with overlap.scheduler(microbatches=microbatches) as s:
        out = layer(x)
    dense = layer.dense_forward(x, dtype=torch.float32)
    caller = threading.current_thread().name
    return {
        "kind": kind,
        "caller_syncs": [t for t in syncs if t == caller],
        "other_syncs": sorted({t: syncs.count(t) for t in syncs if t != caller}.items()),
        "error": error,
        "vs_dense": compare(out.cpu(), dense.cpu()),
    }


@pytest.mark.parametrize("quant", [0, 2], ids=["bf16", "int8"])
@pytest.mark.parametrize("microbatches", [1, 2, 4])
def test_overlapped_forward_makes_no_host_sync(rank_pools, microbatches, quant):
    results = rank_pools(2).run(_no_sync_case, microbatches, quant, timeout_s=300)
    for rank, res in enumerate(results):
        print(f"rank {rank} ({res['kind']}): syncs on other threads (allowed): {res['other_syncs']}")
        assert res["caller_syncs"] == [], f"rank {rank}: {len(res['caller_syncs'])} host syncs in 2 overlapped forwards"
        assert res["error"] is None, f"rank {rank}: a host sync with the window transport: {res['error']}"
        assert res["vs_dense"].ok, str(res["vs_dense"])
    print(f"0 host syncs per overlapped forward (m={microbatches}, quant_mode={quant})")


def _device_time_case() -> dict:
    """A plan whose compute is a known GPU sleep: on the device clock each compute node lasts at
    least the sleep, while the host only spends microseconds launching it."""
    import overlap

    dev = _device()
    rank = dist.get_rank()
    layer = overlap.MoELayer(1024, 4, 2, 256, num_shared_experts=1, seed=5).to(dev)
    x = torch.randn(128, 1024, generator=torch.Generator().manual_seed(rank)).to(torch.bfloat16).to(dev)
    sleep = _sleep_cycles(0.02)
    real_shared = layer.moe_shared

    def slow_shared(h):
        torch.cuda._sleep(sleep)  # 20 ms on the device, microseconds on the host
        return real_shared(h)

    layer.moe_shared = slow_shared
    with overlap.scheduler(microbatches=2) as s:
        layer(x)
    torch.cuda.synchronize()
    report = s.report()
    return {"compute_busy_s": report.compute_busy, "text": str(report)}


def test_device_time_report_measures_device_work(rank_pools):
    for res in rank_pools(2).run(_device_time_case):
        print(res["text"])
        # Two microbatches each sleep 20 ms on the device inside shared-expert compute. A report of
        # launch times would see microseconds.
        assert res["compute_busy_s"] >= 0.035, res["text"]


# --------------------------------------------------------------------------------------------
# The transformers integration on a tiny model
# --------------------------------------------------------------------------------------------


def _transformers_case(path: str) -> dict:
    """`ep_implementation="overlap"` in a spawned rank that never imported the integration (it is
    registered by `import overlap`), against `"all_to_all"` and the single process, on the GPU."""
    import sys

    from transformers import AutoModelForCausalLM

    from overlap.integrations.tiny_models import load_expert_parallel

    dev = _device()
    ids = torch.randint(0, 256, (1, 96), generator=torch.Generator().manual_seed(1234 + dist.get_rank())).to(dev)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(dev)
    ours = load_expert_parallel(path, "overlap").to(dev)  # no import of the integration before this
    theirs = load_expert_parallel(path, "all_to_all").to(dev)

    import overlap.integrations.transformers as ohf

    from .test_integration_transformers import _diff

    with torch.no_grad():
        expected = ref(ids).logits
        with ohf.microbatches(1):
            one = ours(ids).logits
        with ohf.microbatches(2):
            two = ours(ids).logits
        a2a = theirs(ids).logits
    return {
        "device": one.device.type,
        "one_vs_a2a": _diff(one.cpu(), a2a.cpu()),
        "two_vs_ref": _diff(two.cpu(), expected.cpu()),
        "a2a_vs_ref": _diff(a2a.cpu(), expected.cpu()),
        "registered": "overlap.integrations.transformers" in sys.modules,
    }


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_transformers_integration_on_a_tiny_model(rank_pools, tmp_path, family):
    pytest.importorskip("transformers", reason="the hf extra is not installed on this image")
    from overlap.integrations.tiny_models import family_config, save_random_model

    from .test_integration_transformers import tolerance

    path = save_random_model(family_config(family, experts=4, vocab_size=256), str(tmp_path / family))
    for rank, res in enumerate(rank_pools(2).run(_transformers_case, path, timeout_s=300)):
        assert res["device"] == "cuda" and res["registered"]
        print(f"rank {rank} {family}: one microbatch vs all_to_all {res['one_vs_a2a']}; two vs ref {res['two_vs_ref']}")
        # One microbatch runs the all_to_all computation: equal, or (GPU GEMMs over other row
        # counts) within the tolerance; microbatched: within the tolerance of the single process.
        for d in (res["one_vs_a2a"], res["two_vs_ref"]):
            assert d["max"] <= max(tolerance(d["dtype"], d["scale"]), res["a2a_vs_ref"]["max"]), res


def test_host_read_detector_sees_a_device_sync():
    t = torch.arange(4, device="cuda")
    with HostReads() as reads:
        t.sum().item()
    assert reads.log


# --------------------------------------------------------------------------------------------
# Experts as one grouped GEMM against the per-expert loop, on the GPU
# --------------------------------------------------------------------------------------------


def test_grouped_gemm_equals_the_expert_loop_on_cuda():
    from overlap import moe
    from overlap.numerics import compare

    dev = torch.device("cuda")
    assert moe.has_grouped_mm(dev, torch.bfloat16), "torch has no CUDA grouped_mm for bf16 on this GPU"
    g = torch.Generator().manual_seed(0)
    experts, hidden, inter = 16, 1024, 512
    gate = (torch.randn(experts, inter, hidden, generator=g) / 32).to(torch.bfloat16).to(dev)
    up = (torch.randn(experts, inter, hidden, generator=g) / 32).to(torch.bfloat16).to(dev)
    down = (torch.randn(experts, hidden, inter, generator=g) / 23).to(torch.bfloat16).to(dev)
    counts = torch.randint(0, 200, (experts,), generator=g)
    counts[3] = 0
    rows = int(counts.sum()) + 37  # rows past the counts are ignored
    x = torch.randn(rows, hidden, generator=g).to(torch.bfloat16).to(dev)
    nums = counts.to(dev)
    grouped = moe.expert_mlps(x, gate, up, down, nums, implementation="grouped_mm")
    looped = moe.expert_mlps(x, gate, up, down, nums, implementation="loop")
    between = compare(grouped.float().cpu(), looped.double().cpu(), torch.bfloat16, max_ulps=1.0)
    print(f"grouped vs loop on cuda: bit-equal {torch.equal(grouped, looped)}, {between}")
    assert between.ok, str(between)
    assert torch.equal(grouped[-37:], torch.zeros_like(grouped[-37:]))


# --------------------------------------------------------------------------------------------
# The CUDA window (issue 20, opt-in: OVERLAP_TRANSPORT=window): rows through CUDA IPC
# --------------------------------------------------------------------------------------------

WINDOW_CASES = [
    pytest.param(Case(world=2, batches=(4, 4)), id="w2-plain"),
    pytest.param(Case(world=2, batches=(5, 5), active=(3, 0)), id="w2-active-mask-empty-rank"),
    pytest.param(Case(world=2, batches=(4, 4), quant=2, with_scales=True), id="w2-int8-scales"),
    pytest.param(Case(world=4, batches=(2, 7, 1, 5), global_bs=28, experts=8, top_k=3), id="w4-uneven"),
]


def _window_case(case: Case, rounds: int) -> dict:
    from overlap.ops import transport

    from .carriers import forced

    try:
        with forced("window"):
            results = [_cuda_case(case) for _ in range(rounds)]  # rounds > slots: every slot is reused
    finally:
        transport.shutdown()  # the pool's group keeps no CUDA window for the tests after this one
    return results[-1] | {"all_equal": all(torch.equal(r["x_out"], results[0]["x_out"]) for r in results)}


@pytest.mark.parametrize("case", WINDOW_CASES)
def test_the_cuda_window_equals_the_dense_reference_with_ranks_sharing_one_gpu(rank_pools, case):
    results = rank_pools(case.world).run(_window_case, case, 6, timeout_s=300)
    reference = dense_reference(case)
    for rank, res in enumerate(results):
        assert res["kind"] == "window" and res["devices"] == ("cuda", "cuda", "cuda")
        assert res["reads"] == [], f"rank {rank}: a setup read device values on the host: {res['reads']}"
        assert torch.equal(res["x_out"], reference[rank]), f"rank {rank} differs from the dense reference"
        assert res["all_equal"]
        for trace in res["traces"]:
            assert "resolve" in trace and "to_host" not in trace  # no staging through the host


def _window_setup_case(queued_s: float) -> dict:
    """Setups behind a queued kernel of `queued_s`, then a whole exchange (setup and teardown) under
    set_sync_debug_mode("error"), over the CUDA window."""
    from overlap import ops

    from .carriers import forced

    dev = _device()
    rank, world = dist.get_rank(), dist.get_world_size()
    case = Case(world=world, batches=(8,) * world)
    p = build(case)
    g = dist.group.WORLD.group_name
    x, ids, w = p["x"][rank].to(dev), p["ids"][rank].to(dev), p["weights"][rank].to(dev)
    out: dict = {}
    with forced("window"):
        for _ in range(2):  # warm up: windows shared, peers opened, allocator, streams
            y, idx, cmd = ops.dispatch_setup(x, ids, g, world, rank, case.experts)
            ex, _, assist, _ = ops.dispatch_teardown(x, y, ids, cmd, g, world, rank, case.experts)
            qx, cmd2 = ops.combine_setup(ex, ids, assist, g, world, rank, case.experts)
            ops.combine_teardown(ex, qx, ids, idx, w, cmd2, g, world, rank, case.experts)
        torch.cuda.synchronize()
        dist.barrier()
        cycles = _sleep_cycles(queued_s)
        torch.cuda._sleep(cycles)
        t0 = time.perf_counter()
        y, idx, cmd = ops.dispatch_setup(x, ids, g, world, rank, case.experts)
        out["dispatch_s"] = time.perf_counter() - t0
        ex, _, assist, _ = ops.dispatch_teardown(x, y, ids, cmd, g, world, rank, case.experts)
        torch.cuda._sleep(cycles)
        t0 = time.perf_counter()
        qx, cmd2 = ops.combine_setup(ex, ids, assist, g, world, rank, case.experts)
        out["combine_s"] = time.perf_counter() - t0
        ops.combine_teardown(ex, qx, ids, idx, w, cmd2, g, world, rank, case.experts)
        torch.cuda.synchronize()
        dist.barrier()
        out["kind"] = ops.transport_kind(g)
        torch.cuda.set_sync_debug_mode("error")
        try:
            y, idx, cmd = ops.dispatch_setup(x, ids, g, world, rank, case.experts)
            out["setup_sync"] = None
        except RuntimeError as exc:
            out["setup_sync"] = str(exc).splitlines()[0]
        finally:
            torch.cuda.set_sync_debug_mode(0)
        ops.dispatch_teardown(x, y, ids, cmd, g, world, rank, case.experts)
    ops.shutdown()
    return out


def test_a_window_setup_takes_under_100us_behind_a_queued_200ms_kernel(rank_pools):
    results = rank_pools(2).run(_window_setup_case, 0.2, timeout_s=300)
    for rank, res in enumerate(results):
        print(
            f"rank {rank} (window): dispatch_setup {res['dispatch_s'] * 1e6:.0f} us, combine_setup "
            f"{res['combine_s'] * 1e6:.0f} us of host time behind a 200 ms kernel (bound 100 us)"
        )
        assert res["kind"] == "window"
        assert res["setup_sync"] is None, f"rank {rank}: a window setup synchronised the host: {res['setup_sync']}"
        assert res["dispatch_s"] < 0.05 and res["combine_s"] < 0.05, res  # never behind the 200 ms kernel


def _window_no_sync_case(microbatches: int, quant: int) -> dict:
    from overlap.ops import transport

    from .carriers import forced

    try:
        with forced("window"):
            return _no_sync_case(microbatches, quant)
    finally:
        transport.shutdown()


@pytest.mark.parametrize("quant", [0, 2], ids=["bf16", "int8"])
def test_overlapped_forward_over_the_cuda_window_makes_no_host_sync(rank_pools, quant):
    """Whole overlapped forwards (m = 2) over the CUDA window, in "error" mode: no setup, teardown
    or other thread synchronises the host (the teardown polls the counts' event, never waits)."""
    results = rank_pools(2).run(_window_no_sync_case, 2, quant, timeout_s=300)
    for rank, res in enumerate(results):
        assert res["kind"] == "window"
        assert res["caller_syncs"] == [] and res["other_syncs"] == [], res
        assert res["error"] is None, f"rank {rank}: a host sync with the window transport: {res['error']}"
        assert res["vs_dense"].ok, str(res["vs_dense"])


# --------------------------------------------------------------------------------------------
# The emulated link on a device: the transport's stream is held, not the host
# --------------------------------------------------------------------------------------------


def _device_link_case(latency_s: float, carrier: str) -> dict:
    """A dispatch under a link of `latency_s`: host time of setup + teardown, and when a kernel the
    caller's stream queues after the teardown has run."""
    from overlap import ops
    from overlap.ops import transport

    from .carriers import forced

    dev = _device()
    rank, world = dist.get_rank(), dist.get_world_size()
    case = Case(world=world, batches=(8,) * world)
    p = build(case)
    g = dist.group.WORLD.group_name
    x, ids = p["x"][rank].to(dev), p["ids"][rank].to(dev)
    try:
        with forced(carrier):
            link = ops.EmulatedLink(latency_s=latency_s, bandwidth_bytes_per_s=1e12)
            with ops.comm_options(link=link):
                y, _, cmd = ops.dispatch_setup(x, ids, g, world, rank, case.experts)  # warm up, calibrate
                ops.dispatch_teardown(x, y, ids, cmd, g, world, rank, case.experts)
                torch.cuda.synchronize()
                dist.barrier()
                t0 = time.perf_counter()
                y, _, cmd = ops.dispatch_setup(x, ids, g, world, rank, case.experts)
                expand_x, *_ = ops.dispatch_teardown(x, y, ids, cmd, g, world, rank, case.experts)
                host_s = time.perf_counter() - t0
                kind = ops.transport_kind(g)
                after = torch.cuda.Event()
                expand_x.float().sum()  # a kernel on the caller's stream, ordered after the exchange
                after.record()
                while not after.query():
                    time.sleep(1e-4)
                device_s = time.perf_counter() - t0
        return {"host_s": host_s, "device_s": device_s, "kind": kind}
    finally:
        transport.shutdown()


@pytest.mark.parametrize("carrier", ["gloo", "window"])
def test_the_emulated_link_holds_the_transport_stream_not_the_host(rank_pools, carrier):
    """`--comm-ratio` on cuda: the teardown returns long before the modelled time (the host is not
    held), and what the caller's stream queues after it runs only once the model says the rows
    arrived (the transport's stream is held by a spin kernel, the done event recorded after it)."""
    latency_s = 0.3
    results = rank_pools(2).run(_device_link_case, latency_s, carrier, timeout_s=300)
    for rank, res in enumerate(results):
        print(f"rank {rank} ({res['kind']}): host {res['host_s'] * 1e3:.1f} ms, device {res['device_s'] * 1e3:.1f} ms")
        assert res["host_s"] < latency_s / 2, (rank, res)
        assert res["device_s"] >= 0.9 * latency_s, (rank, res)
