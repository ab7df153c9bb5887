"""Megatron-LM's training loop as a client (compact_dist.megatron.megatron_lm), on CPU: the
spec object `--spec` hands to GPTModel, the settings read from COMPACT_DIST_CONFIG, and the
merge install() adds after megatron.training.training.train_step, through megatron-core's
optimizer classes (ChainedOptimizer around FP32Optimizer), against a plain torch loop.

Megatron-LM itself (megatron.training) is not a dependency and needs a GPU (its initialize
asserts CUDA; the mixed-precision optimizers accept CUDA tensors only): the tests stand in a
module for megatron.training.training whose train_step does what Megatron-LM's does around
the optimizer (forward/backward, optimizer.step, skipped_iter in the returned tuple). The
run of Megatron-LM's own pretrain_gpt.py is a GPU job (issue 26 item 6).
"""

import sys
import types

import pytest
import torch

from test_zero import LR, WD

STEPS = 6


def _compression():
    from compact_dist import CompressionConfig

    return CompressionConfig(ratio=0.5, resample_interval=2, moments_on_resample="transport",
                             projection="pca")


def test_spec_object_through_megatrons_import_module_builds_compact_layers(megatron_tp1):
    """`--spec compact_dist.megatron.megatron_lm compact_gpt_layer_spec`: Megatron's
    import_module returns the object itself (no call), and GPTModel builds compact linears
    and compact_dist's norms from it."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.spec_utils import ModuleSpec, import_module

    from compact_dist.core.layers import CompactColumnParallelLinear, CompactRowParallelLinear
    from gpt_utils import SEQ, VOCAB, tiny_config

    spec = import_module(["compact_dist.megatron.megatron_lm", "compact_gpt_layer_spec"])
    assert isinstance(spec, ModuleSpec)
    model = GPTModel(config=tiny_config(), transformer_layer_spec=spec, vocab_size=VOCAB,
                     max_sequence_length=SEQ, position_embedding_type="learned_absolute")
    layer = model.decoder.layers[0]
    assert isinstance(layer.self_attention.linear_qkv, CompactColumnParallelLinear)
    assert isinstance(layer.mlp.linear_fc2, CompactRowParallelLinear)
    # SequenceParallelTorchNorm's norm: torch's RMSNorm, parameters tagged for the TP sum
    assert isinstance(layer.input_layernorm, torch.nn.RMSNorm)
    assert hasattr(layer.pre_mlp_layernorm.weight, "sequence_parallel")


def test_settings_come_from_the_yaml_compact_dist_config_names(tmp_path, monkeypatch):
    from compact_dist.megatron.megatron_lm import CONFIG_ENV, settings_from_environment

    monkeypatch.delenv(CONFIG_ENV, raising=False)
    assert settings_from_environment()[0].ratio == 0.25  # the defaults
    path = tmp_path / "run.yaml"
    path.write_text("model: {num_layers: 2}\ncompression: {ratio: 0.125, projection: gaussian}"
                    "\nactivations: {fp8_storage: [swiglu]}\n")
    monkeypatch.setenv(CONFIG_ENV, str(path))
    compression, activations = settings_from_environment()
    assert (compression.ratio, compression.projection) == (0.125, "gaussian")
    assert activations.fp8_storage == ["swiglu"]
    path.write_text("activations: {fused_cross_entropy: true}\n")  # no effect on this path
    with pytest.raises(ValueError, match="fused_cross_entropy has no effect"):
        settings_from_environment()
    path.write_text("compression: {ratio: 0.125, no_such_key: 1}\n")
    with pytest.raises(ValueError, match="no_such_key"):
        settings_from_environment()


def _megatron_groups(model):
    """Megatron's param groups (optimizer/__init__.py _get_param_groups): matrices decayed,
    1-D parameters not, frozen parameters (W0) left out."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() > 1], "weight_decay": WD},
            {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0}]


def _lr(step):
    """A schedule that changes every step, as Megatron's scheduler does after each update."""
    return LR * (STEPS - step) / STEPS


