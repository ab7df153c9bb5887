"""Model-level operations on compact layers: ids, optimizer groups, merge and resample.

The training contract in subspace mode: after every optimizer step call
`SubspaceStepper.after_step()` (or `merge_subspace_factors`), which folds each A into its
frozen W0 (applying the decoupled weight decay to W_eff) and zeroes A, and every
`resample_interval` steps moves to a new projection (seeded Gaussian or estimated from data,
compact_dist.core.basis), handling A's Adam moments (compact_dist.core.moments).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from compact_dist.core.backend import SUBSPACE_GROUP_KEY
from compact_dist.core.backend_registry import backend_for
from compact_dist.core.basis import kept_fraction, top_eigenvectors, transport_map
from compact_dist.core.config import ALL_ROLES, CompressionConfig
from compact_dist.core.kept_energy import fractions
from compact_dist.core.layers import CompactLinearMixin
from compact_dist.core.moments import reset_moments, transport_moments
from compact_dist.core.rng import rng_untouched


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
        {"params": subspace, "weight_decay": 0.0, SUBSPACE_GROUP_KEY: True},
    ]
    return [g for g in groups if g["params"]]


@torch.no_grad()
def merge_subspace_factors(model: torch.nn.Module, lr: float, weight_decay: float,
                           optimizer=None) -> None:
    """Merge every compact layer: W0 <- W0 (1 - lr wd) + A P^T, A <- 0.

    optimizer: the torch optimizer or the engine's (`engine.optimizer`), which keeps A's
    master; needed for a bf16 A (mixed precision steps an fp32 master that the merge must
    update too); without it A must be fp32. Every rank must call it. The parallel backend
    that holds the factors (compact_dist.core.backend_registry.backend_for) does the merge
    so that every copy of A ends at zero: the plain torch backend merges the module's A
    without communication, layers of one shape together (compact_dist.core.grouped_merge: a
    few launches per group instead of ~7 per layer); an engine that keeps fp32 masters of a
    bf16 A leaves in them only what the bf16 copy rounded away (nothing of the update is lost
    to rounding and nothing is merged twice); one that partitions W0 and A updates each
    rank's partition (ZeRO-3).
    """
    layers = [layer for layer in compact_layers(model) if layer.subspace_factor is not None]
    if not layers:
        return
    backend = backend_for(optimizer, [layer.subspace_factor for layer in layers])
    backend.merge(layers, lr, weight_decay, optimizer)


def _groups():
    """(data-parallel group, its source rank, TP group, its source rank), or Nones without
    torch.distributed / Megatron's parallel state."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if not (dist.is_initialized() and ps.model_parallel_is_initialized()):
        return None, 0, None, 0
    return (ps.get_data_parallel_group(), ps.get_data_parallel_src_rank(),
            ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_src_rank())


def _flat_collective(tensors: list[torch.Tensor], group, src: Optional[int] = None) -> None:
    """One collective over `group` for all `tensors` (packed flat): their sum, or with `src`
    (a global rank) that rank's bits."""
    import torch.distributed as dist

    if not tensors or group is None or dist.get_world_size(group) == 1:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    if src is None:
        dist.all_reduce(flat, group=group)
    else:
        dist.broadcast(flat, src=src, group=group)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def _reduce_sketches(layers: list[CompactLinearMixin]) -> None:
    """Sum every layer's sketch over the data-parallel group, and over the TP group where the
    sketched input or gradient is sharded over TP (one collective per group for all)."""
    dp, _, tp, _ = _groups()
    _flat_collective([layer.sketch.sums for layer in layers], dp)
    _flat_collective([layer.sketch.sums for layer in layers if layer.sketch_sum_over_tp], tp)


def _share_bases(layers: list[CompactLinearMixin], bases: list[Optional[torch.Tensor]]) -> None:
    """Make the bases bit-identical on all ranks: broadcast from the data-parallel group's
    source rank, and from the TP group's for column-parallel layers (whose P is the same on
    every TP rank)."""
    dp, dp_src, tp, tp_src = _groups()
    _flat_collective([b for b in bases if b is not None], dp, src=dp_src)
    _flat_collective([b for layer, b in zip(layers, bases)
                      if b is not None and layer.replicated_over_tp], tp, src=tp_src)


