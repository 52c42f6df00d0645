"""Run transformers MoE models expert parallel through overlap: `ep_implementation="overlap"`.

Owns: the `EPImplementation` that transformers (>= 5.23) calls for every `ep_dispatch_experts`
module, registered as ``"overlap"`` in `EPImplementationInterface` when this module is imported
(idempotent; `import overlap` imports it as soon as transformers' EP module is: see
`overlap.integrations`); the microbatch pipeline it runs; `generate`, two-batch overlap for decoding; and
`record`, a context manager that records what ran into an `overlap.timeline.Timeline` and reports
the overlap over the whole run (`ForwardReport`). Never edits transformers' plans, never falls back
to another implementation: what the ops refuse is raised, naming the model's config field.

Usage::

    import overlap.integrations.transformers as overlap_hf  # ("overlap" is known once overlap is imported)
    from transformers.distributed import DistributedConfig
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16,
        distributed_config=DistributedConfig(fsdp_size=W, ep_size=W, ep_implementation="overlap"))
    with torch.no_grad(), overlap_hf.record(model) as rec:
        sequences, logits = overlap_hf.generate(model, ids, max_new_tokens=8, parts=2)
    print(rec.report())

What one call does (a rank holds ``N`` tokens, `(N, H)` hidden states, `(N, K)` routes)::

    if the ranks of a TP group share the batch: keep this rank's slice (as AllToAllEP does)
    if the routing weights are bf16/fp16: x = [x | weights, ids // 32, ids % 32]   (N, H + 3K)
    out = scheduler.run_layer(self, x, routes=(top_k_index, weights or ones))[:, :H]
    all-gather the slices over TP

`OverlapEP` implements the MoE protocol of `overlap.moe` (`moe_experts` runs transformers'
`experts_forward`; routing is given; no shared experts), so the *same* executor as any other layer
pipelines it: `overlap.scheduler`'s graph (one all-reduce of N over the EP group, microbatches of
equal padded size R ≤ 512 on every rank, `x_active_mask` for the real rows, microbatch i+1's
dispatch travelling while microbatch i's experts compute, at most 2 exchanges of a kind in flight).
The rule: 1 microbatch if the largest rank has fewer than 64 tokens, else max(2, ceil(N_max/512)).
Inside a user's `overlap.scheduler(...)` context (or `record(model)`) the calls run in it and show
in its plan, timeline and report; otherwise each call runs in a fresh context.

Rounding as transformers does: the experts run top-1 with unit weights on the rows each local
expert received (`expert_token_nums`), as in `AllToAllEP`. transformers then rounds each weighted
output ``out · w`` to the routing weights' dtype before adding the K of them; the combine would add
unrounded fp32 products. With bf16/fp16 weights, each token's K weights and expert ids therefore
travel with it as 3K extra columns (exact in bf16 and fp16: ids < 512 as id // 32 and id % 32),
`moe_experts` applies the row's weight in the model's dtype, and the combine adds with scale 1.
With fp32 weights (DeepSeek-V3) the combine's fp32 product and sum are already what transformers
computes. So with the same expert GEMMs the logits are bit-equal to ``"all_to_all"``. (Before, a
1-ulp difference of the MoE output flipped a near-tied GPT-OSS route on 4 ranks: 22 % of the logits'
maximum.) The columns cost 3K/H more dispatch bytes (0.6 % at K = 2, H = 1024); where H + 3K would
exceed 8192 the weights go to the combine as fp32 scales instead (1-ulp differences).

Inference only: a call that needs gradients raises `NotImplementedError` (the split ops have no
backward; use `ep_implementation="all_to_all"` to train).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from transformers.distributed.expert_parallel import EPImplementation, EPImplementationInterface

from ..ops import staging
from ..pipeline import Scheduler, current_scheduler, policy, scheduler
from ..pipeline.protocol import active_executor
from ..timeline import OverlapReport, Timeline

__all__ = [
    "MAX_MICROBATCH_TOKENS",
    "MIN_SPLIT_TOKENS",
    "ForwardReport",
    "OverlapEP",
    "Recorder",
    "generate",
    "microbatch_rows",
    "microbatches",
    "num_microbatches",
    "record",
    "register",
]

NAME = "overlap"
MAX_MICROBATCH_TOKENS = 512  # the ops' BS limit
MIN_SPLIT_TOKENS = 64  # below this many tokens per rank, one microbatch (splitting costs more than it hides)
HIDDEN_RANGE = (1024, 8192)
MAX_TOP_K = 16
MAX_EXPERTS = 512


# --------------------------------------------------------------------------------------------
# The microbatch rule and the pipeline schedule (pure: the same on every rank)
# --------------------------------------------------------------------------------------------


def num_microbatches(max_tokens: int) -> int:
    """Microbatches for a call whose largest rank holds `max_tokens` tokens: the scheduler's rule
    (`overlap.pipeline.policy.split`) with 2 microbatches and 32 tokens at least per
    microbatch, so 0 tokens: 0; fewer than `MIN_SPLIT_TOKENS` (64): 1; otherwise the fewest
    microbatches, at least 2, of at most 512 tokens each."""
    if max_tokens < 0:
        raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
    return policy.split(max_tokens, 2, MIN_SPLIT_TOKENS // 2).count


def microbatch_rows(max_tokens: int) -> int:
    """Rows of every microbatch (padded) for `max_tokens`: ``ceil(max_tokens / M)``, at most 512."""
    num = num_microbatches(max_tokens)
    return math.ceil(max_tokens / num) if num else 0


_forced_num: contextvars.ContextVar[int | None] = contextvars.ContextVar("overlap_hf_microbatches", default=None)


@contextlib.contextmanager
def microbatches(num: int | None) -> Iterator[None]:
    """Force `num` microbatches per call inside the block (None: the rule of `num_microbatches`),
    raised where needed so that none exceeds 512 tokens. Every rank must use the same `num`: the
    ops' headers refuse (on every rank, no hang) exchanges whose `global_bs` differ. For
    measurements (one microbatch vs pipelined), not needed in normal use."""
    if num is not None and (isinstance(num, bool) or not isinstance(num, int) or num < 1):
        raise ValueError(f"num must be None or an int >= 1, got {num!r}")
    token = _forced_num.set(num)
    try:
        yield
    finally:
        _forced_num.reset(token)


@dataclass(frozen=True)
class ForwardReport(OverlapReport):
    """`OverlapReport` of a recorded model run, where the makespan is the whole run.

    Attributes (besides `OverlapReport`'s, in seconds):
        makespan: wall time of the whole `record(...)` block (attention, routers, everything).
        compute_busy: the recorded compute, which covers only what `compute_covers` says: the
            experts of the EP calls (``"experts"``), or, under two-batch overlap (`generate`,
            `overlap.wrap(model)`), everything a microbatch ran between two op calls
            (``"whole model"``).
        serial_time: an *estimate*, ``makespan + overlap``: the same run with every hidden
            transfer exposed instead.
        speedup: the estimate ``serial_time / makespan`` (>= 1; 1 when nothing was hidden).
        compute_covers: ``"experts"`` or ``"whole model"``.
    """

    compute_covers: str = "experts"

    def __str__(self) -> str:
        def ms(x: float) -> str:
            return f"{x * 1e3:10.3f} ms"

        rows = [
            ("forward (makespan, the whole run)", ms(self.makespan)),
            (f"compute busy ({self.compute_covers})", ms(self.compute_busy)),
            ("comm busy (transfers)", ms(self.comm_busy)),
            ("comm hidden by compute", ms(self.overlap)),
            ("hidden fraction", f"{self.hidden_fraction * 100:10.1f} %"),
            ("estimated serial time (+ hidden comm)", ms(self.serial_time)),
            ("estimated speedup over serial", f"{self.speedup:10.2f} x"),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


class Recorder:
    """What ran inside `record(...)`: the `overlap.scheduler` context every call ran in. Its
    timeline holds one interval per node (`dispatch_setup@mb1.l3` on the compute / comm_setup /
    comm_teardown streams) and one per transfer (`dispatch@mb1.l3`, kind ``comm`` on track ``link``)."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.started = time.perf_counter()
        self.ended: float | None = None

    @property
    def timeline(self) -> Timeline:
        return self.scheduler.timeline

    @property
    def num_calls(self) -> int:
        """EP calls (one per MoE layer per forward) recorded."""
        return len(self.scheduler.plans)

    def report(self) -> ForwardReport:
        """The whole run as the makespan; compute busy (labelled with what it covers), comm busy
        (transfers), their intersection, hidden fraction, and the estimated serial time."""
        inner = self.scheduler.report()
        end = self.ended if self.ended is not None else time.perf_counter()
        makespan = max(end - self.started, inner.makespan)
        fibers = any(iv.name.startswith("compute") for iv in self.timeline.intervals)
        serial = makespan + inner.overlap
        return ForwardReport(
            makespan=makespan,
            compute_busy=inner.compute_busy,
            comm_busy=inner.comm_busy,
            overlap=inner.overlap,
            hidden_fraction=inner.hidden_fraction,
            serial_time=serial,
            speedup=serial / makespan if makespan > 0 else 1.0,
            comm_source=inner.comm_source,
            compute_covers="whole model" if fibers else "experts",
        )


@contextlib.contextmanager
def record(model: torch.nn.Module | None = None) -> Iterator[Recorder]:
    """Record every overlap EP call made inside the block (e.g. around `model(...)` or `generate`).

    Args:
        model: when given, each layer is tagged by the number in its module name (``l3`` for
            ``model.layers.3.mlp.experts``); otherwise layers are numbered in the order they run.
    """
    if model is not None:
        for name, module in model.named_modules():
            impl = getattr(module, "_overlap_ep", None)
            if impl is not None:
                numbers = re.findall(r"\.(\d+)(?=\.|$)", name)
                if numbers:
                    impl.layer_index = int(numbers[0])
    with scheduler(microbatches=2, min_tokens=MIN_SPLIT_TOKENS // 2) as s:
        recorder = Recorder(s)
        try:
            yield recorder
        finally:
            recorder.ended = time.perf_counter()


class _Generate(torch.nn.Module):
    """`model.generate` on one part of the batch, as a module (so the fibers keep its FSDP
    parameters gathered); returns `(sequences (b, T + n), logits (b, n, V))`."""

    def __init__(self, model: torch.nn.Module, kwargs: dict) -> None:
        super().__init__()
        self.model, self.kwargs = model, kwargs

    def forward(self, input_ids: Tensor) -> tuple[Tensor, Tensor]:
        model: Any = self.model  # a transformers GenerationMixin
        out = model.generate(input_ids, return_dict_in_generate=True, output_logits=True, **self.kwargs)
        return out.sequences, torch.stack(out.logits, dim=1)


def generate(
    model: torch.nn.Module, input_ids: Tensor, *, max_new_tokens: int, parts: int = 2, **kwargs
) -> tuple[Tensor, Tensor]:
    """Two-batch overlap in `generate`: the batch's sequences in `parts` parts, each generated by
    its own `model.generate` (its own KV cache) as one of the scheduler's fibers, so that one
    part's attention and experts, in prefill and in every decode step, hide the other parts'
    dispatch and combine.

    Args:
        model: a transformers model loaded with ``ep_implementation="overlap"`` and no TP (each rank
            its own batch: ``fsdp_size = ep_size``; collectives other than the ops cannot run
            while an exchange is in flight).
        input_ids: `(B, T)` int64, this rank's prompts (B may differ between ranks: the parts are
            cut from the group's largest B by the pipeline's rule; a rank with fewer sequences pads
            its parts with zero sequences, generated and dropped).
        max_new_tokens: tokens generated per sequence, exactly (``min_new_tokens`` is set to it:
            every part on every rank must run the same number of steps).
        parts: how many parts (fibers), >= 1.
        **kwargs: passed to `model.generate` (e.g. ``do_sample=False``); ``synced_gpus`` is off.

    Returns:
        `(sequences (B, T + max_new_tokens) int64, logits (B, max_new_tokens, V))`, in input order.

    Raises:
        ValueError: `parts` or `max_new_tokens` < 1, or 3-D / empty `input_ids`, before any
            communication.

    Inside `record(model)` the run is recorded there; otherwise in a fresh scheduler context.
    """
    if isinstance(parts, bool) or not isinstance(parts, int) or parts < 1:
        raise ValueError(f"parts must be an int >= 1, got {parts!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if input_ids.dim() != 2 or input_ids.shape[0] < 1:
        raise ValueError(f"input_ids must be (B, T) with B >= 1, got shape {tuple(input_ids.shape)}")
    kwargs = {**kwargs, "max_new_tokens": max_new_tokens, "min_new_tokens": max_new_tokens, "synced_gpus": False}
    module = _Generate(model, kwargs)
    active = current_scheduler()
    if active is None:
        with scheduler(microbatches=parts, min_tokens=1) as s:
            return s.run_module(module, input_ids)
    # TODO(integrator): the policy module should let a caller ask for `parts` fibers directly.
    saved = active.microbatches, active.min_tokens
    active.microbatches, active.min_tokens = parts, 1
    try:
        return active.run_module(module, input_ids)
    finally:
        active.microbatches, active.min_tokens = saved


# --------------------------------------------------------------------------------------------
# The EP implementation
# --------------------------------------------------------------------------------------------


def _config_name(config: object, candidates: tuple[str, ...], default: str) -> str:
    return next((c for c in candidates if hasattr(config, c)), default)


class OverlapEP(EPImplementation):
    """Tokens reach the experts through overlap's split dispatch / combine, microbatch-pipelined.

    Built by transformers once per experts module (`experts`, the EP mesh, the TP mesh); called
    with this rank's `(hidden_states (N, H), top_k_index (N, K) global ids, top_k_weights (N, K))`;
    returns `(N, H)` weighted expert outputs. See the module docstring for the algorithm.

    Raises (at load, when the config says so, else at the first call):
        ValueError: hidden size outside [1024, 8192], more than 16 experts per token, more than
            512 experts, or a float32 / float64 model (load with ``dtype=torch.bfloat16``).
        NotImplementedError: a call that needs gradients (training).
    """

    def __init__(self, experts: torch.nn.Module, ep_mesh, tp_mesh) -> None:
        super().__init__(experts, ep_mesh, tp_mesh)
        self.config = getattr(experts, "config", None)
        self.model_name = getattr(self.config, "model_type", None) or type(experts).__name__
        self.ep_size = ep_mesh.size()
        self.ep_rank = ep_mesh.get_local_rank()
        self.moe_expert_num = self.num_local_experts * self.ep_size
        # The `.l<j>` of this layer's nodes: the number in the module's name, set by `record(model)`;
        # None (until then): the scheduler numbers layers in the order they run in its context.
        self.layer_index: int | None = None
        experts.__dict__["_overlap_ep"] = self  # lets `record(model)` name the layer
        self._experts_module = experts
        self._carried: tuple[int, int] | None = None  # (H, K) while routes travel as columns of x
        if self.config is not None:
            self._check(
                getattr(self.config, "hidden_size", None),
                getattr(
                    self.config,
                    _config_name(self.config, ("num_experts_per_tok", "moe_topk", "top_k"), "num_experts_per_tok"),
                    None,
                ),
            )
        param = next((p for p in experts.parameters() if p.is_floating_point()), None)
        if param is not None:
            self._check_dtype(param.dtype)

    @property
    def group_ep(self) -> str:
        return self.ep_mesh.get_group().group_name

    # -- validation: name the model's config field and say what to do --

    def _check(self, hidden: int | None, top_k: int | None) -> None:
        cfg = self.config
        h_name = _config_name(cfg, ("hidden_size", "d_model", "n_embd"), "hidden_size")
        k_name = _config_name(cfg, ("num_experts_per_tok", "moe_topk", "top_k"), "num_experts_per_tok")
        e_name = _config_name(
            cfg, ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"), "num_experts"
        )
        low, high = HIDDEN_RANGE
        where = f'{self.model_name}: ep_implementation="overlap"'
        if hidden is not None and not low <= hidden <= high:
            raise ValueError(
                f"{where} needs {h_name} in [{low}, {high}] (the dispatch/combine ops' H range), "
                f'got {h_name} = {hidden}; use ep_implementation="all_to_all" for this model'
            )
        if top_k is not None and not 0 < top_k <= MAX_TOP_K:
            raise ValueError(
                f"{where} needs {k_name} in (0, {MAX_TOP_K}] (experts per token), got {k_name} = "
                f'{top_k}; use ep_implementation="all_to_all" for this model'
            )
        if self.moe_expert_num > MAX_EXPERTS:
            raise ValueError(f"{where} needs {e_name} in (0, {MAX_EXPERTS}], got {e_name} = {self.moe_expert_num}")

    def _check_dtype(self, dtype: torch.dtype) -> None:
        if dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(
                f'{self.model_name}: ep_implementation="overlap" moves bf16/fp16 tokens, but the model '
                f"runs in {dtype}: load it with dtype=torch.bfloat16 (or torch.float16)"
            )

    # -- one call --

    def __call__(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        if torch.is_grad_enabled() and (hidden_states.requires_grad or top_k_weights.requires_grad):
            raise NotImplementedError(
                f'{self.model_name}: ep_implementation="overlap" runs inference only (the split dispatch/combine '
                "ops have no backward): wrap the call in torch.no_grad() / torch.inference_mode(), or use "
                'ep_implementation="all_to_all" to train'
            )
        self._check_dtype(hidden_states.dtype)
        self._check(hidden_states.shape[-1], top_k_index.shape[-1])
        num_tokens, hidden = hidden_states.shape
        tp_size = self.tp_mesh.size()
        if tp_size > 1:  # the TP group shares this batch: each rank keeps a disjoint slice (no communication)
            hidden_states, top_k_index, top_k_weights = (
                _tp_slice(t, self.tp_mesh) for t in (hidden_states, top_k_index, top_k_weights)
            )
        x, routes = self._with_routes(hidden_states, top_k_index, top_k_weights)
        output = self._exchange(x, routes)
        output = output[:, :hidden] if output.shape[1] != hidden else output
        if tp_size == 1:
            return output
        return _tp_gather(output, self.tp_mesh, num_tokens, hidden)

    def _with_routes(
        self, x: Tensor, top_k_index: Tensor, top_k_weights: Tensor
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """The tokens to dispatch and the `(expert_ids int32, expert_scales fp32)` for the combine.

        transformers weights each expert output in the routing weights' dtype: with bf16 / fp16
        weights, every product ``out · w`` is rounded to that dtype before the k outputs are added
        (`AllToAllEP`: ``(outputs * weights).sum(1)``; the single process: bf16 ``index_add_``).
        combine_teardown instead adds the unrounded products in fp32 (the ops' contract). The two
        differ by up to 1 ulp of the MoE output, which the next layers can turn into a flipped
        near-tied route, an O(1) change of that token's logits (GPT-OSS on 4 ranks: 22 % of the
        logits' max). To round as transformers does, each token's K weights and expert ids travel
        with it as ``3 K`` extra columns of x `(N, H + 3K)`, exact in bf16 and fp16 (weight, id // 32,
        id % 32); `moe_experts` weights its rows in the model's dtype and the combine adds them with
        scale 1. With fp32 weights (e.g. DeepSeek-V3) transformers multiplies and adds in fp32, as
        the combine does: the tokens travel as they are, with the weights as scales.
        """
        ids = top_k_index.to(torch.int32)
        width = x.shape[1] + 3 * ids.shape[1]
        if top_k_weights.dtype != x.dtype or width > HIDDEN_RANGE[1]:
            self._carried = None
            return x, (ids, top_k_weights.float())
        self._carried = (x.shape[1], ids.shape[1])
        cols = torch.cat(
            [
                top_k_weights,
                torch.div(ids, 32, rounding_mode="floor").to(x.dtype),
                torch.remainder(ids, 32).to(x.dtype),
            ],
            dim=1,
        )
        return torch.cat([x, cols], dim=1), (ids, torch.ones(ids.shape, dtype=torch.float32, device=ids.device))

    # -- the MoE protocol the scheduler drives (overlap.moe) --

    def moe_comm_kwargs(self) -> dict:
        # No shared experts through the ops: a model's shared expert runs in its own MoE block.
        return dict(
            group_ep=self.group_ep,
            ep_world_size=self.ep_size,
            ep_rank_id=self.ep_rank,
            moe_expert_num=self.moe_expert_num,
            shared_expert_num=0,
            shared_expert_rank_num=0,
        )

    def moe_route(self, x: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError("transformers routes before the EP call: the routes are passed to run_layer")

    def moe_experts(self, expand_x: Tensor, dynamic_scales: Tensor, expert_token_nums: Tensor) -> Tensor:
        """The rank's experts on the rows each local expert received, top-1 with unit weights (the
        routing weights are applied by combine_teardown). Reads nothing on the host: every one of
        the `A` rows goes to `experts_forward` with its local expert id, computed on the device from
        the counts; rows past the received ones get the id `num_local_experts`, the sentinel that
        transformers' expert-parallel experts skip (its ``"grouped_mm"`` experts sort them last and
        leave them out of the GEMMs; ``"eager"`` skips that id), and come back as 0."""
        device = expand_x.device
        nums = expert_token_nums if expert_token_nums.device == device else expert_token_nums.to(device)
        if not staging.defers_host_reads(expand_x):
            # On the cpu reading the count is free: the experts see only the received rows, not the
            # padded capacity (A is global_bs * min(L, K), often twice what arrived).
            received = int(nums.sum())
            if received < expand_x.shape[0]:
                out = expand_x.new_zeros(expand_x.shape)
                if received:
                    out[:received] = self.moe_experts(expand_x[:received], dynamic_scales[:received], nums)
                return out
        num_rows = expand_x.shape[0]
        ends = torch.cumsum(nums, 0)  # (E_local,) end row of each local expert
        row = torch.arange(num_rows, device=device)
        local_ids = torch.searchsorted(ends, row, right=True)  # (A,) in [0, E_local]; E_local: not received
        valid = (row < ends[-1:])[:, None]
        carried = self._carried
        rows = expand_x if carried is None else expand_x[:, : carried[0]].contiguous()
        ones = torch.ones(num_rows, 1, dtype=rows.dtype, device=device)
        with _local_params(self._experts_module):
            y = self.experts_forward(rows, local_ids.unsqueeze(-1), ones).to(expand_x.dtype)
        if carried is not None:  # this row's weight: the one of the token's k whose expert is local
            hidden, k = carried
            cols = expand_x[:, hidden : hidden + 3 * k]
            ids = cols[:, k : 2 * k].long() * 32 + cols[:, 2 * k :].long()
            mine = ids == (local_ids[:, None] + self.ep_rank * self.num_local_experts)
            weight = (cols[:, :k] * mine).sum(-1, keepdim=True)  # exactly one k matches: exact
            y = y * weight  # rounded to the model's dtype, as transformers does
            y = torch.cat([y, expand_x.new_zeros(num_rows, expand_x.shape[1] - hidden)], dim=1)
        # Rows past the received ones may hold anything (NaN times a 0 weight): 0, chosen on the device.
        return torch.where(valid, y, y.new_zeros(()))

    def moe_shared(self, x: Tensor) -> None:
        return None

    def _exchange(self, x: Tensor, routes: tuple[Tensor, Tensor]) -> Tensor:
        """This rank's `(n, H)` tokens through the scheduler's microbatch pipeline."""
        forced = _forced_num.get()
        kwargs: dict[str, Any] = dict(routes=routes, layer_index=self.layer_index)
        if forced is not None:
            kwargs.update(microbatches=forced, min_tokens=0)
        # The executor of the context: a scheduler context's graph, or, inside a fiber of
        # `overlap.wrap(model)` or `generate` (batch overlap), one exchange inline (no collective:
        # another microbatch's exchange may be in flight; at most 512 tokens per rank and microbatch).
        active = active_executor()
        if active is not None:
            return active.run_layer(self, x, **kwargs)
        with scheduler(microbatches=2, min_tokens=MIN_SPLIT_TOKENS // 2) as s:
            return s.run_layer(self, x, **kwargs)


# --------------------------------------------------------------------------------------------
# TP slicing (the layout where the ranks of a TP group share one batch), as AllToAllEP does it
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _local_params(module: torch.nn.Module) -> Iterator[None]:
    """The module's DTensor parameters as local tensors for the block.

    transformers swaps them around the whole EP call and swaps back when the call ends. When the
    scheduler's fibers run several microbatches through the same experts module, one fiber's
    call can end (restoring the DTensors) while another fiber is still inside its own call. This
    block is held only while the experts compute, when no other fiber runs, so the swap is always
    right.
    """
    from torch.distributed.tensor import DTensor

    swapped = {name: p for name, p in module.named_parameters(recurse=False) if isinstance(p, DTensor)}
    for name, p in swapped.items():
        module._parameters[name] = p.to_local()  # type: ignore[assignment]
    try:
        yield
    finally:
        for name, p in swapped.items():
            module._parameters[name] = p


def _tp_slice(t: Tensor, tp_mesh) -> Tensor:
    """Replicate -> Shard(0): this rank's torch.chunk slice of rows; no communication."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    return DTensor.from_local(t, tp_mesh, [Replicate()], run_check=False).redistribute(tp_mesh, [Shard(0)]).to_local()


def _tp_gather(t: Tensor, tp_mesh, num_tokens: int, hidden: int) -> Tensor:
    """Shard(0) -> Replicate: one all-gather of the (possibly uneven or empty) row slices."""
    from torch.distributed.tensor import DTensor, Shard

    return DTensor.from_local(
        t.contiguous(), tp_mesh, [Shard(0)], shape=torch.Size((num_tokens, hidden)), stride=(hidden, 1)
    ).full_tensor()


# --------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------


def register() -> None:
    """Register `OverlapEP` as ``"overlap"`` in transformers' `EPImplementationInterface` (idempotent)."""
    EPImplementationInterface.register(NAME, OverlapEP)


register()
