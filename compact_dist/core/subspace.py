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

from compact_dist.core.basis import kept_fraction, top_eigenvectors, transport_map
from compact_dist.core.config import ALL_ROLES, CompressionConfig
from compact_dist.core.grouped_merge import (apply_rows, chunks, finish, group_layers,
                                             merge_layers)
from compact_dist.core.kept_energy import fractions
from compact_dist.core.layers import CompactLinearMixin
from compact_dist.core.masters import plain_masters, zero_linked
from compact_dist.core.moments import SUBSPACE_GROUP_KEY, reset_moments, transport_moments
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


def _is_zero3(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")


@torch.no_grad()
def merge_subspace_factors(model: torch.nn.Module, lr: float, weight_decay: float,
                           optimizer=None) -> None:
    """Merge every compact layer: W0 <- W0 (1 - lr wd) + A P^T, A <- 0.

    optimizer: the torch optimizer or `engine.optimizer`, which keeps A's master; needed for
    a bf16 A outside ZeRO 1-3 (DeepSpeed ZeRO-0 with bf16 keeps full fp32 masters that
    nothing links to A: compact_dist.core.masters); without it A must be fp32.
    Works with plain torch optimizers and DeepSpeed (ZeRO 0-3, fp32 or bf16); every rank must
    call it. Every copy of A ends at zero:
    - ZeRO 0-2: the module's A (after DeepSpeed's step, the bf16 copy of its fp32 master,
      identical on all data-parallel ranks) is merged without any communication; each rank's
      fp32 master (ZeRO 1-2: its fragment) keeps only what the bf16 copy rounded away (zero
      in fp32), so nothing of the update is lost to rounding and nothing is merged twice.
      Layers of one shape are merged together (compact_dist.core.grouped_merge: a few
      launches per group instead of ~7 per layer).
    - ZeRO-3: each rank updates only its own partition of W0, and A's partitions and masters
      are zeroed. Partition-local (no communication) where every rank's W0 partition covers
      only rows of W0 whose rows of A lie in that rank's own A partition (both are flat,
      row-major and cut into equal parts: true whenever the row count divides by the
      data-parallel size, e.g. every layer of the 1.3B / 7B presets on 2, 4 or 8 ranks): the
      update of W0's rows needs only the same rows of A. Otherwise A is gathered from
      DeepSpeed's fp32 master partitions (one all_gather over the data-parallel group per
      256 MiB bucket of masters, not one per layer). The fp32 masters are read and zeroed
      in place (DeepSpeed's accessors synchronize the host on every call), and the
      partition-local layers of one shape are merged together. Where DeepSpeed holds W0
      whole (a persistent parameter, fewer elements than
      stage3_param_persistence_threshold, or one a no-grad forward left gathered), forward
      uses that copy instead of gathering: A is gathered, every rank merges the copy (the
      same inputs on every rank: the same bits) and copies its partition out of it. Which
      layers gather is agreed over the group (one all_reduce of a flag per layer). Both
      paths give the same bits.
    """
    layers = [layer for layer in compact_layers(model) if layer.subspace_factor is not None]
    zero3 = [layer for layer in layers if _is_zero3(layer.subspace_factor)]
    plain = [layer.subspace_factor for layer in layers
             if not zero_linked(layer.subspace_factor)]
    masters = {id(f): m for f, m in zip(plain, plain_masters(optimizer, plain)) if m is not None}
    merge_layers([layer for layer in layers if not _is_zero3(layer.subspace_factor)],
                 lr, weight_decay, masters)
    if not zero3:
        return
    from compact_dist.deepspeed.zero3_factor import release

    for layer in zero3:  # a forward without backward may have left A gathered
        if layer.zero3_forward_factor is not None:
            release(layer.subspace_factor)
    _wait_for_zero3_reduce(zero3[0].subspace_factor)
    local, gathered = _split_partition_local(zero3)
    _merge_partition_local(local, lr, weight_decay)
    for layer, master in _gathered_zero3_masters(gathered):
        factor, w0 = layer.subspace_factor, layer.weight
        if not _is_zero3(w0) or _holds_full_copy(w0):
            layer.merge_subspace(lr, weight_decay, factor=master)
            if _is_zero3(w0):  # W0 held whole: its partition is a slice of the full copy
                part, start, valid = _own_partition(w0)
                part.copy_(w0.detach().view(-1).narrow(0, start, valid))
        else:
            part, start, valid = _own_partition(w0)
            layer.merge_subspace(lr, weight_decay, factor=master, base_flat=part,
                                 base_start=start)
        factor.ds_tensor.zero_()
        _zero_master(factor)


def _wait_for_zero3_reduce(param: torch.Tensor) -> None:
    """Order the merge after DeepSpeed's gradient reduce stream (what its fp32 accessors wait
    for with a host synchronize on every call) without blocking the host."""
    stream = getattr(param._z3_optimizer, "reduce_and_partition_stream", None)
    if isinstance(stream, torch.cuda.Stream) and stream != torch.cuda.current_stream():
        torch.cuda.current_stream().wait_stream(stream)


def _masters_in_place(param: torch.Tensor) -> bool:
    """Are the ZeRO-3 fp32 masters on the device, neither offloaded nor swapped?"""
    opt = param._z3_optimizer
    return not (getattr(opt, "offload_optimizer", True) or getattr(opt, "swap_optimizer", True))


def _local_master(param: torch.Tensor) -> torch.Tensor:
    """This rank's fp32 master partition of a ZeRO-3 parameter [ds_tensor.ds_numel]: a view
    into DeepSpeed's flat fp32 group, read and written in place. DeepSpeed's own accessor
    (safe_get_local_fp32_param) synchronizes its reduce stream, i.e. the host, on every call
    (once per layer); _wait_for_zero3_reduce orders the merge once instead. Masters that are
    offloaded or swapped go through the accessor (a copy; _zero_master writes it back)."""
    from deepspeed.utils import safe_get_local_fp32_param

    if not _masters_in_place(param):
        return safe_get_local_fp32_param(param)
    opt = param._z3_optimizer
    group, offset, numel = opt.grad_position[opt.get_param_id(param)]
    return opt.fp32_partitioned_groups_flat[group].narrow(0, offset, numel)


def _zero_master(param: torch.Tensor) -> None:
    """Zero this rank's fp32 master partition of a ZeRO-3 parameter."""
    from deepspeed.utils import safe_set_local_fp32_param

    if not _masters_in_place(param):
        safe_set_local_fp32_param(param, torch.zeros_like(param.ds_tensor))
    else:
        _local_master(param).zero_()


def _row_span(param: torch.Tensor, rank: int, row_len: int, whole: bool) -> tuple[int, int]:
    """Rows [lo, hi) of a ZeRO-3 parameter (flat, row-major, rows of `row_len`) in `rank`'s
    partition: the rows it holds whole (whole=True) or the rows it touches."""
    size = param.ds_tensor.ds_numel
    start = min(rank * size, param.ds_numel)
    end = min(start + size, param.ds_numel)
    if whole:
        return -(-start // row_len), end // row_len
    return start // row_len, -(-end // row_len)


def _rows_align(layer, world: int) -> bool:
    """Does every rank's W0 partition touch only rows that its own A partition holds whole?"""
    w0, factor = layer.weight, layer.subspace_factor
    for rank in range(world):
        lo, hi = _row_span(w0, rank, w0.ds_shape[1], whole=False)
        if hi > lo:
            a_lo, a_hi = _row_span(factor, rank, factor.ds_shape[1], whole=True)
            if lo < a_lo or hi > a_hi:
                return False
    return True


def _split_partition_local(layers: list) -> tuple[list, list]:
    """(layers merged partition-locally, layers that need A gathered), the same on every rank
    of the data-parallel group (one all_reduce of a flag per layer: a W0 held whole on any
    rank, or rows that do not align, send the layer to the gather)."""
    import torch.distributed as dist

    if not layers:
        return [], []
    group = layers[0].subspace_factor.ds_process_group
    world = dist.get_world_size(group=group)
    need = torch.tensor([not _is_zero3(layer.weight) or _holds_full_copy(layer.weight)
                         or not _rows_align(layer, world) for layer in layers],
                        dtype=torch.int32, device=layers[0].subspace_factor.ds_tensor.device)
    if world > 1:
        dist.all_reduce(need, op=dist.ReduceOp.MAX, group=group)
    flags = need.tolist()
    return ([l for l, f in zip(layers, flags) if not f], [l for l, f in zip(layers, flags) if f])


def _merge_partition_local(layers: list, lr: float, weight_decay: float) -> None:
    """Merge this rank's W0 partitions from this rank's fp32 master rows of A, zero A's.
    Layers of one shape share their partition geometry and go together (grouped_merge:
    one GEMM and one update launch per chunk)."""
    import torch.distributed as dist

    decay = 1.0 - lr * weight_decay
    for group in group_layers(layers):
        factor, w0 = group[0].subspace_factor, group[0].weight
        rank = dist.get_rank(group=factor.ds_process_group)
        r, n = factor.ds_shape[1], w0.ds_shape[1]
        a_start = rank * factor.ds_tensor.ds_numel  # flat index of A's partition in A
        _, start, valid = _own_partition(w0)
        row0, row1 = start // n, -(-(start + valid) // n)  # rows of W0 the partition touches
        # A's rows row0..row1 lie whole in this rank's A partition (_rows_align), from flat
        # row0 r - a_start on. (Where _rows_align holds on every rank, both partitions start
        # on a row boundary: a row of A split between two ranks is whole on neither, yet one
        # of them updates that row of W0; a row of W0 split between two would need its row
        # of A whole on both.)
        for chunk in chunks(group, (row1 - row0) * n):
            masters = [_local_master(layer.subspace_factor) for layer in chunk]
            if valid:
                rows = torch.stack([m.narrow(0, row0 * r - a_start, (row1 - row0) * r)
                                    for m in masters]).view(len(chunk), row1 - row0, r)
                apply_rows(chunk, rows.to(factor.dtype),
                           [_own_partition(layer.weight)[0] for layer in chunk],
                           start - row0 * n, start, decay)
            torch._foreach_zero_([layer.subspace_factor.ds_tensor for layer in chunk])
            if _masters_in_place(factor):
                torch._foreach_zero_(masters)  # views into DeepSpeed's flat fp32 groups
            else:
                for layer in chunk:
                    _zero_master(layer.subspace_factor)
            finish(chunk)


# elements of fp32 masters gathered per collective in the ZeRO-3 merge (256 MiB)
ZERO3_MERGE_BUCKET = 64 * 2**20


def _gathered_zero3_masters(layers: list, bucket: int = ZERO3_MERGE_BUCKET):
    """Yield (layer, full fp32 master of its A [out, r]) for ZeRO-3 layers, gathering the
    masters' partitions in buckets of about `bucket` elements: one all_gather over the
    data-parallel group per bucket instead of one per layer (DeepSpeed's
    safe_get_full_fp32_param). Every rank calls with the same layers in the same order."""
    import torch.distributed as dist

    start = 0
    while start < len(layers):
        group = layers[start].subspace_factor.ds_process_group
        world = dist.get_world_size(group=group)
        stop, size = start, 0
        while stop < len(layers) and (stop == start or size + layers[stop].subspace_factor.ds_numel
                                      <= bucket):
            size += layers[stop].subspace_factor.ds_tensor.ds_numel * world
            stop += 1
        chunk = layers[start:stop]
        local = [_local_master(layer.subspace_factor).reshape(-1) for layer in chunk]
        sizes = [t.numel() for t in local]
        gathered = torch.empty(world, sum(sizes), dtype=local[0].dtype, device=local[0].device)
        dist.all_gather_into_tensor(gathered.view(-1), torch.cat(local), group=group)
        offset = 0
        for layer, n in zip(chunk, sizes):
            factor = layer.subspace_factor
            full = gathered[:, offset:offset + n].reshape(-1)[:factor.ds_numel]
            yield layer, full.view(factor.ds_shape)
            offset += n
        start = stop


def _own_partition(param: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(this rank's ZeRO-3 partition of `param` without padding, as a flat view; the flat
    index where it starts; its length)."""
    part = param.ds_tensor
    start = part.ds_numel * torch.distributed.get_rank(group=param.ds_process_group)
    valid = max(0, min(part.ds_numel, param.ds_numel - start))
    return part.narrow(0, 0, valid), start, valid


def _holds_full_copy(param: torch.Tensor) -> bool:
    """Does DeepSpeed (ZeRO-3) hold `param`'s full tensor right now (a persistent parameter,
    or one still gathered), which forward would use instead of gathering the partitions?"""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return param.ds_status == ZeroParamStatus.AVAILABLE and param.numel() == param.ds_numel


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
        return self.config.enabled and self.config.projection != "gaussian"

    def _estimating(self, step: int) -> bool:
        """Does (0-based) optimizer step `step` sketch the next P?"""
        return self.data_aware and (step == 0 or (step + 1) % self.config.resample_interval == 0)

    def _arm(self) -> None:
        """Open sketches for the next step when it estimates P ('pca': in its forwards)."""
        layers = compact_layers(self.model)
        for layer in layers:
            layer.sketch = None
        if not self._estimating(self._steps):
            return
        for layer in layers:
            layer.start_sketch(self.config.projection).open = self.config.projection == "pca"

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
        so no backward inside the probe reaches their .grad or DeepSpeed's gradient hooks,
        also those that activation recompute runs inside it; probe_loss must therefore make
        an input upstream of the compact layers require grad (a leaf of its own, which gets
        a .grad). Every RNG state is as before (compact_dist.core.rng.rng_untouched). G feeds:
        with projection 'gradient', the sketches of the next P (when an estimate is due); with
        kept-energy telemetry (`measure_kept_energy`, on `_measuring` steps), a
        compact_dist.core.kept_energy accumulator per layer, whose fractions are then in
        `kept_energy` ([layers] fp32, in compact_layers(model) order; None on steps that do
        not measure). One probe serves both. Returns True when it probed."""
        self.kept_energy = None
        estimate = self.config.projection == "gradient" and self._estimating(self._steps)
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
            if self.config.projection == "gradient" and all(
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
