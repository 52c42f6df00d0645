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


def test_each_op_delegates_with_its_arguments_unchanged(fake_torch_npu):
    x = torch.zeros(2, 1024, dtype=torch.bfloat16)
    ids = torch.zeros(2, 1, dtype=torch.int32)
    with ops.use_backend("npu"):
        assert ops.dispatch_setup(x, ids, "hccl_ep", 16, 3, 16, quant_mode=2, global_bs=32) == "npu:dispatch_setup"
        assert ops.dispatch_teardown(x, x, ids, ids, "hccl_ep", 16, 3, 16, expert_token_nums_type=0) == "npu:dispatch_teardown"
        assert ops.combine_setup(x, ids, ids, "hccl_ep", 16, 3, 16) == "npu:combine_setup"
        assert ops.combine_teardown(x, x, ids, ids, x, ids, "hccl_ep", 16, 3, 16, shared_expert_x=x) == "npu:combine_teardown"
    names = [c[0] for c in fake_torch_npu]
    assert names == ["dispatch_setup", "dispatch_teardown", "combine_setup", "combine_teardown"]
    name, args, kwargs = fake_torch_npu[0]
    assert args[0] is x and args[1] is ids and args[2:] == ("hccl_ep", 16, 3, 16)
    assert kwargs == {"quant_mode": 2, "global_bs": 32}
    assert fake_torch_npu[3][2] == {"shared_expert_x": x}


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
