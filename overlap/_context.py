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
def thread_value(local: threading.local, name: str, value: object) -> Iterator[None]:
    """Set `local.<name>` to `value` for the block (this thread only), then restore it."""
    previous = getattr(local, name, None)
    setattr(local, name, value)
    try:
        yield
    finally:
        setattr(local, name, previous)


def labelled(tag: str | None) -> contextlib.AbstractContextManager[None]:
    """Name the microbatch (and layer) of the ops called in the block, e.g. ``mb1.l3``."""
    return thread_value(_local, "tag", tag)


def op_hook():
    """The op interceptor installed on this thread (the scheduler's microbatch fibers), or None.

    Called by `overlap.ops` as `hook(name, call)` where `call()` runs the op; the hook decides when.
    """
    return getattr(_local, "hook", None)


def hooked(hook) -> contextlib.AbstractContextManager[None]:
    """Install an op interceptor for the block (this thread only)."""
    return thread_value(_local, "hook", hook)


def in_fiber() -> bool:
    """True on a scheduler fiber thread (another microbatch's exchange may be in flight: run no
    collective there but the ops)."""
    return bool(getattr(_local, "fiber", False))


def fiber() -> contextlib.AbstractContextManager[None]:
    """Mark this thread as a scheduler fiber for the block."""
    return thread_value(_local, "fiber", True)
