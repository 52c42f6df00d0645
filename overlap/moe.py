"""A small, readable reference MoE layer, expert parallel over the four split ops.

Owns: a router (softmax top-K, scales renormalised), routed experts as gated MLPs
(`down(silu(gate(x)) · up(x))`), optional shared experts computed on every rank and added through
`shared_expert_x`, and the plain (serial) forward: route → dispatch → experts → combine. It is
also the example to copy: the four methods below are the *MoE protocol*
(`overlap.pipeline.MoEProtocol`) that every executor drives, so any layer that implements them
gets microbatch pipelining from `overlap.scheduler`, and its forward is one line:
`overlap.pipeline.forward(self, x)` (serial outside a scheduler context, pipelined inside).

All weights derive from `seed`, so every rank (and a single-process dense reference,
`dense_forward`) builds the same experts; each rank keeps only its local ones.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from . import pipeline


def _weights(seed: int, num_experts: int, num_shared: int, hidden: int, inter: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(seed)
    scale_in, scale_out = 1 / math.sqrt(hidden), 1 / math.sqrt(inter)

    def mat(*shape: int, scale: float) -> Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    router = torch.randn(num_experts, hidden, generator=g) * scale_in
    experts = [
        (mat(inter, hidden, scale=scale_in), mat(inter, hidden, scale=scale_in), mat(hidden, inter, scale=scale_out))
        for _ in range(num_experts + num_shared)
    ]
    return router, experts[:num_experts], experts[num_experts:]


def gated_mlp(x: Tensor, gate: Tensor, up: Tensor, down: Tensor) -> Tensor:
    """`down(silu(gate(x)) · up(x))`; x `(N, H)`, gate/up `(I, H)`, down `(H, I)`."""
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


class MoELayer(nn.Module):
    """Expert-parallel MoE layer over `group` (every rank holds `num_experts / W` experts).

    Args:
        hidden_size: H, in [1024, 8192] (the ops' range).
        num_experts: routed experts E, divisible by the group size.
        top_k: K experts per token.
        intermediate_size: I of each gated MLP.
        group: the EP process group (default: the world group).
        num_shared_experts: shared experts (≤ 4) computed on every rank, weight 1.
        quant_mode: 0, or 2 for int8 dispatch.
        dtype: fp16 or bf16.
        seed: all weights derive from it.
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        intermediate_size: int,
        *,
        group: dist.ProcessGroup | None = None,
        num_shared_experts: int = 0,
        quant_mode: int = 0,
        dtype: torch.dtype = torch.bfloat16,
        seed: int = 0,
    ) -> None:
        super().__init__()
        world_group = group if group is not None else dist.group.WORLD
        if world_group is None:
            raise RuntimeError("torch.distributed is not initialised: call dist.init_process_group(...) first")
        self.group: dist.ProcessGroup = world_group
        self.world = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        if num_experts % self.world:
            raise ValueError(f"num_experts must be divisible by the group size {self.world}, got {num_experts}")
        self.hidden_size, self.num_experts, self.top_k = hidden_size, num_experts, top_k
        self.num_shared_experts, self.quant_mode, self.dtype = num_shared_experts, quant_mode, dtype
        self.num_local = num_experts // self.world
        router, experts, shared = _weights(seed, num_experts, num_shared_experts, hidden_size, intermediate_size, dtype)
        self.router = nn.Parameter(router, requires_grad=False)
        lo = self.rank * self.num_local
        local = experts[lo : lo + self.num_local]
        self.gate = nn.Parameter(torch.stack([w[0] for w in local]), requires_grad=False)
        self.up = nn.Parameter(torch.stack([w[1] for w in local]), requires_grad=False)
        self.down = nn.Parameter(torch.stack([w[2] for w in local]), requires_grad=False)
        # (gate, up, down) of each shared expert, registered so that `.to(device)` moves them too.
        self.shared_experts = nn.ParameterList([nn.Parameter(w, requires_grad=False) for s in shared for w in s])
        self.seed, self.intermediate_size = seed, intermediate_size

    # -- the MoE protocol --

    def moe_comm_kwargs(self) -> dict:
        return dict(
            group_ep=self.group.group_name,
            ep_world_size=self.world,
            ep_rank_id=self.rank,
            moe_expert_num=self.num_experts,
            shared_expert_num=self.num_shared_experts,
            shared_expert_rank_num=0,
            quant_mode=self.quant_mode,
        )

    def moe_route(self, x: Tensor) -> tuple[Tensor, Tensor]:
        probs = torch.softmax(F.linear(x.float(), self.router), dim=-1)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        return ids.to(torch.int32), weights / weights.sum(-1, keepdim=True)

    def moe_experts(self, expand_x: Tensor, dynamic_scales: Tensor, expert_token_nums: Tensor) -> Tensor:
        if expand_x.dtype == torch.int8:  # int8 dispatch: dequantise per row
            expand_x = (expand_x.float() * dynamic_scales[:, None]).to(self.dtype)
        out = torch.zeros(expand_x.shape, dtype=self.dtype, device=expand_x.device)
        start = 0
        for e, count in enumerate(expert_token_nums.tolist()):
            if count:
                rows = slice(start, start + count)
                out[rows] = gated_mlp(expand_x[rows], self.gate[e], self.up[e], self.down[e])
            start += count
        return out

    def moe_shared(self, x: Tensor) -> Tensor | None:
        if not self.num_shared_experts:
            return None
        w = list(self.shared_experts)
        total = gated_mlp(x, *w[0:3]).float()
        for i in range(3, len(w), 3):
            total += gated_mlp(x, *w[i : i + 3]).float()
        return total.to(self.dtype)

    # -- forward --

    def forward(self, x: Tensor) -> Tensor:
        """`(T, H)` → `(T, H)`. Inside `overlap.scheduler(...)` the scheduler pipelines it."""
        return pipeline.forward(self, x)

    def dense_forward(self, x: Tensor, *, dtype: torch.dtype | None = None) -> Tensor:
        """Single-process reference: every expert of the layer, no communication, the weighted sum
        in fp32; cast to `dtype` (default: the layer's; torch.float32 for the unrounded reference
        that `overlap.numerics.compare` takes)."""
        _, experts, _ = _weights(
            self.seed, self.num_experts, self.num_shared_experts, self.hidden_size, self.intermediate_size, self.dtype
        )
        ids, w = self.moe_route(x)
        acc = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for k in range(self.top_k):
            for e in ids[:, k].unique().tolist():
                rows = (ids[:, k] == e).nonzero().flatten()
                weights = (t.to(x.device) for t in experts[e])
                acc[rows] += w[rows, k : k + 1] * gated_mlp(x[rows], *weights).float()
        shared = self.moe_shared(x)
        if shared is not None:
            acc += shared.float()
        return acc.to(dtype or self.dtype)
