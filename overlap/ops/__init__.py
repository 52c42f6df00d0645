"""The four split MoE ops with torch_npu's signatures: on an Ascend device they call torch_npu;
everywhere else they run the portable implementation over torch.distributed.

    y, expand_idx, comm_cmd_info = dispatch_setup(x, expert_ids, group_ep, W, rank, E, ...)
    expand_x, dynamic_scales, assist_info, expert_token_nums = dispatch_teardown(x, y, expert_ids,
        comm_cmd_info, group_ep, W, rank, E, ...)
    ... the rank's experts compute on expand_x ...
    quant_expand_x, comm_cmd_info = combine_setup(expand_x, expert_ids, assist_info, group_ep, W, rank, E, ...)
    x_out = combine_teardown(expand_x, quant_expand_x, expert_ids, expand_idx, expert_scales,
        comm_cmd_info, group_ep, W, rank, E, ...)

A setup returns at once; only its teardown waits. `group_ep` is a `torch.distributed` group's
`group_name` (on NPU, the HCCL communicator name). The full contract (shapes, row order,
quantisation, shared experts, ranges) is `docs/ops.md` in the repository; each op's docstring
repeats the shapes and dtypes.

The backend follows the tensors: `x.device.type == "npu"` (or `expand_x`'s) selects torch_npu; the
environment variable `OVERLAP_BACKEND=npu|portable` or `use_backend(...)` forces one. Every call
goes through the op interceptor of `overlap.ops.context` when one is set (the pipeline's fibers).
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Any

import torch
from torch import Tensor

from . import context, npu, portable
from .params import MoeCommParams
from .staging import transport_kind
from .transport import (
    EmulatedLink,
    GroupStatus,
    Transfer,
    abort,
    collective,
    comm_options,
    configure,
    group_status,
    in_flight,
    recover,
    release,
    settle,
    shutdown,
    transfer_of,
)

BACKENDS = ("npu", "portable")


def use_backend(name: str | None) -> contextlib.AbstractContextManager[None]:
    """Force `"npu"` or `"portable"` for the calls in the block (None: follow the tensors).

    Raises:
        ValueError: `name` is not one of `BACKENDS` or None.
    """
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {name!r}")
    return context.bound(context._backend, name)


def backend_for(first: Any) -> str:
    """The backend a call whose first tensor is `first` runs on: `use_backend`, else
    `OVERLAP_BACKEND`, else `"npu"` for npu tensors and `"portable"` for everything else."""
    forced = context.forced_backend() or os.environ.get("OVERLAP_BACKEND") or None
    if forced is not None:
        if forced not in BACKENDS:
            raise ValueError(f"OVERLAP_BACKEND must be one of {BACKENDS}, got {forced!r}")
        return forced
    device = getattr(first, "device", None)
    return "npu" if device is not None and device.type == "npu" else "portable"


def _call(name: str, first: Any, *args: Any, **kwargs: Any) -> Any:
    """Run op `name` on its backend, through the context's interceptor when one is set."""
    impl = functools.partial(npu.call, name) if backend_for(first) == "npu" else getattr(portable, name)
    call = functools.partial(impl, *args, **kwargs)
    hook = context.current_hook()
    return call() if hook is None else hook(name, call)


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
    """Start dispatching this rank's tokens to their experts; returns at once.

    Args:
        x: `(BS, H)` fp16/bf16 tokens, BS in (0, 512], H in [1024, 8192].
        expert_ids: `(BS, K)` int32/int64 routed experts, distinct per row, in `[0, moe_expert_num)`,
            K in (0, 16].
        group_ep: the EP group: a process group's `group_name` (HCCL name on NPU).
        ep_world_size: W, the group's size, in [2, 384].
        ep_rank_id: this rank in the group, in [0, W).
        moe_expert_num: E routed experts, in (0, 512], divisible by W - shared_expert_rank_num.
        scales: optional `(shared_expert_num + moe_expert_num, H)` fp32 smoothing (quant_mode 2 only).
        x_active_mask: optional `(BS,)` bool True-prefix; inactive tokens are not sent.
        expert_shard_type: 0 (shared-expert ranks first).
        shared_expert_num: S_n shared experts, in [0, 4].
        shared_expert_rank_num: S_r ranks holding shared experts, in [0, W / 2].
        quant_mode: 0 (none) or 2 (dynamic per-token int8).
        global_bs: 0 (every rank has the same BS) or in [max BS * W, 512 * W].
        comm_type: 0. comm_alg: "". (Reserved, as on torch_npu.)
        y_dtype: None, or the dtype `y` has (x's dtype; int8 with quant_mode 2).

    Returns:
        y: `(BS * (K + S_n), Align256(H))` x's dtype (quant_mode 2: int8 `(…, Align512(Align32(H) + 4))`),
            the staged rows; opaque, and the caller may reuse it at once (the transfer owns a copy).
        expand_idx: `(BS * K,)` int32, each (token, k)'s slot within its expert's block.
        comm_cmd_info: int32 transport record; the ticket its teardown finds the transfer by.

    Raises:
        ValueError, TypeError: a bad value or type, before any communication.
        CapacityError: `max_in_flight` dispatches are already in flight on the group.
        CommError: the group is unusable after an earlier failure.
    """
    return _call(
        "dispatch_setup",
        x,
        x,
        expert_ids,
        group_ep,
        ep_world_size,
        ep_rank_id,
        moe_expert_num,
        scales=scales,
        x_active_mask=x_active_mask,
        expert_shard_type=expert_shard_type,
        shared_expert_num=shared_expert_num,
        shared_expert_rank_num=shared_expert_rank_num,
        quant_mode=quant_mode,
        global_bs=global_bs,
        comm_type=comm_type,
        comm_alg=comm_alg,
        y_dtype=y_dtype,
    )


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
    """Wait for the dispatch and lay the received rows out per local expert.

    Args:
        x, y, expert_ids, comm_cmd_info: the setup's `x` and `expert_ids` and what it returned.
        group_ep, ep_world_size, ep_rank_id, moe_expert_num, expert_shard_type, shared_expert_num,
        shared_expert_rank_num, quant_mode, global_bs, comm_type, comm_alg: as given to the setup.
        expert_token_nums_type: 1 (counts per local expert) or 0 (running sums).

    Returns:
        expand_x: `(A, H)` x's dtype (quant_mode 2: int8), rows by local expert, then source rank,
            then source token; zeros past the received count. A = global_bs * min(L, K) on an MoE
            rank (global_bs = BS * W when 0).
        dynamic_scales: `(A,)` fp32 per-row dequantisation scales (quant_mode 2: row r's values
            are `expand_x[r].float() * dynamic_scales[r]`; else zeros).
        assist_info_for_combine: `(A * 128,)` int32; its first L * W entries are the cumulative row
            counts per (local expert, source rank). Pass it to combine_setup unchanged.
        expert_token_nums: `(L,)` int64 rows per local expert (type 1) or their running sums (type 0).

    Raises:
        ValueError, TypeError: a bad value or type.
        HandleError: `comm_cmd_info` is not a live dispatch ticket (torn down already, a combine's,
            another group's, or never issued).
        CommTimeoutError: the exchange did not land in time; the message names the silent ranks.
        CommError: the exchange failed (a peer died or aborted, or ranks disagreed on parameters).
    """
    return _call(
        "dispatch_teardown",
        x,
        x,
        y,
        expert_ids,
        comm_cmd_info,
        group_ep,
        ep_world_size,
        ep_rank_id,
        moe_expert_num,
        expert_shard_type=expert_shard_type,
        shared_expert_num=shared_expert_num,
        shared_expert_rank_num=shared_expert_rank_num,
        quant_mode=quant_mode,
        global_bs=global_bs,
        expert_token_nums_type=expert_token_nums_type,
        comm_type=comm_type,
        comm_alg=comm_alg,
    )


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
    """Start sending the experts' outputs back to their tokens' ranks; returns at once.

    Args:
        expand_x: `(A, H)` fp16/bf16, row i the experts' output for dispatch_teardown's row i. It
            may be reused as soon as this returns (the transfer owns a copy).
        expert_ids: `(BS, K)` the dispatch's expert ids.
        assist_info_for_combine: `(A * 128,)` int32 from dispatch_teardown.
        group_ep, ep_world_size, ep_rank_id, moe_expert_num, expert_shard_type, shared_expert_num,
        shared_expert_rank_num, global_bs, comm_type, comm_alg: as given to the dispatch.
        comm_quant_mode: 0 (no quantisation of the combine).

    Returns:
        quant_expand_x: `(A, Align512(Align32(H) + Align8(H) / 8 * 4))` int8 (zeros: comm_quant_mode 0).
        comm_cmd_info: `((A + W) * 16,)` int32 transport record; its teardown finds the transfer by it.

    Raises:
        ValueError, TypeError: a bad value or type, before any communication.
        CapacityError: `max_in_flight` combines are already in flight on the group.
        CommError: the group is unusable after an earlier failure.
    """
    return _call(
        "combine_setup",
        expand_x,
        expand_x,
        expert_ids,
        assist_info_for_combine,
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
    """Wait for the combine and sum each token's expert outputs.

    Args:
        expand_x, quant_expand_x, comm_cmd_info: what combine_setup was given and returned.
        expert_ids: `(BS, K)` and expand_idx `(BS * K,)` int32: from the dispatch.
        expert_scales: `(BS, K)` fp32 routing weights.
        x_active_mask: the dispatch's `(BS,)` mask, if it had one.
        shared_expert_x: optional `(BS, H)` expand_x's dtype, added with weight 1 (only when
            shared_expert_rank_num = 0).
        group_ep, ep_world_size, ep_rank_id, moe_expert_num, expert_shard_type, shared_expert_num,
        shared_expert_rank_num, global_bs, comm_quant_mode, comm_type, comm_alg: as for the setup.

    Returns:
        x_out: `(BS, H)` expand_x's dtype: `Σ_k expert_scales[t, k] · row(t, k)` in fp32, k ascending,
            plus each shared expert's row (weight 1) and `shared_expert_x` (weight 1), then one
            round-half-even cast; zeros for inactive tokens.

    Raises:
        ValueError, TypeError: a bad value or type.
        HandleError: `comm_cmd_info` is not a live combine ticket.
        CommTimeoutError: the exchange did not land in time; the message names the silent ranks.
        CommError: the exchange failed (a peer died or aborted, or ranks disagreed on parameters).
    """
    return _call(
        "combine_teardown",
        expand_x,
        expand_x,
        quant_expand_x,
        expert_ids,
        expand_idx,
        expert_scales,
        comm_cmd_info,
        group_ep,
        ep_world_size,
        ep_rank_id,
        moe_expert_num,
        x_active_mask=x_active_mask,
        shared_expert_x=shared_expert_x,
        expert_shard_type=expert_shard_type,
        shared_expert_num=shared_expert_num,
        shared_expert_rank_num=shared_expert_rank_num,
        global_bs=global_bs,
        comm_quant_mode=comm_quant_mode,
        comm_type=comm_type,
        comm_alg=comm_alg,
    )


OPS = ("dispatch_setup", "dispatch_teardown", "combine_setup", "combine_teardown")

__all__ = [
    "BACKENDS",
    "OPS",
    "EmulatedLink",
    "GroupStatus",
    "MoeCommParams",
    "Transfer",
    "abort",
    "backend_for",
    "collective",
    "combine_setup",
    "combine_teardown",
    "comm_options",
    "configure",
    "context",
    "dispatch_setup",
    "dispatch_teardown",
    "group_status",
    "in_flight",
    "recover",
    "release",
    "settle",
    "shutdown",
    "transfer_of",
    "transport_kind",
    "use_backend",
]
