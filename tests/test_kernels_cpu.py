"""The compiled CPU kernels (`overlap.kernels.cpu_native`) against the torch reference, bit for bit.

The reference runs under `backend.use("torch")`; the compiled path is what the public functions run on
CPU by default. Cases: irregular hidden sizes (the vector loops' tails: H of 1, 15, 33, 77, 1030),
no rows and one row, strided sources (a column slice of a staging buffer), every dtype, smoothing,
zero rows, exact ties for both roundings (int8 round half to even; the fp32 -> bf16/fp16 cast), and
a combine whose products are all -0 (the reference's `0 + (-0)` is `+0`). Outputs are compared as
raw integers, so that -0 differs from +0.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from overlap import kernels
from overlap.kernels import backend, cpu_native
from overlap.kernels.quant import quantized_row_bytes

pytestmark = pytest.mark.skipif(not cpu_native.available(), reason="no C compiler: the torch reference runs")

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
_INTS = {1: torch.int8, 2: torch.int16, 4: torch.int32}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_INTS[t.element_size()])


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def _tokens(n: int, hidden: int, dtype: torch.dtype, seed: int, pad: int = 0) -> torch.Tensor:
    """`(n, hidden)` tokens, a column slice of a wider buffer when `pad`, with ties and a zero row."""
    g = torch.Generator().manual_seed(seed)
    wide = (torch.randn(n, hidden + pad, generator=g) * 4).to(dtype)
    x = wide[:, :hidden]
    if n >= 2:
        x[1] = 0.0  # a zero row: scale 0, q 0
    if n >= 3 and hidden >= 6:  # amax 127 -> d = 1: x * d lands exactly on halves
        x[2, :6] = torch.tensor([127.0, 2.5, -3.5, 0.5, -0.5, 1.5])
        x[2, 6:] = 0.25
    return x


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,hidden,pad", [(0, 64, 0), (1, 1, 0), (1, 15, 3), (37, 77, 0), (9, 1030, 26)])
@pytest.mark.parametrize("smooth", [False, True])
def test_quantize_packed_is_bit_equal_to_the_reference(dtype, n, hidden, pad, smooth):
    g = torch.Generator().manual_seed(hidden)
    x = _tokens(n + 3, hidden, dtype, seed=n, pad=pad)
    index = torch.randint(0, n + 3, (n,), generator=g)
    if n >= 3:
        index[:3] = torch.tensor([2, 1, 0])
    kw = {}
    if smooth:
        kw = {"scales": torch.rand(5, hidden, generator=g) + 0.5, "scale_rows": torch.randint(0, 5, (n,), generator=g)}
        if n >= 1:
            kw["scale_rows"][0] = 4
            kw["scales"][4] = 1.0  # row 2 keeps its ties under smoothing
    out = torch.full((n, quantized_row_bytes(hidden)), 7, dtype=torch.int8)
    expected = out.clone()
    assert kernels.quantize_packed(x, index, out, **kw) is out
    with backend.use("torch"):
        kernels.quantize_packed(x, index, expected, **kw)
    assert _same(out, expected)
    if n >= 3:
        assert out[0, :6].tolist() == [127, 2, -4, 0, 0, 2]  # half to even, not away from zero


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_row_so_small_that_127_over_its_amax_overflows_saturates_as_the_reference(dtype):
    rows = torch.full((3, 70), 1e-39, dtype=dtype)  # subnormal: d = 127 / amax = inf, x * d = inf
    rows[:, 1::2] *= -2
    for factors in (None, torch.ones(3, 70)):
        q, scale = kernels.quantize_rows(rows, factors)
        with backend.use("torch"):
            q_ref, scale_ref = kernels.quantize_rows(rows, factors)
        assert _same(q, q_ref) and _same(scale, scale_ref)
        assert q[0, :2].tolist() == [127, -128] and scale[0].item() == 0.0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,hidden", [(0, 8), (1, 33), (40, 1030)])
def test_quantize_rows_is_bit_equal_to_the_reference(dtype, n, hidden):
    rows = _tokens(n, hidden, dtype, seed=hidden, pad=5)
    smooth = torch.rand(n, hidden, generator=torch.Generator().manual_seed(1)) + 0.5
    for factors in (None, smooth):
        q, scale = kernels.quantize_rows(rows, factors)
        with backend.use("torch"):
            q_ref, scale_ref = kernels.quantize_rows(rows, factors)
        assert _same(q, q_ref) and _same(scale, scale_ref)
        if n >= 2:
            assert scale[1].item() == 0.0 and not bool(q[1].any())


def _combine_case(n, top_k, hidden, shared, has_extra, dtype, seed, pad):
    g = torch.Generator().manual_seed(seed)
    num_rows = n * (top_k + shared) + 5
    wide = torch.randn(num_rows, hidden + pad, generator=g).to(dtype)
    rows = wide[:, :hidden]
    perm = torch.randperm(num_rows, generator=g)
    positions = perm[: n * top_k].view(n, top_k)
    shared_positions = perm[n * top_k : n * (top_k + shared)].view(shared, n) if shared else None
    weights = torch.rand(n, top_k, generator=g) * 2 - 0.5
    if n >= 1:  # token 0: every product is -0 (weight 0 on negative rows); the sum must be +0
        weights[0] = 0.0
        rows[positions[0]] = -torch.rand(top_k, hidden, generator=g).to(dtype) - 0.5
    if n >= 2 and top_k >= 2 and dtype != torch.float32:  # token 1: sums exactly halfway between two bf16/fp16
        weights[1] = 1.0
        rows[positions[1]] = 0.0
        rows[positions[1, 0]] = 1.0
        rows[positions[1, 1], 0::2] = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11  # 1 + half an ulp
        rows[positions[1, 1], 1::2] = 3 * 2.0**-8 if dtype == torch.bfloat16 else 3 * 2.0**-11
    extra = torch.randn(n, hidden, generator=g).to(dtype) if has_extra else None
    return rows, positions, weights, shared_positions, extra


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "n,top_k,hidden,shared,has_extra,pad",
    [
        (0, 2, 64, 0, False, 0),
        (1, 1, 1, 0, False, 0),
        (37, 8, 1000, 0, False, 0),
        (5, 3, 77, 2, True, 26),  # shared rows, extra, strided rows, a 13-column tail
        (16, 2, 33, 1, False, 0),
    ],
)
def test_combine_is_bit_equal_to_the_reference(dtype, n, top_k, hidden, shared, has_extra, pad):
    rows, positions, weights, shared_positions, extra = _combine_case(
        n, top_k, hidden, shared, has_extra, dtype, seed=n + hidden, pad=pad
    )
    kw = {"shared_positions": shared_positions, "extra": extra}
    out = torch.full((n, hidden), float("nan"), dtype=dtype)
    expected = out.clone()
    assert kernels.weighted_combine(rows, positions, weights, out=out, **kw) is out
    with backend.use("torch"):
        kernels.weighted_combine(rows, positions, weights, out=expected, **kw)
    assert _same(out, expected)
    if n >= 1 and shared == 0 and not has_extra:
        assert not bool(out[0].any()) and not bool(torch.signbit(out[0].float()).any())  # +0, not -0
    if n >= 2 and top_k >= 2 and dtype != torch.float32 and shared == 0 and not has_extra and hidden >= 2:
        ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
        assert out[1, :2].float().tolist() == [1.0, 1.0 + 2 * ulp]  # both ties went to the even neighbour


def test_the_compiled_path_is_the_one_that_runs_and_the_switches_turn_it_off(monkeypatch):
    x = torch.randn(4, 40).to(torch.bfloat16)
    assert backend.cpu_kernels(x) is cpu_native
    with backend.use("torch"):
        assert backend.cpu_kernels(x) is None
    calls = []
    real = cpu_native.quantize
    monkeypatch.setattr(cpu_native, "quantize", lambda *a, **k: calls.append(1) or real(*a, **k))
    kernels.quantize_rows(x)
    assert calls == [1]
    monkeypatch.setattr(cpu_native, "_enabled", False)
    assert backend.cpu_kernels(x) is None
    kernels.quantize_rows(x)
    assert calls == [1]


def test_an_index_out_of_range_raises_instead_of_reading_past_the_tensor():
    x = torch.randn(4, 40).to(torch.bfloat16)
    out = torch.zeros(2, quantized_row_bytes(40), dtype=torch.int8)
    with pytest.raises(IndexError, match="1 of 2 rows index past x"):
        kernels.quantize_packed(x, torch.tensor([0, 4]), out)
    rows = torch.randn(6, 40).to(torch.bfloat16)
    with pytest.raises(IndexError, match="1 of 2 tokens index past rows"):
        kernels.weighted_combine(
            rows, torch.tensor([[0, 1], [2, -1]]), torch.ones(2, 2), out=torch.empty(2, 40, dtype=torch.bfloat16)
        )


def _run(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=root,
        env={**os.environ, **env},
    )


_PROBE = """
    import warnings, torch
    warnings.simplefilter("always")
    from overlap.kernels import cpu_native, backend
    x = torch.randn(3, 50).to(torch.bfloat16)
    print("available", cpu_native.available(), backend.cpu_kernels(x) is not None)
