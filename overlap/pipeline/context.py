"""The scheduler context: protocol layers and wrapped modules called inside it run pipelined.

Owns: `Scheduler` (the state of one `with overlap.scheduler(...)` block: the plans the planned
executor ran, what the fibers and the context's own thread recorded, one timeline of all of it,
and the layer count), `scheduler()`, `wrap()`, and the clean-up on exit (no setup made inside the
context may outlive it). The executor of each call is explicit: a protocol layer runs on the
planned executor, a wrapped module on the one `wrap` chose, an op called directly on the context's
thread as written (recorded). Never changes what a layer computes.

    with overlap.scheduler(microbatches=2) as s:
        out = layer(x)                      # a protocol layer: planned
        out = overlap.wrap(model)(x)        # any module that calls the ops: fibers
    print(s.report()); s.plan.save_png("plan.png"); s.timeline.save_chrome_trace("trace.json")
"""

from __future__ import annotations

import contextvars
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor

from .. import ops
from ..errors import HandleError, add_note
from ..graph import Plan
from ..ops import context as op_context
from ..timeline import OverlapReport, Timeline
from . import fibers, planned, policy
from .protocol import LayerCall, MoEProtocol, Routes, _executor, active_executor, is_protocol_layer
from .recording import LaneRecorder, Recording, add_transfers

EXECUTORS = ("planned", "fibers")
Executor = Literal["planned", "fibers"]


def _world() -> dist.ProcessGroup:
    world = dist.group.WORLD
    if world is None:
        raise RuntimeError("torch.distributed is not initialised: call dist.init_process_group(...) first")
    return world


def current_scheduler() -> Scheduler | None:
    """The innermost active `scheduler` context of the current context, or None (also inside the
    fibers and plan nodes a context runs: there, protocol layers run on other executors)."""
    executor = active_executor()
    return executor if isinstance(executor, Scheduler) else None


