"""The Triton kernels (`overlap.kernels.triton_kernels`) against their torch references, in triton's interpreter.

`triton.jit` reads `TRITON_INTERPRET` when it decorates a kernel, so this module sets it and then
(re)imports the kernels module: the kernels run on CPU tensors, program by program, in numpy. The
shapes are irregular on purpose: H not a multiple of the column block, K = 1 and 16, zero rows,
shared rows, `extra`, experts and whole ranks that receive nothing, a strided staging buffer.

The interpreter truncates fp32 -> bf16/fp16 casts, so the combine is checked on its fp32
accumulator (against a naive k-loop written here) and, through the public function, after the
launcher's torch cast; on a GPU the kernel casts itself and bench/bench_kernels.py --device cuda
checks those bits against the reference.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import torch

# Before triton is imported: `triton.jit` reads TRITON_INTERPRET when it decorates a function, and
# triton.language's own helpers (tl.zeros, ...) are decorated when triton is first imported.
_FRESH = "triton" not in sys.modules
if _FRESH:
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[gpu]'): Triton kernels untested")

from overlap.kernels import triton_kernels as tk  # noqa: E402

if _FRESH and not tk.interpreting():
    tk = importlib.reload(tk)  # imported compiled before the variable was set: decorate again
INTERPRETING = tk.interpreting()

from overlap import kernels  # noqa: E402
from overlap.kernels import backend  # noqa: E402
from overlap.kernels.quant import quantized_row_bytes  # noqa: E402


def test_the_kernels_run_in_the_interpreter():
    assert INTERPRETING


# ---------------------------------------------------------------------------------------------
# combine
# ---------------------------------------------------------------------------------------------


def _combine_case(n, top_k, hidden, shared, has_extra, dtype, seed, pad=0):
    g = torch.Generator().manual_seed(seed)
    num_rows = n * (top_k + shared) + 3
    wide = torch.randn(num_rows, hidden + pad, generator=g).to(dtype)  # a column slice, as combine_teardown reads
    rows = wide[:, :hidden]
    perm = torch.randperm(num_rows, generator=g)
    positions = perm[: n * top_k].view(n, top_k)
    shared_positions = perm[n * top_k : n * (top_k + shared)].view(shared, n) if shared else None
    weights = torch.rand(n, top_k, generator=g) * 2 - 0.5
    extra = torch.randn(n, hidden, generator=g).to(dtype) if has_extra else None
    return rows, positions, weights, shared_positions, extra


def _naive_accumulator(rows, positions, weights, shared_positions, extra):
    n, hidden = positions.shape[0], rows.shape[1]
    acc = torch.zeros(n, hidden)
    for k in range(positions.shape[1]):
        acc = acc + weights[:, k : k + 1] * rows[positions[:, k]].float()
    if shared_positions is not None:
        for s in range(shared_positions.shape[0]):
            acc = acc + rows[shared_positions[s]].float()
    if extra is not None:
        acc = acc + extra.float()
    return acc


COMBINE_CASES = [
    # n, K, H, shared, extra, dtype, pad
    (5, 1, 1000, 0, False, torch.bfloat16, 0),
    (3, 16, 300, 0, True, torch.float16, 0),
    (6, 3, 1030, 2, True, torch.bfloat16, 26),  # two column blocks, the second partial; strided rows
    (9, 2, 7, 1, False, torch.bfloat16, 0),  # more tokens than one row tile holds at tiny H
    (0, 4, 64, 0, False, torch.bfloat16, 0),  # no active token
]


@pytest.mark.parametrize("n,top_k,hidden,shared,has_extra,dtype,pad", COMBINE_CASES)
def test_combine_accumulator_equals_a_k_loop_bit_for_bit(n, top_k, hidden, shared, has_extra, dtype, pad):
    rows, positions, weights, shared_positions, extra = _combine_case(
        n, top_k, hidden, shared, has_extra, dtype, seed=n + top_k, pad=pad
    )
    acc = torch.full((n, hidden), float("nan"))
    tk.combine_accumulate(rows, positions, weights, shared_positions=shared_positions, extra=extra, out=acc)
    assert torch.equal(acc, _naive_accumulator(rows, positions, weights, shared_positions, extra))


@pytest.mark.parametrize("n,top_k,hidden,shared,has_extra,dtype,pad", COMBINE_CASES)
def test_weighted_combine_through_the_public_function_equals_the_reference(
    n, top_k, hidden, shared, has_extra, dtype, pad
):
    rows, positions, weights, shared_positions, extra = _combine_case(
        n, top_k, hidden, shared, has_extra, dtype, seed=7 * n + top_k, pad=pad
    )
    outs = {}
    for mode in ("torch", "triton"):
        out = torch.full((n + 2, hidden), 3.0, dtype=dtype)  # rows past n: untouched
        with backend.use(mode):
            kernels.weighted_combine(
                rows, positions, weights, shared_positions=shared_positions, extra=extra, out=out[:n]
            )
        outs[mode] = out
    assert torch.equal(outs["triton"], outs["torch"])
    assert bool((outs["triton"][n:] == 3.0).all())


def test_combine_in_kernel_cast_runs_and_lands_on_a_neighbour_of_the_accumulator():
    """The GPU's path (the kernel casts): the interpreter truncates, so only a neighbour is checked here."""
    rows, positions, weights, shared_positions, extra = _combine_case(6, 3, 1030, 1, True, torch.bfloat16, seed=5)
    acc = torch.empty(6, 1030)
    tk.combine_accumulate(rows, positions, weights, shared_positions=shared_positions, extra=extra, out=acc)
    out = torch.empty(6, 1030, dtype=torch.bfloat16)
    tk.combine_accumulate(rows, positions, weights, shared_positions=shared_positions, extra=extra, out=out)
    nearest = acc.to(torch.bfloat16)
    toward_zero = (acc.view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)  # drop the low 16 bits
    assert bool(((out == nearest) | (out == toward_zero)).all())


