"""Kept-energy telemetry over a few hundred steps of a large preset on one GPU: what the
projection P keeps of every compact layer's weight gradient (compact_dist.core.kept_energy),
measured by compact-train right before each re-estimate of P.

    python benchmarks/kept_energy.py --config configs/train/llama_1_3b.yaml --steps 300 \\
        --resample-interval 25 --out-dir benchmarks/results --name kept_energy_1.3b

Trains from scratch on the host corpus (benchmarks/host_corpus.py, built under --cache-dir
unless --corpus names one), one micro-batch per step (global batch = micro-batch), warm-up
and cosine over --steps, no evaluation and no checkpoint; the rest of the preset unchanged
(extra `section.key=value` overrides after the options). Writes <name>.json (per measurement:
step, mean, worst layer, per-role means, every layer; the losses; the config overrides) and
<name>.md (a table per measurement).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROLES = ("qkv", "proj", "fc1", "fc2")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs/train/llama_1_3b.yaml"))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--resample-interval", type=int, default=25)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--corpus", help="JSONL corpus (default: build the host corpus)")
    p.add_argument("--corpus-max-bytes", type=int, default=60_000_000)
    p.add_argument("--cache-dir", default=str(ROOT / ".cache/kept_energy"))
    p.add_argument("--out-dir", default=str(ROOT / "benchmarks/results"))
    p.add_argument("--name", default="kept_energy_1.3b")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    return p.parse_args(argv)


def host_corpus(args) -> str:
    if args.corpus:
        return args.corpus
    out = Path(args.cache_dir) / "host_corpus.jsonl"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, str(ROOT / "benchmarks/host_corpus.py"), "--out",
                        str(out), "--max-bytes", str(args.corpus_max_bytes)], check=True)
    return str(out)


def role_of(name: str) -> str:
    return next(r for r in ROLES if name.endswith(f"linear_{r}"))


def summarise(step: int, layers: dict[str, float]) -> dict:
    values = list(layers.values())
    worst = min(layers, key=layers.get)
    roles = {r: [v for n, v in layers.items() if role_of(n) == r] for r in ROLES}
    return {"step": step, "mean": sum(values) / len(values), "worst": layers[worst],
            "worst_layer": worst,
            "roles": {r: sum(v) / len(v) for r, v in roles.items() if v}, "layers": layers}


def markdown(result: dict) -> str:
    lines = [f"# Kept energy: {result['config']} ({result['steps']} steps, P re-estimated "
             f"every {result['resample_interval']})", "",
             "Fraction of each compact layer's weight-gradient energy that P keeps, measured on "
             "a probe micro-batch right before each re-estimate (the oldest P of its "
             "interval).", "",
             "| step | mean | qkv | proj | fc1 | fc2 | worst | worst layer | train loss |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for m in result["measurements"]:
        roles = " | ".join(f"{m['roles'].get(r, float('nan')):.3f}" for r in ROLES)
        loss = result["losses"][m["step"] - 1]
        lines.append(f"| {m['step']} | {m['mean']:.3f} | {roles} | {m['worst']:.3f} | "
                     f"{m['worst_layer']} | {loss:.3f} |")
    lines += ["", f"overrides: `{' '.join(result['overrides'])}`; {result['seconds']:.0f} s "
              f"on {result['device']}"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    from compact_dist.training.train import run
    from compact_dist.training.train_config import load_train_config

    corpus = host_corpus(args)
    overrides = [
        f"train.train_steps={args.steps}", "train.global_batch_size=null",
        f"train.eval_interval={args.steps + 1}", "train.log_interval=25",
        f"optim.warmup_steps={args.warmup}", "checkpoint.dir=null", "logging.progress=false",
        f"compression.resample_interval={args.resample_interval}", "logging.kept_energy=true",
        "data.source=files", f"data.paths=[{corpus}]", f"data.cache_dir={args.cache_dir}",
        *args.overrides]
    cfg = load_train_config(args.config, overrides)
    start = time.perf_counter()
    history = run(cfg)
    result = {
        "config": os.path.relpath(args.config, ROOT), "steps": history["step"],
        "resample_interval": args.resample_interval, "overrides": overrides,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "seconds": time.perf_counter() - start, "losses": history["losses"],
        "measurements": [summarise(step, layers) for step, layers in history["kept_energy"]],
    }
    if int(os.environ.get("RANK", "0")) == 0:
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{args.name}.json").write_text(json.dumps(result, indent=1))
        (out / f"{args.name}.md").write_text(markdown(result))
        print(markdown(result))


if __name__ == "__main__":
    main()
