"""Megatron-LM's own pretrain_gpt.py with CompAct (docs/MEGATRON_LM.md) on one GPU: the loss
curve per iteration of a tiny GPT on Megatron's mock data, with compact_dist's spec and merge
(`-m compact_dist.megatron.megatron_lm`) and with Megatron's own local spec, in fp32 and bf16.

    python benchmarks/megatron_lm_client.py --megatron-lm .mlm --out-dir benchmarks/results \\
        --name megatron_lm_client

--megatron-lm: a Megatron-LM checkout at the release of megatron-core 0.16.1 (tag
core_v0.16.1; pretrain_gpt.py, gpt_builders.py, model_provider.py and megatron/training,
legacy, rl, post_training are what it needs; megatron.core comes from the installed wheel).
Each run is its own torchrun process; Megatron's "lm loss" of every iteration is read from
its log. Writes <name>.json (curves, commands, exit status, log tails) and <name>.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

LOSS = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?lm loss: ([0-9.Ee+-]+) \|")
TINY = ["--num-layers", "4", "--hidden-size", "256", "--num-attention-heads", "4",
        "--ffn-hidden-size", "704", "--seq-length", "256", "--max-position-embeddings", "256",
        "--normalization", "RMSNorm", "--swiglu", "--disable-bias-linear",
        "--position-embedding-type", "rope", "--untie-embeddings-and-output-weights",
        "--micro-batch-size", "8", "--global-batch-size", "8", "--lr", "1e-3",
        "--min-lr", "1e-4", "--lr-decay-style", "cosine", "--lr-warmup-iters", "10",
        "--weight-decay", "0.1", "--clip-grad", "1.0", "--seed", "1234",
        "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "4096",
        "--eval-iters", "0", "--eval-interval", "1000000", "--log-interval", "1",
        "--transformer-impl", "local", "--no-persist-layer-norm",
        "--no-gradient-accumulation-fusion", "--no-masked-softmax-fusion",
        "--no-bias-dropout-fusion", "--no-bias-swiglu-fusion", "--no-rope-fusion",
        "--attention-dropout", "0", "--hidden-dropout", "0"]
COMPACT_YAML = "compression:\n  ratio: 0.25\n  resample_interval: {interval}\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--megatron-lm", required=True, help="Megatron-LM checkout (core_v0.16.1)")
    p.add_argument("--iterations", type=int, default=100)
    p.add_argument("--resample-interval", type=int, default=20)
    p.add_argument("--variants", default="compact_fp32,baseline_fp32,compact_bf16,baseline_bf16")
    p.add_argument("--timeout-s", type=int, default=240, help="per run")
    p.add_argument("--out-dir", default="benchmarks/results")
    p.add_argument("--name", default="megatron_lm_client")
    return p.parse_args(argv)


def command(args, variant: str) -> list[str]:
    """The torchrun command of one variant: compact_* through compact_dist's launcher and
    spec, baseline_* as plain pretrain_gpt.py (Megatron's local spec); *_bf16 adds --bf16."""
    script = str(Path(args.megatron_lm) / "pretrain_gpt.py")
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1",
              "--master-port", str(29500 + abs(hash(variant)) % 1000)]
    compact = variant.startswith("compact")
    target = (["-m", "compact_dist.megatron.megatron_lm", script] if compact else [script])
    extra = (["--spec", "compact_dist.megatron.megatron_lm", "compact_gpt_layer_spec"]
             if compact else [])
    if variant.endswith("bf16"):
        extra.append("--bf16")
    return [*launch, *target, *TINY, "--train-iters", str(args.iterations), *extra]


def losses_of(log: str) -> dict[int, float]:
    """iteration -> lm loss, from Megatron-LM's training log lines."""
    return {int(m.group(1)): float(m.group(2)) for m in LOSS.finditer(log)}


def main(argv=None) -> None:
    args = parse_args(argv)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = out / f"{args.name}_compact.yaml"
    config.write_text(COMPACT_YAML.format(interval=args.resample_interval))
    env = {**os.environ, "COMPACT_DIST_CONFIG": str(config), "NCCL_NVLS_ENABLE": "0",
           "CUDA_DEVICE_MAX_CONNECTIONS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"),
                                                        str(Path(args.megatron_lm))]))}
    runs = {}
    for variant in args.variants.split(","):
        cmd = command(args, variant)
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                                  timeout=args.timeout_s)
            log, rc = proc.stdout + proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as err:
            log, rc = (err.stdout or b"").decode() + (err.stderr or b"").decode(), "timeout"
        curve = losses_of(log)
        runs[variant] = {"rc": rc, "losses": curve, "command": cmd, "log_tail": log[-4000:]}
        last = curve[max(curve)] if curve else None
        print(f"{variant}: rc {rc}, {len(curve)} iterations, last lm loss {last}", flush=True)
        (out / f"{args.name}.json").write_text(json.dumps(runs, indent=1))
    lines = [f"# {args.name}: Megatron-LM pretrain_gpt.py, tiny GPT on mock data, "
             f"{args.iterations} iterations", "",
             "| variant | exit | lm loss at 1 / 10 / 50 / last |", "|---|---|---|"]
    for variant, run in runs.items():
        c = run["losses"]
        at = " / ".join(f"{c[i]:.3f}" if i in c else "-" for i in (1, 10, 50, max(c or [0])))
        lines.append(f"| {variant} | {run['rc']} | {at} |")
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if any(run["rc"] != 0 for run in runs.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
