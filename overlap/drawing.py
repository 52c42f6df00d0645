"""Pictures of plans and timelines, made to be read by someone who has not seen the code.

Owns: the plan's swim-lane PNG and its Graphviz DOT text (`Plan.save_png`, `Plan.to_dot` delegate
here), the timeline's PNG (`Timeline.save_png` delegates here), the colours and the words of their
legends and captions. Input: a frozen `overlap.graph.Plan` or an `overlap.timeline.Timeline`;
output: a file. Never runs, schedules or measures anything, and imports matplotlib only when a
picture is asked for (`pip install moe-overlap[viz]`).

Every picture explains itself: the title says what is shown (and, for a timeline, its hidden
fraction and speedup); the legend names exactly the tracks or streams and edge styles drawn; a
caption reads the node names (`dispatch_setup@mb0.l0` = op dispatch_setup, microbatch 0, layer 0).
"""

from __future__ import annotations

import os
import textwrap
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .graph import Plan
    from .timeline import Timeline

STREAM_COLORS = {"compute": "#4c72b0", "comm_setup": "#dd8452", "comm_teardown": "#c44e52"}
KIND_COLORS = {"compute": "#4c72b0", "comm_issue": "#dd8452", "comm_wait": "#c44e52", "comm": "#55a868"}
KIND_MEANING = {
    "compute": "computation (routing, experts, shared experts)",
    "comm_issue": "setups (send, return at once)",
    "comm_wait": "teardowns (wait for the transfer, unpack)",
    "comm": "transfers on the link",
}
NAME_CAPTION = "Names read op@mb<i>.l<j>: dispatch_setup@mb0.l0 = op dispatch_setup of microbatch 0 in layer 0."
LINK_CAPTION = "On the link, dispatch@mb0.l0 is the transfer that dispatch_setup@mb0.l0 started."
EVENT_COLOR, DATA_COLOR = "#d62728", "#888888"


def pyplot() -> Any:
    """matplotlib.pyplot, headless, imported on first use.

    Raises:
        ImportError: matplotlib is not installed (says how to install it).
    """
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("drawing needs matplotlib: pip install moe-overlap[viz]") from exc
    return plt


def _shape_of(nodes: Any) -> tuple[list[int], int]:
    """(layers, microbatch count) of a plan's nodes."""
    layers = sorted({n.layer for n in nodes if n.layer is not None})
    micro = {n.microbatch for n in nodes if n.microbatch is not None}
    return layers, len(micro)


def _layers_text(layers: list[int]) -> str:
    if not layers:
        return "one layer"
    if len(layers) == 1:
        return f"layer {layers[0]}"
    return f"layers {layers[0]}-{layers[-1]}"


# --------------------------------------------------------------------------------------------
# Plans
# --------------------------------------------------------------------------------------------


def plan_to_dot(plan: Plan) -> str:
    """Graphviz DOT text (no graphviz needed): one cluster per stream, nodes coloured by stream,
    data edges solid, event edges dashed red and labelled ``e<i>``."""
    event_of = {(e.src, e.dst): e for e in plan.events}
    layers, micro = _shape_of(plan.nodes)
    lines = [
        "digraph plan {",
        "  rankdir=LR;",
        f'  label="plan of {_layers_text(layers)}, {micro} microbatches (fingerprint {plan.fingerprint()})";',
        '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontcolor=white];',
    ]
    for st in plan.streams:
        lines.append(f'  subgraph "cluster_{st}" {{ label="{st}"; color="{STREAM_COLORS[st]}";')
        for s in plan.steps:
            if s.stream == st:
                lines.append(f'    "{s.node}" [fillcolor="{STREAM_COLORS[st]}"];')
        lines.append("  }")
    position = {s.node: s.index for s in plan.steps}
    for u, v in sorted(plan.graph.edges, key=lambda e: (position[e[0]], position[e[1]])):
        ev = event_of.get((u, v))
        if ev is None:
            lines.append(f'  "{u}" -> "{v}";')
        else:
            lines.append(f'  "{u}" -> "{v}" [style=dashed, color=red, label="{ev}"];')
    lines.append("}")
    return "\n".join(lines) + "\n"


def plan_title(plan: Plan) -> str:
    """What the plan picture shows: its layer(s), microbatch count, steps, streams and events."""
    layers, micro = _shape_of(plan.nodes)
    return (
        f"Plan of {_layers_text(layers)}{f' with {micro} microbatch' + ('es' if micro != 1 else '') if micro else ''}: "
        f"{len(plan.steps)} steps on {len(plan.streams)} streams, {len(plan.events)} events"
    )