def _reference(skip_at=None):
    """Plain torch loop: AdamW over Megatron's groups, the merge after each update at the
    step's learning rate."""
    from compact_dist import SubspaceStepper
    from gpt_utils import loss_of, text_batch, tiny_gpt

    model = tiny_gpt(_compression())
    opt = torch.optim.AdamW(_megatron_groups(model), lr=_lr(0))
    stepper = SubspaceStepper(model, _compression())
    losses, updates = [], 0
    for step in range(STEPS):
        loss = loss_of(model, text_batch(batch=4, seed=step))
        opt.zero_grad()
        loss.backward()
        if step != skip_at:
            opt.step()
            stepper.after_step(_lr(updates), WD, opt)
            updates += 1
            for group in opt.param_groups:
                group["lr"] = _lr(updates)
        losses.append(loss.item())
    return losses, model


def _fake_megatron_training(monkeypatch, train_step):
    """A stand-in megatron.training.training holding `train_step`; install()'s global
    changes (the merge, the backend's factors, megatron-core's LayerNormImpl) undone after
    the test."""
    import megatron.core.transformer.transformer_block as transformer_block

    import compact_dist.megatron.megatron_lm as client

    fake = types.ModuleType("megatron.training.training")
    fake.train_step = train_step
    monkeypatch.setitem(sys.modules, "megatron.training", types.ModuleType("megatron.training"))
    monkeypatch.setitem(sys.modules, "megatron.training.training", fake)
    monkeypatch.setattr(client, "_MERGE", None)
    monkeypatch.setattr(client.MEGATRON_LM_BACKEND, "factors", [])
    monkeypatch.setattr(transformer_block, "LayerNormImpl", transformer_block.LayerNormImpl)
    return fake


class _Wrapper(torch.nn.Module):
    """Megatron's DDP / Float16Module: the model under `.module`."""

    def __init__(self, module):
        super().__init__()
        self.module = module


def _megatron_lm_run(monkeypatch, skip_at=None):
    """The same steps through install(): a stand-in megatron.training.training whose
    train_step runs forward/backward and steps megatron-core's ChainedOptimizer(FP32Optimizer)
    (constructed without its CUDA loss-scale tensor), returning skipped_iter at index 1."""
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.optimizer.optimizer import (
        ChainedOptimizer,
        FP32Optimizer,
        MegatronOptimizer,
    )

    import compact_dist.megatron.megatron_lm as client
    from gpt_utils import loss_of, text_batch, tiny_config, tiny_gpt

    model = tiny_gpt(_compression())
    fp32 = FP32Optimizer.__new__(FP32Optimizer)
    MegatronOptimizer.__init__(fp32, torch.optim.AdamW(_megatron_groups(model), lr=_lr(0)),
                               OptimizerConfig(lr=LR, weight_decay=WD))
    optimizer = ChainedOptimizer([fp32])
    losses, updates = [], [0]

    def train_step(forward_step_func, data_iterator, model_chunks, opt, scheduler, config,
                   forward_backward_func, iteration=None):
        inner = opt.chained_optimizers[0].optimizer
        loss = loss_of(model_chunks[0].module, next(data_iterator))
        inner.zero_grad()
        loss.backward()
        losses.append(loss.item())
        skipped = int(iteration == skip_at)
        if not skipped:
            inner.step()
            updates[0] += 1
            for group in inner.param_groups:  # the scheduler, after the update
                group["lr"] = _lr(updates[0])
        return {}, skipped, False, False, 0, None, None, 0

    fake = _fake_megatron_training(monkeypatch, train_step)
    client.install(_compression())
    wrapped = fake.train_step
    assert wrapped is not train_step
    client.install(_compression())  # idempotent: wrapped once
    assert fake.train_step is wrapped
    data = iter([text_batch(batch=4, seed=step) for step in range(STEPS)])
    for step in range(STEPS):
        fake.train_step(None, data, [_Wrapper(model)], optimizer, None, tiny_config(), None,
                        iteration=step)
    return losses, model


@pytest.mark.parametrize("skip_at", [None, 3])
def test_megatron_lm_train_step_merges_as_the_plain_loop(megatron_tp1, monkeypatch, skip_at):
    """Losses and every parameter (W0 after the merges, the bases P) of the install()ed
    loop equal the plain loop's, resamples with moment transport included; a skipped
    iteration (no update) merges nothing."""
    from compact_dist import compact_layers

    ref_losses, ref = _reference(skip_at)
    losses, model = _megatron_lm_run(monkeypatch, skip_at)
    assert losses == pytest.approx(ref_losses, rel=1e-6, abs=1e-6)
    for (name, a), (_, b) in zip(ref.state_dict().items(), model.state_dict().items()):
        if torch.is_tensor(a):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), name
    assert all(not layer.subspace_factor.any() for layer in compact_layers(model))  # merged


