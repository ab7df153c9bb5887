"""The plain torch backend: one process, or torch DDP (every rank a full replica).

The optimizer steps each subspace factor A itself: A is its own master, A's optimizer state
is keyed by A, W0 is whole on every rank and the merge needs no communication (replicas
stay equal: the same inputs and the same stochastic-rounding streams on every rank).
A mixed-precision A (bf16) needs the optimizer passed, to confirm that it steps A itself
and not an fp32 copy the merge would leave behind.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from compact_dist.core.backend import MasterSlice, ParallelBackend


class TorchBackend(ParallelBackend):
    """A torch optimizer (torch.optim.*) stepping the model's own parameters."""

    name = "torch"

    def claims(self, optimizer, factors: Sequence[torch.Tensor]) -> bool:
        return True

    def master_slices(self, optimizer,
                      factors: Sequence[torch.Tensor]) -> list[Optional[MasterSlice]]:
        """[None] * len(factors): the optimizer steps each A itself. optimizer None takes
        each A as its own master, which only an fp32 A can be (mixed precision steps a master
        copy). Raises ValueError for an A the optimizer does not step."""
        if not factors:
            return []
        if optimizer is None:
            low = [f for f in factors if f.dtype != torch.float32]
            if low:
                raise ValueError(
                    f"a {low[0].dtype} subspace factor A {tuple(low[0].shape)} may be trained "
                    "through an fp32 master copy that the merge must update too: pass the "
                    "optimizer (after_step(lr, wd, optimizer) / merge_subspace_factors(..., "
                    "optimizer=engine.optimizer))")
            return [None] * len(factors)
        stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
        for factor in factors:
            if id(factor) not in stepped:
                raise ValueError(
                    f"{type(optimizer).__name__} steps neither the subspace factor A "
                    f"{tuple(factor.shape)} nor a master copy of it that a registered backend "
                    "knows (compact_dist.core.backend_registry)")
        return [None] * len(factors)

    @torch.no_grad()
    def zero_factor(self, layer) -> None:
        layer.subspace_factor.zero_()
        layer.mark_factor_zero()

    def stepped_tensor(self, optimizer, factor: torch.Tensor) -> torch.Tensor:
        """The tensor the optimizer steps for A (the key of A's optimizer state)."""
        self.master_slices(optimizer, [factor])
        return factor

    def read_moment(self, optimizer, factor: torch.Tensor, key: str) -> Optional[torch.Tensor]:
        return optimizer.state.get(self.stepped_tensor(optimizer, factor), {}).get(key)

    def write_moment(self, optimizer, factor: torch.Tensor, key: str,
                     value: torch.Tensor) -> None:
        state = self.read_moment(optimizer, factor, key)
        if state is None:
            raise RuntimeError(f"no {key} in the optimizer state of A {tuple(factor.shape)}")
        state.copy_(value)

    def prepare_moments(self, optimizer, factors: Sequence[torch.Tensor]) -> None:
        self.master_slices(optimizer, factors)  # raises for an A the optimizer does not step


TORCH_BACKEND = TorchBackend()
