"""Run transformers MoE models expert parallel through overlap: `ep_implementation="overlap"`.

Owns: the `EPImplementation` that transformers (>= 5.23) calls for every `ep_dispatch_experts`
module, registered as ``"overlap"`` in `EPImplementationInterface` when this module is imported
(idempotent); the microbatch pipeline it runs; and `record`, a context manager that records what
ran into an `overlap.timeline.Timeline` and reports the overlap. Never edits transformers' plans,
never falls back to another implementation: what the ops refuse is raised, naming the model's
config field.

Usage::

    import overlap.integrations.transformers  # registers "overlap"
    from transformers.distributed import DistributedConfig
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16,
        distributed_config=DistributedConfig(fsdp_size=W, ep_size=W, ep_implementation="overlap"))
    with torch.inference_mode(), record(model) as rec:
        out = model.generate(ids, max_new_tokens=8)
    print(rec.report())

What one call does (a rank holds ``N`` tokens, `(N, H)` hidden states, `(N, K)` routes)::

    if the ranks of a TP group share the batch: keep this rank's slice (as AllToAllEP does)
    N_max = all_reduce(N, MAX) over the EP group          # skipped when EP == TP (same N everywhere)
    M = num_microbatches(N_max)                           # 1 if N_max < 64, else max(2, ceil(N_max/512))
    R = ceil(N_max / M)                                   # rows per microbatch, <= 512, same on all ranks
    microbatch i = rows [i·R, (i+1)·R) zero-padded to R, x_active_mask = its real rows (a True-prefix)
    run pipeline_schedule(M):                             # every rank issues the same exchanges in order
        dispatch_setup@mb0, dispatch_setup@mb1, dispatch_teardown@mb0, experts@mb0, combine_setup@mb0,
        dispatch_setup@mb2, dispatch_teardown@mb1, experts@mb1, combine_setup@mb1, combine_teardown@mb0, ...
    out = concat(combine_teardown outputs)[:N]; all-gather the slices over TP

so microbatch i+1's dispatch travels while microbatch i's experts compute, and microbatch i's
combine travels while microbatch i+1's experts compute; at most 2 dispatches and 2 combines are in
flight (the ops' default budget). The experts run top-1 with unit weights on the rows each local
expert received (`expert_token_nums`); the routing weights are applied by combine_teardown
(fp32 sum over k, one cast), as `AllToAllEP` applies them after its second exchange.

`global_bs` is ``R · W`` (the largest microbatch of the group times the EP size): every rank pads
to R rows, so the ops' buffers hold A = R·W·min(L, K) rows per call, not 512·W·min(L, K).

Inference only: a call that needs gradients raises `NotImplementedError` (the split ops have no
backward; use `ep_implementation="all_to_all"` to train).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from transformers.distributed.expert_parallel import EPImplementation, EPImplementationInterface

from .. import _context, ops
from ..timeline import OverlapReport, Timeline

__all__ = [
    "MAX_MICROBATCH_TOKENS",
    "MIN_SPLIT_TOKENS",
    "OverlapEP",
    "Recorder",
    "Step",
    "microbatch_rows",
    "microbatches",
    "num_microbatches",
    "pipeline_schedule",
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
    """Microbatches for a call whose largest rank holds `max_tokens` tokens.

    0 tokens: 0; fewer than `MIN_SPLIT_TOKENS` (64): 1; otherwise the fewest microbatches, at least
    2, of at most `MAX_MICROBATCH_TOKENS` (512) tokens each.
    """
    if max_tokens < 0:
        raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
    if max_tokens == 0:
        return 0
    if max_tokens < MIN_SPLIT_TOKENS:
        return 1
    return max(2, math.ceil(max_tokens / MAX_MICROBATCH_TOKENS))


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


def _plan(max_tokens: int) -> tuple[int, int]:
    """(microbatches, rows per microbatch) for a call whose largest rank holds `max_tokens`."""
    forced = _forced_num.get()
    if forced is None or max_tokens == 0:
        return num_microbatches(max_tokens), microbatch_rows(max_tokens)
    num = min(max(forced, math.ceil(max_tokens / MAX_MICROBATCH_TOKENS)), max_tokens)
    return num, math.ceil(max_tokens / num)


OPS = ("dispatch_setup", "dispatch_teardown", "experts", "combine_setup", "combine_teardown")


@dataclass(frozen=True, order=True)
class Step:
    """One step of the pipeline: `op` (one of `OPS`) on microbatch `mb`; prints `dispatch_setup@mb1`."""

    op: str
    mb: int

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"op must be one of {OPS}, got {self.op!r}")
        if self.mb < 0:
            raise ValueError(f"mb must be >= 0, got {self.mb}")

    def __str__(self) -> str:
        return f"{self.op}@mb{self.mb}"

    @classmethod
    def parse(cls, text: str) -> Step:
        match = re.fullmatch(r"(\w+)@mb(\d+)", text)
        if match is None:
            raise ValueError(f"a step reads '<op>@mb<i>', got {text!r}")
        return cls(match.group(1), int(match.group(2)))


def pipeline_schedule(num: int) -> tuple[Step, ...]:
    """The order of the steps for `num` microbatches (a value: later a graph can be built from it).

    Dispatch of mb i+1 is set up before mb i's experts; combine of mb i is set up before mb i+1's
    experts and torn down after them. At most 2 dispatches and 2 combines are in flight.
    """
    if num < 0:
        raise ValueError(f"num must be >= 0, got {num}")
    steps: list[Step] = [Step("dispatch_setup", 0)] if num else []
    for i in range(num):
        if i + 1 < num:
            steps.append(Step("dispatch_setup", i + 1))
        steps += [Step("dispatch_teardown", i), Step("experts", i), Step("combine_setup", i)]
        if i > 0:
            steps.append(Step("combine_teardown", i - 1))
    if num:
        steps.append(Step("combine_teardown", num - 1))
    return tuple(steps)


# --------------------------------------------------------------------------------------------
# Recording
# --------------------------------------------------------------------------------------------

_KIND = {"dispatch_setup": "comm_issue", "combine_setup": "comm_issue", "dispatch_teardown": "comm_wait",
         "combine_teardown": "comm_wait", "experts": "compute"}
_TRACK = {"comm_issue": "issue", "comm_wait": "wait", "compute": "experts"}


class Recorder:
    """What ran inside `record(...)`: one interval per step (`dispatch_setup@mb1.l3`, on tracks
    ``issue`` / ``wait`` / ``experts``) and one per transfer (`dispatch@mb1.l3`, kind ``comm`` on
    track ``link``, from the transport's start and finish times), all on `time.perf_counter`."""

    def __init__(self) -> None:
        self.timeline = Timeline(("experts", "issue", "wait", "link"))
        self.num_calls = 0

    def report(self) -> OverlapReport:
        """Compute busy (experts), comm busy (transfers), their intersection, hidden fraction."""
        return self.timeline.report()

    def add_transfer(self, name: str, transfer: ops.Transfer | None) -> None:
        if transfer is not None and transfer.started_at is not None and transfer.finished_at is not None:
            self.timeline.add("link", name, transfer.started_at, transfer.finished_at, "comm")


_recorder: contextvars.ContextVar[Recorder | None] = contextvars.ContextVar("overlap_hf_recorder", default=None)


@contextlib.contextmanager
def record(model: torch.nn.Module | None = None) -> Iterator[Recorder]:
    """Record every overlap EP call made inside the block (e.g. around `model(...)` or `generate`).

    Args:
        model: when given, each layer is tagged by the number in its module name (``l3`` for
            ``model.layers.3.mlp.experts``); otherwise by load order.
    """
    if model is not None:
        for name, module in model.named_modules():
            impl = getattr(module, "_overlap_ep", None)
            if impl is not None:
                numbers = re.findall(r"\.(\d+)(?=\.|$)", name)
                impl.layer_tag = f"l{numbers[0]}" if numbers else name
    rec = Recorder()
    token = _recorder.set(rec)
    try:
        yield rec
    finally:
        _recorder.reset(token)


# --------------------------------------------------------------------------------------------
# The EP implementation
# --------------------------------------------------------------------------------------------


def _config_name(config: object, candidates: tuple[str, ...], default: str) -> str:
    return next((c for c in candidates if hasattr(config, c)), default)


@dataclass
class _Microbatch:
    """One microbatch's inputs (padded to R rows) and what its steps hand each other."""

    x: Tensor  # (R, H) bf16/fp16
    expert_ids: Tensor  # (R, K) int32
    expert_scales: Tensor  # (R, K) fp32
    x_active_mask: Tensor | None  # (R,) bool True-prefix, None when all rows are real
    num_real: int
    state: dict


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

    _load_order = 0

    def __init__(self, experts: torch.nn.Module, ep_mesh, tp_mesh) -> None:
        super().__init__(experts, ep_mesh, tp_mesh)
        self.config = getattr(experts, "config", None)
        self.model_name = getattr(self.config, "model_type", None) or type(experts).__name__
        self.ep_size = ep_mesh.size()
        self.ep_rank = ep_mesh.get_local_rank()
        self.moe_expert_num = self.num_local_experts * self.ep_size
        OverlapEP._load_order += 1
        self.layer_tag = f"l{OverlapEP._load_order - 1}"
        experts._overlap_ep = self  # lets `record(model)` name the layer
        if self.config is not None:
            self._check(getattr(self.config, "hidden_size", None),
                        getattr(self.config, _config_name(self.config, ("num_experts_per_tok", "moe_topk", "top_k"),
                                                          "num_experts_per_tok"), None))
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
        e_name = _config_name(cfg, ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"),
                              "num_experts")
        low, high = HIDDEN_RANGE
        where = f'{self.model_name}: ep_implementation="overlap"'
        if hidden is not None and not low <= hidden <= high:
            raise ValueError(f"{where} needs {h_name} in [{low}, {high}] (the dispatch/combine ops' H range), "
                             f"got {h_name} = {hidden}; use ep_implementation=\"all_to_all\" for this model")
        if top_k is not None and not 0 < top_k <= MAX_TOP_K:
            raise ValueError(f"{where} needs {k_name} in (0, {MAX_TOP_K}] (experts per token), got {k_name} = "
                             f"{top_k}; use ep_implementation=\"all_to_all\" for this model")
        if self.moe_expert_num > MAX_EXPERTS:
            raise ValueError(f"{where} needs {e_name} in (0, {MAX_EXPERTS}], got {e_name} = {self.moe_expert_num}")

    def _check_dtype(self, dtype: torch.dtype) -> None:
        if dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f'{self.model_name}: ep_implementation="overlap" moves bf16/fp16 tokens, but the model '
                             f"runs in {dtype}: load it with dtype=torch.bfloat16 (or torch.float16)")

    # -- one call --

    def __call__(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        if torch.is_grad_enabled() and (hidden_states.requires_grad or top_k_weights.requires_grad):
            raise NotImplementedError(
                f'{self.model_name}: ep_implementation="overlap" runs inference only (the split dispatch/combine '
                'ops have no backward): wrap the call in torch.no_grad() / torch.inference_mode(), or use '
                'ep_implementation="all_to_all" to train')
        self._check_dtype(hidden_states.dtype)
        self._check(hidden_states.shape[-1], top_k_index.shape[-1])
        num_tokens, hidden = hidden_states.shape
        tp_size = self.tp_mesh.size()
        if self.shares_batch:  # same N on every rank of the group; slices follow torch.chunk: the first is largest
            max_tokens = math.ceil(num_tokens / tp_size)
        if tp_size > 1:  # the TP group shares this batch: each rank keeps a disjoint slice (no communication)
            hidden_states, top_k_index, top_k_weights = (_tp_slice(t, self.tp_mesh)
                                                          for t in (hidden_states, top_k_index, top_k_weights))
        if not self.shares_batch:  # ranks hold different batches: agree on the largest (one tiny all-reduce)
            count = torch.tensor([hidden_states.shape[0]], dtype=torch.int64, device=hidden_states.device)
            dist.all_reduce(count, op=dist.ReduceOp.MAX, group=self.ep_mesh.get_group())
            max_tokens = int(count.item())
        output = self._exchange(hidden_states, top_k_index, top_k_weights, max_tokens)
        if tp_size == 1:
            return output
        return _tp_gather(output, self.tp_mesh, num_tokens, hidden)

    def _exchange(self, x: Tensor, top_k_index: Tensor, top_k_weights: Tensor, max_tokens: int) -> Tensor:
        """This rank's `(n, H)` tokens through the pipeline; `max_tokens` is the group's largest n."""
        num, rows = _plan(max_tokens)
        if num == 0:
            return x.new_zeros(0, x.shape[1])
        mbs = [self._microbatch(x, top_k_index, top_k_weights, i * rows, rows) for i in range(num)]
        _Call(self, mbs, rows * self.ep_size, _recorder.get()).run(pipeline_schedule(num))
        return torch.cat([mb.state["x_out"][: mb.num_real] for mb in mbs])

    def _microbatch(self, x: Tensor, ids: Tensor, weights: Tensor, start: int, rows: int) -> _Microbatch:
        num_real = max(0, min(rows, x.shape[0] - start))
        top_k = ids.shape[1]
        if num_real == rows:
            xs, ids_mb = x[start : start + rows], ids[start : start + rows].to(torch.int32)
            w_mb, mask = weights[start : start + rows].float(), None
        else:  # zero rows after the real ones; their routes are valid distinct ids, never sent
            xs = x.new_zeros(rows, x.shape[1])
            ids_mb = torch.arange(top_k, dtype=torch.int32, device=x.device).expand(rows, top_k).clone()
            w_mb = torch.zeros(rows, top_k, dtype=torch.float32, device=x.device)
            xs[:num_real] = x[start : start + num_real]
            ids_mb[:num_real] = ids[start : start + num_real]
            w_mb[:num_real] = weights[start : start + num_real]
            mask = torch.arange(rows, device=x.device) < num_real
        return _Microbatch(xs.contiguous(), ids_mb.contiguous(), w_mb.contiguous(), mask, num_real, {})


class _Call:
    """Runs one call's schedule: the handler of each step, with the microbatches' shared state.

    The handlers are the only place the ops are called; the order is `pipeline_schedule`'s.
    """

    def __init__(self, impl: OverlapEP, mbs: list[_Microbatch], global_bs: int, recorder: Recorder | None) -> None:
        self.impl, self.mbs, self.recorder = impl, mbs, recorder
        self.args = (impl.group_ep, impl.ep_size, impl.ep_rank, impl.moe_expert_num)
        # no shared experts through the ops: a model's shared expert runs in its own MoE block
        self.common = dict(shared_expert_num=0, shared_expert_rank_num=0, global_bs=global_bs)
        self.handlers: dict[str, Callable[[_Microbatch], None]] = {
            "dispatch_setup": self.dispatch_setup, "dispatch_teardown": self.dispatch_teardown,
            "experts": self.experts, "combine_setup": self.combine_setup, "combine_teardown": self.combine_teardown,
        }

    def run(self, steps: tuple[Step, ...]) -> None:
        rec, tag = self.recorder, self.impl.layer_tag
        if rec is not None:
            rec.num_calls += 1
        for step in steps:
            mb = self.mbs[step.mb]
            label = f"mb{step.mb}.{tag}"
            with _context.labelled(label):
                start = time.perf_counter()
                self.handlers[step.op](mb)
                end = time.perf_counter()
            if rec is not None:
                kind = _KIND[step.op]
                rec.timeline.add(_TRACK[kind], f"{step}.{tag}", start, end, kind)
                if step.op.endswith("_teardown"):
                    op = step.op.split("_")[0]
                    rec.add_transfer(f"{op}@{label}", mb.state.pop(f"{op}_transfer", None))

    def _find_transfer(self, comm_cmd_info: Tensor) -> ops.Transfer | None:
        ticket = getattr(comm_cmd_info, "_overlap_ticket", None)
        if self.recorder is None or ticket is None:
            return None
        return next((t for t in ops.in_flight(self.impl.group_ep) if t.ticket == ticket), None)

    def dispatch_setup(self, mb: _Microbatch) -> None:
        y, expand_idx, cmd = ops.dispatch_setup(mb.x, mb.expert_ids, *self.args, x_active_mask=mb.x_active_mask,
                                                **self.common)
        mb.state.update(y=y, expand_idx=expand_idx, dispatch_cmd=cmd, dispatch_transfer=self._find_transfer(cmd))

    def dispatch_teardown(self, mb: _Microbatch) -> None:
        s = mb.state
        expand_x, _, assist, token_nums = ops.dispatch_teardown(mb.x, s.pop("y"), mb.expert_ids, s.pop("dispatch_cmd"),
                                                                *self.args, expert_token_nums_type=1, **self.common)
        s.update(expand_x=expand_x, assist=assist, token_nums=token_nums)

    def experts(self, mb: _Microbatch) -> None:
        """The rank's experts on the rows each local expert received, top-1, unit weights, in place."""
        s = mb.state
        expand_x, counts = s["expand_x"], s.pop("token_nums")
        total = int(counts.sum())
        if total == 0:
            return
        local_ids = torch.repeat_interleave(torch.arange(counts.numel(), device=expand_x.device),
                                            counts.to(expand_x.device), output_size=total).unsqueeze(-1)
        rows = expand_x[:total]
        out = self.impl.experts_forward(rows, local_ids, torch.ones(total, 1, dtype=rows.dtype, device=rows.device))
        expand_x[:total] = out.to(expand_x.dtype)

    def combine_setup(self, mb: _Microbatch) -> None:
        s = mb.state
        quant, cmd = ops.combine_setup(s["expand_x"], mb.expert_ids, s.pop("assist"), *self.args, **self.common)
        s.update(quant=quant, combine_cmd=cmd, combine_transfer=self._find_transfer(cmd))

    def combine_teardown(self, mb: _Microbatch) -> None:
        s = mb.state
        s["x_out"] = ops.combine_teardown(s.pop("expand_x"), s.pop("quant"), mb.expert_ids, s.pop("expand_idx"),
                                          mb.expert_scales, s.pop("combine_cmd"), *self.args,
                                          x_active_mask=mb.x_active_mask, **self.common)


# --------------------------------------------------------------------------------------------
# TP slicing (the layout where the ranks of a TP group share one batch), as AllToAllEP does it
# --------------------------------------------------------------------------------------------


def _tp_slice(t: Tensor, tp_mesh) -> Tensor:
    """Replicate -> Shard(0): this rank's torch.chunk slice of rows; no communication."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    return DTensor.from_local(t, tp_mesh, [Replicate()], run_check=False).redistribute(tp_mesh, [Shard(0)]).to_local()


def _tp_gather(t: Tensor, tp_mesh, num_tokens: int, hidden: int) -> Tensor:
    """Shard(0) -> Replicate: one all-gather of the (possibly uneven or empty) row slices."""
    from torch.distributed.tensor import DTensor, Shard

    return DTensor.from_local(t.contiguous(), tp_mesh, [Shard(0)], shape=(num_tokens, hidden),
                              stride=(hidden, 1)).full_tensor()


# --------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------


def register() -> None:
    """Register `OverlapEP` as ``"overlap"`` in transformers' `EPImplementationInterface` (idempotent)."""
    EPImplementationInterface.register(NAME, OverlapEP)


register()
