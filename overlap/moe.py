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

How the routed experts run (`expert_mlps`, "auto"):

- on a device (or under `overlap.ops.staging.simulate_device()`), one grouped GEMM per projection
  (`grouped_gated_mlp`: torch's `grouped_mm`, with the per-expert row offsets computed on the
  device), so a forward reads no device value on the host; where torch has no grouped GEMM for
  the device and dtype (`has_grouped_mm`), a loop over the experts (`looped_gated_mlp`) reads the
  per-expert counts on the host instead (one device sync per call);
- on the CPU, where reading the counts costs nothing, a loop over each expert's rows only (not
  the padded capacity) with its weights prepacked once for oneDNN and gate / up as one GEMM
  (`PackedExperts`, bf16 where this CPU's oneDNN packs it), else the plain loop. torch's CPU
  `grouped_mm` runs over the whole padded capacity, and an unpacked GEMM repacks its weight at
  every call: at 32-128 rows per expert the packed loop was 9-21 % faster than the loop on the same
  rows (`bench/bench_experts.py`), bit-equal to it, and the padding it skips is often as many rows
  again. That matters most where the pipeline cuts a batch into microbatches, each with fewer rows
  per expert.
"""

from __future__ import annotations

import math
from typing import Any

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
EXPERT_IMPLEMENTATIONS = ("auto", "grouped_mm", "loop", "packed")


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


def _linear_pointwise() -> Any:
    return torch.ops.mkldnn._linear_pointwise


_PACKABLE: dict[torch.dtype, bool] = {}


def can_pack(dtype: torch.dtype) -> bool:
    """True when this CPU's oneDNN prepacks `dtype` linear weights (bf16 on AVX512-BF16 / AMX
    hosts; fp16 needs AVX-NE-CONVERT or AVX512-FP16): probed once per dtype."""
    if dtype not in _PACKABLE:
        ok = dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
        if ok:
            try:
                w = torch.ones(8, 16, dtype=dtype)
                packed = torch.ops.mkldnn._reorder_linear_weight(w, 2)
                x = torch.ones(2, 16, dtype=dtype)
                ok = torch.equal(_linear_pointwise()(x, packed, None, "none", [], ""), F.linear(x, w))
            except (AttributeError, RuntimeError, NotImplementedError):
                ok = False
        _PACKABLE[dtype] = ok
    return _PACKABLE[dtype]


class PackedExperts:
    """CPU experts' weights prepacked for oneDNN, once: per expert `[gate; up]` (2I, H) as one GEMM
    and `down` (H, I). Holds a copy of the weights (as much memory again); `MoELayer` keeps one
    and rebuilds it when its weights change.

    Args:
        gate, up: `(E, I, H)`; down: `(E, H, I)`, bf16 on the cpu (`can_pack`).
        rows_hint: the row count oneDNN picks its blocking for (any row count works).
    """

    def __init__(self, gate: Tensor, up: Tensor, down: Tensor, rows_hint: int = 64) -> None:
        if not can_pack(gate.dtype) or gate.device.type != "cpu":
            raise ValueError(
                f"PackedExperts needs bf16 cpu weights that oneDNN packs here, got {gate.dtype} on {gate.device}"
            )
        reorder = torch.ops.mkldnn._reorder_linear_weight
        self.inter, self.hidden = gate.shape[1], down.shape[1]
        self.gate_up = [reorder(torch.cat([gate[e], up[e]]).contiguous(), rows_hint) for e in range(gate.shape[0])]
        self.down = [reorder(down[e].contiguous(), rows_hint) for e in range(down.shape[0])]
        self.key = weights_key(gate, up, down)

    def mlp(self, e: int, x: Tensor) -> Tensor:
        """Expert `e`'s gated MLP on `x` `(N, H)` (N >= 1): bit-equal to `gated_mlp`."""
        linear = _linear_pointwise()
        h = linear(x, self.gate_up[e], None, "none", [], "")
        return linear(F.silu(h[:, : self.inter]) * h[:, self.inter :], self.down[e], None, "none", [], "")


def weights_key(*weights: Tensor) -> tuple:
    """Identifies the values of `weights` (storage, version counter, shape): a changed key means
    packed copies are stale."""
    return tuple((w.data_ptr(), w._version, tuple(w.shape), w.dtype, str(w.device)) for w in weights)


def packed_gated_mlp(x: Tensor, packed: PackedExperts, counts: Tensor) -> Tensor:
    """`looped_gated_mlp` with prepacked weights: each expert on its own rows only, bit-equal to the
    loop; reads `counts` on the host (free on the cpu, where this runs)."""
    out = torch.empty(x.shape[0], packed.hidden, dtype=x.dtype)
    start = 0
    for e, count in enumerate(counts.tolist()):
        if count:
            out[start : start + count] = packed.mlp(e, x[start : start + count])
        start += count
    out[start:].zero_()
    return out