@torch.no_grad()
def estimate_bases(layers: list[CompactLinearMixin]) -> list[Optional[torch.Tensor]]:
    """Finish every layer's sketch now: reduce it, take the top-r_b directions per block and
    share them (see _reduce_sketches / _share_bases). Collective over the whole world; a
    constant number of collectives. Returns one basis per layer (None where the sketch saw
    nothing); sketches are cleared."""
    _reduce_sketches(layers)
    bases = top_eigenvectors([layer.sketch for layer in layers])
    _share_bases(layers, bases)
    for layer in layers:
        layer.sketch = None
    return bases


def resample_projections(model: torch.nn.Module, config: Optional[CompressionConfig] = None,
                         optimizer=None) -> None:
    """Move every compact layer to its next P and apply `config.moments_on_resample` to A's
    Adam state. A layer with a pending sketch takes the estimated P, or keeps its P when the
    sketch saw no data (no training forward since it was armed); one without takes the next
    seeded Gaussian P. Every rank calls (collective when sketches are pending or moments
    move under ZeRO)."""
    layers = compact_layers(model)
    sketched = [layer for layer in layers if layer.sketch is not None]
    bases = dict(zip(map(id, sketched), estimate_bases(sketched))) if sketched else {}
    moving = [layer for layer in layers
              if id(layer) not in bases or bases[id(layer)] is not None]
    policy = config.moments_on_resample if config is not None else "keep"
    olds = [(layer.projection_blocks(torch.float32), layer.basis is not None)
            for layer in moving]
    for layer in moving:
        layer.resample_projection(bases.get(id(layer)))
    moved = [(layer, old) for layer, old in zip(moving, olds)
             if layer.subspace_factor is not None]
    if not moved or policy == "keep":
        return
    if policy == "reset":
        reset_moments(optimizer)
        return
    maps, kept = [], []
    for layer, (old, orthonormal) in moved:
        new = layer.projection_blocks(torch.float32)
        maps.append(transport_map(old, new, orthonormal))
        kept.append(kept_fraction(old, new, maps[-1]))
    transport_moments(optimizer, [layer.subspace_factor for layer, _ in moved], maps, kept)


