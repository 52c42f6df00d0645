"""The fiber executor: an unmodified module that calls the ops itself, run once per microbatch as
cooperative threads whose exchanges interleave.

Owns: cutting the module's input by the policy's rule (rows padded with zeros so that every rank
runs the same microbatches, even a rank with no rows), one thread per microbatch, the turn that
exactly one of them holds, handing the turn on at teardowns and at setups over the in-flight
budget, recording what ran (`Recording`), unwinding every fiber when one fails, and keeping FSDP2
parameters gathered while fibers share a module. Never runs a collective besides the ops (another
fiber's exchange may be in flight) and never changes what the module computes.

A fiber hands the turn on, round robin, when it reaches a teardown: the next microbatch computes
while this one's transfer travels; when the turn comes back, the fiber waits for its transfer
(usually landed by then) and goes on. Every decision depends only on the order of op calls, which
is the same on every rank, so every rank issues the same exchanges in the same order. The fibers'
context (`contextvars`) is the caller's, copied explicitly, with the op interceptor and the
inline executor (`serial.InlineExchange`) set in it.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from ..errors import CapacityError
from ..ops import context as op_context
from . import policy
from .protocol import _executor
from .recording import LaneRecorder, Recording
from .serial import InlineExchange


class _Abort(BaseException):
    """Unwinds the other fibers when one of them failed (never escapes `FiberRun.run`)."""


class FiberRun:
    """One pipelined call of `module` over `chunks` (one per microbatch), recorded into `recording`."""

    def __init__(
        self, module: Any, chunks: list[Tensor], kwargs: dict[str, Any], layer_base: int, recording: Recording
    ) -> None:
        self.module, self.chunks, self.kwargs = module, chunks, kwargs
        self.count = len(chunks)
        self.lanes = [LaneRecorder(recording, i, layer_base) for i in range(self.count)]
        self.cv = threading.Condition()
        self.turn = 0
        self.state = ["ready"] * self.count  # ready | running | at_teardown | at_setup | done
        self.outputs: list[Any] = [None] * self.count
        self.error: BaseException | None = None
        self.in_flight = {"dispatch": 0, "combine": 0}
        self.grad_enabled, self.inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    @property
    def num_layers(self) -> int:
        return max(lane.num_layers for lane in self.lanes)

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

    def _on_op(self, i: int, name: str, call: Any) -> Any:
        """The op interceptor of fiber `i`."""
        kind, half = name.split("_")
        lane = self.lanes[i]
        lane.close_segment(name)
        if half == "setup":
            budget = policy.in_flight_budget()
            while self.in_flight[kind] >= budget:
                with self.cv:
                    stuck = all(s in ("done", "at_setup") for j, s in enumerate(self.state) if j != i)
                if stuck:
                    raise CapacityError(
                        f"{name}@mb{i}: {self.in_flight[kind]} {kind} exchanges in flight and no "
                        f"microbatch can tear one down (max_in_flight = {budget})"
                    )
                self._hand_on(i, "at_setup")
        else:
            self._hand_on(i, "at_teardown")
        node = lane.next_node(name)
        start = time.perf_counter()
        with op_context.labelled(f"mb{node.microbatch}.l{node.layer}"):
            result = call()
        self.in_flight[kind] += 1 if half == "setup" else -1
        lane.op_done(name, start, result)
        return result

    # -- running --

    def _fiber(self, i: int) -> None:
        try:
            with self.cv:
                self.cv.wait_for(lambda: self.turn == i or self.error is not None)
                if self.error is not None:
                    return
                self.state[i] = "running"
            self.lanes[i].segment_start = time.perf_counter()
            hook = lambda name, call: self._on_op(i, name, call)  # noqa: E731
            with (
                op_context.intercepted(hook),
                op_context.bound(_executor, InlineExchange()),
                torch.inference_mode(self.inference),
                torch.set_grad_enabled(self.grad_enabled),
            ):
                self.outputs[i] = self.module(self.chunks[i], **self.kwargs)
            self.lanes[i].close_segment("end")
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

    def run(self) -> list[Any]:
        """Run every fiber to its end; the outputs per microbatch, or the first fiber's error."""
        # Each fiber runs in its own copy of the caller's context: explicit, whatever the build of
        # CPython does with the context of new threads.
        threads = [
            threading.Thread(
                target=contextvars.copy_context().run, args=(self._fiber, i), name=f"overlap-mb{i}", daemon=True
            )
            for i in range(self.count)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if self.error is not None:
            raise self.error
        return self.outputs


def run_module(
    module: Any, x: Tensor, kwargs: dict[str, Any], split: policy.Split, layer_base: int, recording: Recording
) -> tuple[Any, int]:
    """Run `module(x_i, **kwargs)` for every microbatch of `split` as fibers; returns the outputs
    concatenated along dim 0 (trimmed to x's rows) and the number of layers the module went through.

    x `(T, ...)` is padded with zero rows to `split.count · split.size`, so every rank runs
    `split.count` fibers of `split.size` rows; the module must treat rows independently (an MoE
    layer's tokens; a model's sequences).
    """
    padded = split.pad(x)
    chunks = [padded[split.rows(i)] for i in range(split.count)]
    fibers = FiberRun(module, chunks, kwargs, layer_base, recording)
    with fsdp_gathered(module):
        outputs = fibers.run()
    return trim(concat(outputs), x.shape[0]), max(fibers.num_layers, 1)


@contextlib.contextmanager
def fsdp_gathered(module: Any) -> Iterator[None]:
    """Keep FSDP2-sharded parameters gathered while fibers run `module` re-entrantly.

    FSDP unshards a module before its forward and reshards it after; with several microbatches
    inside the same module at once, one fiber's reshard would pull the parameters from under
    another (and its all-gathers would share the group with in-flight exchanges). So: gather
    everything once up front, with nothing in flight, keep it gathered, and reshard at the end.
    """
    fsdp_modules: list[Any] = []
    if isinstance(module, torch.nn.Module):
        try:
            from torch.distributed.fsdp import FSDPModule
        except ImportError:  # torch without FSDP2
            pass
        else:
            fsdp_modules = [m for m in module.modules() if isinstance(m, FSDPModule)]
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


def concat(outputs: list[Any]) -> Any:
    """Concatenate per-microbatch outputs along dim 0 (tensors, and tensor fields of mappings and
    tuples, rebuilt with their own type; other values come from the first microbatch)."""
    first = outputs[0]
    if isinstance(first, Tensor):
        return torch.cat(outputs)
    if isinstance(first, dict):
        fields = {k: (concat([o[k] for o in outputs]) if isinstance(v, Tensor) else v) for k, v in first.items()}
        return type(first)(**fields)
    if isinstance(first, tuple):
        return type(first)(concat(list(parts)) for parts in zip(*outputs))
    raise TypeError(
        f"outputs of an op-calling module must be tensors, tuples or dicts of tensors, got {type(first).__name__}"
    )


def trim(output: Any, rows: int) -> Any:
    """The first `rows` rows of every tensor in `output` (drops the padding rows)."""
    if isinstance(output, Tensor):
        return output[:rows]
    if isinstance(output, dict):
        return type(output)(**{k: trim(v, rows) for k, v in output.items()})
    if isinstance(output, tuple):
        return type(output)(trim(v, rows) for v in output)
    return output
