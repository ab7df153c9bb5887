"""torch FSDP2 (`fully_shard`) as a compact_dist parallel backend (compact_dist.core.backend).

FSDP2 shards every parameter along dim 0 over the data-parallel mesh: between forwards the
module's parameters are DTensors (placement Shard(0)) whose local tensors are this rank's
rows, and the torch optimizer steps those DTensors. So A's master is A's own shard (fp32: the
optimizer's parameter, no copy apart from it; with a bf16 MixedPrecisionPolicy too, which
casts only the all-gathered copy), A's optimizer state is keyed by the sharded A (DTensors of
A's placement), and the frozen W0 is sharded the same way.

The merge is row-local: A [out, r] and W0 [out, in] of one layer have the same row count, so
FSDP2 (torch.chunk over dim 0) gives each rank the same rows of both, and
W0[rows] <- W0[rows] (1 - lr wd) + s A[rows] P^T needs no communication. Layers of one shape
are merged together (compact_dist.core.grouped_merge); a bf16 W0's stochastic rounding
draws its noise from the flat index of the rank's first row (apply_rows' base_start), so
every shard draws its own noise and the result does not depend on which rank merges what.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from compact_dist.core.backend import MasterSlice
from compact_dist.core.grouped_merge import apply_rows, chunks, finish, group_layers
from compact_dist.core.torch_backend import TorchBackend


def is_sharded(p: Optional[torch.Tensor]) -> bool:
    """Is `p` a DTensor (an FSDP2-sharded parameter, or its optimizer state)?"""
    from torch.distributed.tensor import DTensor

    return isinstance(p, DTensor)


def local_rows(p: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(this rank's rows of a dim-0-sharded DTensor [rows, ...], the index of its first row
    in the whole tensor). FSDP2 cuts dim 0 as torch.chunk does: ceil(rows / world) per rank,
    the last ranks fewer (or none)."""
    from torch.distributed.tensor import Shard

    if tuple(p.placements) != (Shard(0),):
        raise ValueError(f"an FSDP2 parameter sharded as {p.placements}, not (Shard(0),): "
                         "the subspace merge needs W0 and A cut by rows")
    mesh = p.device_mesh
    per_rank = -(-p.shape[0] // mesh.size())
    return p.to_local(), min(p.shape[0], mesh.get_local_rank() * per_rank)


class FSDP2Backend(TorchBackend):
    """torch FSDP2: the model's W0 and A are DTensors sharded by rows; pass the torch
    optimizer that steps them."""

    name = "fsdp2"

    def claims(self, optimizer, factors: Sequence[torch.Tensor]) -> bool:
        return any(is_sharded(f) for f in factors)

    def master_slices(self, optimizer,
                      factors: Sequence[torch.Tensor]) -> list[Optional[MasterSlice]]:
        """[None] * len(factors): the optimizer steps A's shard itself (what FSDP2 keeps
        as the parameter is the master); raises for an A the optimizer does not step."""
        return super().master_slices(optimizer, factors)

    @torch.no_grad()
    def zero_factor(self, layer) -> None:
        factor = layer.subspace_factor
        (factor.to_local() if is_sharded(factor) else factor).zero_()
        layer.mark_factor_zero()

    def owned_base(self, layer) -> tuple[torch.Tensor, int, int]:
        w = layer.weight
        if not is_sharded(w):
            return super().owned_base(layer)
        rows, first = local_rows(w)
        return rows.view(-1), first * w.shape[1], rows.numel()

    @torch.no_grad()
    def merge(self, layers: list, lr: float, weight_decay: float, optimizer) -> None:
        """Each rank merges its rows of A into its rows of W0 (module docstring); the
        optimizer is only checked to step every A."""
        self.master_slices(optimizer, [layer.subspace_factor for layer in layers])
        plain = [layer for layer in layers if not is_sharded(layer.subspace_factor)]
        if plain:
            raise ValueError(f"{len(plain)} compact layer(s) outside FSDP2 in a model whose "
                             "other subspace factors FSDP2 shards: fully_shard the whole model")
        decay = 1.0 - lr * weight_decay
        for group in group_layers(layers):
            for chunk in chunks(group, group[0].weight.to_local().numel() or 1):
                self._merge_rows(chunk, decay)

    @staticmethod
    def _merge_rows(layers: list, decay: float) -> None:
        if any(layer.weight_lo is not None for layer in layers):
            raise ValueError("FSDP2 does not shard the low word of a bf16-pair W0 (a buffer): "
                             "use compression.base_dtype fp32 or bf16")
        factors = [local_rows(layer.subspace_factor) for layer in layers]
        bases = [local_rows(layer.weight) for layer in layers]
        for (a, a_first), (w, w_first) in zip(factors, bases):
            if a_first != w_first or a.shape[0] != w.shape[0]:
                raise ValueError(f"FSDP2 gave this rank rows {a_first}+{a.shape[0]} of A but "
                                 f"{w_first}+{w.shape[0]} of W0: the merge needs the same rows")
        first, count = bases[0][1], bases[0][0].shape[0]
        if count:
            in_features = bases[0][0].shape[1]
            apply_rows(layers, torch.stack([a for a, _ in factors]),
                       [w.view(-1) for w, _ in bases], 0, first * in_features, decay)
        finish(layers)  # zeroes each A's shard (the DTensor), marks A zero, counts the merge

    # ------------------------------------------------------------------- optimizer state
    def read_moment(self, optimizer, factor: torch.Tensor, key: str) -> Optional[torch.Tensor]:
        """A's `key` state [out, r], all-gathered over the data-parallel mesh (collective)."""
        value = super().read_moment(optimizer, factor, key)
        return value.full_tensor() if is_sharded(value) else value

    def write_moment(self, optimizer, factor: torch.Tensor, key: str,
                     value: torch.Tensor) -> None:
        """Each rank keeps its rows of `value` ([out, r])."""
        state = super().read_moment(optimizer, factor, key)
        if state is None:
            raise RuntimeError(f"no {key} in the optimizer state of A {tuple(factor.shape)}")
        if not is_sharded(state):
            state.copy_(value)
            return
        rows, first = local_rows(state)
        rows.copy_(value[first:first + rows.shape[0]])


FSDP2_BACKEND = FSDP2Backend()
