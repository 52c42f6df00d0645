"""The main job and the benchmark: the reference MoE layer serial vs overlapped on expert-parallel ranks.

Owns what `python -m overlap demo` and `python -m overlap bench` run on each rank, the checks of
their arguments (done before any rank starts), the emulated link's calibration, the table and its
legend, and the progress lines. Start-up is `overlap.launch`, the command line `overlap.__main__`.
Never used by the library itself; uses only the public API (`overlap.MoELayer`, `overlap.scheduler`,
`overlap.pipeline.serial_forward`, `overlap.ops.configure`, `overlap.numerics.compare`).

**One run, one way of combining ranks.** Every case runs `reps` repetitions of the serial forward
and of the overlapped forward, alternated, each timed on every rank after a barrier. A
repetition's time is its slowest rank's; the table shows the median and the range (min–max). Both
runs execute inside a recording `overlap.scheduler` context, so the same bookkeeping costs both:

* the *serial run*: `overlap.pipeline.serial_forward(layer, x)`, every op waited for; its compute
  busy time and its link busy time are the table's `compute` and `comm` (median repetition, the
  rank with the most);
* the *overlapped run*: `layer(x)` pipelined over `m` microbatches; `hidden` is the share of its
  link time spent under compute (its median repetition, the rank that hid least). The timeline
  picture shows exactly that rank and repetition.

**The emulated link.** Either `link_gbps`/`latency_us` as given, or scaled to the problem: the
bandwidth is chosen (two calibration runs) so that one serial layer's link time is `comm_ratio`
times its compute. Then the best an overlapped run can do is `ideal = (compute + comm) /
max(compute, comm)` times faster.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist

from . import ops
from .launch import rank_device
from .moe import MoELayer
from .numerics import compare
from .ops.params import MAX_EXPERTS, MAX_HIDDEN, MAX_SHARED_EXPERTS, MAX_TOP_K, MAX_WORLD_SIZE, MIN_HIDDEN
from .pipeline import Scheduler, scheduler, serial_forward
from .timeline import Timeline

DEFAULT_COMM_RATIO = 1.0
DEFAULT_LATENCY_US = 20.0
MAX_TOKENS = 8192  # per rank: 16 calls of the ops' 512 rows
MAX_INTERMEDIATE = 65536
MAX_MICROBATCHES = 64
MAX_REPS = 1000
MAX_COMM_RATIO = 100.0
MAX_LATENCY_US = 1e6
DEVICES = ("cpu", "cuda")
TRANSPORTS = ("emulated", "window", "gloo", "nccl")  # emulated: a link model over the default carrier


# --------------------------------------------------------------------------------------------
# What to run, checked before any rank starts
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """One MoE layer and batch: `tokens` per rank, hidden H, routed experts E, top-K, expert
    intermediate size I, shared experts S, dispatch quantisation (0 none, 2 dynamic int8)."""

    tokens: int = 256
    hidden: int = 1024
    experts: int = 8
    top_k: int = 2
    intermediate: int = 1024
    shared: int = 1
    quant: int = 0

    def __str__(self) -> str:
        quant = " int8" if self.quant == 2 else ""
        return f"T{self.tokens} H{self.hidden} E{self.experts} K{self.top_k} I{self.intermediate} S{self.shared}{quant}"


@dataclass(frozen=True)
class Link:
    """How exchanges travel: `transport` "gloo" (as fast as gloo moves them) or "emulated" (gloo
    moves the data, completion follows a modelled link: `gbps` GB/s and `latency_us`, or, with
    `gbps` None, a bandwidth scaled so that comm = `comm_ratio` × compute in the serial run)."""

    transport: str = "emulated"
    comm_ratio: float | None = DEFAULT_COMM_RATIO
    gbps: float | None = None
    latency_us: float = DEFAULT_LATENCY_US

    def __str__(self) -> str:
        if self.transport != "emulated":  # issue 20: a carrier, as fast as it moves the data
            return f"{self.transport} (no link model)"
        if self.gbps is not None:
            return f"emulated link {self.gbps:g} GB/s, {self.latency_us:g} us latency"
        return f"emulated link scaled to comm = {self.comm_ratio:g} x compute, {self.latency_us:g} us latency"


# The range of every numeric flag, as (low, high, low excluded): the checks below and the flags'
# --help text both read it, so the two cannot drift apart. --top-k's upper bound is also at most E.
RANGES: dict[str, tuple[float, float, bool]] = {
    "--ranks": (2, MAX_WORLD_SIZE, False),
    "--tokens": (1, MAX_TOKENS, False),
    "--hidden": (MIN_HIDDEN, MAX_HIDDEN, False),
    "--experts": (0, MAX_EXPERTS, True),
    "--top-k": (0, MAX_TOP_K, True),
    "--intermediate": (1, MAX_INTERMEDIATE, False),
    "--shared": (0, MAX_SHARED_EXPERTS, False),
    "--microbatches": (1, MAX_MICROBATCHES, False),
    "--reps": (1, MAX_REPS, False),
    "--link-gbps": (0, math.inf, True),
    "--comm-ratio": (0, MAX_COMM_RATIO, True),
    "--latency-us": (0, MAX_LATENCY_US, False),
}


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


def range_text(flag: str, high: float | None = None) -> str:
    """`flag`'s allowed range as the checks and --help write it: ``[1, 1000]``, ``(0, 512]``, ``(0, inf)``."""
    low, top, open_low = RANGES[flag]
    top = top if high is None else high
    hi = "inf)" if math.isinf(top) else f"{_num(top)}]"
    return f"{'(' if open_low else '['}{_num(low)}, {hi}"