# The plan picture's geometry: one column per step, one lane per stream (inches). A node is a box
# holding its name, so no label can cross an arrow. Arrows never pass through a box: they run
# between the lanes (each in its own track of that corridor) and cross a lane only in the gap
# between two columns.
STEP_IN, LANE_IN = 0.72, 1.6
BOX_W, BOX_H = 0.86, 0.34  # of a column, of a lane
LEFT_IN, RIGHT_IN, TOP_IN, BOTTOM_IN = 1.35, 0.3, 0.55, 1.75
Y_MARGIN = 0.35  # lanes: the least room above the top lane and below the bottom one


def node_label(node: Any) -> str:
    """A node's name in a plan box: the op wrapped at its underscores, then ``mb<i>.l<j>``
    (``dispatch_setup@mb0.l0`` -> ``dispatch / setup / mb0.l0``, one per line)."""
    op = getattr(node, "op", str(node))
    words = textwrap.wrap(op.replace("_", " "), 10, break_long_words=True) or [op]
    lines = [line.replace(" ", "_") for line in words]
    tag = []
    if getattr(node, "microbatch", None) is not None:
        tag.append(f"mb{node.microbatch}")
    if getattr(node, "layer", None) is not None:
        tag.append(f"l{node.layer}")
    if tag:
        lines.append(".".join(tag))
    return "\n".join(lines)


def _spread(count: int, room: float, step: float) -> list[float]:
    """`count` offsets centred on 0, `step` apart at most, all within +-room/2."""
    gap = min(step, room / max(count - 1, 1))
    return [(j - (count - 1) / 2) * gap for j in range(count)]


def route_edges(
    edges: list[tuple[Any, Any]], centre: dict[Any, tuple[float, float]]
) -> dict[tuple[Any, Any], list[tuple[float, float]]]:
    """Orthogonal arrows (data coordinates) that enter no box but their two ends.

    An arrow leaves its source box vertically (from the side facing its target; same lane: from
    the top), runs along the corridor next to the source lane, crosses any lane between in the gap
    left of the target's column, runs along the corridor next to the target lane, and enters the
    target box vertically. Each corridor gives every arrow whose run overlaps another's its own
    track; arrows leaving or entering one box are spread along its edge.
    """
    plan: dict[tuple[Any, Any], dict[str, Any]] = {}
    outs: dict[Any, list[tuple[Any, Any]]] = {}
    ins: dict[Any, list[tuple[Any, Any]]] = {}
    for u, v in edges:
        (xs, ys), (xt, yt) = centre[u], centre[v]
        if yt < ys:
            c1, c2, d1, d2 = ys - 0.5, yt + 0.5, -1, 1
        elif yt > ys:
            c1, c2, d1, d2 = ys + 0.5, yt - 0.5, 1, -1
        else:
            c1 = c2 = ys + 0.5
            d1, d2 = 1, 1
        gap = xt - 0.5 if xt > xs else xt + 0.5
        plan[u, v] = {"c1": c1, "c2": c2, "d1": d1, "d2": d2, "gap": gap}
        outs.setdefault(u, []).append((u, v))
        ins.setdefault(v, []).append((u, v))
    for table, key, far in ((outs, "x0", 1), (ins, "x1", 0)):
        for node, group in table.items():
            group.sort(key=lambda e: centre[e[far]][0])  # noqa: B023 (sorted at once, in this loop)
            for e, off in zip(group, _spread(len(group), 0.7 * BOX_W, 0.16)):
                plan[e][key] = centre[node][0] + off
    # Tracks: per corridor, runs whose x spans overlap get different tracks (greedy by left end).
    runs: dict[float, list[tuple[float, float, tuple[Any, Any], str]]] = {}
    for e, p in plan.items():
        if p["c1"] == p["c2"]:
            runs.setdefault(p["c1"], []).append((min(p["x0"], p["x1"]), max(p["x0"], p["x1"]), e, "y1"))
        else:
            runs.setdefault(p["c1"], []).append((min(p["x0"], p["gap"]), max(p["x0"], p["gap"]), e, "y1"))
            runs.setdefault(p["c2"], []).append((min(p["gap"], p["x1"]), max(p["gap"], p["x1"]), e, "y2"))
    for corridor, items in runs.items():
        items.sort(key=lambda r: (r[0], r[1]))
        ends: list[float] = []
        track_of = []
        for lo, hi, _, _ in items:
            k = next((i for i, end in enumerate(ends) if end < lo - 0.05), len(ends))
            if k == len(ends):
                ends.append(hi)
            else:
                ends[k] = hi
            track_of.append(k)
        offsets = _spread(len(ends), (1 - BOX_H) - 0.14, 0.07)
        for (_, _, e, which), k in zip(items, track_of):
            plan[e][which] = corridor + offsets[k]
    columns: dict[float, list[tuple[Any, Any]]] = {}
    for e, p in plan.items():
        if p["c1"] != p["c2"]:
            columns.setdefault(p["gap"], []).append(e)
    for gap, group in columns.items():
        for e, off in zip(group, _spread(len(group), (1 - BOX_W) - 0.04, 0.04)):
            plan[e]["gx"] = gap + off
    paths = {}
    for (u, v), p in plan.items():
        (_, ys), (_, yt) = centre[u], centre[v]
        start = (p["x0"], ys + p["d1"] * BOX_H / 2)
        end = (p["x1"], yt + p["d2"] * BOX_H / 2)
        if p["c1"] == p["c2"]:
            pts = [start, (p["x0"], p["y1"]), (p["x1"], p["y1"]), end]
        else:
            pts = [start, (p["x0"], p["y1"]), (p["gx"], p["y1"]), (p["gx"], p["y2"]), (p["x1"], p["y2"]), end]
        paths[u, v] = pts
    return paths


