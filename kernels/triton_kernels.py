"""Triton twins of the `overlap.kernels` torch references, for CUDA tensors.

Owns the device kernels and their launchers: each launcher takes and returns exactly the tensors of
its torch reference (`combine.weighted_combine`, `permute.gather_rows` / `scatter_rows`,
`quant.quantize_rows` / `quantize_packed`, `layout.dispatch_layout`), so the reference is the
oracle they are tested against. It never validates user input and never reads a device value on
the host: every length it allocates comes from host integers or tensor shapes.

Importing this module imports triton; `overlap.kernels.backend` imports it lazily, on the first
CUDA tensor. Portable Triton only (no inline assembly, no libdevice), so that other Triton backends
(triton-ascend) could compile it; see docs/kernels.md.

Kernels, in the order the ops use them::

    dispatch_layout: count (per block of (t, k) entries, per expert histograms)
                     place (each program sums the histograms it needs: stable slot, send
                     position, shared rows, counts): two launches, no host read
    gather/scatter:  copy rows through an index on either side, tiles of (rows, hidden)
    quantize:        per row amax, 127 / amax, round half to even, int8 + fp32 scale (packed in place)
    combine:         per tile of (tokens, hidden): fp32 sum in k order, shared rows, extra, one cast

Rounding: products and sums must round exactly as torch's eager ops do, so kernels that multiply
and add are launched with `enable_fp_fusion=False` (no FMA contraction), divisions use
`tl.div_rn`, and round-half-to-even uses the `(v + 1.5·2²³) − 1.5·2²³` identity (exact for
`|v| < 2²²`; quantised values are at most 127). Under `TRITON_INTERPRET=1` (triton 3.9) the fp32 →
bf16/fp16 cast truncates instead of rounding, so the launchers hand the fp32 accumulator to torch
for the final cast there; on a GPU the kernel casts (round to nearest even) itself.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .layout import DispatchLayout, align

__all__ = [
    "dispatch_layout",
    "gather_rows",
    "interpreting",
    "quantize_packed",
    "quantize_rows",
    "scatter_rows",
    "weighted_combine",
]

TILE_ELEMENTS = 4096  # elements per program tile: several tokens per program when H is small
MAX_BLOCK_H = 1024  # columns per program: 2 KiB of bf16 per row, 8 warps of 128-bit loads
MAX_QUANT_BLOCK = 8192  # a whole row (H <= 8192 in the ops) stays in registers for amax + quantise


def interpreting() -> bool:
    """True when this module's kernels run in triton's CPU interpreter.

    `triton.jit` reads `TRITON_INTERPRET` when it decorates a function, so what counts is the
    environment when this module was imported (or reloaded), not the environment now.
    """
    return type(_combine_kernel).__name__ == "InterpretedFunction"


def _tiles(num_rows: int, hidden: int) -> tuple[int, int]:
    block_h = min(MAX_BLOCK_H, triton.next_power_of_2(max(hidden, 1)))
    block_r = min(max(1, TILE_ELEMENTS // block_h), triton.next_power_of_2(max(num_rows, 1)))
    return block_r, block_h


# ---------------------------------------------------------------------------------------------
# weighted combine
# ---------------------------------------------------------------------------------------------


@triton.jit
def _combine_kernel(
    rows_ptr,
    rows_stride,
    pos_ptr,
    pos_stride_t,
    pos_stride_k,
    w_ptr,
    w_stride_t,
    w_stride_k,
    shared_ptr,
    shared_stride_s,
    shared_stride_t,
    extra_ptr,
    extra_stride,
    out_ptr,
    out_stride,
    num_tokens,
    hidden,
    TOP_K: tl.constexpr,
    NUM_SHARED: tl.constexpr,
    HAS_EXTRA: tl.constexpr,
    CAST_OUT: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    col = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    tok_mask = tok < num_tokens
    mask = tok_mask[:, None] & (col < hidden)[None, :]
    tok = tok.to(tl.int64)
    acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
    # k ascending, unrolled: the K row loads of a tile are independent and all in flight at once.
    for k in tl.static_range(TOP_K):
        p = tl.load(pos_ptr + tok * pos_stride_t + k * pos_stride_k, mask=tok_mask, other=0).to(tl.int64)
        w = tl.load(w_ptr + tok * w_stride_t + k * w_stride_k, mask=tok_mask, other=0.0)
        r = tl.load(rows_ptr + p[:, None] * rows_stride + col[None, :], mask=mask, other=0.0)
        acc = acc + w[:, None] * r.to(tl.float32)  # two roundings: launched without FMA contraction
    for s in tl.static_range(NUM_SHARED):
        p = tl.load(shared_ptr + s * shared_stride_s + tok * shared_stride_t, mask=tok_mask, other=0).to(tl.int64)
        acc = acc + tl.load(rows_ptr + p[:, None] * rows_stride + col[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_EXTRA:
        acc = acc + tl.load(extra_ptr + tok[:, None] * extra_stride + col[None, :], mask=mask, other=0.0).to(tl.float32)
    dst = out_ptr + tok[:, None] * out_stride + col[None, :]
    if CAST_OUT:
        tl.store(dst, acc.to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)
    else:
        tl.store(dst, acc, mask=mask)


def combine_accumulate(
    rows: Tensor,
    positions: Tensor,
    weights: Tensor,
    *,
    shared_positions: Tensor | None = None,
    extra: Tensor | None = None,
    out: Tensor,
) -> Tensor:
    """Run the combine kernel into `out`; an fp32 `out` receives the accumulator itself (no cast).

    Shapes and dtypes as `weighted_combine`; `out` may also be fp32.
    """
    num_tokens, hidden = out.shape
    if num_tokens == 0 or hidden == 0:
        return out
    for name, t in (("rows", rows), ("out", out), ("extra", extra)):
        if t is not None and t.stride(1) != 1:
            raise ValueError(f"{name} must have contiguous rows (stride(1) == 1), got strides {t.stride()}")
    block_t, block_h = _tiles(num_tokens, hidden)
    top_k = positions.shape[1]
    num_shared = 0 if shared_positions is None else shared_positions.shape[0]
    shared = positions if shared_positions is None else shared_positions  # any pointer when unused
    extra_t = out if extra is None else extra
    grid = (triton.cdiv(num_tokens, block_t), triton.cdiv(hidden, block_h))
    _combine_kernel[grid](
        rows,
        rows.stride(0),
        positions,
        positions.stride(0),
        positions.stride(1),
        weights,
        weights.stride(0),
        weights.stride(1),
        shared,
        shared.stride(0),
        shared.stride(1) if shared.dim() > 1 else 0,
        extra_t,
        extra_t.stride(0),
        out,
        out.stride(0),
        num_tokens,
        hidden,
        TOP_K=top_k,
        NUM_SHARED=num_shared,
        HAS_EXTRA=extra is not None,
        CAST_OUT=out.dtype != torch.float32,
        BLOCK_T=block_t,
        BLOCK_H=block_h,
        num_warps=8 if block_t * block_h >= 4096 else 4,
        enable_fp_fusion=False,
    )
    return out


def weighted_combine(
    rows: Tensor,
    positions: Tensor,
    weights: Tensor,
    *,
    shared_positions: Tensor | None = None,
    extra: Tensor | None = None,
    out: Tensor,
) -> Tensor:
    """`combine.weighted_combine` on the device: same arguments, same bits."""
    if interpreting() and out.dtype != torch.float32:
        # The interpreter truncates fp32 -> half casts: accumulate in fp32, round half to even with torch.
        acc = torch.empty(out.shape, dtype=torch.float32, device=out.device)
        combine_accumulate(rows, positions, weights, shared_positions=shared_positions, extra=extra, out=acc)
        return out.copy_(acc)
    return combine_accumulate(rows, positions, weights, shared_positions=shared_positions, extra=extra, out=out)


# ---------------------------------------------------------------------------------------------
# gather / scatter
# ---------------------------------------------------------------------------------------------


@triton.jit
def _copy_rows_kernel(
    src_ptr,
    src_stride,
    src_idx_ptr,
    dst_ptr,
    dst_stride,
    dst_idx_ptr,
    num_rows,
    hidden,
    SRC_INDEXED: tl.constexpr,
    DST_INDEXED: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    col = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    row_mask = row < num_rows
    mask = row_mask[:, None] & (col < hidden)[None, :]
    src_row = row.to(tl.int64)
    dst_row = row.to(tl.int64)
    if SRC_INDEXED:
        src_row = tl.load(src_idx_ptr + row, mask=row_mask, other=0).to(tl.int64)
    if DST_INDEXED:
        dst_row = tl.load(dst_idx_ptr + row, mask=row_mask, other=0).to(tl.int64)
    values = tl.load(src_ptr + src_row[:, None] * src_stride + col[None, :], mask=mask)
    tl.store(dst_ptr + dst_row[:, None] * dst_stride + col[None, :], values, mask=mask)


def _copy_rows(src: Tensor, src_index: Tensor | None, dst: Tensor, dst_index: Tensor | None, num_rows: int) -> None:
    hidden = src.shape[1]
    if num_rows == 0 or hidden == 0:
        return
    for name, t in (("src", src), ("out", dst)):
        if t.stride(1) != 1:
            raise ValueError(f"{name} must have contiguous rows (stride(1) == 1), got strides {t.stride()}")
    block_r, block_h = _tiles(num_rows, hidden)
    grid = (triton.cdiv(num_rows, block_r), triton.cdiv(hidden, block_h))
    _copy_rows_kernel[grid](
        src,
        src.stride(0),
        src if src_index is None else src_index,
        dst,
        dst.stride(0),
        dst if dst_index is None else dst_index,
        num_rows,
        hidden,
        SRC_INDEXED=src_index is not None,
        DST_INDEXED=dst_index is not None,
        BLOCK_R=block_r,
        BLOCK_H=block_h,
        num_warps=8 if block_r * block_h >= 4096 else 4,
    )


def gather_rows(src: Tensor, index: Tensor, out: Tensor | None = None) -> Tensor:
    """`permute.gather_rows` on the device: `out[i] = src[index[i]]`."""
    if out is None:
        out = torch.empty(index.shape[0], src.shape[1], dtype=src.dtype, device=src.device)
    _copy_rows(src, index, out, None, index.shape[0])
    return out


def scatter_rows(src: Tensor, index: Tensor, out: Tensor) -> Tensor:
    """`permute.scatter_rows` on the device: `out[index[i]] = src[i]`, other rows untouched."""
    _copy_rows(src, None, out, index, index.shape[0])
    return out


# ---------------------------------------------------------------------------------------------
# quantisation
# ---------------------------------------------------------------------------------------------


@triton.jit
def _load_scaled(
    src_ptr, src_row, src_stride, smooth_ptr, smooth_row, smooth_stride, col, mask, HAS_SMOOTH: tl.constexpr
):
    x = tl.load(src_ptr + src_row[:, None] * src_stride + col[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_SMOOTH:
        x = x * tl.load(smooth_ptr + smooth_row[:, None] * smooth_stride + col[None, :], mask=mask, other=0.0)
    return x


@triton.jit
def _quant_kernel(
    src_ptr,
    src_stride,
    src_idx_ptr,
    smooth_ptr,
    smooth_stride,
    smooth_idx_ptr,
    q_ptr,
    q_stride,
    scale_ptr,
    scale_stride,
    scale_byte,
    num_rows,
    hidden,
    HAS_INDEX: tl.constexpr,
    HAS_SMOOTH: tl.constexpr,
    HAS_SMOOTH_INDEX: tl.constexpr,
    PACKED: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr,
    NUM_CHUNKS: tl.constexpr,
):
    row = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = row < num_rows
    row = row.to(tl.int64)
    src_row = row
    smooth_row = row
    if HAS_INDEX:
        src_row = tl.load(src_idx_ptr + row, mask=row_mask, other=0).to(tl.int64)
    if HAS_SMOOTH_INDEX:
        smooth_row = tl.load(smooth_idx_ptr + row, mask=row_mask, other=0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    amax = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for c in tl.static_range(NUM_CHUNKS):  # one chunk (the usual case): the row is read once
        col = c * BLOCK_H + cols
        mask = row_mask[:, None] & (col < hidden)[None, :]
        x = _load_scaled(src_ptr, src_row, src_stride, smooth_ptr, smooth_row, smooth_stride, col, mask, HAS_SMOOTH)
        amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
    is_zero = amax == 0.0
    d = tl.where(is_zero, 1.0, tl.div_rn(tl.full((BLOCK_R,), 127.0, tl.float32), tl.where(is_zero, 1.0, amax)))
    scale = tl.where(is_zero, 0.0, tl.div_rn(tl.full((BLOCK_R,), 1.0, tl.float32), d))
    for c in tl.static_range(NUM_CHUNKS):
        col = c * BLOCK_H + cols
        mask = row_mask[:, None] & (col < hidden)[None, :]
        if NUM_CHUNKS > 1:
            x = _load_scaled(src_ptr, src_row, src_stride, smooth_ptr, smooth_row, smooth_stride, col, mask, HAS_SMOOTH)
        v = x * d[:, None]
        v = (v + 12582912.0) - 12582912.0  # round half to even: 1.5 * 2**23 pushes the fraction out
        v = tl.minimum(tl.maximum(v, -128.0), 127.0)
        tl.store(q_ptr + row[:, None] * q_stride + col[None, :], v.to(tl.int8), mask=mask)
    if PACKED:
        # the fp32 scale's four bytes (little-endian) at byte `scale_byte` of the staging row
        bits = scale.to(tl.int32, bitcast=True)
        for b in tl.static_range(4):
            byte = ((bits >> (8 * b)) & 255).to(tl.int8)
            tl.store(q_ptr + row * q_stride + scale_byte + b, byte, mask=row_mask)
    else:
        tl.store(scale_ptr + row * scale_stride, scale, mask=row_mask)


def _quantize(
    src: Tensor,
    index: Tensor | None,
    smooth: Tensor | None,
    smooth_index: Tensor | None,
    q: Tensor,
    scale: Tensor | None,
    scale_byte: int,
) -> None:
    num_rows = q.shape[0]
    hidden = src.shape[1]
    if num_rows == 0:
        return
    block_h = min(MAX_QUANT_BLOCK, triton.next_power_of_2(max(hidden, 1)))
    block_r = min(max(1, 2048 // block_h), triton.next_power_of_2(num_rows))
    chunks = triton.cdiv(hidden, block_h)
    grid = (triton.cdiv(num_rows, block_r),)
    _quant_kernel[grid](
        src,
        src.stride(0),
        src if index is None else index,
        src if smooth is None else smooth,
        0 if smooth is None else smooth.stride(0),
        src if smooth_index is None else smooth_index,
        q,
        q.stride(0),
        q if scale is None else scale,
        0 if scale is None else scale.stride(0),
        scale_byte,
        num_rows,
        hidden,
        HAS_INDEX=index is not None,
        HAS_SMOOTH=smooth is not None,
        HAS_SMOOTH_INDEX=smooth_index is not None,
        PACKED=scale is None,
        BLOCK_R=block_r,
        BLOCK_H=block_h,
        NUM_CHUNKS=chunks,
        num_warps=8 if block_r * block_h >= 4096 else 4,
        enable_fp_fusion=False,
    )


def quantize_rows(rows: Tensor, smooth: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """`quant.quantize_rows` on the device: `(N, H)` int8 and `(N,)` fp32 scales in one pass."""
    q = torch.empty(rows.shape, dtype=torch.int8, device=rows.device)
    scale = torch.empty(rows.shape[0], dtype=torch.float32, device=rows.device)
    _quantize(rows, None, smooth, None, q, scale, 0)
    return q, scale


def quantize_packed(
    x: Tensor, index: Tensor | None, out: Tensor, *, scales: Tensor | None = None, scale_rows: Tensor | None = None
) -> Tensor:
    """`quant.quantize_packed` on the device: gather, smooth, quantise and pack, one read of each row."""
    hidden = x.shape[1]
    _quantize(x, index, scales, scale_rows if scales is not None else None, out, None, align(hidden, 32))
    return out


# ---------------------------------------------------------------------------------------------
# dispatch layout
# ---------------------------------------------------------------------------------------------


@triton.jit
def _layout_count_kernel(
    ids_ptr, num_entries, num_active_entries, hist_all_ptr, hist_active_ptr, BLOCK: tl.constexpr, E_PAD: tl.constexpr
):
    entry = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    expert = tl.load(ids_ptr + entry, mask=entry < num_entries, other=-1).to(tl.int32)
    bins = tl.arange(0, E_PAD)
    hit = (expert[:, None] == bins[None, :]).to(tl.int32)  # (BLOCK, E_PAD) one-hot; padding hits nothing
    all_counts = tl.sum(hit, axis=0)
    active_counts = tl.sum(tl.where((entry < num_active_entries)[:, None], hit, 0), axis=0)
    tl.store(hist_all_ptr + tl.program_id(0) * E_PAD + bins, all_counts)
    tl.store(hist_active_ptr + tl.program_id(0) * E_PAD + bins, active_counts)


@triton.jit
def _layout_place_kernel(
    ids_ptr,
    num_entries,
    num_active_entries,
    top_k,
    hist_all_ptr,
    hist_active_ptr,
    num_blocks,
    expand_idx_ptr,
    send_token_ptr,
    send_scale_ptr,
    send_counts_ptr,
    expert_counts_ptr,
    num_experts,
    num_active,
    num_shared_rows,
    shared_num,
    shared_rank_num,
    world,
    rank,
    local,
    max_local,
    BLOCK: tl.constexpr,
    E_PAD: tl.constexpr,
    COUNTS_PAD: tl.constexpr,
    HIST_ROWS: tl.constexpr,
):
    pid = tl.program_id(0)
    lane = tl.arange(0, BLOCK)
    entry = pid * BLOCK + lane
    in_range = entry < num_entries
    expert = tl.load(ids_ptr + entry, mask=in_range, other=-1).to(tl.int32)
    # Each program sums the block histograms itself, HIST_ROWS blocks per load: the entries of every
    # earlier block per expert (exclusive prefix), and every block's active entries (the totals). No
    # launch between the two kernels, no host read.
    bins = tl.arange(0, E_PAD)
    hist_rows = tl.arange(0, HIST_ROWS)
    prefix = tl.zeros((E_PAD,), dtype=tl.int32)
    totals = tl.zeros((E_PAD,), dtype=tl.int32)
    for first in range(0, num_blocks, HIST_ROWS):
        b = first + hist_rows
        cell = b[:, None] * E_PAD + bins[None, :]
        prefix += tl.sum(tl.load(hist_all_ptr + cell, mask=(b < pid)[:, None], other=0), axis=0)
        totals += tl.sum(tl.load(hist_active_ptr + cell, mask=(b < num_blocks)[:, None], other=0), axis=0)
    is_expert = expert[:, None] == bins[None, :]  # (BLOCK, E_PAD) one-hot: a gather from registers
    # stable slot: entries of its expert in earlier blocks, then in earlier lanes of this block
    before = tl.sum(tl.where(is_expert, prefix[None, :], 0), axis=1)
    same_earlier = (expert[:, None] == expert[None, :]) & (lane[None, :] < lane[:, None])
    slot = before + tl.sum(same_earlier.to(tl.int32), axis=1)
    tl.store(expand_idx_ptr + entry, slot, mask=in_range)
    # send position of an active entry: shared block, then the rows of every smaller expert, then its slot
    start = tl.sum(tl.where(bins[None, :] < expert[:, None], totals[None, :], 0), axis=1)
    active = entry < num_active_entries
    pos = (num_shared_rows + start + slot).to(tl.int64)
    tl.store(send_token_ptr + pos, (entry // top_k).to(tl.int64), mask=active)
    tl.store(send_scale_ptr + pos, (expert + shared_num).to(tl.int64), mask=active)
    # shared block: row s * n + t carries token t to shared expert s
    for first in range(pid * BLOCK, num_shared_rows, tl.num_programs(0) * BLOCK):
        j = first + lane
        tl.store(send_token_ptr + j, (j % num_active).to(tl.int64), mask=j < num_shared_rows)
        tl.store(send_scale_ptr + j, (j // num_active).to(tl.int64), mask=j < num_shared_rows)
    if pid == 0:
        tl.store(expert_counts_ptr + bins, totals.to(tl.int64), mask=bins < num_experts)
        cell = tl.arange(0, COUNTS_PAD)
        dest = cell // max_local
        slot_l = cell % max_local
        routed = (dest >= shared_rank_num) & (slot_l < local) & (cell < world * max_local)
        tl.debug_barrier()  # the expert counts just stored are visible to every thread of this program
        value = tl.load(expert_counts_ptr + (dest - shared_rank_num) * local + slot_l, mask=routed, other=0)
        if shared_rank_num > 0:
            replicas = shared_rank_num // shared_num
            is_shared_dest = (dest < shared_rank_num) & (slot_l == 0) & (dest % replicas == rank % replicas)
            value = tl.where(is_shared_dest, num_active, value)
        tl.store(send_counts_ptr + cell, value, mask=cell < world * max_local)


def dispatch_layout(
    expert_ids: Tensor,
    *,
    num_active: int,
    ep_world_size: int,
    ep_rank_id: int,
    moe_expert_num: int,
    shared_expert_num: int,
    shared_expert_rank_num: int,
) -> DispatchLayout:
    """`layout.dispatch_layout` on the device: two kernel launches, no host read.

    Every output length is a host integer (`num_active`, the shapes), so `DispatchLayout.num_rows`
    (`send_token.numel()`) never waits for the device.
    """
    device = expert_ids.device
    ids = expert_ids.contiguous()
    batch, top_k = ids.shape
    num_moe_ranks = ep_world_size - shared_expert_rank_num
    local = moe_expert_num // num_moe_ranks
    max_local = max(local, 1)
    num_shared_rows = num_active * shared_expert_num if shared_expert_rank_num > 0 else 0
    num_entries = batch * top_k
    num_rows = num_shared_rows + num_active * top_k

    e_pad = triton.next_power_of_2(max(moe_expert_num, 1))
    block = max(16, min(128, 16384 // e_pad))  # (BLOCK, E_PAD) one-hot tiles of at most 16 Ki elements
    num_blocks = max(1, triton.cdiv(num_entries, block))
    hist_all = torch.empty(num_blocks, e_pad, dtype=torch.int32, device=device)
    hist_active = torch.empty_like(hist_all)
    _layout_count_kernel[(num_blocks,)](
        ids, num_entries, num_active * top_k, hist_all, hist_active, BLOCK=block, E_PAD=e_pad, num_warps=4
    )

    expand_idx = torch.empty(num_entries, dtype=torch.int32, device=device)
    send_token = torch.empty(num_rows, dtype=torch.int64, device=device)
    send_scale_row = torch.empty(num_rows, dtype=torch.int64, device=device)
    send_counts = torch.empty(ep_world_size, max_local, dtype=torch.int64, device=device)
    expert_counts = torch.empty(moe_expert_num, dtype=torch.int64, device=device)
    _layout_place_kernel[(num_blocks,)](
        ids,
        num_entries,
        num_active * top_k,
        top_k,
        hist_all,
        hist_active,
        num_blocks,
        expand_idx,
        send_token,
        send_scale_row,
        send_counts,
        expert_counts,
        moe_expert_num,
        num_active,
        num_shared_rows,
        shared_expert_num,
        shared_expert_rank_num,
        ep_world_size,
        ep_rank_id,
        local,
        max_local,
        BLOCK=block,
        E_PAD=e_pad,
        COUNTS_PAD=triton.next_power_of_2(ep_world_size * max_local),
        HIST_ROWS=max(1, min(triton.next_power_of_2(num_blocks), 8192 // e_pad)),
        num_warps=4,
    )
    return DispatchLayout(
        send_token=send_token,
        send_scale_row=send_scale_row,
        send_counts=send_counts,
        expand_idx=expand_idx,
        expert_counts=expert_counts,
        num_shared_rows=num_shared_rows,
    )
