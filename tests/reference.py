"""An MoE problem every rank can rebuild from a seed, the distributed run of the four ops on it,
and the independent dense reference: the unsplit MoE computed in one process.

Experts here are elementwise affine maps `f_e(v) = bf16(v · a_e + b_e)` on fp32 inputs: each output
row depends on its input row only, so the split run and the dense reference can agree bit for bit.
(The GEMM-based reference layer is tested elsewhere with stated tolerances.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Case:
    world: int
    batches: tuple[int, ...]  # BS per rank
    hidden: int = 1024
    experts: int = 8
    top_k: int = 2
    shared_num: int = 1  # shared_expert_num
    shared_ranks: int = 0  # shared_expert_rank_num
    quant: int = 0
    with_scales: bool = False
    token_nums_type: int = 1
    global_bs: int = 0
    active: tuple[int, ...] | None = None  # active tokens per rank (True-prefix mask)
    use_shared_x: bool = False  # S_r = 0: add shared_expert_x
    skip_ranks: tuple[int, ...] = ()  # MoE ranks whose experts no token picks
    dtype: torch.dtype = torch.bfloat16
    seed: int = 0
    extras: dict = field(default_factory=dict, compare=False)

    @property
    def local_experts(self) -> int:
        return self.experts // (self.world - self.shared_ranks)


def build(case: Case) -> dict:
    """Every rank's inputs and the experts' parameters, identical on every process."""
    g = torch.Generator().manual_seed(case.seed)
    h, e, k = case.hidden, case.experts, case.top_k
    allowed = torch.ones(e, dtype=torch.bool)
    for r in case.skip_ranks:
        m = r - case.shared_ranks
        allowed[m * case.local_experts : (m + 1) * case.local_experts] = False
    pool = allowed.nonzero().flatten()
    xs, ids, weights = [], [], []
    for bs in case.batches:
        xs.append(torch.randn(bs, h, generator=g).to(case.dtype))
        picks = torch.stack([pool[torch.randperm(pool.numel(), generator=g)[:k]] for _ in range(bs)])
        ids.append(picks.to(torch.int32))
        w = torch.rand(bs, k, generator=g)
        weights.append((w / w.sum(-1, keepdim=True)).float())
    n_shared = max(case.shared_num, 1)
    return {
        "x": xs,
        "ids": ids,
        "weights": weights,
        "a": torch.randn(e, h, generator=g) * 0.5,
        "b": torch.randn(e, h, generator=g) * 0.1,
        "sa": torch.randn(n_shared, h, generator=g) * 0.5,
        "sb": torch.randn(n_shared, h, generator=g) * 0.1,
        "smooth": torch.rand(case.shared_num + e, h, generator=g) + 0.5 if case.with_scales else None,
    }


def affine(v: torch.Tensor, a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (v.float() * a + b).to(dtype)


def quant_dequant(row: torch.Tensor, smooth: torch.Tensor | None) -> torch.Tensor:
    """The contract's per-row dynamic int8 quantisation, written out independently of the kernels."""
    xf = row.float() if smooth is None else row.float() * smooth
    amax = xf.abs().max()
    if amax == 0:
        return torch.zeros_like(xf)
    d = torch.tensor(127.0) / amax
    q = torch.round(xf * d)
    return q * (1.0 / d)


def dense_reference(case: Case) -> list[torch.Tensor]:
    """x_out per rank from the unsplit MoE in one process, summed in the contract's order."""
    p = build(case)
    out = []
    for r, (x, ids, w) in enumerate(zip(p["x"], p["ids"], p["weights"])):
        n = x.shape[0] if case.active is None else case.active[r]
        y = torch.zeros(x.shape, dtype=case.dtype)
        for t in range(n):
            acc = torch.zeros(case.hidden)
            for kk in range(case.top_k):
                ex = int(ids[t, kk])
                smooth = None if p["smooth"] is None else p["smooth"][case.shared_num + ex]
                inp = quant_dequant(x[t], smooth) if case.quant == 2 else x[t].float()
                acc = acc + w[t, kk] * affine(inp, p["a"][ex], p["b"][ex], case.dtype).float()
            if case.shared_ranks > 0:
                for s in range(case.shared_num):
                    smooth = None if p["smooth"] is None else p["smooth"][s]
                    inp = quant_dequant(x[t], smooth) if case.quant == 2 else x[t].float()
                    acc = acc + affine(inp, p["sa"][s], p["sb"][s], case.dtype).float()
            elif case.use_shared_x:
                acc = acc + affine(x[t].float(), p["sa"][0], p["sb"][0], case.dtype).float()
            y[t] = acc.to(case.dtype)
        out.append(y)
    return out


def common_kwargs(case: Case) -> dict:
    return dict(shared_expert_num=case.shared_num, shared_expert_rank_num=case.shared_ranks, global_bs=case.global_bs)


