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


# -- nothing drawn past the frame; plans readable at 4 microbatches and 2 layers -----------------


def _moe_plan(microbatches: int, layers: int):
    """The planned executor's MoE graph (its stages, data dependencies and pipeline order), for
    `layers` layers in a row, each layer's route and shared experts after the previous combine."""
    from overlap.pipeline.planned import DEPENDS, TWO_BATCH

    g = Graph()
    for layer in range(layers):
        for priority, (stage, mb) in enumerate(TWO_BATCH.order(microbatches)):
            after = [f"{d}@mb{mb}.l{layer}" for d in DEPENDS[stage]]
            if stage in ("route", "shared") and layer:
                after.append(f"combine_teardown@mb{mb}.l{layer - 1}")
            g.add(f"{stage}@mb{mb}.l{layer}", after=after, priority=100 * layer + priority)
    return g.plan()


def _inside(inner, outer, margin: float = 0.0) -> bool:
    return (
        inner.x0 >= outer.x0 + margin - 0.5
        and inner.x1 <= outer.x1 - margin + 0.5
        and inner.y0 >= outer.y0 + margin - 0.5
        and inner.y1 <= outer.y1 - margin + 0.5
    )


def _texts(fig):
    """Every text drawn: tick labels only of ticks in view (matplotlib draws no other)."""
    from matplotlib.axis import Tick
    from matplotlib.text import Text

    ticks = [t for t in fig.findobj(Tick)]
    of_ticks = {id(label) for t in ticks for label in (t.label1, t.label2)}
    texts = [t for t in fig.findobj(Text) if id(t) not in of_ticks]
    for ax in fig.axes:
        for axis, (lo, hi) in ((ax.xaxis, sorted(ax.get_xlim())), (ax.yaxis, sorted(ax.get_ylim()))):
            texts += [t.label1 for t in axis.get_major_ticks() if lo <= t.get_loc() <= hi]
    return [t for t in texts if t.get_visible() and t.get_text()]


def test_timeline_draws_nothing_past_the_frame():
    """The first and the last box (ending at the timeline's end) keep a margin inside the axes;
    every text (title, ticks, names, legend, caption) is inside the figure."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from overlap.drawing import timeline_figure

    fig, named = timeline_figure(_timeline(), title="a title as long as the demo's: " + "x" * 60)
    try:
        renderer = fig.canvas.get_renderer()
        fig.canvas.draw()
        ax = fig.axes[0]
        bars = [p for p in ax.patches if isinstance(p, Rectangle)]
        assert len(bars) >= 4
        for bar in bars:
            assert _inside(bar.get_window_extent(renderer), ax.bbox, margin=2), bar
        for text in _texts(fig):
            assert _inside(text.get_window_extent(renderer), fig.bbox), text.get_text()
        assert named
    finally:
        plt.close(fig)


def test_timeline_window_is_the_axis():
    """With a window (a run's whole wall time), the axis ends at its length; boxes are clipped to it."""
    import matplotlib.pyplot as plt

    from overlap.drawing import timeline_figure

    fig, _ = timeline_figure(_timeline(), title="t", start=-0.010, end=0.060)
    try:
        lo, hi = fig.axes[0].get_xlim()
        assert lo < 0 < 70 < hi < 71  # ms: the window's 70 ms, plus a 1 % margin either side
    finally:
        plt.close(fig)
    with pytest.raises(ValueError, match="end must be >= start"):
        timeline_figure(_timeline(), start=1.0, end=0.5)


@pytest.mark.parametrize("microbatches, layers", [(2, 1), (4, 2)])
def test_plan_picture_is_readable(microbatches, layers):
    """Every node's name lies inside its box; no arrow enters a box other than its two ends (so no
    arrow crosses a name); boxes and arrows stay inside the axes, and every text inside the figure."""
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    from overlap.drawing import BOX_H, BOX_W, plan_figure, route_edges

    plan = _moe_plan(microbatches, layers)
    assert len(plan.steps) == 7 * microbatches * layers
    fig = plan_figure(plan)
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        ax = fig.axes[0]
        boxes = [p for p in ax.patches if isinstance(p, FancyBboxPatch)]
        arrows = [p for p in ax.patches if isinstance(p, FancyArrowPatch)]
        assert len(boxes) == len(plan.steps) and len(arrows) == plan.graph.number_of_edges()
        for patch in boxes + arrows:
            assert _inside(patch.get_window_extent(renderer), ax.bbox), patch
        labels = [t for t in ax.texts if t.get_text()]
        assert len(labels) == len(plan.steps)
        for text, box in zip(labels, boxes):
            assert _inside(text.get_window_extent(renderer), box.get_window_extent(renderer), margin=1), text
        for text in _texts(fig):
            assert _inside(text.get_window_extent(renderer), fig.bbox), text.get_text()
    finally:
        plt.close(fig)
    # The arrows' geometry: sampled every 0.01 of a column or a lane, none inside another box.
    lanes = {st: len(plan.streams) - 1 - i for i, st in enumerate(plan.streams)}
    centre = {s.node: (float(s.index), float(lanes[s.stream])) for s in plan.steps}
    for (u, v), pts in route_edges(list(plan.graph.edges), centre).items():
        dense = np.concatenate([np.linspace(a, b, 200) for a, b in zip(np.array(pts[:-1]), np.array(pts[1:]))])
        for node, (x, y) in centre.items():
            if node in (u, v):
                continue
            hit = (abs(dense[:, 0] - x) < BOX_W / 2) & (abs(dense[:, 1] - y) < BOX_H / 2)
            assert not hit.any(), f"arrow {u} -> {v} passes through {node}"


# -- text timelines and reports agree on the makespan ---------------------------------------------


def _axis_end(text: str) -> str:
    return text.splitlines()[0].split()[-2]


def test_text_axis_ends_at_the_report_makespan():
    tl = _timeline()
    assert _axis_end(tl.to_text()) == f"{tl.report().makespan * 1e3:.2f}"
    header, *rows = tl.to_text(width=40).splitlines()
    assert len(header) == len(rows[0]) and header.endswith("ms|")  # the label ends at the grid's edge
    # A window: the axis is its length, intervals are placed within it.
    text = tl.to_text(width=40, start=-0.050, end=0.150)
    assert _axis_end(text) == "200.00"
    compute = text.splitlines()[1]
    assert compute.index("#") == compute.index("|") + 1 + 10  # 50 ms into 200 ms: column 10 of 40


def test_recorded_run_text_axis_is_the_report_makespan():
    """As in examples/transformers_ep.py: the report's makespan is the whole recorded block, and the
    text timeline drawn over the recorder's window ends at that same figure."""
    pytest.importorskip("transformers")
    import time

    import overlap.integrations.transformers as ohf

    with ohf.record() as rec:
        time.sleep(0.02)  # attention, routers: no op call recorded
        now = time.perf_counter()
        rec.timeline.add("compute", "experts@mb0.l0", now, now + 0.005)
        time.sleep(0.01)
    makespan = rec.report().makespan
    assert makespan > rec.timeline.makespan + 0.02
    text = rec.timeline.to_text(width=60, start=rec.started, end=rec.ended)
    assert _axis_end(text) == f"{makespan * 1e3:.2f}"
    row = text.splitlines()[1]
    assert row.index("#") > 20  # the experts ran about 20 ms into the 35 ms block
