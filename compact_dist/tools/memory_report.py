"""`compact-memory`: where the memory of a run goes, measured on the model itself.

    compact-memory [--config X.yaml] [section.key=value ...] [--world-size N] [--json]

Builds the model of a compact-train config on this process's device (CPU works; one process
at TP=1, or every rank under torchrun) and reports
(a) the tensors autograd keeps for backward in one training forward of one micro-batch
    (`record_saved_tensors`: saved_tensors_hooks; each storage counted once, parameters
    excluded), each attributed to the innermost stack frame inside megatron/ or compact_dist/
    ("attention.py:81 SDPACoreAttention.forward.<locals>.attend") and to the transformer
    layer running at the time; grouped per site for layer 0, totals per layer and outside;
(b) the static bytes per GPU (`static_bytes`): W0 (frozen bases), A (trainable factors), other
    trainable parameters, their gradients, fp32 masters and Adam moments as the config's ZeRO
    stage partitions them over the data-parallel size, from the model's actual parameters.

`compact_dist.tools.memory_plan` predicts the same two quantities from formulas (`compact-plan`).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import sys
from typing import Optional

import torch

from compact_dist.training.saved_tensors import SavedTensor, record_saved_tensors

def static_bytes(*, w0_bytes: float, w0_elems: float, a: float, other: float, zero_stage: int,
                 dp: int, bf16: bool) -> dict[str, float]:
    """Bytes per GPU of the parameters and optimizer state (this TP rank's shards).

    w0_bytes / w0_elems: the frozen bases at their storage dtype; a / other: elements of the
    trainable factors and of every other trainable parameter (training dtype: bf16 or fp32).
    DeepSpeed (engine.deepspeed_config): ZeRO-1 partitions the fp32 masters and Adam moments
    over dp, ZeRO-2 also the gradients, ZeRO-3 also the parameters (W0 included, in the
    training dtype). Without ZeRO, bf16 training keeps full fp32 masters (DeepSpeed's
    bf16 optimizer wrapper), fp32 training none. Frozen W0 has no gradient, master or moment.
    """
    e = 2 if bf16 else 4
    trainable = a + other
    part = dp if zero_stage >= 1 else 1
    w0 = w0_elems * e / dp if zero_stage == 3 else w0_bytes
    params_div = dp if zero_stage == 3 else 1
    return {
        "W0 (frozen bases)": w0,
        "A (trainable factors)": a * e / params_div,
        "other trainable params": other * e / params_div,
        "gradients": trainable * e / (dp if zero_stage >= 2 else 1),
        "fp32 masters": (4 * trainable / part) if (bf16 or zero_stage >= 1) else 0.0,
        "Adam moments": 8 * trainable / part,
    }


def model_static_bytes(model: torch.nn.Module, zero_stage: int, dp: int,
                       bf16: bool) -> dict[str, float]:
    """`static_bytes` from a built model's parameters (before any ZeRO partitioning)."""
    from compact_dist.core.subspace import compact_layers

    bases = {id(layer.weight) for layer in compact_layers(model)
             if layer.subspace_factor is not None}
    factors = {id(layer.subspace_factor) for layer in compact_layers(model)
               if layer.subspace_factor is not None}
    w0_bytes = w0_elems = a = other = frozen_other = 0
    for p in model.parameters():
        if id(p) in bases:
            w0_bytes += p.numel() * p.element_size()
            w0_elems += p.numel()
        elif id(p) in factors:
            a += p.numel()
        elif p.requires_grad:
            other += p.numel()
        else:
            frozen_other += p.numel() * p.element_size()
    w0_bytes += sum(layer.weight_lo.numel() * 2 for layer in compact_layers(model)
                    if layer.weight_lo is not None)  # the bf16 pair's low words (buffers)
    out = static_bytes(w0_bytes=w0_bytes + frozen_other, w0_elems=w0_elems, a=a, other=other,
                       zero_stage=zero_stage, dp=dp, bf16=bf16)
    return out


def summarize(records: list[SavedTensor]) -> dict:
    """Totals: per layer, outside the layers, overall; per-site rows of layer 0 and outside."""
    per_layer: dict = collections.defaultdict(int)
    for r in records:
        per_layer[r.layer] += r.nbytes

    def sites(layer):
        rows: dict = {}
        for r in records:
            if r.layer == layer:
                row = rows.setdefault(r.site, {"site": r.site, "bytes": 0, "tensors": []})
                row["bytes"] += r.nbytes
                row["tensors"].append(f"{list(r.shape)} {r.dtype}")
        return list(rows.values())

    return {
        "total_bytes": sum(per_layer.values()),
        "per_layer_bytes": {str(k): v for k, v in sorted(per_layer.items(),
                                                         key=lambda kv: (kv[0] is None, kv[0] or 0))},
        "layer0_sites": sites(0),
        "outside_sites": sites(None),
    }


def _mib(x: float) -> str:
    return f"{x / 2 ** 20:10.2f} MiB"


def format_report(report: dict) -> str:
    a, s = report["saved"], report["static"]
    lines = [f"saved for backward, one micro-batch (s={report['seq_length']}, "
             f"b={report['micro_batch']}, {report['dtype']}, {report['device']}, this TP rank):"]
    lines.append("  layer 0:")
    for row in a["layer0_sites"]:
        lines.append(f"    {row['site']:<62}{_mib(row['bytes'])}  {', '.join(row['tensors'])}")
    lines.append("  outside the layers (embedding, final norm, output layer, loss; recompute "
                 "checkpoints):")
    for row in a["outside_sites"]:
        lines.append(f"    {row['site']:<62}{_mib(row['bytes'])}  {', '.join(row['tensors'])}")
    lines.append("  totals:")
    for layer, value in a["per_layer_bytes"].items():
        name = "outside layers" if layer == "None" else f"layer {layer}"
        lines.append(f"    {name:<62}{_mib(value)}")
    lines.append(f"    {'all':<62}{_mib(a['total_bytes'])}")
    lines.append(f"static bytes per GPU (ZeRO-{report['zero_stage']}, data-parallel size "
                 f"{report['dp']}, {'bf16' if report['bf16'] else 'fp32'} training):")
    for key, value in s.items():
        lines.append(f"    {key:<62}{_mib(value)}")
    lines.append(f"    {'all':<62}{_mib(sum(s.values()))}")
    return "\n".join(lines)


def profile(cfg, device: torch.device, bf16: bool, vocab_size: int, dp: int) -> dict:
    """Build cfg's model on `device` (needs Megatron's parallel state) and measure (a), (b)."""
    from compact_dist.training.model_setup import build_model

    model = build_model(cfg, device, bf16, vocab_size)
    model.train()
    s, b = cfg.model.seq_length, cfg.train.micro_batch_size
    gen = torch.Generator().manual_seed(cfg.train.seed)
    tokens = torch.randint(0, vocab_size, (b, s), generator=gen).to(device)
    positions = torch.arange(s, device=device).unsqueeze(0).expand(b, -1)
    labels = torch.roll(tokens, -1, dims=1)
    records = record_saved_tensors(
        lambda: model(tokens, positions, None, labels=labels), model)
    return {
        "seq_length": s, "micro_batch": b, "device": str(device),
        "dtype": "bf16" if bf16 else "fp32", "zero_stage": cfg.train.zero_stage, "dp": dp,
        "bf16": bf16, "saved": summarize(records),
        "static": model_static_bytes(model, cfg.train.zero_stage, dp, bf16),
        "records": [dataclasses.asdict(r) for r in records],
    }


def main(argv: Optional[list[str]] = None) -> None:
    from compact_dist.training.train_config import load_train_config, world_from_environment

    parser = argparse.ArgumentParser(prog="compact-memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="compact-train YAML (default: the embedded default job)")
    parser.add_argument("--world-size", type=int, default=None,
                        help="world size for the ZeRO partitioning of (b) (default: this run's)")
    parser.add_argument("--vocab", type=int, default=None,
                        help="vocabulary before padding (default: the data config's)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse_intermixed_args(argv)
    try:
        from compact_dist.training.tokenizer import model_vocab_size

        cfg = load_train_config(args.config, args.overrides)
        vocab = args.vocab or model_vocab_size(cfg.data)  # as compact-train's model has it
        _, _, world = world_from_environment()
        if world % cfg.parallel.tensor_model_parallel_size:
            raise ValueError(f"world size {world} is not divisible by the TP size")
    except ValueError as err:
        sys.exit(f"compact-memory: invalid configuration: {err}")
    from compact_dist.training.distributed import init_distributed
    from compact_dist.training.model_setup import padded_vocab_size

    device = init_distributed(cfg)  # a lone process without MASTER_PORT takes a free port
    bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto"
                                             and device.type == "cuda")
    world = args.world_size or world
    dp = world // cfg.parallel.tensor_model_parallel_size
    report = profile(cfg, device, bf16, vocab, dp)
    report["vocab_padded"] = padded_vocab_size(vocab, cfg.parallel.tensor_model_parallel_size)
    if torch.distributed.get_rank() == 0:
        if args.json:
            print(json.dumps(report))
        else:
            print(format_report(report))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