# ---------------------------------------------------------------------------------------------
# gather / scatter
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.int8])
@pytest.mark.parametrize("num_src,num_index,hidden", [(11, 11, 1030), (9, 4, 5), (6, 0, 64)])
def test_gather_and_scatter_move_rows_exactly(dtype, num_src, num_index, hidden):
    g = torch.Generator().manual_seed(num_src * hidden)
    src = torch.randint(-100, 100, (num_src, hidden), generator=g).to(dtype)
    index = torch.randperm(num_src, generator=g)[:num_index]
    with backend.use("triton"):
        wide = torch.zeros(num_index, hidden + 7, dtype=dtype)  # a column slice of a staging buffer
        kernels.gather_rows(src, index, out=wide[:, :hidden])
        fresh = kernels.gather_rows(src, index)
        back = torch.full_like(src, 5)
        kernels.scatter_rows(wide[:, :hidden], index, back)
    assert torch.equal(wide[:, :hidden], src[index]) and not wide[:, hidden:].any()
    assert torch.equal(fresh, src[index])
    expected = torch.full_like(src, 5)
    expected[index] = src[index]
    assert torch.equal(back, expected)


# ---------------------------------------------------------------------------------------------
# quantisation
# ---------------------------------------------------------------------------------------------


def _quant_rows(n, hidden, seed):
    g = torch.Generator().manual_seed(seed)
    rows = (torch.randn(n, hidden, generator=g) * 3).to(torch.bfloat16)
    if n > 0:
        rows[0] = 0  # a zero row: scale 0, q 0
    if n > 2:  # exact ties after scaling (amax 127 -> d = 1): round half to even gives 2, 4, -0, -126
        rows[1] = 0
        rows[1, :5] = torch.tensor([127.0, 2.5, 3.5, -0.5, -126.5])
    return rows


@pytest.mark.parametrize("n,hidden,smooth", [(5, 1000, False), (4, 7, True), (3, 2048, True), (0, 64, False)])
def test_quantize_rows_equals_the_reference(n, hidden, smooth):
    rows = _quant_rows(n, hidden, seed=hidden)
    factors = torch.rand(n, hidden, generator=torch.Generator().manual_seed(1)) + 0.5 if smooth else None
    with backend.use("torch"):
        q_ref, scale_ref = kernels.quantize_rows(rows, factors)
    with backend.use("triton"):
        q, scale = kernels.quantize_rows(rows, factors)
    assert torch.equal(q, q_ref) and torch.equal(scale, scale_ref)
    if n > 2 and not smooth:
        assert q[1, :5].tolist() == [127, 2, 4, 0, -126]


def test_quantize_in_chunks_when_a_row_exceeds_the_register_block(monkeypatch):
    monkeypatch.setattr(tk, "MAX_QUANT_BLOCK", 256)  # 1000 columns: four chunks, two passes over the row
    rows = _quant_rows(4, 1000, seed=3)
    factors = torch.rand(4, 1000, generator=torch.Generator().manual_seed(2)) + 0.5
    q_ref, scale_ref = _reference_quantize(rows, factors)
    q, scale = tk.quantize_rows(rows, factors)
    assert torch.equal(q, q_ref) and torch.equal(scale, scale_ref)


