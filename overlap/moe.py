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

The routed experts run as one grouped GEMM per projection (`grouped_gated_mlp`: torch's
`grouped_mm`, with the per-expert row offsets computed on the device), so a forward reads no
device value on the host; where torch has no grouped GEMM for the device and dtype
(`has_grouped_mm`), a loop over the experts (`looped_gated_mlp`) reads the per-expert counts on
the host instead (one device sync per call).
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


# torch >= 2.10 has the public `F.grouped_mm`; 2.8 / 2.9 the private `torch._grouped_mm` (2.8: CUDA
# SM90 only); older torch has neither (then the experts loop).
_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
EXPERT_IMPLEMENTATIONS = ("auto", "grouped_mm", "loop")


def has_grouped_mm(device: torch.device, dtype: torch.dtype) -> bool:
    """True when torch runs a grouped GEMM of `dtype` on `device` (cpu: bf16, fp16, fp32, torch >= 2.9;
    cuda: bf16 on compute capability >= 8.0)."""
    if _GROUPED_MM is None:
        return False
    if device.type == "cpu":
        return dtype in (torch.bfloat16, torch.float16, torch.float32) and _cpu_grouped_mm_works()
    if device.type == "cuda":
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (8, 0)
    return False


_CPU_GROUPED_MM: list[bool] = []


def _cpu_grouped_mm_works() -> bool:
    """torch <= 2.8 declares `_grouped_mm` but has no CPU kernel: probe once."""
    if not _CPU_GROUPED_MM:
        try:
            assert _GROUPED_MM is not None
            _GROUPED_MM(torch.ones(2, 8), torch.ones(1, 8, 8), offs=torch.tensor([2], dtype=torch.int32))
            _CPU_GROUPED_MM.append(True)
        except (NotImplementedError, RuntimeError):
            _CPU_GROUPED_MM.append(False)
    return _CPU_GROUPED_MM[0]


def grouped_gated_mlp(x: Tensor, gate: Tensor, up: Tensor, down: Tensor, counts: Tensor) -> Tensor:
    """Every local expert's gated MLP on its rows, as three grouped GEMMs; nothing read on the host.

    Args:
        x: `(A, H)`, the rows of expert 0 first, then expert 1's, ... (`counts` of them each);
            rows past `counts.sum()` are ignored.
        gate, up: `(E, I, H)`; down: `(E, H, I)` (x's dtype).
        counts: `(E,)` integer rows per expert, on x's device.

    Returns:
        `(A, H)`: row r is `down_e(silu(gate_e(x_r)) · up_e(x_r))` for its expert e; rows past
        `counts.sum()` are 0.
    """
    assert _GROUPED_MM is not None  # callers check has_grouped_mm
    counts = counts if counts.device == x.device else counts.to(x.device)
    offs = torch.cumsum(counts, 0, dtype=torch.int32)  # end row of each expert
    # grouped_mm(a, b) multiplies row group e of a by b[e] (K, N): a transposed (E, N, K) weight is the
    # column-major operand the CUDA kernels want, with no copy.
    h = F.silu(_GROUPED_MM(x, gate.transpose(-2, -1), offs=offs)) * _GROUPED_MM(x, up.transpose(-2, -1), offs=offs)
    y = _GROUPED_MM(h, down.transpose(-2, -1), offs=offs)
    # The kernels leave rows past the last offset uninitialised: zero them (no host read).
    valid = torch.arange(x.shape[0], device=x.device) < offs[-1:]
    return torch.where(valid[:, None], y, y.new_zeros(()))


def looped_gated_mlp(x: Tensor, gate: Tensor, up: Tensor, down: Tensor, counts: Tensor) -> Tensor:
    """`grouped_gated_mlp` as a loop over the experts: reads `counts` on the host (a device sync)."""
    out = torch.zeros(x.shape[0], down.shape[1], dtype=x.dtype, device=x.device)
    start = 0
    for e, count in enumerate(counts.tolist()):
        if count:
            rows = slice(start, start + count)
            out[rows] = gated_mlp(x[rows], gate[e], up[e], down[e])
        start += count
    return out


def expert_mlps(
    x: Tensor, gate: Tensor, up: Tensor, down: Tensor, counts: Tensor, *, implementation: str = "auto"
) -> Tensor:
    """`grouped_gated_mlp` where torch offers it for x's device and dtype ("auto"), else the loop.

    Raises:
        ValueError: `implementation` not one of "auto", "grouped_mm", "loop", or "grouped_mm" where
            torch has none for x's device and dtype.
    """
    if implementation not in EXPERT_IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {EXPERT_IMPLEMENTATIONS}, got {implementation!r}")
    grouped = has_grouped_mm(x.device, x.dtype)
    if implementation == "grouped_mm" and not grouped:
        raise ValueError(
            f"implementation 'grouped_mm' needs torch's grouped GEMM for {x.dtype} on {x.device.type} "
            f"(torch {torch.__version__} has none): use 'auto' or 'loop'"
        )
    if implementation == "loop" or not grouped:
        return looped_gated_mlp(x, gate, up, down, counts)
    return grouped_gated_mlp(x, gate, up, down, counts)


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
        experts_implementation: "auto" (one grouped GEMM per projection where torch offers it
            for the device and dtype, else the loop), "grouped_mm" or "loop" (`expert_mlps`).
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
        experts_implementation: str = "auto",
    ) -> None:
        super().__init__()
        if experts_implementation not in EXPERT_IMPLEMENTATIONS:
            raise ValueError(
                f"experts_implementation must be one of {EXPERT_IMPLEMENTATIONS}, got {experts_implementation!r}"
            )
        self.experts_implementation = experts_implementation
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
        return expert_mlps(
            expand_x, self.gate, self.up, self.down, expert_token_nums, implementation=self.experts_implementation
        )

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
