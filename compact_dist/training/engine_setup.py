"""The training engine of `train.engine` built from a TrainConfig: AdamW over Megatron's
parameter groups and the subspace group (compact_dist.core.subspace.optimizer_param_groups),
the warm-up + cosine learning-rate schedule, the engine (DeepSpeed ZeRO: compact_dist.deepspeed
.engine; torch FSDP2: compact_dist.fsdp) behind the training-engine interface
(engine_deepspeed.py, engine_fsdp.py) and the SubspaceStepper that merges after each step.
The engine classes take built objects and know no TrainConfig; this module is the one place
that turns the config into them, for both engines."""

from __future__ import annotations

import math

import torch

from compact_dist.training.train_config import TrainConfig


def lr_lambda(cfg: TrainConfig):
    o, steps = cfg.optim, cfg.train.train_steps

    def factor(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / (o.warmup_steps + 1)
        progress = min(1.0, (step - o.warmup_steps) / max(1, steps - o.warmup_steps))
        cosine = 0.5 * (1 + math.cos(math.pi * progress))
        return (o.min_lr + (o.lr - o.min_lr) * cosine) / o.lr

    return factor


def _adamw_and_schedule(cfg: TrainConfig, model: torch.nn.Module, schedule: bool,
                        fused: bool):
    """AdamW over Megatron's parameter groups + the subspace group
    (compact_dist.core.subspace.optimizer_param_groups) and, with `schedule`, the warm-up +
    cosine LambdaLR (else None: constant optim.lr). fused: torch's fused AdamW kernel."""
    from compact_dist.core.subspace import optimizer_param_groups

    optimizer = torch.optim.AdamW(
        optimizer_param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr,
        betas=(cfg.optim.beta1, cfg.optim.beta2), **({"fused": True} if fused else {}))
    scheduler = (torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
                 if schedule else None)
    return optimizer, scheduler


def build_engine(cfg: TrainConfig, model: torch.nn.Module, bf16: bool, data_parallel_size: int,
                 schedule: bool):
    """DeepSpeed engine (AdamW over Megatron's groups + the subspace group, ZeRO per cfg) and
    the SubspaceStepper that merges after each step. schedule: warm-up + cosine learning
    rate (else constant optim.lr)."""
    from compact_dist.deepspeed.engine import deepspeed_config, initialize_engine
    from compact_dist.core.subspace import SubspaceStepper

    optimizer, scheduler = _adamw_and_schedule(
        cfg, model, schedule, fused=next(model.parameters()).is_cuda)
    ds_config = deepspeed_config(
        zero_stage=cfg.train.zero_stage, micro_batch_size=cfg.train.micro_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps(data_parallel_size),
        data_parallel_size=data_parallel_size, bf16=bf16, grad_clip=cfg.optim.grad_clip,
        offload_optimizer=cfg.train.offload_optimizer,
        offload_pin_memory=cfg.train.offload_pin_memory)
    engine = initialize_engine(model, optimizer, ds_config, lr_scheduler=scheduler)
    return engine, SubspaceStepper(engine.module, cfg.compression)


def build_fsdp2_engine(cfg: TrainConfig, model: torch.nn.Module, device: torch.device,
                       data_parallel_size: int, schedule: bool):
    """torch FSDP2 engine (compact_dist.fsdp: fully_shard per transformer layer over
    Megatron's data-parallel group; AdamW over the sharded parameters in Megatron's groups +
    the subspace group) and the SubspaceStepper; as build_engine, fp32."""
    from compact_dist.core.subspace import SubspaceStepper
    from compact_dist.fsdp.shard import shard_model, tensor_parallel_duplicates
    from compact_dist.training.engine_fsdp import FSDP2TrainingEngine

    duplicates = tensor_parallel_duplicates(model)
    shard_model(model, device, reshard_after_forward=cfg.train.zero_stage == 3)
    optimizer, scheduler = _adamw_and_schedule(cfg, model, schedule, fused=False)
    engine = FSDP2TrainingEngine(model, optimizer, scheduler,
                                 cfg.gradient_accumulation_steps(data_parallel_size),
                                 cfg.optim.grad_clip, device, duplicates)
    return engine, SubspaceStepper(model, cfg.compression)


def build_training_engine(cfg: TrainConfig, model: torch.nn.Module, bf16: bool,
                          device: torch.device, data_parallel_size: int):
    """The engine of train.engine behind the training-engine interface
    (compact_dist.training.engine_base), with the warm-up + cosine schedule, and its
    SubspaceStepper."""
    if cfg.train.engine == "fsdp2":
        return build_fsdp2_engine(cfg, model, device, data_parallel_size, schedule=True)
    from compact_dist.training.engine_deepspeed import DeepSpeedTrainingEngine

    engine, stepper = build_engine(cfg, model, bf16, data_parallel_size, schedule=True)
    return DeepSpeedTrainingEngine(engine), stepper
