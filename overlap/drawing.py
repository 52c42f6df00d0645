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
        f"Plan of {_layers_text(layers)} with {micro} microbatch{'es' if micro != 1 else ''}: "
        f"{len(plan.steps)} steps on {len(plan.streams)} streams, {len(plan.events)} events"
    )


def save_plan_png(plan: Plan, path: str | os.PathLike, *, title: str | None = None) -> None:
    """Draw `plan` to PNG: x = the step's place in the plan's order, one lane per stream.

    Nodes are coloured by stream. Data edges (a node's result goes to another node; same stream:
    stream order covers it) are solid grey; event edges (a data edge between two streams, kept by
    one record/wait pair) are dashed red. The title names the layer(s) and the microbatch count,
    the caption reads the node names.

    Raises:
        ImportError: matplotlib is not installed.
    """
    import networkx as nx

    plt = pyplot()
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    lane = {st: len(plan.streams) - 1 - i for i, st in enumerate(plan.streams)}
    pos = {s.node: (float(s.index), float(lane[s.stream])) for s in plan.steps}
    fig, ax = plt.subplots(figsize=(max(8.0, 0.95 * len(plan.steps)), 2.2 + 1.3 * len(plan.streams)), dpi=100)
    g = nx.DiGraph(plan.graph.edges)
    g.add_nodes_from(plan.nodes)
    event_edges = [(e.src, e.dst) for e in plan.events]
    data_edges = [e for e in g.edges if e not in set(event_edges)]
    nx.draw_networkx_edges(
        g,
        pos,
        edgelist=data_edges,
        ax=ax,
        edge_color=DATA_COLOR,
        arrows=True,
        arrowsize=10,
        connectionstyle="arc3,rad=0.15",
        node_size=900,
    )
    nx.draw_networkx_edges(
        g,
        pos,
        edgelist=event_edges,
        ax=ax,
        edge_color=EVENT_COLOR,
        style="dashed",
        arrows=True,
        arrowsize=12,
        node_size=900,
    )
    for st in plan.streams:
        members = [s.node for s in plan.steps if s.stream == st]
        nx.draw_networkx_nodes(
            g, pos, nodelist=members, ax=ax, node_shape="s", node_color=STREAM_COLORS[st], node_size=900
        )
    for node, (x, y) in pos.items():
        ax.text(x, y - 0.3, str(node), ha="center", va="top", fontsize=7, rotation=20)
    ax.set_yticks([lane[st] for st in plan.streams], list(plan.streams))
    ax.set_xticks(range(len(plan.steps)))
    ax.set_xlabel("step in the plan's order (each stream runs its steps left to right)")
    ax.set_ylim(-0.95, len(plan.streams) - 0.35)
    ax.set_xlim(-0.8, len(plan.steps) - 0.2)
    ax.tick_params(left=True, bottom=True, labelleft=True, labelbottom=True)
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
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.16), fontsize=8, ncol=3, frameon=False)
    ax.set_title(title or plan_title(plan))
    caption = NAME_CAPTION + f" Plan fingerprint {plan.fingerprint()} (the same on every rank)."
    fig.text(0.5, 0.01, "\n".join(textwrap.wrap(caption, 150)), ha="center", va="bottom", fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
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


def save_timeline_png(timeline: Timeline, path: str | os.PathLike, *, title: str | None = None) -> list[str]:
    """Draw `timeline` to PNG: one lane per track, boxes coloured by kind, a name on every box wide
    enough to hold it (the Chrome trace keeps every name), a legend of exactly the kinds drawn with
    the tracks they sit on, and a caption that reads the names.

    Args:
        title: replaces the default `timeline_title` (the demo passes its measured figures).

    Returns:
        The names written on boxes (the others were too narrow).

    Raises:
        ImportError: matplotlib is not installed.
    """
    plt = pyplot()
    from matplotlib.patches import Patch

    from .timeline import intersect, union

    tracks, t0 = timeline.tracks, timeline.start
    intervals = timeline.intervals
    fig, ax = plt.subplots(figsize=(12, 1.9 + 0.7 * max(1, len(tracks))), dpi=100)
    boxes = []
    for iv in intervals:
        y = len(tracks) - 1 - tracks.index(iv.track)
        left, w = (iv.start - t0) * 1e3, iv.duration * 1e3
        ax.barh(y, w, left=left, height=0.6, color=KIND_COLORS[iv.kind], edgecolor="black", linewidth=0.5)
        boxes.append((iv, y, left, w))
    # Hatch the link time that ran under compute: the hidden fraction, drawn.
    compute = union((iv.start, iv.end) for iv in intervals if iv.kind == "compute")
    hidden_drawn = False
    for track in tracks:
        comm = [(iv.start, iv.end) for iv in intervals if iv.kind == "comm" and iv.track == track]
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
    ax.set_xlim(0, max(timeline.makespan * 1e3, 1e-6))
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
    fig.savefig(path)
    plt.close(fig)
    return named


__all__ = [
    "KIND_COLORS",
    "STREAM_COLORS",
    "plan_title",
    "plan_to_dot",
    "pyplot",
    "save_plan_png",
    "save_timeline_png",
    "timeline_legend",
    "timeline_title",
]
