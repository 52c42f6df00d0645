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
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import kernels
from ..kernels.layout import align
from ..kernels.quant import quantized_row_bytes
from . import context, transport
from .params import HALF_TYPES, MoeCommParams, check_tensor

INT_TYPES = (torch.int32, torch.int64)


def _row_bytes(hidden: int, dtype: torch.dtype, quant_mode: int) -> int:
    """Bytes of one staging row of y: `Align256(H)` elements, or the quantised row."""
    return quantized_row_bytes(hidden) if quant_mode == 2 else align(hidden, 256) * dtype.itemsize


def _header(op: str, params: MoeCommParams, batch: int, hidden: int, row_bytes: int) -> Tensor:
    values = {name: getattr(params, name) for name in transport.PARAM_FIELDS if hasattr(params, name)}
    values.update(hidden=hidden, row_bytes=row_bytes)
    return transport.make_header(op, values, batch, max(params.num_moe_local_experts, 1))


def _as_bytes(rows: Tensor) -> Tensor:
    """`(N, C)` contiguous rows viewed as `(N, C·itemsize)` uint8."""
    return rows.contiguous().view(torch.uint8).view(rows.shape[0], rows.shape[1] * rows.element_size())


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
    params = MoeCommParams(group_ep, ep_world_size, ep_rank_id, moe_expert_num, expert_shard_type,
                           shared_expert_num, shared_expert_rank_num, global_bs, quant_mode, 0, comm_type, comm_alg)
    x = check_tensor("x", x, shape=(None, None), dtypes=HALF_TYPES)
    batch, hidden = x.shape
    top_k = expert_ids.shape[1] if isinstance(expert_ids, Tensor) and expert_ids.dim() == 2 else 0
    check_tensor("expert_ids", expert_ids, shape=(batch, None), dtypes=INT_TYPES)
    params.check_batch(batch, top_k, hidden)
    num_active = params.check_active_mask(x_active_mask, batch)
    params.check_expert_ids(expert_ids, batch, num_active)
    if scales is not None:
        if quant_mode != 2:
            raise ValueError(f"scales must be None unless quant_mode = 2, got scales with quant_mode = {quant_mode}")
        check_tensor("scales", scales, shape=(shared_expert_num + moe_expert_num, hidden), dtypes=(torch.float32,),
                     rule="(shared_expert_num + moe_expert_num, H)")
    y_type = torch.int8 if quant_mode == 2 else x.dtype
    if y_dtype is not None and y_dtype != y_type:
        raise ValueError(f"y_dtype must be None or {y_type} for quant_mode = {quant_mode} on the portable path, "
                         f"got {y_dtype!r}")
    group = transport.resolve_group(group_ep, ep_world_size, ep_rank_id)

    layout = kernels.dispatch_layout(expert_ids, num_active=num_active, ep_world_size=ep_world_size,
                                     ep_rank_id=ep_rank_id, moe_expert_num=moe_expert_num,
                                     shared_expert_num=shared_expert_num,
                                     shared_expert_rank_num=shared_expert_rank_num)
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
    comm_cmd_info = torch.zeros((num_staged + ep_world_size * local) * 16, dtype=torch.int32, device=x.device)
    handle = transport.start("dispatch", group, group_ep, send_buf=send_buf, send_rows=send_rows,
                             block_counts=layout.send_counts, header=_header("dispatch", params, batch, hidden,
                                                                             row_bytes), label=_label("dispatch"))
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
    params = MoeCommParams(group_ep, ep_world_size, ep_rank_id, moe_expert_num, expert_shard_type,
                           shared_expert_num, shared_expert_rank_num, global_bs, quant_mode, 0, comm_type, comm_alg)
    x = check_tensor("x", x, shape=(None, None), dtypes=HALF_TYPES)
    batch, hidden = x.shape
    check_tensor("expert_ids", expert_ids, shape=(batch, None), dtypes=INT_TYPES)
    top_k = expert_ids.shape[1]
    params.check_batch(batch, top_k, hidden)
    if expert_token_nums_type not in (0, 1):
        raise ValueError(f"expert_token_nums_type must be 0 (cumulative) or 1 (counts), got {expert_token_nums_type}")
    row_width = quantized_row_bytes(hidden) if quant_mode == 2 else align(hidden, 256)
    check_tensor("y", y, shape=(batch * (top_k + shared_expert_num), row_width),
                 dtypes=(torch.int8,) if quant_mode == 2 else (x.dtype,), rule="(BS * (K + shared_expert_num), row)")
    check_tensor("comm_cmd_info", comm_cmd_info, shape=(None,), dtypes=(torch.int32,))

    handle = transport.claim(comm_cmd_info, "dispatch")
    recv, counts = handle.take(transport.current_timeout())
    local = params.num_local_experts
    counts = counts[:, :local]  # (W, L): rows per (source rank, local expert)
    capacity = params.capacity(batch, top_k)
    total = int(counts.sum())
    if total > capacity:
        raise ValueError(f"received {total} rows but A = {capacity}: global_bs = {global_bs} is too small for the "
                         f"largest BS of the group (global_bs must be max_bs * ep_world_size)")
    order = kernels.block_transpose_index(counts).to(recv.device)  # (src, e) blocks -> (e, src) blocks
    rows = recv.index_select(0, order)
    dynamic_scales = torch.zeros(capacity, dtype=torch.float32, device=x.device)
    if quant_mode == 2:
        expand_x = torch.zeros(capacity, hidden, dtype=torch.int8, device=x.device)
        q, scale = kernels.unpack_quantized(rows.view(torch.int8), hidden)
        expand_x[:total] = q
        dynamic_scales[:total] = scale
    else:
        expand_x = torch.zeros(capacity, hidden, dtype=x.dtype, device=x.device)
        expand_x[:total] = rows.view(x.dtype)[:, :hidden]
    per_expert = counts.t()  # (L, W)
    assist_info = kernels.assist_info_from_counts(per_expert, capacity)
    expert_token_nums = kernels.expert_token_nums_from_counts(per_expert, expert_token_nums_type)
    return expand_x, dynamic_scales, assist_info, expert_token_nums