def _in(flag: str, value: float, high: float | None = None) -> None:
    low, top, open_low = RANGES[flag]
    top = top if high is None else high
    ok = (low < value if open_low else low <= value) and value <= top
    if not ok:
        raise ValueError(f"{flag} must be in {range_text(flag, top)}, got {_num(value)}")


def link_from_flags(
    transport: str, comm_ratio: float | None, link_gbps: float | None, latency_us: float | None
) -> Link:
    """The `Link` the link flags ask for (None: the flag was not given), refusing a flag that the
    transport would ignore: only emulated has a link model, so --comm-ratio, --link-gbps and
    --latency-us need --transport emulated.

    Raises:
        ValueError: names the flag given, its value and the transport (one line).
    """
    if transport != "emulated":
        for flag, value in (("--comm-ratio", comm_ratio), ("--link-gbps", link_gbps), ("--latency-us", latency_us)):
            if value is not None:
                raise ValueError(
                    f"{flag} {value:g} needs --transport emulated, got --transport {transport} "
                    f"({transport} has no link model)"
                )
    ratio = comm_ratio if comm_ratio is not None or link_gbps is not None else DEFAULT_COMM_RATIO
    return Link(transport, ratio, link_gbps, DEFAULT_LATENCY_US if latency_us is None else latency_us)


def check_args(shape: Shape, ranks: int, microbatches: list[int], link: Link, reps: int, device: str) -> None:
    """Every command-line value in range, before any rank starts (the ranges: `RANGES`).

    Raises:
        ValueError: names the flag, its allowed range and the value given (one line).
    """
    _in("--ranks", ranks)
    _in("--tokens", shape.tokens)
    _in("--hidden", shape.hidden)
    _in("--experts", shape.experts)
    if shape.experts % ranks:
        raise ValueError(f"--experts must be divisible by the number of ranks ({ranks}), got {shape.experts}")
    _in("--top-k", shape.top_k, min(MAX_TOP_K, shape.experts))
    _in("--intermediate", shape.intermediate)
    _in("--shared", shape.shared)
    if shape.quant not in (0, 2):
        raise ValueError(f"--quant must be 0 (none) or 2 (dynamic int8), got {shape.quant}")
    for m in microbatches:
        _in("--microbatches", m)
    _in("--reps", reps)
    if device not in DEVICES:
        raise ValueError(f"--device must be one of {DEVICES}, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device must be cpu on this host: cuda was asked for but torch sees no CUDA device")
    if link.transport not in TRANSPORTS:
        raise ValueError(f"--transport must be one of {TRANSPORTS}, got {link.transport!r}")
    if link.gbps is not None:
        _in("--link-gbps", link.gbps)
    if link.comm_ratio is not None:
        _in("--comm-ratio", link.comm_ratio)
    _in("--latency-us", link.latency_us)
    if link.transport != "emulated" and link.gbps is not None:
        raise ValueError(f"--link-gbps needs --transport emulated, got --transport {link.transport}")