def rank_experts(
    case: Case, p: dict, rank: int, expand_x: torch.Tensor, dyn_scales: torch.Tensor, token_nums: torch.Tensor
) -> torch.Tensor:
    """This rank's experts on the rows dispatch_teardown laid out (dequantised for quant_mode 2):
    `(A, H)` on the host, in case.dtype, rows past the received count zero."""
    counts = token_nums if case.token_nums_type == 1 else torch.diff(token_nums, prepend=token_nums.new_zeros(1))
    inputs = (expand_x.float() * dyn_scales[:, None] if case.quant == 2 else expand_x.float()).cpu()
    out = torch.zeros(expand_x.shape, dtype=case.dtype)
    start = 0
    for local, c in enumerate(counts.tolist()):
        if rank < case.shared_ranks:
            s = rank // (case.shared_ranks // case.shared_num)
            a, b = p["sa"][s], p["sb"][s]
        else:
            ex = (rank - case.shared_ranks) * case.local_experts + local
            a, b = p["a"][ex], p["b"][ex]
        out[start : start + c] = affine(inputs[start : start + c], a, b, case.dtype)
        start += c
    return out


def run_case(case: Case) -> dict:
    """On one rank: chain the four ops over the default group, run the experts, return outputs."""
    from overlap import ops

    rank, world = dist.get_rank(), dist.get_world_size()
    p = build(case)
    group = dist.group.WORLD.group_name
    x, ids, w = p["x"][rank], p["ids"][rank], p["weights"][rank]
    mask = None
    if case.active is not None:
        mask = torch.arange(x.shape[0]) < case.active[rank]
    kw = common_kwargs(case)
    y, expand_idx, cmd = ops.dispatch_setup(
        x, ids, group, world, rank, case.experts, scales=p["smooth"], x_active_mask=mask, quant_mode=case.quant, **kw
    )
    expand_x, dyn_scales, assist, token_nums = ops.dispatch_teardown(
        x,
        y,
        ids,
        cmd,
        group,
        world,
        rank,
        case.experts,
        quant_mode=case.quant,
        expert_token_nums_type=case.token_nums_type,
        **kw,
    )
    out = rank_experts(case, p, rank, expand_x, dyn_scales, token_nums)
    counts = token_nums if case.token_nums_type == 1 else torch.diff(token_nums, prepend=token_nums.new_zeros(1))
    quant_x, cmd2 = ops.combine_setup(out, ids, assist, group, world, rank, case.experts, **kw)
    shared_x = affine(x.float(), p["sa"][0], p["sb"][0], case.dtype) if case.use_shared_x else None
    x_out = ops.combine_teardown(
        out,
        quant_x,
        ids,
        expand_idx,
        w,
        cmd2,
        group,
        world,
        rank,
        case.experts,
        x_active_mask=mask,
        shared_expert_x=shared_x,
        **kw,
    )
    return {
        "x_out": x_out,
        "expert_token_nums": token_nums,
        "received": int(counts.sum()),
        "expand_x_shape": tuple(expand_x.shape),
        "y_shape": tuple(y.shape),
        "y_dtype": y.dtype,
        "expand_idx": expand_idx,
        "assist": assist[: counts.numel() * world].clone(),
        "cmd_shapes": (tuple(cmd.shape), tuple(cmd2.shape)),
        "quant_shape": tuple(quant_x.shape),
    }


# ---- the dispatch layout, written out from the routing (plain loops; no library kernels) ---------


