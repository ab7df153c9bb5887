"""A compact layer's current projection P and its cache.

P changes only at a resample (a new projection epoch): the seeded Gaussian P of the epoch
(compact_dist.core.projection.Projection.blocks) or a data-aware `basis` estimated from a
sketch (compact_dist.core.basis). Either is kept until the next resample: forward,
backward, recompute and the merge of that epoch share it. P itself is the only thing cached,
never anything derived from a step's activations; only the latest (epoch, dtype, device) is
kept. Shapes: blocks [local_blocks, block_in, block_rank] (this TP rank's diagonal blocks);
the operand is what project / unproject multiply (compact_dist.core.projection.operand).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch

from compact_dist.core.projection import Projection, operand


class ProjectionState:
    """The projection of one layer: its seeded geometry (`spec`), the epoch, the data-aware
    `basis` once estimated (fp32 [local_blocks, block_in, block_rank], orthonormal blocks;
    None: the seeded Gaussian P of the epoch) and the cache of the current P."""

    def __init__(self, spec: Projection) -> None:
        self.spec = spec
        self.epoch = 0
        self.basis: Optional[torch.Tensor] = None
        self.cache: dict[tuple, list] = {}

    def set_layer_id(self, layer_id: int) -> None:
        self.spec = dataclasses.replace(self.spec, layer_id=layer_id)
        self.cache.clear()

    def _entry(self, dtype: torch.dtype, device: torch.device) -> list:
        """[blocks, operand or None] of the current epoch in `dtype` on `device`."""
        key = (self.epoch, dtype, device)
        entry = self.cache.get(key)
        if entry is None:
            if self.basis is not None:
                blocks = self.basis.to(device, dtype)
            else:
                blocks = self.spec.blocks(self.epoch, device, dtype)
            entry = [blocks, None]
            self.cache = {key: entry}
        return entry

    def blocks(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """This rank's blocks of the current P: [local_blocks, block_in, block_rank]."""
        return self._entry(dtype, device)[0]

    def operand(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """This rank's P as forward and backward multiply it, cached with the blocks."""
        entry = self._entry(dtype, device)
        if entry[1] is None:
            entry[1] = operand(entry[0])
        return entry[1]

    def advance(self, basis: Optional[torch.Tensor], device: torch.device) -> None:
        """The next epoch: P becomes `basis` (data-aware, fp32 [local_blocks, block_in,
        block_rank]) or, without one, stays data-aware if it was, else the next seeded
        Gaussian P."""
        if basis is not None:
            p = self.spec
            expected = (p.local_blocks, p.block_in, p.block_rank)
            if tuple(basis.shape) != expected:
                raise ValueError(f"basis of shape {tuple(basis.shape)}, expected {expected}")
            self.basis = basis.to(device, torch.float32)
        self.epoch += 1
        self.cache.clear()

    def extra_state(self) -> dict[str, Any]:
        return {"projection_epoch": self.epoch,
                "basis": None if self.basis is None else self.basis.detach().cpu()}

    def load_extra_state(self, state: dict[str, Any], device: torch.device) -> None:
        self.epoch = int(state["projection_epoch"])
        basis = state.get("basis")
        self.basis = None if basis is None else basis.to(device, torch.float32)
        self.cache.clear()
