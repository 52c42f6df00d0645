"""How far a split computation may drift from the unsplit one, in units of the dtype.

Owns: the ulp measure and the tolerance every comparison of a split computation against the dense
fp32 reference uses (the demo, the tests, the examples). Never used for data movement, which is
bit-exact.

Why a tolerance at all: GEMMs round differently for different row counts on some hosts (seen: 1–2
bf16 ulp on 0.02–0.35 % of the elements on an AMX Xeon), so a layer cut into microbatches is not
bit-equal to the same layer run whole. The measure is per row: the error of an element in ulps of
the row's largest reference value (`|actual - expected| / ulp(max_j |expected[row, j]|)`), which
stays meaningful where values cancel to near zero. An MoE output is a weighted sum of K expert
rows, each a few ulps off, then one cast: `MAX_ULPS` of the row's scale covers that with margin,
while a real bug (a wrong weight, a wrong row) is off by a large fraction of the row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

MAX_ULPS = 8.0
"""Tolerated error per element, in ulps of its row's largest reference value."""


def ulp(x: Tensor, dtype: torch.dtype) -> Tensor:
    """The spacing of `dtype` at |x| (elementwise; the smallest normal's spacing near zero)."""
    info = torch.finfo(dtype)
    mag = x.abs().float().clamp_min(info.tiny)
    return torch.exp2(torch.floor(torch.log2(mag))) * info.eps


@dataclass(frozen=True)
class Closeness:
    """The outcome of `compare`: the worst error in ulps, where, and whether it is within `max_ulps`."""

    worst_ulps: float
    worst_index: tuple[int, ...]
    max_ulps: float
    dtype: torch.dtype

    @property
    def ok(self) -> bool:
        return self.worst_ulps <= self.max_ulps

    def __str__(self) -> str:
        name = str(self.dtype).removeprefix("torch.")
        verdict = "within" if self.ok else "OUTSIDE"
        return (
            f"worst difference {self.worst_ulps:.2f} {name} ulp at {list(self.worst_index)} "
            f"({verdict} the tolerance of {self.max_ulps:g} ulp)"
        )


def compare(
    actual: Tensor, expected: Tensor, dtype: torch.dtype | None = None, max_ulps: float = MAX_ULPS
) -> Closeness:
    """Compare `actual` with the fp32 (or wider) reference `expected`, per row, in ulps of `dtype`.

    Args:
        actual: `(..., H)` the split computation's output.
        expected: `(..., H)` the dense reference, same shape.
        dtype: the dtype whose ulp is the unit (default: actual's).
        max_ulps: the tolerance.

    Raises:
        ValueError: the shapes differ.
    """
    if actual.shape != expected.shape:
        raise ValueError(
            f"actual and expected must have the same shape, got {tuple(actual.shape)} and {tuple(expected.shape)}"
        )
    dtype = dtype or actual.dtype
    if actual.numel() == 0:
        return Closeness(0.0, (), max_ulps, dtype)
    a, e = actual.double(), expected.double()
    scale = e.abs().amax(dim=-1, keepdim=True) if e.dim() else e.abs()
    err = (a - e).abs() / ulp(scale, dtype).double()
    flat = int(torch.argmax(err))
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), err.shape))
    return Closeness(float(err.reshape(-1)[flat]), index, max_ulps, dtype)
