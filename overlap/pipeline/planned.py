"""The planned executor: one forward of a protocol layer as a graph of op nodes, planned and run on
the compute / comm_setup / comm_teardown streams.

Owns: the overlap strategy as data (`Strategy`: the stages of one pipeline step with their
microbatch offsets, and the stages hoisted earlier), turning a layer call into a `Graph` whose node
functions run in the caller's context, and running its plan. Never decides how to split (that is
`policy`) and never changes what the layer computes.

The default strategy, `TWO_BATCH` (step s of a layer cut into microbatches)::

    step s:  route@mb s, dispatch_setup@mb s                     (start mb s's dispatch)
             dispatch_teardown@mb s-1, experts@mb s-1, combine_setup@mb s-1
             shared@mb s-2, combine_teardown@mb s-2             (shared experts hide the combine)

with mb 0's shared experts hoisted right after its dispatch_setup (nothing else could hide the
first dispatch). Microbatch i's dispatch travels while microbatch i-1's experts compute, and its
combine while microbatch i+1's experts (and the shared experts) compute. At most
`policy.in_flight_budget()` exchanges of each kind are in flight: explicit edges
`dispatch_teardown@mb i → dispatch_setup@mb i+budget`, likewise for combine.

Where it runs (`streams_for`): on npu/cuda, compute on the current stream and the setups and
teardowns on their own streams. On CPU every stage runs on the calling thread, in plan order
(`CPU_ON_CALLER = True`): a CPU setup is CPU work that returns once its rows are staged, and a
teardown is a bounded wait plus CPU work, so comm worker threads would only add a thread handoff
(a scheduler slice on a busy host) at each cross-stream edge, four per exchange, and a compute gap
after every teardown. The transfers still travel on the transport's own thread (and the link's
sleep) while the caller computes, and the order is deterministic: the first dispatch's setup is
issued before the shared experts that hide it, and each teardown runs right before its experts.

Planning is pure and depends only on the shape of a call (microbatches, layer index, budget,
strategy), so a call on the caller's thread reuses one plan per shape (`cached_plan`), its node
functions bound per call (`prepare`, `run`); planning each call cost about 0.35 ms of the caller's
CPU per microbatch.
"""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .. import ops
from .. import streams as _streams
from ..graph import Graph, Node, Plan
from ..ops import context as op_context
from . import policy
from .protocol import LayerCall, MoEProtocol, Routes, _executor

Stage = tuple[str, int]
"""`(stage name, microbatch)` or, in a strategy's step, `(stage name, microbatch offset)`."""

STAGES = ("route", "dispatch_setup", "dispatch_teardown", "experts", "combine_setup", "shared", "combine_teardown")
KIND = {
    "dispatch_setup": "comm_issue",
    "combine_setup": "comm_issue",
    "dispatch_teardown": "comm_wait",
    "combine_teardown": "comm_wait",
}
# The data each stage reads (same microbatch).
DEPENDS = {
    "route": (),
    "dispatch_setup": ("route",),
    "dispatch_teardown": ("route", "dispatch_setup"),
    "experts": ("dispatch_teardown",),
    "combine_setup": ("route", "dispatch_teardown", "experts"),
    "shared": (),
    "combine_teardown": ("route", "dispatch_teardown", "combine_setup", "experts", "shared"),
}


@dataclass(frozen=True)
class Strategy:
    """An overlap strategy as data.

    Attributes:
        step: the stages one pipeline step runs, as `(stage, microbatch offset)`: step s runs each
            stage on microbatch `s - offset`.
        hoisted: `(stage, anchor)` pairs: `stage` runs right after `anchor` instead of in its step.
    """

    step: tuple[Stage, ...]
    hoisted: tuple[tuple[Stage, Stage], ...] = ()

    def __post_init__(self) -> None:
        names = [name for name, _ in self.step]
        if sorted(names) != sorted(STAGES):
            raise ValueError(f"step must name every stage of {STAGES} once, got {names}")

    def order(self, count: int) -> list[Stage]:
        """Every `(stage, microbatch)` of a `count`-microbatch layer, in pipeline order."""
        depth = max(offset for _, offset in self.step)
        seq = [
            (name, s - offset) for s in range(count + depth) for name, offset in self.step if 0 <= s - offset < count
        ]
        for item, anchor in self.hoisted:
            if item in seq and anchor in seq:
                seq.remove(item)
                seq.insert(seq.index(anchor) + 1, item)
        return seq


TWO_BATCH = Strategy(
    step=(
        ("route", 0),
        ("dispatch_setup", 0),
        ("dispatch_teardown", 1),
        ("experts", 1),
        ("combine_setup", 1),
        ("shared", 2),
        ("combine_teardown", 2),
    ),
    hoisted=((("shared", 0), ("dispatch_setup", 0)),),
)


