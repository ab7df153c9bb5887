"""Sequence parallelism under DeepSpeed ZeRO-3 (CPU, gloo): a stack of compact column/row
layers and sequence-parallel norms trained at TP=2 x DP=2 matches TP=1 x DP=2.

The norms' weights and biases and the row-parallel bias see only their TP rank's slice of the
sequence; compact_dist.megatron.sequence_parallel.allreduce_sequence_parallel_grads sums their gradients over the
TP group in tensor hooks, which run before the gradient is accumulated, hence before ZeRO-3's
post-accumulation hooks reduce-scatter it over the data-parallel group. (A tiny GPT with
sequence parallelism needs CUDA in megatron-core 0.16.1, hence the layer stack.)

One 4-process job runs both layouts: Megatron's parallel state is TP=2 x DP=2, and the
TP=1 x DP=2 reference runs on each data-parallel group ({0, 2} and {1, 3}) with layers built
on one-rank TP groups and a DeepSpeed `mpu` that reports them.
"""

import pytest
import torch

from distributed import run_distributed

H, F, S, B, STEPS, LR, WD = 32, 64, 8, 4, 4, 1e-2, 0.1


def _stack(config, compression, tp_group):
    from compact_dist.core.layers import CompactColumnParallelLinear, CompactRowParallelLinear
    from compact_dist.megatron.norm import SequenceParallelTorchNorm
    from layer_utils import init_method

    class Stack(torch.nn.Module):
        """norm -> column -> gelu -> row (+ residual) -> norm on [s(/tp), b, h]."""

        def __init__(self):
            super().__init__()
            common = dict(config=config, init_method=init_method, bias=True,
                          compression=compression, tp_group=tp_group)
            self.norm1 = SequenceParallelTorchNorm(config, H)
            self.fc1 = CompactColumnParallelLinear(H, F, gather_output=False, layer_id=1,
                                                   **common)
            self.fc2 = CompactRowParallelLinear(F, H, input_is_parallel=True,
                                                skip_bias_add=False, layer_id=2, **common)
            self.norm2 = SequenceParallelTorchNorm(config, H)

        def forward(self, x):
            h, _ = self.fc1(self.norm1(x))
            h, _ = self.fc2(torch.nn.functional.gelu(h))
            return self.norm2(h + x)

    torch.manual_seed(0)  # Megatron's CPU init draws the full matrices: equal at any TP
    return Stack()


