"""The main job and the bench as a newcomer runs them: `python -m overlap demo` starts local gloo
ranks, checks serial and overlapped against the dense fp32 reference within the dtype's tolerance,
and leaves a trace (one track per stream) and two PNGs; `bench` prints one table whose figures are
the JSON's; every bad argument is one line before any rank starts."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from overlap import demo
from overlap.__main__ import main

SMALL = demo.Shape(tokens=64, hidden=1024, experts=4, top_k=2, intermediate=256, shared=1)


def test_demo_runs_and_leaves_trace_and_pictures(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "overlap",
            "demo",
            "--tokens",
            "64",
            "--intermediate",
            "256",
            "--reps",
            "2",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "within the tolerance of the dense fp32 reference" in proc.stdout
    # Progress goes to stderr, results to stdout: no progress line among the results.
    assert "[overlap]" not in proc.stdout and "[overlap] warming up" in proc.stderr
    for name in ("trace.json", "timeline.png", "plan.png", "plan.txt"):
        assert (out / name).stat().st_size > 0, name
    trace = json.loads((out / "trace.json").read_text())
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    tracks = {e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "thread_name"}
    assert {"compute", "comm_setup", "comm_teardown", "link"} <= tracks
    busy = {e["tid"] for e in events if e.get("ph") == "X"}
    assert len(busy) == len(tracks)  # every track has work on it
    assert (out / "timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The table shows the microbatch count that ran: 64 tokens, 32 at least each -> 2.
    row = next(line for line in proc.stdout.splitlines() if re.match(r"\s+\d+\s+\d", line))
    assert row.split()[0] == "2"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["demo", "--ranks", "1"], "--ranks must be in [2, 384], got 1"),
        (["demo", "--ranks", "3"], "--experts must be divisible by the number of ranks (3), got 8"),
        (["demo", "--tokens", "0"], "--tokens must be in [1, 8192], got 0"),
        (["bench", "--hidden", "512"], "--hidden must be in [1024, 8192], got 512"),
        (["bench", "--top-k", "9"], "--top-k must be in (0, 8], got 9"),
        (["demo", "--shared", "5"], "--shared must be in [0, 4], got 5"),
        (["bench", "--microbatches", "1", "0"], "--microbatches must be in [1, 64], got 0"),
        (["demo", "--reps", "0"], "--reps must be in [1, 1000], got 0"),
        (["bench", "--comm-ratio", "0"], "--comm-ratio must be in (0, 100], got 0"),
        (["bench", "--transport", "gloo", "--link-gbps", "5"], "--link-gbps 5 needs --transport emulated"),
        (["bench", "--comm-ratio", "1", "--link-gbps", "5"], "not allowed with argument --comm-ratio"),
        (["demo", "--quant", "1"], "invalid choice: 1"),
        (["demo", "--intermediate", "65537"], "--intermediate must be in [1, 65536], got 65537"),
        (["demo", "--latency-us", "2e6"], "--latency-us must be in [0, 1000000], got 2000000"),
        (["bench", "--link-gbps", "0"], "--link-gbps must be in (0, inf), got 0"),
        # A flag the transport would ignore is refused, not dropped.
        (["demo", "--transport", "gloo", "--comm-ratio", "2"], "--comm-ratio 2 needs --transport emulated"),
        (["bench", "--transport", "gloo", "--latency-us", "5"], "--latency-us 5 needs --transport emulated"),
        # Output paths, before any rank starts.
        (["demo", "--out", "/etc/passwd/sub"], "--out must be a path under folders, got '/etc/passwd/sub'"),
        (["demo", "--out", "/etc/passwd"], "--out must be a folder or a path that does not exist yet"),
    ],
)
def test_bad_arguments_are_one_line_before_any_rank_starts(argv, message, capsys, monkeypatch):
    def no_ranks(*args, **kwargs):
        raise AssertionError("ranks started despite a bad argument")

    monkeypatch.setattr("overlap.launch.run_ranks", no_ranks)
    with contextlib.suppress(SystemExit):
        assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"python -m overlap {argv[0]}: error: ")


def test_out_checks_name_the_reason(tmp_path, capsys, monkeypatch):
    """--out: a file on the way, or a folder the user cannot write to (as root every folder is
    writable, so the permission is denied through os.access), is one line naming the path."""
    monkeypatch.setattr("overlap.launch.run_ranks", lambda *a, **k: pytest.fail("ranks started"))
    (tmp_path / "f").write_text("")
    assert main(["demo", "--out", str(tmp_path / "f" / "a" / "b")]) == 2
    assert f"('{tmp_path / 'f'}' is a file, not a folder)" in capsys.readouterr().err
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(tmp_path) else real(p, mode))
    assert main(["demo", "--out", str(tmp_path / "new" / "deeper")]) == 2
    err = capsys.readouterr().err
    assert f"--out must be under a folder you can write to, got '{tmp_path / 'new' / 'deeper'}'" in err
    assert len(err.strip().splitlines()) == 1


def test_ranks_must_match_torchrun(capsys, monkeypatch):
    monkeypatch.setattr("overlap.launch.run_ranks", lambda *a, **k: pytest.fail("ranks started"))
    monkeypatch.setattr("overlap.launch.under_torchrun", lambda: True)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["demo", "--ranks", "4"]) == 2
    assert "--ranks must equal torchrun's world size (2) or be left out, got 4" in capsys.readouterr().err


def test_help_shows_every_range_the_checks_enforce():
    """Each numeric flag's help carries the range `check_args` enforces, from the same table."""
    from overlap.__main__ import parser

    subs = next(a for a in parser()._actions if a.dest == "command").choices
    for name, sub in subs.items():
        helps = {s: a.help for a in sub._actions for s in a.option_strings}
        for flag in demo.RANGES:
            text = demo.range_text(flag)
            if flag == "--top-k":  # its upper bound is also at most E
                text = text.split(",")[0] + f", min({demo.MAX_TOP_K}, E)]"
            assert text in helps[flag], f"{name} {flag}: {helps[flag]!r} lacks {text}"
    for flag, text in (("--reps", "[1, 1000]"), ("--intermediate", "[1, 65536]"), ("--latency-us", "[0, 1000000]")):
        assert demo.range_text(flag) == text  # the three, spelled out
    # And the checks use the same bounds: the value just past each bound is refused with that text.
    shape, link = demo.Shape(), demo.Link()
    with pytest.raises(ValueError, match=re.escape("--reps must be in [1, 1000], got 1001")):
        demo.check_args(shape, 2, [2], link, 1001, "cpu")
    with pytest.raises(ValueError, match=re.escape("--intermediate must be in [1, 65536], got 65537")):
        demo.check_args(demo.Shape(intermediate=65537), 2, [2], link, 1, "cpu")