@dataclass
class Scheduler:
    """State of one `scheduler(...)` context.

    Attributes:
        group: the EP process group (None: each layer's own `group_ep`).
        microbatches, min_tokens: the splitting rule's parameters (`overlap.pipeline.policy`).
        plans: the plans the planned executor ran, in order.
        recordings: what the fibers and the context's own thread ran, in order.
        timeline: every interval of everything that ran in the context.
    """

    group: dist.ProcessGroup | None = None
    microbatches: int = policy.DEFAULT_MICROBATCHES
    min_tokens: int = policy.DEFAULT_MIN_TOKENS
    plans: list[Plan] = field(default_factory=list)
    recordings: list[Recording] = field(default_factory=list)
    timeline: Timeline = field(default_factory=Timeline)
    num_layers: int = 0
    _tokens: list[contextvars.Token] = field(default_factory=list, repr=False)
    _before: set[int] = field(default_factory=set, repr=False)
    _direct: LaneRecorder | None = field(default=None, repr=False)
    _groups: dict[str, dist.ProcessGroup] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        policy.check_microbatches(self.microbatches, self.min_tokens)

    # -- what ran --

    @property
    def plan(self) -> Plan:
        """The plan the planned executor ran last in this context.

        Raises:
            HandleError: no protocol layer has run here (fibers and direct op calls are recorded
                in `recording`, not planned).
        """
        if not self.plans:
            raise HandleError(
                "no protocol layer has run on the planned executor in this scheduler context; what "
                "fibers and direct op calls ran is in .recording"
            )
        return self.plans[-1]

    @property
    def recording(self) -> Recording:
        """What the fibers (or the context's own thread) ran last.

        Raises:
            HandleError: nothing was recorded in this context.
        """
        self._flush_direct()
        if not self.recordings:
            raise HandleError("nothing ran as fibers or as direct op calls in this scheduler context")
        return self.recordings[-1]

    def report(self, serial_time: float | None = None) -> OverlapReport:
        """Measured overlap of everything that ran in the context (link intervals are the comm).
        `serial_time`: seconds a serial run of the same work took, for a measured speedup (None:
        the estimate `OverlapReport.serial_time` describes, which overstates it)."""
        self._flush_direct()
        return self.timeline.report(serial_time)

    # -- the context --

    def __enter__(self) -> Scheduler:
        policy.warn_if_spinning()  # once per process: idle OpenMP threads that spin starve the comm threads
        self._before = {t.ticket for t in ops.in_flight()}  # only setups made inside count at exit
        self._direct = self._new_direct()
        self._tokens = [_executor.set(self), op_context._hook.set(self._on_direct_op)]
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        """Settle every group the context used, the same way on every rank, then check for leaks.

        Every rank settles (`ops.settle`: one small all-gather per group) with the exception that
        ended its part, or None. If any rank failed, every rank's setups made inside the context
        are cancelled on every rank, sequence numbers and budgets agree again, and a rank that did
        not fail itself raises `CommError` naming the ranks that did (a failed rank re-raises its
        own error). The group is usable by the next context. Without a failure, a setup made
        inside the context and never torn down raises `HandleError`.
        """
        hook_token, executor_token = self._tokens.pop(), self._tokens.pop()
        op_context._hook.reset(hook_token)
        _executor.reset(executor_token)
        self._flush_direct()
        groups = dict(self._groups)
        if self.group is not None:
            groups.setdefault(self.group.group_name, self.group)
        settle_error: BaseException | None = None
        for name, group in groups.items():
            tickets = [t.ticket for t in ops.in_flight(name) if t.ticket not in self._before]
            try:
                ops.settle(group, exc, tickets=tickets)
            except Exception as error:  # noqa: BLE001 - the first one is raised below
                settle_error = settle_error or error
        if settle_error is not None:
            if exc is None:
                raise settle_error
            add_note(exc, f"(then settling the scheduler context failed too: {settle_error})")
        group_name = None if self.group is None else self.group.group_name
        left = [t for t in ops.in_flight(group_name) if t.ticket not in self._before]
        if left:
            names = [t.label or f"{t.op}#{t.ticket}" for t in left]
            message = f"scheduler exited with {len(left)} setups never torn down: {names}"
            if exc_type is None:
                raise HandleError(message)
            warnings.warn(message, RuntimeWarning, stacklevel=2)

    # -- ops called directly on the context's thread: run as written, recorded --

    def _new_direct(self) -> LaneRecorder:
        return LaneRecorder(Recording(), 0, self.num_layers)

    def _on_direct_op(self, name: str, call: Any) -> Any:
        lane = self._direct
        assert lane is not None  # set in __enter__, before the hook is installed
        lane.close_segment(name)
        start = time.perf_counter()
        result = call()
        lane.op_done(name, start, result)
        return result

    def _flush_direct(self) -> None:
        """Commit the op calls recorded on the context's thread since the last flush."""
        lane = self._direct
        if lane is None or not lane.recording.has_ops:
            return
        lane.close_segment("end")
        lane.recording.commit(self.timeline)
        self.recordings.append(lane.recording)
        self.num_layers += max(lane.num_layers, 1)
        self._direct = self._new_direct()

    def _layer_index(self, layer_index: int | None) -> int:
        index = self.num_layers if layer_index is None else layer_index
        self.num_layers = max(self.num_layers, index) + 1
        return index

    def _group(self, call: LayerCall | None = None) -> dist.ProcessGroup:
        if self.group is not None:
            return self.group
        return call.group if call is not None else _world()

    def _use(self, group: dist.ProcessGroup) -> dist.ProcessGroup:
        """Note that the context runs exchanges on `group` (it is settled at exit)."""
        self._groups.setdefault(group.group_name, group)
        return group

    # -- the executors --

    def run_layer(
        self,
        layer: MoEProtocol,
        x: Tensor,
        *,
        routes: Routes | None = None,
        layer_index: int | None = None,
        microbatches: int | None = None,
        min_tokens: int | None = None,
    ) -> Tensor:
        """Run a protocol layer's forward on `x` `(T, H)` on the planned executor; returns `(T, H)`.

        Args:
            layer: implements `MoEProtocol`.
            x: `(T, H)` this rank's tokens (T may differ between ranks, and may be 0).
            routes: optional precomputed `(expert_ids (T, K), expert_scales (T, K))`, for callers
                that routed already (then `layer.moe_route` is not called).
            layer_index: the `.l<j>` of the nodes (default: the count of layers run in this context).
            microbatches, min_tokens: override the context's values for this call.
        """
        self._flush_direct()
        call = LayerCall.of(layer)
        split = policy.agree(
            x.shape[0],
            self._use(self._group(call)),
            self.microbatches if microbatches is None else microbatches,
            self.min_tokens if min_tokens is None else min_tokens,
        )
        if split.count == 0:  # no rank has a token: no exchange at all (every rank sees the same total)
            return x[:0]
        index = self._layer_index(layer_index)
        plan, bound, transfers = planned.prepare(layer, call, x, routes, split, index)
        self.plans.append(plan)
        outputs = planned.run(plan, bound, x.device, self.timeline)
        add_transfers(self.timeline, transfers)
        return torch.cat(outputs)[: x.shape[0]]

    def run_module(self, module: Any, x: Tensor, **kwargs: Any) -> Any:
        """Run `module(x, **kwargs)`, a module that calls the ops (however deep), as microbatch fibers.

        x `(T, ...)` is cut by the policy's rule from the group's largest T (one all-reduce), each
        rank's rows padded with zeros to `count · size`, so that every rank runs the same
        microbatches and no op call carries more than 512 rows. The module must treat rows
        independently (an MoE layer's tokens; a model's sequences: two-batch overlap, where one
        microbatch's attention hides the other's dispatch and combine). Outputs are concatenated
        along dim 0 and trimmed to T rows: tensors, and the tensor fields of dicts / tuples (other
        values come from the first microbatch). With no row on any rank, `module(x)` runs as is.
        """
        self._flush_direct()
        split = policy.agree(x.shape[0], self._use(self._group()), self.microbatches, self.min_tokens)
        if split.count == 0:
            return module(x, **kwargs)
        recording = Recording()
        output, num_layers = fibers.run_module(module, x, kwargs, split, self.num_layers, recording)
        recording.commit(self.timeline)
        self.recordings.append(recording)
        self.num_layers += num_layers
        return output