def _mpu(tp_group):
    """DeepSpeed's view of the parallel layout: Megatron's, or TP=1 on a one-rank group."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from compact_dist.deepspeed.engine import MegatronMPU

    if tp_group is None:
        return MegatronMPU

    class OneRankTP(MegatronMPU):
        get_model_parallel_group = get_tensor_model_parallel_group = staticmethod(
            lambda: tp_group)
        get_model_parallel_rank = get_tensor_model_parallel_rank = staticmethod(lambda: 0)
        get_model_parallel_world_size = get_tensor_model_parallel_world_size = staticmethod(
            lambda: 1)
        get_tensor_model_parallel_src_rank = staticmethod(dist.get_rank)
        get_data_parallel_group = staticmethod(ps.get_data_parallel_group)

    return OneRankTP


def _full_parameters(model, tp_group):
    """name -> the full (TP-gathered) parameter, gathered from the ZeRO-3 partitions."""
    import deepspeed
    import torch.distributed as dist

    tp = dist.get_world_size(tp_group)
    out = {}
    params = dict(model.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        for name, p in params.items():
            t = p.detach().clone()
            if getattr(p, "tensor_model_parallel", False) and tp > 1:
                parts = [torch.empty_like(t) for _ in range(tp)]
                dist.all_gather(parts, t.contiguous(), group=tp_group)
                t = torch.cat(parts, dim=p.partition_dim)
            elif tp > 1:  # replicated over TP (norms, the row-parallel bias): equal
                parts = [torch.empty_like(t) for _ in range(tp)]
                dist.all_gather(parts, t.contiguous(), group=tp_group)
                assert all(torch.equal(part, t) for part in parts), name
            out[name] = t
    return out


def _train(tp_group, grad_clip):
    """Train the stack under ZeRO-3: tp_group None is Megatron's TP=2 with sequence
    parallelism, else the TP=1 reference on that one-rank group. Returns (losses, params)."""
    import deepspeed
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from compact_dist import CompressionConfig, SubspaceStepper, optimizer_param_groups
    from compact_dist.deepspeed.engine import deepspeed_config
    from compact_dist.megatron.sequence_parallel import allreduce_sequence_parallel_grads
    from compact_dist.deepspeed.zero3_factor import keep_factors_out_of_fetch
    from layer_utils import layer_config

    sp = tp_group is None
    group = ps.get_tensor_model_parallel_group() if sp else tp_group
    tp, tp_rank = dist.get_world_size(group), dist.get_rank(group)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    config = layer_config(hidden_size=H, normalization="LayerNorm", sequence_parallel=sp,
                          tensor_model_parallel_size=tp)
    compression = CompressionConfig(ratio=0.25, resample_interval=2, row_parallel_blocks=4)
    model = _stack(config, compression.for_role("fc1"), group)
    hooked = allreduce_sequence_parallel_grads(model) if sp else 0
    assert hooked == (5 if sp else 0)  # two norms' weight and bias, the row-parallel bias
    opt = torch.optim.AdamW(optimizer_param_groups(model, WD), lr=LR)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, mpu=_mpu(tp_group),
                                           config=deepspeed_config(
        zero_stage=3, micro_batch_size=B // dp, gradient_accumulation_steps=1,
        data_parallel_size=dp, bf16=False, grad_clip=grad_clip))
    assert all(hasattr(p, "ds_id") for p in engine.module.parameters())
    assert keep_factors_out_of_fetch(engine.module) == 2  # as initialize_engine does
    stepper = SubspaceStepper(engine.module, compression)
    losses, norms = [], []
    for step in range(STEPS):
        gen = torch.Generator().manual_seed(step)
        x = torch.randn(S, B, H, generator=gen)
        target = torch.randn(S, B, H, generator=gen)
        mine = slice(dp_rank * (B // dp), (dp_rank + 1) * (B // dp))
        x, target = x[:, mine], target[:, mine]
        if sp:  # this TP rank's slice of the sequence
            x, target = x.chunk(tp, 0)[tp_rank], target.chunk(tp, 0)[tp_rank]
        # the mean squared error over the whole sequence is the sum of the TP ranks' parts;
        # the collectives' backward makes each rank's gradients those of that sum
        loss = (engine(x) - target).pow(2).sum() / (S * x.shape[1] * H)
        engine.backward(loss)
        engine.step()
        norms.append(float(engine.get_global_grad_norm()))
        stepper.after_step(LR, WD, engine.optimizer)
        total = loss.detach().clone()
        dist.all_reduce(total, group=group)  # the TP ranks' parts
        dist.all_reduce(total, group=ps.get_data_parallel_group())
        losses.append(total.item() / dp)
    if grad_clip:
        assert max(norms) > grad_clip, norms  # clipping acts
    return losses, _full_parameters(engine.module, group)


def _tp2_equals_tp1(rank):
    import logging

    import torch.distributed as dist

    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    one_rank = [dist.new_group([r]) for r in range(dist.get_world_size())][rank]
    for grad_clip in (0.0, 0.05):  # without clipping, and with it active
        ref_losses, ref_params = _train(one_rank, grad_clip)
        losses, params = _train(None, grad_clip)
        assert ref_losses[-1] < ref_losses[0]
        assert losses == pytest.approx(ref_losses, rel=1e-5), (grad_clip, losses, ref_losses)
        assert ref_params.keys() == params.keys()
        for name, value in ref_params.items():
            torch.testing.assert_close(params[name], value, rtol=1e-5, atol=1e-6,
                                       msg=f"{name} grad_clip={grad_clip}")
        # the sequence-parallel parameters did train
        assert not torch.allclose(ref_params["norm2.weight"], torch.ones(H))


def test_zero3_sequence_parallel_tp2_dp2_equals_tp1_dp2():
    run_distributed(_tp2_equals_tp1, 4, tp=2)
