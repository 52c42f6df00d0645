"""`python -m overlap bench --transport window` (issue 20): the carrier is forced and reported, and
each row carries the exchange and `copy_` rates measured in the run (checked for presence and
sign, never for speed)."""

from __future__ import annotations

import json
import subprocess
import sys

from overlap import demo


def test_bench_reports_the_carrier_and_its_rates(tmp_path):
    path = tmp_path / "rows.json"
    args = ["--tokens", "64", "--experts", "4", "--intermediate", "128", "--microbatches", "1", "--reps", "1"]
    proc = subprocess.run(
        [sys.executable, "-m", "overlap", "bench", "--transport", "window", *args, "--json", str(path)],
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (row,) = json.loads(path.read_text())
    assert row["transport"] == "window" and row["link"] == "window (no link model)", row
    assert row["exchange_GBps"] > 0 and row["copy_GBps"] > 0, row
    assert "transport window: T64 H1024 E4 K2 I128 S1: exchange " in proc.stdout, proc.stdout


def test_link_flags_name_the_carrier():
    assert str(demo.Link("window", None)) == "window (no link model)"
    try:
        demo.check_args(demo.Shape(64, 1024, 4, 2, 128, 1, 0), 2, [1], demo.Link("nccl", None, 5.0), 1, "cpu")
    except ValueError as exc:
        assert "--link-gbps needs --transport emulated, got --transport nccl" in str(exc)
    else:
        raise AssertionError("--link-gbps with a carrier was accepted")
