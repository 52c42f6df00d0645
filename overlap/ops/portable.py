"""The four split MoE ops, portable: the same semantics as torch_npu, over torch.distributed.

Owns: the ops' bodies off an Ascend device — validate (all of it, before communicating), lay out
with `overlap.kernels`, stage a private send buffer, start the exchange (`transport.start`), and on
the teardown wait and post-process. Never talks to torch_npu; never blocks in a setup.

Algorithm (W ranks, one rank's view)::

    dispatch_setup:    layout = dispatch_layout(expert_ids)            # send order + counts
                       rows = x[layout.send_token]  (quant 2: int8 + scale per row)
                       y = staging copy of rows; start(rows, counts)   # returns at once
    dispatch_teardown: recv, counts[src, e] = wait()
                       expand_x = recv re-blocked (src, e) -> (e, src)  # rows by expert, src, token
                       assist_info = cumsum(counts[e, src]); expert_token_nums = Σ_src counts
    combine_setup:     rows = expand_x re-blocked (e, src) -> (src, e); start(rows)  # at once
    combine_teardown:  back = wait()                                   # in dispatch's send order
                       x_out[t] = Σ_k w[t,k]·back[pos(t,k)] + Σ_s back[shared(s,t)] (+ shared_expert_x)

On a device (`staging.defers_host_reads`) a setup reads no tensor values on the host, which would
wait for the device's queue: the layout is computed with fixed shapes (rows not sent sort last),
the checks on values become device flags, and the rows per peer stay on the device; the transport's
thread resolves both before the exchange's header goes out (`staging.py`). On cpu the setups check
and lay out eagerly, as before.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .. import kernels  # type: ignore[attr-defined]  # kernels/ ships as overlap.kernels (package-dir)
from ..kernels.layout import align
from ..kernels.quant import quantized_row_bytes
from . import context, staging, transport
from .params import HALF_TYPES, MoeCommParams, check_tensor

INT_TYPES = (torch.int32, torch.int64)


def _row_bytes(hidden: int, dtype: torch.dtype, quant_mode: int) -> int:
    """Bytes of one staging row of y: `Align256(H)` elements, or the quantised row."""
    return quantized_row_bytes(hidden) if quant_mode == 2 else align(hidden, 256) * dtype.itemsize


def _header(op: str, params: MoeCommParams, batch: int, hidden: int, row_bytes: int, dtype: torch.dtype) -> Tensor:
    values = {name: getattr(params, name) for name in transport.PARAM_FIELDS if hasattr(params, name)}
    values.update(hidden=hidden, row_bytes=row_bytes, dtype=transport.DTYPE_CODES.get(dtype, 0))
    return transport.make_header(op, values, batch, max(params.num_moe_local_experts, 1))


def _host_record(numel: int) -> Tensor:
    """A setup's `comm_cmd_info`: `(numel,)` int32 in host memory, whatever the tokens' device. It is
    an opaque record (torch_npu's shape); keeping it on the host lets a teardown read the ticket
    inside it without a device read."""
    return torch.zeros(numel, dtype=torch.int32)


def _as_bytes(rows: Tensor) -> Tensor:
    """`(N, C)` contiguous rows viewed as `(N, C·itemsize)` uint8."""
    return rows.contiguous().view(torch.uint8).view(rows.shape[0], rows.shape[1] * rows.element_size())


def _wide(rows: Tensor) -> Tensor:
    """`(N, B)` uint8 rows viewed as the widest integer words that divide B and their offset (the
    same bytes): row gathers and scatters move whole words (a uint8 `index_copy_` moved 2 KiB rows
    about 7x slower than an int64 one)."""
    for dtype in (torch.int64, torch.int32, torch.int16):
        size = dtype.itemsize
        if rows.shape[1] % size == 0 and rows.storage_offset() % size == 0 and rows.stride(1) == 1:
            if rows.shape[0] <= 1 or rows.stride(0) % size == 0:
                return rows.view(dtype)
    return rows


def _label(op: str) -> str:
    return context.current_label(op)  # the pipeline names the microbatch it is running, if any


# --------------------------------------------------------------------------------------------
# dispatch
# --------------------------------------------------------------------------------------------


def dispatch_setup(
    x: Tensor,
    expert_ids: Tensor,
    group_ep: str,
    ep_world_size: int,
    ep_rank_id: int,
    moe_expert_num: int,
    *,
    scales: Tensor | None = None,
    x_active_mask: Tensor | None = None,
    expert_shard_type: int = 0,
    shared_expert_num: int = 1,
    shared_expert_rank_num: int = 0,
    quant_mode: int = 0,
    global_bs: int = 0,
    comm_type: int = 0,
    comm_alg: str = "",
    y_dtype: torch.dtype | int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    params = MoeCommParams(
        group_ep,
        ep_world_size,
        ep_rank_id,
        moe_expert_num,
        expert_shard_type=expert_shard_type,
        shared_expert_num=shared_expert_num,
        shared_expert_rank_num=shared_expert_rank_num,
        global_bs=global_bs,
        quant_mode=quant_mode,
        comm_type=comm_type,
        comm_alg=comm_alg,
    )
    x = check_tensor("x", x, shape=(None, None), dtypes=HALF_TYPES)
    batch, hidden = x.shape
    top_k = expert_ids.shape[1] if isinstance(expert_ids, Tensor) and expert_ids.dim() == 2 else 0
    check_tensor("expert_ids", expert_ids, shape=(batch, None), dtypes=INT_TYPES)
    params.check_batch(batch, top_k, hidden)
    deferred = staging.defers_host_reads(x)
    if deferred:
        if x_active_mask is not None:
            check_tensor("x_active_mask", x_active_mask, shape=(batch,), dtypes=(torch.bool,))
        num_active = batch  # not known on the host: rows of inactive tokens sort last and are not sent
    else:
        num_active = params.check_active_mask(x_active_mask, batch)
        params.check_expert_ids(expert_ids, batch, num_active)
    if scales is not None:
        if quant_mode != 2:
            raise ValueError(f"scales must be None unless quant_mode = 2, got scales with quant_mode = {quant_mode}")
        check_tensor(
            "scales",
            scales,
            shape=(shared_expert_num + moe_expert_num, hidden),
            dtypes=(torch.float32,),
            rule="(shared_expert_num + moe_expert_num, H)",
        )
    y_type = torch.int8 if quant_mode == 2 else x.dtype
    if y_dtype is not None and y_dtype != y_type:
        raise ValueError(
            f"y_dtype must be None or {y_type} for quant_mode = {quant_mode} on the portable path, got {y_dtype!r}"
        )
    group = transport.resolve_group(group_ep, ep_world_size, ep_rank_id)
    if deferred:
        return _dispatch_setup_deferred(x, expert_ids, x_active_mask, scales, params, group, group_ep)

    layout = kernels.dispatch_layout(
        expert_ids,
        num_active=num_active,
        ep_world_size=ep_world_size,
        ep_rank_id=ep_rank_id,
        moe_expert_num=moe_expert_num,
        shared_expert_num=shared_expert_num,
        shared_expert_rank_num=shared_expert_rank_num,
    )
    num_rows = layout.num_rows
    row_bytes = _row_bytes(hidden, x.dtype, quant_mode)
    num_staged = batch * (top_k + shared_expert_num)
    if quant_mode == 2:
        y = torch.zeros(num_staged, row_bytes, dtype=torch.int8, device=x.device)
        smooth = scales.index_select(0, layout.send_scale_row) if scales is not None else None
        q, scale = kernels.quantize_rows(kernels.gather_rows(x, layout.send_token), smooth)
        kernels.pack_quantized(q, scale, y[:num_rows])
    else:
        y = torch.zeros(num_staged, align(hidden, 256), dtype=x.dtype, device=x.device)
        kernels.gather_rows(x, layout.send_token, out=y[:num_rows, :hidden])
    # The transfer owns a private copy: whatever the caller does to x or y, the send is unchanged.
    send_buf = _as_bytes(y[:num_rows]).clone()
    send_rows = layout.send_counts.sum(dim=1).tolist()

    local = params.num_local_experts
    comm_cmd_info = _host_record((num_staged + ep_world_size * local) * 16)
    handle = transport.start(
        "dispatch",
        group,
        group_ep,
        send_buf=send_buf,
        send_rows=send_rows,
        block_counts=layout.send_counts,
        header=_header("dispatch", params, batch, hidden, row_bytes, x.dtype),
        label=_label("dispatch"),
    )
    transport.write_ticket(comm_cmd_info, handle)
    return y, layout.expand_idx, comm_cmd_info


def dispatch_teardown(
    x: Tensor,
    y: Tensor,
    expert_ids: Tensor,
    comm_cmd_info: Tensor,
    group_ep: str,
    ep_world_size: int,
    ep_rank_id: int,
    moe_expert_num: int,
    *,
    expert_shard_type: int = 0,
    shared_expert_num: int = 1,
    shared_expert_rank_num: int = 0,
    quant_mode: int = 0,
    global_bs: int = 0,
    expert_token_nums_type: int = 1,
    comm_type: int = 0,
    comm_alg: str = "",
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    params = MoeCommParams(
        group_ep,
        ep_world_size,
        ep_rank_id,
        moe_expert_num,
        expert_shard_type=expert_shard_type,
        shared_expert_num=shared_expert_num,
        shared_expert_rank_num=shared_expert_rank_num,
        global_bs=global_bs,
        quant_mode=quant_mode,
        comm_type=comm_type,
        comm_alg=comm_alg,
    )
    x = check_tensor("x", x, shape=(None, None), dtypes=HALF_TYPES)
    batch, hidden = x.shape
    check_tensor("expert_ids", expert_ids, shape=(batch, None), dtypes=INT_TYPES)
    top_k = expert_ids.shape[1]
    params.check_batch(batch, top_k, hidden)
    if expert_token_nums_type not in (0, 1):
        raise ValueError(f"expert_token_nums_type must be 0 (cumulative) or 1 (counts), got {expert_token_nums_type}")
    row_width = quantized_row_bytes(hidden) if quant_mode == 2 else align(hidden, 256)
    check_tensor(
        "y",
        y,
        shape=(batch * (top_k + shared_expert_num), row_width),
        dtypes=(torch.int8,) if quant_mode == 2 else (x.dtype,),
        rule="(BS * (K + shared_expert_num), row)",
    )
    check_tensor("comm_cmd_info", comm_cmd_info, shape=(None,), dtypes=(torch.int32,))

    handle = transport.claim(comm_cmd_info, "dispatch", group_ep)
    chunks, counts = handle.take_chunks(transport.teardown_timeout())  # maybe views of the window
    local = params.num_local_experts
    counts = counts[:, :local]  # (W, L): rows per (source rank, local expert)
    capacity = params.capacity(batch, top_k)
    total = int(counts.sum())
    if total > capacity:
        raise ValueError(
            f"received {total} rows but A = {capacity}: global_bs = {global_bs} is too small for the "
            f"largest BS of the group (global_bs must be max_bs * ep_world_size)"
        )
    order = _to_device(kernels.block_transpose_index(counts), chunks[0].device)  # (src, e) blocks -> (e, src) blocks
    if len(chunks) == 1:
        rows = _wide(chunks[0]).index_select(0, order)
    else:  # the same gather, from the source ranks' chunks: rows[inverse[j]] = recv[j]
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        wide = [_wide(chunk) for chunk in chunks]
        rows = torch.empty(order.numel(), wide[0].shape[1], dtype=wide[0].dtype, device=chunks[0].device)
        start = 0
        for chunk in wide:
            rows.index_copy_(0, inverse[start : start + chunk.shape[0]], chunk)
            start += chunk.shape[0]
    rows = rows.view(torch.uint8)
    del chunks
    handle.release()  # a copy was taken: the carrier may reuse its window slot
    dynamic_scales = torch.zeros(capacity, dtype=torch.float32, device=x.device)
    if quant_mode == 2:
        expand_x = torch.zeros(capacity, hidden, dtype=torch.int8, device=x.device)
        q, scale = kernels.unpack_quantized(rows.view(torch.int8), hidden)
        expand_x[:total] = q
        dynamic_scales[:total] = scale
    else:
        expand_x = torch.zeros(capacity, hidden, dtype=x.dtype, device=x.device)
        expand_x[:total] = rows.view(x.dtype)[:, :hidden]
    per_expert = _to_device(counts.t(), x.device)  # (L, W); the counts arrive on the host, the outputs live with x
    assist_info = kernels.assist_info_from_counts(per_expert, capacity)
    expert_token_nums = kernels.expert_token_nums_from_counts(per_expert, expert_token_nums_type)
    return expand_x, dynamic_scales, assist_info, expert_token_nums


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    """Host metadata `t` onto `device` without a host sync: a blocking host-to-device copy
    synchronises the stream, so on a device it goes through pinned memory, non-blocking (the
    pinned block is kept until the copy ran)."""
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return t.contiguous().pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _dispatch_checks(
    ids: Tensor, mask: Tensor | None, active: Tensor, moe_expert_num: int
) -> tuple[staging.DeferredCheck, ...]:
    """`check_active_mask` and `check_expert_ids` as device flags (their messages, built later).

    Args:
        ids: `(BS, K)` int64 expert ids. mask: the caller's `(BS,)` bool mask or None.
        active: `(BS,)` bool, the tokens that take part (the mask, or all True).
    """
    checks = []
    if mask is not None:
        count = mask.sum()
        prefix = torch.arange(mask.shape[0], device=mask.device) < count
        checks.append(
            staging.DeferredCheck(
                (mask != prefix).any(),
                lambda: (
                    f"x_active_mask must be a True-prefix (all True before any False), got {int(count)} True values "
                    f"not all at the front"
                ),
            )
        )
    live = active[:, None].expand_as(ids)
    big = torch.iinfo(torch.int64).max
    low = torch.where(live, ids, big).amin() if ids.numel() else ids.new_zeros(())
    high = torch.where(live, ids, -big).amax() if ids.numel() else ids.new_zeros(())
    checks.append(
        staging.DeferredCheck(
            (low < 0) | (high >= moe_expert_num),
            lambda: (
                f"expert_ids values must be in [0, moe_expert_num = {moe_expert_num}), got "
                f"{int(low) if int(low) < 0 else int(high)}"
            ),
        )
    )
    if ids.shape[1] > 1 and ids.shape[0] > 0:
        ordered = ids.sort(dim=1).values
        dup = (ordered[:, 1:] == ordered[:, :-1]).any(dim=1) & active
        row = torch.argmax(dup.to(torch.int8))
        row_ids = ids.index_select(0, row.view(1))  # private copy of the offending row
        checks.append(
            staging.DeferredCheck(
                dup.any(),
                lambda: (
                    f"expert_ids must hold distinct experts within a row, got row {int(row)} = {row_ids[0].tolist()}"
                ),
            )
        )
    return tuple(checks)


def _expand_idx_deferred(ids: Tensor, moe_expert_num: int) -> Tensor:
    """`kernels.expand_idx_from_ids` with fixed shapes (no bincount): `(BS·K,)` int32.

    Out-of-range ids (only legal on inactive tokens) count in a spare bin instead of failing on
    the device."""
    flat = torch.where((ids >= 0) & (ids < moe_expert_num), ids, moe_expert_num).reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(moe_expert_num + 1, dtype=torch.int64, device=ids.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    starts = torch.cumsum(counts, 0) - counts
    slot_sorted = torch.arange(flat.numel(), device=ids.device) - starts[flat[order]]
    return torch.empty_like(flat).scatter_(0, order, slot_sorted).to(torch.int32)


def _dispatch_layout_deferred(
    ids: Tensor, active: Tensor, params: MoeCommParams
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`kernels.dispatch_layout` with shapes fixed by BS, K and the parameters alone.

    Every candidate row (each shared replica's copy of every token, each (token, k)) gets a slot;
    the rows that are sent come first, in `dispatch_layout`'s send order, the others after them.

    Args:
        ids: `(BS, K)` int64 expert ids. active: `(BS,)` bool, the tokens that take part.
        params: the op's parameters (W, rank, E, S_n, S_r).

    Returns:
        send_token `(C,)` int64, send_scale_row `(C,)` int64 (clamped into `scales`' rows),
        send_counts `(W, L_max)` int64, is_sent `(C,)` bool; C = BS·K (+ BS·S_n when S_r > 0).
    """
    device = ids.device
    batch, top_k = ids.shape
    moe_num, shared_num, shared_ranks = params.moe_expert_num, params.shared_expert_num, params.shared_expert_rank_num
    num_moe_ranks = params.ep_world_size - shared_ranks
    live = (ids >= 0) & (ids < moe_num) & active[:, None]
    key = torch.where(live, ids, moe_num).reshape(-1)  # moe_num: not sent, sorts last
    order = torch.argsort(key, stable=True)  # by expert, then token, as dispatch_layout
    routed_token = torch.div(order, top_k, rounding_mode="floor")
    routed_expert = key[order]
    expert_counts = torch.zeros(moe_num + 1, dtype=torch.int64, device=device)
    expert_counts.scatter_add_(0, key, torch.ones_like(key))
    send_counts = torch.zeros(params.ep_world_size, max(moe_num // num_moe_ranks, 1), dtype=torch.int64, device=device)
    send_counts[shared_ranks:] = expert_counts[:moe_num].view(num_moe_ranks, moe_num // num_moe_ranks)
    routed_scale = (routed_expert + shared_num).clamp(max=shared_num + moe_num - 1)
    if shared_ranks == 0:
        return routed_token, routed_scale, send_counts, routed_expert < moe_num
    replicas = shared_ranks // shared_num
    num_active = active.sum()
    for s in range(shared_num):
        send_counts[s * replicas + params.ep_rank_id % replicas, 0] = num_active
    tokens = torch.arange(batch, device=device)
    token = torch.cat([tokens.repeat(shared_num), routed_token])
    scale_row = torch.cat(
        [torch.arange(shared_num, device=device).view(-1, 1).expand(shared_num, batch).reshape(-1), routed_scale]
    )
    is_sent = torch.cat([active.repeat(shared_num), routed_expert < moe_num])
    perm = torch.argsort((~is_sent).to(torch.uint8), stable=True)  # sent rows first, order kept
    return token[perm], scale_row[perm], send_counts, is_sent[perm]


def _dispatch_setup_deferred(
    x: Tensor,
    expert_ids: Tensor,
    x_active_mask: Tensor | None,
    scales: Tensor | None,
    params: MoeCommParams,
    group: dist.ProcessGroup,
    group_ep: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """dispatch_setup on a device: no host read of any tensor's values (see the module)."""
    batch, hidden = x.shape
    top_k = expert_ids.shape[1]
    ids = expert_ids.to(torch.int64)
    active = x_active_mask if x_active_mask is not None else torch.ones(batch, dtype=torch.bool, device=x.device)
    checks = _dispatch_checks(ids, x_active_mask, active, params.moe_expert_num)
    send_token, send_scale_row, send_counts, is_sent = _dispatch_layout_deferred(ids, active, params)
    num_candidates = send_token.numel()
    row_bytes = _row_bytes(hidden, x.dtype, params.quant_mode)
    num_staged = batch * (top_k + params.shared_expert_num)
    if params.quant_mode == 2:
        y = torch.zeros(num_staged, row_bytes, dtype=torch.int8, device=x.device)
        smooth = scales.index_select(0, send_scale_row) if scales is not None else None
        q, scale = kernels.quantize_rows(kernels.gather_rows(x, send_token), smooth)
        kernels.pack_quantized(q, scale, y[:num_candidates])
    else:
        y = torch.zeros(num_staged, align(hidden, 256), dtype=x.dtype, device=x.device)
        kernels.gather_rows(x, send_token, out=y[:num_candidates, :hidden])
    y[:num_candidates].masked_fill_(~is_sent[:, None], 0)  # rows past those sent stay zero, as on the host
    send_buf = _as_bytes(y[:num_candidates]).clone()
    comm_cmd_info = _host_record((num_staged + params.ep_world_size * params.num_local_experts) * 16)
    handle = transport.start(
        "dispatch",
        group,
        group_ep,
        send_buf=send_buf,
        send_rows=None,
        block_counts=send_counts,
        header=_header("dispatch", params, batch, hidden, row_bytes, x.dtype),
        label=_label("dispatch"),
        checks=checks,
    )
    transport.write_ticket(comm_cmd_info, handle)
    return y, _expand_idx_deferred(ids, params.moe_expert_num), comm_cmd_info


# --------------------------------------------------------------------------------------------
# combine
# --------------------------------------------------------------------------------------------


def _assist_info_message(capacity: int, head: list[int]) -> str:
    return (
        "assist_info_for_combine must hold the non-decreasing cumulative counts that dispatch_teardown "
        f"returned (at most A = {capacity} rows), got {head}"
    )


def _assist_info_check(assist_info: Tensor, per_expert: Tensor, capacity: int) -> staging.DeferredCheck:
    head = assist_info[: per_expert.numel()].clone()  # private: the caller may reuse assist_info
    return staging.DeferredCheck(
        (per_expert < 0).any() | (per_expert.sum() > capacity), lambda: _assist_info_message(capacity, head.tolist())
    )


def _combine_rows_deferred(expand_x: Tensor, per_expert: Tensor, capacity: int) -> Tensor:
    """expand_x's rows re-blocked from (local expert, source) to (source, local expert) order, with
    fixed shapes: `(A + 1, Align256(H))`; rows past the received count (and a spare last row that
    takes the rows past it) are not sent.

    Args:
        expand_x: `(A, H)`. per_expert: `(L, W)` int64 rows per (local expert, source rank).
    """
    device = expand_x.device
    local, world = per_expert.shape
    counts = per_expert.clamp(min=0)
    flat = counts.reshape(-1)  # (e, src) blocks, as laid out in expand_x
    ends = torch.cumsum(flat, 0)
    rows = torch.arange(capacity, device=device)
    block = torch.searchsorted(ends, rows, right=True)  # the block each row of expand_x is in
    valid = block < flat.numel()
    block = block.clamp(max=flat.numel() - 1)
    within = rows - (ends - flat)[block]
    out_counts = counts.t().reshape(-1)  # (src, e) blocks, the send order
    out_start = torch.cumsum(out_counts, 0) - out_counts
    expert, source = torch.div(block, world, rounding_mode="floor"), block % world
    position = torch.where(valid, out_start[source * local + expert] + within, capacity)
    send = torch.zeros(capacity + 1, align(expand_x.shape[1], 256), dtype=expand_x.dtype, device=device)
    send[:, : expand_x.shape[1]].index_copy_(0, position, expand_x)  # private: expand_x may be reused at once
    send[capacity].zero_()  # the spare row took every row past the count
    return send


def _check_expand_x(params: MoeCommParams, expand_x: object, expert_ids: object) -> tuple[Tensor, int, int, int]:
    expand_x = check_tensor("expand_x", expand_x, shape=(None, None), dtypes=HALF_TYPES)
    ids = check_tensor("expert_ids", expert_ids, shape=(None, None), dtypes=INT_TYPES)
    batch, top_k = ids.shape
    hidden = expand_x.shape[1]
    params.check_batch(batch, top_k, hidden)
    capacity = params.capacity(batch, top_k)
    check_tensor(
        "expand_x",
        expand_x,
        shape=(capacity, hidden),
        rule="A = global_bs * min(L, K) on an MoE rank, "
        "global_bs * shared_expert_num / shared_expert_rank_num on a shared-expert rank",
    )
    return expand_x, batch, top_k, capacity


def _quant_expand_x_shape(capacity: int, hidden: int) -> tuple[int, int]:
    return capacity, align(align(hidden, 32) + align(hidden, 8) // 8 * 4, 512)


def combine_setup(
    expand_x: Tensor,
    expert_ids: Tensor,
    assist_info_for_combine: Tensor,
    group_ep: str,
    ep_world_size: int,
    ep_rank_id: int,
    moe_expert_num: int,
    *,
    expert_shard_type: int = 0,
    shared_expert_num: int = 1,
    shared_expert_rank_num: int = 0,
    global_bs: int = 0,
    comm_quant_mode: int = 0,
    comm_type: int = 0,
    comm_alg: str = "",
) -> tuple[Tensor, Tensor]:
    params = MoeCommParams(
        group_ep,
        ep_world_size,
        ep_rank_id,
        moe_expert_num,
        expert_shard_type=expert_shard_type,
        shared_expert_num=shared_expert_num,
        shared_expert_rank_num=shared_expert_rank_num,
        global_bs=global_bs,
        comm_quant_mode=comm_quant_mode,
        comm_type=comm_type,
        comm_alg=comm_alg,
    )
    expand_x, batch, top_k, capacity = _check_expand_x(params, expand_x, expert_ids)
    hidden = expand_x.shape[1]
    check_tensor(
        "assist_info_for_combine",
        assist_info_for_combine,
        shape=(capacity * 128,),
        dtypes=(torch.int32,),
        rule="A * 128",
    )
    local = params.num_local_experts
    per_expert = kernels.counts_from_assist_info(assist_info_for_combine, local, ep_world_size)  # (L, W)
    deferred = staging.defers_host_reads(expand_x)
    checks: tuple[staging.DeferredCheck, ...] = ()
    if deferred:
        checks = (_assist_info_check(assist_info_for_combine, per_expert, capacity),)
    elif bool((per_expert < 0).any()) or int(per_expert.sum()) > capacity:
        raise ValueError(_assist_info_message(capacity, assist_info_for_combine[: local * ep_world_size].tolist()))
    group = transport.resolve_group(group_ep, ep_world_size, ep_rank_id)

    row_bytes = align(hidden, 256) * expand_x.dtype.itemsize
    block_counts = torch.zeros(
        ep_world_size,
        max(params.num_moe_local_experts, 1),
        dtype=torch.int64,
        device=expand_x.device if deferred else "cpu",
    )
    block_counts[:, :local] = per_expert.t()
    if deferred:  # fixed shapes; the rows per peer are resolved from block_counts on the transport's thread
        send = _combine_rows_deferred(expand_x, per_expert, capacity)
        send_rows = None
    else:
        order = kernels.block_transpose_index(per_expert)  # (e, src) blocks -> (src, e) blocks
        send = torch.zeros(order.numel(), align(hidden, 256), dtype=expand_x.dtype, device=expand_x.device)
        kernels.gather_rows(expand_x, order, out=send[:, :hidden])  # private: expand_x may be reused at once
        send_rows = per_expert.sum(0).tolist()
    handle = transport.start(
        "combine",
        group,
        group_ep,
        send_buf=_as_bytes(send),
        send_rows=send_rows,
        block_counts=block_counts,
        checks=checks,
        header=_header("combine", params, batch, hidden, row_bytes, expand_x.dtype),
        label=_label("combine"),
    )
    quant_expand_x = torch.zeros(_quant_expand_x_shape(capacity, hidden), dtype=torch.int8, device=expand_x.device)
    comm_cmd_info = _host_record((capacity + ep_world_size) * 16)
    transport.write_ticket(comm_cmd_info, handle)
    return quant_expand_x, comm_cmd_info


def combine_teardown(
    expand_x: Tensor,
    quant_expand_x: Tensor,
    expert_ids: Tensor,
    expand_idx: Tensor,
    expert_scales: Tensor,
    comm_cmd_info: Tensor,
    group_ep: str,
    ep_world_size: int,
    ep_rank_id: int,
    moe_expert_num: int,
    *,
    x_active_mask: Tensor | None = None,
    shared_expert_x: Tensor | None = None,
    expert_shard_type: int = 0,
    shared_expert_num: int = 1,
    shared_expert_rank_num: int = 0,
    global_bs: int = 0,
    comm_quant_mode: int = 0,
    comm_type: int = 0,
    comm_alg: str = "",
) -> Tensor:
    params = MoeCommParams(
        group_ep,
        ep_world_size,
        ep_rank_id,
        moe_expert_num,
        expert_shard_type=expert_shard_type,
        shared_expert_num=shared_expert_num,
        shared_expert_rank_num=shared_expert_rank_num,
        global_bs=global_bs,
        comm_quant_mode=comm_quant_mode,
        comm_type=comm_type,
        comm_alg=comm_alg,
    )
    if shared_expert_x is not None and shared_expert_rank_num != 0:
        raise ValueError(
            f"shared_expert_x must be None when shared_expert_rank_num > 0 (shared experts live on "
            f"their own ranks), got shared_expert_rank_num = {shared_expert_rank_num}"
        )
    expand_x, batch, top_k, capacity = _check_expand_x(params, expand_x, expert_ids)
    hidden = expand_x.shape[1]
    check_tensor("quant_expand_x", quant_expand_x, shape=_quant_expand_x_shape(capacity, hidden), dtypes=(torch.int8,))
    check_tensor("expand_idx", expand_idx, shape=(batch * top_k,), dtypes=(torch.int32,), rule="BS * K")
    check_tensor("expert_scales", expert_scales, shape=(batch, top_k), dtypes=(torch.float32,), rule="(BS, K)")
    check_tensor("comm_cmd_info", comm_cmd_info, shape=(None,), dtypes=(torch.int32,))
    per_token = top_k + (shared_expert_num if shared_expert_rank_num > 0 else 0)  # rows each active token gets back
    num_active: int | None = None
    if staging.defers_host_reads(expand_x):
        # On a device, reading the mask's and the ids' values would wait for the device. dispatch_setup
        # checked them (deferred) and the same ones come back here; the rows received say how many
        # tokens were active. Shapes and dtypes are still checked.
        if x_active_mask is not None:
            check_tensor("x_active_mask", x_active_mask, shape=(batch,), dtypes=(torch.bool,))
        check_tensor("expert_ids", expert_ids, shape=(batch, None), dtypes=(torch.int32, torch.int64))
    else:
        num_active = params.check_active_mask(x_active_mask, batch)
        params.check_expert_ids(expert_ids, batch, num_active)
    if shared_expert_x is not None:
        check_tensor("shared_expert_x", shared_expert_x, shape=(batch, hidden), dtypes=(expand_x.dtype,))

    handle = transport.claim(comm_cmd_info, "combine", group_ep)
    recv, _ = handle.take(transport.teardown_timeout())
    if num_active is None:
        num_active = min(recv.shape[0] // per_token, batch)
    num_shared_rows = num_active * shared_expert_num if shared_expert_rank_num > 0 else 0
    expected = num_shared_rows + num_active * top_k
    if recv.shape[0] != expected:
        raise ValueError(
            f"combine_teardown received {recv.shape[0]} rows but x_active_mask / expert_ids describe "
            f"{expected}: pass the same expert_ids and x_active_mask as to dispatch_setup"
        )
    rows = recv.view(expand_x.dtype)[:, :hidden]
    positions = kernels.combine_positions(
        expert_ids, expand_idx, num_active=num_active, moe_expert_num=moe_expert_num, num_shared_rows=num_shared_rows
    )
    shared_positions = None
    if num_shared_rows:
        shared_positions = torch.arange(num_shared_rows, device=rows.device).view(shared_expert_num, num_active)
    x_out = torch.zeros(batch, hidden, dtype=expand_x.dtype, device=expand_x.device)
    kernels.weighted_combine(
        rows,
        positions,
        expert_scales[:num_active],
        shared_positions=shared_positions,
        extra=None if shared_expert_x is None else shared_expert_x[:num_active],
        out=x_out[:num_active],
    )
    del rows, recv
    handle.release()  # x_out holds the result: the carrier may reuse its buffer
    return x_out
