"""Host and device time of the subspace merge per step: one merge_subspace per layer against
compact_dist.core.grouped_merge.merge_layers (layers of one shape together).

    python benchmarks/merge_cost.py --out benchmarks/results/merge_cost.json

Builds the compact linears of `--layers` transformer layers of a preset (qkv, proj, fc1, fc2)
with the shapes one tensor-parallel rank holds at each of `--tp` (TP=1 layers of the shard's
shape: column layers out/tp x in, row layers out x in/tp with 8/tp of the default 8
row-parallel blocks, which is exactly a rank's merge work), for an fp32 and a bf16 W0 with bf16 A, and times the
merge of all of them `--repeats` times after warm-up: host_ms is the wall time until the call
returns (what a host-bound step pays), total_ms the time until the device has finished (CUDA
events). One process, one device (CPU: host times only, fp32 A).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

if str(Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.append(str(Path(__file__).resolve().parents[1]))

from benchmarks.memory_throughput import PRESETS  # noqa: E402
from benchmarks.projection_cost import setup  # noqa: E402


def build_layers(preset: str, layers: int, tp: int, base_dtype: str, device: torch.device,
                 dtype: torch.dtype) -> list:
    from megatron.core.transformer.transformer_config import TransformerConfig

    from compact_dist.core.config import LayerCompression
    from compact_dist.core.layers import CompactColumnParallelLinear, CompactRowParallelLinear

    p = PRESETS[preset]
    h, f = p["hidden_size"], p["ffn_hidden_size"]
    config = TransformerConfig(num_layers=1, hidden_size=h, num_attention_heads=1,
                               use_cpu_initialization=True, params_dtype=dtype)
    comp = LayerCompression(ratio=0.25, base_dtype=base_dtype, row_parallel_blocks=8 // tp)
    init = torch.nn.init.zeros_
    out = []
    for i in range(layers):
        for role, kind, n, m in (("qkv", "col", h, 3 * h // tp), ("proj", "row", h // tp, h),
                                 ("fc1", "col", h, 2 * f // tp), ("fc2", "row", f // tp, h)):
            kw = dict(config=config, init_method=init, bias=False, compression=comp,
                      layer_id=10 * i + len(out) % 4)
            if kind == "col":
                layer = CompactColumnParallelLinear(n, m, gather_output=False, **kw)
            else:
                layer = CompactRowParallelLinear(n, m, input_is_parallel=True,
                                                 skip_bias_add=False, **kw)
            layer = layer.to(device)
            with torch.no_grad():
                layer.subspace_factor.normal_(std=1e-3)
            out.append(layer)
    return out


def time_merge(fn, repeats: int, cuda: bool) -> dict:
    host, total = [], []
    for i in range(repeats + 2):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        returned = time.perf_counter()
        if cuda:
            torch.cuda.synchronize()
        end = time.perf_counter()
        if i >= 2:  # warm-up: Triton compiles, cuBLAS picks kernels
            host.append((returned - start) * 1e3)
            total.append((end - start) * 1e3)
    return {"host_ms": statistics.median(host), "total_ms": statistics.median(total)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=list(PRESETS), default="1.3b")
    parser.add_argument("--layers", type=int, default=None, help="default: the preset's")
    parser.add_argument("--tp", type=int, action="append", default=None,
                        help="TP sizes whose per-rank shapes to time (default 1, 2, 4)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    from compact_dist.core.grouped_merge import merge_layers

    device = setup()
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    layers_n = args.layers or PRESETS[args.preset]["num_layers"]
    results = {"benchmark": "merge_cost", "preset": args.preset, "layers": layers_n,
               "device": torch.cuda.get_device_name(device) if cuda else "cpu",
               "factor_dtype": str(dtype), "repeats": args.repeats, "runs": []}
    for tp in args.tp or [1, 2, 4]:
        for base in ("fp32", "bf16"):
            layers = build_layers(args.preset, layers_n, tp, base, device, dtype)

            def per_layer():
                for layer in layers:
                    layer.merge_subspace(1e-4, 0.1)

            run = {"tp": tp, "base_dtype": base, "linears": len(layers),
                   "per_layer": time_merge(per_layer, args.repeats, cuda),
                   "grouped": time_merge(lambda: merge_layers(layers, 1e-4, 0.1),
                                         args.repeats, cuda)}
            print(json.dumps(run), flush=True)
            results["runs"].append(run)
            del layers
            if cuda:
                torch.cuda.empty_cache()
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
