"""Adam moments of the subspace factors A when the projection P changes: reset or transport.

A's Adam state lives in P's basis: row i of exp_avg averages row i of G P. When P becomes
P', per diagonal block (A's columns j r_b ... (j+1) r_b belong to block j):
- keep: nothing changes (the paper's choice; the state then describes other directions);
- reset: exp_avg = exp_avg_sq = 0 and the step count of A's optimizer state returns to 0, so
  Adam's bias correction restarts (keeping the count made the first updates after a reset up
  to 5x the normal step);
- transport: exp_avg <- exp_avg R and exp_avg_sq <- exp_avg_sq (R o R), with
  R = (P^T P)^{-1} P^T P' (compact_dist.core.basis.transport_map), the step count kept. For G in
  span(P), G P' = (G P) R exactly, so the first moment is the old average seen in the new
  basis. The second moment is a per-coordinate variance: if the old coordinates are
  uncorrelated with variances v, coordinate k of (G P) R has variance sum_j v_j R_jk^2, a
  non-negative map that equals v wherever R is a signed permutation. Data-aware bases of
  consecutive resamples overlap (R close to orthogonal on the kept directions), so most of
  the state survives; for independent Gaussian P the map keeps little, as it should.
  Directions of P' outside span(P) get a prior for their second moment: the part 1 - c_k of
  new direction k that P did not span (c_k = ||P R[:, k]||^2 / ||P'[:, k]||^2,
  basis.kept_fraction) takes the mean second moment of A's row over the block's old
  coordinates, v'_ik = sum_j v_ij R_jk^2 + (1 - c_k) mean_j v_ij. Their first moment starts
  at 0 (no direction preferred). The step count is kept, so Adam's bias correction is ~1;
  without the prior a new direction's v' is ~0 and its first update is m / sqrt(v) =
  (1 - beta1) / sqrt(1 - beta2) times the gradient's scale: 2.4x the steady-state step
  at beta2 = 0.95 and ~17x at 0.999 (tests/test_basis.py measures it). With the prior the
  first updates there are smaller than the steady state (~0.4x: the first moment builds up
  over ~1 / (1 - beta1) steps, as after Adam's own start) and the old directions move as
  before.

Works with any parallel backend (compact_dist.core.backend: the torch optimizer, or the
engine's, e.g. `engine.optimizer`), which says where A's states are: in the optimizer param
group flagged `compact_subspace` (compact_dist.core.subspace.optimizer_param_groups), keyed by
what the optimizer steps in A's place. A state that is missing raises: it is never skipped.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from compact_dist.core.backend import SUBSPACE_GROUP_KEY
from compact_dist.core.backend_registry import backend_for

__all__ = ["SUBSPACE_GROUP_KEY", "prepare_moments", "reset_moments", "subspace_step_count",
           "transport_moments"]
MOMENT_KEYS = ("exp_avg", "exp_avg_sq")


def _check_has_subspace_group(optimizer) -> None:
    inner = backend_for(optimizer).inner_optimizer(optimizer)
    if not any(g.get(SUBSPACE_GROUP_KEY) for g in inner.param_groups):
        raise ValueError(
            "the optimizer has no param group flagged 'compact_subspace': build it from "
            "compact_dist.optimizer_param_groups(model, weight_decay)")


@torch.no_grad()
def reset_moments(optimizer) -> None:
    """Zero A's Adam moments and step count (this rank's part; no communication).

    optimizer: the torch optimizer, or the engine's (`engine.optimizer`).
    """
    if optimizer is None:
        raise ValueError("moments_on_resample='reset' needs the optimizer: "
                         "after_step(..., optimizer=opt or engine.optimizer)")
    _check_has_subspace_group(optimizer)
    for state in backend_for(optimizer).factor_states(optimizer):
        if state is None:
            raise RuntimeError("moments_on_resample='reset': the optimizer has no state for "
                               "the subspace factors A (no optimizer step yet?)")
        for key in MOMENT_KEYS:
            if key in state:
                state[key].zero_()
        step = state.get("step")
        if torch.is_tensor(step):
            step.zero_()
        elif step is not None:
            state["step"] = 0


def prepare_moments(optimizer, factors: Sequence[torch.Tensor]) -> None:
    """Make A's optimizer states readable (the backend's prepare_moments: an engine may link
    them lazily) and check that the optimizer steps every A or a master of it."""
    backend_for(optimizer, factors).prepare_moments(optimizer, factors)


@torch.no_grad()
def transport_moments(optimizer, factors: Sequence[torch.Tensor],
                      maps: Sequence[torch.Tensor], kept: Sequence[torch.Tensor]) -> None:
    """exp_avg <- exp_avg R, exp_avg_sq <- exp_avg_sq (R o R) + (1 - c) mean(exp_avg_sq) for
    each A, its map R and the kept fractions c of the new directions (module docstring).

    factors: the A parameters [rows, kb * r_b] (this TP rank's shard); maps: R per A,
    [kb, r_b, r_b] (this rank's blocks); kept: c per A, [kb, r_b] (basis.kept_fraction).
    Every data-parallel rank must call (an engine that partitions A's state assembles it
    across the group, then each rank keeps its part).
    """
    if optimizer is None:
        raise ValueError("moments_on_resample='transport' needs the optimizer: "
                         "after_step(..., optimizer=opt or engine.optimizer)")
    backend = backend_for(optimizer, factors)
    backend.prepare_moments(optimizer, factors)
    for p, r, c in zip(factors, maps, kept, strict=True):
        for key, rmap in (("exp_avg", r), ("exp_avg_sq", r * r)):
            value = backend.read_moment(optimizer, p, key)
            if value is None:
                raise RuntimeError(f"moments_on_resample='transport': no {key} in the "
                                   f"optimizer state of A {tuple(p.shape)} (no step yet?)")
            rows = value.shape[0]
            kb, rb, _ = rmap.shape
            blocks = value.reshape(rows, kb, rb).float()
            moved = torch.einsum("ikr,krs->iks", blocks, rmap.to(value.device))
            if key == "exp_avg_sq":  # the prior of the directions P did not span
                unseen = (1.0 - c.to(value.device)).clamp_(min=0)
                moved = moved.clamp_(min=0) + blocks.mean(-1, keepdim=True) * unseen
            backend.write_moment(optimizer, p, key, moved.reshape(value.shape).to(value.dtype))


def subspace_step_count(optimizer) -> Optional[float]:
    """The step count of (this rank's first) A optimizer state, None before any step."""
    for state in backend_for(optimizer).factor_states(optimizer):
        step = None if state is None else state.get("step")
        if step is not None:
            return float(step)
    return None
