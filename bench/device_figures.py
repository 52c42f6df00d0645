"""The figures of issue 21's "Done when", read from a device check's logs (bench/device_check.sh).

    python bench/device_figures.py LOG_DIR        # prints one line per figure: PASS / FAIL / PENDING

Reads, in LOG_DIR: `cuda-tests.log` (pytest's output, run with -s), `bench-h4096.json` and
`bench-h7168.json` (`python -m overlap bench --device cuda --comm-ratio 1 --json`), `window.json`
(the window-transport run), `kernels-cuda.log` (`bench/bench_kernels.py --device cuda`) and
`experts-graph-cuda.json` (`bench/bench_experts.py --cuda-graph`, the CUDA-graphs trial). A
missing file makes its figure PENDING, never PASS. Exit status 0 when every figure passed.
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Any

PASS, FAIL, PENDING = "PASS", "FAIL", "PENDING"


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def _json(path: str, kind: type) -> Any:
    """The JSON document at `path` if it is a `kind` (list or dict), else None (missing, unreadable
    or another shape)."""
    text = _read(path)
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, kind) else None


def _rows(path: str) -> list[dict] | None:
    return _json(path, list)


def cuda_tests(log: str | None) -> tuple[str, str]:
    """Every CUDA test passes (none failed, none errored, some passed)."""
    if log is None:
        return PENDING, "no cuda-tests.log"
    summary = [line for line in log.splitlines() if re.search(r"\d+ (passed|failed|error)", line)]
    if not summary:
        return FAIL, "no pytest summary (timed out?)"
    last = summary[-1].strip("= ")
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|errors?|skipped)", last)}
    bad = counts.get("failed", 0) + counts.get("error", 0) + counts.get("errors", 0)
    ok = bad == 0 and counts.get("passed", 0) > 0
    return (PASS if ok else FAIL), last


def host_syncs(log: str | None) -> tuple[str, str]:
    """0 host syncs per overlapped forward: the six cases of test_overlapped_forward_makes_no_host_sync."""
    if log is None:
        return PENDING, "no cuda-tests.log"
    seen = sorted(set(re.findall(r"0 host syncs per overlapped forward \(m=(\d), quant_mode=(\d)\)", log)))
    expected = [(m, q) for m in "124" for q in "02"]
    failed = re.findall(r"FAILED \S*test_overlapped_forward_makes_no_host_sync\S*", log)
    if failed:
        return FAIL, f"{len(failed)} case(s) made a host sync: {', '.join(failed)[:300]}"
    if seen == sorted(expected):
        return PASS, "0 host syncs in every case (m = 1, 2, 4; bf16 and int8)"
    return FAIL, f"only {len(seen)} of 6 cases reported 0 host syncs"


def comm_equals_compute(rows: list[dict] | None, hidden: int) -> tuple[str, str]:
    """At comm ≈ compute (T >= 1024, H `hidden`): m = 2 overlapped >= 1.6x serial with >= 90 % hidden,
    and no row slower than serial at m = 1, 2, 4."""
    if rows is None:
        return PENDING, f"no bench-h{hidden}.json"
    mine = [r for r in rows if r.get("shape_hidden") == hidden and r.get("shape_tokens", 0) >= 1024]
    if not mine:
        return FAIL, f"no row at T >= 1024, H {hidden}"
    cells = [
        f"m={r['microbatches_requested']}: {r['speedup']:.2f}x, hidden {r['hidden_fraction'] * 100:.0f} %"
        f" (ideal {r.get('ideal_speedup', float('nan')):.2f}x)"
        for r in mine
    ]
    two = [r for r in mine if r.get("microbatches_requested") == 2]
    slower = [r for r in mine if r.get("verdict") == "slower" or r["speedup"] < 1.0]
    ok = bool(two) and all(r["speedup"] >= 1.6 and r["hidden_fraction"] >= 0.9 for r in two) and not slower
    return (PASS if ok else FAIL), "; ".join(cells)


def device_calls(rows: list[dict] | None) -> tuple[str, str]:
    """Kernel launches and host syncs per overlapped forward (bench rows' profiler counts): every
    row's forward must make 0 host syncs on its own thread; launches are reported."""
    if not rows:
        return PENDING, "no bench-h4096.json"
    counted = [r for r in rows if r.get("host_syncs_per_forward") is not None]
    if not counted:
        errors = {r.get("device_calls_error") for r in rows} - {None}
        return PENDING, f"no profiler counts in the rows{': ' + errors.pop() if errors else ''}"
    worst = max(r["host_syncs_per_forward"] for r in counted)
    launches = ", ".join(f"m={r['microbatches']}: {r['launches_per_forward']}" for r in counted)
    return (PASS if worst == 0 else FAIL), f"host syncs per forward (caller) max {worst}; launches {launches}"


def window(rows: list[dict] | None) -> tuple[str, str]:
    """Window transport, no emulation, T 4096 H 7168 E 64 K 8 I 2048 int8, 2 ranks: m = 2 faster
    than serial, its ideal printed beside it."""
    if rows is None:
        return PENDING, "no window.json (the window transport's CLI flag is not there yet?)"
    two = [r for r in rows if r.get("microbatches_requested") == 2]
    if not two:
        return FAIL, "no m = 2 row"
    r = two[0]
    text = (
        f"{r.get('transport')}: serial {r['serial_s'] * 1e3:.1f} ms, overlapped {r['overlapped_s'] * 1e3:.1f} ms, "
        f"{r['speedup']:.2f}x (ideal {r.get('ideal_speedup', float('nan')):.2f}x), {r.get('verdict')}"
    )
    return (PASS if r["speedup"] > 1.0 and r.get("verdict") != "slower" else FAIL), text


def kernels(log: str | None) -> tuple[str, str]:
    """The dispatch layout <= 50 µs (4096 tokens) and every Triton kernel >= 60 % of copy_, every shape."""
    if log is None:
        return PENDING, "no kernels-cuda.log"
    layout_us, low = [], []
    for line in log.splitlines():
        m = re.match(r"\s*(\d+) x (\d+) x (\d+)\s+(\S+)\s+(.*)", line)
        if not m or m.group(4) == "copy_":
            continue
        tokens, name, cells = int(m.group(1)), m.group(4), m.group(5)
        us = re.match(r"\s*([\d.]+) µs", cells)
        pct = re.match(r"\s*[\d.]+ GB/s\s+([\d.]+)%", cells)
        if name == "layout" and us and tokens == 4096:
            layout_us.append(float(us.group(1)))
        elif pct and float(pct.group(1)) < 60:
            low.append(f"{name} {pct.group(1)} % at {m.group(1)}x{m.group(2)}x{m.group(3)}")
    if not layout_us:
        return FAIL, "no layout line at 4096 tokens (timed out?)"
    ok = max(layout_us) <= 50 and not low
    text = f"layout {max(layout_us):.1f} µs at 4096 tokens; " + (
        "every kernel >= 60 % of copy_" if not low else "below 60 %: " + ", ".join(low)
    )
    return (PASS if ok else FAIL), text


def device_link(log: str | None) -> tuple[str, str]:
    """The emulated link on cuda holds the transport's stream, not the host: the test passed and
    printed each rank's host and device times (gloo-staged and the CUDA window)."""
    if log is None:
        return PENDING, "no cuda-tests.log"
    name = "test_the_emulated_link_holds_the_transport_stream_not_the_host"
    times = re.findall(r"rank \d \((\S+)\): host ([\d.]+) ms, device ([\d.]+) ms", log)
    failed = re.findall(rf"FAILED \S*{name}\S*", log)
    if failed:
        return FAIL, ", ".join(failed)
    if not times:
        return FAIL, f"no times printed by {name} (not run, or run without -s?)"
    return PASS, "; ".join(f"{kind}: host {host} ms, device {dev} ms" for kind, host, dev in times)


def cuda_graphs(result: dict | None) -> tuple[str, str]:
    """The CUDA-graphs trial of a microbatch's routed experts: ran, and the replay bit-equal to the
    eager calls (PASS says the measurement stands; whether graphs win is the ratio in the text)."""
    if result is None:
        return PENDING, "no experts-graph-cuda.json"
    if "eager_over_graph" not in result:
        return FAIL, "no CUDA-graph timing in the result"
    ratio = float(result["eager_over_graph"])
    verdict = "graphs win" if ratio > 1.05 else "graphs do not win"
    text = f"eager / graph replay {ratio:.2f}x ({verdict}); bit-equal: {result.get('graph_bit_equal')}"
    return (PASS if result.get("graph_bit_equal") else FAIL), text


def figures(log_dir: str) -> list[tuple[str, str, str]]:
    tests = _read(os.path.join(log_dir, "cuda-tests.log"))
    return [
        ("every CUDA test passes", *cuda_tests(tests)),
        ("0 host syncs per overlapped forward", *host_syncs(tests)),
        ("comm = compute, H 4096", *comm_equals_compute(_rows(os.path.join(log_dir, "bench-h4096.json")), 4096)),
        ("comm = compute, H 7168", *comm_equals_compute(_rows(os.path.join(log_dir, "bench-h7168.json")), 7168)),
        ("launches / host syncs", *device_calls(_rows(os.path.join(log_dir, "bench-h4096.json")))),
        ("window transport, T4096 H7168 E64 K8", *window(_rows(os.path.join(log_dir, "window.json")))),
        ("layout <= 50 us, kernels >= 60 % copy_", *kernels(_read(os.path.join(log_dir, "kernels-cuda.log")))),
        ("emulated link holds the stream, not host", *device_link(tests)),
        ("CUDA graphs trial, 256 rows", *cuda_graphs(_json(os.path.join(log_dir, "experts-graph-cuda.json"), dict))),
    ]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python bench/device_figures.py LOG_DIR", file=sys.stderr)
        return 2
    rows = figures(args[0])
    for name, status, text in rows:
        print(f"{status:<8} {name:<40} {text}")
    return 0 if all(status == PASS for _, status, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
