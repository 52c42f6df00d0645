"""The pictures explain themselves: the timeline's legend names exactly the tracks drawn, a box too
narrow for its name gets none, and the plan's title names its layer and microbatch count."""

from __future__ import annotations

import pytest

from overlap import Graph
from overlap.drawing import plan_title, save_plan_png, save_timeline_png, timeline_legend
from overlap.timeline import Timeline

pytest.importorskip("matplotlib")


def _timeline() -> Timeline:
    t = Timeline(["compute", "comm_setup", "comm_teardown", "link"])
    t.add("compute", "experts@mb0.l0", 0.0, 0.050)
    t.add("comm_setup", "dispatch_setup@mb1.l0", 0.0, 0.0001, kind="comm_issue")  # far too narrow for its name
    t.add("comm_teardown", "dispatch_teardown@mb1.l0", 0.0001, 0.040, kind="comm_wait")
    t.add("link", "dispatch@mb1.l0", 0.0001, 0.039, kind="comm")
    return t


def test_timeline_legend_names_the_tracks_drawn():
    labels = dict(timeline_legend(_timeline()))
    assert set(labels) == {"compute", "comm_issue", "comm_wait", "comm"}
    assert labels["comm_issue"].startswith("comm_setup:") and labels["comm_wait"].startswith("comm_teardown:")
    assert labels["comm"].startswith("link:") and labels["compute"].startswith("compute:")
    only_compute = Timeline()
    only_compute.add("compute", "route", 0.0, 1.0)
    assert [k for k, _ in timeline_legend(only_compute)] == ["compute"]  # no entry for what is not drawn


def test_narrow_boxes_carry_no_name(tmp_path):
    named = save_timeline_png(_timeline(), tmp_path / "t.png", title="test")
    assert "experts@mb0.l0" in named and "dispatch@mb1.l0" in named
    assert "dispatch_setup@mb1.l0" not in named
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"


def test_plan_title_names_layer_and_microbatches(tmp_path):
    g = Graph()
    for mb in (0, 1):
        g.add(f"route@mb{mb}.l3")
        g.add(f"dispatch_setup@mb{mb}.l3")
        g.add(f"dispatch_teardown@mb{mb}.l3")
        g.add_edge(f"route@mb{mb}.l3", f"dispatch_setup@mb{mb}.l3")
        g.add_edge(f"dispatch_setup@mb{mb}.l3", f"dispatch_teardown@mb{mb}.l3")
    plan = g.plan()
    assert plan_title(plan).startswith("Plan of layer 3 with 2 microbatches: 6 steps on 3 streams")
    save_plan_png(plan, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0
