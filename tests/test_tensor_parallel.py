"""TP=2 and TP=4 (gloo, CPU processes) compute the same forward, dX and compressed gradients
as TP=1, with and without sequence parallelism, in both modes."""

import pytest
import torch

from distributed import run_distributed

N, M, S, B = 64, 32, 8, 2


def _tp_matches_tp1(rank, tp):
    import torch.distributed as dist
    from compact_dist.core.config import LayerCompression
    from layer_utils import build, layer_config

    singles = [dist.new_group([r]) for r in range(tp)]  # a TP=1 group per rank for references
    torch.manual_seed(100)
    x_full = torch.randn(S, B, N)
    g_full = {"column": torch.randn(S, B, M), "row": torch.randn(S, B, M)}
    checked = 0
    for mode in ("subspace", "unbiased"):
        comp = LayerCompression(ratio=0.25, mode=mode, row_parallel_blocks=8)
        for kind in ("column", "row"):
            for sp in (False, True):
                ref = build(kind, N, M, comp, tp_group=singles[rank])
                ours = build(kind, N, M, comp, config=layer_config(
                    sequence_parallel=sp, tensor_model_parallel_size=tp))
                if mode == "subspace":  # a non-zero A exercises the exact W_eff path too
                    torch.manual_seed(7)
                    a = torch.randn_like(ref.subspace_factor) * 0.05
                    with torch.no_grad():
                        ref.subspace_factor.copy_(a)
                        rows = ours.subspace_factor.shape
                        if kind == "column":
                            ours.subspace_factor.copy_(a.chunk(tp, 0)[rank])
                        else:
                            ours.subspace_factor.copy_(a.chunk(tp, 1)[rank])
                        assert ours.subspace_factor.shape == rows
                seq = lambda t: t.chunk(tp, 0)[rank]
                x_ref = x_full.clone().requires_grad_(True)
                y_ref, _ = ref(x_ref)
                g = g_full[kind]
                y_ref.backward(g)
                if kind == "column":
                    x_in = seq(x_full) if sp else x_full
                    out_slice = lambda t: t.chunk(tp, -1)[rank]  # [s, b, m/tp]
                    dx_slice = seq if sp else (lambda t: t)
                    w_slice = lambda t: t.chunk(tp, 0)[rank]
                    g_in = out_slice(g)
                else:
                    x_in = x_full.chunk(tp, -1)[rank]
                    out_slice = seq if sp else (lambda t: t)
                    dx_slice = lambda t: t.chunk(tp, -1)[rank]
                    w_slice = lambda t: t.chunk(tp, 1)[rank]
                    g_in = out_slice(g)
                x_ours = x_in.clone().requires_grad_(True)
                y, _ = ours(x_ours)
                y.backward(g_in)
                what = f"{mode} {kind} sp={sp} tp={tp}"
                torch.testing.assert_close(y, out_slice(y_ref), msg=what)
                torch.testing.assert_close(x_ours.grad, dx_slice(x_ref.grad), msg=what)
                if mode == "subspace":
                    torch.testing.assert_close(
                        ours.subspace_factor.grad, w_slice(ref.subspace_factor.grad), msg=what)
                    assert ours.weight.grad is None
                else:
                    torch.testing.assert_close(ours.weight.grad, w_slice(ref.weight.grad), msg=what)
                if kind == "column":
                    bias_grad = w_slice(ref.bias.grad)
                elif sp:  # added after the reduce-scatter: a partial sum, like Megatron's
                    bias_grad = seq(g).sum((0, 1))   # (bias.sequence_parallel marks it)
                    assert ours.bias.sequence_parallel
                else:
                    bias_grad = ref.bias.grad
                torch.testing.assert_close(ours.bias.grad, bias_grad, msg=what)
                checked += 1
    assert checked == 8


@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_equals_tp1(tp):
    run_distributed(_tp_matches_tp1, tp, tp)


def _gpt_losses(steps, lr=3e-3):
    from compact_dist import CompressionConfig, SubspaceStepper, optimizer_param_groups
    from gpt_utils import loss_of, text_batch, tiny_gpt

    compression = CompressionConfig(ratio=0.25, resample_interval=2)
    model = tiny_gpt(compression, tensor_model_parallel_size=_tp_size())
    opt = torch.optim.AdamW(optimizer_param_groups(model, 0.01), lr=lr)
    stepper = SubspaceStepper(model, compression)
    losses = []
    for step in range(steps):
        loss = loss_of(model, text_batch(seed=step))
        opt.zero_grad()
        loss.backward()
        opt.step()
        stepper.after_step(lr, 0.01, opt)
        losses.append(loss.item())
    return losses


def _tp_size():
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_world_size()


def _gpt_tp_run(rank, expected):
    losses = _gpt_losses(len(expected))
    assert losses == pytest.approx(expected, rel=2e-5), (losses, expected)


def test_gpt_losses_at_tp2_equal_tp1(megatron_tp1):
    expected = _gpt_losses(4)  # includes two resamples (T=2)
    assert expected[-1] < expected[0]
    run_distributed(_gpt_tp_run, 2, expected)


def _sp_norm_grads(rank, tp):
    import torch.distributed as dist

    from compact_dist.core.config import LayerCompression
    from compact_dist.megatron.sequence_parallel import allreduce_sequence_parallel_grads
    from compact_dist.megatron.norm import SequenceParallelTorchNorm
    from layer_utils import build, layer_config

    comp = LayerCompression(ratio=0.25)
    singles = [dist.new_group([r]) for r in range(tp)]

    def net(config, tp_group=None):
        norm = SequenceParallelTorchNorm(config, N, eps=1e-5)
        kw = {} if tp_group is None else {"tp_group": tp_group}
        return torch.nn.ModuleDict(
            {"norm": norm, "linear": build("column", N, M, comp, config=config, **kw)})

    torch.manual_seed(3)
    x_full, g_full = torch.randn(S, B, N), torch.randn(S, B, M)
    ref = net(layer_config(normalization="RMSNorm"), tp_group=singles[rank])
    y, _ = ref["linear"](ref["norm"](x_full))
    y.backward(g_full)

    sp = layer_config(normalization="RMSNorm", sequence_parallel=True,
                      tensor_model_parallel_size=tp)
    partial, summed = net(sp), net(sp)
    assert partial["norm"].weight.sequence_parallel
    assert allreduce_sequence_parallel_grads(summed) == 1  # only the norm weight is SP-shared
    for model in (partial, summed):
        y, _ = model["linear"](model["norm"](x_full.chunk(tp, 0)[rank]))
        y.backward(g_full.chunk(tp, -1)[rank])
    # without the hook each TP rank holds the gradient of its sequence slice only
    assert not torch.allclose(partial["norm"].weight.grad, ref["norm"].weight.grad, rtol=1e-3)
    torch.testing.assert_close(summed["norm"].weight.grad, ref["norm"].weight.grad)


def test_sequence_parallel_norm_gradients_are_summed_over_tp():
    run_distributed(_sp_norm_grads, 2, 2)