def scheduler(
    group: dist.ProcessGroup | None = None,
    microbatches: int = policy.DEFAULT_MICROBATCHES,
    *,
    min_tokens: int = policy.DEFAULT_MIN_TOKENS,
) -> Scheduler:
    """Context manager: protocol MoE layers and wrapped modules called inside run pipelined.

    Args:
        group: the EP process group (None: the layer's own `group_ep`; WORLD for wrapped modules).
        microbatches: how many microbatches to split a batch into (see `overlap.pipeline.policy`).
        min_tokens: smallest microbatch worth splitting off (0: always split).

    Raises:
        ValueError: `microbatches` < 1 or `min_tokens` < 0.
    """
    return Scheduler(group=group, microbatches=microbatches, min_tokens=min_tokens)


class Pipelined(torch.nn.Module):
    """`wrap(module)`: inside `overlap.scheduler(...)`, calls run `module` on `executor`; outside a
    context it is `module` itself."""

    def __init__(self, module: torch.nn.Module, executor: Executor) -> None:
        super().__init__()
        if executor not in EXECUTORS:
            raise ValueError(f"executor must be one of {EXECUTORS}, got {executor!r}")
        if executor == "planned" and not is_protocol_layer(module):
            raise TypeError(
                f"executor 'planned' needs a layer implementing the MoE protocol (moe_route, "
                f"moe_experts, moe_shared, moe_comm_kwargs), got {type(module).__name__}"
            )
        self.module, self.executor = module, executor

    def forward(self, x: Tensor, **kwargs: Any) -> Any:
        sched = current_scheduler()
        if sched is None:
            return self.module(x, **kwargs)
        if self.executor == "fibers":
            return sched.run_module(self.module, x, **kwargs)
        if kwargs:
            raise TypeError(
                f"a protocol layer on the planned executor takes only x, got keyword arguments "
                f"{sorted(kwargs)}: wrap it with executor='fibers'"
            )
        return sched.run_layer(self.module, x)  # type: ignore[arg-type]  # checked in __init__


def wrap(module: torch.nn.Module, *, executor: Executor | None = None) -> Pipelined:
    """Wrap an existing MoE module so that inside `overlap.scheduler(...)` its calls are pipelined.

    Args:
        module: a layer implementing the MoE protocol, or any module whose forward calls the four ops.
        executor: "planned" (a protocol layer's graph) or "fibers" (any op-calling module); None
            chooses "planned" for protocol layers and "fibers" otherwise, once, here.
    """
    if executor is None:
        executor = "planned" if is_protocol_layer(module) else "fibers"
    return Pipelined(module, executor)