class SubspaceStepper:
    """Runs the merge after each optimizer step and the resample of P every T steps.

    Gaussian P: a new seeded P every `resample_interval` steps. Data-aware P
    (projection 'pca' / 'gradient'): sketched in step 1's forward (from the initial Gaussian
    P), then in the last step of every `resample_interval` steps, warm-started from the
    current P. 'pca' sketches inside the training forwards of that step (nothing to call);
    'gradient' needs `before_step(probe_loss)` at the start of every step, which runs one
    probe forward/backward when an estimate is due. P switches right after the sketching
    step. `moments_on_resample` applies to A's Adam state at each change of P (pass the torch
    optimizer, or `engine.optimizer`). measure_kept_energy: also measure, with the same
    probe, what P keeps of every compact layer's gradient at the last step of every
    `resample_interval` steps (compact_dist.core.kept_energy; then `before_step(probe_loss)`
    is needed whatever the projection).
    """

    def __init__(self, model: torch.nn.Module, config: CompressionConfig,
                 measure_kept_energy: bool = False):
        self.model = model
        self.config = config
        self.kind = config.kind  # compact_dist.core.projection_kinds
        self.measure_kept_energy = measure_kept_energy
        self.kept_energy: Optional[torch.Tensor] = None  # this step's measurement
        self._steps = 0
        self._arm()

    @property
    def steps(self) -> int:
        """Optimizer steps taken; settable (resume), which re-arms the sketches."""
        return self._steps

    @steps.setter
    def steps(self, value: int) -> None:
        self._steps = int(value)
        self._arm()

    @property
    def data_aware(self) -> bool:
        return self.config.enabled and self.kind.data_aware

    def _estimating(self, step: int) -> bool:
        """Does (0-based) optimizer step `step` sketch the next P?"""
        return self.config.enabled and self.kind.estimates_at(step,
                                                               self.config.resample_interval)

    def _arm(self) -> None:
        """Open sketches for the next step when it estimates P (kind.sketch_in_forward: in
        its forwards)."""
        layers = compact_layers(self.model)
        for layer in layers:
            layer.sketch = None
        if not self._estimating(self._steps):
            return
        for layer in layers:
            layer.start_sketch(self.kind).open = self.kind.sketch_in_forward

    def _measuring(self, step: int) -> bool:
        """Does (0-based) optimizer step `step` measure the kept energy? The last step of every
        `resample_interval` steps: right before P is re-estimated (data-aware) or redrawn
        (Gaussian), when P is the oldest (the first data-aware estimate, at step 0, replaces
        the initial Gaussian P and is not preceded by one)."""
        return (self.measure_kept_energy and self.config.enabled
                and (step + 1) % self.config.resample_interval == 0)

    def before_step(self, probe_loss: Optional[Callable[[], torch.Tensor]] = None) -> bool:
        """Call at the start of each optimizer step. When a probe is due, runs `probe_loss()`
        (a forward on a probe micro-batch returning the scalar loss) and a backward that
        feeds the uncompressed gradients G = dY^T X of every compact layer to what this step
        needs. The model's parameters are frozen meanwhile (requires_grad off, then restored),
        so no backward inside the probe reaches their .grad or an engine's gradient hooks,
        also those that activation recompute runs inside it; probe_loss must therefore make
        an input upstream of the compact layers require grad (a leaf of its own, which gets
        a .grad). Every RNG state is as before (compact_dist.core.rng.rng_untouched). G feeds:
        with projection 'gradient', the sketches of the next P (when an estimate is due); with
        kept-energy telemetry (`measure_kept_energy`, on `_measuring` steps), a
        compact_dist.core.kept_energy accumulator per layer, whose fractions are then in
        `kept_energy` ([layers] fp32, in compact_layers(model) order; None on steps that do
        not measure). One probe serves both. Returns True when it probed."""
        self.kept_energy = None
        estimate = self.kind.needs_probe and self._estimating(self._steps)
        measure = self._measuring(self._steps)
        if not (estimate or measure):
            return False
        if probe_loss is None:
            raise ValueError("projection='gradient' and kept-energy telemetry need "
                             "before_step(probe_loss) at the start of every step")
        layers = compact_layers(self.model)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        # 'pca' sketches open for this step's training forwards must not see the probe
        paused = [layer.sketch for layer in layers
                  if layer.sketch is not None and layer.sketch.open]
        accumulators = [layer.start_kept_energy() for layer in layers] if measure else []
        for sketch in paused:
            sketch.open = False
        for consumer in accumulators + ([layer.sketch for layer in layers] if estimate else []):
            consumer.open = True
        for p in trainable:  # no backward inside the probe's (recompute's) may reach .grad
            p.requires_grad_(False)
        try:
            with rng_untouched():  # dropout in the probe leaves training's draws alone
                loss = probe_loss()
                if not loss.requires_grad:
                    raise RuntimeError(
                        "the probe loss does not require grad: the model's parameters are "
                        "frozen during the probe, so probe_loss must make an input of the "
                        "compact layers require grad (compact-train's probe_loss makes the "
                        "embedding's output a leaf)")
                loss.backward()
        finally:
            for p in trainable:
                p.requires_grad_(True)
            for layer in layers:
                layer.kept_energy = None
                if estimate:
                    layer.sketch.open = False
            for sketch in paused:
                sketch.open = True
        if measure:
            dp, _, tp, _ = _groups()
            self.kept_energy = fractions(accumulators, dp, tp)
        return True

    def after_step(
        self, lr: float, weight_decay: float, optimizer: Optional[torch.optim.Optimizer] = None
    ) -> bool:
        """Merge; returns True when this step also resampled the projections. optimizer:
        the torch optimizer or `engine.optimizer` (A's master and moments; required for a
        bf16 A outside ZeRO 1-3 and for moments_on_resample reset / transport)."""
        merge_subspace_factors(self.model, lr=lr, weight_decay=weight_decay,
                               optimizer=optimizer)
        estimated = self._estimating(self._steps)
        self._steps += 1
        if estimated:
            layers = compact_layers(self.model)
            if self.kind.needs_probe and all(
                    not layer.sketch.sums.any() for layer in layers):
                raise RuntimeError("projection='gradient': no probe ran in this step; call "
                                   "stepper.before_step(probe_loss) before the micro-batches")
            for layer in layers:
                layer.sketch.open = False
        elif self.data_aware or self._steps % self.config.resample_interval:
            self._arm()
            return False
        resample_projections(self.model, self.config, optimizer)
        self._arm()
        return True
