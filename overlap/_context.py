"""Thread-local naming of the work in progress (which microbatch and layer), so that a transfer's
errors and timeline entries can say `dispatch@mb1.l3`. Set by the scheduler; read by the ops."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

_local = threading.local()


def current_label(op: str) -> str:
    """`op@<tag>` when a scheduler names the current microbatch, else ``""``."""
    tag = getattr(_local, "tag", None)
    return f"{op}@{tag}" if tag else ""


@contextlib.contextmanager
def labelled(tag: str | None) -> Iterator[None]:
    previous = getattr(_local, "tag", None)
    _local.tag = tag
    try:
        yield
    finally:
        _local.tag = previous


def op_hook():
    """The op interceptor installed on this thread (the scheduler's microbatch fibers), or None.

    Called by `overlap.ops` as `hook(name, call)` where `call()` runs the op; the hook decides when.
    """
    return getattr(_local, "hook", None)


@contextlib.contextmanager
def hooked(hook) -> Iterator[None]:
    previous = getattr(_local, "hook", None)
    _local.hook = hook
    try:
        yield
    finally:
        _local.hook = previous
