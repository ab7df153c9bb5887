"""DeepSpeed ZeRO-1/2/3 (CPU, gloo, 2 data-parallel ranks) training compact layers matches a
single-process run on the full batch (what DDP computes), including merges and resamples."""

import pytest
import torch

from distributed import run_distributed

STEPS, LR, WD = 5, 3e-3, 0.01


def _compression(moments="keep", projection="gaussian"):
    from compact_dist import CompressionConfig

    return CompressionConfig(ratio=0.25, resample_interval=2, moments_on_resample=moments,
                             projection=projection)


def _reference_losses(moments, projection):
    from compact_dist import SubspaceStepper, optimizer_param_groups
    from gpt_utils import loss_of, text_batch, tiny_gpt

    model = tiny_gpt(_compression(moments, projection))
    opt = torch.optim.AdamW(optimizer_param_groups(model, WD), lr=LR)
    stepper = SubspaceStepper(model, _compression(moments, projection))
    losses = []
    for step in range(STEPS):
        loss = loss_of(model, text_batch(batch=4, seed=step))
        opt.zero_grad()
        loss.backward()
        opt.step()
        stepper.after_step(LR, WD, opt)
        losses.append(loss.item())
    return losses


def _zero_run(rank, stage, moments, projection, expected):
    import logging

    from megatron.core import parallel_state as ps

    from compact_dist import SubspaceStepper, compact_layers, optimizer_param_groups
    from compact_dist.deepspeed.engine import deepspeed_config, initialize_engine
    from compact_dist.core.moments import subspace_step_count
    from gpt_utils import text_batch, tiny_gpt

    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    model = tiny_gpt(_compression(moments, projection))
    dp = ps.get_data_parallel_world_size()
    opt = torch.optim.AdamW(optimizer_param_groups(model, WD), lr=LR)
    config = deepspeed_config(zero_stage=stage, micro_batch_size=2, gradient_accumulation_steps=1,
                              data_parallel_size=dp, bf16=False, grad_clip=0.0)
    engine = initialize_engine(model, opt, config)
    layers = compact_layers(engine.module)
    gathered = []  # what DeepSpeed's ZeRO-3 fetch all-gathers during the steps
    if stage == 3:  # W0 and A really are partitioned
        assert all(hasattr(l.weight, "ds_id") and hasattr(l.subspace_factor, "ds_id")
                   for l in layers)
        assert all(l.weight.ds_tensor.numel() < l.weight.ds_numel for l in layers)
        for p in engine.module.parameters():
            p.all_gather_coalesced = (lambda orig: lambda params, *a, **k: (
                gathered.extend(params), orig(params, *a, **k))[1])(p.all_gather_coalesced)
    stepper = SubspaceStepper(engine.module, _compression(moments, projection))
    losses = []
    for step in range(STEPS):
        tokens, positions, labels = text_batch(batch=4, seed=step)
        mine = slice(2 * rank, 2 * rank + 2)
        own_gather = stage == 3 and step == 3
        if own_gather:  # forward must include A (as after a checkpoint load): the layer
            for layer in layers:  # gathers A itself, and the gradient still reaches DeepSpeed
                layer.mark_factor_written()
            gathered_before = len(gathered)
        loss = engine(tokens[mine], positions[mine], None, labels=labels[mine]).float().mean()
        engine.backward(loss)
        if own_gather:  # partitioned again once its gradient was reduced
            assert all(l.subspace_factor.numel() == 0 for l in layers)
            assert len(gathered) > gathered_before
            del gathered[gathered_before:]
        engine.step()
        stepper.after_step(LR, WD, engine.optimizer)
        total = loss.detach().clone()
        torch.distributed.all_reduce(total)
        losses.append(total.item() / dp)
    # P changes after steps 2 and 4 (Gaussian) or 1, 2 and 4 (data-aware: first estimate in
    # step 1); a reset restarts A's Adam step count, so one step has passed since step 4
    assert all(l.projection_epoch == STEPS // 2 + (projection != "gaussian") for l in layers)
    assert subspace_step_count(engine.optimizer) == (1 if moments == "reset" else STEPS)
    assert losses == pytest.approx(expected, rel=1e-5, abs=1e-6), (stage, losses, expected)
    if stage == 3:
        # A is zero in every forward and backward here: DeepSpeed never gathers it (each
        # gather would move A's bytes and cost its per-parameter host work), W0 it does
        gathered_ids = {id(p) for p in gathered}
        assert all(id(l.weight) in gathered_ids for l in layers)
        assert not any(id(l.subspace_factor) in gathered_ids for l in layers)
        assert all(l.subspace_factor.numel() == 0 for l in layers)  # placeholders again
        # every row count here is even: the merge is partition-local (no gather of A); where
        # rows do not align it gathers every A's master in one collective, not one per layer
        import compact_dist.deepspeed.zero3_merge as subspace
        from compact_dist import merge_subspace_factors

        original = torch.distributed.all_gather_into_tensor
        aligned = subspace._rows_align
        counts = []
        for force_gather in (False, True):
            calls = []
            torch.distributed.all_gather_into_tensor = lambda *a, **k: (calls.append(1),
                                                                        original(*a, **k))[1]
            if force_gather:
                subspace._rows_align = lambda layer, world: False
            try:
                merge_subspace_factors(engine.module, lr=LR, weight_decay=WD)
            finally:
                torch.distributed.all_gather_into_tensor = original
                subspace._rows_align = aligned
            counts.append(len(calls))
        assert counts == [0, 1] and len(layers) > 1, (counts, len(layers))


@pytest.mark.parametrize("stage, moments, projection", [
    (0, "keep", "gaussian"), (1, "keep", "gaussian"), (2, "keep", "gaussian"),
    (2, "reset", "gaussian"), (3, "keep", "gaussian"), (3, "reset", "gaussian"),
    (0, "reset", "pca"), (1, "transport", "pca"), (2, "transport", "pca"),
    (3, "transport", "pca"),
])
def test_zero_stage_matches_full_batch_reference(megatron_tp1, stage, moments, projection):
    expected = _reference_losses(moments, projection)
    assert expected[-1] < expected[0]
    run_distributed(_zero_run, 2, stage, moments, projection, expected, tp=1)


def _bf16_engine(rank):
    import logging

    from compact_dist import CompressionConfig, compact_layers, optimizer_param_groups
    from compact_dist.deepspeed.engine import deepspeed_config, initialize_engine
    from gpt_utils import loss_of, text_batch, tiny_gpt

    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    model = tiny_gpt(CompressionConfig(ratio=0.25, base_dtype="fp32"))
    bases = [l.weight.detach().clone() for l in compact_layers(model)]
    opt = torch.optim.AdamW(optimizer_param_groups(model, 0.0), lr=1e-3)
    engine = initialize_engine(model, opt, deepspeed_config(
        zero_stage=1, micro_batch_size=2, gradient_accumulation_steps=1, data_parallel_size=1,
        bf16=True, grad_clip=1.0))
    layers = compact_layers(engine.module)
    assert all(l.subspace_factor.dtype == torch.bfloat16 for l in layers)  # trained in bf16
    for layer, before in zip(layers, bases):  # the frozen base keeps its fp32 bits
        assert layer.weight.dtype == torch.float32
        assert torch.equal(layer.weight, before)
    loss = loss_of(engine, text_batch(batch=2))
    engine.backward(loss)
    engine.step()
    assert torch.isfinite(loss)

    from deepspeed.utils import safe_get_full_fp32_param

    from compact_dist import merge_subspace_factors

    masters = [safe_get_full_fp32_param(l.subspace_factor) for l in layers]
    w_eff = [l.effective_weight() for l in layers]  # what the model computes: W0 + (bf16 A) P^T
    w0 = [l.weight.clone() for l in layers]
    merge_subspace_factors(engine.module, lr=1e-3, weight_decay=0.0)
    for layer, master, before, base in zip(layers, masters, w_eff, w0):
        factor = layer.subspace_factor
        assert master.abs().max() > 0 and layer.factor_is_zero
        assert factor.abs().max() == 0  # the bf16 A that forward uses
        # the fp32 master keeps exactly what the bf16 copy rounded away: nothing is lost
        residual = master - master.to(torch.bfloat16).float()
        assert torch.equal(safe_get_full_fp32_param(factor), residual)
        # W0 absorbed A P^T up to the bf16 rounding of the delta (computed in A's dtype)
        delta = (before - base).abs().max()
        assert delta > 0
        torch.testing.assert_close(layer.weight, before, rtol=0, atol=float(delta) / 2**7)


def test_bf16_engine_keeps_fp32_base_weights(megatron_tp1):
    run_distributed(_bf16_engine, 1, tp=1)


def test_zero3_bf16_with_fp32_base_is_rejected_before_any_process_group():
    from compact_dist.training.train_config import load_train_config

    cfg = load_train_config(None, ["train.zero_stage=3", "train.precision=bf16"])
    with pytest.raises(ValueError, match="base_dtype=bf16"):
        cfg.check_environment(world_size=1, has_cuda=True)
    ok = load_train_config(None, ["train.zero_stage=3", "compression.base_dtype=bf16"])
    ok.check_environment(world_size=1, has_cuda=False)  # fp32 training on CPU: W0 stays fp32
    # the bf16 pair's low word is a buffer ZeRO-3 would keep whole on every rank
    pair = load_train_config(None, ["train.zero_stage=3", "compression.base_dtype=bf16_pair"])
    with pytest.raises(ValueError, match="low word of a bf16-pair"):
        pair.check_environment(world_size=1, has_cuda=False)
    load_train_config(None, ["train.zero_stage=2", "compression.base_dtype=bf16_pair"]
                      ).check_environment(world_size=1, has_cuda=False)
