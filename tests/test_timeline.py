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
