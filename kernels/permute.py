"""Token permutation: gather rows into send order, scatter them back.

Owns row movement only; index construction lives in `layout`. Both functions write into a caller
buffer when one is given so the ops can fill a staging buffer (`y`, `expand_x`) without an extra
copy.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .backend import device_kernels


def gather_rows(src: Tensor, index: Tensor, out: Tensor | None = None) -> Tensor:
    """`out[i] = src[index[i]]`.

    Args:
        src: `(N, H)`.
        index: `(M,)` int64 into `src`'s rows.
        out: optional `(M, H)` destination of src's dtype; written in place (it may be a
            column-slice of a wider staging buffer).

    Returns:
        `(M, H)`, `out` when given.
    """
    device = device_kernels(src)
    if device is not None:
        return device.gather_rows(src, index, out)
    if out is None:
        return src.index_select(0, index)
    if out.is_contiguous():
        return torch.index_select(src, 0, index, out=out)
    out.copy_(src.index_select(0, index))
    return out


def scatter_rows(src: Tensor, index: Tensor, out: Tensor) -> Tensor:
    """`out[index[i]] = src[i]`: the inverse of `gather_rows` for a permutation index.

    Args:
        src: `(M, H)`.
        index: `(M,)` int64 distinct rows of `out`.
        out: `(N, H)`, `N >= M`; rows not indexed are left as they are.

    Returns:
        `out`.
    """
    device = device_kernels(src)
    if device is not None:
        return device.scatter_rows(src, index, out)
    if index.numel() == out.shape[0] and out.is_contiguous():
        # A full permutation: gather through its inverse (contiguous writes, as fast as a copy).
        inverse = torch.empty_like(index)
        inverse[index] = torch.arange(index.numel(), device=index.device, dtype=index.dtype)
        return torch.index_select(src, 0, inverse, out=out)
    return out.index_copy_(0, index, src)
