"""Weighted combine: each token's expert outputs, weighted by `expert_scales`, summed back.

`x_out[t] = cast(Σ_k w[t,k] · float32(rows[pos[t,k]]) + Σ_s float32(rows[shared_pos[s,t]])
+ float32(extra[t]))`, accumulated in fp32 in exactly that order (k ascending, then shared experts
ascending, then `extra`), then one round-half-to-even cast. The fixed order makes the result
bit-reproducible against any reference that sums the same way. The loops run over K (≤ 16), the
shared experts (≤ 4) and cache-sized blocks of tokens, never over single tokens.

This eager function is the reference. CPU calls run the same expression in compiled C, one token
at a time (`cpu_native`); CUDA tensors run the Triton kernel (`triton_kernels`); both are bit-equal
to it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .backend import cpu_kernels, device_kernels

CACHE_ELEMENTS = 1 << 19  # fp32 temporaries per block of tokens: 2 MiB, about one core's L2


def weighted_combine(
    rows: Tensor,
    positions: Tensor,
    weights: Tensor,
    *,
    shared_positions: Tensor | None = None,
    extra: Tensor | None = None,
    out: Tensor,
) -> Tensor:
    """Sum expert outputs back per token.

    Args:
        rows: `(N, H)` fp16/bf16 expert outputs (send order).
        positions: `(n, K)` int64 row of `rows` for each active (t, k).
        weights: `(n, K)` fp32.
        shared_positions: optional `(S, n)` int64 rows of shared-expert outputs (weight 1).
        extra: optional `(n, H)` added with weight 1 last (`shared_expert_x`).
        out: `(n, H)` destination in the output dtype; written in place.

    Returns:
        `out`.
    """
    device = device_kernels(out)
    if device is not None:
        return device.weighted_combine(
            rows, positions, weights, shared_positions=shared_positions, extra=extra, out=out
        )
    index = positions
    if shared_positions is not None:
        index = torch.cat([positions, shared_positions.t().to(positions.dtype)], 1)
    native = cpu_kernels(out)
    if native is not None and native.combine(rows, index, positions.shape[1], weights, extra, out):
        return out  # the same sum, compiled (cpu_native)
    num_tokens, hidden = out.shape
    top_k = positions.shape[1]
    num_shared = 0 if shared_positions is None else shared_positions.shape[0]
    # Blocks of tokens whose fp32 temporaries (about CACHE_ELEMENTS floats) stay in cache: one pass
    # over memory per input row instead of one per temporary. The loop runs over blocks, not tokens.
    block = max(1, min(num_tokens, CACHE_ELEMENTS // ((top_k + num_shared + 1) * hidden)))
    gathered = torch.empty(block * (top_k + num_shared), hidden, dtype=rows.dtype, device=rows.device)
    terms = torch.empty(block, top_k + num_shared, hidden, dtype=torch.float32, device=rows.device)
    acc_block = torch.empty(block, hidden, dtype=torch.float32, device=rows.device)
    for start in range(0, num_tokens, block):
        stop = min(start + block, num_tokens)
        m = stop - start
        flat = index[start:stop].reshape(-1)
        g = torch.index_select(rows, 0, flat, out=gathered[: flat.numel()])
        t = terms[:m]
        t.copy_(g.view(m, -1, hidden))  # float32(row), (m, K + S, H)
        t[:, :top_k].mul_(weights[start:stop, :, None])  # w[t,k] · row(t,k); shared rows keep weight 1
        acc = acc_block[:m].zero_()
        for j in range(top_k + num_shared):  # k ascending, then shared experts ascending
            acc.add_(t[:, j])
        if extra is not None:
            acc.add_(extra[start:stop].float())
        out[start:stop].copy_(acc)
    return out