CPU_ON_CALLER = True
"""Run a CPU plan's setups and teardowns on the calling thread (False: on the pooled comm workers,
as on a device; kept for side-by-side measurement)."""


def streams_for(plan: Any, device: torch.device) -> dict[str, _streams.Stream] | None:
    """The streams `plan` runs on for tensors on `device`.

    - cpu: every plan stream on the calling thread (the host stream) with `CPU_ON_CALLER`: no thread
      handoff inside a layer call; else None (`Plan.run`'s defaults: comm on the pooled workers).
    - a device: the caller's current stream for every plan stream. (None there would make
      `Plan.run` take the defaults of the *default* device, the cpu: host-timed nodes, not device
      time.) The ops move their bytes on the transport's own stream, so one device stream loses no
      overlap, and no tensor crosses streams (no allocator hazard); the plan's timing events on it
      give every node's device time.
    """
    if device.type == "cpu":
        return {name: _streams.host_stream() for name in plan.streams} if CPU_ON_CALLER else None
    current = _streams.current_stream(device)
    return {name: current for name in plan.streams}


def _in_caller_context(fn: Callable[[dict[Node, Any]], Any], label: str) -> Callable[[dict[Node, Any]], Any]:
    """`fn` run in a copy of the caller's context (options, backend), labelled, with no op
    interceptor and no executor, and with the caller's grad / inference mode (thread-local in torch):
    the plan runs nodes on stream workers."""
    caller = contextvars.copy_context()
    grad_enabled, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def body(inputs: dict[Node, Any]) -> Any:
        with (
            op_context.labelled(label),
            op_context.intercepted(None),
            op_context.bound(_executor, None),
            torch.inference_mode(inference),
            torch.set_grad_enabled(grad_enabled),
        ):
            return fn(inputs)

    return lambda inputs: caller.copy().run(body, inputs)


def _bind(
    layer: MoEProtocol,
    call: LayerCall,
    x: Tensor,
    routes: Routes | None,
    split: policy.Split,
    layer_index: int,
) -> tuple[dict[Stage, Callable[[dict[Node, Any]], Any]], list[ops.Transfer]]:
    """The node functions of one layer call, by `(stage, microbatch)`, each run in the caller's
    context, and the list the setup nodes append their transfers to while running."""
    transfers: list[ops.Transfer] = []
    count, args, kw, quant = split.count, call.args, call.shared, call.quant_mode
    node = {(st, i): Node(st, microbatch=i, layer=layer_index) for st in STAGES for i in range(count)}
    chunks = [split.chunk(x, i) for i in range(count)]

    def fns(i: int) -> dict[str, Callable[[dict[Node, Any]], Any]]:
        chunk, mask = chunks[i]

        def get(inputs: dict[Node, Any], stage: str) -> Any:
            return inputs[node[stage, i]]

        def route(inputs):
            return layer.moe_route(chunk) if routes is None else tuple(split.chunk(r, i)[0] for r in routes)

        def dispatch_setup(inputs):
            ids, _ = get(inputs, "route")
            out = ops.dispatch_setup(chunk, ids, *args, x_active_mask=mask, quant_mode=quant, **kw)
            keep(out[2])
            return out

        def dispatch_teardown(inputs):
            ids, _ = get(inputs, "route")
            y, expand_idx, cmd = get(inputs, "dispatch_setup")
            # expand_idx rides along: a comm_wait is the only consumer of its comm_issue.
            return (*ops.dispatch_teardown(chunk, y, ids, cmd, *args, quant_mode=quant, **kw), expand_idx)

        def experts(inputs):
            expand_x, scales, _, nums, _ = get(inputs, "dispatch_teardown")
            return layer.moe_experts(expand_x, scales, nums)

        def combine_setup(inputs):
            ids, _ = get(inputs, "route")
            result = ops.combine_setup(get(inputs, "experts"), ids, get(inputs, "dispatch_teardown")[2], *args, **kw)
            keep(result[1])
            return result

        def shared(inputs):
            return layer.moe_shared(chunk)

        def combine_teardown(inputs):
            ids, w = get(inputs, "route")
            expand_idx = get(inputs, "dispatch_teardown")[4]
            qx, cmd = get(inputs, "combine_setup")
            return ops.combine_teardown(
                get(inputs, "experts"),
                qx,
                ids,
                expand_idx,
                w,
                cmd,
                *args,
                x_active_mask=mask,
                shared_expert_x=get(inputs, "shared"),
                **kw,
            )

        return dict(
            route=route,
            dispatch_setup=dispatch_setup,
            dispatch_teardown=dispatch_teardown,
            experts=experts,
            combine_setup=combine_setup,
            shared=shared,
            combine_teardown=combine_teardown,
        )

    def keep(comm_cmd_info: Tensor) -> None:
        t = ops.transfer_of(comm_cmd_info)
        if t is not None:
            transfers.append(t)

    bound = {}
    for i in range(count):
        for stage, fn in fns(i).items():
            bound[stage, i] = _in_caller_context(fn, f"mb{i}.l{layer_index}")
    return bound, transfers


