"""Single-process numerics of the compact layers against Megatron's exact layers."""

import pytest
import torch
from megatron.core import tensor_parallel

from compact_dist.core.config import LayerCompression
from compact_dist.core.rounding import stochastic_round_to_bf16
from compact_dist.training.saved_tensors import saved_activation_bytes
from compact_dist.core.subspace import SubspaceStepper, optimizer_param_groups
from compact_dist.core.config import CompressionConfig
from layer_utils import build, layer_config

N, M = 64, 48
pytestmark = pytest.mark.usefixtures("megatron_tp1")


def _grads(layer, x, g, params):
    y, _ = layer(x)
    return (y, *torch.autograd.grad(y, [x, *params], g))


@pytest.mark.parametrize("kind", ["column", "row"])
def test_subspace_matches_megatron_and_gives_compressed_grad(kind):
    ref = build(kind, N, M, None)
    ours = build(kind, N, M, LayerCompression(ratio=0.25))
    assert torch.equal(ref.weight, ours.weight)
    assert not ours.weight.requires_grad and ours.subspace_factor.requires_grad
    x = torch.randn(6, 3, N, requires_grad=True)
    g = torch.randn(6, 3, M)
    y_ref, dx_ref, db_ref = _grads(ref, x, g, [ref.bias])
    y, dx, dA, db = _grads(ours, x, g, [ours.subspace_factor, ours.bias])
    assert torch.equal(y, y_ref)
    assert torch.equal(dx, dx_ref)
    torch.testing.assert_close(db, db_ref)
    # independent reference: G = dY^T X (full weight gradient), dL/dA = G P
    P = ours.projection.matrix(0, x.device, torch.float64)
    G = g.reshape(-1, M).double().t() @ x.detach().reshape(-1, N).double()
    assert dA.shape == (M, P.shape[1])
    torch.testing.assert_close(dA.double(), G @ P, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["column", "row"])