# --------------------------------------------------------------------------------------------
# Progress (rank 0, stderr): a bar on a terminal, plain lines otherwise
# --------------------------------------------------------------------------------------------


class Progress:
    """Progress of the slow steps on stderr, from rank 0 only: a tqdm bar when stderr is a
    terminal, one line per step otherwise. Every bar is closed before results are printed."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled and (not dist.is_initialized() or dist.get_rank() == 0)
        self.tty = self.enabled and sys.stderr.isatty()

    @contextlib.contextmanager
    def step(self, desc: str, total: int | None = None) -> Iterator[Callable[[], None]]:
        """Show `desc` while the block runs; the yielded callable advances a bar of `total`."""
        if not self.enabled:
            yield lambda: None
            return
        start = time.perf_counter()
        if self.tty:
            from tqdm import tqdm

            bar = tqdm(total=total, desc=f"[overlap] {desc}", file=sys.stderr, leave=False, dynamic_ncols=True)
            try:
                yield lambda: bar.update(1)
            finally:
                bar.close()
            return
        print(f"[overlap] {desc} ...", file=sys.stderr, flush=True)
        yield lambda: None
        print(f"[overlap] {desc}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# One case on every rank
# --------------------------------------------------------------------------------------------


def _device_and_group(device: str) -> tuple[torch.device, dist.ProcessGroup]:
    """This rank's device and the EP group for it: rank r uses cuda:(r % G) (LOCAL_RANK % G under
    torchrun); the group is NCCL when every rank of this host has its own GPU, else gloo (cpu, or
    ranks sharing a GPU, whose exchanges are staged through pinned host buffers) — a group of its
    own where the default group's backend differs, made once per default group and backend (every
    rank calls this at the same points, so every rank makes it at the same call)."""
    dev = rank_device(device, int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size()))
    backend = ops.staging.backend_for(dev, local_world)
    world = dist.group.WORLD
    if world is not None and dist.get_backend() == backend:
        return dev, world
    key = (id(world), backend)
    group = _OWN_GROUPS.get(key)
    if group is None or group not in dist.distributed_c10d._world.pg_map:  # destroyed since: make another
        group = _OWN_GROUPS[key] = dist.new_group(backend=backend)
    return dev, group


_OWN_GROUPS: dict[tuple[int, str], dist.ProcessGroup] = {}
"""`_device_and_group`'s groups by (default group, backend)."""


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _max(
    values: list[float],
    group: dist.ProcessGroup,
    op: dist.ReduceOp.RedOpType = dist.ReduceOp.MAX,
    dev: torch.device | None = None,
) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=dev)
    dist.all_reduce(t, op=op, group=group)
    return t.tolist()


def _calibrate(
    layer: MoELayer,
    x: torch.Tensor,
    link: Link,
    group: dist.ProcessGroup,
    dev: torch.device,
    serial: Callable[[], tuple[torch.Tensor, Scheduler]],
    compute_s: float,
) -> ops.EmulatedLink | None:
    """The link to time on. With a comm ratio R: start from the bytes one layer moves (T·K rows
    of H each way), then twice rescale the bandwidth from a serial run's measured link time M and
    compute C, so that M = R·C (latency stays as given)."""
    if link.transport != "emulated":
        return None
    latency = link.latency_us * 1e-6
    if link.gbps is not None:
        return ops.EmulatedLink(latency_s=latency, bandwidth_bytes_per_s=link.gbps * 1e9)
    ratio = float(link.comm_ratio or DEFAULT_COMM_RATIO)
    nbytes = 2 * x.shape[0] * layer.top_k * x.shape[1] * x.element_size()
    bandwidth = nbytes / max(ratio * compute_s - 2 * latency, 1e-6)
    for _ in range(2):
        candidate = ops.EmulatedLink(latency_s=latency, bandwidth_bytes_per_s=bandwidth)
        ops.configure(link=candidate)
        try:
            _, s = serial()
        finally:
            ops.configure(link=None)
        rep = s.report()
        count = sum(1 for iv in s.timeline.intervals if iv.kind == "comm")
        comm, compute, exchanges = _max([rep.comm_busy, rep.compute_busy, float(count)], group, dev=dev)
        fixed = exchanges * latency
        want = ratio * compute - fixed
        if want <= 0:
            raise ValueError(
                f"--comm-ratio {ratio:g} is too small for --latency-us {link.latency_us:g}: "
                f"{int(exchanges)} exchanges take {fixed * 1e3:.2f} ms of latency alone, against "
                f"{ratio * compute * 1e3:.2f} ms wanted"
            )
        bandwidth *= max(comm - fixed, 1e-9) / want
    return ops.EmulatedLink(latency_s=latency, bandwidth_bytes_per_s=bandwidth)