def _graph(
    count: int,
    layer_index: int,
    budget: int,
    strategy: Strategy,
    fn_of: Callable[[Stage], Callable[[dict[Node, Any]], Any]],
) -> Graph:
    """The graph of a `count`-microbatch layer call: its nodes in the strategy's pipeline order
    (their priorities), the data edges of `DEPENDS`, the in-flight budget's edges; `fn_of(stage)`
    gives each node's function."""
    g = Graph()
    node = {(st, i): Node(st, microbatch=i, layer=layer_index) for st in STAGES for i in range(count)}
    for priority, (stage, i) in enumerate(strategy.order(count)):
        after = [node[d, i] for d in DEPENDS[stage]]
        if stage.endswith("_setup") and i >= budget:  # the in-flight budget
            after.append(node[stage.replace("setup", "teardown"), i - budget])
        g.add(node[stage, i], fn_of((stage, i)), after=after, kind=KIND.get(stage, "compute"), priority=priority)
    return g


def build(
    layer: MoEProtocol,
    call: LayerCall,
    x: Tensor,
    routes: Routes | None,
    split: policy.Split,
    layer_index: int,
    strategy: Strategy = TWO_BATCH,
) -> tuple[Graph, list[Node], list[ops.Transfer]]:
    """The graph of one layer call, its node functions bound in: returns it, the nodes whose
    results are the microbatches' outputs (in order), and the list the setup nodes append their
    transfers to while running."""
    bound, transfers = _bind(layer, call, x, routes, split, layer_index)
    g = _graph(split.count, layer_index, policy.in_flight_budget(), strategy, bound.__getitem__)
    return g, _outputs(split.count, layer_index), transfers


def _outputs(count: int, layer_index: int) -> list[Node]:
    return [Node("combine_teardown", microbatch=i, layer=layer_index) for i in range(count)]


# ---- one plan per shape, reused: the calls bind their functions through a context variable ----

_BOUND: contextvars.ContextVar[dict[Stage, Callable[[dict[Node, Any]], Any]]] = contextvars.ContextVar(
    "overlap_planned_bound"
)


@dataclass(frozen=True)
class _Slot:
    """A cached plan's node function: runs the function the current call bound for its stage
    (`_BOUND`, set by `run` on the caller's thread, where every node of a caller-run plan runs)."""

    stage: str
    microbatch: int

    def __call__(self, inputs: dict[Node, Any]) -> Any:
        return _BOUND.get()[self.stage, self.microbatch](inputs)


@functools.lru_cache(maxsize=256)
def cached_plan(count: int, layer_index: int, budget: int, strategy: Strategy = TWO_BATCH) -> Plan:
    """The plan of a `count`-microbatch call of layer `layer_index` under `budget`, planned once:
    planning (validation, events, order) is pure and the same for every call of that shape, so
    only the node functions change, bound per call (`run`). Its nodes' functions are `_Slot`s."""
    return _graph(count, layer_index, budget, strategy, lambda st: _Slot(*st)).plan()


def prepare(
    layer: MoEProtocol,
    call: LayerCall,
    x: Tensor,
    routes: Routes | None,
    split: policy.Split,
    layer_index: int,
    strategy: Strategy = TWO_BATCH,
) -> tuple[Plan, dict[Stage, Callable[[dict[Node, Any]], Any]], list[ops.Transfer]]:
    """The plan of one layer call, its node functions, and the list its setups append their
    transfers to. On the caller's thread (CPU with `CPU_ON_CALLER`, or a device, where streams
    queue work from the calling thread) the plan is `cached_plan`'s, its functions bound at `run`;
    CPU comm workers get a plan of their own (they do not see the caller's context variables)."""
    budget = policy.in_flight_budget()
    bound, transfers = _bind(layer, call, x, routes, split, layer_index)
    if x.device.type != "cpu" or CPU_ON_CALLER:
        return cached_plan(split.count, layer_index, budget, strategy), bound, transfers
    return _graph(split.count, layer_index, budget, strategy, bound.__getitem__).plan(), bound, transfers


def run(
    plan: Plan, bound: dict[Stage, Callable[[dict[Node, Any]], Any]], device: torch.device, timeline: Any = None
) -> list[Any]:
    """Run a plan of `prepare` with this call's functions bound; the microbatches' outputs, in order."""
    token = _BOUND.set(bound)
    try:
        results = plan.run(streams_for(plan, device), timeline=timeline)
    finally:
        _BOUND.reset(token)
    outputs = sorted((n for n in plan.nodes if n.op == "combine_teardown"), key=lambda n: n.microbatch or 0)
    return [results[n] for n in outputs]