def test_unbiased_mode_gradient_is_G_P_PT(kind):
    ref = build(kind, N, M, None)
    ours = build(kind, N, M, LayerCompression(ratio=0.5, mode="unbiased"))
    assert ours.weight.requires_grad and ours.subspace_factor is None
    x = torch.randn(5, 2, N, requires_grad=True)
    g = torch.randn(5, 2, M)
    y_ref, dx_ref = _grads(ref, x, g, [])
    y, dx, dW = _grads(ours, x, g, [ours.weight])
    assert torch.equal(y, y_ref) and torch.equal(dx, dx_ref)
    P = ours.projection.matrix(0, x.device, torch.float64)
    G = g.reshape(-1, M).double().t() @ x.detach().reshape(-1, N).double()
    torch.testing.assert_close(dW.double(), G @ P @ P.t(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["column", "row"])
def test_saved_bytes_shrink_with_the_ratio(kind):
    x = torch.randn(32, 2, N, requires_grad=True)
    baseline = build(kind, N, M, None)
    base_bytes = saved_activation_bytes(lambda: baseline(x), baseline)
    assert base_bytes == x.numel() * 4  # Megatron keeps X
    previous = base_bytes
    for ratio in (0.5, 0.25, 0.125):
        layer = build(kind, N, M, LayerCompression(ratio=ratio))
        saved = saved_activation_bytes(lambda: layer(x), layer)
        assert saved == 32 * 2 * int(N * ratio) * 4  # only Z = X P
        assert saved < previous
        previous = saved


def _tensors_in(value, depth=0):
    """Tensors reachable from `value` through containers and plain objects' attributes."""
    if isinstance(value, torch.Tensor):
        yield value
    elif depth < 3 and isinstance(value, (list, tuple, set)):
        for item in value:
            yield from _tensors_in(item, depth + 1)
    elif depth < 3 and isinstance(value, dict):
        for item in value.values():
            yield from _tensors_in(item, depth + 1)
    elif depth < 3 and hasattr(value, "__dict__") and not isinstance(value, type):
        for item in vars(value).values():
            yield from _tensors_in(item, depth + 1)


@pytest.mark.parametrize("mode", ["subspace", "unbiased"])
@pytest.mark.parametrize("kind", ["column", "row"])
def test_input_is_not_kept_alive_after_forward(kind, mode):
    """Beyond save_for_backward (saved-bytes test): no attribute of the autograd context holds
    X or a tensor of its size (a copy, a view, another dtype), and X itself dies with the last
    reference outside the graph."""
    import gc
    import weakref

    layer = build(kind, N, M, LayerCompression(ratio=0.25, mode=mode))
    if mode == "subspace":
        with torch.no_grad():
            layer.subspace_factor.normal_(std=0.1)  # the A P^T path too
    leaf = torch.randn(32, 2, N, requires_grad=True)
    x = leaf * 2.0  # not a leaf: only what the layer keeps can keep it (x * number saves none)
    numel, storage = x.numel(), x.untyped_storage().data_ptr()
    alive = weakref.ref(x)
    y, _ = layer(x)
    nodes, todo = [], [y.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node not in nodes:
            nodes.append(node)
            todo.extend(n for n, _ in node.next_functions)
    ctx = [n for n in nodes if type(n).__name__ == "CompressedLinearFunctionBackward"]
    assert len(ctx) == 1
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    attributes = vars(ctx[0])
    assert "blocks" in attributes  # the scan sees what forward put on ctx
    for name, value in attributes.items():
        for t in _tensors_in(value):
            if t.untyped_storage().data_ptr() in params:
                continue
            assert t.untyped_storage().data_ptr() != storage, name
            assert t.numel() < numel, (name, tuple(t.shape))
    del x
    gc.collect()
    assert alive() is None
    y.sum().backward()  # the graph still works without X
    assert leaf.grad is not None


@pytest.mark.parametrize("kind", ["column", "row"])
def test_merge_keeps_the_function_and_applies_decay_to_w_eff(kind):
    layer = build(kind, N, M, LayerCompression(ratio=0.25))
    x = torch.randn(4, 2, N, requires_grad=True)
    with torch.no_grad():
        layer.subspace_factor.normal_(std=0.1)  # as after an optimizer step
    assert not layer.factor_is_zero
    w_eff = layer.effective_weight()
    y_before, _ = layer(x)
    torch.testing.assert_close(y_before, x @ w_eff.t() + layer.bias, rtol=1e-5, atol=1e-5)
    # dX is exact for W_eff while A is non-zero
    dx, = torch.autograd.grad(y_before, [x], torch.ones_like(y_before))
    torch.testing.assert_close(dx, torch.ones_like(y_before) @ w_eff, rtol=1e-5, atol=1e-5)

    lr, wd = 0.1, 0.5
    w0 = layer.weight.detach().clone()
    delta = w_eff - w0
    layer.merge_subspace(lr=lr, weight_decay=wd)
    assert layer.factor_is_zero and layer.subspace_factor.abs().sum() == 0
    torch.testing.assert_close(layer.weight, w0 * (1 - lr * wd) + delta)
    layer.merge_subspace()  # no-op merge: W_eff unchanged
    w_eff_after = layer.effective_weight()
    layer2 = build(kind, N, M, LayerCompression(ratio=0.25))
    with torch.no_grad():
        layer2.subspace_factor.copy_(torch.randn_like(layer2.subspace_factor))
    w_eff2 = layer2.effective_weight()
    layer2.merge_subspace()
    torch.testing.assert_close(layer2.weight, w_eff2, rtol=1e-6, atol=1e-6)
    y_after, _ = layer(x)
    torch.testing.assert_close(y_after, x @ w_eff_after.t() + layer.bias, rtol=1e-5, atol=1e-5)


def test_stochastic_rounding_is_unbiased():
    x = torch.full((20000,), 1.0 + 2.0**-9)  # a quarter of bf16's spacing (2^-7) above 1
    gen = torch.Generator().manual_seed(0)
    out = stochastic_round_to_bf16(x, gen).float()
    assert set(out.unique().tolist()) == {1.0, 1.0 + 2.0**-7}
    assert abs(out.mean().item() - (1.0 + 2.0**-9)) < 4 * (2.0**-7) * (0.25 * 0.75 / 20000) ** 0.5
    assert x.bfloat16().float().unique().tolist() == [1.0]  # round-to-nearest loses it


def test_bf16_base_merge_keeps_updates_below_bf16_resolution():
    layer = build("column", N, M, LayerCompression(ratio=0.25, base_dtype="bf16"))
    assert layer.weight.dtype == torch.bfloat16
    with torch.no_grad():
        layer.weight.fill_(1.0)
        layer.subspace_factor.normal_(std=4e-4)
    P = layer.projection.matrix(0, layer.weight.device, torch.float32)
    delta = layer.subspace_factor.detach().float() @ P.t()
    ulp = 2.0**-7 * torch.where(delta >= 0, 1.0, 0.5)  # bf16 spacing just above / below 1
    assert (delta.abs() < ulp / 2).all()  # round-to-nearest would drop every update
    exact = 1.0 + delta
    layer.merge_subspace()
    out = layer.weight.float()
    lower = torch.where(delta >= 0, torch.ones_like(delta), 1.0 - ulp)
    assert ((out == lower) | (out == lower + ulp)).all()
    moved = (out != 1.0).float().mean().item()
    expected = (delta.abs() / ulp).mean().item()
    assert 0.6 * expected < moved < 1.4 * expected, (moved, expected)
    assert abs((out - exact).mean().item()) < 0.2 * delta.abs().mean().item()


def test_to_bfloat16_keeps_fp32_base_and_parameter_order():
    layer = build("column", N, M, LayerCompression(ratio=0.25))
    names = [n for n, _ in layer.named_parameters()]
    layer.bfloat16()
    assert layer.weight.dtype == torch.float32
    assert layer.subspace_factor.dtype == torch.bfloat16 and layer.bias.dtype == torch.bfloat16
    assert [n for n, _ in layer.named_parameters()] == names
    x = torch.randn(3, 2, N, dtype=torch.bfloat16, requires_grad=True)
    y, _ = layer(x)
    y.sum().backward()
    assert y.dtype == torch.bfloat16 and layer.subspace_factor.grad.dtype == torch.bfloat16


def test_resample_needs_merge_and_changes_p():
    layer = build("row", N, M, LayerCompression(ratio=0.25))
    p0 = layer.projection_blocks().clone()
    with torch.no_grad():
        layer.subspace_factor.add_(1.0)
    with pytest.raises(RuntimeError, match="merge_subspace"):
        layer.resample_projection()
    layer.merge_subspace()
    layer.resample_projection()
    assert layer.projection_epoch == 1
    assert not torch.allclose(layer.projection_blocks(), p0)
    state = layer.state_dict()
    fresh = build("row", N, M, LayerCompression(ratio=0.25))
    fresh.load_state_dict(state)
    assert fresh.projection_epoch == 1 and fresh.merge_count == 1
    assert torch.equal(fresh.projection_blocks(), layer.projection_blocks())


@pytest.mark.parametrize("moments", ["keep", "reset"])
def test_stepper_merges_every_step_and_resamples_every_T(moments):
    layer = build("column", N, M, LayerCompression(ratio=0.25))
    model = torch.nn.ModuleList([layer])
    cfg = CompressionConfig(ratio=0.25, resample_interval=3, moments_on_resample=moments,
                            projection="gaussian")
    opt = torch.optim.AdamW(optimizer_param_groups(model, 0.1), lr=1e-2)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.0]  # bias, factor
    stepper = SubspaceStepper(model, cfg)
    x = torch.randn(4, 2, N)
    resampled = []
    for _ in range(6):
        y, _ = layer(x)
        opt.zero_grad()
        y.pow(2).mean().backward()
        opt.step()
        assert not layer.factor_is_zero
        resampled.append(stepper.after_step(lr=1e-2, weight_decay=0.1, optimizer=opt))
        assert layer.factor_is_zero
    assert resampled == [False, False, True, False, False, True]
    assert layer.projection_epoch == 2 and layer.merge_count == 6
    exp_avg = opt.state[layer.subspace_factor]["exp_avg"]
    assert (exp_avg.abs().sum() == 0) == (moments == "reset")


def test_p_is_identical_under_megatron_checkpoint_recompute():
    """Recompute replays the RNG (dropout) but P must not depend on it: grads with Megatron's
    tensor_parallel.checkpoint equal grads without, even with ambient RNG use in between, and
    the P the layer uses equals P drawn afresh from its seeds under any ambient RNG state."""
    layer = build("column", N, M, LayerCompression(ratio=0.25))
    dropout = torch.nn.Dropout(0.3)
    x = torch.randn(4, 2, N, requires_grad=True)

    def body(inp):
        with tensor_parallel.get_cuda_rng_tracker().fork():
            return layer(dropout(inp))[0]

    def grads(fn):
        x.grad = layer.subspace_factor.grad = None
        fn(x).sum().backward()
        return x.grad.clone(), layer.subspace_factor.grad.clone()

    tracker = tensor_parallel.get_cuda_rng_tracker()
    torch.manual_seed(5)
    rng, tracked = torch.get_rng_state(), dict(tracker.get_states())
    plain = grads(body)
    torch.set_rng_state(rng)
    tracker.set_states(dict(tracked))  # same dropout masks in both runs
    layer._projection_cache.clear()  # the checkpointed run draws P anew

    def checkpointed(inp):
        out = tensor_parallel.checkpoint(body, False, inp)
        torch.randn(100)  # ambient RNG use between the forward and the recompute
        return out

    ckpt = grads(checkpointed)
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(a, b)
    torch.manual_seed(999)
    fresh = layer.projection.blocks(layer.projection_epoch, x.device, x.dtype)
    assert torch.equal(layer.projection_blocks(x.dtype), fresh)


def test_projection_is_generated_once_per_epoch_and_dropped_on_resample():
    layer = build("row", N, M, LayerCompression(ratio=0.25, row_parallel_blocks=4))
    calls = []
    original = layer.projection.blocks

    def counting(*args):
        calls.append(args)
        return original(*args)

    object.__setattr__(layer.projection, "blocks", counting)
    x = torch.randn(4, 2, N, requires_grad=True)
    for _ in range(3):
        layer(x)[0].sum().backward()
    layer.merge_subspace(lr=0.1, weight_decay=0.0)
    assert len(calls) == 1  # three forwards, three backwards and a merge share one P
    layer.resample_projection()
    assert layer._projection_cache == {}
    layer(x)[0].sum().backward()
    assert len(calls) == 2 and calls[-1][0] == 1  # the next epoch's P


def test_bad_layer_arguments_raise():
    with pytest.raises(ValueError, match="LayerCompression"):
        build("column", N, M, CompressionConfig())
    with pytest.raises(ValueError, match="gradient_accumulation_fusion"):
        build("column", N, M, LayerCompression(ratio=0.25),
              config=layer_config(gradient_accumulation_fusion=True))
    with pytest.raises(ValueError, match="not divisible into 8"):
        build("row", 60, M, LayerCompression(ratio=0.25))
