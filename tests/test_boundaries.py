"""Every documented range of `docs/ops.md` ("Ranges"), at both ends and one past each.

The cases are derived from the docs' table, parsed here: each parameter named in the table needs a
handler below (a new row fails `test_every_documented_parameter_has_boundary_cases` until it gets
one), and the numbers (interval ends, allowed values, shapes, the HCCL_BUFFSIZE formula) are read
from the table's text and evaluated at several W (odd and even), BS and H. So a range changed in the
docs but not in the code, or in the code but not in the docs, fails here.

Scalar rules run through `MoeCommParams` (construction, `check_batch`, `check_expert_ids`); the
tensor rules through the public ops on one process with no process group: an accepted input gets
past every check and stops where the op first needs the group (or, for a teardown, its handle),
before anything is sent. A refusal must be a ValueError or TypeError naming the parameter and the
value.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from overlap import ops
from overlap.errors import HandleError
from overlap.ops import MoeCommParams

DOC = Path(__file__).resolve().parents[1] / "docs" / "ops.md"
WORLDS = (2, 3, 4, 7, 8, 383, 384)  # odd and even, both ends of [2, 384]


def documented_ranges() -> dict[str, str]:
    """{parameter: allowed text} of the "Ranges" table; `a`, `b` rows give one entry each."""
    section = DOC.read_text().split("## Ranges", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, str] = {}
    for line in section.splitlines():
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 2 or cells[0] == "parameter" or set(cells[0]) <= set("-: "):
            continue
        for part in re.split(r"(?<=`), (?=`)", cells[0]):
            rows[part.replace("`", "").split(" ")[0]] = cells[1]
    return rows


# ---- reading the table's text ---------------------------------------------------------------------


def _value(expr: str, env: dict[str, int]) -> Fraction:
    """A documented expression (`BS · W`, `W/2`, `S_n + E`, ...) at the values of `env`."""
    expr = expr.replace("·", "*").replace("−", "-").replace("`", "").strip()
    expr = re.sub(r"\b(\d+)([A-Za-z_])", r"\1*\2", expr)  # 2H -> 2*H
    names = {k: Fraction(v) for k, v in env.items()}
    names.update(
        Align512=lambda v: Fraction(math.ceil(v / 512) * 512), Align32=lambda v: Fraction(math.ceil(v / 32) * 32)
    )
    return eval(expr, {"__builtins__": {}}, names)  # noqa: S307 - the repository's own docs


def interval(text: str, env: dict[str, int]) -> tuple[int, int]:
    """The first interval of `text`, e.g. `[0, W)` or `(0, 512]`, as its inclusive integer ends."""
    m = re.search(r"([\[(])\s*([^,\[\]()]+?)\s*,\s*([^,\[\]()]+?)\s*([\])])", text)
    assert m, f"no interval in {text!r}"
    low, high = _value(m[2], env), _value(m[3], env)
    first = math.floor(low) + 1 if m[1] == "(" else math.ceil(low)
    last = math.ceil(high) - 1 if m[4] == ")" else math.floor(high)
    return first, last


def allowed_values(text: str) -> set[int]:
    """`0`, `0 or 1`, `0 (none) or 2 (dynamic int8); ...`: the integers before any `;`."""
    head = re.sub(r"\([^)]*\)", "", text.split(";")[0])
    values = {int(v) for v in re.findall(r"-?\d+", head)}
    assert values and re.fullmatch(r"[\s\d,or-]*", head), f"not a list of allowed values: {text!r}"
    return values


DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "int32": torch.int32}


def tensor_rule(text: str, env: dict[str, int]) -> tuple[tuple[torch.dtype, ...], tuple[int, ...]]:
    """The dtypes and the shape a tensor row documents, e.g. "float32 `(BS, K)`"."""
    dtypes = tuple(DTYPES[w] for w in re.findall(r"\b(float16|bfloat16|float32|int32)\b", text))
    m = re.search(r"`\(([^)]*)\)`", text)
    assert dtypes and m, f"no dtype or shape in {text!r}"
    dims = [d for d in m[1].split(",") if d.strip()]
    return dtypes, tuple(int(_value(d, env)) for d in dims)


# ---- cases --------------------------------------------------------------------------------------


@dataclass
class Case:
    label: str
    accepted: bool
    call: Callable[[], object]
    value: object = None  # the refused value, which the message must show
    param: str = ""  # the parameter the message must start with (default: the table's row)


def P(world: int = 2, experts: int | None = None, rank: int = 0, **kw) -> MoeCommParams:
    """MoeCommParams with a valid default for everything not given (E = W − S_r)."""
    if experts is None:
        experts = world - kw.get("shared_expert_rank_num", 0)
    kw.setdefault("shared_expert_num", 1 if kw.get("shared_expert_rank_num", 0) else 0)
    return MoeCommParams("g", world, rank, experts, **kw)


def around(name: str, low: int, high: int, make: Callable[[int], Callable[[], object]]) -> Iterator[Case]:
    """low and high accepted; low − 1 and high + 1 refused."""
    yield Case(f"{name}={low}", True, make(low))
    yield Case(f"{name}={high}", True, make(high))
    yield Case(f"{name}={low - 1}", False, make(low - 1), low - 1)
    yield Case(f"{name}={high + 1}", False, make(high + 1), high + 1)


def enumerated(name: str, allowed: set[int], make: Callable[[int], Callable[[], object]]) -> Iterator[Case]:
    """Every allowed value accepted; every other value from min − 1 to max + 1 refused."""
    for v in range(min(allowed) - 1, max(allowed) + 2):
        yield Case(f"{name}={v}", v in allowed, make(v), v)


def ep_world_size(text: str) -> Iterator[Case]:
    low, high = interval(text, {})
    yield from around("W", low, high, lambda w: lambda: P(w))


def ep_rank_id(text: str) -> Iterator[Case]:
    for w in WORLDS:
        low, high = interval(text, {"W": w})
        yield from around(f"rank@W={w}", low, high, lambda r, w=w: lambda: P(w, rank=r))


def moe_expert_num(text: str) -> Iterator[Case]:
    assert "divisible by W − S_r" in text, text
    low, high = interval(text, {})
    for w in WORLDS:
        for s_r in sorted({0, 1, w // 2}):
            d = w - s_r
            make = lambda e, w=w, s_r=s_r: lambda: P(w, e, shared_expert_rank_num=s_r)  # noqa: E731
            first, last = -(-low // d) * d, high // d * d
            tag = f"E@W={w},S_r={s_r}"
            yield Case(f"{tag}={first}", True, make(first))
            yield Case(f"{tag}={last}", True, make(last))
            for bad in sorted({low - 1, high + 1, last + d, first - d} | ({first + 1} if d > 1 else set())):
                yield Case(f"{tag}={bad}", False, make(bad), bad)


def expert_shard_type(text: str) -> Iterator[Case]:
    yield from enumerated("expert_shard_type", allowed_values(text), lambda v: lambda: P(expert_shard_type=v))


def shared_expert_num(text: str) -> Iterator[Case]:
    low, high = interval(text, {})
    yield from around("S_n", low, high, lambda v: lambda: P(shared_expert_num=v))


def shared_expert_rank_num(text: str) -> Iterator[Case]:
    assert "divisible by S_n" in text and "1 ≤ S_n ≤ S_r" in text, text
    for w in WORLDS:
        low, high = interval(text, {"W": w})
        make = lambda s, w=w: lambda: P(w, max(w - s, 1), shared_expert_rank_num=s, shared_expert_num=1)  # noqa: E731
        yield from around(f"S_r@W={w}", low, high, make)
    # divisible by S_n; when > 0, 1 <= S_n <= S_r
    for s_r, s_n, ok in [(4, 2, True), (4, 4, True), (4, 3, False), (2, 3, False), (1, 0, False), (3, 1, True)]:
        name = "shared_expert_rank_num" if s_n and s_n <= s_r else "shared_expert_num"
        call = lambda s_r=s_r, s_n=s_n: P(8, 8 - s_r, shared_expert_rank_num=s_r, shared_expert_num=s_n)  # noqa: E731
        value = s_r if name == "shared_expert_rank_num" else s_n
        yield Case(f"S_r={s_r},S_n={s_n} ({name})", ok, call, value, name)


def hidden(text: str) -> Iterator[Case]:
    low, high = interval(text, {})
    yield from around("H", low, high, lambda h: lambda: P(3).check_batch(1, 1, h))


def batch(text: str) -> Iterator[Case]:
    low, high = interval(text, {})
    for w in (2, 3):
        yield from around(f"BS@W={w}", low, high, lambda b, w=w: lambda: P(w).check_batch(b, 1, 1024))


def top_k(text: str) -> Iterator[Case]:
    assert "≤ `moe_expert_num`" in text, text
    low, high = interval(text, {})
    yield from around("K@E=32", low, high, lambda k: lambda: P(2, 32).check_batch(4, k, 1024))
    for w, s_r, e in [(2, 1, 1), (2, 0, 2), (3, 0, 9), (4, 0, 8)]:  # K = E accepted, E + 1 refused
        make = lambda k, w=w, s_r=s_r, e=e: lambda: P(w, e, shared_expert_rank_num=s_r).check_batch(4, k, 1024)  # noqa: E731
        yield Case(f"K=E={e}", True, make(e))
        yield Case(f"K=E+1={e + 1}", False, make(e + 1), e + 1)


def expert_ids(text: str) -> Iterator[Case]:
    assert "distinct within a row" in text, text
    for w, e, k in [(2, 8, 2), (3, 9, 3), (4, 4, 4)]:
        low, high = interval(text, {"moe_expert_num": e})
        dtypes, shape = tensor_rule(text, {"BS": 5, "K": k})
        p = P(w, e)

        def ids_with(value: int, dtype=dtypes[0], shape=shape, k=k, e=e) -> torch.Tensor:
            ids = torch.stack([torch.arange(k) + t for t in range(shape[0])]) % e
            ids[shape[0] // 2, 0] = value
            ids[shape[0] // 2, 1:] = (value + 1 + torch.arange(k - 1)) % e
            return ids.to(dtype)

        check = lambda ids, p=p: lambda: p.check_expert_ids(ids, 5, 5)  # noqa: E731
        yield from around(f"expert_id@E={e}", low, high, lambda v, check=check, ids_with=ids_with: check(ids_with(v)))
        dup = ids_with(0)
        dup[1, 1] = dup[1, 0]
        yield Case(f"duplicate@E={e}", False, check(dup), "row 1")
        yield Case(f"float ids@E={e}", False, check(ids_with(0, torch.float32)), "float32")
        yield Case(f"rows BS+1@E={e}", False, check(ids_with(0, shape=(6, k))), "(6, ")


def quant_mode(text: str) -> Iterator[Case]:
    yield from enumerated("quant_mode", allowed_values(text), lambda v: lambda: P(quant_mode=v))


def comm_quant_mode(text: str) -> Iterator[Case]:
    yield from enumerated("comm_quant_mode", allowed_values(text), lambda v: lambda: P(comm_quant_mode=v))


def comm_type(text: str) -> Iterator[Case]:
    yield from enumerated("comm_type", allowed_values(text), lambda v: lambda: P(comm_type=v))


def comm_alg(text: str) -> Iterator[Case]:
    assert text == '`""`', text
    yield Case('comm_alg=""', True, lambda: P(comm_alg=""))
    for bad in (" ", "a", "fullmesh"):
        yield Case(f"comm_alg={bad!r}", False, lambda bad=bad: P(comm_alg=bad), repr(bad))


def group_ep(text: str) -> Iterator[Case]:
    assert text.startswith("length"), text
    low, high = interval(text, {})
    yield from around("len(group_ep)", low, high, lambda n: lambda: MoeCommParams("g" * max(n, 0), 2, 0, 2))


def global_bs(text: str) -> Iterator[Case]:
    assert text.startswith("0, or "), text
    for w, bs in [(2, 1), (2, 4), (3, 5), (7, 512), (8, 3), (384, 2)]:
        low, high = interval(text, {"BS": bs, "W": w})
        make = lambda g, w=w, bs=bs: lambda: P(w, global_bs=g).check_batch(bs, 1, 1024)  # noqa: E731
        yield Case(f"global_bs@W={w},BS={bs}=0", True, make(0))
        yield from around(f"global_bs@W={w},BS={bs}", low, high, make)
        yield Case(f"global_bs@W={w},BS={bs}=-1", False, make(-1), -1)


def hccl_buffsize(text: str) -> Iterator[Case]:
    formula = re.search(r"≥ `([^`]*)` bytes", text)
    assert formula, text
    # (W, E, BS, K, H, S_n, global_bs): odd and even W, several BS and H, one with global_bs
    for w, e, bs, k, h, s_n, g in [
        (2, 16, 256, 8, 4096, 1, 0),
        (3, 6, 100, 4, 7168, 0, 0),
        (5, 10, 512, 2, 1024, 2, 0),
        (4, 8, 10, 3, 2048, 1, 4 * 64),
        (8, 64, 33, 16, 8192, 4, 0),
    ]:
        max_bs = (g or bs * w) // w
        need = _value(formula[1], {"L": e // w, "max_BS": max_bs, "W": w, "H": h, "K": k, "S_n": s_n})
        mb = math.ceil(need / 2**20)
        p = P(w, e, shared_expert_num=s_n, global_bs=g)
        tag = f"HCCL_BUFFSIZE@W={w},BS={bs},H={h}"
        yield Case(f"{tag}={mb}", True, _with_buffsize(mb, lambda p=p, bs=bs, k=k, h=h: p.check_batch(bs, k, h)))
        yield Case(
            f"{tag}={mb - 1}",
            False,
            _with_buffsize(mb - 1, lambda p=p, bs=bs, k=k, h=h: p.check_batch(bs, k, h)),
            mb - 1,
        )


def _with_buffsize(megabytes: int, call: Callable[[], object]) -> Callable[[], object]:
    def run() -> object:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("HCCL_BUFFSIZE", str(megabytes))
            return call()

    return run


# ---- tensor rows: through the public ops, stopping at the group (or the handle) ----------------


@dataclass
class OpCase:
    """Valid inputs of the four ops for one configuration; tensors replaced one at a time."""

    world: int
    experts: int
    batch: int
    top_k: int
    hidden: int

    @property
    def env(self) -> dict[str, int]:
        local = self.experts // self.world
        a = self.batch * self.world * min(local, self.top_k)
        return {
            "BS": self.batch,
            "H": self.hidden,
            "K": self.top_k,
            "A": a,
            "E": self.experts,
            "S_n": 1,
            "W": self.world,
        }

    def ids(self) -> torch.Tensor:
        return (torch.arange(self.top_k)[None] + torch.arange(self.batch)[:, None]).remainder(self.experts).int()

    def x(self, **kw) -> torch.Tensor:
        return torch.zeros(self.batch, self.hidden, dtype=torch.bfloat16) if not kw else torch.zeros(**kw)

    def args(self) -> tuple:
        return ("g", self.world, 0, self.experts)

    def dispatch_setup(self, x=None, **kw) -> Callable[[], object]:
        x = self.x() if x is None else x
        return lambda: ops.dispatch_setup(x, self.ids(), *self.args(), **kw)

    def dispatch_teardown(self, **kw) -> Callable[[], object]:
        y = torch.zeros(self.batch * (self.top_k + 1), -(-self.hidden // 256) * 256, dtype=torch.bfloat16)
        cmd = torch.zeros(16, dtype=torch.int32)
        return lambda: ops.dispatch_teardown(self.x(), y, self.ids(), cmd, *self.args(), **kw)

    def combine_setup(self, expand_x=None, assist=None) -> Callable[[], object]:
        a, h = self.env["A"], self.hidden
        expand_x = torch.zeros(a, h, dtype=torch.bfloat16) if expand_x is None else expand_x
        assist = torch.zeros(a * 128, dtype=torch.int32) if assist is None else assist
        return lambda: ops.combine_setup(expand_x, self.ids(), assist, *self.args())

    def combine_teardown(self, expand_idx=None, expert_scales=None) -> Callable[[], object]:
        a, h = self.env["A"], self.hidden
        expand_x = torch.zeros(a, h, dtype=torch.bfloat16)
        qx = torch.zeros(a, -(-(-(-h // 32) * 32 + -(-h // 8) * 8 // 8 * 4) // 512) * 512, dtype=torch.int8)
        idx = torch.zeros(self.batch * self.top_k, dtype=torch.int32) if expand_idx is None else expand_idx
        sc = torch.ones(self.batch, self.top_k) if expert_scales is None else expert_scales
        cmd = torch.zeros(16, dtype=torch.int32)
        return lambda: ops.combine_teardown(expand_x, qx, self.ids(), idx, sc, cmd, *self.args())


OP_CASES = (OpCase(2, 8, 4, 2, 1024), OpCase(3, 9, 5, 3, 2048), OpCase(4, 4, 1, 1, 7168))


def tensor_cases(
    name: str, text: str, make: Callable[[OpCase, torch.Tensor], Callable[[], object]], checked_dims: tuple[int, ...]
) -> Iterator[Case]:
    """Each documented dtype at the documented shape accepted; float64, and each checked dimension
    one short and one over, refused. (Dimensions that define the op's sizes, like x's, cannot be
    wrong on their own.)"""
    for oc in OP_CASES:
        dtypes, shape = tensor_rule(text, oc.env)
        tag = f"{name}@W={oc.world}"
        for dtype in dtypes:
            yield Case(f"{tag} {dtype} {shape}", True, make(oc, torch.zeros(shape, dtype=dtype)))
        yield Case(f"{tag} float64", False, make(oc, torch.zeros(shape, dtype=torch.float64)), "float64")
        for d in checked_dims:
            for delta in (-1, 1):
                bad = list(shape)
                bad[d] += delta
                yield Case(f"{tag} shape {tuple(bad)}", False, make(oc, torch.zeros(bad, dtype=dtypes[0])), tuple(bad))
        wrong_rank = shape + (1,)
        yield Case(f"{tag} {len(wrong_rank)}-D", False, make(oc, torch.zeros(wrong_rank, dtype=dtypes[0])), "-D")


def x(text: str) -> Iterator[Case]:
    yield from tensor_cases("x", text, lambda oc, t: oc.dispatch_setup(t), ())


def scales(text: str) -> Iterator[Case]:
    assert text.startswith("only with quant_mode 2"), text
    yield from tensor_cases("scales", text, lambda oc, t: oc.dispatch_setup(scales=t, quant_mode=2), (0, 1))
    oc = OP_CASES[0]
    _, shape = tensor_rule(text, oc.env)
    for mode in (0,):
        yield Case(
            f"scales with quant_mode={mode}", False, oc.dispatch_setup(scales=torch.ones(shape), quant_mode=mode), mode
        )


def expert_scales(text: str) -> Iterator[Case]:
    yield from tensor_cases("expert_scales", text, lambda oc, t: oc.combine_teardown(expert_scales=t), (0, 1))


def expand_x(text: str) -> Iterator[Case]:
    yield from tensor_cases("expand_x", text, lambda oc, t: oc.combine_setup(expand_x=t), (0,))


def assist_info(text: str) -> Iterator[Case]:
    yield from tensor_cases("assist_info_for_combine", text, lambda oc, t: oc.combine_setup(assist=t), (0,))


def expand_idx(text: str) -> Iterator[Case]:
    yield from tensor_cases("expand_idx", text, lambda oc, t: oc.combine_teardown(expand_idx=t), (0,))


def expert_token_nums_type(text: str) -> Iterator[Case]:
    oc = OP_CASES[1]
    yield from enumerated(
        "expert_token_nums_type", allowed_values(text), lambda v: oc.dispatch_teardown(expert_token_nums_type=v)
    )


HANDLERS: dict[str, Callable[[str], Iterator[Case]]] = {
    "ep_world_size": ep_world_size,
    "ep_rank_id": ep_rank_id,
    "moe_expert_num": moe_expert_num,
    "expert_shard_type": expert_shard_type,
    "shared_expert_num": shared_expert_num,
    "shared_expert_rank_num": shared_expert_rank_num,
    "H": hidden,
    "BS": batch,
    "K": top_k,
    "expert_ids": expert_ids,
    "quant_mode": quant_mode,
    "scales": scales,
    "comm_quant_mode": comm_quant_mode,
    "comm_type": comm_type,
    "comm_alg": comm_alg,
    "group_ep": group_ep,
    "expert_token_nums_type": expert_token_nums_type,
    "global_bs": global_bs,
    "x": x,
    "expert_scales": expert_scales,
    "expand_x": expand_x,
    "assist_info_for_combine": assist_info,
    "expand_idx": expand_idx,
    "HCCL_BUFFSIZE": hccl_buffsize,
}

# Where an accepted input stops on one process without a group: the group lookup (setups) or the
# handle lookup (teardowns); both come after every check and before anything is sent.
PAST_THE_CHECKS = re.compile(
    r"torch.distributed is not initialised|group_ep must name a torch.distributed process group|comm_cmd_info"
)


# How each row's parameter starts its error message.
MESSAGE_NAME = {"H": "H (hidden size)", "BS": "BS (x.size(0))", "K": "K (expert_ids.size(1))"}


def outcome(case: Case, name: str) -> str | None:
    """None if the case behaved as documented (a refusal's message starts with the parameter's
    name and shows the value), else what went wrong."""
    try:
        case.call()
    except HandleError as exc:
        return None if case.accepted and PAST_THE_CHECKS.search(str(exc)) else f"HandleError: {exc}"
    except (ValueError, TypeError, RuntimeError) as exc:
        if PAST_THE_CHECKS.search(str(exc)):
            return None if case.accepted else "accepted (reached the group lookup)"
        if case.accepted or isinstance(exc, RuntimeError) and not isinstance(exc, (ValueError, TypeError)):
            return f"{type(exc).__name__}: {exc}"
        param = case.param or MESSAGE_NAME.get(name, name)
        if not str(exc).startswith(param):
            return f"message does not start with {param!r}: {exc}"
        return None if str(case.value) in str(exc) else f"message does not show {case.value!r}: {exc}"
    return None if case.accepted else "accepted"


def test_every_documented_parameter_has_boundary_cases():
    documented = documented_ranges()
    assert len(documented) >= 20, documented  # the table was found and parsed
    assert not set(documented) - set(HANDLERS), (
        f"documented ranges without boundary cases: {set(documented) - set(HANDLERS)}"
    )
    assert not set(HANDLERS) - set(documented), (
        f"cases for ranges no longer documented: {set(HANDLERS) - set(documented)}"
    )


@pytest.mark.parametrize("name", sorted(HANDLERS))
def test_documented_range_at_both_ends_and_one_past(name):
    text = documented_ranges()[name]
    cases = list(HANDLERS[name](text))
    assert any(c.accepted for c in cases) and any(not c.accepted for c in cases), name
    failures = [(c.label, why) for c in cases if (why := outcome(c, name)) is not None]
    assert not failures, f"{name} ({text}): {failures}"


@pytest.mark.parametrize("world", [3, 5, 7, 9, 383])
def test_odd_world_shared_rank_bound_is_w_over_2_rounded_down(world):
    """The audit's escaped bug: `(W + 1) // 2` accepted S_r = 2 at W = 3."""
    P(world, world - world // 2, shared_expert_rank_num=world // 2)
    with pytest.raises(ValueError, match=rf"shared_expert_rank_num must be in \[0, ep_world_size / 2 = {world // 2}\]"):
        P(world, world - world // 2 - 1, shared_expert_rank_num=world // 2 + 1)
