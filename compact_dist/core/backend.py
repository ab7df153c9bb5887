"""The seam between the subspace method and the parallel engine that holds the parameters.

The method needs a few things from whatever engine trains the model (a plain torch optimizer,
torch DDP, a ZeRO engine, ...): where the optimizer keeps its own copy of each subspace
factor A (A's "master") and how to read and zero it, which part of the frozen W0 this rank
owns, how to merge A into W0 when A or W0 are partitioned (gathering what the merge needs),
where A's optimizer state (Adam moments, step count) lives, and what a checkpoint load must
redo. `ParallelBackend` names those operations; core/ calls only them and knows no engine.

A backend is chosen in one place, compact_dist.core.backend_registry.backend_for: the first
registered backend that claims the optimizer or the factors, else the plain torch backend
(compact_dist.core.torch_backend: single process and torch DDP, where the optimizer steps A
itself). Engines outside core register theirs (the package root registers compact_dist's
own; see docs/EXTENDING.md).

Shapes: A is [out, r] of this TP rank (column-parallel [out/tp, r], row-parallel
[out, r/tp]); "flat A" is A.view(-1) in row-major order. A backend that partitions A or W0
over the data-parallel group answers for this rank's part.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch

from compact_dist.core.grouped_merge import merge_layers

# the flag of the optimizer param group that holds the subspace factors A
# (compact_dist.core.subspace.optimizer_param_groups)
SUBSPACE_GROUP_KEY = "compact_subspace"


@dataclass(frozen=True)
class MasterSlice:
    """The part of A's master copy that this rank holds: `tensor` (fp32, flat) holds flat A's
    elements [start, start + numel). The merge keeps in it only what the module's (lower
    precision) A rounded away."""

    tensor: torch.Tensor
    start: int
    numel: int


class ParallelBackend:
    """What the subspace method needs from a parallel engine (see the module docstring).

    Subclasses override what differs from the plain torch case; every method gets the
    optimizer the training loop passes (the torch optimizer, or the engine's wrapper of it)
    or the compact layers (compact_dist.core.layers.CompactLinearMixin).
    """

    name: str = "abstract"

    # ------------------------------------------------------------------- choosing a backend
    def claims(self, optimizer, factors: Sequence[torch.Tensor]) -> bool:
        """Does this backend hold these factors or this optimizer (None: not given)?"""
        raise NotImplementedError

    # ------------------------------------------------------------------- A's master copy
    def master_slices(self, optimizer,
                      factors: Sequence[torch.Tensor]) -> list[Optional[MasterSlice]]:
        """For each A: the part of its master (the fp32 tensor the optimizer steps in A's
        place) on this rank, None where there is none apart from A (the optimizer steps A
        itself, or keeps A's master on another rank). Raises ValueError where the optimizer
        steps neither A nor a master this backend knows."""
        raise NotImplementedError

    def zero_factor(self, layer) -> None:
        """Zero every copy of A this rank's module holds and mark A zero (the state a merge
        leaves; masters are the merge's and the optimizer checkpoint's)."""
        raise NotImplementedError

    # ------------------------------------------------------------------- W0
    def owned_base(self, layer) -> tuple[torch.Tensor, int, int]:
        """(this rank's part of W0 as a flat view, the flat index of W0 where it starts, its
        length): all of W0 unless the engine partitions it."""
        w = layer.weight
        return w.view(-1), 0, w.numel()

    # ------------------------------------------------------------------- merge
    def merge(self, layers: list, lr: float, weight_decay: float, optimizer) -> None:
        """W0 <- W0 (1 - lr wd) + s A P^T and A <- 0 for every layer, each copy of A
        consistent afterwards; every rank calls with the same layers. Default: the module's
        own A merged into the module's W0, layers of one shape together
        (compact_dist.core.grouped_merge), each master slice keeping only the rounding
        residual."""
        factors = [layer.subspace_factor for layer in layers]
        slices = {id(f): s for f, s in zip(factors, self.master_slices(optimizer, factors))
                  if s is not None}
        merge_layers(layers, lr, weight_decay, slices)

    # ------------------------------------------------------------------- optimizer state
    def inner_optimizer(self, optimizer) -> torch.optim.Optimizer:
        """The torch optimizer whose param groups hold A's (or its masters') group."""
        return optimizer

    def factor_states(self, optimizer) -> Iterator[Optional[dict]]:
        """The optimizer-state dicts of what the optimizer steps for the A's (the param group
        flagged SUBSPACE_GROUP_KEY), None for one that has no state
        yet (no optimizer step)."""
        inner = self.inner_optimizer(optimizer)
        for group in inner.param_groups:
            if group.get(SUBSPACE_GROUP_KEY):
                for p in group["params"]:
                    yield inner.state.get(p) or None

    def read_moment(self, optimizer, factor: torch.Tensor, key: str) -> Optional[torch.Tensor]:
        """A's optimizer state `key` (exp_avg, exp_avg_sq) of its full [out, r] shape on this
        TP rank, None where there is none. Collective where the engine partitions it (every
        data-parallel rank calls for the same factors in the same order)."""
        raise NotImplementedError

    def write_moment(self, optimizer, factor: torch.Tensor, key: str,
                     value: torch.Tensor) -> None:
        """Set A's optimizer state `key` to `value` ([out, r]); as read_moment."""
        raise NotImplementedError

    def prepare_moments(self, optimizer, factors: Sequence[torch.Tensor]) -> None:
        """Called before moments are read or written (default: nothing)."""
