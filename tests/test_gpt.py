"""A small GPTModel built with the compact spec, on CPU."""

import pytest
import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

from compact_dist import (
    CompactColumnParallelLinear,
    CompactRowParallelLinear,
    CompressionConfig,
    SubspaceStepper,
    compact_layers,
    optimizer_param_groups,
)
from compact_dist.megatron.attention import SDPACoreAttention
from gpt_utils import loss_of, text_batch, tiny_gpt

pytestmark = pytest.mark.usefixtures("megatron_tp1")


def test_spec_swaps_the_four_linears_and_attention():
    model = tiny_gpt(CompressionConfig(ratio=0.25, layers=["qkv", "fc2"]))
    layer = model.decoder.layers[0]
    assert isinstance(layer.self_attention.linear_qkv, CompactColumnParallelLinear)
    assert isinstance(layer.mlp.linear_fc2, CompactRowParallelLinear)
    assert type(layer.self_attention.linear_proj) is RowParallelLinear
    assert type(layer.mlp.linear_fc1) is ColumnParallelLinear
    assert isinstance(layer.self_attention.core_attention, SDPACoreAttention)
    ids = [m.layer_id for m in compact_layers(model)]
    assert len(ids) == 4 and len(set(ids)) == 4  # distinct projections per layer and role
    baseline = tiny_gpt(CompressionConfig(enabled=False))
    assert not compact_layers(baseline)


def _train(model, compression, steps, lr=3e-3, wd=0.01):
    opt = torch.optim.AdamW(optimizer_param_groups(model, wd), lr=lr, betas=(0.9, 0.95))
    stepper = SubspaceStepper(model, compression)
    losses = []
    for step in range(steps):
        loss = loss_of(model, text_batch(seed=step))
        opt.zero_grad()
        loss.backward()
        opt.step()
        stepper.after_step(lr, wd, opt)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("mode", ["subspace", "unbiased"])
def test_gpt_trains_and_loss_falls(mode):
    compression = CompressionConfig(ratio=0.25, mode=mode, resample_interval=10)
    model = tiny_gpt(compression)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert len(frozen) == (8 if mode == "subspace" else 0)  # 4 W0 per layer, 2 layers
    losses = _train(model, compression, 30)
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5, losses


def test_merge_keeps_forward_outputs():
    compression = CompressionConfig(ratio=0.25)
    model = tiny_gpt(compression)
    opt = torch.optim.AdamW(optimizer_param_groups(model, 0.0), lr=1e-2)
    batch = text_batch()
    loss_of(model, batch).backward()
    opt.step()  # A != 0 now
    assert not all(m.factor_is_zero for m in compact_layers(model))
    w_eff = [m.effective_weight() for m in compact_layers(model)]
    model.eval()
    with torch.no_grad():
        before = model(batch[0], batch[1], None)
        SubspaceStepper(model, compression).after_step(lr=1e-2, weight_decay=0.0)
        after = model(batch[0], batch[1], None)
    for m, w in zip(compact_layers(model), w_eff):
        assert m.factor_is_zero
        torch.testing.assert_close(m.weight.float(), w)  # W_eff before == W0 after
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_full_and_selective_recompute_give_the_same_losses_and_grads():
    compression = CompressionConfig(ratio=0.25)
    runs = {}
    for name, kw in {
        "none": {},
        "full": dict(recompute_granularity="full", recompute_method="uniform",
                     recompute_num_layers=1),
        "selective": dict(recompute_granularity="selective", recompute_modules=["core_attn"]),
    }.items():
        model = tiny_gpt(compression, **kw)
        loss = loss_of(model, text_batch())
        loss.backward()
        grads = [m.subspace_factor.grad.clone() for m in compact_layers(model)]
        runs[name] = (loss.item(), grads)
    for name in ("full", "selective"):
        assert runs[name][0] == pytest.approx(runs["none"][0], rel=1e-6)
        for a, b in zip(runs[name][1], runs["none"][1]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
