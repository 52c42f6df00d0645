"""The parameters the four ops share, validated once.

Owns: every documented range and relation of the scalar parameters (`docs/ops.md`, "Ranges", refused
before communicating), the derived quantities (local experts L, shared replicas R, capacity A,
staging row sizes), and the shape/dtype checks of the ops' tensors. Every check runs before any
communication and raises `ValueError` (bad value) or `TypeError` (bad type) naming the parameter,
the value and the allowed range. Never communicates, never reads device memory except where a
value check needs it (expert ids, the active mask), and never `assert`s.

HCCL_BUFFSIZE: where the variable is set we check the 2025 reference pages' rule (factor 2):
`HCCL_BUFFSIZE · 2^20 ≥ 2 · (L_moe · max_bs · W · Align512(Align32(2H) + 44)
+ (K + S_n) · max_bs · Align512(2H))`; CANN's 2026 page says 4, the tiling code something between.
"""

from __future__ import annotations

import os
from dataclasses import KW_ONLY, dataclass

import torch
from torch import Tensor

from ..kernels.layout import align

MAX_WORLD_SIZE = 384
MAX_EXPERTS = 512
MAX_SHARED_EXPERTS = 4
MIN_HIDDEN, MAX_HIDDEN = 1024, 8192
MAX_BATCH = 512
MAX_TOP_K = 16
MAX_GROUP_NAME = 128
HALF_TYPES = (torch.float16, torch.bfloat16)


def _check_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    return value


def _check_range(name: str, value: int, low: int, high: int, interval: str | None = None) -> None:
    """Inclusive [low, high]; `interval` is how the range is shown (the documented notation)."""
    if not low <= value <= high:
        raise ValueError(f"{name} must be in {interval or f'[{low}, {high}]'}, got {value}")


def check_tensor(
    name: str,
    tensor: object,
    *,
    shape: tuple[int | None, ...] | None = None,
    dtypes: tuple[torch.dtype, ...] | None = None,
    rule: str = "",
) -> Tensor:
    """Type, rank, shape (None = any size) and dtype of one tensor argument."""
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if dtypes is not None and tensor.dtype not in dtypes:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name} must have dtype in {{{allowed}}}, got {str(tensor.dtype).removeprefix('torch.')}")
    if shape is not None:
        if tensor.dim() != len(shape):
            raise ValueError(
                f"{name} must be {len(shape)}-D with shape {_show(shape)}, got shape {tuple(tensor.shape)}"
            )
        for want, got in zip(shape, tensor.shape):
            if want is not None and want != got:
                extra = f" ({rule})" if rule else ""
                raise ValueError(f"{name} must have shape {_show(shape)}{extra}, got {tuple(tensor.shape)}")
    return tensor


