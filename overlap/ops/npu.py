"""Delegation to torch_npu on an Ascend device.

Owns: importing torch_npu lazily and calling its op with the caller's arguments unchanged. Never
imported eagerly: torch_npu raises ImportError without Ascend's CANN libraries even when installed
(and, once installed, torch autoloads it unless TORCH_DEVICE_BACKEND_AUTOLOAD=0).
"""

from __future__ import annotations

import importlib
from typing import Any

OP_PREFIX = "npu_moe_distribute_"


def load_torch_npu() -> Any:
    try:
        return importlib.import_module("torch_npu")
    except ImportError as exc:
        raise ImportError(
            "the npu backend needs torch_npu with Ascend's CANN libraries: "
            "pip install moe-overlap[npu] on an Ascend machine"
        ) from exc


def call(op: str, *args: Any, **kwargs: Any) -> Any:
    """`torch_npu.npu_moe_distribute_<op>(*args, **kwargs)`."""
    return getattr(load_torch_npu(), OP_PREFIX + op)(*args, **kwargs)
