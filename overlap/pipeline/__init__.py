"""The pipeline layer: everything above the graph that decides how an MoE forward is cut and run.

Modules, bottom-up (each imports only those before it):

- `policy`: the one splitting rule and the one in-flight budget.
- `protocol`: the MoE protocol a layer implements, and the executor active in the context.
- `serial`: the serial executor, the one-exchange forward inside a fiber, and `forward`, the entry
  every protocol layer calls.
- `recording`: what an unplanned run did (fibers, direct op calls).
- `planned`: the planned executor (the overlap strategy as data, built into a graph and run).
- `fibers`: the fiber executor for modules that call the ops themselves.
- `context`: `scheduler()`, `Scheduler`, `wrap()`.
"""

from __future__ import annotations

from .context import Pipelined, Scheduler, current_scheduler, scheduler, wrap
from .planned import TWO_BATCH, Strategy
from .policy import MAX_TOKENS_PER_CALL, Split, split
from .protocol import MoEProtocol, is_protocol_layer
from .recording import Recording
from .serial import forward, serial_forward

__all__ = [
    "MAX_TOKENS_PER_CALL",
    "TWO_BATCH",
    "MoEProtocol",
    "Pipelined",
    "Recording",
    "Scheduler",
    "Split",
    "Strategy",
    "current_scheduler",
    "forward",
    "is_protocol_layer",
    "scheduler",
    "serial_forward",
    "split",
    "wrap",
]
