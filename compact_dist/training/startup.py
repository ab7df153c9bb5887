"""What compact-train prints before step 1: parameter counts, the resolved parallel layout, the
per-linear table of bytes saved for backward (`linear_memory_table`) and the whole model's
saved-activation ratio (what the table's per-linear ratio means for the run's activation
memory)."""

from __future__ import annotations

import torch


def parameter_counts(model: torch.nn.Module, tensor_model_parallel_size: int) -> dict[str, int]:
    """Global parameter counts of the model (every TP shard, counted once): total, trainable
    (the subspace factors A included), factors (A alone) and frozen (the compact layers' W0).
    A tensor Megatron splits over TP (`tensor_model_parallel` attribute: equal shards) counts
    TP times its local size; replicated ones (norms) once. No collective."""
    from compact_dist.core.subspace import compact_layers

    factors = {id(layer.subspace_factor) for layer in compact_layers(model)
               if layer.subspace_factor is not None}
    counts = {"total": 0, "trainable": 0, "factors": 0, "frozen": 0}
    for p in model.parameters():
        n = p.numel() * (tensor_model_parallel_size
                         if getattr(p, "tensor_model_parallel", False) else 1)
        counts["total"] += n
        counts["trainable" if p.requires_grad else "frozen"] += n
        if id(p) in factors:
            counts["factors"] += n
    return counts


def parameter_line(counts: dict[str, int]) -> str:
    line = f"parameters: {counts['total']:,} total, {counts['trainable']:,} trainable"
    if counts["factors"]:
        line += f" (subspace factors A: {counts['factors']:,})"
    return line + f", {counts['frozen']:,} frozen (W0)"


def layout_line(world: int, tp: int, sequence_parallel: bool, zero_stage: int,
                micro_batch: int, grad_accum: int, seq_length: int, precision: str,
                engine: str = "deepspeed") -> str:
    """The resolved parallel layout and batch (DP = world / TP, no pipeline parallelism)."""
    dp = world // tp
    sharding = f"ZeRO-{zero_stage}" if engine == "deepspeed" else f"FSDP2 (as ZeRO-{zero_stage})"
    global_batch = micro_batch * grad_accum * dp
    return (f"layout: world {world} = TP {tp} x DP {dp} (PP 1), sequence parallel "
            f"{'on' if sequence_parallel else 'off'}, {sharding}, {precision}; "
            f"micro batch {micro_batch}, global batch {global_batch} sequences = "
            f"{global_batch * seq_length:,} tokens (gradient accumulation {grad_accum})")


_ROLES = (("qkv", "self_attention.linear_qkv"), ("proj", "self_attention.linear_proj"),
          ("fc1", "mlp.linear_fc1"), ("fc2", "mlp.linear_fc2"))


def linear_memory_table(model: torch.nn.Module, seq_length: int, micro_batch: int,
                        device: torch.device) -> str:
    """Per linear role of the first transformer layer: bytes its backward keeps for one
    micro-batch, measured, next to what Megatron's layer keeps (its whole input). Collective
    under tensor parallelism (every TP rank must call); run it before ZeRO-3 partitions."""
    from compact_dist.core.layers import CompactLinearMixin
    from compact_dist.training import saved_tensors

    layer = model.decoder.layers[0]
    dtype = next(p for p in model.parameters() if p.requires_grad).dtype
    rows = [f"bytes saved for backward per linear (one micro-batch, s={seq_length}, "
            f"b={micro_batch}, {str(dtype).replace('torch.', '')}, this TP rank):",
            f"  {'linear':<6}{'uncompressed':>14}{'this run':>14}{'ratio':>8}"]
    for role, path in _ROLES:
        linear = layer.get_submodule(path)
        width = getattr(linear, "input_size_per_partition", linear.input_size)
        seq = seq_length
        if getattr(linear, "sequence_parallel", False) and not hasattr(
                linear, "input_size_per_partition"):
            seq //= linear.tp_group.size()  # column-parallel input is sequence-sharded
        x = torch.randn(seq, micro_batch, width, device=device, dtype=dtype, requires_grad=True)
        full = x.numel() * x.element_size()
        saved = saved_tensors.saved_activation_bytes(lambda: linear(x), linear) if isinstance(
            linear, CompactLinearMixin) else full
        rows.append(f"  {role:<6}{full:>14,}{saved:>14,}{saved / full:>8.3f}")
    return "\n".join(rows)


@torch.no_grad()
def _random_batch(model, micro_batch: int, seq_length: int, device: torch.device, seed: int):
    gen = torch.Generator().manual_seed(seed)  # the same tokens on every TP rank
    tokens = torch.randint(0, model.vocab_size, (micro_batch, seq_length), generator=gen)
    positions = torch.arange(seq_length).unsqueeze(0).expand(micro_batch, -1)
    return tokens.to(device), positions.to(device), torch.roll(tokens, -1, 1).to(device)


def saved_activation_bytes(model: torch.nn.Module, micro_batch: int, seq_length: int,
                           device: torch.device, seed: int) -> tuple[int, int]:
    """(bytes this model saves for backward in one training forward of one micro-batch, the
    bytes it saves with every compact linear keeping its whole input X as Megatron's linear
    does), this rank, measured by compact-memory's `record_saved_tensors` (each storage once,
    parameters excluded). The second forward sets `exact_input` on every compact layer (X
    saved, Z not formed), the layers of `compression.enabled=false`. Collective under TP
    (every TP rank calls); leaves every RNG stream as it was (compact_dist.core.rng)."""
    from compact_dist.core.rng import rng_untouched
    from compact_dist.core.subspace import compact_layers
    from compact_dist.training.saved_tensors import record_saved_tensors

    tokens, positions, labels = _random_batch(model, micro_batch, seq_length, device, seed)

    def total() -> int:
        with rng_untouched(), torch.enable_grad():
            records = record_saved_tensors(
                lambda: model(tokens, positions, None, labels=labels), model)
        return sum(r.nbytes for r in records)

    was_training = model.training
    model.train()
    layers = compact_layers(model)
    settings = [layer.compression for layer in layers]
    try:
        compact = total()
        for layer in layers:
            layer.compression = layer.compression.model_copy(update={"exact_input": True})
        uncompressed = total() if layers else compact
    finally:
        for layer, setting in zip(layers, settings):
            layer.compression = setting
        model.train(was_training)
    return compact, uncompressed


def saved_activation_line(compact: int, uncompressed: int) -> str:
    return (f"saved for backward, whole model (one micro-batch, this rank): "
            f"{compact / 2**20:,.1f} MiB with CompAct vs {uncompressed / 2**20:,.1f} MiB with "
            f"Megatron's linears: ratio {compact / uncompressed:.3f} (the table above is per "
            f"linear; attention, norms, SwiGLU and the loss keep the rest; compact-memory "
            f"itemises it)")
