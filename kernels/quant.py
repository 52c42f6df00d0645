"""Per-row dynamic int8 quantisation (dispatch `quant_mode = 2`).

For each row: `xf = float32(row) · smooth` (when smoothing scales are given), `d = 127 / max|xf|`,
`q = round_half_even(xf · d)` as int8, and the scale travelling with the row is `1 / d`, so that
`row ≈ q · scale`. A zero row gets scale 0 and q 0 (the hardware kernel divides by zero there).

These torch functions are the reference; CPU calls run the same arithmetic in compiled C
(`cpu_native`), CUDA tensors the Triton kernels; both are bit-equal to it.

`pack_quantized` lays a row out as the dispatch staging buffer `y` does for quant_mode 2: the H
int8 values, then at byte `Align32(H)` the fp32 scale, in rows of `Align512(Align32(H) + 4)` bytes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .backend import cpu_kernels, device_kernels
from .layout import align


def quantize_rows(rows: Tensor, smooth: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Quantise rows to int8 with one dynamic scale each.

    Args:
        rows: `(N, H)` float (fp16/bf16/fp32).
        smooth: optional `(N, H)` fp32 per-row smoothing factors (already gathered per row).

    Returns:
        `q`: `(N, H)` int8; `scale`: `(N,)` fp32 with `rows ≈ q · scale[:, None]`.
    """
    device = device_kernels(rows)
    if device is not None:
        return device.quantize_rows(rows, smooth)
    native = cpu_kernels(rows)
    if native is not None:
        q = torch.empty(rows.shape, dtype=torch.int8)
        scale = torch.empty(rows.shape[0], dtype=torch.float32)
        if native.quantize(rows, None, smooth, None, q, scale):
            return q, scale  # the same arithmetic, compiled (cpu_native)
    xf = rows.float()
    if smooth is not None:
        xf = xf * smooth
    amax = xf.abs().amax(dim=-1)
    is_zero = amax == 0
    # A true division: `127.0 / amax` would run as `amax.reciprocal() * 127`, one rounding more.
    d = torch.where(is_zero, torch.ones_like(amax), torch.full_like(amax, 127.0).div(amax))
    q = torch.round(xf * d.unsqueeze(-1)).clamp_(-128, 127).to(torch.int8)
    scale = torch.where(is_zero, torch.zeros_like(amax), torch.ones_like(d).div(d))
    return q, scale


def dequantize_rows(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """`q · scale`, as `dtype`. `q`: `(N, H)` int8; `scale`: `(N,)` fp32."""
    return (q.float() * scale.unsqueeze(-1)).to(dtype)


def quantized_row_bytes(hidden: int) -> int:
    """Bytes of one quantised staging row: `Align512(Align32(H) + 4)`."""
    return align(align(hidden, 32) + 4, 512)


def pack_quantized(q: Tensor, scale: Tensor, out: Tensor) -> Tensor:
    """Write int8 values and their fp32 scale into staging rows.

    Args:
        q: `(N, H)` int8.
        scale: `(N,)` fp32.
        out: `(N, quantized_row_bytes(H))` int8, written in place.
    """
    hidden = q.shape[1]
    at = align(hidden, 32)
    out[:, :hidden] = q
    out[:, at : at + 4] = scale.contiguous().view(torch.int8).view(-1, 4)
    return out


def quantize_packed(
    x: Tensor,
    index: Tensor | None,
    out: Tensor,
    *,
    scales: Tensor | None = None,
    scale_rows: Tensor | None = None,
) -> Tensor:
    """Gather, smooth, quantise and pack rows into staging rows: dispatch's quant_mode 2 in one call.

    `out[i]` receives `pack(quantize_rows(x[index[i]], scales[scale_rows[i]]))`. On CUDA this is one
    kernel that reads each source row once; here it is the composition of the functions above.

    Args:
        x: `(BS, H)` fp16/bf16 tokens.
        index: `(N,)` int64 row of `x` for each staging row, or `None` for `x`'s rows in order.
        out: `(N, quantized_row_bytes(H))` int8, written in place (bytes between the values and
            the scale, and after the scale, are left as they are).
        scales: optional `(R, H)` fp32 smoothing factors.
        scale_rows: `(N,)` int64 row of `scales` for each staging row (required with `scales`).

    Returns:
        `out`.
    """
    if scales is not None and scale_rows is None:
        raise ValueError("scale_rows must be given with scales: the row of scales each staging row uses, got None")
    device = device_kernels(x)
    if device is not None:
        return device.quantize_packed(x, index, out, scales=scales, scale_rows=scale_rows)
    native = cpu_kernels(x)
    if native is not None and native.quantize(
        x, index, scales, scale_rows, out, out, scale_offset=align(x.shape[1], 32), scale_stride=out.stride(0)
    ):
        return out  # gather, smoothing, quantisation and packing in one pass per row (cpu_native)
    rows = x if index is None else x.index_select(0, index)
    smooth = None if scales is None or scale_rows is None else scales.index_select(0, scale_rows)
    q, scale = quantize_rows(rows, smooth)
    return pack_quantized(q, scale, out)


def unpack_quantized(rows: Tensor, hidden: int) -> tuple[Tensor, Tensor]:
    """Inverse of `pack_quantized`: `(N, H)` int8 values and `(N,)` fp32 scales."""
    at = align(hidden, 32)
    scale = rows[:, at : at + 4].contiguous().view(torch.float32).view(-1)
    return rows[:, :hidden], scale
