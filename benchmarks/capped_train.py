"""compact-train on one GPU under a memory cap, at several gradient-accumulation depths: peak
allocated / reserved, host memory, step time, tokens/s and MFU per depth, beside compact-plan's
prediction of the same config (issue 28: 7B at r = n/4 on a 24 GB card).

    python benchmarks/capped_train.py --config configs/train/llama_7b_24gb.yaml --cap-gib 24 \\
        --global-batch 64,256 --steps 3 --out-dir benchmarks/results --name offload_7b_24gb

Each depth runs in its own process (fresh CUDA peak counters) with
`torch.cuda.set_per_process_memory_fraction(cap / total)`: an allocation past the cap raises
out-of-memory as it would on the smaller card. Data: the host corpus (benchmarks/host_corpus.py,
built under --cache-dir unless --corpus names one); no evaluation, no checkpoint; the first step
(allocator warm-up, first offload copies) is left out of the time, not out of the peak.
Writes <name>.json and <name>.md, and each depth's compact-train output to <name>.gb<N>.log
(a failed depth's last 40 lines also in the JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs/train/llama_7b_24gb.yaml"))
    p.add_argument("--cap-gib", type=float, default=24.0, help="0: no cap (the only choice "
                   "without a GPU)")
    p.add_argument("--global-batch", default="64,256",
                   help="train.global_batch_size values (one GPU: the accumulation depth "
                   "times the micro-batch)")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per depth (>= 2)")
    p.add_argument("--corpus", help="JSONL corpus (default: build the host corpus)")
    p.add_argument("--corpus-max-bytes", type=int, default=60_000_000)
    p.add_argument("--cache-dir", default=str(ROOT / ".cache/kept_energy"))
    p.add_argument("--out-dir", default=str(ROOT / "benchmarks/results"))
    p.add_argument("--name", default="offload_7b_24gb")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)  # child: this global batch
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = p.parse_intermixed_args(argv)
    if args.steps < 2:
        p.error("--steps must be >= 2 (the first step is left out of the time)")
    return args


def overrides_for(args, global_batch: int, corpus: str) -> list[str]:
    return [f"train.train_steps={args.steps}", f"train.global_batch_size={global_batch}",
            f"train.eval_interval={args.steps + 1}", "train.log_interval=1",
            "optim.warmup_steps=1", "checkpoint.dir=null", "logging.progress=false",
            "data.source=files", f"data.paths=[{corpus}]", f"data.cache_dir={args.cache_dir}",
            *args.overrides]


def one_depth(args) -> None:
    """Child process: cap the memory, train, write what was measured to --child-out."""
    import torch

    from compact_dist.tools.memory_plan import prediction_line, setup_from
    from compact_dist.training.progress import local_memory_gib
    from compact_dist.training.train import run
    from compact_dist.training.train_config import load_train_config

    if torch.cuda.is_available():
        device = torch.device("cuda", 0)
        total = torch.cuda.get_device_properties(device).total_memory
        if args.cap_gib:  # 0: uncapped
            torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gib * 2**30 / total),
                                                       device)
    elif args.cap_gib:
        raise SystemExit("capped_train.py: no GPU to cap; --cap-gib 0 runs uncapped on the CPU")
    else:
        device, total = torch.device("cpu"), 0
    overrides = overrides_for(args, args.one, args.corpus)
    cfg = load_train_config(args.config, overrides)
    predicted = prediction_line(setup_from(cfg, 1, device.type,
                                           "flash" if device.type == "cuda" else "math"))
    start = time.perf_counter()
    history = run(cfg)
    allocated, reserved = local_memory_gib(device)
    lines = history["lines"][1:]  # step 1: warm-up
    median = {k: statistics.median(line[k] for line in lines)
              for k in ("perf/step_time_s", "perf/tokens_per_s", "perf/mfu",
                        "perf/tflops_per_gpu") if lines and k in lines[0]}
    result = {
        "global_batch": args.one, "micro_batch": cfg.train.micro_batch_size,
        "gradient_accumulation": cfg.gradient_accumulation_steps(1), "steps": history["step"],
        "cap_GiB": args.cap_gib, "device_total_GiB": total / 2**30,
        "peak_allocated_GiB": allocated, "peak_reserved_GiB": reserved,
        "host_peak_rss_GiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "step_time_s": median.get("perf/step_time_s"),
        "tokens_per_s": median.get("perf/tokens_per_s"), "mfu": median.get("perf/mfu"),
        "tflops_per_gpu": median.get("perf/tflops_per_gpu"),
        "losses": history["losses"], "lines": history["lines"],
        "predicted": predicted, "seconds": time.perf_counter() - start,
        "device": torch.cuda.get_device_name(device) if total else "cpu",
        "overrides": overrides,
    }
    Path(args.child_out).write_text(json.dumps(result, indent=1))


def markdown(result: dict) -> str:
    rows = ["| global batch | accumulation | peak allocated GiB (predicted) | peak reserved GiB "
            "(predicted) | host RSS GiB (predicted offload) | step s | tokens/s | MFU | losses |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["depths"]:
        if "error" in r:
            rows.append(f"| {r['global_batch']} | | failed: {r['error']} | | | | | | |")
            continue
        p = r["predicted"]
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        rows.append(
            f"| {r['global_batch']} | {r['gradient_accumulation']} | "
            f"{r['peak_allocated_GiB']:.2f} ({p['peak_allocated_GiB']:.2f}) | "
            f"{r['peak_reserved_GiB']:.2f} ({p['peak_reserved_GiB']:.2f}) | "
            f"{r['host_peak_rss_GiB']:.1f} ({p['host_GiB']:.1f}) | {r['step_time_s']:.2f} | "
            f"{r['tokens_per_s']:,.0f} | {mfu} | "
            + " ".join(f"{x:.3f}" for x in r["losses"]) + " |")
    cap = f"under a {result['cap_GiB']:g} GiB cap" if result["cap_GiB"] else "uncapped"
    return "\n".join([
        f"# {result['config']} {cap} on one {result['device']}", "",
        "torch.cuda.set_per_process_memory_fraction enforces the cap; step time, tokens/s and "
        "MFU are medians over the steps after the first; peaks include every step. Predicted: "
        "compact-plan for the same config.", "", *rows, "",
        f"overrides: `{' '.join(result['overrides'])}`", ""])


def main(argv=None) -> None:
    args = parse_args(argv)
    from kept_energy import host_corpus

    if args.one is None:  # a bad config or override: one line here, not a traceback per depth
        from compact_dist.training.train_config import load_train_config

        try:
            load_train_config(args.config, overrides_for(args, 1, "corpus.jsonl"))
        except ValueError as err:
            sys.exit(f"capped_train.py: invalid configuration: {err}")
    args.corpus = host_corpus(args)
    if args.one is not None:
        return one_depth(args)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    depths = []
    for gb in [int(x) for x in args.global_batch.split(",")]:
        child_out = out / f"{args.name}.gb{gb}.json"
        cmd = [sys.executable, __file__, "--one", str(gb), "--child-out", str(child_out),
               "--config", args.config, "--cap-gib", str(args.cap_gib), "--steps",
               str(args.steps), "--corpus", args.corpus, "--cache-dir", args.cache_dir,
               *args.overrides]
        log = out / f"{args.name}.gb{gb}.log"  # the child's whole output, kept
        with log.open("w") as sink:
            rc = subprocess.run(cmd, stdout=sink, stderr=subprocess.STDOUT).returncode
        lines = log.read_text(errors="replace").splitlines()
        print("\n".join(lines[-15:]), flush=True)
        if rc == 0:
            depths.append(json.loads(child_out.read_text()))
            child_out.unlink()
        else:  # e.g. where an out-of-memory error struck
            depths.append({"global_batch": gb, "error": f"exit status {rc}",
                           "log_tail": lines[-40:]})
        result = {"config": os.path.relpath(args.config, ROOT), "cap_GiB": args.cap_gib,
                  "device": next((d["device"] for d in depths if "device" in d), "?"),
                  "overrides": args.overrides, "depths": depths}
        (out / f"{args.name}.json").write_text(json.dumps(result, indent=1))
        (out / f"{args.name}.md").write_text(markdown(result))
    print(markdown(result))
    if any("error" in d for d in depths):
        sys.exit(1)


if __name__ == "__main__":
    main()
