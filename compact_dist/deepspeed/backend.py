"""DeepSpeed ZeRO 0-3 as a compact_dist parallel backend (compact_dist.core.backend).

Where DeepSpeed keeps the master copy of a subspace factor A (the tensor its optimizer steps
in A's place):
- ZeRO-0 in fp32: the engine steps the client torch optimizer, which steps A itself (the plain
  torch backend answers: DeepSpeed does not claim it);
- ZeRO-0 with bf16 (FP16_UnfusedOptimizer): a full fp32 clone of A [out, r], the inner
  optimizer's parameter and the key of its state, copied into A after every step;
- ZeRO 1-2 and DeepSpeed's BF16_Optimizer: this rank's fragment of a flat fp32 partition,
  linked as `A._hp_mapping` (None where the fragment is on another rank); with optimizer
  offload (ZeRO-Offload) the partition is in host memory, and the merge copies A there;
- ZeRO-3: this rank's partition of a flat fp32 group (A has `ds_id`; the merge:
  compact_dist.deepspeed.zero3_merge, which reads and zeroes offloaded masters through
  DeepSpeed's accessors).
A's optimizer state is keyed by those tensors: ZeRO 1-3 flatten each param group into its
own fp32 partitions, so the flagged group's states are exactly A's; at ZeRO-0 with bf16 they
are keyed by A's fp32 masters. The merge of ZeRO 0-2 is the plain one (the module's A is the
bf16 copy of its fp32 master, identical on all data-parallel ranks: no communication), each
master keeping only what the bf16 copy rounded away.
"""

from __future__ import annotations

import sys
from typing import Iterator, Optional, Sequence

import torch
import torch.distributed as dist

from compact_dist.core.backend import SUBSPACE_GROUP_KEY, MasterSlice
from compact_dist.core.torch_backend import TorchBackend
from compact_dist.deepspeed.zero3_merge import is_zero3, local_master, merge_zero3, own_partition


def zero_linked(factor: torch.Tensor) -> bool:
    """Is A's master a ZeRO partition (ZeRO 1-3, DeepSpeed's BF16_Optimizer)?"""
    return is_zero3(factor) or hasattr(factor, "_hp_mapping")


def _is_deepspeed_optimizer(optimizer) -> bool:
    if optimizer is None or "deepspeed" not in sys.modules:  # never imports DeepSpeed itself
        return False
    from deepspeed.runtime.base_optimizer import DeepSpeedOptimizer

    return isinstance(optimizer, DeepSpeedOptimizer)


def _unfused_masters(optimizer) -> dict[int, torch.Tensor]:
    """id(module parameter) -> its fp32 master under DeepSpeed's FP16_UnfusedOptimizer (its
    fp16_groups and fp32_groups are parallel lists); {} for any other optimizer."""
    if optimizer is None or "deepspeed" not in sys.modules:
        return {}
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    if not isinstance(optimizer, FP16_UnfusedOptimizer):
        return {}
    return {id(low): high for lows, highs in zip(optimizer.fp16_groups, optimizer.fp32_groups)
            for low, high in zip(lows, highs)}


