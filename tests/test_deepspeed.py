"""DeepSpeed correctness of the compact layers (CPU, gloo, 2 data-parallel ranks) against a
single-process torch run on the full batch:

- forward is exact between engine.step() and the merge (DeepSpeed writes A through `.data`,
  which a version counter does not see), and free of the A P^T term in the usual loop;
- ZeRO-3 with DeepSpeed's default stage3_param_persistence_threshold (W0 and A stay fully
  materialised and forward uses those copies; a no-grad forward leaves the others gathered
  too) and with partitions that start mid-row;
- after every merge every copy of A is zero (module tensor, ZeRO-3 partition, fp32 master);
- ZeRO 0-3, unbiased mode under ZeRO-1/3, bf16 under ZeRO-2/3.

The model has odd row counts (hidden 45), so each rank's ZeRO-3 partition of most W0 starts
in the middle of a row. Several engines run one after the other in the same processes.
"""

import pytest
import torch

from distributed import run_distributed

STEPS, LR = 3, 3e-3
# hidden 45 (3 heads of 15): W0 of qkv [135, 45], proj [45, 45], fc2 [45, 128] have an odd
# number of elements; a ZeRO-3 partition over 2 ranks (ceil(numel / 2)) starts mid-row
SHAPE = dict(hidden_size=45, num_attention_heads=3, ffn_hidden_size=128)
DEFAULT = "default"  # DeepSpeed's own stage3_param_persistence_threshold (1e5 elements)


def _compression(mode, base_dtype="fp32"):
    from compact_dist import CompressionConfig

    # the seeded Gaussian P: what is under test here is ZeRO's exactness, and a data-aware P
    # estimated from 2 ranks' sums differs from the full batch's in the last fp32 bits
    # (tests/test_zero.py and test_basis.py cover data-aware P under ZeRO)
    return CompressionConfig(ratio=0.25, resample_interval=2, mode=mode, row_parallel_blocks=1,
                             base_dtype=base_dtype, projection="gaussian",
                             moments_on_resample="keep")


def _eval_batch():
    from gpt_utils import text_batch

    return text_batch(batch=2, seed=99)


def _reference(mode, weight_decay):
    """(train loss, eval loss before the merge, eval loss after it) per step, full batch."""
    from compact_dist import SubspaceStepper, optimizer_param_groups
    from gpt_utils import loss_of, text_batch, tiny_gpt

    model = tiny_gpt(_compression(mode), **SHAPE)
    opt = torch.optim.AdamW(optimizer_param_groups(model, weight_decay), lr=LR)
    stepper = SubspaceStepper(model, _compression(mode))
    out = []
    for step in range(STEPS):
        loss = loss_of(model, text_batch(batch=4, seed=step))
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            before = loss_of(model, _eval_batch()).item()
        stepper.after_step(LR, weight_decay, opt)
        with torch.no_grad():
            after = loss_of(model, _eval_batch()).item()
        out.append((loss.item(), before, after))
    return out


def _check_factors_zero(layers, stage, bf16):
    """Every copy of every A is zero after the merge."""
    from deepspeed.utils import safe_get_full_fp32_param

    for layer in layers:
        factor = layer.subspace_factor
        assert layer.factor_is_zero
        assert not factor.any()  # the module's tensor (empty while partitioned)
        master = safe_get_full_fp32_param(factor)
        if stage == 3:
            assert not factor.ds_tensor.any()  # what the next gather of A returns
            assert not master.any()
        elif master is not None:
            # ZeRO 1-2 (and bf16 ZeRO-0): the fp32 master keeps only what the bf16 copy
            # rounded away, zero in fp32
            assert not master.any() or bf16
    if stage == 3:
        import deepspeed

        factors = [layer.subspace_factor for layer in layers]
        with deepspeed.zero.GatheredParameters(factors):
            assert not any(f.any() for f in factors)


