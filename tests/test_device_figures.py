"""bench/device_figures.py reads a device check's logs into issue 21's figures: PASS only where the
logs show the figure met, FAIL where they show it missed, PENDING where the log is missing."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

_spec = importlib.util.spec_from_file_location(
    "device_figures", os.path.join(os.path.dirname(__file__), "..", "bench", "device_figures.py")
)
figs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(figs)  # type: ignore[union-attr]


def _row(m: int, speedup: float, hidden: float, h: int = 4096, verdict: str = "faster") -> dict:
    return {
        "shape_hidden": h,
        "shape_tokens": 1024,
        "microbatches_requested": m,
        "speedup": speedup,
        "hidden_fraction": hidden,
        "ideal_speedup": 2.0,
        "verdict": verdict,
        "serial_s": 0.01,
        "overlapped_s": 0.01 / speedup,
        "transport": "window",
        "microbatches": m,
        "launches_per_forward": 40 * m,
        "host_syncs_per_forward": 0,
    }


KERNELS = """\
         T x K x H    kernel          triton   % copy           torch   % copy  same bits
   4096 x 8 x 7168     copy_       3000 GB/s     100%
   4096 x 8 x 7168   scatter       2580 GB/s      86%       900 GB/s       30%  yes
   4096 x 8 x 7168    layout         41.0 µs                 120.0 µs           yes
    512 x 8 x 1024   scatter        {pct} GB/s      {pct}%       100 GB/s       10%  yes
"""


def test_everything_met(tmp_path):
    tests = "0 host syncs per overlapped forward (m=1, quant_mode=0)\n" + "".join(
        f"0 host syncs per overlapped forward (m={m}, quant_mode={q})\n" for m in (1, 2, 4) for q in (0, 2)
    )
    link = "rank 0 (gloo-staged): host 12.0 ms, device 305.1 ms\nrank 1 (window): host 3.0 ms, device 301.0 ms\n"
    (tmp_path / "cuda-tests.log").write_text(tests + link + "===== 21 passed, 0 skipped in 100.0s =====\n")
    (tmp_path / "experts-graph-cuda.json").write_text(json.dumps({"eager_over_graph": 1.4, "graph_bit_equal": True}))
    for h in (4096, 7168):
        rows = [_row(1, 1.1, 0.5, h), _row(2, 1.7, 0.93, h), _row(4, 1.8, 0.95, h)]
        (tmp_path / f"bench-h{h}.json").write_text(json.dumps(rows))
    (tmp_path / "window.json").write_text(json.dumps([_row(2, 1.2, 0.6, 7168)]))
    (tmp_path / "kernels-cuda.log").write_text(KERNELS.format(pct=70))
    result = figs.figures(str(tmp_path))
    assert [s for _, s, _ in result] == ["PASS"] * len(result) and len(result) == 9, result
    text = {name: t for name, _, t in result}
    assert "graphs win" in text["CUDA graphs trial, 256 rows"] and "1.40x" in text["CUDA graphs trial, 256 rows"]
    assert "window: host 3.0 ms, device 301.0 ms" in text["emulated link holds the stream, not host"]
    assert figs.main([str(tmp_path)]) == 0


@pytest.mark.parametrize(
    "rows",
    [
        [_row(1, 1.1, 0.5), _row(2, 1.5, 0.95), _row(4, 1.8, 0.95)],  # m = 2 under 1.6x
        [_row(1, 1.1, 0.5), _row(2, 1.7, 0.85), _row(4, 1.8, 0.95)],  # m = 2 hides under 90 %
        [_row(1, 0.9, 0.5, verdict="slower"), _row(2, 1.7, 0.95), _row(4, 1.8, 0.95)],  # a row slower
    ],
)
def test_a_missed_figure_fails(rows):
    assert figs.comm_equals_compute(rows, 4096)[0] == "FAIL"


def test_missing_logs_are_pending_and_failures_are_read(tmp_path):
    (tmp_path / "cuda-tests.log").write_text(
        "FAILED tests/test_cuda.py::test_overlapped_forward_makes_no_host_sync[2-int8]\n== 1 failed, 20 passed ==\n"
    )
    (tmp_path / "kernels-cuda.log").write_text(KERNELS.format(pct=40))
    status = {name: s for name, s, _ in figs.figures(str(tmp_path))}
    assert status["every CUDA test passes"] == "FAIL"
    assert status["0 host syncs per overlapped forward"] == "FAIL"
    assert status["comm = compute, H 4096"] == "PENDING"
    assert status["window transport, T4096 H7168 E64 K8"] == "PENDING"
    assert status["layout <= 50 us, kernels >= 60 % copy_"] == "FAIL"
    assert status["emulated link holds the stream, not host"] == "FAIL"  # its times were never printed
    assert status["CUDA graphs trial, 256 rows"] == "PENDING"
    assert figs.main([str(tmp_path)]) == 1


def test_the_cuda_graphs_trial_fails_where_the_replay_differs_and_says_when_graphs_lose():
    assert figs.cuda_graphs({"eager_over_graph": 1.5, "graph_bit_equal": False})[0] == figs.FAIL
    status, text = figs.cuda_graphs({"eager_over_graph": 0.97, "graph_bit_equal": True})
    assert status == figs.PASS and "graphs do not win" in text
    assert figs.cuda_graphs({"grouped_mm": {}})[0] == figs.FAIL


def test_launches_and_host_syncs_per_forward_are_read_from_the_bench_rows():
    rows = [{"microbatches": m, "launches_per_forward": 40 * m, "host_syncs_per_forward": 0} for m in (1, 2, 4)]
    status, text = figs.device_calls(rows)
    assert status == figs.PASS and "m=4: 160" in text
    rows[1]["host_syncs_per_forward"] = 3
    assert figs.device_calls(rows)[0] == figs.FAIL
    cpu_rows = [{"microbatches": 2, "launches_per_forward": None, "host_syncs_per_forward": None}]
    assert figs.device_calls(cpu_rows)[0] == figs.PENDING
    assert figs.device_calls(None)[0] == figs.PENDING
    failed = [{**cpu_rows[0], "device_calls_error": "RuntimeError: no CUPTI"}]
    assert "no CUPTI" in figs.device_calls(failed)[1]
