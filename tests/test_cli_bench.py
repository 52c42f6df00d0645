"""`python -m overlap bench --transport gloo` as a user runs it (the CLI's `main`, in this process,
with the benchmark's shapes swapped for two small ones so that it finishes on a loaded machine): it
starts local gloo ranks, runs each shape serial and overlapped per microbatch count, prints the
table and writes the JSON rows. Only what the run produced is checked, never its speed."""

from __future__ import annotations

import json

from overlap import demo
from overlap.__main__ import main

SMALL = (
    demo.Shape(tokens=64, hidden=1024, experts=4, top_k=2, intermediate=128, shared=1),
    demo.Shape(tokens=48, hidden=1024, experts=2, top_k=1, intermediate=64, shared=0),
)


def test_bench_over_gloo_writes_one_row_per_shape_and_microbatch_count(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "DEFAULT_BENCH_SHAPES", SMALL)
    out = tmp_path / "rows.json"
    assert main(["bench", "--transport", "gloo", "--microbatches", "1", "2", "--reps", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    # `microbatches` is what ran: 48 tokens are fewer than 2 x 32 (min_tokens), so one microbatch.
    assert [(r["shape"], r["microbatches_requested"], r["microbatches"]) for r in rows] == [
        ("T64 H1024 E4 K2 I128 S1", 1, 1),
        ("T64 H1024 E4 K2 I128 S1", 2, 2),
        ("T48 H1024 E2 K1 I64 S0", 1, 1),
        ("T48 H1024 E2 K1 I64 S0", 2, 1),
    ]
    for r in rows:
        assert r["transport"] == "gloo" and r["link_bandwidth_GBps"] is None, r
        assert r["within_tolerance"] is True, r
        assert r["serial_s"] > 0 and r["overlapped_s"] > 0 and r["comm_s"] > 0, r
    stdout = capsys.readouterr().out
    for shape in ("T64 H1024 E4 K2 I128 S1", "T48 H1024 E2 K1 I64 S0"):
        assert f"{shape}  (2 ranks, cpu, " in stdout  # one section per shape
    for r in rows:  # every row's own figures are in the table
        assert (
            f"{r['overlapped_s'] * 1e3:.1f} [{r['overlapped_min_s'] * 1e3:.1f}-{r['overlapped_max_s'] * 1e3:.1f}]"
            in stdout
        )
    assert f"wrote {out}" in stdout.splitlines()
