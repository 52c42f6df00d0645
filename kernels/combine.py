"""Weighted combine: each token's expert outputs, weighted by `expert_scales`, summed back.

`x_out[t] = cast(Σ_k w[t,k] · float32(rows[pos[t,k]]) + Σ_s float32(rows[shared_pos[s,t]])
+ float32(extra[t]))`, accumulated in fp32 in exactly that order (k ascending, then shared experts
ascending, then `extra`), then one round-half-to-even cast. The fixed order makes the result
bit-reproducible against any reference that sums the same way. The loop runs over K (≤ 16) and
the shared experts (≤ 4), never over tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor


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
    acc = torch.zeros(out.shape, dtype=torch.float32, device=out.device)
    for k in range(positions.shape[1]):
        acc += weights[:, k : k + 1] * rows.index_select(0, positions[:, k]).float()
    if shared_positions is not None:
        for s in range(shared_positions.shape[0]):
            acc += rows.index_select(0, shared_positions[s]).float()
    if extra is not None:
        acc += extra.float()
    return out.copy_(acc)
