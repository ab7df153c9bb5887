"""The backend seam (compact_dist.core.backend): which backend answers, and what the plain
torch backend answers. DeepSpeed's answers are covered by the ZeRO tests
(tests/test_zero_matrix.py, test_zero.py, test_deepspeed.py)."""

import pytest
import torch

from compact_dist import optimizer_param_groups
from compact_dist.core.backend_registry import backend_for, registered_backends
from compact_dist.core.config import LayerCompression
from compact_dist.core.torch_backend import TORCH_BACKEND
from compact_dist.deepspeed.backend import DEEPSPEED_BACKEND
from compact_dist.fsdp.backend import FSDP2_BACKEND
from layer_utils import build

pytestmark = pytest.mark.usefixtures("megatron_tp1")


def test_backend_for_picks_the_engine_that_holds_the_factor():
    layer = build("column", 32, 16, LayerCompression(ratio=0.25))
    factor = layer.subspace_factor
    opt = torch.optim.AdamW(optimizer_param_groups(torch.nn.ModuleList([layer]), 0.0))
    assert DEEPSPEED_BACKEND in registered_backends()  # the package root registers it
    assert FSDP2_BACKEND in registered_backends()  # FSDP2 claims DTensor factors only
    assert backend_for(opt, [factor]) is TORCH_BACKEND
    assert backend_for(None, [factor]) is TORCH_BACKEND
    factor._hp_mapping = None  # linked by ZeRO 1-2 (its fragment on another rank)
    try:
        assert backend_for(opt, [factor]) is DEEPSPEED_BACKEND
        assert DEEPSPEED_BACKEND.master_slices(opt, [factor]) == [None]
    finally:
        del factor._hp_mapping


def test_torch_backend_answers():
    layer = build("row", 32, 16, LayerCompression(ratio=0.25))
    flat, start, numel = TORCH_BACKEND.owned_base(layer)
    assert flat.data_ptr() == layer.weight.data_ptr() and (start, numel) == (0, 32 * 16)
    factor = layer.subspace_factor
    opt = torch.optim.AdamW(optimizer_param_groups(torch.nn.ModuleList([layer]), 0.0))
    assert TORCH_BACKEND.master_slices(opt, [factor]) == [None]
    assert TORCH_BACKEND.read_moment(opt, factor, "exp_avg") is None  # no step yet
    factor.grad = torch.ones_like(factor)
    opt.step()
    assert not layer.factor_is_zero  # an optimizer step may have written A
    TORCH_BACKEND.write_moment(opt, factor, "exp_avg", torch.full_like(factor, 2.0))
    assert torch.equal(opt.state[factor]["exp_avg"], torch.full_like(factor, 2.0))
    TORCH_BACKEND.zero_factor(layer)
    assert layer.factor_is_zero and not factor.any()
