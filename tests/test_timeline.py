"""Tests of overlap.timeline: interval arithmetic, the overlap report, exports."""

from __future__ import annotations

import builtins
import json

import pytest

from overlap.timeline import Timeline, intersect, total, union


def test_interval_arithmetic():
    assert union([(3, 4), (0, 1), (0.5, 2)]) == [(0, 2), (3, 4)]
    assert total([(0, 1), (0.5, 2), (3, 4)]) == 3
    assert intersect([(0, 2), (3, 5)], [(1, 4)]) == [(1, 2), (3, 4)]
    assert intersect([(0, 1)], [(1, 2)]) == []


def make() -> Timeline:
    tl = Timeline(["compute", "comm_setup", "comm_teardown"])
    tl.add("compute", "a", 0.0, 4.0)
    tl.add("compute", "b", 5.0, 6.0)
    tl.add("comm_setup", "x_setup", 1.0, 1.5, "comm_issue")
    tl.add("link", "x_setup", 1.5, 5.5, "comm")
    tl.add("comm_teardown", "x_teardown", 2.0, 6.0, "comm_wait")  # waits 3.5 s, works 0.5 s
    return tl


def test_report_uses_comm_intervals_and_interval_unions():
    rep = make().report()
    assert rep.comm_source == "comm"
    assert rep.makespan == 6.0
    assert rep.compute_busy == 5.0
    assert rep.comm_busy == 4.0
    assert rep.overlap == pytest.approx(3.0)  # [1.5, 4] + [5, 5.5]
    assert rep.hidden_fraction == pytest.approx(0.75)
    # nodes 4 + 1 + 0.5 + 4, plus transfer 4, minus the teardown's 3.5 s spent on the transfer
    assert rep.serial_time == pytest.approx(10.0)
    assert rep.speedup == pytest.approx(10.0 / 6.0)
    text = str(rep)
    assert "hidden fraction" in text and "75.0 %" in text


def test_report_falls_back_to_comm_nodes():
    tl = Timeline()
    tl.add("compute", "a", 0.0, 2.0)
    tl.add("comm_teardown", "w", 1.0, 3.0, "comm_wait")
    rep = tl.report()
    assert rep.comm_source == "nodes" and rep.hidden_fraction == pytest.approx(0.5)


def test_add_rejects_bad_values():
    tl = Timeline()
    with pytest.raises(ValueError, match="kind must be one of"):
        tl.add("t", "n", 0, 1, "gpu")
    with pytest.raises(ValueError, match="end must be >= start"):
        tl.add("t", "n", 2, 1)


def test_exports(tmp_path):
    tl = make()
    assert tl.tracks == ("compute", "comm_setup", "comm_teardown", "link")
    assert tl.order("compute") == ["a", "b"]
    trace = json.loads(json.dumps(tl.to_chrome_trace()))
    threads = [e for e in trace["traceEvents"] if e["name"] == "thread_name"]
    assert [t["args"]["name"] for t in threads] == list(tl.tracks)
    x = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert {(e["name"], e["ts"], e["dur"]) for e in x} >= {("x_setup", 1.5e6, 4e6)}
    text = tl.to_text(width=40)
    assert text.splitlines()[1].startswith("compute") and "#" in text and "=" in text
    tl.save_chrome_trace(tmp_path / "t.json")
    assert json.loads((tmp_path / "t.json").read_text())["traceEvents"]
    with pytest.raises(ValueError, match="width must be an int >= 8"):
        tl.to_text(width=3)


def test_png_without_matplotlib_says_how_to_install(monkeypatch, tmp_path):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match=r"pip install moe-overlap\[viz\]"):
        make().save_png(tmp_path / "t.png")


