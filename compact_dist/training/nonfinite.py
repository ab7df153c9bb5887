"""Stop on a non-finite loss or gradient norm (Megatron-LM's --check-for-nan-in-loss-and-grad).

After every optimizer step compact-train checks the loss averaged over data-parallel ranks
and the global gradient norm of that step. The norm is the training engine's
(compact_dist.training.engine_base; FSDP2's: compact_dist.fsdp.grad_norm), under DeepSpeed
(`engine.get_global_grad_norm()`: ZeRO 1-3 and bf16 compute it every step, clipping or not;
on a non-finite norm they skip the update and report inf). Where DeepSpeed computes none
(ZeRO-0 fp32: the torch optimizer is not wrapped) a step pre-hook on that optimizer takes the
norm of the gradients it is about to apply, and the verdict is all-reduced (MAX) over the
world group, since tensor-parallel ranks hold different shards. Every rank reaches the same
verdict, so every rank stops at the same step, before that step's checkpoint: no checkpoint
holds a state past a non-finite value, and rotation never deletes the last finite one.
"""

from __future__ import annotations

import math
from typing import Optional

import torch


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss or gradient norm (one line)."""


class NonFiniteCheck:
    def __init__(self, engine) -> None:
        self.engine = engine
        self._local: Optional[torch.Tensor] = None
        self._hook = None
        self.norm: Optional[float] = None  # the last step's global gradient norm (problem())
        if not engine.computes_grad_norm:  # compact_dist.training.engine_base.TrainingEngine
            self._hook = engine.optimizer.register_step_pre_hook(self._measure)

    @torch.no_grad()
    def _measure(self, optimizer, args, kwargs) -> None:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"]
                 if p.grad is not None]
        self._local = (torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
                       if grads else None)

    def grad_norm(self) -> Optional[float]:
        """The step's global gradient norm (collective on the world group without
        DeepSpeed's: then inf or nan if any rank's local norm is, else this rank's)."""
        norm = self.engine.get_global_grad_norm()
        if norm is not None or self._hook is None:
            return None if norm is None else float(norm)
        import torch.distributed as dist

        local = self._local if self._local is not None else torch.zeros(())
        self._local = None
        bad = (~torch.isfinite(local)).float().to(self.engine.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return math.inf if bad.item() > 0 and math.isfinite(local.item()) else local.item()

    def problem(self, step: int, loss: float) -> Optional[str]:
        """What was not finite at `step` (every rank gets the same answer), or None. Keeps
        the step's gradient norm in `norm` (None where no optimizer computed one)."""
        norm = self.norm = self.grad_norm()
        if not math.isfinite(loss):
            return f"step {step}: the training loss is {loss}"
        if norm is not None and not math.isfinite(norm):
            return f"step {step}: the gradient norm is {norm} (loss {loss:.4f})"
        return None

    def close(self) -> None:
        if self._hook is not None:
            self._hook.remove()
