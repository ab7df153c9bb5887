"""Sharding a Megatron GPT with torch FSDP2 over Megatron's data-parallel group.

`fully_shard` each transformer layer (its parameters are all-gathered around its forward
and backward, one layer at a time) and then the root (embedding, final norm, output layer).
Parameters are sharded by rows (dim 0) over a DeviceMesh made from
megatron.core.parallel_state's data-parallel group, so tensor parallelism stays Megatron's:
each TP rank shards its own TP shard over its data-parallel group. reshard_after_forward:
True frees the gathered parameters after each layer's forward and gathers them again for
backward (ZeRO-3), False keeps them until backward (ZeRO-2).
"""

from __future__ import annotations

import torch


def data_parallel_mesh(device: torch.device):
    """A 1-D DeviceMesh over Megatron's data-parallel group (this TP rank's replicas)."""
    from megatron.core import parallel_state as ps
    from torch.distributed.device_mesh import DeviceMesh

    return DeviceMesh.from_group(ps.get_data_parallel_group(), device_type=device.type)


def tensor_parallel_duplicates(model: torch.nn.Module) -> set[str]:
    """Names of the trainable parameters every TP rank holds whole (norms; not TP-sharded):
    a global gradient norm counts them once. Read before sharding (FSDP2's DTensor parameters
    do not carry Megatron's tensor_model_parallel attribute)."""
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    return {name for name, p in model.named_parameters()
            if p.requires_grad and not param_is_not_tensor_parallel_duplicate(p)}


def shard_model(model: torch.nn.Module, device: torch.device,
                reshard_after_forward: bool = True) -> torch.nn.Module:
    """fully_shard every TransformerLayer of `model`, then `model` (in place; returned).
    Raises for a model without transformer layers (nothing would be sharded per layer)."""
    from torch.distributed.fsdp import fully_shard

    mesh = data_parallel_mesh(device)
    layers = [m for m in model.modules() if hasattr(m, "self_attention") and hasattr(m, "mlp")]
    if not layers:
        raise ValueError("shard_model: no transformer layers (modules with self_attention "
                         "and mlp) to shard")
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return model
