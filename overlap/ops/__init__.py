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
`group_name` (on NPU, the HCCL communicator name). The contract: `spec/README.md` in the shared
folder; shapes and dtypes are repeated in each op's docstring.

The backend follows the tensors: `x.device.type == "npu"` (or `expand_x`'s) selects torch_npu; the
environment variable `OVERLAP_BACKEND=npu|portable` or `use_backend(...)` forces one.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from typing import Any, Callable

from .. import _context
from . import npu, portable
from .params import MoeCommParams
from .transport import (EmulatedLink, GroupStatus, Transfer, abort, collective, comm_options, configure, group_status,
                        in_flight, recover, settle, shutdown, transfer_of)

_local = threading.local()
BACKENDS = ("npu", "portable")


def use_backend(name: str | None) -> contextlib.AbstractContextManager[None]:
    """Force `"npu"` or `"portable"` for the calls in the block (None: follow the tensors)."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {name!r}")
    return _context.thread_value(_local, "backend", name)


def _backend(first: Any) -> str:
    forced = getattr(_local, "backend", None) or os.environ.get("OVERLAP_BACKEND") or None
    if forced is not None:
        if forced not in BACKENDS:
            raise ValueError(f"OVERLAP_BACKEND must be one of {BACKENDS}, got {forced!r}")
        return forced
    device = getattr(first, "device", None)
    return "npu" if device is not None and device.type == "npu" else "portable"


def _op(name: str) -> Callable[..., Any]:
    impl = getattr(portable, name)

    @functools.wraps(impl)
    def op(*args: Any, **kwargs: Any) -> Any:
        first = args[0] if args else next(iter(kwargs.values()), None)
        if _backend(first) == "npu":
            call = functools.partial(npu.call, name, *args, **kwargs)
        else:
            call = functools.partial(impl, *args, **kwargs)
        hook = _context.op_hook()  # a scheduler pipelining an op-calling layer decides when it runs
        return call() if hook is None else hook(name, call)

    return op


dispatch_setup = _op("dispatch_setup")
dispatch_teardown = _op("dispatch_teardown")
combine_setup = _op("combine_setup")
combine_teardown = _op("combine_teardown")

dispatch_setup.__doc__ = """Start dispatching this rank's tokens to their experts; returns at once.

Args:
    x: `(BS, H)` fp16/bf16 tokens.
    expert_ids: `(BS, K)` int32 routed experts, distinct per row, in `[0, moe_expert_num)`.
    group_ep, ep_world_size, ep_rank_id, moe_expert_num: the EP group and its size, this rank, E.
    scales: optional `(shared_expert_num + moe_expert_num, H)` fp32 smoothing (quant_mode 2 only).
    x_active_mask: optional `(BS,)` bool True-prefix; inactive tokens are not sent.
    expert_shard_type, shared_expert_num, shared_expert_rank_num, quant_mode, global_bs, comm_type,
    comm_alg, y_dtype: as torch_npu (see the contract).

Returns:
    y: `(BS·(K+S_n), Align256(H))` x's dtype (quant 2: int8 `(…, Align512(Align32(H)+4))`), the
        staged rows (opaque). expand_idx: `(BS·K,)` int32. comm_cmd_info: int32 transport record.
"""
dispatch_teardown.__doc__ = """Wait for the dispatch and lay the received rows out per local expert.

Returns:
    expand_x: `(A, H)` y's dtype, rows by local expert, then source rank, then source token;
        zeros past the received count. dynamic_scales: `(A,)` fp32 (quant 2; else zeros).
    assist_info_for_combine: `(A·128,)` int32. expert_token_nums: `(L,)` int64, counts (type 1) or
        running sums (type 0).
"""
combine_setup.__doc__ = """Start sending the experts' outputs back to their tokens' ranks; returns at once.

Args:
    expand_x: `(A, H)` fp16/bf16, row i the output for dispatch_teardown's row i. It may be reused
        as soon as this returns (the transfer owns a copy).

Returns:
    quant_expand_x: `(A, Align512(Align32(H) + Align8(H)/8·4))` int8 (zeros: comm_quant_mode 0).
    comm_cmd_info: `((A + W)·16,)` int32 transport record.
"""
combine_teardown.__doc__ = """Wait for the combine and sum each token's expert outputs.

Returns:
    x_out: `(BS, H)` expand_x's dtype: `Σ_k expert_scales[t,k]·row(t,k)` in fp32, k ascending, plus
    each shared expert's row (weight 1) and `shared_expert_x` (weight 1), one round-half-even
    cast; zeros for inactive tokens.
"""

__all__ = [
    "EmulatedLink",
    "GroupStatus",
    "MoeCommParams",
    "Transfer",
    "abort",
    "collective",
    "combine_setup",
    "combine_teardown",
    "comm_options",
    "configure",
    "dispatch_setup",
    "dispatch_teardown",
    "group_status",
    "in_flight",
    "recover",
    "settle",
    "shutdown",
    "transfer_of",
    "use_backend",
]