def plan_figure(plan: Plan, *, title: str | None = None) -> Any:
    """The plan picture as a matplotlib figure (`save_plan_png` writes it): x = the step's place in
    the plan's order, one lane per stream, each node a box with its name inside, coloured by stream.
    Data edges (a node's result goes to another node; same stream: stream order covers it) are solid
    grey arrows; event edges (a data edge between two streams, kept by one record/wait pair) are
    dashed red. Nothing is drawn outside the figure.

    Raises:
        ImportError: matplotlib is not installed.
    """
    plt = pyplot()
    from matplotlib.lines import Line2D
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Patch
    from matplotlib.path import Path

    n, lanes = len(plan.steps), len(plan.streams)
    lane = {st: lanes - 1 - i for i, st in enumerate(plan.streams)}
    centre = {s.node: (float(s.index), float(lane[s.stream])) for s in plan.steps}
    boxes = {node: (x - BOX_W / 2, x + BOX_W / 2, y - BOX_H / 2, y + BOX_H / 2) for node, (x, y) in centre.items()}
    position = {s.node: s.index for s in plan.steps}
    edges = sorted(plan.graph.edges, key=lambda e: (position[e[0]], position[e[1]]))
    paths = route_edges(edges, centre)
    ys = [y for pts in paths.values() for _, y in pts]
    top = max([lanes - 1 + Y_MARGIN, *(y + 0.12 for y in ys)])
    bottom = min([-Y_MARGIN, *(y - 0.12 for y in ys)])
    axes_w, axes_h = max(n, 1) * STEP_IN, (top - bottom) * LANE_IN
    width = max(9.0, LEFT_IN + axes_w + RIGHT_IN)
    height = TOP_IN + axes_h + BOTTOM_IN
    fig = plt.figure(figsize=(width, height), dpi=100)
    left = max(LEFT_IN, (width - axes_w) / 2)  # a short plan is centred
    ax = fig.add_axes((left / width, BOTTOM_IN / height, axes_w / width, axes_h / height))
    ax.set_xlim(-0.5, n - 0.5)
    ax.set_ylim(bottom, top)  # with room for the corridors that arrows run along

    events = {(e.src, e.dst) for e in plan.events}
    for (u, v), pts in paths.items():
        event = (u, v) in events
        codes = [Path.MOVETO] + [Path.LINETO] * (len(pts) - 1)
        ax.add_patch(
            FancyArrowPatch(
                path=Path(pts, codes),
                arrowstyle="-|>",
                mutation_scale=11 if event else 9,
                color=EVENT_COLOR if event else DATA_COLOR,
                linestyle="--" if event else "-",
                linewidth=1.1 if event else 0.9,
                zorder=2 if event else 1,
            )
        )
    labels = []
    for s in plan.steps:
        x0, x1, y0, y1 = boxes[s.node]
        ax.add_patch(
            FancyBboxPatch(
                (x0, y0),
                x1 - x0,
                y1 - y0,
                boxstyle="round,pad=0,rounding_size=0.06",
                facecolor=STREAM_COLORS.get(s.stream, "#777777"),
                edgecolor="black",
                linewidth=0.6,
                zorder=3,
            )
        )
        labels.append(
            (
                ax.text(
                    *centre[s.node],
                    node_label(s.node),
                    ha="center",
                    va="center",
                    fontsize=6.5,
                    color="white",
                    linespacing=1.05,
                    zorder=4,
                ),
                s.node,
            )
        )
    ax.set_yticks([lane[st] for st in plan.streams], list(plan.streams))
    ax.set_xticks(range(n))
    ax.tick_params(labelsize=8)
    ax.set_xlabel("step in the plan's order (each stream runs its steps left to right)", fontsize=9)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    handles: list[Any] = [Patch(color=STREAM_COLORS[st], label=f"{st} stream") for st in plan.streams]
    handles += [
        Line2D([], [], color=DATA_COLOR, label="dependency, no event (same stream, or implied by a path)"),
        Line2D(
            [],
            [],
            color=EVENT_COLOR,
            linestyle="--",
            label="dependency across streams: one event (recorded, then waited)",
        ),
    ]
    fig.legend(
        handles=handles,
        loc="upper center",
        bbox_to_anchor=(0.5, (BOTTOM_IN - 0.5) / height),
        fontsize=8,
        ncol=3 if width >= 13 else 2,
        frameon=False,
    )
    fig.suptitle(title or plan_title(plan), y=1 - 0.12 / height, va="top", fontsize=11)
    caption = (
        "Each box holds a node's name: op (wrapped at its underscores), then mb<i>.l<j>; dispatch / setup / mb0.l0 "
        "is dispatch_setup@mb0.l0, op dispatch_setup of microbatch 0 in layer 0. "
        f"Plan fingerprint {plan.fingerprint()} (the same on every rank)."
    )
    fig.text(
        0.5, 0.1 / height, "\n".join(textwrap.wrap(caption, int(width * 15))), ha="center", va="bottom", fontsize=8
    )
    # A name wider or taller than its box is set smaller until it fits.
    renderer = fig.canvas.get_renderer()
    for text, node in labels:
        x0, x1, y0, y1 = boxes[node]
        (bx0, by0), (bx1, by1) = ax.transData.transform([(x0, y0), (x1, y1)])
        while text.get_fontsize() > 3.5:
            ext = text.get_window_extent(renderer)
            if ext.width <= (bx1 - bx0) - 3 and ext.height <= (by1 - by0) - 2:
                break
            text.set_fontsize(text.get_fontsize() - 0.5)
    return fig