def test_every_option_has_help():
    from overlap.__main__ import parser

    p = parser()
    subs = next(a for a in p._actions if a.dest == "command").choices
    for name, sub in subs.items():
        for action in sub._actions:
            assert action.help, f"{name} {action.option_strings} has no help text"


def test_bench_table_and_json_are_one_truth(tmp_path):
    path = tmp_path / "rows.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "overlap",
            "bench",
            "--tokens",
            "64",
            "--experts",
            "4",
            "--intermediate",
            "256",
            "--microbatches",
            "1",
            "2",
            "--reps",
            "2",
            "--comm-ratio",
            "0.5",
            "--json",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[overlap] case 2/2" in proc.stderr and "[overlap]" not in proc.stdout
    rows = json.loads(path.read_text())
    assert [r["microbatches"] for r in rows] == [1, 2]
    for r in rows:
        for key in (
            "serial_s",
            "overlapped_s",
            "compute_s",
            "comm_s",
            "hidden_fraction",
            "speedup",
            "microbatches",
            "comm_ratio",
            "ideal_speedup",
        ):
            assert isinstance(r[key], (int, float)), key
        assert r["speedup"] == pytest.approx(r["serial_s"] / r["overlapped_s"])
        assert r["comm_ratio"] == pytest.approx(r["comm_s"] / r["compute_s"])
        assert r["ideal_speedup"] == pytest.approx((r["compute_s"] + r["comm_s"]) / max(r["compute_s"], r["comm_s"]))
        assert r["serial_min_s"] <= r["serial_s"] <= r["serial_max_s"]
        assert r["overlapped_min_s"] <= r["overlapped_s"] <= r["overlapped_max_s"]
        assert 0.0 <= r["hidden_fraction"] <= 1.0
        assert r["within_tolerance"]
        # The table prints these very figures (no second estimate of the same quantity).
        cells = f"{r['overlapped_s'] * 1e3:.1f} [{r['overlapped_min_s'] * 1e3:.1f}-{r['overlapped_max_s'] * 1e3:.1f}]"
        assert cells in proc.stdout
        assert f"{r['speedup']:.2f}x" in proc.stdout and f"{r['ideal_speedup']:.2f}x" in proc.stdout
    assert "estimate" not in proc.stdout


# -- the demo's numerical check: a tolerance, not bit-equality --------------------------------


@contextlib.contextmanager
def _patched(target, name, replacement):
    real = getattr(target, name)
    setattr(target, name, replacement(real))
    try:
        yield
    finally:
        setattr(target, name, real)


def _measure_with_rounding_per_row_count() -> dict:
    """As on an AMX host: every bf16 F.linear with an odd row count comes out one ulp higher, so the
    serial run, the microbatches and the dense reference all round differently."""
    import torch.nn.functional as F

    def linear(real):
        def bumped(x, w, b=None):
            out = real(x, w, b)
            if out.dtype == torch.bfloat16 and x.shape[0] % 2:
                out = torch.nextafter(out, torch.full_like(out, float("inf")))
            return out

        return bumped

    with _patched(F, "linear", linear):
        return demo.measure(SMALL, 2, demo.Link("gloo"), reps=1)


