"""Run a rank function on a chosen carrier: `pool.run(on, carrier, fn, *args)`.

The CPU carriers are `window` (the default: ranks of one machine) and `gloo`. Tests of the protocol
(faults, reliability, the link) are parametrized over `CPU_CARRIERS` for their important cases,
so both carriers run them; `OVERLAP_TRANSPORT` is set in the rank processes for the call only.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

CPU_CARRIERS = ("window", "gloo")


@contextlib.contextmanager
def forced(kind: str | None) -> Iterator[None]:
    """`OVERLAP_TRANSPORT=kind` in this process for the block (None: the default choice)."""
    old = os.environ.get("OVERLAP_TRANSPORT")
    if kind is None:
        os.environ.pop("OVERLAP_TRANSPORT", None)
    else:
        os.environ["OVERLAP_TRANSPORT"] = kind
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("OVERLAP_TRANSPORT", None)
        else:
            os.environ["OVERLAP_TRANSPORT"] = old


def on(kind: str | None, fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)` with the carrier `kind` forced (in a rank process)."""
    with forced(kind):
        return fn(*args)
