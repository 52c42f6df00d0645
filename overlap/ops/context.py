"""The ambient context of an op call: which microbatch it belongs to, who intercepts it, which
backend runs it.

Owns three `contextvars.ContextVar`s and nothing else:

- the label (`mb1.l3`: microbatch 1 of layer 3), which a transfer's errors and timeline entries
  carry (`dispatch@mb1.l3`);
- the op interceptor: when set, every public op call becomes `hook(name, call)` and the hook
  decides when `call()` runs (the pipeline's fibers hand the turn on at teardowns with it);
- the forced backend of `overlap.ops.use_backend`.

They are context variables, not thread-locals, so they follow the caller explicitly: code that runs
ops on another thread for a caller runs them under `contextvars.copy_context().run(...)` (the
pipeline does). Nothing here depends on whether a new thread inherits its parent's context (it
does on free-threaded CPython, it does not on the default build).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

OpHook = Callable[[str, Callable[[], Any]], Any]
"""`hook(op_name, call)`: run `call()` (when it decides) and return its result."""

_label: contextvars.ContextVar[str | None] = contextvars.ContextVar("overlap_label", default=None)
_hook: contextvars.ContextVar[OpHook | None] = contextvars.ContextVar("overlap_op_hook", default=None)
_backend: contextvars.ContextVar[str | None] = contextvars.ContextVar("overlap_backend", default=None)


@contextlib.contextmanager
def bound(var: contextvars.ContextVar[T], value: T) -> Iterator[None]:
    """Set `var` to `value` for the block (in the current context only), then restore it."""
    token = var.set(value)
    try:
        yield
    finally:
        var.reset(token)


def labelled(tag: str | None) -> contextlib.AbstractContextManager[None]:
    """Name the microbatch (and layer) of the ops called in the block, e.g. ``mb1.l3``."""
    return bound(_label, tag)


def current_label(op: str) -> str:
    """`op@<tag>` when a label is set, else ``""``."""
    tag = _label.get()
    return f"{op}@{tag}" if tag else ""


def intercepted(hook: OpHook | None) -> contextlib.AbstractContextManager[None]:
    """Route the op calls of the block through `hook` (None: run them directly)."""
    return bound(_hook, hook)


def current_hook() -> OpHook | None:
    """The op interceptor of the current context, or None."""
    return _hook.get()


def forced_backend() -> str | None:
    """The backend `use_backend` forces in the current context, or None."""
    return _backend.get()
