"""The compiled CPU combine (`overlap.kernels.cpu_combine`) against the eager reference, bit for bit.

The compiled path runs only for large calls; here the threshold is lowered so irregular small shapes
take it: H not a multiple of the vector width, a strided source (a column slice of a staging
buffer), shared rows, `extra`, and weights of zero on negative rows. That last case makes every
product `-0`, and the reference's `0 + (-0)` is `+0`: a compiler that dropped the leading zero would
flip the sign bit. Each (K + S, extra) combination compiles once (seconds); the cases share two.
"""

from __future__ import annotations

import pytest
import torch

from overlap import kernels
from overlap.kernels import cpu_combine


def _case(n, top_k, hidden, shared, has_extra, seed, pad=0):
    g = torch.Generator().manual_seed(seed)
    num_rows = n * (top_k + shared) + 5
    wide = torch.randn(num_rows, hidden + pad, generator=g).to(torch.bfloat16)
    rows = wide[:, :hidden]
    perm = torch.randperm(num_rows, generator=g)
    positions = perm[: n * top_k].view(n, top_k)
    shared_positions = perm[n * top_k : n * (top_k + shared)].view(shared, n) if shared else None
    weights = torch.rand(n, top_k, generator=g) * 2 - 0.5
    weights[0] = 0.0  # token 0: every product is ±0 ...
    rows[positions[0]] = -torch.rand(top_k, hidden, generator=g).to(torch.bfloat16) - 0.5  # ... and -0 at that
    extra = torch.randn(n, hidden, generator=g).to(torch.bfloat16) if has_extra else None
    return rows, positions, weights, shared_positions, extra


def _reference(monkeypatch, rows, positions, weights, shared_positions, extra, n, hidden):
    out = torch.full((n, hidden), float("nan"), dtype=rows.dtype)
    with monkeypatch.context() as m:
        m.setattr(cpu_combine, "_enabled", False)
        kernels.weighted_combine(rows, positions, weights, shared_positions=shared_positions, extra=extra, out=out)
    return out


@pytest.mark.parametrize(
    "n,top_k,hidden,shared,has_extra,pad",
    [
        (37, 8, 1000, 0, False, 0),
        (64, 8, 77, 0, False, 0),  # another shape, same compiled code (dynamic shapes)
        (19, 3, 1030, 2, True, 26),  # shared rows, extra, strided rows
    ],
)
def test_compiled_cpu_combine_is_bit_equal_to_the_reference(monkeypatch, n, top_k, hidden, shared, has_extra, pad):
    rows, positions, weights, shared_positions, extra = _case(n, top_k, hidden, shared, has_extra, seed=n, pad=pad)
    expected = _reference(monkeypatch, rows, positions, weights, shared_positions, extra, n, hidden)
    if shared == 0 and not has_extra:
        assert bool((expected[0] == 0).all()) and not bool(torch.signbit(expected[0].float()).any())  # +0, not -0
    out = torch.full((n, hidden), float("nan"), dtype=rows.dtype)
    assert cpu_combine.weighted_combine(
        rows, positions, weights, shared_positions=shared_positions, extra=extra, out=out
    ), "the compiled path turned itself off (see the warning)"
    assert torch.equal(out, expected)


def test_public_combine_takes_the_compiled_path_only_above_the_threshold(monkeypatch):
    rows, positions, weights, _, _ = _case(37, 8, 1000, 0, False, seed=37)
    calls = []
    real = cpu_combine.weighted_combine
    monkeypatch.setattr(cpu_combine, "weighted_combine", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = torch.empty(37, 1000, dtype=rows.dtype)
    kernels.weighted_combine(rows, positions, weights, out=out)  # 296 000 gathered elements: below
    assert calls == []
    monkeypatch.setattr(cpu_combine, "MIN_ELEMENTS", 37 * 8 * 1000)
    kernels.weighted_combine(rows, positions, weights, out=out)
    assert calls == [1]
    assert torch.equal(out, _reference(monkeypatch, rows, positions, weights, None, None, 37, 1000))
