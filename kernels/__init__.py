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
- `backend`: which implementation runs: these torch references (the oracle; anywhere nothing
  faster applies), their C twins in `cpu_native` (CPU tensors, where a C compiler is found), or
  their Triton twins in `triton_kernels` (CUDA tensors); see docs/kernels.md.
- `cpu_native`: `quantize_*` and `weighted_combine` for CPU tensors in C, compiled at first use
  (about half a second, then cached on disk), bit-equal to the references.

Shipped as `overlap.kernels`: the folder sits at the repository root (the project's layout keeps
one folder per layer, kernels at the bottom), but a top-level module named `kernels` belongs to the
Hugging Face kernel hub on PyPI, which transformers imports. Whenever the repository root is on
`sys.path` (`python -m pytest`, `python -m overlap`, `python -c` run from the root) this file is
also found as `kernels`; it then steps aside: it loads the next `kernels` on `sys.path` (the hub
package) in its own place, or raises `ModuleNotFoundError` as if the folder were not there. So this
folder never shadows the hub package, from any working directory.
"""

from __future__ import annotations

import sys as _sys

if __name__ == "kernels":  # imported top-level because the repository root is on sys.path
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _path = [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != _root]
    _spec = _machinery.PathFinder.find_spec("kernels", _path)
    if _spec is None or _spec.loader is None:
        raise ModuleNotFoundError(
            "No module named 'kernels' (the repository's kernels/ folder is overlap.kernels)", name="kernels"
        )
    _hub = _util.module_from_spec(_spec)
    _sys.modules["kernels"] = _hub  # the import statement returns what sys.modules holds
    try:
        _spec.loader.exec_module(_hub)
    except BaseException:
        _sys.modules.pop("kernels", None)
        raise
else:
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