def save_plan_png(plan: Plan, path: str | os.PathLike, *, title: str | None = None) -> None:
    """Draw `plan` to PNG (`plan_figure`): one lane per stream, one box per step, named inside;
    the title names the layer(s) and the microbatch count, the caption reads the node names.

    Raises:
        ImportError: matplotlib is not installed.
    """
    plt = pyplot()
    fig = plan_figure(plan, title=title)
    fig.savefig(path)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# Timelines
# --------------------------------------------------------------------------------------------


def timeline_title(timeline: Timeline) -> str:
    """The default title: what the timeline is and its own report's figures (the speedup there is
    an estimate from the timed steps, and says so)."""
    rep = timeline.report()
    return (
        f"{timeline.source} timeline: makespan {rep.makespan * 1e3:.2f} ms, hidden "
        f"{rep.hidden_fraction * 100:.0f} % of comm, estimated speedup {rep.speedup:.2f}x "
        "(serial time summed from the steps)"
    )


def timeline_legend(timeline: Timeline) -> list[tuple[str, str]]:
    """`(kind, label)` for every kind drawn: the label names the tracks it sits on and what it is."""
    intervals = timeline.intervals
    out = []
    for k in KIND_COLORS:
        on = [t for t in timeline.tracks if any(iv.kind == k and iv.track == t for iv in intervals)]
        if on:
            out.append((k, f"{' / '.join(on)}: {KIND_MEANING[k]}"))
    return out


def timeline_window(timeline: Timeline, start: float | None = None, end: float | None = None) -> tuple[float, float]:
    """The time axis of a timeline picture or text, in the timeline's clock: `start` and `end` when
    given (a run's whole wall time, as its report counts it), else first start to last end.

    Raises:
        ValueError: `end` before `start`.
    """
    ivs = timeline.intervals
    lo = (min(iv.start for iv in ivs) if ivs else 0.0) if start is None else float(start)
    hi = (max(iv.end for iv in ivs) if ivs else lo) if end is None else float(end)
    if hi < lo:
        raise ValueError(f"end must be >= start, got start={start}, end={end}")
    return lo, hi