def _exchange_rates(group: dist.ProcessGroup, shape: Shape, dev: torch.device) -> dict[str, float]:
    """Issue 20: one dispatch's rows (T·K rows of H bf16) through the group's carrier, and `copy_` of
    the same bytes, in this run (`overlap.ops.rates`)."""
    from .ops import rates

    r = rates.exchange_rates(group, shape.tokens * shape.top_k, shape.hidden * 2, reps=3, device=dev)
    return {"exchange_GBps": r["exchange_GBps"], "copy_GBps": r["copy_GBps"]}


# CUDA runtime calls that launch device work, and those that block the host until the device is done
LAUNCH_CALLS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx", "cudaGraphLaunch")
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")


def count_device_calls(events: list[tuple[str, int]], caller_thread: int) -> dict[str, int]:
    """Kernel launches and host syncs among profiler `events` (`(name, thread id)`): launches from
    every thread (the layer's and the transport's), host syncs on `caller_thread` (the thread that
    runs the forward; a staging transport thread syncs its own side stream by design) and on all."""
    launches = sum(name in LAUNCH_CALLS for name, _ in events)
    syncs = [thread for name, thread in events if name in SYNC_CALLS]
    return {
        "launches_per_forward": launches,
        "host_syncs_per_forward": sum(thread == caller_thread for thread in syncs),
        "host_syncs_per_forward_all_threads": len(syncs),
    }


def _device_calls(forward: Any, dev: torch.device) -> dict[str, Any]:
    """`count_device_calls` over one overlapped forward under torch.profiler, on CUDA; None on CPU
    (no launches to count). A profiler failure is reported in the row, never raised."""
    empty: dict[str, Any] = dict.fromkeys(
        ("launches_per_forward", "host_syncs_per_forward", "host_syncs_per_forward_all_threads")
    )
    if dev.type != "cuda":
        return empty
    try:
        from torch.profiler import ProfilerActivity, profile

        _sync(dev)
        caller = threading.get_native_id()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            forward()
        _sync(dev)
        return count_device_calls([(e.name, e.thread) for e in prof.events()], caller)
    except Exception as exc:  # noqa: BLE001 - a bench field, never a failed bench
        return {**empty, "device_calls_error": f"{type(exc).__name__}: {exc}"}


def _microbatches_ran(sched: object) -> int:
    """How many microbatches the overlapped run's plan used (the scheduler may use fewer than asked)."""
    nodes = [n for n in sched.plan.nodes if n.op == "dispatch_setup"]  # type: ignore[attr-defined]
    return len(nodes)


NOISE_BAND = 1.10  # a median paired speedup within [1/1.1, 1.1] whose interval holds 1 is "within noise"
INTERVAL_LEVEL = 0.90


def paired_speedups(serial: list[float], overlapped: list[float]) -> list[float]:
    """serial_i / overlapped_i of each alternated repetition i (both timed back to back, so a
    pair shares the machine's load of its moment)."""
    if len(serial) != len(overlapped):
        raise ValueError(f"overlapped must have one time per serial time ({len(serial)}), got {len(overlapped)}")
    return [s / o if o > 0 else math.inf for s, o in zip(serial, overlapped)]


def median_interval(values: list[float], level: float = INTERVAL_LEVEL) -> tuple[float, float, float]:
    """`(low, high, coverage)`: the distribution-free interval `[v_(k), v_(n+1-k)]` of the sorted
    values for their median, with the largest k whose coverage `1 - 2 P(Bin(n, 1/2) < k)` is at
    least `level`; below 5 values no k reaches 90 %, and the interval is `[min, max]` with its
    smaller coverage (3 values: 75 %)."""
    v, n = sorted(values), len(values)
    if n == 0:
        raise ValueError("values must not be empty")

    def coverage(k: int) -> float:
        return 1 - 2 * sum(math.comb(n, j) for j in range(k)) / 2**n

    k = 1
    while k + 1 <= (n + 1) // 2 and coverage(k + 1) >= level:
        k += 1
    return v[k - 1], v[n - k], coverage(k)


