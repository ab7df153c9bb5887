"""Per-kernel GPU time of one training forward + backward of a GPT, for several variants.

    python benchmarks/profile_model.py --preset 1.3b --layers 4 --micro-batch 4 \
        --variant base=compression.enabled=false --variant fp8attn='activations.fp8_storage=[attention]' \
        --out benchmarks/results/profile_1.3b.json

Each variant is `name=override[;override...]` (TrainConfig `section.key=value`; the preset's
shape comes first, as in memory_throughput.py). The model is built by compact_dist.training.train's
build_model (no optimizer, TP=1, one process) with `--layers` layers of the preset; after
warm-up, CUDA events time `--repeats` forward+backward passes (median), then torch.profiler
records one more and the top kernels by CUDA time are printed and written to the JSON
(traces with --trace-dir, for chrome://tracing / Perfetto). CPU: wall-clock times only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

if str(Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.append(str(Path(__file__).resolve().parents[1]))

from benchmarks.memory_throughput import PRESETS, synthetic_batch  # noqa: E402
from benchmarks.projection_cost import setup, timed  # noqa: E402


def build(preset: str, layers: int, micro_batch: int, extra: list[str]):
    from compact_dist.training.train import build_model
    from compact_dist.training.train_config import load_train_config

    p = PRESETS[preset]
    overrides = [f"model.num_layers={layers}", f"model.hidden_size={p['hidden_size']}",
                 f"model.num_attention_heads={p['num_attention_heads']}",
                 f"model.ffn_hidden_size={p['ffn_hidden_size']}",
                 f"model.seq_length={p['seq_length']}", f"train.micro_batch_size={micro_batch}",
                 "logging.progress=false", *extra]
    cfg = load_train_config(None, overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(cfg, device, device.type == "cuda", p["vocab_size"])
    return model, synthetic_batch(micro_batch, p["seq_length"], p["vocab_size"], 7, device)


def profile_variant(model, batch, repeats: int, top: int, trace: Path | None) -> dict:
    def step():
        loss = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        loss.float().mean().backward()

    ms = timed(step, repeats=repeats, warmup=3)
    out = {"fwd_bwd_ms": ms}
    if torch.cuda.is_available():
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        if trace is not None:
            prof.export_chrome_trace(str(trace))
        events = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)
        total = sum(e.device_time_total for e in events)
        out["profiled_cuda_ms"] = total / 1e3
        out["top_kernels"] = [{"name": e.key[:120], "calls": e.count,
                               "cuda_ms": e.device_time_total / 1e3} for e in events[:top]]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=list(PRESETS), default="1.3b")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--variant", action="append", required=True, metavar="NAME=OVERRIDES")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--out", default=None)
    parser.add_argument("--trace-dir", default=None)
    args = parser.parse_args()
    setup()
    report = {"preset": args.preset, "layers": args.layers, "micro_batch": args.micro_batch,
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "variants": {}}
    for spec in args.variant:
        name, _, rest = spec.partition("=")
        extra = [o for o in rest.split(";") if o]
        model, batch = build(args.preset, args.layers, args.micro_batch, extra)
        trace = Path(args.trace_dir) / f"{name}.json" if args.trace_dir else None
        if trace is not None:
            trace.parent.mkdir(parents=True, exist_ok=True)
        result = profile_variant(model, batch, args.repeats, args.top, trace)
        result["overrides"] = extra
        report["variants"][name] = result
        print(f"== {name} ({'; '.join(extra) or 'defaults'}): {result['fwd_bwd_ms']:.2f} ms "
              f"forward+backward", flush=True)
        for k in result.get("top_kernels", []):
            print(f"   {k['cuda_ms']:8.2f} ms {k['calls']:5d}x  {k['name']}", flush=True)
        del model, batch
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
