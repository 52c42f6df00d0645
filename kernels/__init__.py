"""Compute pieces of the four split MoE ops, as readable, vectorised torch.

`overlap.kernels` owns the arithmetic of expert-parallel dispatch and combine and nothing else: no
communication, no validation of user input (the ops validate before they call in), no Python loop
over tokens or experts. Each function states the shapes and dtypes it takes and returns.

- `layout`: routing layout (per-expert and per-rank counts, send order, `expand_idx`,
  `assist_info_for_combine`, `expert_token_nums`) and the block transpose between the sender's
  (rank, expert) order and the receiver's (expert, rank) order.
- `permute`: gather rows into send order and scatter them back.
- `quant`: per-row dynamic int8 quantisation and dequantisation (round half to even).
- `combine`: the weighted sum back per token, in k order, in fp32, then one cast.
- `backend`: which implementation runs: these torch references (CPU, and anywhere triton is
  missing) or their Triton twins in `triton_kernels` (CUDA tensors; see docs/kernels.md).
- `cpu_combine`: the combine fused by `torch.compile` for large CPU calls (bit-equal).

Shipped as `overlap.kernels` (the folder sits at the repository root; see DESIGN.md).
"""

from __future__ import annotations

from .combine import weighted_combine
from .layout import (
    DispatchLayout,
    align,
    assist_info_from_counts,
    block_transpose_index,
    combine_positions,
    count_values,
    counts_from_assist_info,
    dispatch_layout,
    expand_idx_from_ids,
    expert_token_nums_from_counts,
)
from .permute import gather_rows, scatter_rows
from .quant import dequantize_rows, pack_quantized, quantize_packed, quantize_rows, unpack_quantized

__all__ = [
    "DispatchLayout",
    "align",
    "assist_info_from_counts",
    "block_transpose_index",
    "combine_positions",
    "count_values",
    "counts_from_assist_info",
    "dequantize_rows",
    "dispatch_layout",
    "expand_idx_from_ids",
    "expert_token_nums_from_counts",
    "gather_rows",
    "pack_quantized",
    "quantize_packed",
    "quantize_rows",
    "scatter_rows",
    "unpack_quantized",
    "weighted_combine",
]
