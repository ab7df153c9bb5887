"""Model-level operations on compact layers: ids, optimizer groups, merge and resample.

The training contract in subspace mode: after every optimizer step call
`SubspaceStepper.after_step()` (or `merge_subspace_factors`), which folds each A into its
frozen W0 (applying the decoupled weight decay to W_eff) and zeroes A, and every
`resample_interval` steps draws a new projection.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch

from compact_dist.config import ALL_ROLES, CompressionConfig
from compact_dist.layers import CompactLinearMixin


def compact_layers(model: torch.nn.Module) -> list[CompactLinearMixin]:
    return [m for m in model.modules() if isinstance(m, CompactLinearMixin)]


def assign_layer_ids(model: torch.nn.Module) -> None:
    """Give each compact layer the id (global layer_number, role): stable across processes,
    pipeline stages and repeated model builds, unlike the construction-order default."""
    for module in model.modules():
        layer_number = getattr(module, "layer_number", None)
        if layer_number is None or not hasattr(module, "self_attention"):
            continue  # not a TransformerLayer
        for sub in module.modules():
            if isinstance(sub, CompactLinearMixin):
                role = ALL_ROLES.index(sub.role) if sub.role in ALL_ROLES else len(ALL_ROLES)
                sub.set_layer_id(layer_number * (len(ALL_ROLES) + 1) + role)


def subspace_factors(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [m.subspace_factor for m in compact_layers(model) if m.subspace_factor is not None]


def optimizer_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups in Megatron's convention (no decay on biases and norms), with the subspace
    factors A in their own group with weight_decay=0: their decay acts on W_eff in the merge.
    Frozen parameters (the W0 bases) are left out."""
    factors = {id(p) for p in subspace_factors(model)}
    decay, no_decay, subspace = [], [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if id(p) in factors:
            subspace.append(p)
        elif p.ndim < 2:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
        {"params": subspace, "weight_decay": 0.0, "compact_subspace": True},
    ]
    return [g for g in groups if g["params"]]


def _is_zero3(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")


@torch.no_grad()
def merge_subspace_factors(model: torch.nn.Module, lr: float, weight_decay: float) -> None:
    """Merge every compact layer: W0 <- W0 (1 - lr wd) + A P^T, A <- 0.

    Works with plain torch optimizers and DeepSpeed (ZeRO 0-3, fp32 or bf16); every rank must
    call it. Every copy of A ends at zero:
    - ZeRO 0-2: the module's A (after DeepSpeed's step, the bf16 copy of its fp32 master,
      identical on all data-parallel ranks) is merged without any communication; each rank's
      fp32 master fragment keeps only what the bf16 copy rounded away (zero in fp32), so
      nothing of the update is lost to rounding.
    - ZeRO-3: A is gathered from DeepSpeed's fp32 master partitions (a collective over the
      data-parallel group), each rank updates only its own partition of W0, and A's partitions
      and masters are zeroed.
    """
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_local_fp32_param

    for layer in compact_layers(model):
        factor = layer.subspace_factor
        if factor is None:
            continue
        if not _is_zero3(factor):
            mapping = getattr(factor, "_hp_mapping", None)
            if mapping is not None:  # this rank's fp32 master fragment of A
                address = mapping.lp_fragment_address
                low = factor.detach().view(-1).narrow(0, address.start, address.numel)
                mapping.get_hp_fragment().sub_(low.float())
            layer.merge_subspace(lr, weight_decay)
            continue
        master = safe_get_full_fp32_param(factor).view(factor.ds_shape)
        w0 = layer.weight
        base_flat, base_start = None, 0
        if _is_zero3(w0):
            part = w0.ds_tensor
            base_start = part.ds_numel * torch.distributed.get_rank(group=w0.ds_process_group)
            valid = max(0, min(part.ds_numel, w0.ds_numel - base_start))
            base_flat = part.narrow(0, 0, valid)
        layer.merge_subspace(lr, weight_decay, factor=master, base_flat=base_flat,
                             base_start=base_start)
        factor.ds_tensor.zero_()
        safe_set_local_fp32_param(factor, torch.zeros_like(factor.ds_tensor))


def resample_projections(model: torch.nn.Module) -> None:
    for layer in compact_layers(model):
        layer.resample_projection()


class SubspaceStepper:
    """Runs the merge after each optimizer step and the resample every T steps.

    `moments_on_resample='reset'` zeroes the Adam moments of A when P changes (pass the torch
    optimizer, or `engine.optimizer` under DeepSpeed); 'keep' leaves them, as GaLore does for
    its projected moments.
    """

    def __init__(self, model: torch.nn.Module, config: CompressionConfig):
        self.model = model
        self.config = config
        self.steps = 0

    def after_step(
        self, lr: float, weight_decay: float, optimizer: Optional[torch.optim.Optimizer] = None
    ) -> bool:
        """Merge; returns True when this step also resampled the projections."""
        merge_subspace_factors(self.model, lr=lr, weight_decay=weight_decay)
        self.steps += 1
        if self.steps % self.config.resample_interval:
            return False
        resample_projections(self.model)
        if self.config.moments_on_resample == "reset":
            reset_moments(optimizer, subspace_factors(self.model))
        return True


def reset_moments(
    optimizer: Optional[torch.optim.Optimizer], params: Iterable[torch.Tensor]
) -> None:
    """Zero the Adam moments (exp_avg, exp_avg_sq) of `params`; the step count stays, the same
    with a torch optimizer as under DeepSpeed, whose step count is shared by a flat group.

    optimizer: the torch optimizer, or under DeepSpeed the engine's (`engine.optimizer`).
    ZeRO 0-2 zero each rank's own fragment of the moments (no communication). DeepSpeed 0.19
    links the parameters to their optimizer-state fragments right after the first param
    group's first step, before the other groups (ours is the last) have any state; the links
    are renewed here so they point at the real moments.
    """
    from deepspeed.utils import safe_get_full_optimizer_state, safe_set_full_optimizer_state

    params = list(params)
    if any(getattr(p, "_hp_mapping", None) is not None for p in params):
        relink = getattr(optimizer, "_lazy_init_hp_params_optimizer_state", None)
        if relink is None:
            raise ValueError("resetting the moments of A under DeepSpeed ZeRO 0-2 needs the "
                             "engine's optimizer: after_step(..., optimizer=engine.optimizer)")
        optimizer._hp_optimizer_states_linked = False
        relink()
    for p in params:
        for key in ("exp_avg", "exp_avg_sq"):
            if _is_zero3(p):
                current = safe_get_full_optimizer_state(p, key)
                if current is not None:
                    safe_set_full_optimizer_state(p, torch.zeros_like(current), key)
            elif hasattr(p, "_hp_mapping"):
                if p._hp_mapping is not None:  # this rank owns part of p's state
                    p._hp_mapping.get_hp_fragment(key).zero_()
            elif optimizer is not None and key in optimizer.state.get(p, {}):
                optimizer.state[p][key].zero_()