def timeline_figure(
    timeline: Timeline, *, title: str | None = None, start: float | None = None, end: float | None = None
) -> tuple[Any, list[str]]:
    """The timeline picture as a matplotlib figure (`save_timeline_png` writes it) and the names
    written on boxes. One lane per track, boxes coloured by kind, clipped to the window
    (`timeline_window`), a name on every box wide enough to hold it (the Chrome trace keeps every
    name), a legend of exactly the kinds drawn with the tracks they sit on, and a caption that reads
    the names. Nothing is drawn outside the figure.

    Raises:
        ImportError: matplotlib is not installed.
        ValueError: `end` before `start`.
    """
    plt = pyplot()
    from matplotlib.patches import Patch

    from .timeline import intersect, union

    tracks = timeline.tracks
    t0, t1 = timeline_window(timeline, start, end)
    span = max((t1 - t0) * 1e3, 1e-6)
    intervals = [iv for iv in timeline.intervals if iv.end >= t0 and iv.start <= t1]

    def clip(a: float, b: float) -> tuple[float, float]:
        return max(a, t0), min(b, t1)

    fig, ax = plt.subplots(figsize=(12, 1.9 + 0.7 * max(1, len(tracks))), dpi=100)
    boxes = []
    for iv in intervals:
        y = len(tracks) - 1 - tracks.index(iv.track)
        a, b = clip(iv.start, iv.end)
        left, w = (a - t0) * 1e3, (b - a) * 1e3
        ax.barh(y, w, left=left, height=0.6, color=KIND_COLORS[iv.kind], edgecolor="black", linewidth=0.5)
        boxes.append((iv, y, left, w))
    # Hatch the link time that ran under compute: the hidden fraction, drawn.
    compute = union(clip(iv.start, iv.end) for iv in intervals if iv.kind == "compute")
    hidden_drawn = False
    for track in tracks:
        comm = [clip(iv.start, iv.end) for iv in intervals if iv.kind == "comm" and iv.track == track]
        y = len(tracks) - 1 - tracks.index(track)
        for a, b in intersect(comm, compute):
            ax.barh(
                y,
                (b - a) * 1e3,
                left=(a - t0) * 1e3,
                height=0.6,
                facecolor="none",
                edgecolor="white",
                hatch="///",
                linewidth=0,
            )
            hidden_drawn = True
    ax.set_yticks(range(len(tracks)), list(reversed(tracks)))
    ax.set_xlabel("time (ms)")
    pad = 0.01 * span  # the first and the last box keep their borders inside the frame
    ax.set_xlim(-pad, span + pad)
    ax.set_ylim(-0.6, len(tracks) - 0.4)
    ax.set_title(title or timeline_title(timeline), fontsize=10)
    handles = [Patch(color=KIND_COLORS[k], label=label) for k, label in timeline_legend(timeline)]
    if hidden_drawn:
        handles.append(
            Patch(
                facecolor=KIND_COLORS["comm"],
                edgecolor="white",
                hatch="///",
                label="hatched: link time hidden under compute",
            )
        )
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.2), fontsize=8, ncol=2, frameon=False)
    caption = (
        NAME_CAPTION + " " + LINK_CAPTION + " Boxes too narrow for their name carry none (the Chrome trace "
        "has every name)."
    )
    fig.text(0.5, 0.01, "\n".join(textwrap.wrap(caption, 150)), ha="center", va="bottom", fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    # Names only where they fit: measured against the box in pixels, after the layout is final.
    renderer = fig.canvas.get_renderer()
    named = []
    for iv, y, left, w in boxes:
        text = ax.text(left + w / 2, y, iv.name, ha="center", va="center", fontsize=7, clip_on=True)
        x0, x1 = ax.transData.transform([(left, y), (left + w, y)])[:, 0]
        if text.get_window_extent(renderer).width > (x1 - x0) - 4:
            text.remove()
        else:
            named.append(iv.name)
    return fig, named


def save_timeline_png(
    timeline: Timeline,
    path: str | os.PathLike,
    *,
    title: str | None = None,
    start: float | None = None,
    end: float | None = None,
) -> list[str]:
    """Draw `timeline` to PNG (`timeline_figure`).

    Args:
        title: replaces the default `timeline_title` (the demo passes its measured figures).
        start, end: the time axis, in the timeline's clock (default: first start to last end).

    Returns:
        The names written on boxes (the others were too narrow).

    Raises:
        ImportError: matplotlib is not installed.
    """
    plt = pyplot()
    fig, named = timeline_figure(timeline, title=title, start=start, end=end)
    fig.savefig(path)
    plt.close(fig)
    return named


__all__ = [
    "KIND_COLORS",
    "STREAM_COLORS",
    "node_label",
    "plan_figure",
    "plan_title",
    "plan_to_dot",
    "pyplot",
    "route_edges",
    "save_plan_png",
    "save_timeline_png",
    "timeline_figure",
    "timeline_legend",
    "timeline_title",
    "timeline_window",
]
