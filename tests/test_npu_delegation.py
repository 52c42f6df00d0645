"""On an Ascend device the ops call torch_npu's own op with the caller's arguments unchanged.
No NPU here: a stand-in `torch_npu` module records the calls, and the backend is forced."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from overlap import ops


@pytest.fixture
def fake_torch_npu(monkeypatch):
    calls = []
    module = types.ModuleType("torch_npu")
    for name in ("dispatch_setup", "dispatch_teardown", "combine_setup", "combine_teardown"):

        def op(*args, _name=name, **kwargs):
            calls.append((_name, args, kwargs))
            return f"npu:{_name}"

        setattr(module, "npu_moe_distribute_" + name, op)
    monkeypatch.setitem(sys.modules, "torch_npu", module)
    return calls


# torch_npu's keyword defaults, from the op registrations (the contract's signatures). The public ops
# spell every keyword out, so torch_npu receives these unless the caller passed another value.
NPU_DEFAULTS = {
    "dispatch_setup": dict(
        scales=None,
        x_active_mask=None,
        expert_shard_type=0,
        shared_expert_num=1,
        shared_expert_rank_num=0,
        quant_mode=0,
        global_bs=0,
        comm_type=0,
        comm_alg="",
        y_dtype=None,
    ),
    "dispatch_teardown": dict(
        expert_shard_type=0,
        shared_expert_num=1,
        shared_expert_rank_num=0,
        quant_mode=0,
        global_bs=0,
        expert_token_nums_type=1,
        comm_type=0,
        comm_alg="",
    ),
    "combine_setup": dict(
        expert_shard_type=0,
        shared_expert_num=1,
        shared_expert_rank_num=0,
        global_bs=0,
        comm_quant_mode=0,
        comm_type=0,
        comm_alg="",
    ),
    "combine_teardown": dict(
        x_active_mask=None,
        shared_expert_x=None,
        expert_shard_type=0,
        shared_expert_num=1,
        shared_expert_rank_num=0,
        global_bs=0,
        comm_quant_mode=0,
        comm_type=0,
        comm_alg="",
    ),
}


def test_each_op_delegates_with_its_arguments_unchanged(fake_torch_npu):
    x = torch.zeros(2, 1024, dtype=torch.bfloat16)
    ids = torch.zeros(2, 1, dtype=torch.int32)
    with ops.use_backend("npu"):
        assert ops.dispatch_setup(x, ids, "hccl_ep", 16, 3, 16, quant_mode=2, global_bs=32) == "npu:dispatch_setup"
        assert (
            ops.dispatch_teardown(x, x, ids, ids, "hccl_ep", 16, 3, 16, expert_token_nums_type=0)
            == "npu:dispatch_teardown"
        )
        assert ops.combine_setup(x, ids, ids, "hccl_ep", 16, 3, 16) == "npu:combine_setup"
        assert (
            ops.combine_teardown(x, x, ids, ids, x, ids, "hccl_ep", 16, 3, 16, shared_expert_x=x)
            == "npu:combine_teardown"
        )
    names = [c[0] for c in fake_torch_npu]
    assert names == ["dispatch_setup", "dispatch_teardown", "combine_setup", "combine_teardown"]
    name, args, kwargs = fake_torch_npu[0]
    assert args[0] is x and args[1] is ids and args[2:] == ("hccl_ep", 16, 3, 16)
    assert kwargs == {**NPU_DEFAULTS["dispatch_setup"], "quant_mode": 2, "global_bs": 32}
    assert fake_torch_npu[1][2] == {**NPU_DEFAULTS["dispatch_teardown"], "expert_token_nums_type": 0}
    assert fake_torch_npu[2][2] == NPU_DEFAULTS["combine_setup"]
    assert fake_torch_npu[3][2] == {**NPU_DEFAULTS["combine_teardown"], "shared_expert_x": x}
    assert [len(c[1]) for c in fake_torch_npu] == [6, 8, 7, 10]  # the positional arguments, as given


def test_backend_follows_the_environment(fake_torch_npu, monkeypatch):
    monkeypatch.setenv("OVERLAP_BACKEND", "npu")
    x = torch.zeros(2, 1024, dtype=torch.bfloat16)
    assert ops.combine_setup(x, x, x, "g", 2, 0, 2) == "npu:combine_setup"
    monkeypatch.setenv("OVERLAP_BACKEND", "cuda")
    with pytest.raises(ValueError, match=r"OVERLAP_BACKEND must be one of \('npu', 'portable'\), got 'cuda'"):
        ops.combine_setup(x, x, x, "g", 2, 0, 2)


def test_missing_torch_npu_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # import raises ImportError
    x = torch.zeros(2, 1024, dtype=torch.bfloat16)
    with ops.use_backend("npu"), pytest.raises(ImportError, match=r"pip install moe-overlap\[npu\]"):
        ops.dispatch_setup(x, x, "g", 2, 0, 2)


def test_portable_is_the_default_off_npu(fake_torch_npu):
    x = torch.zeros(2, 1024, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="ep_world_size must be in"):
        ops.dispatch_setup(x, torch.zeros(2, 1, dtype=torch.int32), "g", 1, 0, 2)
    assert fake_torch_npu == []


class _OnNpu:
    """Stands in for a tensor on an Ascend device: all the dispatch looks at is `.device.type`."""

    device = types.SimpleNamespace(type="npu")


def test_backend_follows_the_first_tensors_device(fake_torch_npu, monkeypatch):
    monkeypatch.delenv("OVERLAP_BACKEND", raising=False)
    x, ids = _OnNpu(), torch.zeros(2, 1, dtype=torch.int32)
    assert ops.dispatch_setup(x, ids, "hccl_ep", 16, 3, 16) == "npu:dispatch_setup"
    assert (
        ops.combine_setup(
            expand_x=x,
            expert_ids=ids,
            assist_info_for_combine=ids,
            group_ep="g",
            ep_world_size=2,
            ep_rank_id=0,
            moe_expert_num=2,
        )
        == "npu:combine_setup"
    )
    assert [c[0] for c in fake_torch_npu] == ["dispatch_setup", "combine_setup"]
    assert fake_torch_npu[0][1][0] is x and fake_torch_npu[1][1][0] is x  # expand_x, passed by keyword
    # A CPU tensor first: the portable path (its own validation refuses W = 1), torch_npu untouched.
    with pytest.raises(ValueError, match=r"ep_world_size must be in \[2, 384\], got 1"):
        ops.dispatch_setup(torch.zeros(2, 1024, dtype=torch.bfloat16), ids, "g", 1, 0, 2)
    assert len(fake_torch_npu) == 2


def test_use_backend_overrides_the_environment(fake_torch_npu, monkeypatch):
    cpu_x = torch.zeros(2, 1024, dtype=torch.bfloat16)
    ids = torch.zeros(2, 1, dtype=torch.int32)
    monkeypatch.setenv("OVERLAP_BACKEND", "portable")
    with ops.use_backend("npu"):  # the block wins over OVERLAP_BACKEND=portable and over the CPU tensor
        assert ops.dispatch_setup(cpu_x, ids, "g", 1, 0, 2) == "npu:dispatch_setup"
    monkeypatch.setenv("OVERLAP_BACKEND", "npu")
    with ops.use_backend("portable"), pytest.raises(ValueError, match=r"ep_world_size must be in \[2, 384\], got 1"):
        ops.dispatch_setup(cpu_x, ids, "g", 1, 0, 2)
    with ops.use_backend("portable"), pytest.raises(TypeError, match=r"x must be a torch.Tensor, got _OnNpu"):
        ops.dispatch_setup(_OnNpu(), ids, "g", 2, 0, 2)  # forced portable even for a tensor on the npu
    assert [c[0] for c in fake_torch_npu] == ["dispatch_setup"]
    with ops.use_backend(None):  # None: back to the environment (npu here)
        assert ops.combine_setup(cpu_x, ids, ids, "g", 2, 0, 2) == "npu:combine_setup"
    with pytest.raises(ValueError, match=r"backend must be one of \('npu', 'portable'\) or None, got 'cuda'"):
        ops.use_backend("cuda")
