"""`overlap.kernels.backend`: which implementation a call runs, and how the choice is changed."""

from __future__ import annotations

import pytest
import torch

from overlap.kernels import backend


def test_cpu_tensors_run_the_torch_reference_in_auto_and_torch_modes():
    t = torch.zeros(2)
    for mode in ("auto", "torch"):
        with backend.use(mode):
            assert backend.mode() == mode
            assert backend.device_kernels(t) is None


def test_use_restores_the_previous_mode_even_after_an_error():
    before = backend.mode()
    with pytest.raises(RuntimeError, match="inside"):
        with backend.use("torch"):
            raise RuntimeError("inside")
    assert backend.mode() == before


def test_an_unknown_mode_is_refused_with_the_allowed_values():
    with pytest.raises(ValueError, match=r"mode must be one of \('auto', 'torch', 'triton'\), got 'fast'"):
        with backend.use("fast"):
            pass
