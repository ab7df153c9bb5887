"""Per-kernel GPU time of one training forward + backward of a GPT, for several variants.

    python benchmarks/profile_model.py --preset 1.3b --layers 4 --micro-batch 4 \
        --variant base=compression.enabled=false --variant fp8attn='activations.fp8_storage=[attention]' \
        --out benchmarks/results/profile_1.3b.json

Each variant is `name=override[;override...]` (TrainConfig `section.key=value`; the preset's
shape comes first, as in memory_throughput.py). The model is built by compact_dist.training.model_setup's
build_model (no optimizer, TP=1, one process) with `--layers` layers of the preset; after
warm-up, CUDA events time `--repeats` forward+backward passes (median), then torch.profiler
records one more and the top kernels by CUDA time are printed and written to the JSON
(traces with --trace-dir, for chrome://tracing / Perfetto). CPU: wall-clock times only.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

if str(Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.append(str(Path(__file__).resolve().parents[1]))

from benchmarks.memory_throughput import PRESETS, synthetic_batch  # noqa: E402
from benchmarks.projection_cost import setup, timed  # noqa: E402


def build(preset: str, layers: int, micro_batch: int, extra: list[str]):
    from compact_dist.training.model_setup import build_model
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


def _merged(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def host_summary(trace_path: Path, top: int) -> dict:
    """From a chrome trace with CPU and CUDA activity: the device's busy time (union of kernel,
    memcpy and memset intervals) against the span from the first host op to the last device
    activity, the CUDA runtime / driver calls by total time, and the longest device idle gaps
    with the runtime calls and host ops that overlap them (what the device waited for)."""
    events = json.loads(trace_path.read_text())["traceEvents"]
    dev = [(e["ts"], e["ts"] + e["dur"]) for e in events
           if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e]
    runtime = [e for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver")
               and "dur" in e]
    host_ops = [e for e in events if e.get("cat") in ("cpu_op", "user_annotation")
                and "dur" in e]
    if not dev:
        return {}
    busy = _merged(dev)
    start = min([e["ts"] for e in host_ops] + [busy[0][0]])
    span = busy[-1][1] - start
    calls: dict[str, list[float]] = {}
    for e in runtime:
        c = calls.setdefault(e["name"], [0, 0.0])
        c[0] += 1
        c[1] += e["dur"]
    gaps = sorted(((b[0] - a[1], a[1], b[0]) for a, b in zip(busy, busy[1:])), reverse=True)
    idle = [{"us": round(g, 1),
             "runtime": sorted({e["name"] for e in runtime
                                if e["ts"] < hi and e["ts"] + e["dur"] > lo
                                and e["dur"] > 0.2 * g}),
             "host_ops": [e["name"][:80] for e in sorted(
                 (e for e in host_ops if e["ts"] < hi and e["ts"] + e["dur"] > lo),
                 key=lambda e: e["dur"])[:4]]}
            for g, lo, hi in gaps[:top]]
    return {"span_ms": span / 1e3, "device_busy_ms": sum(b - a for a, b in busy) / 1e3,
            "device_idle_ms": (span - sum(b - a for a, b in busy)) / 1e3,
            "idle_gaps_over_50us_ms": sum(g for g, _, _ in gaps if g > 50) / 1e3,
            "runtime_calls": [{"name": n, "calls": c, "ms": t / 1e3} for n, (c, t) in
                              sorted(calls.items(), key=lambda kv: -kv[1][1])[:top]],
            "longest_idle": idle}


def profile_variant(model, batch, repeats: int, top: int, trace: Path | None,
                    host: bool = False) -> dict:
    def step():
        loss = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        loss.float().mean().backward()

    ms = timed(step, repeats=repeats, warmup=3)
    out = {"fwd_bwd_ms": ms}
    if torch.cuda.is_available():
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if host else [])
        with profile(activities=activities) as prof:
            step()
            torch.cuda.synchronize()
        if host:
            trace = trace or Path(tempfile.mkdtemp()) / "trace.json"
        if trace is not None:
            prof.export_chrome_trace(str(trace))
        if host:
            out["host"] = host_summary(trace, top)
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
    parser.add_argument("--host", action="store_true",
                        help="also record host activity: device idle time, CUDA runtime calls "
                             "and the longest idle gaps (what the device waited for)")
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
        result = profile_variant(model, batch, args.repeats, args.top, trace, args.host)
        result["overrides"] = extra
        report["variants"][name] = result
        print(f"== {name} ({'; '.join(extra) or 'defaults'}): {result['fwd_bwd_ms']:.2f} ms "
              f"forward+backward", flush=True)
        for k in result.get("top_kernels", []):
            print(f"   {k['cuda_ms']:8.2f} ms {k['calls']:5d}x  {k['name']}", flush=True)
        if "host" in result:
            h = result["host"]
            print(f"   span {h['span_ms']:.2f} ms, device busy {h['device_busy_ms']:.2f}, idle "
                  f"{h['device_idle_ms']:.2f}; runtime: " + ", ".join(
                      f"{c['name']} {c['ms']:.2f}/{c['calls']}" for c in h["runtime_calls"][:6]),
                  flush=True)
            for g in h["longest_idle"][:6]:
                print(f"   idle {g['us']:.0f} us: {g['runtime']} {g['host_ops']}", flush=True)
        del model, batch
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
