"""The global gradient norm of an FSDP2 model with Megatron tensor parallelism, and clipping.

FSDP2's gradients are DTensors sharded over the data-parallel mesh; Megatron's TP shards
are plain tensors that differ per TP rank, except the parameters every TP rank holds whole
(norm weights), which count once. ||g||^2 = sum over this rank's gradient shards (the
duplicates only on TP rank 0), all-reduced over the data-parallel and the TP group: the norm
DeepSpeed computes through Megatron's mpu and torch's clip_grad_norm_ computes on one rank.
(megatron.core.optimizer.clip_grads.get_grad_norm_fp32 does the same but allocates on
'cuda', clip_grads.py:115 in megatron-core 0.16.1.)
"""

from __future__ import annotations

from typing import Iterable

import torch


def local_grad(p: torch.Tensor) -> torch.Tensor:
    g = p.grad
    return g.to_local() if hasattr(g, "to_local") else g


@torch.no_grad()
def global_grad_norm(named_params: Iterable[tuple[str, torch.Tensor]],
                     tp_duplicates: set[str]) -> torch.Tensor:
    """The L2 norm of all gradients of the model (fp32 scalar, the same on every rank);
    collective over the data-parallel and the tensor-parallel group."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    tp_rank = ps.get_tensor_model_parallel_rank()
    grads = [local_grad(p) for name, p in named_params
             if p.grad is not None and (tp_rank == 0 or name not in tp_duplicates)]
    device = grads[0].device if grads else torch.device("cpu")
    squares = (torch.stack([g.float().pow(2).sum() for g in grads]).sum() if grads
               else torch.zeros((), device=device))
    dist.all_reduce(squares, group=ps.get_data_parallel_group())
    dist.all_reduce(squares, group=ps.get_tensor_model_parallel_group())
    return squares.sqrt()


@torch.no_grad()
def clip_grads(params: list[torch.Tensor], norm: torch.Tensor, max_norm: float) -> None:
    """Scale the gradients by min(1, max_norm / (norm + 1e-6)) as torch's clip_grad_norm_
    does (max_norm 0: no clipping)."""
    if max_norm <= 0:
        return
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    torch._foreach_mul_([local_grad(p) for p in params if p.grad is not None], coef)
