"""The MoE protocol a layer implements to be pipelined, and the executor a protocol layer runs on.

Owns: the four methods a pipelined MoE layer exposes (`MoEProtocol`), reading the ops' arguments
out of them once (`LayerCall`), and the context variable that names the executor a protocol
layer's forward runs on right now: none (serial), a scheduler context (the planned executor), or
a fiber (one exchange inline). The executor is explicit and travels with the context
(`contextvars`), never with the thread. Never runs an op.

    moe_route(x)                       -> expert_ids (T, K) int32, expert_scales (T, K) fp32
    moe_experts(expand_x, dynamic_scales, expert_token_nums) -> (A, H) outputs (rows past the
                                          received count are ignored)
    moe_shared(x)                      -> (T, H) or None
    moe_comm_kwargs()                  -> group_ep, ep_world_size, ep_rank_id, moe_expert_num and
                                          the keyword arguments every op call shares (quant_mode,
                                          shared_expert_num, global_bs, ...)
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch.distributed as dist
from torch import Tensor

Routes = tuple[Tensor, Tensor]
"""`(expert_ids (T, K) int32, expert_scales (T, K) fp32)` computed before the call."""


@runtime_checkable
class MoEProtocol(Protocol):
    """What a layer implements so that every executor can drive it (see the module docstring)."""

    def moe_route(self, x: Tensor) -> Routes: ...

    def moe_experts(self, expand_x: Tensor, dynamic_scales: Tensor, expert_token_nums: Tensor) -> Tensor: ...

    def moe_shared(self, x: Tensor) -> Tensor | None: ...

    def moe_comm_kwargs(self) -> dict[str, Any]: ...


def is_protocol_layer(module: object) -> bool:
    """True when `module` implements `MoEProtocol`."""
    return isinstance(module, MoEProtocol)


@dataclass(frozen=True)
class LayerCall:
    """The op arguments of one protocol layer, read once from `moe_comm_kwargs()`.

    `args` are the four positional arguments every op takes after its tensors; `shared` the
    keyword arguments every op takes; `quant_mode` goes to the dispatch only.
    """

    group_ep: str
    ep_world_size: int
    ep_rank_id: int
    moe_expert_num: int
    quant_mode: int = 0
    shared: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, layer: MoEProtocol) -> LayerCall:
        kw = dict(layer.moe_comm_kwargs())
        head = {k: kw.pop(k) for k in ("group_ep", "ep_world_size", "ep_rank_id", "moe_expert_num")}
        return cls(**head, quant_mode=kw.pop("quant_mode", 0), shared=kw)

    @property
    def args(self) -> tuple[str, int, int, int]:
        return self.group_ep, self.ep_world_size, self.ep_rank_id, self.moe_expert_num

    @property
    def group(self) -> dist.ProcessGroup:
        return dist.distributed_c10d._resolve_process_group(self.group_ep)  # type: ignore[arg-type]

    def with_global_bs(self, global_bs: int) -> LayerCall:
        """The same call with `global_bs` set (unless the layer set its own)."""
        return LayerCall(*self.args, quant_mode=self.quant_mode, shared={"global_bs": global_bs, **self.shared})


class Executor(Protocol):
    """Runs one forward of a protocol layer (`overlap.pipeline.forward` hands it over)."""

    def run_layer(
        self,
        layer: MoEProtocol,
        x: Tensor,
        *,
        routes: Routes | None = None,
        layer_index: int | None = None,
        microbatches: int | None = None,
        min_tokens: int | None = None,
    ) -> Tensor: ...


_executor: contextvars.ContextVar[Executor | None] = contextvars.ContextVar("overlap_executor", default=None)


def active_executor() -> Executor | None:
    """The executor protocol layers run on in the current context (None: serial)."""
    return _executor.get()
