"""Which implementation of a kernel runs: the torch reference, its Triton twin, or its C twin on CPU.

Owns the choice and nothing else. The public functions of `overlap.kernels` ask `device_kernels(t)`
with one of their tensors; it answers the `triton_kernels` module for a CUDA tensor when triton
imports, and `None` (run the torch reference) otherwise. The question costs one attribute read
and one comparison for a CPU tensor; triton is imported lazily, on the first CUDA tensor, once.

For a CPU tensor, `cpu_kernels(t)` answers the compiled C kernels (`cpu_native`) where they build.

The mode is `auto` (above), `torch` (the reference everywhere: compare or debug on a GPU) or
`triton` (the Triton kernels for every device: with `TRITON_INTERPRET=1` set before triton is
imported, they run on CPU tensors in triton's interpreter; that is how CI tests them). It comes
from the environment variable `OVERLAP_KERNELS` at import, and `use(mode)` changes it for a block.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from types import ModuleType

from torch import Tensor

from . import cpu_native

MODES = ("auto", "torch", "triton")

_mode = os.environ.get("OVERLAP_KERNELS", "auto") or "auto"
if _mode not in MODES:
    raise ValueError(f"OVERLAP_KERNELS must be one of {MODES}, got {_mode!r}")
_everywhere = _mode == "triton"  # Triton for every tensor, CPU ones included (interpreter)
_on_cuda = _mode != "torch"  # Triton for CUDA tensors
_module: ModuleType | None = None
_import_error: ImportError | None = None


def _load() -> ModuleType | None:
    global _module, _import_error
    if _module is None and _import_error is None:
        try:
            from . import triton_kernels
        except ImportError as exc:  # triton not installed: the torch reference runs
            _import_error = exc
        else:
            _module = triton_kernels
    if _module is None and _everywhere:
        raise ImportError("OVERLAP_KERNELS=triton needs triton: pip install 'moe-overlap[gpu]'") from _import_error
    return _module


def device_kernels(tensor: Tensor) -> ModuleType | None:
    """The Triton kernels module when `tensor` should use it, else `None` (use the torch reference).

    Args:
        tensor: any tensor of the call (they share one device).
    """
    if _everywhere or (tensor.is_cuda and _on_cuda):
        return _load()
    return None


def cpu_kernels(tensor: Tensor) -> ModuleType | None:
    """The compiled CPU kernels module (`cpu_native`) when `tensor` should use it, else `None`.

    They run for CPU tensors in the `auto` mode when they build on this machine (see `cpu_native`);
    `torch` mode runs the reference, and `triton` mode was answered by `device_kernels` first.

    Args:
        tensor: any tensor of the call.
    """
    if tensor.device.type != "cpu" or not _on_cuda or _everywhere or not cpu_native._enabled:
        return None
    return cpu_native if cpu_native.available() else None


def mode() -> str:
    """The current mode: `auto`, `torch` or `triton`."""
    return "triton" if _everywhere else ("auto" if _on_cuda else "torch")


@contextlib.contextmanager
def use(new_mode: str) -> Iterator[None]:
    """Run a block with another mode (`auto`, `torch` or `triton`); the previous one comes back after.

    Raises:
        ValueError: `new_mode` is not one of them.
    """
    global _everywhere, _on_cuda
    if new_mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {new_mode!r}")
    saved = (_everywhere, _on_cuda)
    _everywhere, _on_cuda = new_mode == "triton", new_mode != "torch"
    try:
        if _everywhere:
            _load()
        yield
    finally:
        _everywhere, _on_cuda = saved