def resolve_implementation(implementation: str, x: Tensor, *weights: Tensor) -> str:
    """The implementation `expert_mlps` runs for `x`: "auto" becomes "grouped_mm" or "loop" on a
    device (or under `simulate_device()`), "packed" or "loop" on the cpu ("loop" where autograd
    must see the weights or x: the packed GEMMs have no backward).

    Raises:
        ValueError: `implementation` not one of `EXPERT_IMPLEMENTATIONS`; "grouped_mm" where torch
            has none for x's device and dtype; "packed" off the cpu or for a dtype oneDNN does not
            pack here.
    """
    from .ops import staging

    if implementation not in EXPERT_IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {EXPERT_IMPLEMENTATIONS}, got {implementation!r}")
    grouped = has_grouped_mm(x.device, x.dtype)
    if implementation == "grouped_mm" and not grouped:
        raise ValueError(
            f"implementation 'grouped_mm' needs torch's grouped GEMM for {x.dtype} on {x.device.type} "
            f"(torch {torch.__version__} has none): use 'auto' or 'loop'"
        )
    packable = x.device.type == "cpu" and can_pack(x.dtype)
    if implementation == "packed" and not packable:
        raise ValueError(
            f"implementation 'packed' needs bf16 cpu tensors on a CPU whose oneDNN packs them, got "
            f"{x.dtype} on {x.device.type}: use 'auto' or 'loop'"
        )
    if implementation != "auto":
        return implementation
    if staging.defers_host_reads(x):
        return "grouped_mm" if grouped else "loop"
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, *weights))
    return "packed" if packable and not needs_grad else "loop"


def expert_mlps(
    x: Tensor,
    gate: Tensor,
    up: Tensor,
    down: Tensor,
    counts: Tensor,
    *,
    implementation: str = "auto",
    packed: PackedExperts | None = None,
) -> Tensor:
    """Every local expert's gated MLP on its rows (`grouped_gated_mlp`'s contract), by
    `resolve_implementation`. `packed`: prepacked weights for "packed" (built for this call when
    None or stale: pass a kept one)."""
    chosen = resolve_implementation(implementation, x, gate, up, down)
    if chosen == "packed":
        if not x.shape[0]:
            return x.new_zeros(0, down.shape[1])
        if packed is None or packed.key != weights_key(gate, up, down):
            packed = PackedExperts(gate, up, down)
        return packed_gated_mlp(x, packed, counts)
    if chosen == "loop":
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
        self._packs: dict[str, tuple[tuple, PackedExperts]] = {}  # CPU prepacked weights, by name, with their key

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
        weights: list[Tensor] = [self.gate, self.up, self.down]
        chosen = resolve_implementation(self.experts_implementation, expand_x, *weights)  # once per call
        return expert_mlps(
            expand_x,
            self.gate,
            self.up,
            self.down,
            expert_token_nums,
            implementation=chosen,
            packed=self._packed("routed", expand_x, chosen, weights),
        )

    def _packed(self, name: str, x: Tensor, chosen: str, weights: list[Tensor]) -> PackedExperts | None:
        """The kept `PackedExperts` of `name` (`weights`: gate, up, down stacked over experts, or
        each shared expert's gate, up, down in turn) where `x` takes the "packed" path (`chosen`,
        by `resolve_implementation`), rebuilt when a weight changed; else None."""
        if not x.shape[0] or chosen != "packed":
            return None
        key = weights_key(*weights)
        kept = self._packs.get(name)
        if kept is None or kept[0] != key:
            gate, up, down = (w if w.dim() == 3 else torch.stack(weights[i::3]) for i, w in enumerate(weights[:3]))
            kept = self._packs[name] = (key, PackedExperts(gate, up, down))
        return kept[1]

    def moe_shared(self, x: Tensor) -> Tensor | None:
        if not self.num_shared_experts:
            return None
        w = list(self.shared_experts)
        gates, ups, downs = w[0::3], w[1::3], w[2::3]
        packed = None
        if self.experts_implementation in ("auto", "packed"):
            packed = self._packed("shared", x, resolve_implementation(self.experts_implementation, x, *w), w)

        def mlp(i: int) -> Tensor:
            return packed.mlp(i, x) if packed is not None else gated_mlp(x, gates[i], ups[i], downs[i])

        if len(gates) == 1:
            return mlp(0)  # (the fp32 round trip below is exact for one term)
        total = mlp(0).float()
        for i in range(1, len(gates)):
            total += mlp(i).float()
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