def quantize(row: torch.Tensor, smooth: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The contract's quant_mode 2 for one row: `(q (H,) int8, scale () fp32)` with
    `d = 127 / max|xf|`, `q = round_half_even(xf · d)`, scale `1 / d`; a zero row gives q 0, scale 0."""
    xf = row.float() if smooth is None else row.float() * smooth
    amax = xf.abs().max()
    if amax == 0:
        return torch.zeros(row.shape, dtype=torch.int8), torch.tensor(0.0)
    d = torch.tensor(127.0) / amax
    return torch.round(xf * d).to(torch.int8), torch.tensor(1.0) / d


def expected_dispatch(case: Case, rank: int) -> dict:
    """What `dispatch_teardown` must return on `rank`, built from the routing with plain loops.

    Rows are ordered by local expert, then source rank, then source token (the contract), and
    each row is the source token's x (quant 2: its int8 values, with its scale in dynamic_scales).

    Returns:
        dict with `expand_x` (A, H), `dynamic_scales` (A,) fp32, `assist` (A·128,) int32,
        `expert_token_nums` (L,) int64 (of `case.token_nums_type`) and `rows` (the list of
        (source rank, token, expert or ("shared", s)) in row order).
    """
    p = build(case)
    world, s_r, s_n = case.world, case.shared_ranks, case.shared_num
    active = [case.batches[r] if case.active is None else case.active[r] for r in range(world)]
    blocks: list[list[list[tuple]]] = []  # [local expert][source rank] -> rows
    if rank < s_r:
        replicas = s_r // s_n
        s = rank // replicas
        per_source = []
        for src in range(world):
            rows = []
            if src % replicas == rank % replicas:
                for t in range(active[src]):
                    rows.append((src, t, ("shared", s)))
            per_source.append(rows)
        blocks.append(per_source)
    else:
        local = case.local_experts
        for e_local in range(local):
            expert = (rank - s_r) * local + e_local
            per_source = []
            for src in range(world):
                rows = []
                for t in range(active[src]):
                    if expert in p["ids"][src][t].tolist():
                        rows.append((src, t, expert))
                per_source.append(rows)
            blocks.append(per_source)
    g = case.global_bs or case.batches[0] * world
    capacity = -(-g * s_n // s_r) if rank < s_r else g * min(case.local_experts, case.top_k)
    dtype = torch.int8 if case.quant == 2 else case.dtype
    expand_x = torch.zeros(capacity, case.hidden, dtype=dtype)
    scales = torch.zeros(capacity, dtype=torch.float32)
    assist = torch.zeros(capacity * 128, dtype=torch.int32)
    order, running, entry = [], 0, 0
    for per_source in blocks:
        for rows in per_source:
            for src, t, target in rows:
                x = p["x"][src][t]
                if case.quant == 2:
                    smooth = None
                    if p["smooth"] is not None:
                        smooth = p["smooth"][target[1]] if isinstance(target, tuple) else p["smooth"][s_n + target]
                    expand_x[len(order)], scales[len(order)] = quantize(x, smooth)
                else:
                    expand_x[len(order)] = x
                order.append((src, t, target))
            running += len(rows)
            assist[entry] = running
            entry += 1
    counts = [sum(len(rows) for rows in per_source) for per_source in blocks]
    nums = []
    for i, c in enumerate(counts):
        nums.append(c if case.token_nums_type == 1 else sum(counts[: i + 1]))
    return {
        "expand_x": expand_x,
        "dynamic_scales": scales,
        "assist": assist,
        "expert_token_nums": torch.tensor(nums, dtype=torch.int64),
        "rows": order,
    }


def run_dispatch(case: Case) -> dict:
    """On one rank: dispatch_setup and dispatch_teardown over the default group; the full outputs."""
    from overlap import ops

    rank, world = dist.get_rank(), dist.get_world_size()
    p = build(case)
    group = dist.group.WORLD.group_name
    x, ids = p["x"][rank], p["ids"][rank]
    mask = None if case.active is None else torch.arange(x.shape[0]) < case.active[rank]
    kw = common_kwargs(case)
    y, _, cmd = ops.dispatch_setup(
        x, ids, group, world, rank, case.experts, scales=p["smooth"], x_active_mask=mask, quant_mode=case.quant, **kw
    )
    expand_x, scales, assist, nums = ops.dispatch_teardown(
        x,
        y,
        ids,
        cmd,
        group,
        world,
        rank,
        case.experts,
        quant_mode=case.quant,
        expert_token_nums_type=case.token_nums_type,
        **kw,
    )
    return {"expand_x": expand_x, "dynamic_scales": scales, "assist": assist, "expert_token_nums": nums}


# ---- the reference MoELayer, int8 dispatch (quant_mode 2), in one process ----------------------


def moe_layer_reference(layer, x: torch.Tensor) -> torch.Tensor:
    """`overlap.MoELayer`'s output for `x` `(T, H)` from its seed, with every expert in this process:
    softmax top-K routing with renormalised weights; each routed row quantised per the contract
    (`quantize`) and dequantised as `bf16(q · scale)` when `layer.quant_mode == 2`; gated MLPs
    `down(silu(gate x) · up x)`; `Σ_k w · float32(expert row)` in k order, plus the shared experts'
    fp32 sum cast to the layer's dtype (it travels as `shared_expert_x`), one final cast."""
    import torch.nn.functional as F

    from overlap.moe import _weights  # the weights from the seed (data, not computation)

    router, experts, shared = _weights(
        layer.seed, layer.num_experts, layer.num_shared_experts, layer.hidden_size, layer.intermediate_size, layer.dtype
    )

    def mlp(v, w):
        gate, up, down = w
        return F.linear(F.silu(F.linear(v, gate)) * F.linear(v, up), down)

    probs = torch.softmax(x.float() @ router.t(), dim=-1)
    weights, ids = torch.topk(probs, layer.top_k, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    inputs = x
    if layer.quant_mode == 2:
        rows = []
        for t in range(x.shape[0]):
            q, scale = quantize(x[t], None)
            rows.append((q.float() * scale).to(layer.dtype))
        inputs = torch.stack(rows) if rows else x
    acc = torch.zeros(x.shape, dtype=torch.float32)
    for k in range(layer.top_k):
        for e in ids[:, k].unique().tolist():
            rows = (ids[:, k] == e).nonzero().flatten()
            acc[rows] += weights[rows, k : k + 1] * mlp(inputs[rows], experts[e]).float()
    if shared:
        total = torch.zeros(x.shape, dtype=torch.float32)
        for w in shared:
            total += mlp(x, w).float()
        acc += total.to(layer.dtype).float()
    return acc.to(layer.dtype)
