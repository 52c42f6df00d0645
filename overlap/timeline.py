"""Timelines of a plan's run, measured or simulated, and what can be read from them.

Owns: `Interval`, `Timeline` (a thread-safe list of intervals on named tracks), `OverlapReport`,
and the exports: Chrome-trace JSON (Perfetto), a text timeline, and a PNG (drawn by
`overlap.drawing`).

Inputs: intervals ``(track, name, start, end, kind)`` in seconds, ``time.perf_counter`` clock for
measured runs, 0-based for simulated ones. The runtime (`overlap.graph.Plan.run`) adds one interval
per node on its stream's track with the node's kind (``"compute"``, ``"comm_issue"``,
``"comm_wait"``; on npu/cuda the node's device time, moved onto the host clock when the timeline
is first read: `Timeline.add_pending`); the
communication layer, or the simulator, adds transfers with kind ``"comm"`` (conventionally on
track ``"link"``).

The report counts as *communication* the intervals of kind ``"comm"``; when a timeline has none
(a run whose transport did not report its transfers), it falls back to the ``comm_issue`` and
``comm_wait`` node intervals, and says so (``comm_source``).

This module must never run or schedule anything, and never import matplotlib unless a picture is
asked for.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

__all__ = ["Interval", "Timeline", "OverlapReport", "union", "total", "intersect"]

KINDS = ("compute", "comm_issue", "comm_wait", "comm")


@dataclass(frozen=True, order=True)
class Interval:
    """One busy interval: ``name`` ran on ``track`` from ``start`` to ``end`` seconds."""

    start: float
    end: float
    track: str
    name: str
    kind: str = "compute"

    @property
    def duration(self) -> float:
        return self.end - self.start


# Interval arithmetic on lists of (start, end) pairs.
def union(spans: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """Merge ``spans`` into sorted, disjoint ``(start, end)`` pairs."""
    merged: list[tuple[float, float]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            if end > merged[-1][1]:
                merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return merged


def total(spans: Iterable[tuple[float, float]]) -> float:
    """Length of the union of ``spans``."""
    return sum(end - start for start, end in union(spans))


def intersect(a: Sequence[tuple[float, float]], b: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Intersection of two unions (each merged first), as disjoint pairs."""
    a, b = union(a), union(b)
    out: list[tuple[float, float]] = []
    i = j = 0
    while i < len(a) and j < len(b):
        start, end = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if start < end:
            out.append((start, end))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


@dataclass(frozen=True)
class OverlapReport:
    """How much communication a timeline hid behind compute. All times in seconds.

    Attributes:
        makespan: last end minus first start.
        compute_busy: length of the union of compute intervals.
        comm_busy: length of the union of communication intervals.
        overlap: length of (compute union) ∩ (comm union).
        hidden_fraction: ``overlap / comm_busy`` (0 when there is no communication).
        serial_time: the run with nothing overlapped. Given (``report(serial_time=...)``, a
            measured serial run), that; else an *estimate* summed from this timeline: every node's
            duration plus every transfer, minus the part of each teardown spent waiting on a
            transfer (already counted). The estimate keeps what this run paid that a serial run
            does not: the fixed cost of each extra microbatch (m setups, teardowns and expert
            calls where a serial run makes one), and the time its steps and transfers lost to
            threads sharing a core (a transfer's interval stretches while compute holds the core
            the transport's thread needs, even at one microbatch). So it overstates a serial run's
            time, and the speedup with it (seen on 2 busy cores, `python -m overlap bench`:
            1.15-1.64x estimated where the paired measurement gave 0.75-1.13x); printed, it says so.
        speedup: ``serial_time / makespan``.
        comm_source: ``"comm"`` (transfer intervals) or ``"nodes"`` (comm node intervals).
        serial_source: ``"estimate"`` or ``"measured"`` (a serial time was given).
    """

    makespan: float
    compute_busy: float
    comm_busy: float
    overlap: float
    hidden_fraction: float
    serial_time: float
    speedup: float
    comm_source: str
    serial_source: str = "estimate"

    def __str__(self) -> str:
        def ms(x: float) -> str:
            return f"{x * 1e3:10.3f} ms"

        source = "link transfers" if self.comm_source == "comm" else "comm op calls; no transfers recorded"
        rows = [
            ("makespan", ms(self.makespan)),
            ("compute busy", ms(self.compute_busy)),
            (f"comm busy ({source})", ms(self.comm_busy)),
            ("comm hidden by compute", ms(self.overlap)),
            ("hidden fraction", f"{self.hidden_fraction * 100:10.1f} %"),
        ]
        if self.serial_source == "measured":
            rows += [("serial time (measured)", ms(self.serial_time)), ("speedup", f"{self.speedup:10.2f} x")]
        else:
            rows += [
                ("serial time (estimate*)", ms(self.serial_time)),
                ("speedup (estimate*)", f"{self.speedup:10.2f} x"),
            ]
        width = max(len(k) for k, _ in rows)
        lines = [f"{k:<{width}}  {v}" for k, v in rows]
        if self.serial_source != "measured":
            lines += [
                "* this run's steps and transfers added up as if nothing overlapped: it keeps each extra",
                "  microbatch's fixed costs and the time lost to threads sharing a core, so it overstates a",
                "  serial run; time one and pass it: report(serial_time=seconds)",
            ]
        return "\n".join(lines)