def _verdict(serial: list[float], overlapped: list[float]) -> str:
    """The paired rule: from the per-repetition speedups (`paired_speedups`), "faster" / "slower"
    when their median's interval (`median_interval`) lies above / below 1; "within noise" only when
    the interval holds 1 *and* the median is within 10 % of 1; otherwise "likely faster" / "likely
    slower" (the median says so, the spread does not settle it). A median twice as slow is never
    "within noise"."""
    if len(serial) < 2:
        return "1 rep: no spread"
    ratios = paired_speedups(serial, overlapped)
    low, high, _ = median_interval(ratios)
    if low > 1:
        return "faster"
    if high < 1:
        return "slower"
    median = statistics.median(ratios)
    if 1 / NOISE_BAND <= median <= NOISE_BAND:
        return "within noise"
    return "likely faster" if median > 1 else "likely slower"


def _median_index(values: list[float]) -> int:
    """Index of the median value (the lower one of the middle two for an even count)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    return order[(len(values) - 1) // 2]


@contextlib.contextmanager
def _carrier(transport: str) -> Iterator[None]:
    """The exchanges on `transport`'s carrier for the block when it names one (`OVERLAP_TRANSPORT` set
    for the block only: ranks that go on to other work keep their default); "emulated" changes nothing."""
    if transport == "emulated":
        yield
        return
    old = os.environ.get("OVERLAP_TRANSPORT")
    os.environ["OVERLAP_TRANSPORT"] = transport
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("OVERLAP_TRANSPORT", None)
        else:
            os.environ["OVERLAP_TRANSPORT"] = old


def measure(
    shape: Shape,
    microbatches: int,
    link: Link,
    reps: int,
    device: str = "cpu",
    progress: Progress | None = None,
    keep: bool = False,
) -> dict:
    """Serial vs overlapped forward of the reference layer on this rank's group: one table row, the
    exchanges on `link.transport`'s carrier (`_carrier`).

    Returns (every rank gets the same figures): the row of the module docstring's JSON, plus with
    `keep` the overlapped scheduler of the median repetition (`"_sched"`) and the pictured
    timeline (`"_timeline"`, that of the rank that hid least) on rank 0, with its time axis
    (`"_window"`: that repetition's start there, plus the table's overlapped time).
    """
    with _carrier(link.transport):
        progress = progress or Progress(False)
        dev, group = _device_and_group(device)
        rank = dist.get_rank(group)
        with progress.step(f"building the layer {shape}"):
            layer = MoELayer(
                shape.hidden,
                shape.experts,
                shape.top_k,
                shape.intermediate,
                group=group,
                num_shared_experts=shape.shared,
                quant_mode=shape.quant,
                seed=1,
            ).to(dev)
        g = torch.Generator().manual_seed(100 + rank)
        x = torch.randn(shape.tokens, shape.hidden, generator=g).to(torch.bfloat16).to(dev)

        def serial() -> tuple[torch.Tensor, Scheduler]:
            with scheduler(group=group) as s:  # records the op calls; runs them as written
                out = serial_forward(layer, x)
            _sync(dev)
            return out, s

        def overlapped() -> tuple[torch.Tensor, Scheduler]:
            with scheduler(group=group, microbatches=microbatches) as s:
                out = layer(x)
            _sync(dev)
            return out, s

        ops.configure(link=None)
        with progress.step("warming up (serial and overlapped once, link calibration)"):
            _, s = serial()
            overlapped()
            compute0 = _max([s.report().compute_busy], group, dev=dev)[0]
            emulated = _calibrate(layer, x, link, group, dev, serial, compute0)

        times: tuple[list[float], list[float]] = ([], [])
        starts: list[float] = []  # the overlapped repetitions' start on this rank (the picture's time axis)
        scheds: tuple[list[Scheduler], list[Scheduler]] = ([], [])
        outs: list[torch.Tensor] = [x, x]
        ops.configure(link=emulated)
        try:
            with progress.step(
                f"timing {reps} reps of serial and overlapped, m={microbatches}", total=2 * reps
            ) as tick:
                for _ in range(reps):
                    for i, fn in enumerate((serial, overlapped)):
                        dist.barrier(group)
                        t0 = time.perf_counter()
                        if i:
                            starts.append(t0)
                        outs[i], sched = fn()
                        times[i].append(time.perf_counter() - t0)
                        scheds[i].append(sched)
                        tick()
        finally:
            ops.configure(link=None)

        def forward_only() -> None:  # one overlapped forward, without the bench's own device sync
            with scheduler(group=group, microbatches=microbatches):
                layer(x)

        calls = _device_calls(forward_only, dev)

        # Combine ranks: a repetition takes as long as its slowest rank.
        serial_t = _max(times[0], group, dev=dev)
        over_t = _max(times[1], group, dev=dev)
        s_rep, o_rep = _median_index(serial_t), _median_index(over_t)
        s_report = scheds[0][s_rep].report()
        compute, comm = _max([s_report.compute_busy, s_report.comm_busy], group, dev=dev)
        o_sched = scheds[1][o_rep]
        o_report = o_sched.report()
        hidden_here = o_report.hidden_fraction
        # `s.report()`'s own estimate of the speedup (no serial run): kept beside the measured one.
        hidden, estimate = _max([hidden_here, o_report.speedup], group, op=dist.ReduceOp.MIN, dev=dev)

        with progress.step("checking against the dense fp32 reference"):
            dense = layer.dense_forward(x, dtype=torch.float32).cpu()
            worst = [compare(out.cpu(), dense).worst_ulps for out in outs]
        worst_serial, worst_overlapped = _max(worst, group, dev=dev)
        tolerance = compare(dense[:0], dense[:0], dtype=torch.bfloat16).max_ulps

        serial_s, overlapped_s = statistics.median(serial_t), statistics.median(over_t)
        paired = paired_speedups(serial_t, over_t)
        paired_low, paired_high, paired_coverage = median_interval(paired)
        ideal = (compute + comm) / max(compute, comm) if max(compute, comm) > 0 else 1.0
        row = {
            "shape": str(shape),
            **{f"shape_{k}": v for k, v in asdict(shape).items()},
            "ranks": dist.get_world_size(group),
            "device": device,
            "link": str(link),
            "transport": ops.transport_kind(group.group_name),
            **_exchange_rates(group, shape, dev),
            "microbatches": _microbatches_ran(o_sched),
            "microbatches_requested": microbatches,
            "reps": reps,
            "serial_s": serial_s,
            "serial_min_s": min(serial_t),
            "serial_max_s": max(serial_t),
            "overlapped_s": overlapped_s,
            "overlapped_min_s": min(over_t),
            "overlapped_max_s": max(over_t),
            "compute_s": compute,
            "comm_s": comm,
            "comm_ratio": comm / compute if compute > 0 else 0.0,
            "hidden_fraction": hidden,
            "speedup": serial_s / overlapped_s,
            "speedup_paired": statistics.median(paired),
            "speedup_low": paired_low,
            "speedup_high": paired_high,
            "speedup_coverage": paired_coverage,
            "report_speedup_estimate": estimate,
            "ideal_speedup": ideal,
            "verdict": _verdict(serial_t, over_t),
            **calls,
            "link_bandwidth_GBps": None if emulated is None else emulated.bandwidth_bytes_per_s / 1e9,
            "link_latency_us": None if emulated is None else emulated.latency_s * 1e6,
            "worst_ulps_serial": worst_serial,
            "worst_ulps_overlapped": worst_overlapped,
            "tolerance_ulps": tolerance,
            "within_tolerance": max(worst_serial, worst_overlapped) <= tolerance,
        }
        if keep:
            # The picture: the median overlapped repetition on the rank that hid least (ties: lowest rank).
            candidate = torch.tensor([rank if hidden_here <= hidden else dist.get_world_size(group)], device=dev)
            dist.all_reduce(candidate, op=dist.ReduceOp.MIN, group=group)
            pictured = int(candidate.item())
            payload: list[Any] = [
                ([(iv.track, iv.name, iv.start, iv.end, iv.kind) for iv in o_sched.timeline.intervals], starts[o_rep])
                if rank == pictured
                else None
            ]
            dist.broadcast_object_list(payload, src=dist.get_global_rank(group, pictured), group=group)
            timeline = Timeline(o_sched.timeline.tracks)
            rows, started = payload[0]
            for track, name, start, end, kind in rows:
                timeline.add(track, name, start, end, kind)
            # The picture's time axis: from the repetition's start on the pictured rank, as long as the
            # table's overlapped time (this repetition on its slowest rank).
            window = (started, started + over_t[o_rep])
            row.update(_sched=o_sched, _timeline=timeline, _window=window, pictured_rank=pictured, pictured_rep=o_rep)
        return row


def demo_rank(shape: Shape, microbatches: int, link: Link, reps: int, device: str, out_dir: str) -> dict:
    """What `python -m overlap demo` runs on each rank: one case, then rank 0 writes the trace and
    the pictures of the pictured rank's median repetition into `out_dir`."""
    progress = Progress()
    if progress.enabled:
        print(
            f"[overlap] {dist.get_world_size()} ranks up; {shape}; {link}; device {device}", file=sys.stderr, flush=True
        )
    row = measure(shape, microbatches, link, reps, device, progress, keep=True)
    sched, timeline, (start, end) = row.pop("_sched"), row.pop("_timeline"), row.pop("_window")
    if dist.get_rank() != 0:
        return row
    with progress.step("writing the trace and the pictures"):
        os.makedirs(out_dir, exist_ok=True)
        files = ["trace.json"]
        timeline.save_chrome_trace(os.path.join(out_dir, "trace.json"))
        try:
            timeline.save_png(os.path.join(out_dir, "timeline.png"), title=picture_title(row), start=start, end=end)
            sched.plan.save_png(os.path.join(out_dir, "plan.png"))
            files += ["timeline.png", "plan.png"]
        except ImportError as exc:
            print(f"[overlap] pictures skipped: {exc}", file=sys.stderr)
        with open(os.path.join(out_dir, "plan.txt"), "w") as f:
            f.write(sched.plan.to_grid() + "\n")
        files.append("plan.txt")
    row["files"] = [os.path.join(out_dir, f) for f in files]
    row["timeline_text"] = timeline.to_text(start=start, end=end)
    return row