def test_distributed_optimizer_and_resume_are_refused(megatron_tp1, monkeypatch):
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.optimizer.optimizer import ChainedOptimizer

    import compact_dist.megatron.megatron_lm as client
    from gpt_utils import tiny_gpt

    model = tiny_gpt(_compression())
    factor = next(layer.subspace_factor for layer in client.MegatronLMMerge(
        [model], _compression(), None).layers)
    distributed = DistributedOptimizer.__new__(DistributedOptimizer)
    distributed.optimizer = torch.optim.AdamW([factor])
    with pytest.raises(ValueError, match="--use-distributed-optimizer is not supported"):
        client.MEGATRON_LM_BACKEND.master_slices(ChainedOptimizer([distributed]), [factor])
    with pytest.raises(ValueError, match="resuming is not supported"):
        client.MegatronLMMerge([model], _compression(), 100)


def test_install_builds_a_final_norm_that_takes_sequence_parallelism(megatron_tp1,
                                                                    monkeypatch):
    """Megatron builds the final norm of a layer-spec model from LayerNormImpl, whose torch
    fallback asserts on sequence_parallel: after install() it is compact_dist's norm."""
    from megatron.core.models.gpt import GPTModel

    import compact_dist.megatron.megatron_lm as client
    from gpt_utils import SEQ, VOCAB, tiny_config

    def build():
        config = tiny_config()
        config.sequence_parallel = True  # as at TP > 1 (the config refuses it at TP = 1)
        return GPTModel(config=config,
                        transformer_layer_spec=client.compact_gpt_layer_spec, vocab_size=VOCAB,
                        max_sequence_length=SEQ, position_embedding_type="learned_absolute")

    _fake_megatron_training(monkeypatch, lambda *a, **k: None)
    with pytest.raises(AssertionError, match="sequence parallel"):
        build()  # megatron-core's own final norm
    client.install(_compression())
    model = build()
    assert model.decoder.final_layernorm.weight.sequence_parallel


def test_bf16_master_keeps_only_the_rounding_residual(megatron_tp1, monkeypatch):
    """--bf16: megatron-core's Float16OptimizerWithFloat16Params (its gradient copy and step;
    built without its CUDA type check) steps A.main_param and copies it to the bf16 A; after
    each merge A is zero and its master holds only what bf16 rounded away, W0 stays fp32, and
    the Adam state lives on the master and is transported at each new P."""
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.optimizer.optimizer import (
        ChainedOptimizer,
        Float16OptimizerWithFloat16Params,
        MegatronOptimizer,
    )

    import compact_dist.megatron.megatron_lm as client
    from compact_dist import compact_layers
    from gpt_utils import loss_of, text_batch, tiny_config, tiny_gpt

    model = tiny_gpt(_compression()).bfloat16()
    layers = compact_layers(model)
    assert all(layer.weight.dtype == torch.float32 for layer in layers)  # W0 kept
    inner = torch.optim.AdamW(_megatron_groups(model), lr=1e-2)
    f16 = Float16OptimizerWithFloat16Params.__new__(Float16OptimizerWithFloat16Params)
    MegatronOptimizer.__init__(f16, inner, OptimizerConfig(lr=1e-2, weight_decay=WD, bf16=True))
    f16.grad_scaler, f16._dummy_overflow_buf, f16.is_stub_optimizer = None, None, False
    f16.float16_groups, f16.fp32_from_float16_groups, f16.fp32_from_fp32_groups = [], [], []
    for group in inner.param_groups:  # what its constructor does on a GPU
        low, main = [], []
        for i, p in enumerate(group["params"]):
            group["params"][i] = p.main_param = p.detach().clone().float()
            low.append(p)
            main.append(p.main_param)
        f16.float16_groups.append(low)
        f16.fp32_from_float16_groups.append(main)
        f16.fp32_from_fp32_groups.append([])
    transported = []

    def train_step(forward_step_func, data_iterator, model_chunks, opt, scheduler, config,
                   forward_backward_func, iteration=None):
        loss = loss_of(model_chunks[0].module, next(data_iterator))
        f16.zero_grad()
        loss.backward()
        f16._copy_model_grads_to_main_grads()
        f16.step_with_ready_grads()  # inner step, then main -> bf16 model copy
        transported.append(inner.state[layers[0].subspace_factor.main_param]["exp_avg"].clone())
        return {}, 0, False, False, 0, None, None, 0

    fake = _fake_megatron_training(monkeypatch, train_step)
    client.install(_compression())
    data = iter([text_batch(batch=4, seed=step) for step in range(STEPS)])
    for step in range(STEPS):
        fake.train_step(None, data, [_Wrapper(model)], ChainedOptimizer([f16]), None,
                        tiny_config(bf16=True), None, iteration=step)
        for layer in layers:
            a = layer.subspace_factor
            assert a.dtype == torch.bfloat16 and not a.any()  # merged
            residual = a.main_param.abs().max().item()
            assert 0 < residual < 1e-4, residual  # an update is ~lr = 1e-2
    state = inner.state[layers[0].subspace_factor.main_param]
    assert not torch.equal(state["exp_avg"], transported[-1])  # moved to the new P


