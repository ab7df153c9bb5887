"""A merge or a moments operation that cannot find A's master or optimizer state raises; it
never skips A (the backends of compact_dist.core.backend, core.moments). DeepSpeed's layouts are covered by
tests/test_zero_matrix.py."""

import pytest
import torch

from compact_dist import CompressionConfig, optimizer_param_groups
from compact_dist.core.config import LayerCompression
from compact_dist.core.moments import reset_moments, transport_moments
from compact_dist.core.subspace import merge_subspace_factors
from layer_utils import build

pytestmark = pytest.mark.usefixtures("megatron_tp1")


def _model(dtype=torch.float32) -> torch.nn.ModuleList:
    layer = build("column", 32, 16, LayerCompression(ratio=0.25)).to(dtype)
    return torch.nn.ModuleList([layer])


def _maps(model):
    p = model[0].projection
    return [torch.eye(p.block_rank).expand(p.local_blocks, -1, -1)]


def _kept(model):  # every new direction spanned by the old P (R = I)
    p = model[0].projection
    return [torch.ones(p.local_blocks, p.block_rank)]


def test_merging_a_bf16_factor_needs_the_optimizer():
    model = _model(torch.bfloat16)
    with pytest.raises(ValueError, match="pass the optimizer"):
        merge_subspace_factors(model, lr=0.1, weight_decay=0.0)
    opt = torch.optim.AdamW(optimizer_param_groups(model, 0.0))  # steps the bf16 A itself
    merge_subspace_factors(model, lr=0.1, weight_decay=0.0, optimizer=opt)
    assert model[0].factor_is_zero


def test_an_optimizer_that_does_not_step_the_factor_is_an_error():
    model = _model()
    other = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))])
    factor = model[0].subspace_factor
    with pytest.raises(ValueError, match="steps neither the subspace factor A"):
        merge_subspace_factors(model, lr=0.1, weight_decay=0.0, optimizer=other)
    with pytest.raises(ValueError, match="steps neither the subspace factor A"):
        transport_moments(other, [factor], _maps(model), _kept(model))


@pytest.mark.parametrize("policy", ["reset", "transport"])
def test_moments_without_optimizer_state_are_an_error(policy):
    """Before any optimizer step there is no state to move: an error, not a silent no-op."""
    model = _model()
    opt = torch.optim.AdamW(optimizer_param_groups(model, 0.0))
    with pytest.raises(RuntimeError, match=f"moments_on_resample='{policy}'"):
        if policy == "reset":
            reset_moments(opt)
        else:
            transport_moments(opt, [model[0].subspace_factor], _maps(model), _kept(model))
    model[0].subspace_factor.grad = torch.ones_like(model[0].subspace_factor)
    opt.step()  # now there is
    if policy == "reset":
        reset_moments(opt)
    else:
        transport_moments(opt, [model[0].subspace_factor], _maps(model), _kept(model))


def test_stepper_passes_the_optimizer_to_the_merge():
    from compact_dist import SubspaceStepper

    model = _model(torch.bfloat16)
    opt = torch.optim.AdamW(optimizer_param_groups(model, 0.0))
    stepper = SubspaceStepper(model, CompressionConfig(ratio=0.25, moments_on_resample="keep"))
    stepper.after_step(0.1, 0.0, opt)
    with pytest.raises(ValueError, match="pass the optimizer"):
        stepper.after_step(0.1, 0.0)
