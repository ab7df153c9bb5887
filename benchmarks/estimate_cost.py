"""What re-estimating a data-aware P costs: steps of a whole resample cycle vs quiet steps.

    python benchmarks/estimate_cost.py --preset 110m --preset 1.3b --interval 40 \
        --steps 90 --out estimate_cost.json

For each preset a model + DeepSpeed engine is built as compact-train builds them (ZeRO-1,
bf16, projection pca with the defaults, constant learning rate, synthetic tokens) with
`compression.resample_interval = --interval` so that estimates come every few steps. Each
step is timed on the host around a training-stream synchronisation (forward + backward +
DeepSpeed step + SubspaceStepper.after_step). Reported:
  - normal_step_ms: median of the quiet steps (no sketch, no arming, no switch of P);
  - per step: whether it sketched, armed the next sketches (`arm_ms`), switched P
    (`resample_ms`, of which `eig_ms` in top_eigenvectors);
  - extra_ms_per_estimate: over each complete cycle (from one sketching step to the next,
    the first cycle excluded), the sum of (step - normal_step): the sketch in forward, the
    reduction, the solves, the switch and the arming;
  - amortised overhead at T = 200 and T = 50: extra_ms_per_estimate / T / normal_step.
The host-timed steps include one synchronisation per step that training does not have, so
absolute step times are slightly above memory_throughput.py's; the differences are what the
estimate costs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

if str(Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.append(str(Path(__file__).resolve().parents[1]))

from benchmarks.memory_throughput import PRESETS, synthetic_batch  # noqa: E402
from benchmarks.projection_cost import setup  # noqa: E402

SHAPES = {
    # benchmarks/convergence.py's 110m (vocabulary 16384), micro-batch 32 x seq 1024
    "110m": dict(num_layers=12, hidden_size=768, num_attention_heads=12, ffn_hidden_size=2048,
                 seq_length=1024, vocab_size=16384, micro_batch_size=32),
    # memory_throughput.py's presets (1.3b: micro-batch 4 x seq 2048)
    "1.3b": PRESETS["1.3b"], "tiny": PRESETS["tiny"],
}


class _Timer:
    """Accumulates synchronised host milliseconds of wrapped functions, per name."""

    def __init__(self):
        self.ms: dict[str, float] = {}

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            sync()
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                sync()
                self.ms[name] = self.ms.get(name, 0.0) + (time.perf_counter() - t) * 1e3
        return timed


def sync() -> None:
    """Wait for the training stream (as training's loss.item() does)."""
    if torch.cuda.is_available():
        torch.cuda.current_stream().synchronize()


def measure(preset: str, steps: int, interval: int, extra: list[str]) -> dict:
    import compact_dist.core.basis as basis
    import compact_dist.core.subspace as subspace
    from compact_dist.training.engine_setup import build_engine
    from compact_dist.training.model_setup import build_model
    from compact_dist.training.train_config import load_train_config

    s = SHAPES[preset]
    overrides = [f"model.{k}={v}" for k, v in s.items() if k not in ("vocab_size",
                                                                      "micro_batch_size")]
    overrides += [f"train.micro_batch_size={s['micro_batch_size']}", "logging.progress=false",
                  "compression.projection=pca", f"compression.resample_interval={interval}",
                  *extra]
    cfg = load_train_config(None, overrides)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    model = build_model(cfg, device, cuda, s["vocab_size"])
    engine, stepper = build_engine(cfg, model, cuda, 1, schedule=False)
    batch = synthetic_batch(s["micro_batch_size"], s["seq_length"], s["vocab_size"], 7, device)

    timer = _Timer()
    originals = (subspace.top_eigenvectors, subspace.resample_projections, stepper._arm)
    subspace.top_eigenvectors = timer.wrap("eig_ms", basis.top_eigenvectors)
    subspace.resample_projections = timer.wrap("resample_ms", subspace.resample_projections)
    stepper._arm = timer.wrap("arm_ms", stepper._arm)
    records = []
    try:
        for step in range(steps):
            estimating = stepper._estimating(stepper.steps)
            timer.ms.clear()
            sync()
            t = time.perf_counter()
            loss = engine(batch["tokens"], batch["position_ids"], None,
                          labels=batch["labels"]).float().mean()
            engine.backward(loss)
            engine.step()
            stepper.after_step(engine.get_lr()[0], cfg.optim.weight_decay, engine.optimizer)
            sync()
            ms = (time.perf_counter() - t) * 1e3
            records.append({"step": step, "estimating": estimating, "ms": ms,
                            "arm_ms": timer.ms.get("arm_ms", 0.0),
                            "resample_ms": timer.ms.get("resample_ms", 0.0),
                            "eig_ms": timer.ms.get("eig_ms", 0.0), "loss": loss.item()})
    finally:
        subspace.top_eigenvectors, subspace.resample_projections, stepper._arm = originals

    sketching = [r["step"] for r in records if r["estimating"]]
    busy = set()
    for e in sketching:
        busy.update(range(e - 1, e + 1))  # arming, sketching and switching
    quiet = [r["ms"] for r in records[2:] if r["step"] not in busy]
    out = {"preset": preset, "shape": s, "overrides": overrides, "interval": interval,
           "steps": records}
    cycles = [(a, b) for a, b in zip(sketching[1:], sketching[2:])]
    if quiet and cycles:
        n_ms = statistics.median(quiet)
        extra = [sum(r["ms"] - n_ms for r in records[a:b]) for a, b in cycles]
        extra_ms = statistics.mean(extra)
        out.update({
            "normal_step_ms": n_ms, "cycles": cycles, "extra_ms_per_cycle": extra,
            "extra_ms_per_estimate": extra_ms,
            "arm_ms": max(r["arm_ms"] for r in records[2:]),
            "resample_ms": max(r["resample_ms"] for r in records[2:]),
            "eig_ms": max(r["eig_ms"] for r in records[2:]),
            "amortised_T200": extra_ms / 200 / n_ms, "amortised_T50": extra_ms / 50 / n_ms,
        })
    del engine, stepper, model
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", action="append", choices=list(SHAPES))
    parser.add_argument("--steps", type=int, default=90)
    parser.add_argument("--interval", type=int, default=40)
    parser.add_argument("--override", action="append", default=[],
                        help="extra TrainConfig overrides (section.key=value)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    for key, value in (("LOCAL_RANK", "0"), ("RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)  # DeepSpeed's engine asks for a launcher's variables
    setup()
    report = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "torch": torch.__version__, "presets": {}}
    for preset in args.preset or ["110m"]:
        r = measure(preset, args.steps, args.interval, args.override)
        report["presets"][preset] = r
        keys = ("normal_step_ms", "arm_ms", "resample_ms", "eig_ms",
                "extra_ms_per_estimate", "amortised_T200", "amortised_T50")
        print(f"== {preset}: " + ", ".join(f"{k} {r[k]:.4g}" for k in keys if k in r),
              flush=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