@pytest.mark.parametrize("case", ["fp16", "qk_layernorm", "sgd", "groups"])
def test_unsupported_settings_are_refused_at_the_first_step(megatron_tp1, monkeypatch, case):
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.optimizer.optimizer import ChainedOptimizer, FP32Optimizer, MegatronOptimizer

    import compact_dist.megatron.megatron_lm as client
    from gpt_utils import tiny_config, tiny_gpt

    model = tiny_gpt(_compression())
    groups = _megatron_groups(model)
    if case == "groups":  # one A in a group of its own rate
        a = next(p for p in groups[0]["params"] if p.dim() == 2 and p.shape[1] < 64)
        groups[0]["params"] = [p for p in groups[0]["params"] if p is not a]
        groups.append({"params": [a], "weight_decay": WD, "lr": 2 * LR})
    inner = (torch.optim.SGD(groups, lr=LR) if case == "sgd"
             else torch.optim.AdamW(groups, lr=LR))
    fp32 = FP32Optimizer.__new__(FP32Optimizer)
    MegatronOptimizer.__init__(fp32, inner, OptimizerConfig(lr=LR))
    config = tiny_config(**({case: True} if case in ("fp16", "qk_layernorm") else {}))
    fake = _fake_megatron_training(monkeypatch, lambda *a, **k: pytest.fail("stepped"))
    client.install(_compression())
    expected = {"fp16": "--fp16", "qk_layernorm": "--qk-layernorm", "sgd": "only Adam",
                "groups": "different"}[case]
    with pytest.raises(ValueError, match=expected):
        fake.train_step(None, iter([]), [_Wrapper(model)], ChainedOptimizer([fp32]), None,
                        config, None, iteration=0)


def test_packaged_dataset_helpers_replace_the_make_only_without_a_makefile(tmp_path,
                                                                            monkeypatch):
    """Megatron-LM's initialize runs `make` in megatron/core/datasets; the wheel has no
    Makefile but ships helpers_cpp compiled: install() makes compile_helpers that import,
    and leaves a source checkout's (with its Makefile) alone."""
    import megatron.core.datasets.utils as dataset_utils

    from compact_dist.megatron.megatron_lm import use_packaged_dataset_helpers

    original = dataset_utils.compile_helpers
    monkeypatch.setattr(dataset_utils, "compile_helpers", original)
    (tmp_path / "utils.py").write_text("")
    monkeypatch.setattr(dataset_utils, "__file__", str(tmp_path / "utils.py"))
    (tmp_path / "Makefile").write_text("all:\n")
    use_packaged_dataset_helpers()
    assert dataset_utils.compile_helpers is original
    (tmp_path / "Makefile").unlink()
    use_packaged_dataset_helpers()
    assert dataset_utils.compile_helpers is not original
    dataset_utils.compile_helpers()  # imports the wheel's helpers_cpp, runs no make
    monkeypatch.setitem(sys.modules, "megatron.core.datasets.helpers_cpp", None)
    monkeypatch.delattr(sys.modules["megatron.core.datasets"], "helpers_cpp", raising=False)
    with pytest.raises(ImportError):
        dataset_utils.compile_helpers()
