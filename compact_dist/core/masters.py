"""The tensor an optimizer steps in place of a subspace factor A (A's "master").

The merge zeroes A and must leave the optimizer's own copy of A consistent with it; moving A's
Adam moments needs the optimizer state, which is keyed by that copy. Where it lives:
- a torch optimizer, and DeepSpeed ZeRO-0 in fp32 (the engine steps the client optimizer
  itself): A;
- DeepSpeed ZeRO-0 with bf16 (FP16_UnfusedOptimizer): a full fp32 clone of A [out, r], the
  inner optimizer's parameter and the key of its state, copied into A after every step;
- ZeRO 1-2 and DeepSpeed's BF16_Optimizer: this rank's fragment of a flat fp32 partition,
  linked as `A._hp_mapping` (None where the fragment is on another rank);
- ZeRO-3: this rank's partition of a flat fp32 group (A has `ds_id`).
`plain_masters` answers for the first two (A not linked by ZeRO); the ZeRO layouts are read
where they are used (compact_dist.core.grouped_merge, .subspace, .moments).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch


def zero_linked(factor: torch.Tensor) -> bool:
    """Is A's master a ZeRO partition (ZeRO 1-3, DeepSpeed's BF16_Optimizer)?"""
    return hasattr(factor, "ds_id") or hasattr(factor, "_hp_mapping")


def _unfused_masters(optimizer) -> dict[int, torch.Tensor]:
    """id(module parameter) -> its fp32 master under DeepSpeed's FP16_UnfusedOptimizer (its
    fp16_groups and fp32_groups are parallel lists); {} for any other optimizer."""
    try:
        from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    except ImportError:
        return {}
    if not isinstance(optimizer, FP16_UnfusedOptimizer):
        return {}
    return {id(low): high for lows, highs in zip(optimizer.fp16_groups, optimizer.fp32_groups)
            for low, high in zip(lows, highs)}


def plain_masters(optimizer, factors: Sequence[torch.Tensor]) -> list[Optional[torch.Tensor]]:
    """For each A not linked by ZeRO: the fp32 tensor `optimizer` steps in A's place, or None
    where it steps A itself.

    optimizer: the torch optimizer, or under DeepSpeed `engine.optimizer`; None takes each A
    as its own master, which only an fp32 A can be (mixed precision steps a master copy).
    Raises ValueError for an A that the optimizer neither steps nor keeps a known master of.
    """
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
    masters = _unfused_masters(optimizer)
    stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    out = []
    for factor in factors:
        if id(factor) in masters:
            out.append(masters[id(factor)])
        elif id(factor) in stepped:
            out.append(None)
        else:
            raise ValueError(
                f"{type(optimizer).__name__} steps neither the subspace factor A "
                f"{tuple(factor.shape)} nor a master copy of it that compact_dist knows "
                "(supported: torch optimizers, DeepSpeed ZeRO 1-3, and ZeRO-0's unfused "
                "fp32 masters)")
    return out
