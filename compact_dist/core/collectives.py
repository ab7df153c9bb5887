"""First-dimension all-gather / reduce-scatter over the tensor-parallel group.

Megatron-core's sequence-parallel mappings allocate their outputs on
torch.cuda.current_device(); these allocate on the input's device, so the same code runs on
GPUs (NCCL) and on CPU (gloo) in tests.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def all_gather_first_dim(x: torch.Tensor, group: dist.ProcessGroup, async_op: bool = False):
    """[s/tp, ...] on each rank -> [s, ...] (rank order). Returns (out, handle or None)."""
    world = dist.get_world_size(group)
    out = torch.empty((x.shape[0] * world, *x.shape[1:]), dtype=x.dtype, device=x.device)
    handle = dist.all_gather_into_tensor(out, x.contiguous(), group=group, async_op=async_op)
    return out, handle


def reduce_scatter_first_dim(x: torch.Tensor, group: dist.ProcessGroup, async_op: bool = False):
    """[s, ...] partial sums on each rank -> this rank's [s/tp, ...] slice of the sum."""
    world = dist.get_world_size(group)
    if x.shape[0] % world:
        raise ValueError(f"first dim {x.shape[0]} is not divisible by the TP size {world}")
    out = torch.empty((x.shape[0] // world, *x.shape[1:]), dtype=x.dtype, device=x.device)
    handle = dist.reduce_scatter_tensor(out, x.contiguous(), group=group, async_op=async_op)
    return out, handle


class _ReduceScatterToSequenceParallel(torch.autograd.Function):
    """Forward: reduce-scatter along dim 0. Backward: all-gather along dim 0."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return reduce_scatter_first_dim(x, group)[0]

    @staticmethod
    def backward(ctx, grad):
        return all_gather_first_dim(grad, ctx.group)[0], None


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor, group: dist.ProcessGroup):
    """Row-parallel output with sequence parallelism: [s, b, h] partial -> [s/tp, b, h] sum."""
    return _ReduceScatterToSequenceParallel.apply(x, group)
