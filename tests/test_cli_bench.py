"""`python -m overlap bench --transport gloo` as a user runs it, on a small shape: it starts local
gloo ranks, runs the shape serial and overlapped per microbatch count over the plain transport (no
link model), prints the table and writes the JSON rows. Only what the run produced is checked,
never its speed."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from overlap.__main__ import main


def test_bench_over_plain_gloo_writes_one_row_per_microbatch_count(tmp_path):
    path = tmp_path / "rows.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "overlap",
            "bench",
            "--transport",
            "gloo",
            "--tokens",
            "64",
            "--experts",
            "4",
            "--intermediate",
            "128",
            "--microbatches",
            "1",
            "2",
            "--reps",
            "1",
            "--json",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(path.read_text())
    assert [(r["shape"], r["microbatches"]) for r in rows] == [
        ("T64 H1024 E4 K2 I128 S1", 1),
        ("T64 H1024 E4 K2 I128 S1", 2),
    ]
    for r in rows:
        assert r["link"] == "gloo (no link model)" and r["link_bandwidth_GBps"] is None, r
        assert r["ranks"] == 2 and r["device"] == "cpu", r
        assert r["within_tolerance"] is True, r
        assert r["serial_s"] > 0 and r["overlapped_s"] > 0 and r["comm_s"] > 0, r
    assert "T64 H1024 E4 K2 I128 S1  (2 ranks, cpu, gloo (no link model))" in proc.stdout
    assert f"wrote {path}" in proc.stdout


@pytest.mark.parametrize(
    "value, message",
    [
        ("/etc/passwd/x.json", "got '/etc/passwd/x.json' ('/etc/passwd' is a file)"),
        ("{tmp}", "--json must be a file name, got '{tmp}' (a folder)"),
        ("{tmp}/missing/x.json", "--json must be in an existing folder, got '{tmp}/missing/x.json' "),
    ],
)
def test_bad_json_path_is_one_line_before_any_rank_starts(value, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("overlap.launch.run_ranks", lambda *a, **k: pytest.fail("ranks started"))
    value, message = value.format(tmp=tmp_path), message.format(tmp=tmp_path)
    assert main(["bench", "--transport", "gloo", "--json", value]) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m overlap bench: error: ") and message in err, err
    assert len(err.strip().splitlines()) == 1