def _show(shape: tuple[int | None, ...]) -> str:
    return "(" + ", ".join("*" if s is None else str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


@dataclass(frozen=True)
class MoeCommParams:
    """Scalar parameters common to the four ops, validated on construction.

    Attributes are torch_npu's parameter names. Derived properties use the spec's notation:
    W = ep_world_size, S_n = shared_expert_num, S_r = shared_expert_rank_num.
    """

    group_ep: str
    ep_world_size: int
    ep_rank_id: int
    moe_expert_num: int
    _: KW_ONLY  # the rest by keyword: a row of bare positional zeros says nothing
    expert_shard_type: int = 0
    shared_expert_num: int = 1
    shared_expert_rank_num: int = 0
    global_bs: int = 0
    quant_mode: int = 0
    comm_quant_mode: int = 0
    comm_type: int = 0
    comm_alg: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.group_ep, str):
            raise TypeError(
                f"group_ep must be a str (a process group's group_name), got {type(self.group_ep).__name__}"
            )
        if not 1 <= len(self.group_ep) < MAX_GROUP_NAME:
            raise ValueError(
                f"group_ep length must be in [1, {MAX_GROUP_NAME}), got {len(self.group_ep)} ({self.group_ep!r})"
            )
        for name in (
            "ep_world_size",
            "ep_rank_id",
            "moe_expert_num",
            "expert_shard_type",
            "shared_expert_num",
            "shared_expert_rank_num",
            "global_bs",
            "quant_mode",
            "comm_quant_mode",
            "comm_type",
        ):
            _check_int(name, getattr(self, name))
        if not isinstance(self.comm_alg, str):
            raise TypeError(f"comm_alg must be a str, got {type(self.comm_alg).__name__}")
        world = self.ep_world_size
        _check_range("ep_world_size", world, 2, MAX_WORLD_SIZE)
        _check_range("ep_rank_id", self.ep_rank_id, 0, world - 1, f"[0, {world})")
        _check_range("expert_shard_type", self.expert_shard_type, 0, 0, "{0} (shared-expert ranks first)")
        _check_range("shared_expert_num", self.shared_expert_num, 0, MAX_SHARED_EXPERTS)
        s_r, s_n = self.shared_expert_rank_num, self.shared_expert_num
        _check_range("shared_expert_rank_num", s_r, 0, world // 2, f"[0, ep_world_size / 2 = {world // 2}]")
        if s_r > 0:
            if s_n == 0:
                raise ValueError(
                    f"shared_expert_num must be in [1, shared_expert_rank_num = {s_r}] when "
                    f"shared_expert_rank_num > 0, got 0"
                )
            if s_n > s_r:
                raise ValueError(f"shared_expert_num must be in [1, shared_expert_rank_num = {s_r}], got {s_n}")
            if s_r % s_n:
                raise ValueError(f"shared_expert_rank_num must be divisible by shared_expert_num = {s_n}, got {s_r}")
        _check_range("moe_expert_num", self.moe_expert_num, 1, MAX_EXPERTS, f"(0, {MAX_EXPERTS}]")
        if self.moe_expert_num % (world - s_r):
            raise ValueError(
                f"moe_expert_num must be divisible by ep_world_size - shared_expert_rank_num = "
                f"{world - s_r}, got {self.moe_expert_num}"
            )
        if self.quant_mode in (1, 3, 4):
            raise ValueError(
                f"quant_mode must be 0 (none) or 2 (dynamic int8), got {self.quant_mode} "
                f"(1 static, 3 per-group and 4 MX exist only on other hardware)"
            )
        if self.quant_mode not in (0, 2):
            raise ValueError(f"quant_mode must be 0 (none) or 2 (dynamic int8), got {self.quant_mode}")
        _check_range("comm_quant_mode", self.comm_quant_mode, 0, 0, "{0}")
        _check_range("comm_type", self.comm_type, 0, 0, "{0} (AICPU-SDMA)")
        if self.comm_alg != "":
            raise ValueError(f'comm_alg must be "" (reserved), got {self.comm_alg!r}')
        if self.global_bs < 0:
            raise ValueError(
                f"global_bs must be 0 or in [BS * ep_world_size, {MAX_BATCH} * ep_world_size], got {self.global_bs}"
            )
        if s_r > 0 and self.global_bs:
            self._check_shared_capacity(self.global_bs)

    # Derived quantities -------------------------------------------------------------------------

    @property
    def is_shared_rank(self) -> bool:
        return self.ep_rank_id < self.shared_expert_rank_num

    @property
    def num_moe_ranks(self) -> int:
        return self.ep_world_size - self.shared_expert_rank_num

    @property
    def num_moe_local_experts(self) -> int:
        """L of an MoE rank: `moe_expert_num / (W − S_r)`."""
        return self.moe_expert_num // self.num_moe_ranks

    @property
    def num_local_experts(self) -> int:
        """L of this rank: 1 on a shared-expert rank."""
        return 1 if self.is_shared_rank else self.num_moe_local_experts

    @property
    def num_shared_replicas(self) -> int:
        """R = S_r / S_n ranks per shared expert (0 without shared-expert ranks)."""
        s_r = self.shared_expert_rank_num
        return s_r // self.shared_expert_num if s_r else 0

    def global_batch(self, batch: int) -> int:
        """G = global_bs, or BS · W when global_bs is 0."""
        return self.global_bs or batch * self.ep_world_size

    def capacity(self, batch: int, top_k: int) -> int:
        """A: rows of expand_x. MoE rank `G · min(L, K)`; shared rank `G · S_n / S_r` (rounded up)."""
        g = self.global_batch(batch)
        if self.is_shared_rank:
            return -(-g * self.shared_expert_num // self.shared_expert_rank_num)
        return g * min(self.num_local_experts, top_k)

    def _check_shared_capacity(self, global_batch: int) -> None:
        # A replica receives the tokens of ceil(W / R) source ranks of at most G / W tokens each;
        # with W % R != 0 that can exceed A = G · S_n / S_r, which the hardware would overflow.
        replicas = self.num_shared_replicas
        sources = -(-self.ep_world_size // replicas)
        need = sources * (global_batch // self.ep_world_size)
        have = -(-global_batch * self.shared_expert_num // self.shared_expert_rank_num)
        if need > have:
            raise ValueError(
                f"shared_expert_rank_num = {self.shared_expert_rank_num} with shared_expert_num = "
                f"{self.shared_expert_num} gives R = {replicas} replicas, which do not divide "
                f"ep_world_size = {self.ep_world_size}: a replica may receive {need} rows but "
                f"holds A = {have}; choose shared_expert_rank_num so that W is a multiple of R"
            )

    # Tensor checks -------------------------------------------------------------------------------

    def check_batch(self, batch: int, top_k: int, hidden: int) -> None:
        """BS, K, H ranges, global_bs relation, HCCL_BUFFSIZE."""
        _check_range("BS (x.size(0))", batch, 1, MAX_BATCH, f"(0, {MAX_BATCH}]")
        _check_range("K (expert_ids.size(1))", top_k, 1, MAX_TOP_K, f"(0, {MAX_TOP_K}]")
        if top_k > self.moe_expert_num:
            raise ValueError(
                f"K (expert_ids.size(1)) must be in (0, moe_expert_num = {self.moe_expert_num}], got {top_k}"
            )
        _check_range("H (hidden size)", hidden, MIN_HIDDEN, MAX_HIDDEN)
        world = self.ep_world_size
        if self.global_bs and not batch * world <= self.global_bs <= MAX_BATCH * world:
            raise ValueError(
                f"global_bs must be 0 or in [BS * ep_world_size = {batch * world}, "
                f"{MAX_BATCH} * ep_world_size = {MAX_BATCH * world}], got {self.global_bs}"
            )
        if self.shared_expert_rank_num > 0:
            self._check_shared_capacity(self.global_batch(batch))
        self._check_buffsize(batch, top_k, hidden)

    def _check_buffsize(self, batch: int, top_k: int, hidden: int) -> None:
        raw = os.environ.get("HCCL_BUFFSIZE")
        if raw is None or raw == "":
            return
        try:
            megabytes = int(raw)
        except ValueError:
            raise ValueError(f"HCCL_BUFFSIZE must be an integer number of MB, got {raw!r}") from None
        max_bs = self.global_batch(batch) // self.ep_world_size
        need = 2 * (
            self.num_moe_local_experts * max_bs * self.ep_world_size * align(align(2 * hidden, 32) + 44, 512)
            + (top_k + self.shared_expert_num) * max_bs * align(2 * hidden, 512)
        )
        if megabytes * 2**20 < need:
            raise ValueError(
                f"HCCL_BUFFSIZE must be >= {-(-need // 2**20)} MB ({need} bytes by the reference "
                f"pages' factor-2 rule) for BS={batch}, H={hidden}, K={top_k}, got {megabytes}"
            )

    def check_expert_ids(self, expert_ids: object, batch: int, num_active: int) -> Tensor:
        ids = check_tensor("expert_ids", expert_ids, shape=(batch, None), dtypes=(torch.int32, torch.int64))
        if ids.device.type == "npu" or num_active == 0:
            return ids
        active = ids[:num_active]
        low, high = int(active.min()), int(active.max())
        if low < 0 or high >= self.moe_expert_num:
            bad = low if low < 0 else high
            raise ValueError(f"expert_ids values must be in [0, moe_expert_num = {self.moe_expert_num}), got {bad}")
        if ids.shape[1] > 1:
            ordered = active.sort(dim=1).values
            dup = (ordered[:, 1:] == ordered[:, :-1]).any(dim=1)
            if bool(dup.any()):
                row = int(dup.nonzero()[0, 0])
                raise ValueError(
                    f"expert_ids must hold distinct experts within a row, got row {row} = {active[row].tolist()}"
                )
        return ids

    def check_active_mask(self, x_active_mask: object, batch: int) -> int:
        """Validate `x_active_mask` (None or a True-prefix `(BS,)` bool) and return its count."""
        if x_active_mask is None:
            return batch
        mask = check_tensor("x_active_mask", x_active_mask, shape=(batch,), dtypes=(torch.bool,))
        if mask.device.type == "npu":
            return int(mask.sum())
        count = int(mask.sum())
        if count and not bool(mask[:count].all()):
            raise ValueError(
                f"x_active_mask must be a True-prefix (all True before any False), got "
                f"{count} True values not all at the front"
            )
        return count
