"""The embedded default job at several ZeRO stages, one compact-train process each on one GPU
(side by side): validation perplexity per evaluation and at the end, so a stage that merges
an update twice (ZeRO-0 + bf16 before issue 23) shows as a gap to the others.

    python benchmarks/zero_stages.py --stages 0 1 --steps 200 --out-dir benchmarks/results \
        [--name zero_stages] [-- extra section.key=value overrides]

Writes <name>.json (per stage: the validation curve, final perplexity, exit code, wall time)
and <name>.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

VALID = re.compile(r"step\s+(\d+) \| validation loss ([0-9.naif]+)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out-dir", default="benchmarks/results")
    parser.add_argument("--name", default="zero_stages")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    procs = {}
    start = time.time()
    for stage in args.stages:
        cmd = [sys.executable, "-m", "compact_dist.training.train", f"train.zero_stage={stage}",
               f"train.train_steps={args.steps}", "logging.progress=false",
               f"data.cache_dir=.cache/{args.name}", *args.overrides]
        env = dict(os.environ, MASTER_PORT=str(free_port()), PYTHONUNBUFFERED="1")
        log = open(out / f"{args.name}_zero{stage}.log", "w")
        procs[stage] = (cmd, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env),
                        log)
        time.sleep(20)  # the first builds the tokenizer cache the others read
    runs = {}
    for stage, (cmd, proc, log) in procs.items():
        rc = proc.wait()
        log.close()
        text = (out / f"{args.name}_zero{stage}.log").read_text()
        curve = [{"step": int(s), "loss": float(v), "ppl": math.exp(min(float(v), 50))}
                 for s, v in VALID.findall(text)]
        runs[f"zero{stage}"] = {"command": " ".join(cmd[1:]), "rc": rc, "valid": curve,
                                "final_ppl": curve[-1]["ppl"] if curve else None,
                                "wall_s": time.time() - start}
    import torch

    result = {"benchmark": "zero_stages", "device": torch.cuda.get_device_name()
              if torch.cuda.is_available() else "cpu", "steps": args.steps,
              "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "runs": runs}
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    lines = [f"# Embedded default at ZeRO stages {args.stages}: {result['device']}", "",
             f"{args.steps} steps; validation perplexity per evaluation.", "",
             "| run | rc | " + " | ".join(f"step {p['step']}" for p in
                                           next(iter(runs.values()))["valid"]) + " |",
             "|---|---|" + "---|" * len(next(iter(runs.values()))["valid"])]
    for name, r in runs.items():
        lines.append(f"| {name} | {r['rc']} | " + " | ".join(f"{p['ppl']:.1f}"
                                                            for p in r["valid"]) + " |")
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    sys.exit(max(r["rc"] for r in runs.values()))


if __name__ == "__main__":
    main()