# --------------------------------------------------------------------------------------------
# combine
# --------------------------------------------------------------------------------------------


def _check_expand_x(params: MoeCommParams, expand_x: object, expert_ids: object) -> tuple[Tensor, int, int, int]:
    expand_x = check_tensor("expand_x", expand_x, shape=(None, None), dtypes=HALF_TYPES)
    ids = check_tensor("expert_ids", expert_ids, shape=(None, None), dtypes=INT_TYPES)
    batch, top_k = ids.shape
    hidden = expand_x.shape[1]
    params.check_batch(batch, top_k, hidden)
    capacity = params.capacity(batch, top_k)
    check_tensor("expand_x", expand_x, shape=(capacity, hidden), rule="A = global_bs * min(L, K) on an MoE rank, "
                 "global_bs * shared_expert_num / shared_expert_rank_num on a shared-expert rank")
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
    params = MoeCommParams(group_ep, ep_world_size, ep_rank_id, moe_expert_num, expert_shard_type,
                           shared_expert_num, shared_expert_rank_num, global_bs, 0, comm_quant_mode, comm_type, comm_alg)
    expand_x, batch, top_k, capacity = _check_expand_x(params, expand_x, expert_ids)
    hidden = expand_x.shape[1]
    check_tensor("assist_info_for_combine", assist_info_for_combine, shape=(capacity * 128,), dtypes=(torch.int32,),
                 rule="A * 128")
    local = params.num_local_experts
    per_expert = kernels.counts_from_assist_info(assist_info_for_combine, local, ep_world_size)  # (L, W)
    if bool((per_expert < 0).any()) or int(per_expert.sum()) > capacity:
        raise ValueError("assist_info_for_combine must hold the non-decreasing cumulative counts that "
                         f"dispatch_teardown returned (at most A = {capacity} rows), got {assist_info_for_combine[:local * ep_world_size].tolist()}")
    group = transport.resolve_group(group_ep, ep_world_size, ep_rank_id)

    order = kernels.block_transpose_index(per_expert)  # (e, src) blocks -> (src, e) blocks
    row_bytes = align(hidden, 256) * expand_x.dtype.itemsize
    send = torch.zeros(order.numel(), align(hidden, 256), dtype=expand_x.dtype, device=expand_x.device)
    kernels.gather_rows(expand_x, order, out=send[:, :hidden])  # private: expand_x may be reused at once
    block_counts = torch.zeros(ep_world_size, max(params.num_moe_local_experts, 1), dtype=torch.int64)
    block_counts[:, :local] = per_expert.t()
    handle = transport.start("combine", group, group_ep, send_buf=_as_bytes(send), send_rows=per_expert.sum(0).tolist(),
                             block_counts=block_counts,
                             header=_header("combine", params, batch, hidden, row_bytes), label=_label("combine"))
    quant_expand_x = torch.zeros(_quant_expand_x_shape(capacity, hidden), dtype=torch.int8, device=expand_x.device)
    comm_cmd_info = torch.zeros((capacity + ep_world_size) * 16, dtype=torch.int32, device=expand_x.device)
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
    params = MoeCommParams(group_ep, ep_world_size, ep_rank_id, moe_expert_num, expert_shard_type,
                           shared_expert_num, shared_expert_rank_num, global_bs, 0, comm_quant_mode, comm_type, comm_alg)
    if shared_expert_x is not None and shared_expert_rank_num != 0:
        raise ValueError(f"shared_expert_x must be None when shared_expert_rank_num > 0 (shared experts live on "
                         f"their own ranks), got shared_expert_rank_num = {shared_expert_rank_num}")
    expand_x, batch, top_k, capacity = _check_expand_x(params, expand_x, expert_ids)
    hidden = expand_x.shape[1]
    check_tensor("quant_expand_x", quant_expand_x, shape=_quant_expand_x_shape(capacity, hidden), dtypes=(torch.int8,))
    check_tensor("expand_idx", expand_idx, shape=(batch * top_k,), dtypes=(torch.int32,), rule="BS * K")
    check_tensor("expert_scales", expert_scales, shape=(batch, top_k), dtypes=(torch.float32,), rule="(BS, K)")
    check_tensor("comm_cmd_info", comm_cmd_info, shape=(None,), dtypes=(torch.int32,))
    num_active = params.check_active_mask(x_active_mask, batch)
    params.check_expert_ids(expert_ids, batch, num_active)
    if shared_expert_x is not None:
        check_tensor("shared_expert_x", shared_expert_x, shape=(batch, hidden), dtypes=(expand_x.dtype,))

    handle = transport.claim(comm_cmd_info, "combine")
    recv, _ = handle.take(transport.current_timeout())
    num_shared_rows = num_active * shared_expert_num if shared_expert_rank_num > 0 else 0
    expected = num_shared_rows + num_active * top_k
    if recv.shape[0] != expected:
        raise ValueError(f"combine_teardown received {recv.shape[0]} rows but x_active_mask / expert_ids describe "
                         f"{expected}: pass the same expert_ids and x_active_mask as to dispatch_setup")
    rows = recv.view(expand_x.dtype)[:, :hidden]
    positions = kernels.combine_positions(expert_ids, expand_idx, num_active=num_active,
                                          moe_expert_num=moe_expert_num, num_shared_rows=num_shared_rows)
    shared_positions = None
    if num_shared_rows:
        shared_positions = torch.arange(num_shared_rows, device=rows.device).view(shared_expert_num, num_active)
    x_out = torch.zeros(batch, hidden, dtype=expand_x.dtype, device=expand_x.device)
    kernels.weighted_combine(rows, positions, expert_scales[:num_active], shared_positions=shared_positions,
                             extra=None if shared_expert_x is None else shared_expert_x[:num_active],
                             out=x_out[:num_active])
    return x_out