def _reference_quantize(rows, factors):
    with backend.use("torch"):
        return kernels.quantize_rows(rows, factors)


@pytest.mark.parametrize("hidden,has_scales", [(1000, True), (4096, False), (33, True)])
def test_quantize_packed_equals_gather_quantize_pack(hidden, has_scales):
    g = torch.Generator().manual_seed(hidden)
    x = (torch.randn(6, hidden, generator=g) * 2).to(torch.float16)
    x[2] = 0
    index = torch.tensor([3, 0, 2, 2, 5, 1, 4])
    scales = torch.rand(5, hidden, generator=g) + 0.5 if has_scales else None
    scale_rows = torch.tensor([4, 0, 1, 3, 3, 2, 0]) if has_scales else None
    width = quantized_row_bytes(hidden)
    garbage = torch.randint(-128, 128, (7, width), generator=g, dtype=torch.int8)
    outs = {}
    for mode in ("torch", "triton"):
        out = garbage.clone()
        with backend.use(mode):
            kernels.quantize_packed(x, index, out, scales=scales, scale_rows=scale_rows)
        outs[mode] = out
    assert torch.equal(outs["triton"], outs["torch"])
    q, scale = kernels.unpack_quantized(outs["triton"], hidden)
    assert scale[2] == 0 and scale[3] == 0  # token 2 is the zero row


# ---------------------------------------------------------------------------------------------
# dispatch layout
# ---------------------------------------------------------------------------------------------


def _ids(batch, top_k, experts, seed, allowed=None):
    g = torch.Generator().manual_seed(seed)
    pool = torch.arange(experts) if allowed is None else torch.tensor(allowed)
    keys = torch.rand(batch, pool.numel(), generator=g)
    return pool[keys.argsort(dim=1)[:, :top_k]].to(torch.int32)


LAYOUT_CASES = [
    # batch, K, world, rank, experts, shared_num, shared_ranks, num_active, allowed experts
    (7, 1, 2, 1, 4, 0, 0, 7, None),
    (5, 16, 5, 2, 16, 1, 1, 3, None),  # K = 16, one shared rank, inactive tail
    (13, 3, 8, 5, 24, 2, 4, 13, [0, 1, 2, 17, 23]),  # experts and whole ranks that receive nothing
    (4, 2, 2, 0, 4, 0, 0, 0, None),  # no active token
    (40, 8, 4, 3, 512, 1, 0, 37, None),  # 512 experts: small entry blocks, several programs
    (300, 8, 4, 1, 64, 0, 0, 290, None),  # 19 blocks: slots and send positions continue across blocks
    (200, 8, 8, 2, 512, 0, 0, 190, None),  # 50 blocks: more than one histogram chunk per program
]


@pytest.mark.parametrize("batch,top_k,world,rank,experts,shared_num,shared_ranks,num_active,allowed", LAYOUT_CASES)
def test_dispatch_layout_equals_the_reference(
    batch, top_k, world, rank, experts, shared_num, shared_ranks, num_active, allowed
):
    ids = _ids(batch, top_k, experts, seed=batch * top_k, allowed=allowed)
    args = dict(
        num_active=num_active,
        ep_world_size=world,
        ep_rank_id=rank,
        moe_expert_num=experts,
        shared_expert_num=shared_num,
        shared_expert_rank_num=shared_ranks,
    )
    with backend.use("torch"):
        ref = kernels.dispatch_layout(ids, **args)
    with backend.use("triton"):
        got = kernels.dispatch_layout(ids, **args)
    assert got.num_rows == ref.num_rows and got.num_shared_rows == ref.num_shared_rows
    for field in ("send_token", "send_scale_row", "send_counts", "expand_idx", "expert_counts"):
        a, b = getattr(got, field), getattr(ref, field)
        assert a.dtype == b.dtype and torch.equal(a, b), field


if not INTERPRETING:
    # triton was imported, compiled, earlier in this process: run this module in a fresh one instead.
    for _name in [n for n in globals() if n.startswith("test_")]:
        del globals()[_name]

    def test_triton_kernels_in_a_fresh_interpreter_process():
        env = dict(os.environ, TRITON_INTERPRET="1")
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