class Timeline:
    """Intervals on named tracks. Appending is thread-safe; reading returns sorted copies.

    Args:
        tracks: track names to show first, in this order (a plan passes its streams); other
            tracks follow in order of first appearance.
        source: ``"measured"`` or ``"simulated"``, for titles.
    """

    def __init__(self, tracks: Sequence[str] = (), *, source: str = "measured") -> None:
        self._lock = threading.Lock()
        self._intervals: list[Interval] = []
        self._tracks: list[str] = list(tracks)
        self._pending: list[Callable[[], Iterable[tuple[str, str, float, float, str]]]] = []
        self._resolving = threading.Lock()
        self.source = source

    def add(self, track: str, name: str, start: float, end: float, kind: str = "compute") -> None:
        """Add one interval. ``kind`` is one of compute, comm_issue, comm_wait, comm.

        Raises:
            ValueError: ``end < start`` or an unknown ``kind``.
        """
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if end < start:
            raise ValueError(f"end must be >= start, got start={start}, end={end} for {name!r}")
        with self._lock:
            if track not in self._tracks:
                self._tracks.append(track)
            self._intervals.append(Interval(start, end, track, name, kind))

    def add_many(self, rows: Iterable[tuple[str, str, float, float, str]]) -> None:
        """Add intervals given as ``(track, name, start, end, kind)`` rows, under one lock.

        A runner collects its rows while it runs and adds them afterwards, so that recording
        costs the running work no lock and no validation.

        Raises:
            ValueError: a row with ``end < start`` or an unknown ``kind`` (no row is added then).
        """
        new = []
        for track, name, start, end, kind in rows:
            if kind not in KINDS:
                raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
            if end < start:
                raise ValueError(f"end must be >= start, got start={start}, end={end} for {name!r}")
            new.append(Interval(start, end, track, name, kind))
        with self._lock:
            for iv in new:
                if iv.track not in self._tracks:
                    self._tracks.append(iv.track)
            self._intervals += new

    def add_pending(self, resolve: Callable[[], Iterable[tuple[str, str, float, float, str]]]) -> None:
        """Add intervals known only later: ``resolve()`` returns their ``(track, name, start, end,
        kind)`` rows and is called once, in order of adding, the first time the timeline is read.

        A run on a device adds its nodes' device times this way: reading them waits for the
        device, which the run itself must never do (no host sync in a forward).
        """
        with self._lock:
            self._pending.append(resolve)

    def _resolve_pending(self) -> None:
        if not self._pending:  # unlocked fast path: a list read is atomic
            return
        with self._resolving:  # one reader resolves; concurrent readers wait for it
            with self._lock:
                pending, self._pending = self._pending, []
            for resolve in pending:
                self.add_many(resolve())

    def add_tracks(self, tracks: Sequence[str]) -> None:
        """Make sure ``tracks`` exist (in this order, after those already present)."""
        with self._lock:
            self._tracks += [t for t in tracks if t not in self._tracks]

    @property
    def intervals(self) -> tuple[Interval, ...]:
        """All intervals, sorted by start (then end, track, name) (resolving pending ones first)."""
        self._resolve_pending()
        with self._lock:
            return tuple(sorted(self._intervals))

    @property
    def tracks(self) -> tuple[str, ...]:
        """Track names in display order (resolving pending intervals first)."""
        self._resolve_pending()
        with self._lock:
            return tuple(self._tracks)

    def order(self, track: str | None = None) -> list[str]:
        """Names in start order, on one ``track`` or on all."""
        return [iv.name for iv in self.intervals if track is None or iv.track == track]

    @property
    def start(self) -> float:
        ivs = self.intervals
        return min(iv.start for iv in ivs) if ivs else 0.0

    @property
    def makespan(self) -> float:
        ivs = self.intervals
        return max(iv.end for iv in ivs) - min(iv.start for iv in ivs) if ivs else 0.0

    def report(self, serial_time: float | None = None) -> OverlapReport:
        """The `OverlapReport` of this timeline.

        Args:
            serial_time: seconds a measured serial run of the same work took; None estimates it
                from this timeline (see `OverlapReport.serial_time` for what that misses).

        Raises:
            ValueError: ``serial_time`` is not a finite number > 0.
        """
        if serial_time is not None and (
            isinstance(serial_time, bool)
            or not isinstance(serial_time, (int, float))
            or not 0 < serial_time < float("inf")
        ):
            raise ValueError(f"serial_time must be a finite number of seconds > 0, got {serial_time!r}")
        ivs = self.intervals
        compute = [(iv.start, iv.end) for iv in ivs if iv.kind == "compute"]
        comm = [(iv.start, iv.end) for iv in ivs if iv.kind == "comm"]
        source = "comm"
        if not comm:
            source = "nodes"
            comm = [(iv.start, iv.end) for iv in ivs if iv.kind in ("comm_issue", "comm_wait")]
        comm_union = union(comm)
        compute_busy, comm_busy = total(compute), total(comm_union)
        overlap = total(intersect(compute, comm_union))
        nodes = [iv for iv in ivs if iv.kind != "comm"]
        serial = sum(iv.duration for iv in nodes)
        if source == "comm":
            serial += comm_busy
            waits = [(iv.start, iv.end) for iv in ivs if iv.kind == "comm_wait"]
            serial -= sum(total(intersect([w], comm_union)) for w in waits)
        makespan = self.makespan
        if serial_time is not None:
            serial = float(serial_time)
        return OverlapReport(
            makespan=makespan,
            compute_busy=compute_busy,
            comm_busy=comm_busy,
            overlap=overlap,
            hidden_fraction=overlap / comm_busy if comm_busy > 0 else 0.0,
            serial_time=serial,
            speedup=serial / makespan if makespan > 0 else 1.0,
            comm_source=source,
            serial_source="estimate" if serial_time is None else "measured",
        )

    # ---- exports -------------------------------------------------------------------------------
    def to_chrome_trace(self) -> dict:
        """Chrome-trace / Perfetto JSON object: one thread (tid) per track, ``"X"`` events with
        ``ts``/``dur`` in microseconds from the timeline's start, ``thread_name`` metadata."""
        t0, tracks = self.start, self.tracks
        events: list[dict] = [
            {"ph": "M", "name": "process_name", "pid": 0, "tid": 0, "args": {"name": f"overlap ({self.source})"}},
        ]
        for tid, track in enumerate(tracks):
            events.append({"ph": "M", "name": "thread_name", "pid": 0, "tid": tid, "args": {"name": track}})
            events.append({"ph": "M", "name": "thread_sort_index", "pid": 0, "tid": tid, "args": {"sort_index": tid}})
        for iv in self.intervals:
            events.append(
                {
                    "ph": "X",
                    "name": iv.name,
                    "cat": iv.kind,
                    "pid": 0,
                    "tid": tracks.index(iv.track),
                    "ts": round((iv.start - t0) * 1e6, 3),
                    "dur": round(iv.duration * 1e6, 3),
                }
            )
        return {"traceEvents": events, "displayTimeUnit": "ms"}

    def save_chrome_trace(self, path: str | os.PathLike) -> None:
        """Write `to_chrome_trace` to ``path`` (open it in https://ui.perfetto.dev)."""
        with open(path, "w") as f:
            json.dump(self.to_chrome_trace(), f, indent=1)

    def to_text(self, width: int = 72, *, start: float | None = None, end: float | None = None) -> str:
        """A terminal Gantt chart: one row per track, ``width`` columns of time.

        Characters: ``#`` compute, ``>`` comm_issue, ``<`` comm_wait, ``=`` comm (transfer). The
        axis runs from ``start`` to ``end`` (this timeline's clock; default: first start to last
        end), and its right end is labelled with their difference: pass a run's own window (e.g. a
        recorder's ``started``/``ended``) so that the axis ends at the makespan its report gives.

        Raises:
            ValueError: ``width`` not an int >= 8, or ``end`` before ``start``.
        """
        from .drawing import timeline_window

        if not isinstance(width, int) or isinstance(width, bool) or width < 8:
            raise ValueError(f"width must be an int >= 8, got {width!r}")
        t0, t1 = timeline_window(self, start, end)
        span = (t1 - t0) or 1.0
        glyph = {"compute": "#", "comm_issue": ">", "comm_wait": "<", "comm": "="}
        tracks = self.tracks
        label = max((len(t) for t in tracks), default=0)
        rows = {t: [" "] * width for t in tracks}
        for iv in self.intervals:
            if iv.end < t0 or iv.start > t1:
                continue
            a = int((max(iv.start, t0) - t0) / span * width)
            b = max(a + 1, int(round((min(iv.end, t1) - t0) / span * width)))
            for c in range(min(a, width - 1), min(b, width)):
                rows[iv.track][c] = glyph[iv.kind]
        end_label = f"{(t1 - t0) * 1e3:.2f} ms|"
        head = f"{'':<{label}} |0{end_label:>{width}}"
        lines = [head] + [f"{t:<{label}} |{''.join(rows[t])}|" for t in tracks]
        return "\n".join(lines)

    def save_png(
        self, path: str | os.PathLike, *, title: str | None = None, start: float | None = None, end: float | None = None
    ) -> None:
        """Draw the timeline to PNG (`overlap.drawing.save_timeline_png`): one lane per track, boxes
        coloured by kind, names where they fit, a legend of the tracks drawn, hidden fraction and
        speedup in the title (default title: this timeline's own report, its speedup an estimate).
        ``start``/``end``: the time axis, as for `to_text`.

        Raises:
            ImportError: matplotlib is not installed.
        """
        from .drawing import save_timeline_png

        save_timeline_png(self, path, title=title, start=start, end=end)

    def __repr__(self) -> str:
        return f"Timeline(source={self.source!r}, tracks={self.tracks}, n={len(self._intervals)})"
