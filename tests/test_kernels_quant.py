"""`overlap.kernels.quantize_packed` (the torch reference) against gather, quantise and pack done by hand."""

from __future__ import annotations

import pytest
import torch

from overlap import kernels
from overlap.kernels import backend
from overlap.kernels.quant import quantized_row_bytes


def test_quantize_packed_writes_values_and_scale_where_dispatch_stages_them():
    g = torch.Generator().manual_seed(0)
    hidden = 70  # scale at byte Align32(70) = 96; row of Align512(100) = 512 bytes
    x = torch.randn(4, hidden, generator=g).to(torch.bfloat16)
    scales = torch.rand(3, hidden, generator=g) + 0.5
    index, scale_rows = torch.tensor([2, 2, 0]), torch.tensor([1, 0, 2])
    out = torch.full((3, quantized_row_bytes(hidden)), 7, dtype=torch.int8)
    kernels.quantize_packed(x, index, out, scales=scales, scale_rows=scale_rows)
    for i in range(3):
        xf = x[index[i]].float() * scales[scale_rows[i]]
        d = torch.tensor(127.0) / xf.abs().max()
        assert torch.equal(out[i, :hidden], torch.round(xf * d).to(torch.int8))
        assert out[i, 96:100].view(torch.float32).item() == (torch.tensor(1.0) / d).item()
        assert bool((out[i, hidden:96] == 7).all()) and bool((out[i, 100:] == 7).all())  # padding untouched


def test_quantize_packed_refuses_scales_without_their_rows():
    x = torch.zeros(2, 64, dtype=torch.bfloat16)
    out = torch.zeros(2, quantized_row_bytes(64), dtype=torch.int8)
    with pytest.raises(ValueError, match="scale_rows must be given with scales.*got None"):
        kernels.quantize_packed(x, None, out, scales=torch.ones(1, 64))


# ---- ties on the torch path: round half to even ---------------------------------------------------
# amax 127 gives d = 1 and amax 254 gives d = 1/2, both exact, so x · d lands exactly on .5 for the
# values below; round half to even sends 2.5 -> 2, 3.5 -> 4, -0.5 -> -0, -1.5 -> -2 (half away from
# zero would give 3, 4, -1, -2: the two differ by one step on half the ties).
TIES = [
    ([127.0, 2.5, 3.5, -0.5, -126.5, 0.5, -1.5, 1.5], [127, 2, 4, 0, -126, 0, -2, 2]),
    ([254.0, 5.0, 7.0, -3.0, 1.0, -1.0, 9.0, -253.0], [127, 2, 4, -2, 0, 0, 4, -126]),
    ([-127.0, 4.5, -4.5, 5.5, -5.5, 0.0, 125.5, -125.5], [-127, 4, -4, 6, -6, 0, 126, -126]),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_quantize_rows_rounds_ties_half_to_even_on_the_torch_path(dtype):
    rows = torch.tensor([r for r, _ in TIES]).to(dtype)
    assert torch.equal(rows.float(), torch.tensor([r for r, _ in TIES]))  # every value exact in dtype
    with backend.use("torch"):
        q, scale = kernels.quantize_rows(rows)
    assert q.tolist() == [want for _, want in TIES]
    assert scale.tolist() == [1.0, 2.0, 1.0]


def test_quantize_packed_rounds_ties_half_to_even_with_smoothing():
    """Ties made by the smoothing factor (x · s exact) and through the gather of quantize_packed."""
    x = torch.tensor([[63.5, 1.25, 1.75, -0.25, 0.75]], dtype=torch.bfloat16)  # · 2 = 127, 2.5, 3.5, -0.5, 1.5
    scales = torch.full((2, 5), 2.0)
    out = torch.zeros(2, quantized_row_bytes(5), dtype=torch.int8)
    with backend.use("torch"):
        kernels.quantize_packed(x, torch.tensor([0, 0]), out, scales=scales, scale_rows=torch.tensor([1, 0]))
    for row in out:
        assert row[:5].tolist() == [127, 2, 4, 0, 2]
        assert row[32:36].view(torch.float32).item() == 1.0