"""


def test_the_library_is_built_once_into_the_cache_and_loaded_by_later_processes(tmp_path):
    env = {"OVERLAP_CACHE_DIR": str(tmp_path), "OVERLAP_CPU_COMPILE": "1"}
    first = _run(_PROBE, env)
    assert "available True True" in first.stdout, first.stderr
    built = list(tmp_path.glob("cpu_native-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    second = _run(_PROBE, env)
    assert "available True True" in second.stdout, second.stderr
    assert built[0].stat().st_mtime_ns == stamp  # loaded, not built again (a build replaces the file)


def test_ranks_that_start_together_on_an_empty_cache_all_get_the_library(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "OVERLAP_CACHE_DIR": str(tmp_path), "OVERLAP_CPU_COMPILE": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(_PROBE)], cwd=root, env=env, stdout=subprocess.PIPE, text=True
        )
        for _ in range(3)
    ]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert all("available True True" in out for out in outputs), outputs
    assert len(list(tmp_path.glob("cpu_native-*.so"))) == 1 and not list(tmp_path.glob("tmp*"))


def test_a_failing_compiler_warns_once_and_the_reference_runs(tmp_path):
    result = _run(_PROBE, {"OVERLAP_CACHE_DIR": str(tmp_path), "CC": "/bin/false", "OVERLAP_CPU_COMPILE": "1"})
    assert "available False False" in result.stdout, result.stderr
    assert result.stderr.count("compiled CPU kernels are unavailable") == 1
    off = _run(_PROBE, {"OVERLAP_CACHE_DIR": str(tmp_path), "OVERLAP_CPU_COMPILE": "0"})
    assert "available False False" in off.stdout and "unavailable" not in off.stderr