def _check_full_copies_match_partitions(layers):
    """Where DeepSpeed holds W0 whole (persistent, or left gathered by a no-grad forward),
    that copy, which forward uses, is bit for bit the partitions: the same on every rank."""
    import torch.distributed as dist

    for layer in layers:
        w0 = layer.weight
        parts = [torch.empty_like(w0.ds_tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, w0.ds_tensor.contiguous())
        if w0.numel():  # held (not released just before the merge)
            assert torch.equal(torch.cat(parts)[:w0.ds_numel], w0.detach().view(-1))


def _engine_runs(rank, runs, expected, weight_decay):
    """runs: (stage, persistence threshold or DEFAULT, mode, bf16) per engine."""
    import logging

    from megatron.core import parallel_state as ps

    from compact_dist import SubspaceStepper, compact_layers, optimizer_param_groups
    from compact_dist.deepspeed.engine import deepspeed_config, initialize_engine
    from gpt_utils import loss_of, text_batch, tiny_gpt

    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    dp = ps.get_data_parallel_world_size()
    for (stage, persistence, mode, bf16), reference in zip(runs, expected):
        what = f"stage {stage} persistence {persistence} {mode} bf16={bf16}"
        base = "bf16" if bf16 and stage == 3 else "fp32"
        model = tiny_gpt(_compression(mode, base), **SHAPE)
        opt = torch.optim.AdamW(optimizer_param_groups(model, weight_decay), lr=LR)
        config = deepspeed_config(zero_stage=stage, micro_batch_size=2,
                                  gradient_accumulation_steps=1, data_parallel_size=dp,
                                  bf16=bf16, grad_clip=0.0)
        if persistence == DEFAULT:
            del config["zero_optimization"]["stage3_param_persistence_threshold"]
        else:
            config["zero_optimization"]["stage3_param_persistence_threshold"] = persistence
        engine = initialize_engine(model, opt, config)
        layers = [l for l in compact_layers(engine.module) if l.subspace_factor is not None]
        assert bool(layers) == (mode == "subspace")
        for layer in layers:  # trained in bf16; W0 in its base dtype
            assert layer.subspace_factor.dtype == (torch.bfloat16 if bf16 else torch.float32)
            assert layer.weight.dtype == (torch.bfloat16 if base == "bf16" else torch.float32)
        if stage == 3 and layers:
            w0s = [l.weight for l in layers]
            if persistence == DEFAULT:  # W0 and A stay whole on every rank once gathered
                assert all(l.weight.ds_persist and l.subspace_factor.ds_persist
                           for l in layers), what
            else:
                assert not any(w.ds_persist for w in w0s)
                # some partitions start mid-row (the merge slices A P^T at an offset)
                assert any(w.ds_tensor.ds_numel % w.ds_shape[1] for w in w0s), what
        stepper = SubspaceStepper(engine.module, _compression(mode, base))
        got = []
        for step in range(STEPS):
            # the usual loop (merge right after each step): forward skips the A P^T term
            assert all(l.factor_is_zero for l in layers), what
            tokens, positions, labels = text_batch(batch=4, seed=step)
            mine = slice(2 * rank, 2 * rank + 2)
            loss = engine(tokens[mine], positions[mine], None, labels=labels[mine]).float().mean()
            engine.backward(loss)
            engine.step()
            assert not any(l.factor_is_zero for l in layers), what  # A was written
            if stage == 3 and persistence == DEFAULT:  # forward uses these full copies
                assert all(p.numel() == p.ds_numel
                           for l in layers for p in (l.weight, l.subspace_factor)), what
            with torch.no_grad():
                before = loss_of(engine, _eval_batch()).item()
            if stage == 3 and layers:
                # a no-grad forward leaves every parameter gathered: the merge updates the
                # full W0 that the next forward would use; on odd steps, released first, it
                # updates only the partitions
                if step % 2:
                    engine.empty_partition_cache()
                held = [l.weight.numel() == l.weight.ds_numel for l in layers]
                assert all(held) if step % 2 == 0 else not any(held), what
            stepper.after_step(LR, weight_decay, engine.optimizer)
            if layers:
                _check_factors_zero(layers, stage, bf16)
            if stage == 3 and layers:
                _check_full_copies_match_partitions(layers)
            with torch.no_grad():
                after = loss_of(engine, _eval_batch()).item()
            total = loss.detach().float().clone()
            torch.distributed.all_reduce(total)
            got.append((total.item() / dp, before, after))
        if bf16:
            # bf16 activations and weights: the fp32 reference to bf16 accuracy; the merge
            # keeps the function to the rounding of W0 (stochastic, bf16 W0) or of the delta
            for (loss, before, after), ref in zip(got, reference):
                assert loss == pytest.approx(ref[0], rel=1e-3), (what, got, reference)
                assert after == pytest.approx(ref[2], rel=1e-3), (what, got, reference)
                assert after == pytest.approx(before, rel=1e-4), (what, got)
            assert got[-1][2] < got[0][1], (what, got)  # it trains
        else:
            for (loss, before, after), ref in zip(got, reference):
                # between engine.step() and the merge forward already includes A
                assert before == pytest.approx(after, rel=1e-6, abs=1e-6), (what, got)
            flat = [v for row in got for v in row]
            assert flat == pytest.approx([v for row in reference for v in row], rel=1e-5,
                                         abs=1e-6), (what, got, reference)


@pytest.fixture(scope="module")
def subspace_reference(megatron_tp1):
    return _reference("subspace", 0.0)


def test_forward_exact_before_merge_zero_0_to_3_persistent_and_mid_row(subspace_reference):
    """No weight decay, so the merge leaves the function unchanged: the eval loss between
    engine.step() and the merge equals the one after it (1e-6), at every ZeRO stage."""
    runs = [(0, 0, "subspace", False), (1, 0, "subspace", False), (2, 0, "subspace", False),
            (3, 0, "subspace", False), (3, DEFAULT, "subspace", False)]
    run_distributed(_engine_runs, 2, runs, [subspace_reference] * len(runs), 0.0, tp=1)


def test_unbiased_mode_under_zero_1_and_3(megatron_tp1):
    reference = _reference("unbiased", 0.01)
    runs = [(1, 0, "unbiased", False), (3, 0, "unbiased", False)]
    run_distributed(_engine_runs, 2, runs, [reference] * len(runs), 0.01, tp=1)


def test_bf16_under_zero_2_and_3(subspace_reference):
    """DeepSpeed accepts bf16 on CPU (its CPU accelerator reports bf16 support)."""
    runs = [(2, 0, "subspace", True), (3, 0, "subspace", True),
            (3, DEFAULT, "subspace", True)]
    run_distributed(_engine_runs, 2, runs, [subspace_reference] * len(runs), 0.0, tp=1)


@pytest.mark.parametrize("key, value", [("zero_hpz_partition_size", 2),
                                        ("zero_quantized_nontrainable_weights", True)])
def test_zero3_options_that_copy_w0_are_rejected(megatron_tp1, key, value):
    from compact_dist import optimizer_param_groups
    from compact_dist.deepspeed.engine import deepspeed_config, initialize_engine
    from gpt_utils import tiny_gpt

    model = tiny_gpt(_compression("subspace"))
    config = deepspeed_config(zero_stage=3, micro_batch_size=2, gradient_accumulation_steps=1,
                              data_parallel_size=1, bf16=False, grad_clip=0.0)
    config["zero_optimization"][key] = value
    opt = torch.optim.AdamW(optimizer_param_groups(model, 0.0), lr=LR)
    with pytest.raises(ValueError, match=key):
        initialize_engine(model, opt, config)


def test_zero3_rejects_a_bf16_pair_w0(megatron_tp1):
    """Its low word is a buffer: ZeRO-3 would keep it whole on every rank, and its merge
    updates partitions of the high word only."""
    from compact_dist import optimizer_param_groups
    from compact_dist.deepspeed.engine import deepspeed_config, initialize_engine
    from gpt_utils import tiny_gpt

    model = tiny_gpt(_compression("subspace", "bf16_pair"))
    config = deepspeed_config(zero_stage=3, micro_batch_size=2, gradient_accumulation_steps=1,
                              data_parallel_size=1, bf16=False, grad_clip=0.0)
    opt = torch.optim.AdamW(optimizer_param_groups(model, 0.0), lr=LR)
    with pytest.raises(ValueError, match="bf16-pair"):
        initialize_engine(model, opt, config)


def _local_merge_runs(rank):
    """ZeRO-3, fp32, 2 ranks, every W0 / A row count even: the merge is partition-local for
    every layer (no gather of A) and its W0 partitions equal, bit for bit, those of the
    gathered merge on the same run."""
    import logging

    import compact_dist.deepspeed.zero3_merge as subspace
    from compact_dist import SubspaceStepper, compact_layers, optimizer_param_groups
    from compact_dist.deepspeed.engine import deepspeed_config, initialize_engine
    from gpt_utils import text_batch, tiny_gpt

    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    shape = dict(hidden_size=48, num_attention_heads=3, ffn_hidden_size=128)
    results, paths = [], []
    original_align, original_local = subspace._rows_align, subspace._merge_partition_local
    for force_gather in (False, True):
        torch.manual_seed(0)
        model = tiny_gpt(_compression("subspace"), **shape)
        opt = torch.optim.AdamW(optimizer_param_groups(model, 0.01), lr=LR)
        config = deepspeed_config(zero_stage=3, micro_batch_size=2,
                                  gradient_accumulation_steps=1, data_parallel_size=2,
                                  bf16=False, grad_clip=0.0)
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        engine = initialize_engine(model, opt, config)
        layers = [l for l in compact_layers(engine.module) if l.subspace_factor is not None]
        stepper = SubspaceStepper(engine.module, _compression("subspace"))
        merged_locally = []

        def spy(local, lr, wd):
            merged_locally.extend(local)
            original_local(local, lr, wd)

        subspace._merge_partition_local = spy
        # DeepSpeed's fp32 accessors synchronize the host on every call: the merge reads
        # and zeroes the masters in place instead (both paths)
        z3, accessor_calls = engine.optimizer, []
        accessor = z3._get_fp32_opt_state_partition
        z3._get_fp32_opt_state_partition = lambda *a, **k: (accessor_calls.append(1),
                                                             accessor(*a, **k))[1]
        if force_gather:
            subspace._rows_align = lambda layer, world: False
        try:
            for step in range(2):
                tokens, positions, labels = text_batch(batch=4, seed=step)
                mine = slice(2 * rank, 2 * rank + 2)
                loss = engine(tokens[mine], positions[mine], None,
                              labels=labels[mine]).float().mean()
                engine.backward(loss)
                engine.step()
                before = len(accessor_calls)
                stepper.after_step(LR, 0.01, engine.optimizer)
                assert len(accessor_calls) == before, "the merge used DeepSpeed's accessor"
                _check_factors_zero(layers, 3, False)
        finally:
            subspace._rows_align, subspace._merge_partition_local = (original_align,
                                                                     original_local)
        paths.append(len(merged_locally))
        results.append([l.weight.ds_tensor.detach().clone() for l in layers])
    assert paths == [2 * len(layers), 0], paths
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_zero3_partition_local_merge_equals_the_gathered_merge(megatron_tp1):
    run_distributed(_local_merge_runs, 2, tp=1)


def test_partition_local_layers_have_partitions_on_row_boundaries():
    """Where the partition-local merge applies (_rows_align on every rank), every rank's W0
    and A partitions start on a row boundary (DeepSpeed's ceil(numel / world) partitions;
    the comment in _merge_partition_local): checked over small shapes and 2-5 ranks."""
    from types import SimpleNamespace

    from compact_dist.deepspeed.zero3_merge import _rows_align

    def param(rows, cols, world):
        numel = rows * cols
        return SimpleNamespace(ds_numel=numel, ds_shape=(rows, cols),
                               ds_tensor=SimpleNamespace(ds_numel=-(-numel // world)))

    aligned = 0
    for world in range(2, 6):
        for rows in range(1, 24):
            for n in (4, 6, 9, 16):
                for r in range(1, n + 1):
                    layer = SimpleNamespace(weight=param(rows, n, world),
                                            subspace_factor=param(rows, r, world))
                    if not _rows_align(layer, world):
                        continue
                    aligned += 1
                    for p in (layer.weight, layer.subspace_factor):
                        starts = [min(k * p.ds_tensor.ds_numel, p.ds_numel)
                                  for k in range(world)]
                        assert all(s % p.ds_shape[1] == 0 for s in starts), (world, rows, n, r)
    assert aligned > 100
