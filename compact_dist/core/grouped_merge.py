"""The subspace merge of many layers at once: W0 <- W0 (1 - lr wd) + s A P^T, A <- 0.

Merging layer by layer costs a few small kernels and some Python per layer after every
optimizer step (96 layers in a 24-layer GPT), host time that a host-bound step (TP >= 2, small
models) pays in full. Here layers whose tensors have the same shapes, dtypes, device and merge
scale (the same role in every transformer layer) are merged together, a chunk at a time:

    A [L, m, r] = stack of the module A's      (module dtype, bf16 on GPUs)
    P [L, n, r] or [L, kb, n/kb, r/kb]         (A's dtype, projection.operand's form)
    delta [L, m, n] = A P^T                    (one bmm, fp32 accumulation)
    fp32 W0: _foreach_mul_(decay), _foreach_add_(fp32 delta, alpha=s)
    bf16 W0 or bf16 pair: one stochastic-rounding kernel over all L (compact_dist.core.rounding)
    A: _foreach_zero_

a constant number of kernels per chunk. The math, the operand dtypes and the stochastic
rounding streams (seed, layer id, merge count, TP rank, element) are those of
`merge_layer` (CompactLinearMixin.merge_subspace), this update for a group of one, so a layer ends in the same state either way (up to the summation order of the
GEMM). Chunks keep delta under MERGE_CHUNK_BYTES (at least one layer).

Used for the module's own A (`merge_layers`: the backends whose optimizer writes the updated
A into the module, i.e. plain torch and ZeRO 0-2; the optimizer's fp32 copies of A keep only
the rounding residual; masters in host memory, as ZeRO-Offload keeps them, get A copied
there) and by backends that partition W0 for their partition-local merge
(through `group_layers`, `chunks`, `apply_rows`, `finish`); a layer that needs A gathered
goes through merge_subspace alone.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Optional

import torch
from megatron.core.utils import get_pg_rank

from compact_dist.core.projection import block_seed
from compact_dist.core.rounding import merge_into_bf16_many_

# the largest delta [L, m, n] one chunk materialises (bytes); a layer larger than it is
# merged alone
MERGE_CHUNK_BYTES = 128 * 2**20


def _group_key(layer) -> tuple:
    w, a = layer.weight, layer.subspace_factor
    p = layer.projection
    # the shapes the layer was built with: an engine that partitions W0 or A (ZeRO-3) leaves
    # a placeholder in the parameter
    return (layer.base_shape, w.dtype, layer.weight_lo is not None, layer.factor_shape,
            a.dtype, w.device, (p.local_blocks, p.block_in, p.block_rank), layer.merge_scale)


def unproject_many(factors: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """A P^T per layer: factors [L, m, r] -> [L, m, n]; p holds each layer's P as a matrix
    [L, n, r] or as diagonal blocks [L, kb, n/kb, r/kb] (compact_dist.core.projection.unproject
    with a leading layer dimension; `operand` says which form a layer multiplies with)."""
    if p.dim() == 3:
        return torch.bmm(factors, p.transpose(1, 2))
    n_layers, m, _ = factors.shape
    _, kb, b, rb = p.shape
    a = factors.view(n_layers, m, kb, rb).permute(0, 2, 1, 3).reshape(n_layers * kb, m, rb)
    out = torch.bmm(a, p.reshape(n_layers * kb, b, rb).transpose(1, 2))
    return out.view(n_layers, kb, m, b).permute(0, 2, 1, 3).reshape(n_layers, m, kb * b)


def group_layers(layers: list) -> list[list]:
    """The layers in groups of equal shapes, dtypes, device, P blocks and merge scale."""
    groups: dict[tuple, list] = defaultdict(list)
    for layer in layers:
        groups[_group_key(layer)].append(layer)
    return list(groups.values())


def chunks(group: list, elements_per_layer: int) -> list[list]:
    """`group` in consecutive chunks whose deltas (`elements_per_layer` each; in A's dtype,
    plus their fp32 copy for an fp32 W0) stay under MERGE_CHUNK_BYTES (at least one layer
    each)."""
    w, a = group[0].weight, group[0].subspace_factor
    per_element = a.element_size() + (4 if w.dtype == torch.float32 != a.dtype else 0)
    size = max(1, MERGE_CHUNK_BYTES // max(1, elements_per_layer * per_element))
    return [group[i:i + size] for i in range(0, len(group), size)]


@torch.no_grad()
def merge_layers(layers: list, lr: float, weight_decay: float,
                 masters: Optional[dict] = None) -> None:
    """Merge each layer's module A into its full W0 and zero A (what merge_subspace(lr,
    weight_decay) does for each), grouped by shape. Every fp32 copy of A the optimizer steps
    keeps only what the (bf16) module A rounded away (the copy minus A): the update lives on
    in W0, nothing of it in the optimizer's copy. masters: id(A) -> the
    compact_dist.core.backend.MasterSlice of A's master on this rank (the backend's
    master_slices), for the A's that have one apart from A itself."""
    decay = 1.0 - lr * weight_decay
    for group in group_layers(layers):
        for chunk in chunks(group, group[0].weight.numel()):
            _merge_chunk(chunk, decay, masters or {})


