"""Cost of CompAct's extra work per linear layer, against the layer's own GEMMs.

    python benchmarks/projection_cost.py --out benchmarks/results/projection_cost.json

For each linear role of a LLaMA-style layer (qkv, proj, fc1, fc2 at TP=1), times with CUDA
events (median of repeats after warm-up):
  - generate: P's blocks from their seeds (Projection.blocks), what forward, backward and the
    merge each do once;
  - project: Z = X P for the micro-batch's tokens;
  - merge: W0 <- W0 + A P^T (merge_subspace on the layer);
  - forward / backward: the compressed layer's forward and backward, next to Megatron's own
    layer's (same shapes, bf16).
This tells whether P generation or the merge is worth a fused kernel (issue: > 10% step time).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch


def timed(fn, repeats: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of fn() on the current CUDA stream (CPU: wall clock)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def setup() -> torch.device:
    import torch.distributed as dist
    from megatron.core import parallel_state

    from compact_dist.core.rng import model_parallel_manual_seed

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29541")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(0)
    dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1)
    model_parallel_manual_seed(1234)
    return torch.device("cuda" if cuda else "cpu")


def measure(hidden: int, ffn: int, tokens: int, ratio: float, device: torch.device) -> dict:
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.transformer_config import TransformerConfig

    from compact_dist import CompactColumnParallelLinear, CompactRowParallelLinear
    from compact_dist.core.config import LayerCompression
    from compact_dist.core.projection import project

    bf16 = device.type == "cuda"
    dtype = torch.bfloat16 if bf16 else torch.float32
    cfg = TransformerConfig(num_layers=1, hidden_size=hidden, num_attention_heads=16,
                            params_dtype=dtype, bf16=bf16, use_cpu_initialization=not bf16)
    init = lambda w: torch.nn.init.normal_(w, std=0.02)
    roles = {  # (input, output, kind)
        "qkv": (hidden, 3 * hidden, "column"), "proj": (hidden, hidden, "row"),
        "fc1": (hidden, 2 * ffn, "column"), "fc2": (ffn, hidden, "row"),
    }
    comp = LayerCompression(ratio=ratio)
    out = {}
    for role, (n, m, kind) in roles.items():
        if kind == "column":
            kw = dict(gather_output=False)
            ref_cls, cls = ColumnParallelLinear, CompactColumnParallelLinear
        else:
            kw = dict(input_is_parallel=True, skip_bias_add=False)
            ref_cls, cls = RowParallelLinear, CompactRowParallelLinear
        ref = ref_cls(n, m, config=cfg, init_method=init, bias=False, **kw).to(device)
        comp_layer = cls(n, m, config=cfg, init_method=init, bias=False, compression=comp,
                         layer_id=1, **kw).to(device)
        x = torch.randn(tokens, 1, n, device=device, dtype=dtype, requires_grad=True)
        g = torch.randn(tokens, 1, m, device=device, dtype=dtype)
        p = comp_layer.projection_operand(dtype)  # what forward multiplies with

        def fwd_bwd(layer):
            def run():
                y, _ = layer(x)
                y.backward(g)
            return run

        def merge():
            with torch.no_grad():
                comp_layer.subspace_factor.add_(1e-6)  # A written: merge does the real work
            comp_layer.merge_subspace(lr=1e-4, weight_decay=0.1)

        row = {
            "shape": {"in": n, "out": m, "rank": comp_layer.projection.rank,
                      "blocks": comp_layer.projection.local_blocks, "tokens": tokens},
            "generate_ms": timed(lambda: comp_layer.projection_blocks(dtype)),
            "project_ms": timed(lambda: project(x.detach(), p)),
            "merge_ms": timed(merge),
            "megatron_fwd_bwd_ms": timed(fwd_bwd(ref)),
            "compact_fwd_bwd_ms": timed(fwd_bwd(comp_layer)),
        }
        row["compact_vs_megatron"] = row["compact_fwd_bwd_ms"] / row["megatron_fwd_bwd_ms"]
        # per train step: P is generated in forward, backward and the merge
        row["overhead_share_of_megatron_fwd_bwd"] = (
            3 * row["generate_ms"] + row["merge_ms"]) / row["megatron_fwd_bwd_ms"]
        out[role] = row
        print(role, json.dumps(row), flush=True)
        del ref, comp_layer, x, g
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--ffn", type=int, default=5504)
    parser.add_argument("--tokens", type=int, default=8192, help="micro-batch x sequence")
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--out", default="benchmarks/results/projection_cost.json")
    args = parser.parse_args()
    device = setup()
    report = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
        "args": vars(args),
        "roles": measure(args.hidden, args.ffn, args.tokens, args.ratio, device),
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