def picture_title(row: dict) -> str:
    """The timeline picture's title: what it shows and the table's figures for it."""
    return (
        f"overlapped run, rank {row['pictured_rank']}, median of {row['reps']} reps: {row['microbatches']} "
        f"microbatches, hidden {row['hidden_fraction'] * 100:.0f} % of comm, measured speedup "
        f"{row['speedup']:.2f}x ({row['verdict']})"
    )


CUDA_DEMO_SHAPE = Shape(tokens=2048, hidden=4096, experts=8, top_k=2, intermediate=2048, shared=1)
"""The demo's shape on cuda when no shape flag is given: the CPU-sized default (T 256, H 1024) left
an H200 idle 95 % of each forward; this one gives it about 0.6 ms of GEMMs per rank per forward
(4 microbatches of 512 tokens, H 4096: the bench's device shapes)."""


def default_shape(device: str, quant: int = 0) -> Shape:
    """The demo's shape when no shape flag is given: `Shape()` on cpu, `CUDA_DEMO_SHAPE` on cuda."""
    base = CUDA_DEMO_SHAPE if device == "cuda" else Shape()
    return Shape(**{**base.__dict__, "quant": quant})


DEFAULT_BENCH_SHAPES = (
    Shape(tokens=256, hidden=1024, experts=8, top_k=2, intermediate=1024, shared=1),
    Shape(tokens=256, hidden=2048, experts=8, top_k=2, intermediate=1024, shared=1),
    Shape(tokens=512, hidden=1024, experts=4, top_k=1, intermediate=2048, shared=1),
)


