"""The serial executor: a protocol layer's forward with every op waited for, and the one-exchange
forward a layer runs inside a fiber.

Owns: `serial_forward` (each microbatch of at most 512 tokens in turn: route, dispatch, experts,
combine, nothing overlapped), `InlineExchange` (the executor of a protocol layer called inside a
fiber: one exchange, no collective) and `forward`, the entry every protocol layer calls, which
hands the forward to the executor active in the context. Never decides how to split (that is
`policy`) and never runs two exchanges at once.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import ops
from . import policy
from .protocol import LayerCall, MoEProtocol, Routes, active_executor


def _one_microbatch(
    layer: MoEProtocol, call: LayerCall, chunk: Tensor, mask: Tensor | None, routes: Routes | None
) -> Tensor:
    """Route (unless given), dispatch, experts, combine for one `(BS, H)` chunk; `(BS, H)`."""
    ids, scales = layer.moe_route(chunk) if routes is None else routes
    kw = call.shared
    y, expand_idx, cmd = ops.dispatch_setup(
        chunk, ids, *call.args, x_active_mask=mask, quant_mode=call.quant_mode, **kw
    )
    expand_x, dyn, assist, nums = ops.dispatch_teardown(
        chunk, y, ids, cmd, *call.args, quant_mode=call.quant_mode, **kw
    )
    out = layer.moe_experts(expand_x, dyn, nums)
    qx, cmd2 = ops.combine_setup(out, ids, assist, *call.args, **kw)
    shared = layer.moe_shared(chunk)
    return ops.combine_teardown(
        out, qx, ids, expand_idx, scales, cmd2, *call.args, x_active_mask=mask, shared_expert_x=shared, **kw
    )


def serial_forward(layer: MoEProtocol, x: Tensor, *, routes: Routes | None = None) -> Tensor:
    """The unpipelined forward of a protocol layer: x `(T, H)` -> `(T, H)`.

    One all-reduce agrees on the group's largest batch; then each microbatch of `policy.split`
    with `microbatches=1` (so at most 512 tokens each) runs in turn, every op waited for.

    Args:
        layer: implements `MoEProtocol`.
        x: `(T, H)` this rank's tokens (T may differ between ranks, and may be 0).
        routes: optional precomputed `(expert_ids (T, K), expert_scales (T, K))`; then
            `layer.moe_route` is not called.
    """
    call = LayerCall.of(layer)
    plan = policy.agree(x.shape[0], call.group, microbatches=1, min_tokens=0)
    outs = []
    for i in range(plan.count):
        chunk, mask = plan.chunk(x, i)
        chunk_routes = None if routes is None else (plan.chunk(routes[0], i)[0], plan.chunk(routes[1], i)[0])
        outs.append(_one_microbatch(layer, call, chunk, mask, chunk_routes))
    return torch.cat(outs)[: x.shape[0]] if outs else x[:0]


class InlineExchange:
    """The executor of protocol layers called inside a fiber (`overlap.wrap` of a module that holds
    them): one exchange on the caller's thread, no collective at all, because another
    microbatch's exchange may be in flight on the group. Without an agreement on sizes, every
    rank sends with `global_bs = 512 · W`, so a fiber's layer takes at most 512 tokens."""

    def run_layer(
        self,
        layer: MoEProtocol,
        x: Tensor,
        *,
        routes: Routes | None = None,
        layer_index: int | None = None,
        microbatches: int | None = None,
        min_tokens: int | None = None,
    ) -> Tensor:
        limit = policy.MAX_TOKENS_PER_CALL
        if x.shape[0] > limit:
            raise ValueError(
                f"x must have at most {limit} rows per microbatch inside a scheduler's fibers, got "
                f"{x.shape[0]}: give the scheduler more microbatches"
            )
        if x.shape[0] == 0:
            raise ValueError(
                "x must have at least 1 row inside a scheduler's fibers, got 0: every rank must make "
                "the same exchanges (the fibers pad empty microbatches)"
            )
        call = LayerCall.of(layer)
        call = call.with_global_bs(limit * call.ep_world_size)
        return _one_microbatch(layer, call, x, None, routes)


def forward(
    layer: MoEProtocol,
    x: Tensor,
    *,
    routes: Routes | None = None,
    layer_index: int | None = None,
    microbatches: int | None = None,
    min_tokens: int | None = None,
) -> Tensor:
    """Run a protocol layer's forward on the executor active in the context: a scheduler context's
    planned executor, a fiber's inline exchange, or (none active) `serial_forward`.

    Args:
        layer: implements `MoEProtocol`.
        x: `(T, H)` this rank's tokens.
        routes: optional precomputed routes (then `layer.moe_route` is not called).
        layer_index: the `.l<j>` of the layer's nodes in plans and timelines.
        microbatches, min_tokens: override the scheduler's values for this call.
    """
    executor = active_executor()
    if executor is None:
        return serial_forward(layer, x, routes=routes)
    return executor.run_layer(
        layer, x, routes=routes, layer_index=layer_index, microbatches=microbatches, min_tokens=min_tokens
    )
