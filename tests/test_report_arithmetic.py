"""`overlap.timeline`'s arithmetic (`union`, `intersect`, `total`, `Timeline.report`) against figures
computed by hand, on timelines whose intervals overlap, nest, touch and are disjoint on every kind of
track; then against a cell-counting reference on random integer timelines."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overlap.timeline import Timeline, intersect, total, union


def timeline(*rows: tuple[str, float, float, str]) -> Timeline:
    tl = Timeline()
    for i, (track, start, end, kind) in enumerate(rows):
        tl.add(track, f"n{i}", start, end, kind)
    return tl


# ---- union / intersect / total -------------------------------------------------------------------


@pytest.mark.parametrize(
    "spans,merged",
    [
        ([(2, 6), (0, 4)], [(0, 6)]),  # overlapping, given out of order
        ([(0, 10), (2, 5)], [(0, 10)]),  # nested
        ([(0, 2), (2, 4)], [(0, 4)]),  # touching: one span
        ([(3, 4), (0, 1)], [(0, 1), (3, 4)]),  # disjoint
        ([(0, 1), (0, 1), (1, 1), (5, 5)], [(0, 1), (5, 5)]),  # duplicates and empty spans
        ([], []),
    ],
)
def test_union(spans, merged):
    assert union(spans) == merged
    assert total(spans) == sum(e - s for s, e in merged)


@pytest.mark.parametrize(
    "a,b,expected",
    [
        ([(0, 4)], [(2, 6)], [(2, 4)]),  # overlapping
        ([(0, 10)], [(2, 3), (5, 7)], [(2, 3), (5, 7)]),  # nested
        ([(0, 2)], [(2, 4)], []),  # touching: nothing in common
        ([(0, 1), (3, 4)], [(1, 3)], []),  # disjoint
        ([(0, 4), (2, 6)], [(5, 8), (1, 2)], [(1, 2), (5, 6)]),  # each side overlapping itself first
        ([(0, 3), (5, 9)], [(2, 6), (8, 12)], [(2, 3), (5, 6), (8, 9)]),
    ],
)
def test_intersect(a, b, expected):
    assert intersect(a, b) == expected
    assert intersect(b, a) == expected


# ---- the report, by hand ---------------------------------------------------------------------------
# Each case: the timeline's rows, then (makespan, compute busy, comm busy, overlap, serial estimate).
# serial = every node's duration + comm busy − the part of each comm_wait that overlaps comm.
CASES = {
    "comm overlapping on one track": (
        [("link", 0, 4, "comm"), ("link", 2, 6, "comm"), ("compute", 1, 3, "compute")],
        # comm union [0, 6] = 6 (the two transfers sum to 8); hidden [1, 3] = 2
        (6, 2, 6, 2, 2 + 6),
    ),
    "comm nested": (
        [("link", 0, 10, "comm"), ("link", 2, 5, "comm"), ("compute", 8, 12, "compute")],
        # comm union 10 (sum 13); hidden [8, 10] = 2
        (12, 4, 10, 2, 4 + 10),
    ),
    "comm touching": (
        [("link", 0, 2, "comm"), ("link", 2, 4, "comm"), ("compute", 4, 6, "compute")],
        # comm [0, 4]; compute only touches it: nothing hidden
        (6, 2, 4, 0, 2 + 4),
    ),
    "comm disjoint": (
        [("link", 0, 1, "comm"), ("link", 3, 4, "comm"), ("compute", 1, 3, "compute")],
        (4, 2, 2, 0, 2 + 2),
    ),
    "comm overlapping across two tracks": (
        [("link0", 0, 4, "comm"), ("link1", 1, 5, "comm"), ("compute", 3, 8, "compute")],
        # comm union [0, 5] = 5 (sum 8); hidden [3, 5] = 2
        (8, 5, 5, 2, 5 + 5),
    ),
    "compute overlapping and nested on two tracks": (
        [
            ("host", 0, 4, "compute"),
            ("device", 2, 6, "compute"),
            ("device", 3, 5, "compute"),
            ("link", 5, 7, "comm"),
        ],
        # compute union [0, 6] = 6 (sum 10); hidden [5, 6] = 1; serial: nodes 4 + 4 + 2 = 10, + comm 2
        (7, 6, 2, 1, 10 + 2),
    ),
    "compute touching, comm inside the gap": (
        [
            ("compute", 0, 2, "compute"),
            ("compute", 2, 3, "compute"),
            ("compute", 5, 6, "compute"),
            ("link", 3, 5, "comm"),
        ],
        (6, 4, 2, 0, 4 + 2),
    ),
    "waits overlapping the transfer": (
        [
            ("compute", 0, 2, "compute"),
            ("comm", 0, 0.5, "comm_issue"),
            ("link", 0.5, 4, "comm"),
            ("link", 1, 3, "comm"),  # nested in the first transfer
            ("comm", 2, 5, "comm_wait"),
        ],
        # comm union [0.5, 4] = 3.5; hidden [0.5, 2] = 1.5; serial: nodes 2 + 0.5 + 3 = 5.5, + comm 3.5,
        # − the wait's part under comm ([2, 4] = 2) = 7
        (5, 2, 3.5, 1.5, 7),
    ),
    "no transfers recorded: comm node intervals count": (
        [
            ("compute", 0.5, 4, "compute"),
            ("comm", 0, 1, "comm_issue"),
            ("comm", 0.75, 2, "comm_issue"),  # overlapping the first
            ("comm", 3, 5, "comm_wait"),
        ],
        # comm union [0, 2] ∪ [3, 5] = 4 (sum 4.25); hidden [0.5, 2] + [3, 4] = 2.5; serial: node durations
        # only (3.5 + 1 + 1.25 + 2)
        (5, 3.5, 4, 2.5, 7.75),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_report_against_hand_computed_figures(case):
    rows, (makespan, compute_busy, comm_busy, overlap, serial) = CASES[case]
    report = timeline(*rows).report()
    got = (report.makespan, report.compute_busy, report.comm_busy, report.overlap, report.serial_time)
    assert got == pytest.approx((makespan, compute_busy, comm_busy, overlap, serial), abs=1e-12), case
    assert report.hidden_fraction == pytest.approx(overlap / comm_busy if comm_busy else 0.0)
    assert report.speedup == pytest.approx(serial / makespan)
    assert report.comm_source == ("nodes" if case.startswith("no transfers") else "comm")


def test_report_of_an_empty_timeline_and_of_one_without_comm():
    empty = Timeline().report()
    assert (empty.makespan, empty.compute_busy, empty.comm_busy, empty.hidden_fraction, empty.speedup) == (
        0,
        0,
        0,
        0,
        1,
    )
    only_compute = timeline(("compute", 1, 3, "compute"), ("compute", 2, 4, "compute")).report()
    assert (only_compute.makespan, only_compute.compute_busy, only_compute.comm_busy) == (3, 3, 0)
    assert only_compute.hidden_fraction == 0


# ---- against a cell-counting reference -----------------------------------------------------------

KINDS = ("compute", "comm", "comm_issue", "comm_wait")


@st.composite
def integer_timelines(draw):
    n = draw(st.integers(1, 12))
    rows = []
    for _ in range(n):
        start = draw(st.integers(0, 20))
        length = draw(st.integers(0, 8))
        track = draw(st.sampled_from(["compute", "device", "link", "link2", "comm"]))
        rows.append((track, start, start + length, draw(st.sampled_from(KINDS))))
    return rows


def _cells(rows, kinds) -> set[int]:
    """Unit cells [c, c + 1) covered by the rows of `kinds` (all ends are integers)."""
    return {c for _, s, e, k in rows if k in kinds for c in range(s, e)}


@settings(max_examples=150, deadline=None, derandomize=True)
@given(integer_timelines())
def test_report_equals_cell_counting(rows):
    report = timeline(*rows).report()
    compute = _cells(rows, {"compute"})
    has_comm = any(k == "comm" for *_, k in rows)
    comm = _cells(rows, {"comm"} if has_comm else {"comm_issue", "comm_wait"})
    assert report.comm_source == ("comm" if has_comm else "nodes")
    assert report.compute_busy == len(compute)
    assert report.comm_busy == len(comm)
    assert report.overlap == len(compute & comm)
    assert report.makespan == max(e for _, _, e, _ in rows) - min(s for _, s, _, _ in rows)
    nodes = sum(e - s for _, s, e, k in rows if k != "comm")
    if has_comm:
        waits = sum(len(set(range(s, e)) & comm) for _, s, e, k in rows if k == "comm_wait")
        assert report.serial_time == nodes + len(comm) - waits
    else:
        assert report.serial_time == nodes
