"""Gradients of sequence-parallel parameters under an engine that is not Megatron's DDP.

Megatron-core marks parameters applied to sequence-sharded activations (norm weights,
row-parallel biases) `sequence_parallel=True` and sums their gradients over the tensor-parallel
group in its own DDP (finalize_model_grads); DeepSpeed ZeRO does not, so the model gets gradient
hooks that do it. (compact-train refuses sequence parallelism with train.engine=fsdp2: FSDP2
replaces the parameters these hooks sit on.)
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state as ps


def allreduce_sequence_parallel_grads(model: torch.nn.Module) -> int:
    """Sum the gradients of sequence-parallel parameters over the tensor-parallel group.

    With sequence parallelism each TP rank sees only its slice of the sequence, so parameters
    applied to sequence-sharded activations (norm weights, row-parallel biases; Megatron marks
    them `sequence_parallel=True`) get partial gradients. Megatron's own DDP all-reduces them in
    finalize_model_grads; DeepSpeed does not know about them. This registers a tensor hook on
    each such parameter that all-reduces its gradient over the TP group *before* it is
    accumulated, so the engine (DeepSpeed's post-accumulation hooks at any ZeRO stage) and
    clipping see the full gradient; the gradients live on the tensor-parallel group's ranks.
    Returns the number of hooked parameters (0 without sequence parallelism).
    """
    if ps.get_tensor_model_parallel_world_size() == 1:
        return 0
    group = ps.get_tensor_model_parallel_group()

    def summed(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        torch.distributed.all_reduce(grad, group=group)
        return grad

    hooked = 0
    for param in model.parameters():
        if param.requires_grad and getattr(param, "sequence_parallel", False):
            param.register_hook(summed)
            hooked += 1
    return hooked