class DeepSpeedBackend(TorchBackend):
    """DeepSpeed's engine at ZeRO stage 0-3 (fp32 or bf16); pass `engine.optimizer`."""

    name = "deepspeed"

    def claims(self, optimizer, factors: Sequence[torch.Tensor]) -> bool:
        return any(zero_linked(f) for f in factors) or _is_deepspeed_optimizer(optimizer)

    # ------------------------------------------------------------------- A's master copy
    def master_slices(self, optimizer,
                      factors: Sequence[torch.Tensor]) -> list[Optional[MasterSlice]]:
        out: list[Optional[MasterSlice]] = [None] * len(factors)
        plain = []
        for i, factor in enumerate(factors):
            if is_zero3(factor):
                part = factor.ds_tensor
                start = part.ds_numel * dist.get_rank(group=factor.ds_process_group)
                valid = max(0, min(part.ds_numel, factor.ds_numel - start))
                out[i] = MasterSlice(local_master(factor).narrow(0, 0, valid), start, valid)
            elif hasattr(factor, "_hp_mapping"):
                mapping = factor._hp_mapping
                if mapping is not None:  # else the fragment is on another rank
                    address = mapping.lp_fragment_address
                    out[i] = MasterSlice(mapping.get_hp_fragment(), address.start,
                                         address.numel)
            else:
                plain.append(i)
        masters = _unfused_masters(optimizer)
        unknown = [factors[i] for i in plain if id(factors[i]) not in masters]
        super().master_slices(optimizer, unknown)  # the optimizer steps them itself, or raise
        for i in plain:
            master = masters.get(id(factors[i]))
            if master is not None:
                out[i] = MasterSlice(master.view(-1), 0, factors[i].numel())
        return out

    @torch.no_grad()
    def zero_factor(self, layer) -> None:
        factor = layer.subspace_factor
        if is_zero3(factor):
            factor.ds_tensor.zero_()
        factor.zero_()  # the module's tensor (empty while ZeRO-3 has it partitioned)
        layer.mark_factor_zero()

    # ------------------------------------------------------------------- W0 and the merge
    def owned_base(self, layer) -> tuple[torch.Tensor, int, int]:
        if is_zero3(layer.weight):
            return own_partition(layer.weight)
        return super().owned_base(layer)

    @torch.no_grad()
    def merge(self, layers: list, lr: float, weight_decay: float, optimizer) -> None:
        """ZeRO 0-2: the plain merge of the module's A (each rank's fp32 master, ZeRO 1-2: its
        fragment, keeps only the rounding residual); ZeRO-3: zero3_merge."""
        super().merge([l for l in layers if not is_zero3(l.subspace_factor)], lr,
                      weight_decay, optimizer)
        merge_zero3([l for l in layers if is_zero3(l.subspace_factor)], lr, weight_decay)

    # ------------------------------------------------------------------- optimizer state
    def inner_optimizer(self, optimizer) -> torch.optim.Optimizer:
        inner = getattr(optimizer, "optimizer", None)
        return inner if isinstance(inner, torch.optim.Optimizer) else optimizer

    def factor_states(self, optimizer) -> Iterator[Optional[dict]]:
        if hasattr(optimizer, "fp32_partitioned_groups_flat"):  # ZeRO-3: one flat per sub-group
            inner = optimizer.optimizer
            for sub, group in optimizer.sub_group_to_group_id.items():
                if inner.param_groups[group].get(SUBSPACE_GROUP_KEY):
                    yield inner.state.get(optimizer.fp32_partitioned_groups_flat[sub]) or None
            return
        yield from super().factor_states(optimizer)

    def prepare_moments(self, optimizer, factors: Sequence[torch.Tensor]) -> None:
        """DeepSpeed 0.19 (ZeRO 0-2) links parameters to their optimizer-state fragments right
        after the first param group's first step, before later groups (ours is the last) have
        any state; renew the links so safe_get/set_full_optimizer_state see the real moments.
        Then check that the optimizer steps every other A or a master of it."""
        if any(getattr(p, "_hp_mapping", None) is not None for p in factors):
            relink = getattr(optimizer, "_lazy_init_hp_params_optimizer_state", None)
            if relink is not None:
                optimizer._hp_optimizer_states_linked = False
                relink()
        self.master_slices(optimizer, [p for p in factors if not zero_linked(p)])

    def stepped_tensor(self, optimizer, factor: torch.Tensor) -> torch.Tensor:
        master = _unfused_masters(optimizer).get(id(factor))
        return master if master is not None else super().stepped_tensor(optimizer, factor)

    def read_moment(self, optimizer, factor: torch.Tensor, key: str) -> Optional[torch.Tensor]:
        if zero_linked(factor):  # ZeRO assembles A's state across the group
            from deepspeed.utils import safe_get_full_optimizer_state

            return safe_get_full_optimizer_state(factor, key)
        return super().read_moment(optimizer, factor, key)

    def write_moment(self, optimizer, factor: torch.Tensor, key: str,
                     value: torch.Tensor) -> None:
        if zero_linked(factor):  # each rank keeps its fragment
            from deepspeed.utils import safe_set_full_optimizer_state

            safe_set_full_optimizer_state(factor, value, key)
            return
        super().write_moment(optimizer, factor, key, value)


DEEPSPEED_BACKEND = DeepSpeedBackend()
