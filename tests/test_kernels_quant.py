"""`overlap.kernels.quantize_packed` (the torch reference) against gather, quantise and pack done by hand."""

from __future__ import annotations

import pytest
import torch

from overlap import kernels
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