def test_pending_intervals_are_resolved_once_when_the_timeline_is_read():
    """A device run adds its device times as pending (reading them waits for the device): nothing is
    resolved while the run adds, everything is, in order and once, at the first read."""
    tl = Timeline(["compute"])
    calls = []
    tl.add("compute", "route@mb0", 0.0, 1.0)
    tl.add_pending(lambda: calls.append("a") or [("compute", "experts@mb0", 1.0, 3.0, "compute")])
    tl.add_pending(lambda: calls.append("b") or [("link", "dispatch@mb0", 0.5, 2.0, "comm")])
    assert calls == []
    assert [iv.name for iv in tl.intervals] == ["route@mb0", "dispatch@mb0", "experts@mb0"]
    assert calls == ["a", "b"]
    assert tl.tracks == ("compute", "link") and calls == ["a", "b"]
    assert tl.report().compute_busy == 3.0


def test_a_measured_serial_time_gives_a_measured_speedup_and_says_so():
    rep = make().report(serial_time=9.0)
    assert rep.serial_source == "measured" and rep.serial_time == 9.0
    assert rep.speedup == pytest.approx(9.0 / 6.0)
    assert "serial time (measured)" in str(rep) and "estimate" not in str(rep)
    estimate = make().report()
    assert estimate.serial_source == "estimate" and "speedup (estimate*)" in str(estimate)
    assert "fixed costs" in str(estimate) and "report(serial_time=seconds)" in str(estimate)
    for bad in (0, -1.0, float("inf"), float("nan"), True, "9"):
        with pytest.raises(ValueError, match="serial_time must be a finite number of seconds > 0"):
            make().report(serial_time=bad)


def _run(steps: list[tuple[str, float, str]], transfers: dict[str, tuple[float, float]]) -> Timeline:
    """A timeline of steps run one after another on one thread (as the planned executor runs a CPU
    plan), `(name, duration, kind)`, plus link intervals `(start, end)` by name."""
    tl, t = Timeline(), 0.0
    for name, duration, kind in steps:
        tl.add(
            {"compute": "compute", "comm_issue": "comm_setup", "comm_wait": "comm_teardown"}[kind],
            name,
            t,
            t + duration,
            kind,
        )
        t += duration
    for name, (start, end) in transfers.items():
        tl.add("link", name, start, end, "comm")
    return tl


def test_the_estimate_keeps_the_fixed_costs_of_extra_microbatches():
    """Work W = 4 s of compute and C = 4 s of link, each call costing a fixed f = 0.5 s. Serial:
    one setup, one teardown (waiting out the whole transfer), one compute call: 1 + 4 + 4.5 = 9.5 s.
    Overlapped in 2 microbatches, perfectly hidden: the estimate adds up this run's own calls (two
    of each, 2 f more), so it overstates the serial run by exactly the extra fixed costs."""
    f = 0.5
    serial = _run(
        [("setup", f, "comm_issue"), ("teardown", 4.0 + f, "comm_wait"), ("compute", 4.0 + f, "compute")],
        {"x": (f, 4.0 + f)},
    )
    measured = serial.makespan
    assert measured == pytest.approx(9.5)
    assert serial.report().serial_time == pytest.approx(measured)  # one microbatch: the estimate is exact
    overlapped = _run(  # each transfer travels under a compute call, no teardown waits
        [
            ("setup0", f, "comm_issue"),
            ("setup1", f, "comm_issue"),
            ("compute0", 2.0 + f, "compute"),
            ("teardown0", f, "comm_wait"),
            ("compute1", 2.0 + f, "compute"),
            ("teardown1", f, "comm_wait"),
        ],
        {"x0": (1.0, 3.0), "x1": (4.0, 6.0)},
    )
    rep = overlapped.report()
    nodes = 2 * f + 2 * f + 2 * (2.0 + f)
    assert rep.hidden_fraction == pytest.approx(1.0) and rep.makespan == pytest.approx(nodes)
    assert rep.serial_time == pytest.approx(nodes + 4.0)  # every call, plus the 4 s of link
    assert rep.speedup == pytest.approx((nodes + 4.0) / nodes)
    # A measured serial run of the same work took 3 f less: the 3 extra calls of the second microbatch.
    assert rep.serial_time - measured == pytest.approx(3 * f)
    assert overlapped.report(serial_time=measured).speedup == pytest.approx(measured / nodes)
