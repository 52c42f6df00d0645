"""The weighted combine on CPU as one fused loop, compiled by `torch.compile` (inductor's C++ backend).

Owns the fast CPU path of `combine.weighted_combine`, nothing else. The eager reference makes several
passes over fp32 temporaries per block of tokens (gather, widen, scale, add, cast), so it
streams memory several times. Inductor fuses the same expression into one loop per output element:
`acc = 0 + w[t,0]·row(t,0)`, then `+ w[t,k]·row(t,k)` for k ascending, then `+ row` for each
shared row, then `+ extra`, then one round-half-even cast. The operations and their order are the
reference's, and inductor compiles with `-ffp-contract=off` (`torch._inductor.config.cpp.
enable_floating_point_contract_flag`), so the bits are the same: tests/test_kernels_cpu.py checks it.

Compiling costs seconds (about a minute on a loaded 2-core machine) once per process, per top-K
plus shared-row count, and per with/without `extra`. Inductor's on-disk cache serves later
processes. So the path is taken only for calls of at least `MIN_ELEMENTS` gathered elements
(`n · (K + S) · H`), where a single call already takes milliseconds. Set `OVERLAP_CPU_COMPILE=0`
to never compile. If compiling or running fails, the path turns itself off for the process with
one warning, and the reference runs.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
from torch import Tensor

MIN_ELEMENTS = 1 << 21  # n·(K+S)·H below this: the eager reference (no compile for small or test shapes)

_enabled = os.environ.get("OVERLAP_CPU_COMPILE", "1") != "0"
_compiled: Any = None


def _fused_combine(rows: Tensor, index: Tensor, weights: Tensor, top_k: int, extra: Tensor | None, out: Tensor) -> None:
    # index: (n, K + S), weights: (n, K); the loop is unrolled when traced (K + S is a constant).
    acc = 0.0 + weights[:, 0:1] * rows[index[:, 0]].float()
    for k in range(1, top_k):
        acc = acc + weights[:, k : k + 1] * rows[index[:, k]].float()
    for j in range(top_k, index.shape[1]):
        acc = acc + rows[index[:, j]].float()
    if extra is not None:
        acc = acc + extra.float()
    out.copy_(acc)


def is_worth_it(out: Tensor, positions: Tensor, shared_positions: Tensor | None) -> bool:
    """Whether this CPU call takes the compiled path (enabled, and large enough)."""
    if not _enabled:
        return False
    num_shared = 0 if shared_positions is None else shared_positions.shape[0]
    return out.shape[0] * (positions.shape[1] + num_shared) * out.shape[1] >= MIN_ELEMENTS


def weighted_combine(
    rows: Tensor,
    positions: Tensor,
    weights: Tensor,
    *,
    shared_positions: Tensor | None = None,
    extra: Tensor | None = None,
    out: Tensor,
) -> bool:
    """Run the compiled combine into `out`; arguments as `combine.weighted_combine`.

    Returns:
        True when `out` was written; False when the compiled path is off (the caller runs the
        reference).
    """
    global _compiled, _enabled
    if not _enabled:
        return False
    index = positions if shared_positions is None else torch.cat([positions, shared_positions.t()], 1)
    try:
        if _compiled is None:
            _compiled = torch.compile(_fused_combine, dynamic=True)
        # Without duck shaping, equal sizes (T·K == H) do not share a symbol, so a new shape
        # reuses the compiled code instead of compiling again.
        with torch.fx.experimental._config.patch(use_duck_shape=False):  # type: ignore[attr-defined]
            _compiled(rows, index, weights, positions.shape[1], extra, out)
    except Exception as exc:  # noqa: BLE001 - any compiler failure: fall back to the reference for good
        _enabled = False
        warnings.warn(
            f"overlap.kernels: the compiled CPU combine failed ({type(exc).__name__}: {exc}); "
            "using the eager reference from now on (set OVERLAP_CPU_COMPILE=0 to skip it)",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    return True
