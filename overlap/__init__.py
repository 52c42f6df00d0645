"""overlap: hide MoE expert-parallel communication behind computation.

The four split ops (`overlap.ops`: torch_npu's signatures; torch_npu on Ascend, portable over
torch.distributed elsewhere), a stream/event abstraction (`overlap.streams`), a dependency-graph
scheduler (`overlap.graph`), and the layer-level scheduler context with microbatch pipelining::

    import overlap
    with overlap.scheduler(microbatches=2) as s:
        out = moe_layer(x)
    print(s.report())
"""

from __future__ import annotations

from . import integrations, ops, pipeline
from .errors import CapacityError, CommError, CommTimeoutError, HandleError, OverlapError, PlanError
from .graph import Graph, Node, Plan
from .moe import MoELayer
from .pipeline import Scheduler, scheduler, wrap
from .streams import Event, Stream
from .timeline import OverlapReport, Timeline

# ep_implementation="overlap" for transformers, in every process that imports overlap (lazily: this
# imports nothing; see overlap.integrations).
integrations.install_hooks()

__version__ = "0.1.0"

__all__ = [
    "CapacityError",
    "CommError",
    "CommTimeoutError",
    "Event",
    "Graph",
    "HandleError",
    "MoELayer",
    "Node",
    "OverlapError",
    "OverlapReport",
    "Plan",
    "PlanError",
    "Scheduler",
    "Stream",
    "Timeline",
    "ops",
    "pipeline",
    "scheduler",
    "wrap",
]
