"""The subspace factor A of a compact layer: its parameter, and whether it is known zero.

A is [out, r] of this TP rank (column-parallel [out/tp, r], row-parallel [out, r/tp]), zero
after every merge. Forward skips the A P^T term while A is known zero; "known" is tracked
without reading A (a host sync per layer) through a token: A's version counter and the
number of optimizer steps begun in this process since the merge.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from torch.optim.optimizer import register_optimizer_step_pre_hook


class OptimizerSteps:
    """Steps begun by any torch optimizer in this process (a global step pre-hook, installed
    by `install`: when the first compact layer is built).

    An engine may write parameters through `.data` (ZeRO 1-3 copy the updated fp32 masters
    into the module's tensors that way), which does not bump a tensor's version counter;
    every engine runs a torch optimizer's step() to update A, though, so this count moves
    whenever A may have been written by an optimizer. Counting every optimizer in the process
    errs only on the safe side (an unrelated step makes forward take the exact A P^T path).
    """

    count = 0
    _handle = None

    @classmethod
    def hook(cls, optimizer, args, kwargs) -> None:
        cls.count += 1

    @classmethod
    def install(cls) -> None:
        """Register the pre-hook once per process (idempotent)."""
        if cls._handle is None:
            cls._handle = register_optimizer_step_pre_hook(cls.hook)


def new_factor(rows: int, rank: int, dtype: torch.dtype, device: torch.device,
               partition_dim: int) -> torch.nn.Parameter:
    """A zero A [rows, rank] marked as Megatron's TP-sharded parameter along `partition_dim`
    (0: column-parallel, 1: row-parallel)."""
    factor = torch.nn.Parameter(torch.zeros((rows, rank), dtype=dtype, device=device))
    set_tensor_model_parallel_attributes(factor, True, partition_dim, 1)
    factor.allreduce = True
    return factor


class ZeroTracker:
    """Whether a layer's A is known zero: set by `mark_zero` (a merge, construction, a
    checkpoint load of a merged A), cleared by `mark_written` and, implicitly, by any
    optimizer step in the process or in-place write to A after it."""

    def __init__(self) -> None:
        OptimizerSteps.install()
        self._token: Optional[tuple[int, int]] = None

    @staticmethod
    def _token_of(factor: torch.Tensor) -> tuple[int, int]:
        return (factor._version, OptimizerSteps.count)

    def mark_zero(self, factor: torch.Tensor) -> None:
        self._token = self._token_of(factor)

    def mark_written(self) -> None:
        self._token = None

    def is_zero(self, factor: Optional[torch.Tensor]) -> bool:
        return factor is None or self._token == self._token_of(factor)
