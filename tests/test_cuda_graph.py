"""Tests of overlap.graph and overlap.streams on CUDA: pooled streams, device-time timeline, results.

Skipped, with the reason, where torch.cuda.is_available() is False. The clock conversion they rely
on (`overlap.graph.device_to_host_clock`, `_calibrate`) is tested on CPU in tests/test_graph.py.
"""

from __future__ import annotations

import time

import pytest
import torch

from overlap import streams
from overlap.graph import Graph, Node
from overlap.timeline import Timeline

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"),
]

SLEEP_S = 0.02


def sleep_cycles(seconds: float) -> int:
    """`torch.cuda._sleep` cycles for about ``seconds`` (the clock rate, measured once)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    cycles = 10_000_000
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    end.synchronize()
    per_s = cycles / (start.elapsed_time(end) * 1e-3)
    return int(per_s * seconds)


def moe_like(cycles: int, a: torch.Tensor) -> Graph:
    """One microbatch: route (matmul) -> setup (copy) -> teardown (add) -> experts (sleep + matmul)."""
    g = Graph()
    g.add("route@mb0", lambda inputs: a @ a)
    g.add("x_setup@mb0", lambda inputs: inputs[Node.parse("route@mb0")].clone(), after=["route@mb0"])
    g.add("x_teardown@mb0", lambda inputs: inputs[Node.parse("x_setup@mb0")] + 1, after=["x_setup@mb0"])

    def experts(inputs):
        torch.cuda._sleep(cycles)
        return inputs[Node.parse("x_teardown@mb0")] @ a

    g.add("experts@mb0", experts, after=["x_teardown@mb0"])
    return g


def test_results_match_the_direct_computation():
    a = torch.randn(256, 256, device="cuda")
    out = moe_like(0, a).plan().run(device="cuda")
    torch.cuda.synchronize()
    expected = ((a @ a).clone() + 1) @ a
    assert torch.equal(out[Node.parse("experts@mb0")], expected)


def test_comm_streams_are_made_once_per_device():
    a = torch.randn(64, 64, device="cuda")
    plan = moe_like(0, a).plan()
    plan.run(device="cuda")
    first = streams.pooled("comm_setup", "cuda")
    plan.run(device="cuda")
    assert streams.pooled("comm_setup", "cuda") is first
    assert streams.pooled("comm_setup", torch.device("cuda", torch.cuda.current_device())) is first
    assert first._torch != torch.cuda.current_stream()  # not the compute stream


def test_timeline_shows_device_time_on_the_host_clock():
    a = torch.randn(256, 256, device="cuda")
    cycles = sleep_cycles(SLEEP_S)
    plan = moe_like(cycles, a).plan()
    plan.run(device="cuda")  # warm up (and calibrate the device clock)
    torch.cuda.synchronize()
    tl = Timeline()
    t0 = time.perf_counter()
    plan.run(device="cuda", timeline=tl)
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    ivs = {iv.name: iv for iv in tl.intervals}
    assert sorted(ivs) == sorted(str(n) for n in plan.nodes)
    experts = ivs["experts@mb0"]
    # Device time: the ~20 ms sleep kernel is inside the interval (launch time would be µs).
    assert experts.duration >= 0.5 * SLEEP_S
    slack = 2e-3  # calibration error bound, generous
    assert all(t0 - slack <= iv.start <= iv.end <= t1 + slack for iv in ivs.values())
    # Stream order on the device: teardown ends before experts start (an event joins them).
    assert ivs["x_teardown@mb0"].end <= experts.start + 1e-4
    rep = tl.report()
    assert rep.compute_busy >= experts.duration