def bench_rank(
    shapes: tuple[Shape, ...], microbatch_counts: tuple[int, ...], link: Link, reps: int, device: str = "cpu"
) -> list[dict]:
    """What `python -m overlap bench` runs on each rank: every (shape, m) case; progress per case."""
    rows = []
    progress = Progress()
    cases = [(s, m) for s in shapes for m in microbatch_counts]
    for n, (shape, m) in enumerate(cases, start=1):
        if progress.enabled:
            print(f"[overlap] case {n}/{len(cases)}: {shape}, m={m}", file=sys.stderr, flush=True)
        rows.append(measure(shape, m, link, reps, device, progress))
    return rows


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def _ms_range(r: dict, key: str) -> str:
    return f"{r[key + '_s'] * 1e3:.1f} [{r[key + '_min_s'] * 1e3:.1f}-{r[key + '_max_s'] * 1e3:.1f}]"


def format_table(rows: list[dict]) -> str:
    """The table (one section per shape) and, once, what every column means."""
    cols = (
        ("m", 3),
        ("serial ms [min-max]", 24),
        ("overlapped ms [min-max]", 24),
        ("compute ms", 11),
        ("comm ms", 9),
        ("ratio", 6),
        ("hidden", 7),
        ("speedup", 8),
        ("ideal", 6),
        ("verdict", 16),
        ("vs fp32", 9),
    )
    head = " ".join(f"{name:>{w}}" if i < len(cols) - 1 else name for i, (name, w) in enumerate(cols))
    lines = [head, "-" * len(head)]
    shape = None
    for r in rows:
        if r["shape"] != shape:
            shape = r["shape"]
            lines.append(f"{shape}  ({r['ranks']} ranks, {r['device']}, {r['link']})")
        check = f"{max(r['worst_ulps_serial'], r['worst_ulps_overlapped']):.1f} ulp"
        speedup = f"{r['speedup']:.2f}x" if r["verdict"] in ("faster", "slower") else f"({r['speedup']:.2f}x)"
        cells = (
            str(r["microbatches"]),
            _ms_range(r, "serial"),
            _ms_range(r, "overlapped"),
            f"{r['compute_s'] * 1e3:.1f}",
            f"{r['comm_s'] * 1e3:.1f}",
            f"{r['comm_ratio']:.2f}",
            f"{r['hidden_fraction'] * 100:.0f}%",
            speedup,
            f"{r['ideal_speedup']:.2f}x",
            r["verdict"],
            check,
        )
        lines.append(" ".join(f"{c:>{w}}" for c, (_, w) in zip(cells, cols)))
    reps = sorted({r["reps"] for r in rows})
    asked = {r["microbatches_requested"] for r in rows if r["microbatches_requested"] != r["microbatches"]}
    lines += [
        "",
        f"m: microbatches that ran{' (fewer than asked: at least 32 tokens each)' if asked else ''}.",
        f"serial, overlapped: wall time of one layer forward, median of {'/'.join(map(str, reps))} reps "
        "[min-max], each rep timed on its slowest rank.",
        "compute, comm: the serial run's compute and link busy time (its median rep, the rank with the most); "
        "ratio: comm / compute.",
        "  (With --comm-ratio the link is scaled in calibration runs before timing; on a busy machine the "
        "timed ratio differs.)",
        "hidden: share of the overlapped run's link time spent under compute (its median rep, the rank that hid "
        "least).",
        "speedup: serial / overlapped (medians), in parentheses unless the verdict is faster or slower; ideal: "
        "(compute + comm) / max(compute, comm).",
        "verdict: from the speedups of the alternated rep pairs: faster/slower when the interval of their median "
        "(>= 90 % coverage; [min-max] below 5 reps) lies above/below 1,",
        "  within noise when it holds 1 and the median is within 10 % of 1, else likely faster/slower.",
        f"vs fp32: worst difference of either run from the dense fp32 reference, in bf16 ulps of each row's "
        f"largest value (tolerance {rows[0]['tolerance_ulps']:g})."
        if rows
        else "",
    ]
    return "\n".join(lines)


def public_rows(rows: list[dict]) -> list[dict]:
    """The rows without the fields that only the demo's pictures use."""
    return [{k: v for k, v in r.items() if not k.startswith("_") and k not in ("timeline_text", "files")} for r in rows]


def dump_json(rows: list[dict], path: str) -> None:
    with open(path, "w") as f:
        json.dump(public_rows(rows), f, indent=2)


__all__ = [
    "CUDA_DEMO_SHAPE",
    "DEFAULT_BENCH_SHAPES",
    "RANGES",
    "Link",
    "Progress",
    "Shape",
    "bench_rank",
    "check_args",
    "demo_rank",
    "dump_json",
    "format_table",
    "link_from_flags",
    "measure",
    "picture_title",
    "public_rows",
    "range_text",
]