def _merge_chunk(layers: list, decay: float, masters: dict) -> None:
    factors = [layer.subspace_factor for layer in layers]
    stacked = torch.stack([f.detach() for f in factors])  # [L, m, r]
    highs, spans = [], []  # the fp32 copies, and (layer, start, numel) of A they hold
    for i, factor in enumerate(factors):
        master = masters.get(id(factor))
        if master is not None:
            highs.append(master.tensor)
            spans.append((i, master.start, master.numel))
    if highs:
        flat = stacked.view(len(layers), -1)
        if flat.device != highs[0].device:  # masters in host memory (ZeRO-Offload): one copy
            flat = flat.to(highs[0].device)  # of the chunk's A, in A's dtype
        flat = flat.float()  # one cast for the chunk (A is small)
        torch._foreach_sub_(highs, [flat[i].narrow(0, start, numel)
                                    for i, start, numel in spans])
    lows = (None if layers[0].weight_lo is None
            else [layer.weight_lo.view(-1) for layer in layers])
    apply_rows(layers, stacked, [layer.weight.view(-1) for layer in layers], 0, 0, decay, lows)
    finish(layers)


def apply_rows(layers: list, rows: torch.Tensor, bases: list[torch.Tensor], offset: int,
               base_start: int, decay: float,
               lows: Optional[list[torch.Tensor]] = None) -> None:
    """bases[i] <- bases[i] * decay + s (rows[i] P_i^T).flat[offset : offset + numel] for
    layers of one group: rows [L, k, r] (rows of A in A's module dtype), bases: flat W0
    slices of one length (the whole W0, or a ZeRO-3 partition starting at flat index
    `base_start` of W0, `offset` elements into its first row); lows: the bf16 pair's low
    words of the same slices (W0 = base + low), required for pair layers. bf16 bases (the
    pair: the low words) are rounded stochastically with noise streams of (seed, layer id,
    -1 - merge count (negative "epochs": apart from the projections' streams),
    TP rank << 40 + start)."""
    first = layers[0]
    if (first.weight_lo is not None) != (lows is not None):
        raise ValueError("apply_rows: the low words of a bf16-pair W0 are required (and only "
                         "for one)")
    p = torch.stack([layer.projection_operand(rows.dtype) for layer in layers])
    numel = bases[0].numel()
    delta = unproject_many(rows, p).view(len(layers), -1).narrow(1, offset, numel)
    scale = first.merge_scale
    if bases[0].dtype == torch.float32:
        if decay != 1.0:
            torch._foreach_mul_(bases, decay)
        # one dtype on both sides: foreach's fused multi-tensor kernels (mixed dtypes fall
        # back to one add_ per layer)
        torch._foreach_add_(bases, list(delta.float().unbind(0)), alpha=scale)
        return
    tp_rank = get_pg_rank(first.tp_group)
    seeds = [block_seed(layer.compression.seed, layer.layer_id, -1 - layer.merge_count,
                        (tp_rank << 40) + base_start) for layer in layers]
    merge_into_bf16_many_(bases, delta, scale, decay, seeds, lows)


@torch.no_grad()
def merge_layer(layer, lr: float = 0.0, weight_decay: float = 0.0,
                factor: Optional[torch.Tensor] = None, base_flat: Optional[torch.Tensor] = None,
                base_start: int = 0) -> None:
    """W0 <- W0 (1 - lr * weight_decay) + s A P^T; A <- 0 for one layer (decoupled decay on
    W_eff; s = layer.merge_scale): the grouped update for a group of one.

    factor: the value of A to merge, shape [out, r] of this TP shard (default: the module's
        A; a backend may pass its fp32 master copy). The module's A is zeroed either way;
        other copies (optimizer masters, partitions) are the caller's.
    base_flat, base_start: the flat slice W0.view(-1)[base_start : base_start + numel] to
        update (default: all of W0; a backend that partitions W0: this rank's partition;
        not with the bf16 pair).
    With a bf16 W0 the sum is rounded stochastically (the pair: its low word), with noise
    that depends on (seed, layer id, merge count, TP rank, slice start) only, so
    data-parallel replicas stay equal and the TP shards of one W0 draw independent noise.
    """
    module_factor = layer.subspace_factor
    if module_factor is None:
        return
    factor = module_factor if factor is None else factor
    base = layer.weight.view(-1) if base_flat is None else base_flat
    n = layer.weight.shape[1] if base_flat is None else layer.projection.local_in
    if layer.weight_lo is not None and base_flat is not None:
        raise ValueError("merge_subspace: a slice of a bf16-pair W0 (a partitioned W0) "
                         "is not supported")
    lows = None if layer.weight_lo is None else [layer.weight_lo.view(-1)]
    if base.numel():
        # rows of W0 that the slice touches, and A P^T for just those rows, in A's module
        # dtype (bf16 on GPUs: tensor cores with fp32 accumulation; an fp32 GEMM of this
        # size per layer and step would cost more than the layer's forward): the grouped
        # merge's update for a group of one
        row0, row1 = base_start // n, -(-(base_start + base.numel()) // n)
        rows = factor[row0:row1].to(module_factor.dtype).unsqueeze(0)
        apply_rows([layer], rows, [base], base_start - row0 * n, base_start,
                   1.0 - lr * weight_decay, lows)
    finish([layer])


def finish(layers: list) -> None:
    """Zero the module A's (one launch) and mark them zero; count the merge."""
    torch._foreach_zero_([layer.subspace_factor for layer in layers])
    for layer in layers:
        layer.mark_factor_zero()
        layer.merge_count += 1
