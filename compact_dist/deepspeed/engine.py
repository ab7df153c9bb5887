"""DeepSpeed wiring for Megatron-core models: the `mpu` adapter and engine construction.

The adapter answers DeepSpeed's model-parallel questions from megatron.core.parallel_state,
so ZeRO partitions over Megatron's data-parallel group and gradient-norm clipping counts
tensor-parallel shards once.
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core import parallel_state as ps


class MegatronMPU:
    """The subset of Megatron-LM's legacy `mpu` API that DeepSpeed calls (no pipeline)."""

    get_model_parallel_group = staticmethod(ps.get_model_parallel_group)
    get_tensor_model_parallel_group = staticmethod(ps.get_tensor_model_parallel_group)
    get_tensor_model_parallel_rank = staticmethod(ps.get_tensor_model_parallel_rank)
    get_tensor_model_parallel_world_size = staticmethod(ps.get_tensor_model_parallel_world_size)
    get_tensor_model_parallel_src_rank = staticmethod(ps.get_tensor_model_parallel_src_rank)
    get_data_parallel_group = staticmethod(ps.get_data_parallel_group)
    get_data_parallel_rank = staticmethod(ps.get_data_parallel_rank)
    get_data_parallel_world_size = staticmethod(ps.get_data_parallel_world_size)
    get_pipeline_model_parallel_world_size = staticmethod(
        ps.get_pipeline_model_parallel_world_size
    )
    get_pipeline_model_parallel_rank = staticmethod(ps.get_pipeline_model_parallel_rank)
    get_pipeline_model_parallel_group = staticmethod(ps.get_pipeline_model_parallel_group)

    @staticmethod
    def get_model_parallel_rank() -> int:
        return torch.distributed.get_rank(group=ps.get_model_parallel_group())

    @staticmethod
    def get_model_parallel_world_size() -> int:
        return torch.distributed.get_world_size(group=ps.get_model_parallel_group())


def initialize_engine(model: torch.nn.Module, optimizer, config: dict[str, Any],
                      lr_scheduler=None):
    """`deepspeed.initialize` for a Megatron model with compact layers; returns the engine.

    DeepSpeed's bf16/fp16 set-up casts every floating parameter's `.data` to the training dtype
    (bypassing Module._apply), which would turn a frozen `base_dtype: fp32` W0 into bf16. W0 has
    no gradient, master copy or optimizer state, so under ZeRO 0-2 its fp32 storage is simply
    put back after the cast. Under ZeRO-3 W0 is partitioned in the training dtype; the
    training config rejects that combination up front (use base_dtype bf16 there), and the
    bf16 pair, whose low word is a buffer ZeRO-3 would keep whole on every rank.

    At ZeRO-0 with bf16 DeepSpeed's FP16_UnfusedOptimizer keeps full fp32 masters of the
    parameters; the step it takes on zero gradients when built is undone (`_unprime`).

    Under ZeRO-3 the subspace factors A are taken out of DeepSpeed's per-module fetch (they
    are zero in every forward and backward of the training loop; see
    compact_dist.deepspeed.zero3_factor). Any stage3_param_persistence_threshold works (the
    merge updates the full copy DeepSpeed keeps of a persistent W0). Rejected: ZeRO-3
    options that keep other copies of the frozen W0 the merge would not update (hpZ
    secondary partitions, quantized frozen weights).
    """
    import deepspeed

    from compact_dist.core.subspace import compact_layers

    zero = config.get("zero_optimization", {}) if isinstance(config, dict) else {}
    if zero.get("stage") == 3 and any(layer.weight_lo is not None
                                      for layer in compact_layers(model)):
        raise ValueError("ZeRO-3 does not partition the low word of a bf16-pair W0 (a buffer): "
                         "use compression.base_dtype bf16 under ZeRO-3")
    if any(layer.subspace_factor is not None for layer in compact_layers(model)):
        for key, bad in (("zero_hpz_partition_size", lambda v: v > 1),
                         ("zero_quantized_nontrainable_weights", bool)):
            if key in zero and bad(zero[key]):
                raise ValueError(f"zero_optimization.{key}={zero[key]} keeps copies of the "
                                 "frozen W0 that the subspace merge does not update")
    bases = [(layer.weight, layer.weight.data) for layer in compact_layers(model)
             if layer.subspace_factor is not None]
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=lr_scheduler, config=config,
        mpu=MegatronMPU)
    for param, data in bases:
        if param.dtype != data.dtype:
            if hasattr(param, "ds_id"):
                raise ValueError(
                    f"ZeRO-3 partitioned W0 in {param.dtype}; compression.base_dtype must match "
                    "the training precision under ZeRO-3 (use base_dtype bf16 with bf16)")
            param.data = data.to(param.device)
    if zero.get("stage") == 3:
        from compact_dist.deepspeed.zero3_factor import keep_factors_out_of_fetch

        keep_factors_out_of_fetch(engine.module)
    _unprime(engine.optimizer)
    return engine


