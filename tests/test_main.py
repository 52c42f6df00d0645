"""The main job end to end, as the README runs it: `python -m overlap demo` starts local gloo
ranks, checks serial == overlapped, and leaves a trace (one track per stream) and two PNGs."""

from __future__ import annotations

import json
import subprocess
import sys


def test_demo_runs_and_leaves_trace_and_pictures(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "overlap", "demo", "--tokens", "64", "--out", str(out)],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "agree (bit-exact)" in proc.stdout
    assert "hidden fraction" in proc.stdout
    for name in ("trace.json", "timeline.png", "plan.png", "plan.txt"):
        assert (out / name).stat().st_size > 0, name
    trace = json.loads((out / "trace.json").read_text())
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    tracks = {e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "thread_name"}
    assert {"compute", "comm_setup", "comm_teardown", "link"} <= tracks
    busy = {e["tid"] for e in events if e.get("ph") == "X"}
    assert len(busy) == len(tracks)  # every track has work on it
    assert (out / "timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_refuses_bad_arguments():
    proc = subprocess.run([sys.executable, "-m", "overlap", "demo", "--ranks", "1"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode != 0
    assert "ranks must be >= 2" in proc.stderr
