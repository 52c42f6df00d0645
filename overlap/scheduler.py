"""The scheduler context: run an MoE layer with its batch split into pipelined microbatches.

Owns: turning one forward of a protocol layer (see `overlap.moe`) into a graph of op nodes,
planning it (`overlap.graph`), running it on the compute / comm_setup / comm_teardown streams,
recording what ran (node intervals plus the link's transfer intervals), and checking on exit that
no setup was left in flight. Never changes what the layer computes: the output equals the
unwrapped layer's.

    with overlap.scheduler(group, microbatches=2) as s:
        out = layer(x)
    print(s.report()); s.plan.save_png("plan.png"); s.timeline.save_chrome_trace("trace.json")

The interleaving (the strategy is data: one list of stages per step, fed to one executor)::

    step s:  route@mb s, dispatch_setup@mb s                     (start mb s's dispatch)
             dispatch_teardown@mb s-1, experts@mb s-1, combine_setup@mb s-1
             shared@mb s-2, combine_teardown@mb s-2             (shared experts hide the combine)

except that mb 0's shared experts run right after its dispatch_setup (they hide the first dispatch),
and microbatch i's dispatch travels while microbatch i-1's experts compute, and its combine while
microbatch i+1's experts (and the shared experts) compute. At most two exchanges of each kind are
ever in flight (explicit edges `dispatch_teardown@mb i → dispatch_setup@mb i+2`, likewise for
combine): the transport's double buffer.

Splitting rule (the same on every rank, from the group's largest batch T, one all-reduce):
`count = max(ceil(T / 512), min(microbatches, T // min_tokens))`, at least 1 — a batch with fewer
than `min_tokens` (default 32) tokens per microbatch is not split further, because below that the
fixed cost of an exchange outweighs what overlap can hide. Every microbatch has the same padded
size on every rank; padding rows are inactive (`x_active_mask`) and never sent.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from . import _context, ops
from .errors import CapacityError, HandleError, PlanError
from .graph import Graph, Node, Plan
from .moe import MAX_TOKENS_PER_CALL, max_tokens, pad_chunk
from .ops import transport
from .timeline import OverlapReport, Timeline

_current: contextvars.ContextVar[Scheduler | None] = contextvars.ContextVar("overlap_scheduler", default=None)

STAGES = ("route", "dispatch_setup", "dispatch_teardown", "experts", "combine_setup", "shared", "combine_teardown")
# Which stages a pipeline step runs, as (stage, microbatch offset): the overlap strategy as data.
PIPELINE_STEP = (
    ("route", 0), ("dispatch_setup", 0),
    ("dispatch_teardown", 1), ("experts", 1), ("combine_setup", 1),
    ("shared", 2), ("combine_teardown", 2),
)


def current_scheduler() -> Scheduler | None:
    """The innermost active `scheduler` context, or None."""
    return _current.get()


def microbatch_count(num_tokens: int, microbatches: int, min_tokens: int) -> int:
    """The splitting rule (module docstring)."""
    by_size = min(microbatches, num_tokens // min_tokens) if min_tokens > 0 else microbatches
    return max(-(-num_tokens // MAX_TOKENS_PER_CALL), by_size, 1)


@dataclass
class Scheduler:
    """State of one `scheduler(...)` context: the plans it ran and their timeline."""

    group: dist.ProcessGroup | None = None
    microbatches: int = 2
    min_tokens: int = 32
    plans: list[Plan] = field(default_factory=list)
    timeline: Timeline = field(default_factory=Timeline)
    _layer_index: int = 0
    _token: Any = None
    _before: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        if isinstance(self.microbatches, bool) or not isinstance(self.microbatches, int) or self.microbatches < 1:
            raise ValueError(f"microbatches must be an int >= 1, got {self.microbatches!r}")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {self.min_tokens}")

    def _new_host(self) -> _Fibers:
        host = _Fibers(self, None, [None], self._layer_index)  # one "fiber": the context's own thread
        host.state[0] = "running"
        host.segment_start[0] = time.perf_counter()
        return host

    def _flush_host(self) -> None:
        """Turn the op calls recorded on the context's own thread since the last flush into a plan."""
        host = getattr(self, "_host", None)
        if host is None or not any(kind != "compute" for _, kind, _, _ in host.executed):
            return
        host._close_segment(0, "end")
        host.commit_to(self, allow_incomplete=True)
        self._host = self._new_host()  # the installed hook looks `_host` up at every call

    @property
    def plan(self) -> Plan:
        """The plan of the last layer run in this context."""
        self._flush_host()
        if not self.plans:
            raise HandleError("no layer has run inside this scheduler context yet")
        return self.plans[-1]

    def report(self) -> OverlapReport:
        """Measured overlap of everything that ran in the context (link intervals are the comm)."""
        self._flush_host()
        return self.timeline.report()

    def __enter__(self) -> Scheduler:
        self._token = _current.set(self)
        self._before = {t.ticket for t in ops.in_flight()}  # only setups made inside count at exit
        # Ops called directly on this thread (an unwrapped op-calling layer) run as they are, in
        # order, but are recorded: `plan`, `report()` and `timeline` show them too.
        self._host = self._new_host()
        self._host_hook = _context.hooked(lambda name, call: self._host._on_op(0, name, call))
        self._host_hook.__enter__()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._host_hook.__exit__(exc_type, exc, tb)
        self._flush_host()
        _current.reset(self._token)
        group_name = None if self.group is None else self.group.group_name
        left = [t for t in ops.in_flight(group_name) if t.ticket not in self._before]
        if left:
            names = [t.label or f"{t.op}#{t.ticket}" for t in left]
            message = f"scheduler exited with {len(left)} setups never torn down: {names}"
            if exc_type is None:
                raise HandleError(message)
            warnings.warn(message, RuntimeWarning, stacklevel=2)

    def run(self, module: Any, x: Tensor, **kwargs: Any) -> Any:
        """Run `module(x, **kwargs)` pipelined: a protocol layer through `run_layer`; any other module
        (one whose forward calls the ops, however deep) as cooperative microbatch fibers.

        For an op-calling module, x `(T, ...)` is split along dim 0 into `count` near-equal chunks,
        `count = max(1, min(microbatches, T_min // min_tokens))` with `T_min` the smallest batch of the
        group (one all-reduce), so that every chunk has a row on every rank; the module must treat
        rows independently (an MoE layer's tokens; a model's sequences: two-batch overlap, where one
        microbatch's attention hides the other's dispatch and combine). Outputs are concatenated
        along dim 0: tensors, and the tensor fields of dicts / dataclass-like outputs (others from
        the first microbatch).
        """
        if _is_protocol_layer(module) and not kwargs:
            return self.run_layer(module, x)
        group = self.group if self.group is not None else dist.group.WORLD
        t = torch.tensor([x.shape[0]], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
        smallest = int(t)
        count = max(1, min(self.microbatches, smallest // self.min_tokens if self.min_tokens else smallest))
        chunks = list(torch.tensor_split(x, count)) if count > 1 else [x]
        self._flush_host()
        fibers = _Fibers(self, module, chunks, self._layer_index, kwargs)
        with _fsdp_gathered(module):
            outputs = fibers.run()
        fibers.commit_to(self)
        return _concat(outputs) if count > 1 else outputs[0]

    # -- building and running one layer --

    def run_layer(self, layer: Any, x: Tensor, *, routes: tuple[Tensor, Tensor] | None = None,
                  layer_index: int | None = None, microbatches: int | None = None,
                  min_tokens: int | None = None) -> Tensor:
        """Run a protocol layer's forward on `x` `(T, H)` pipelined; returns `(T, H)`.

        Args:
            layer: implements the MoE protocol (`overlap.moe`).
            x: `(T, H)` this rank's tokens (T may differ between ranks, and may be 0).
            routes: optional precomputed `(expert_ids (T, K), expert_scales (T, K))`, for callers
                that routed already (then `layer.moe_route` is not called).
            layer_index: the `.l<j>` of the nodes (default: the count of layers run in this context).
            microbatches, min_tokens: override the context's values for this call.
        """
        kw = layer.moe_comm_kwargs()
        head = {k: kw.pop(k) for k in ("group_ep", "ep_world_size", "ep_rank_id", "moe_expert_num")}
        quant_mode = kw.pop("quant_mode", 0)
        group = self.group or dist.distributed_c10d._resolve_process_group(head["group_ep"])
        total = max_tokens(x.shape[0], group)
        if total == 0:  # no rank has a token: no exchange at all (every rank sees the same total)
            return x[:0]
        count = microbatch_count(total, microbatches or self.microbatches,
                                 self.min_tokens if min_tokens is None else min_tokens)
        size = max(-(-total // count), 1)
        if layer_index is None:
            layer_index = self._layer_index
        self._layer_index += 1
        graph, outputs, transfers = self._build(layer, x, routes, count, size, layer_index, head, kw, quant_mode)
        plan = graph.plan()
        self.plans.append(plan)
        results = plan.run(timeline=self.timeline)
        for transfer in transfers:
            if transfer.started_at is not None and transfer.finished_at is not None:
                self.timeline.add("link", transfer.label or transfer.op, transfer.started_at, transfer.finished_at,
                                  kind="comm")
        return torch.cat([results[n] for n in outputs])[: x.shape[0]]

    def _build(self, layer: Any, x: Tensor, routes: tuple[Tensor, Tensor] | None, count: int, size: int,
               layer_index: int, head: dict, kw: dict,
               quant_mode: int) -> tuple[Graph, list[Node], list[transport.Transfer]]:
        g = Graph()
        a = (head["group_ep"], head["ep_world_size"], head["ep_rank_id"], head["moe_expert_num"])
        transfers: list[transport.Transfer] = []  # filled by the setup nodes, read after the run
        node = {(st, i): Node(st, microbatch=i, layer=layer_index) for st in STAGES for i in range(count)}
        chunks = [pad_chunk(x, i * size, size) for i in range(count)]

        # Grad and inference mode are thread-local: the nodes run on stream workers, so they take
        # the caller's modes with them (a no_grad forward must not build autograd graphs there).
        grad_enabled, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

        def labelled(i: int, fn):
            def run(inputs: dict[Node, Any]) -> Any:
                with _context.labelled(f"mb{i}.l{layer_index}"), torch.inference_mode(inference), \
                        torch.set_grad_enabled(grad_enabled):
                    return fn(inputs)
            return run

        def get(inputs: dict[Node, Any], stage: str, i: int) -> Any:
            return inputs[node[stage, i]]

        for i in range(count):
            chunk, mask = chunks[i]

            def route(inputs, i=i, chunk=chunk):
                if routes is None:
                    return layer.moe_route(chunk)
                return tuple(pad_chunk(r, i * size, size)[0] for r in routes)

            def dispatch_setup(inputs, i=i, chunk=chunk, mask=mask):
                ids, _ = get(inputs, "route", i)
                out = ops.dispatch_setup(chunk, ids, *a, x_active_mask=mask, quant_mode=quant_mode, **kw)
                t = transport.transfer_of(out[2])
                if t is not None:
                    transfers.append(t)
                return out

            def dispatch_teardown(inputs, i=i, chunk=chunk):
                ids, _ = get(inputs, "route", i)
                y, expand_idx, cmd = get(inputs, "dispatch_setup", i)
                # expand_idx rides along: a comm_wait is the only consumer of its comm_issue.
                return (*ops.dispatch_teardown(chunk, y, ids, cmd, *a, quant_mode=quant_mode, **kw), expand_idx)

            def experts(inputs, i=i):
                expand_x, scales, _, nums, _ = get(inputs, "dispatch_teardown", i)
                return layer.moe_experts(expand_x, scales, nums)

            def combine_setup(inputs, i=i):
                ids, _ = get(inputs, "route", i)
                assist = get(inputs, "dispatch_teardown", i)[2]
                out = get(inputs, "experts", i)
                result = ops.combine_setup(out, ids, assist, *a, **kw)
                t = transport.transfer_of(result[1])
                if t is not None:
                    transfers.append(t)
                return result

            def shared(inputs, chunk=chunk):
                return layer.moe_shared(chunk)

            def combine_teardown(inputs, i=i, mask=mask):
                ids, w = get(inputs, "route", i)
                expand_idx = get(inputs, "dispatch_teardown", i)[4]
                qx, cmd = get(inputs, "combine_setup", i)
                out = get(inputs, "experts", i)
                return ops.combine_teardown(out, qx, ids, expand_idx, w, cmd, *a, x_active_mask=mask,
                                            shared_expert_x=get(inputs, "shared", i), **kw)

            fns = dict(route=route, dispatch_setup=dispatch_setup, dispatch_teardown=dispatch_teardown,
                       experts=experts, combine_setup=combine_setup, shared=shared,
                       combine_teardown=combine_teardown)
            deps = {
                "route": [], "dispatch_setup": ["route"], "dispatch_teardown": ["route", "dispatch_setup"],
                "experts": ["dispatch_teardown"], "combine_setup": ["route", "dispatch_teardown", "experts"],
                "shared": [], "combine_teardown": ["route", "dispatch_teardown", "combine_setup", "experts", "shared"],
            }
            for stage in STAGES:
                after = [node[d, i] for d in deps[stage]]
                if stage in ("dispatch_setup", "combine_setup") and i >= 2:  # the double buffer
                    after.append(node[stage.replace("setup", "teardown"), i - 2])
                g.add(node[stage, i], labelled(i, fns[stage]), after=after,
                      kind={"dispatch_setup": "comm_issue", "combine_setup": "comm_issue",
                            "dispatch_teardown": "comm_wait", "combine_teardown": "comm_wait"}.get(stage, "compute"),
                      priority=_priority(stage, i))
        return g, [node["combine_teardown", i] for i in range(count)], transfers


def _priority(stage: str, microbatch: int) -> float:
    """Position of (stage, microbatch) in the pipeline order of `PIPELINE_STEP`. The first
    microbatch's shared experts run right after its dispatch_setup instead: nothing else could
    hide the first dispatch."""
    width = len(PIPELINE_STEP)
    if stage == "shared" and microbatch == 0:
        return 1.5
    for slot, (name, offset) in enumerate(PIPELINE_STEP):
        if name == stage:
            return (microbatch + offset) * width + slot
    raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")


def scheduler(group: dist.ProcessGroup | None = None, microbatches: int = 2, *, min_tokens: int = 32) -> Scheduler:
    """Context manager: protocol MoE layers called inside run pipelined over `microbatches`.

    Args:
        group: the EP process group (None: the layer's own `group_ep`).
        microbatches: how many microbatches to split a batch into (see the splitting rule).
        min_tokens: smallest microbatch worth splitting off (0: always split).
    """
    return Scheduler(group=group, microbatches=microbatches, min_tokens=min_tokens)


# --------------------------------------------------------------------------------------------
# Layers that call the ops themselves: cooperative microbatch fibers
# --------------------------------------------------------------------------------------------


class _Abort(BaseException):
    """Unwinds the other fibers when one of them failed (never escapes `_Fibers.run`)."""


class _Fibers:
    """Runs an unmodified op-calling module once per microbatch, as cooperative threads.

    Exactly one fiber runs at a time (it holds the turn). A fiber hands the turn on, round robin,
    when it reaches a teardown: the next microbatch computes while this one's transfer travels;
    when the turn comes back, the fiber waits for its transfer (usually landed by then) and goes
    on. A setup that would exceed the in-flight budget hands the turn on too, so that an earlier
    microbatch tears down first. Every decision depends only on the order of op calls, which is
    the same on every rank, so every rank issues the same exchanges in the same order.
    """

    def __init__(self, sched: Scheduler, module: Any, chunks: list[Tensor], layer_base: int,
                 kwargs: dict | None = None) -> None:
        self.sched, self.module, self.chunks, self.kwargs = sched, module, chunks, kwargs or {}
        self.count = len(chunks)
        self.cv = threading.Condition()
        self.turn = 0
        self.state = ["ready"] * self.count  # ready | running | at_teardown | at_setup | done
        self.outputs: list[Tensor | None] = [None] * self.count
        self.error: BaseException | None = None
        self.in_flight = {"dispatch": 0, "combine": 0}
        self.calls = [dict() for _ in range(self.count)]  # per fiber: op name -> calls so far
        self.segment_start = [0.0] * self.count
        self.segment_index = [0] * self.count
        self.executed: list[tuple[Node, str, float, float]] = []  # (node, kind, start, end)
        self.transfers: list[transport.Transfer] = []
        self.layer_base = layer_base
        self.grad_enabled, self.inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    # -- the turn --

    def _next(self, i: int) -> int:
        for step in range(1, self.count + 1):
            j = (i + step) % self.count
            if self.state[j] != "done":
                return j
        return i

    def _hand_on(self, i: int, state: str) -> None:
        """Give the turn away (if another fiber can use it) and wait until it comes back."""
        with self.cv:
            self.state[i] = state
            self.turn = self._next(i)
            self.cv.notify_all()
            self.cv.wait_for(lambda: self.turn == i or self.error is not None)
            if self.error is not None:
                raise _Abort
            self.state[i] = "running"

    # -- recording --

    def _close_segment(self, i: int, before: str) -> None:
        """Record the compute since the fiber's last op call (named for the layer of the next op)."""
        now = time.perf_counter()
        layer = self.layer_base + max(self.calls[i].get(before, 0) - (before == "end"), 0)
        k = self.segment_index[i]
        self.segment_index[i] += 1
        self.executed.append((Node(f"compute{k}", microbatch=i, layer=layer), "compute", self.segment_start[i], now))

    def _on_op(self, i: int, name: str, call) -> Any:
        kind, half = name.split("_")
        self._close_segment(i, name)
        layer = self.layer_base + self.calls[i].get(name, 0)
        self.calls[i][name] = self.calls[i].get(name, 0) + 1
        if half == "setup":
            while self.in_flight[kind] >= transport._options.max_in_flight:
                with self.cv:
                    stuck = all(s in ("done", "at_setup") for j, s in enumerate(self.state) if j != i)
                if stuck:
                    raise CapacityError(f"{name}@mb{i}: {self.in_flight[kind]} {kind} exchanges in flight and no "
                                        f"microbatch can tear one down (max_in_flight = "
                                        f"{transport._options.max_in_flight})")
                self._hand_on(i, "at_setup")
        else:
            self._hand_on(i, "at_teardown")
        start = time.perf_counter()
        with _context.labelled(f"mb{i}.l{layer}"):
            result = call()
        end = time.perf_counter()
        self.in_flight[kind] += 1 if half == "setup" else -1
        if half == "setup":
            t = transport.transfer_of(result[-1])
            if t is not None:
                self.transfers.append(t)
        node_kind = "comm_issue" if half == "setup" else "comm_wait"
        self.executed.append((Node(name, microbatch=i, layer=layer), node_kind, start, end))
        self.segment_start[i] = time.perf_counter()
        return result

    # -- running --

    def _fiber(self, i: int) -> None:
        try:
            with self.cv:
                self.cv.wait_for(lambda: self.turn == i or self.error is not None)
                if self.error is not None:
                    return
                self.state[i] = "running"
            self.segment_start[i] = time.perf_counter()
            with _context.hooked(lambda name, call: self._on_op(i, name, call)), _context.fiber(), \
                    torch.inference_mode(self.inference), torch.set_grad_enabled(self.grad_enabled):
                self.outputs[i] = self.module(self.chunks[i], **self.kwargs)
            self._close_segment(i, "end")
        except _Abort:
            pass
        except BaseException as exc:  # the first failure unwinds every fiber, then is re-raised
            with self.cv:
                if self.error is None:
                    self.error = exc
                self.cv.notify_all()
        finally:
            with self.cv:
                self.state[i] = "done"
                self.turn = self._next(i)
                self.cv.notify_all()

    def run(self) -> list[Tensor]:
        threads = [threading.Thread(target=self._fiber, args=(i,), name=f"overlap-mb{i}", daemon=True)
                   for i in range(self.count)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if self.error is not None:
            raise self.error
        return self.outputs  # type: ignore[return-value]

    def commit_to(self, sched: Scheduler, *, allow_incomplete: bool = False) -> None:
        """Add what ran to the scheduler: timeline intervals, link transfers, the plan (skipped,
        with `allow_incomplete`, when a setup was never torn down: the context's exit reports it)."""
        sched._layer_index += max((max(c.values(), default=0) for c in self.calls), default=0) or 1
        for node, kind, start, end in self.executed:
            track = {"compute": "compute", "comm_issue": "comm_setup", "comm_wait": "comm_teardown"}[kind]
            sched.timeline.add(track, str(node), start, end, kind=kind)
        for transfer in self.transfers:
            if transfer.started_at is not None and transfer.finished_at is not None:
                sched.timeline.add("link", transfer.label or transfer.op, transfer.started_at,
                                   transfer.finished_at, kind="comm")
        try:
            sched.plans.append(self.graph().plan())
        except PlanError:
            if not allow_incomplete:
                raise

    def graph(self) -> Graph:
        """The graph that ran: each microbatch's nodes in program order (compute segments between
        the op calls), a teardown after its setup; priorities reproduce the executed order."""
        g = Graph()
        previous: dict[int, Node] = {}
        setups: dict[tuple[str, int, int | None], Node] = {}
        for index, (node, kind, _, _) in enumerate(self.executed):
            after = [previous[node.microbatch]] if node.microbatch in previous else []
            if kind == "comm_issue":
                setups[node.op.split("_")[0], node.microbatch, node.layer] = node
            elif kind == "comm_wait":
                setup = setups.get((node.op.split("_")[0], node.microbatch, node.layer))
                if setup is not None and setup not in after:
                    after.append(setup)
            g.add(node, after=after, kind=kind, priority=index)
            previous[node.microbatch] = node
        return g


@contextlib.contextmanager
def _fsdp_gathered(module: Any) -> Iterator[None]:
    """Keep FSDP2-sharded parameters gathered while fibers run `module` re-entrantly.

    FSDP unshards a module before its forward and reshards it after; with several microbatches
    inside the same module at once, one fiber's reshard would pull the parameters from under
    another (and its all-gathers would share the group with in-flight exchanges). So: gather
    everything once up front, with nothing in flight, keep it gathered, and reshard at the end.
    """
    fsdp_modules = []
    if isinstance(module, torch.nn.Module):
        try:
            from torch.distributed.fsdp import FSDPModule
        except ImportError:  # torch without FSDP2
            FSDPModule = ()  # noqa: N806
        fsdp_modules = [m for m in module.modules() if isinstance(m, FSDPModule)] if FSDPModule else []
    if not fsdp_modules:
        yield
        return
    previous = []
    for m in fsdp_modules:
        group = getattr(m._get_fsdp_state(), "_fsdp_param_group", None)
        previous.append(group is None or getattr(group, "post_forward_mesh_info", True) is not None)
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m, reshard_after_forward in zip(fsdp_modules, previous):
            m.set_reshard_after_forward(reshard_after_forward, recurse=False)
            if reshard_after_forward:
                m.reshard()


def _concat(outputs: list[Any]) -> Any:
    """Concatenate per-microbatch outputs along dim 0 (tensors, and tensor fields of mappings,
    rebuilt with their own type; other values come from the first microbatch)."""
    first = outputs[0]
    if isinstance(first, Tensor):
        return torch.cat(outputs)
    if isinstance(first, dict):
        fields = {k: (_concat([o[k] for o in outputs]) if isinstance(v, Tensor) else v) for k, v in first.items()}
        return type(first)(**fields)
    if isinstance(first, tuple):
        return type(first)(_concat(list(parts)) for parts in zip(*outputs))
    raise TypeError(f"outputs of an op-calling module must be tensors, tuples or dicts of tensors, got "
                    f"{type(first).__name__}")


def _is_protocol_layer(module: Any) -> bool:
    return all(hasattr(module, m) for m in ("moe_route", "moe_experts", "moe_shared", "moe_comm_kwargs"))




class Pipelined(torch.nn.Module):
    """`wrap(module)`: calling it inside `overlap.scheduler(...)` runs `module` pipelined (see
    `Scheduler.run`); outside a context it is `module` itself."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: Tensor, **kwargs: Any) -> Any:
        sched = current_scheduler()
        return self.module(x, **kwargs) if sched is None else sched.run(self.module, x, **kwargs)


def wrap(module: torch.nn.Module) -> Pipelined:
    """Wrap an existing MoE module (one that calls the four ops, or implements the MoE protocol) so
    that inside `overlap.scheduler(...)` its calls are microbatch-pipelined."""
    return Pipelined(module)
