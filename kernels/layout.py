"""Routing layout of expert-parallel dispatch and combine.

Owns: turning `expert_ids` into the order rows are sent in, the per-(rank, local expert) counts
that travel with them, `expand_idx`, and the receiver-side `assist_info_for_combine` /
`expert_token_nums`. Never communicates and never validates user input.

Placement (`docs/ops.md`, "Who holds which expert"; shared ranks first): ranks `[0, S_r)` hold shared experts, shared
expert `s` on ranks `[s·R, (s+1)·R)` with `R = S_r / S_n`; routed expert `e` on rank
`S_r + e // L`, local index `e % L`. Token `t` of rank `r` goes to its K routed experts and, when
`S_r > 0`, to replica `s·R + r % R` of every shared expert `s`.

Send order on a source rank (also the order combine returns rows in)::

    [shared s=0: tokens 0..n) [shared s=1: ...] ... [expert 0: its tokens] [expert 1: ...] ...

Destination ranks ascend along it (shared ranks come first and `S_r + e // L` grows with `e`), so
each peer's rows are one contiguous chunk, ordered (local expert, token). A receiver re-blocks the
chunks it got from (source rank, local expert) to (local expert, source rank) order with
`block_transpose_index`; combine applies the inverse transpose on the way back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .backend import device_kernels


def align(value: int, multiple: int) -> int:
    """`AlignN(v) = ceil(v / N) · N`."""
    return -(-value // multiple) * multiple


def count_values(values: Tensor, length: int) -> Tensor:
    """`torch.bincount(values, minlength=length)` without its host read (CUDA's bincount syncs).

    Args:
        values: `(N,)` int64 in `[0, length)`.
        length: number of bins.

    Returns:
        `(length,)` int64.
    """
    return torch.zeros(length, dtype=torch.int64, device=values.device).index_add_(0, values, torch.ones_like(values))


def expand_idx_from_ids(expert_ids: Tensor, num_experts: int) -> Tensor:
    """For every flat entry `t·K + k`, how many earlier entries went to the same expert.

    Args:
        expert_ids: `(BS, K)` integer expert ids in `[0, num_experts)`.
        num_experts: number of routed experts.

    Returns:
        `(BS·K,)` int32: the entry's slot in the block its expert receives from this rank.
    """
    flat = expert_ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    counts = count_values(flat, num_experts)
    starts = torch.cumsum(counts, 0) - counts
    slot_sorted = torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]
    expand_idx = torch.empty_like(flat)
    expand_idx[order] = slot_sorted
    return expand_idx.to(torch.int32)


@dataclass(frozen=True)
class DispatchLayout:
    """Where one rank's rows go. Built by `dispatch_layout`; all tensors on expert_ids' device.

    Attributes:
        send_token: `(N,)` int64, the token (row of `x`) of each sent row, in send order.
        send_scale_row: `(N,)` int64, the row of the smoothing `scales` each sent row uses:
            `s` for shared expert `s`, `S_n + e` for routed expert `e`.
        send_counts: `(W, L_max)` int64, rows sent to (destination rank, its local expert).
        expand_idx: `(BS·K,)` int32, see `expand_idx_from_ids`.
        expert_counts: `(E,)` int64, routed rows per global expert (active tokens only).
        num_shared_rows: rows in the leading shared block (`n · S_n` when `S_r > 0`, else 0).
    """

    send_token: Tensor
    send_scale_row: Tensor
    send_counts: Tensor
    expand_idx: Tensor
    expert_counts: Tensor
    num_shared_rows: int

    @property
    def num_rows(self) -> int:
        return int(self.send_token.numel())


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
    """Send order and counts of one rank's dispatch.

    Args:
        expert_ids: `(BS, K)` integer; only the first `num_active` rows are sent.
        num_active: tokens `[0, num_active)` take part (the True-prefix of `x_active_mask`).
        ep_world_size, ep_rank_id, moe_expert_num, shared_expert_num, shared_expert_rank_num:
            as in the ops (validated there).

    Returns:
        The `DispatchLayout`. Its lengths follow from `num_active` and the shapes alone, so
        `num_rows` never reads the device.
    """
    kernels = device_kernels(expert_ids)
    if kernels is not None:
        return kernels.dispatch_layout(
            expert_ids,
            num_active=num_active,
            ep_world_size=ep_world_size,
            ep_rank_id=ep_rank_id,
            moe_expert_num=moe_expert_num,
            shared_expert_num=shared_expert_num,
            shared_expert_rank_num=shared_expert_rank_num,
        )
    device = expert_ids.device
    num_tokens, top_k = expert_ids.shape
    num_moe_ranks = ep_world_size - shared_expert_rank_num
    experts_per_rank = moe_expert_num // num_moe_ranks
    max_local = max(experts_per_rank, 1)

    active_ids = expert_ids[:num_active].reshape(-1).long()
    # Stable sort of the flat (t, k) entries by expert: tokens ascend within an expert.
    order = torch.argsort(active_ids, stable=True)
    routed_token = torch.div(order, top_k, rounding_mode="floor")
    routed_expert = active_ids[order]
    expert_counts = count_values(active_ids, moe_expert_num)

    send_counts = torch.zeros(ep_world_size, max_local, dtype=torch.int64, device=device)
    send_counts[shared_expert_rank_num:] = expert_counts.view(num_moe_ranks, experts_per_rank)

    if shared_expert_rank_num > 0:
        replicas = shared_expert_rank_num // shared_expert_num
        shared_dest = torch.arange(shared_expert_num, device=device) * replicas + ep_rank_id % replicas
        send_counts[shared_dest, 0] = num_active
        tokens = torch.arange(num_active, device=device)
        send_token = torch.cat([tokens.repeat(shared_expert_num), routed_token])
        shared_rows = torch.arange(shared_expert_num, device=device).repeat_interleave(num_active)
        send_scale_row = torch.cat([shared_rows, routed_expert + shared_expert_num])
        num_shared_rows = num_active * shared_expert_num
    else:
        send_token = routed_token
        send_scale_row = routed_expert + shared_expert_num
        num_shared_rows = 0

    return DispatchLayout(
        send_token=send_token,
        send_scale_row=send_scale_row,
        send_counts=send_counts,
        expand_idx=expand_idx_from_ids(expert_ids, moe_expert_num),
        expert_counts=expert_counts,
        num_shared_rows=num_shared_rows,
    )


def block_transpose_index(counts: Tensor, *, num_rows: int | None = None) -> Tensor:
    """Gather index that re-blocks rows from (p, q) block order to (q, p) block order.

    Rows arrive as blocks `(0,0) (0,1) … (0,Q-1) (1,0) …` of `counts[p, q]` rows each; `rows[idx]`
    lays the same blocks out as `(0,0) (1,0) … (P-1,0) (0,1) …`, rows inside a block kept in order.

    Args:
        counts: `(P, Q)` non-negative integer block sizes.
        num_rows: `counts.sum()` when the caller knows it; then nothing reads the device (without
            it, the output length is read from `counts`, a host sync on CUDA).

    Returns:
        `(counts.sum(),)` int64 index into the (p, q)-ordered rows.
    """
    counts = counts.long()
    flat = counts.reshape(-1)
    in_start = (torch.cumsum(flat, 0) - flat).view_as(counts)
    out_counts = counts.t().reshape(-1)
    out_start = torch.cumsum(out_counts, 0) - out_counts
    block = torch.repeat_interleave(
        torch.arange(out_counts.numel(), device=counts.device), out_counts, output_size=num_rows
    )
    within = torch.arange(block.numel(), device=counts.device) - out_start[block]
    return in_start.t().reshape(-1)[block] + within


def assist_info_from_counts(counts: Tensor, capacity: int) -> Tensor:
    """`assist_info_for_combine` of a receiver.

    Args:
        counts: `(L, W)` int rows received per (local expert, source rank).
        capacity: A, rows of expand_x.

    Returns:
        `(A·128,)` int32: entry `e·W + r` is the inclusive cumulative row count up to block
        (e, r); the remaining entries are zero.
    """
    info = torch.zeros(capacity * 128, dtype=torch.int32, device=counts.device)
    flat = counts.reshape(-1)
    info[: flat.numel()] = torch.cumsum(flat, 0).to(torch.int32)
    return info


def counts_from_assist_info(assist_info: Tensor, num_local_experts: int, world_size: int) -> Tensor:
    """Inverse of `assist_info_from_counts`: `(L, W)` int64 rows per (local expert, source rank)."""
    cum = assist_info[: num_local_experts * world_size].long()
    counts = torch.diff(cum, prepend=cum.new_zeros(1))
    return counts.view(num_local_experts, world_size)


def expert_token_nums_from_counts(counts: Tensor, expert_token_nums_type: int) -> Tensor:
    """`(L,)` int64 rows per local expert (type 1) or their running sum (type 0)."""
    per_expert = counts.sum(dim=1).to(torch.int64)
    return per_expert if expert_token_nums_type == 1 else torch.cumsum(per_expert, 0)


def combine_positions(
    expert_ids: Tensor,
    expand_idx: Tensor,
    *,
    num_active: int,
    moe_expert_num: int,
    num_shared_rows: int,
) -> Tensor:
    """Row of the returned (send-ordered) buffer that holds each active (t, k)'s expert output.

    Args:
        expert_ids: `(BS, K)` integer.
        expand_idx: `(BS·K,)` int32 from dispatch_setup.
        num_active: active tokens.
        moe_expert_num: E.
        num_shared_rows: rows of the leading shared block.

    Returns:
        `(num_active, K)` int64.
    """
    top_k = expert_ids.shape[1]
    ids = expert_ids[:num_active].long()
    counts = count_values(ids.reshape(-1), moe_expert_num)
    offsets = torch.cumsum(counts, 0) - counts
    slots = expand_idx[: num_active * top_k].long().view(num_active, top_k)
    return num_shared_rows + offsets[ids] + slots
