"""Exception classes of `overlap`, one module, each saying when it is raised.

Bad *values* raise the builtin `ValueError`, bad *types* `TypeError`; both name the parameter, the
value and the allowed range. Everything below is about misuse of plans and handles, or about a
communication that did not complete.
"""

from __future__ import annotations


def add_note(exc: BaseException, note: str) -> None:
    """Attach `note` to `exc` once (`BaseException.add_note` on Python >= 3.11; the same
    `__notes__` list, which tracebacks print, on 3.10)."""
    notes = getattr(exc, "__notes__", None)
    if notes is None:
        notes = []
        exc.__notes__ = notes  # type: ignore[attr-defined]
    if note not in notes:
        notes.append(note)


class OverlapError(RuntimeError):
    """Base of every error `overlap` defines itself."""


class HandleError(OverlapError):
    """A communication handle was misused: torn down twice, torn down by the wrong op (a combine
    teardown given a dispatch ticket), torn down without its setup, or left in flight when a
    scheduler context exits."""


class PlanError(OverlapError):
    """A graph cannot become a plan: it has a cycle, a teardown without its setup, a handle consumed
    twice, or ranks whose plans would issue collectives in different orders."""


class DeadlockError(PlanError):
    """The simulator (or the runtime) found a plan that cannot make progress."""


class CommTimeoutError(OverlapError, TimeoutError):
    """A teardown or a plan wait did not complete in time. The message names the op, the microbatch
    (when known) and the peers that have not delivered."""


class CommError(OverlapError):
    """A transfer failed: a peer died, the transport raised, or ranks disagreed on parameters."""


class CapacityError(OverlapError):
    """More transfers are in flight on one group than its buffer budget allows (the double-buffer
    limit, the portable analogue of HCCL_BUFFSIZE's factor 2)."""


__all__ = [
    "add_note",
    "OverlapError",
    "HandleError",
    "PlanError",
    "DeadlockError",
    "CommTimeoutError",
    "CommError",
    "CapacityError",
]
