"""ZeRO-3's subspace merge: W0 and A partitioned over the data-parallel group.

Each rank updates only its own partition of W0, and A's partitions and fp32 masters are
zeroed. Partition-local (no communication) where every rank's W0 partition covers only rows
of W0 whose rows of A lie in that rank's own A partition (both are flat, row-major and cut
into equal parts: true whenever the row count divides by the data-parallel size, e.g. every
layer of the 1.3B / 7B presets on 2, 4 or 8 ranks): the update of W0's rows needs only the
same rows of A. Otherwise A is gathered from DeepSpeed's fp32 master partitions (one
all_gather over the data-parallel group per 256 MiB bucket of masters, not one per layer).
The fp32 masters are read and zeroed in place (DeepSpeed's accessors synchronize the host on
every call), and the partition-local layers of one shape are merged together
(compact_dist.core.grouped_merge). Where DeepSpeed holds W0 whole (a persistent parameter,
fewer elements than stage3_param_persistence_threshold, or one a no-grad forward left
gathered), forward uses that copy instead of gathering: A is gathered, every rank merges the
copy (the same inputs on every rank: the same bits) and copies its partition out of it.
Which layers gather is agreed over the group (one all_reduce of a flag per layer). Both
paths give the same bits.
"""

from __future__ import annotations

import torch

from compact_dist.core.grouped_merge import apply_rows, chunks, finish, group_layers
from compact_dist.deepspeed.zero3_factor import release


def is_zero3(p: torch.Tensor) -> bool:
    """Is `p` a ZeRO-3 partitioned parameter?"""
    return hasattr(p, "ds_id")


@torch.no_grad()
def merge_zero3(layers: list, lr: float, weight_decay: float) -> None:
    """Merge the ZeRO-3 layers (the module docstring); every rank calls with the same
    layers."""
    if not layers:
        return
    for layer in layers:  # a forward without backward may have left A gathered
        if layer.forward_factor_hook is not None:
            release(layer.subspace_factor)
    _wait_for_zero3_reduce(layers[0].subspace_factor)
    local, gathered = _split_partition_local(layers)
    _merge_partition_local(local, lr, weight_decay)
    for layer, master in _gathered_zero3_masters(gathered):
        factor, w0 = layer.subspace_factor, layer.weight
        if not is_zero3(w0) or _holds_full_copy(w0):
            layer.merge_subspace(lr, weight_decay, factor=master)
            if is_zero3(w0):  # W0 held whole: its partition is a slice of the full copy
                part, start, valid = own_partition(w0)
                part.copy_(w0.detach().view(-1).narrow(0, start, valid))
        else:
            part, start, valid = own_partition(w0)
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


def local_master(param: torch.Tensor) -> torch.Tensor:
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
        local_master(param).zero_()


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
    need = torch.tensor([not is_zero3(layer.weight) or _holds_full_copy(layer.weight)
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
        _, start, valid = own_partition(w0)
        row0, row1 = start // n, -(-(start + valid) // n)  # rows of W0 the partition touches
        # A's rows row0..row1 lie whole in this rank's A partition (_rows_align), from flat
        # row0 r - a_start on. (Where _rows_align holds on every rank, both partitions start
        # on a row boundary: a row of A split between two ranks is whole on neither, yet one
        # of them updates that row of W0; a row of W0 split between two would need its row
        # of A whole on both.)
        for chunk in chunks(group, (row1 - row0) * n):
            masters = [local_master(layer.subspace_factor) for layer in chunk]
            if valid:
                rows = torch.stack([m.narrow(0, row0 * r - a_start, (row1 - row0) * r)
                                    for m in masters]).view(len(chunk), row1 - row0, r)
                apply_rows(chunk, rows.to(factor.dtype),
                           [own_partition(layer.weight)[0] for layer in chunk],
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
        local = [local_master(layer.subspace_factor).reshape(-1) for layer in chunk]
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


def own_partition(param: torch.Tensor) -> tuple[torch.Tensor, int, int]:
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