def _measure_with_a_wrong_weight() -> dict:
    """Every rank's first local expert has a down projection 5 % too large."""
    from overlap.moe import MoELayer

    def init(real):
        def wrong(self, *args, **kwargs):
            real(self, *args, **kwargs)
            self.down.data[0] *= 1.05

        return wrong

    with _patched(MoELayer, "__init__", init):
        return demo.measure(SMALL, 2, demo.Link("gloo"), reps=1)


def test_check_tolerates_rounding_per_row_count(rank_pools):
    rows = rank_pools(2).run(_measure_with_rounding_per_row_count, timeout_s=240)
    for r in rows:
        assert r["within_tolerance"], r
        assert r["worst_ulps_overlapped"] <= r["tolerance_ulps"]


def test_check_catches_a_wrong_weight(rank_pools):
    rows = rank_pools(2).run(_measure_with_a_wrong_weight, timeout_s=240)
    for r in rows:
        assert not r["within_tolerance"], r
        assert r["worst_ulps_serial"] > r["tolerance_ulps"] and r["worst_ulps_overlapped"] > r["tolerance_ulps"]


@pytest.mark.parametrize(
    "argv,expected",
    [
        (["demo", "--device", "cuda"], "T2048 H4096 E8 K2 I2048 S1"),
        (["demo", "--device", "cuda", "--quant", "2"], "T2048 H4096 E8 K2 I2048 S1 int8"),
        (["demo", "--device", "cuda", "--tokens", "64"], "T64 H1024 E8 K2 I1024 S1"),
        (["demo"], "T256 H1024 E8 K2 I1024 S1"),
    ],
)
def test_demo_on_cuda_defaults_to_a_shape_that_gives_the_gpu_work(argv, expected, monkeypatch):
    """Without shape flags the demo on cuda runs `demo.CUDA_DEMO_SHAPE`; shape flags still win."""
    from overlap import __main__ as cli
    from overlap import demo

    seen = []

    def no_ranks(ranks, fn, shape, *args):
        seen.append(str(shape))
        raise SystemExit(0)

    monkeypatch.setattr("overlap.launch.run_ranks", no_ranks)
    monkeypatch.setattr(demo, "check_args", lambda *a: None)  # no GPU here: the device check is not the point
    with pytest.raises(SystemExit):
        cli.main(argv)
    assert seen == [expected]


def _measure_on_gloo_then_the_default_kind() -> tuple[str, str | None, str]:
    import os

    from overlap.ops import staging

    row = demo.measure(SMALL, 1, demo.Link("gloo"), reps=1)
    group = torch.distributed.new_group(ranks=list(range(torch.distributed.get_world_size())))
    return row["transport"], os.environ.get("OVERLAP_TRANSPORT"), staging.kind_for(group, torch.device("cpu"))


def test_a_measurement_on_a_named_carrier_leaves_the_ranks_default_alone(rank_pools):
    """`--transport gloo` forces the carrier for that measurement only: pooled ranks that go on to
    other work (the next test, the next bench row) keep their default carrier."""
    for transport, env, later in rank_pools(2).run(_measure_on_gloo_then_the_default_kind, timeout_s=240):
        assert transport == "gloo" and env is None and later == "window", (transport, env, later)


def test_device_calls_are_counted_per_thread_from_profiler_events():
    """Launches from every thread; host syncs on the forward's thread apart from the others'."""
    events = [
        ("cudaLaunchKernel", 1),
        ("aten::mm", 1),
        ("cudaLaunchKernel", 2),
        ("cuLaunchKernel", 1),
        ("cudaStreamSynchronize", 2),  # a staging transport thread syncs its own side stream
        ("cudaMemcpy", 1),  # a blocking copy on the caller's thread
        ("cudaMemcpyAsync", 1),
        ("cudaEventSynchronize", 1),
    ]
    assert demo.count_device_calls(events, caller_thread=1) == {
        "launches_per_forward": 3,
        "host_syncs_per_forward": 2,
        "host_syncs_per_forward_all_threads": 3,
    }
    assert demo.count_device_calls([], caller_thread=1)["launches_per_forward"] == 0


def test_cpu_rows_carry_no_device_counts():
    """On cpu there is nothing to profile: the fields are there, null, and nothing runs."""
    ran = []
    calls = demo._device_calls(lambda: ran.append(1), torch.device("cpu"))
    assert ran == [] and set(calls) == {
        "launches_per_forward",
        "host_syncs_per_forward",
        "host_syncs_per_forward_all_threads",
    }
    assert all(v is None for v in calls.values())
