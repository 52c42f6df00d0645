"""Hold an exchange open on the link until the test says so: overlap made visible without timing.

`LinkGates(hold={1, 2})` counts the exchanges the link carries in this process (0, 1, 2, ... in
setup order: one group's exchanges run one after another on its worker) and keeps exchange i of
`hold` from completing until `release(i)`. Install its link with
`ops.configure(link=gates.link())`. The transport asks the link for an exchange's duration on the
group's worker thread after the payload has moved and before the exchange is marked complete, so
a gate that blocks there holds the transfer open (`Transfer.is_complete` stays False and its
teardown waits). A gate that is never released gives up after `safety_s` and records the index in
`expired`: the test then fails instead of hanging.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import ClassVar

from overlap.ops import EmulatedLink

SAFETY_S = 30.0


@dataclass(frozen=True)
class GatedLink(EmulatedLink):
    """An `EmulatedLink` that calls `on_exchange(index)` before modelling exchange `index`."""

    blocking: ClassVar[bool] = True  # a gate blocks in `duration`: carriers ask it on their link thread
    on_exchange: Callable[[int], None] | None = field(default=None, compare=False)
    calls: list = field(default_factory=list, compare=False)

    def duration(self, nbytes: int) -> float:
        index = len(self.calls)
        self.calls.append(nbytes)
        if self.on_exchange is not None:
            self.on_exchange(index)
        return super().duration(nbytes)


class LinkGates:
    """Per-exchange gates: `entered[i]` is set when exchange i reaches the link, `release(i)` lets it
    complete. Exchanges not in `hold` pass straight through."""

    def __init__(self, hold: Iterable[int], safety_s: float = SAFETY_S) -> None:
        self.hold = set(hold)
        self.safety_s = safety_s
        self.entered = {i: threading.Event() for i in self.hold}
        self._release = {i: threading.Event() for i in self.hold}
        self.released_at_entry: dict[int, bool] = {}
        self.expired: list[int] = []

    def __call__(self, index: int) -> None:
        if index not in self.hold:
            return
        self.entered[index].set()
        self.released_at_entry[index] = self._release[index].is_set()
        if not self._release[index].wait(self.safety_s):
            self.expired.append(index)

    def release(self, index: int) -> None:
        self._release[index].set()

    def release_all(self) -> None:
        for event in self._release.values():
            event.set()

    def is_released(self, index: int) -> bool:
        return self._release[index].is_set()

    def wait_entered(self, index: int) -> bool:
        """Block until exchange `index` is on the link (False after `safety_s`)."""
        return self.entered[index].wait(self.safety_s)

    def link(self, latency_s: float = 0.0, bandwidth_bytes_per_s: float = 1e12) -> GatedLink:
        return GatedLink(latency_s=latency_s, bandwidth_bytes_per_s=bandwidth_bytes_per_s, on_exchange=self)
