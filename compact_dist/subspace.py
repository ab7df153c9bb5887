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


@torch.no_grad()
def merge_subspace_factors(model: torch.nn.Module, lr: float, weight_decay: float) -> None:
    for layer in compact_layers(model):
        layer.merge_subspace(lr=lr, weight_decay=weight_decay)


def resample_projections(model: torch.nn.Module) -> None:
    for layer in compact_layers(model):
        layer.resample_projection()


class SubspaceStepper:
    """Runs the merge after each optimizer step and the resample every T steps.

    With a torch optimizer, `moments_on_resample='reset'` zeroes the Adam moments of A when P
    changes ('keep' leaves them, as GaLore does for its projected moments).
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
        if optimizer is not None and self.config.moments_on_resample == "reset":
            reset_moments(optimizer, subspace_factors(self.model))
        return True


def reset_moments(optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor]) -> None:
    """Zero the moments of `params` and their step count (so bias correction restarts)."""
    for p in params:
        state = optimizer.state.get(p, {})
        for key, value in state.items():
            if torch.is_tensor(value) and (value.shape == p.shape or key == "step"):
                value.zero_()
            elif key == "step":
                state[key] = 0