def _unprime(optimizer) -> None:
    """Undo the step DeepSpeed's FP16_UnfusedOptimizer (ZeRO-0 with bf16) takes on zero
    gradients when it is built: AdamW's step count would start at 1 (the first real update
    0.74x Adam's at betas 0.9 / 0.95) and the fp32 masters of decayed parameters would shrink
    once by 1 - lr wd. Empty states and masters copied from the parameters: ZeRO-0 then
    trains as ZeRO 1-3 and a torch optimizer do."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    if isinstance(optimizer, FP16_UnfusedOptimizer):
        optimizer.optimizer.state.clear()
        optimizer.refresh_fp32_params()


def deepspeed_config(
    *,
    zero_stage: int,
    micro_batch_size: int,
    gradient_accumulation_steps: int,
    data_parallel_size: int,
    bf16: bool,
    grad_clip: float,
    offload_optimizer: str = "none",
    offload_pin_memory: bool = True,
) -> dict[str, Any]:
    """DeepSpeed JSON config for a client (torch) optimizer and scheduler.

    offload_optimizer "cpu" (ZeRO 1-3): ZeRO-Offload keeps this rank's fp32 masters, their
    Adam moments and (ZeRO 1-2) the fp32 gradient partition in host memory (page-locked
    with offload_pin_memory), and the client torch optimizer steps them on the CPU:
    `zero_force_ds_cpu_optimizer: false` lets DeepSpeed take a torch optimizer there (by
    default it insists on DeepSpeedCPUAdam, a C++ op built by JIT with g++ and ninja; torch's
    fused CPU AdamW measured as fast, and its numerics are the GPU run's). The subspace
    merge finds the masters where they are (compact_dist.deepspeed.backend)."""
    if offload_optimizer not in ("none", "cpu"):
        raise ValueError(f"offload_optimizer={offload_optimizer!r}: none or cpu")
    if offload_optimizer != "none" and zero_stage == 0:
        raise ValueError(f"offload_optimizer={offload_optimizer} needs ZeRO stage 1, 2 or 3")
    offload = ({"offload_optimizer": {"device": offload_optimizer,
                                      "pin_memory": offload_pin_memory}}
               if offload_optimizer != "none" else {})
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "train_batch_size": micro_batch_size * gradient_accumulation_steps * data_parallel_size,
        "gradient_clipping": grad_clip,
        "bf16": {"enabled": bf16},
        "zero_optimization": {
            "stage": zero_stage,
            "overlap_comm": False,
            "contiguous_gradients": True,
            "reduce_bucket_size": 50_000_000,
            "allgather_bucket_size": 50_000_000,
            "stage3_param_persistence_threshold": 0,
            **offload,
        },
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def use_deepspeed_checkpointing(seed: int) -> None:
    """Route Megatron's activation recompute through deepspeed.checkpointing.

    Megatron-core calls `tensor_parallel.checkpoint(fn, distribute_saved_activations, *args)`
    for full and selective recompute; this points that name at DeepSpeed's checkpoint, and
    makes DeepSpeed's RNG tracker the one Megatron's dropout forks, so DeepSpeed's replay
    restores the states the forward used (as Megatron-DeepSpeed does).
    """
    import deepspeed
    from deepspeed.runtime.activation_checkpointing import checkpointing as ds_ckpt
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel import random as mpu_random

    deepspeed.checkpointing.configure(MegatronMPU, partition_activations=False)
    ds_ckpt.model_parallel_cuda_manual_seed(seed)
    mpu_random._CUDA_RNG_STATE_TRACKER = ds_ckpt.get_cuda_rng_tracker()
    mpu_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True

    def checkpoint(function, distribute_saved_activations, *args):
        return deepspeed.checkpointing.checkpoint(function, *args)

    tensor_parallel.checkpoint = checkpoint
