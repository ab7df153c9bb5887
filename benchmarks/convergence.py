"""Pretraining convergence, Megatron baseline vs CompAct, on real text with `compact-train`.

A small LLaMA-style GPT (default: 8 layers, hidden 512, 8 heads, SwiGLU ffn 1344, seq 512,
BPE vocabulary 8192: ~33M parameters) is pretrained with compact_dist.train.run on the
embedded corpus (the interpreter's standard-library source, compact_dist.data) for a fixed
token budget (default: 3 epochs of the training split), then the validation perplexity
curves are compared. One variant per process, so variants can run concurrently on different
GPUs; `--merge` combines them.

    python benchmarks/convergence.py --prepare                 # build the tokenized data once
    CUDA_VISIBLE_DEVICES=0 python benchmarks/convergence.py --variant baseline &
    CUDA_VISIBLE_DEVICES=1 python benchmarks/convergence.py --variant r1/4 &
    CUDA_VISIBLE_DEVICES=2 python benchmarks/convergence.py --variant r1/2 & wait
    python benchmarks/convergence.py --merge                   # -> convergence.json / .md

The dataset is built by global rank 0 into --cache-dir under a key that hashes the corpus
text, so a cache built on another machine is only found if the corpus text is identical
(the stdlib differs between Python versions). To carry a pre-built cache, export the corpus
once (`--prepare --export-corpus FILE.jsonl`) and pass `--corpus FILE.jsonl` everywhere.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import socket
import sys
import time
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # run from a checkout without installing the package
    sys.path.append(str(HERE.parent))

VARIANTS: dict[str, dict[str, Any]] = {
    "baseline": {"compression.enabled": False},
    "r1/2": {"compression.ratio": 0.5},
    "r1/4": {"compression.ratio": 0.25},
    "r1/8": {"compression.ratio": 0.125},
    "r1/4_bf16W0": {"compression.ratio": 0.25, "compression.base_dtype": "bf16"},
    "r1/4_reset": {"compression.ratio": 0.25, "compression.moments_on_resample": "reset"},
    "r1/4_T50": {"compression.ratio": 0.25, "compression.resample_interval": 50},
    "r1/4_T50_reset": {"compression.ratio": 0.25, "compression.resample_interval": 50,
                       "compression.moments_on_resample": "reset"},
    "unbiased_r1/4": {"compression.mode": "unbiased", "compression.ratio": 0.25},
}

DEFAULTS = dict(layers=8, hidden=512, heads=8, seq=512, micro_batch=16, vocab=8192,
                max_bytes=10**9, lr=1e-3, min_lr=1e-4, warmup=100, eval_interval=50,
                epochs=3.0, eval_batches=1000)
# CPU smoke size: a couple of steps on a 300 kB slice of the corpus
TINY = dict(layers=2, hidden=64, heads=4, seq=32, micro_batch=2, vocab=512, max_bytes=300_000,
            lr=1e-3, min_lr=1e-4, warmup=1, eval_interval=2, epochs=None, steps=3,
            eval_batches=2)


def slug(variant: str) -> str:
    return variant.replace("/", "-")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def data_overrides(args) -> list[str]:
    out = [f"data.vocab_size={args.vocab}", f"data.max_bytes={args.max_bytes}",
           f"data.cache_dir={args.cache_dir}", "data.tokenizer=bpe"]
    if args.corpus:
        out += ["data.source=files", f"data.paths={json.dumps([str(args.corpus)])}"]
    return out


def overrides(args, variant: str, steps: int) -> list[str]:
    o = {
        "model.num_layers": args.layers, "model.hidden_size": args.hidden,
        "model.num_attention_heads": args.heads, "model.seq_length": args.seq,
        "train.micro_batch_size": args.micro_batch, "train.train_steps": steps,
        "train.eval_interval": args.eval_interval, "train.eval_batches": args.eval_batches,
        "train.log_interval": max(1, args.eval_interval), "train.seed": args.seed,
        "train.zero_stage": args.zero_stage, "optim.lr": args.lr, "optim.min_lr": args.min_lr,
        "optim.warmup_steps": args.warmup, "logging.progress": False,
    }
    o.update(VARIANTS[variant])
    return [f"{k}={json.dumps(v) if isinstance(v, bool) else v}" for k, v in o.items()] + \
        data_overrides(args)


def model_params(layers: int, hidden: int, ffn: int, vocab_padded: int) -> int:
    """GPT parameters (untied embedding/output, RMSNorm, no biases)."""
    per_layer = 4 * hidden * hidden + 3 * hidden * ffn + 2 * hidden
    return layers * per_layer + 2 * vocab_padded * hidden + hidden


def prepare(args) -> tuple[dict, Path]:
    """Build (or find) the tokenized dataset; returns (meta.json, directory)."""
    from compact_dist.data import prepare_dataset
    from compact_dist.train_config import load_train_config

    cfg = load_train_config(None, data_overrides(args))
    t = time.perf_counter()
    _, path = prepare_dataset(cfg.data)
    meta = json.loads((path / "meta.json").read_text())
    meta["prepare_s"] = time.perf_counter() - t
    meta["path"] = str(path)
    meta["bytes_on_disk"] = sum(f.stat().st_size for f in path.iterdir())
    return meta, path


def export_corpus(args, out: Path) -> None:
    """Write the corpus documents (as compact_dist.data reads them) to a JSONL file."""
    from compact_dist.data import read_corpus
    from compact_dist.train_config import load_train_config

    docs = read_corpus(load_train_config(None, [f"data.max_bytes={args.max_bytes}"]).data)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}) + "\n")
    print(f"exported {len(docs)} documents, {out.stat().st_size / 1e6:.1f} MB -> {out}")


def run_variant(args) -> dict:
    import torch

    from compact_dist.train import padded_vocab_size, run
    from compact_dist.train_config import load_train_config

    meta, _ = prepare(args)
    train_samples = (meta["train_tokens"] - 1) // args.seq
    tokens_per_step = args.micro_batch * args.seq
    steps = args.steps or max(1, int(args.epochs * train_samples / args.micro_batch))
    if "WORLD_SIZE" not in os.environ and "SLURM_NTASKS" not in os.environ:
        os.environ.setdefault("MASTER_PORT", str(_free_port()))  # concurrent runs on a host
    cfg = load_train_config(None, overrides(args, args.variant, steps))
    vocab_padded = padded_vocab_size(meta["vocab_size"], 1)
    start = time.perf_counter()
    try:
        history = run(cfg)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    wall = time.perf_counter() - start
    valid = [(int(s), float(l)) for s, l in history["valid"]]
    report = {
        "benchmark": "convergence", "variant": args.variant,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "config": {
            "overrides": overrides(args, args.variant, steps),
            "layers": args.layers, "hidden": args.hidden, "heads": args.heads,
            "ffn": cfg.model.ffn, "seq": args.seq, "micro_batch": args.micro_batch,
            "vocab": meta["vocab_size"], "vocab_padded": vocab_padded,
            "precision": "bf16" if torch.cuda.is_available() else "fp32",
            "lr": args.lr, "min_lr": args.min_lr, "warmup": args.warmup,
            "zero_stage": args.zero_stage,
            "compression": cfg.compression.model_dump(),
        },
        "model_params": model_params(args.layers, args.hidden, cfg.model.ffn, vocab_padded),
        "dataset": meta,
        "steps": steps, "tokens_per_step": tokens_per_step, "tokens": steps * tokens_per_step,
        "epochs": steps * args.micro_batch / train_samples,
        "wall_s": wall, "s_per_step": wall / steps,
        "losses": history["losses"],
        "valid": [{"step": s, "tokens": s * tokens_per_step, "loss": l,
                   "ppl": math.exp(min(l, 50.0))} for s, l in valid],
    }
    if valid:
        report["final_valid_loss"] = valid[-1][1]
        report["final_valid_ppl"] = math.exp(min(valid[-1][1], 50.0))
    tail = history["losses"][-max(1, len(history["losses"]) // 20):]
    report["final_train_loss_avg"] = sum(tail) / len(tail)
    return report


def merge(out_dir: Path, prefix: str) -> dict:
    runs = {}
    for path in sorted(out_dir.glob(f"{prefix}_*.json")):
        r = json.loads(path.read_text())
        if r.get("benchmark") == "convergence":
            runs[r["variant"]] = r
    if not runs:
        raise SystemExit(f"no {prefix}_<variant>.json in {out_dir}")
    base = runs.get("baseline")
    merged: dict[str, Any] = {"benchmark": "convergence_merged", "variants": {},
                              "date": datetime.datetime.now().isoformat(timespec="seconds")}
    if base:
        merged["config"] = {k: v for k, v in base["config"].items() if k != "overrides"}
        merged["model_params"] = base["model_params"]
        merged["dataset"] = base["dataset"]
        merged["device"] = base["device"]
    order = sorted(runs, key=lambda v: (v != "baseline", list(VARIANTS).index(v)
                                        if v in VARIANTS else 99, v))
    base_ppl = {p["step"]: p["ppl"] for p in base["valid"]} if base else {}
    for name in order:
        r = runs[name]
        entry = {
            "steps": r["steps"], "tokens": r["tokens"], "epochs": r["epochs"],
            "wall_s": r["wall_s"], "s_per_step": r["s_per_step"],
            "curve": [{"step": p["step"], "tokens": p["tokens"], "loss": p["loss"],
                       "ppl": p["ppl"],
                       "ppl_ratio_vs_baseline": (p["ppl"] / base_ppl[p["step"]]
                                                 if p["step"] in base_ppl else None)}
                      for p in r["valid"]],
            "final_valid_loss": r.get("final_valid_loss"),
            "final_valid_ppl": r.get("final_valid_ppl"),
            "final_train_loss_avg": r.get("final_train_loss_avg"),
        }
        if base and r.get("final_valid_ppl") and base.get("final_valid_ppl"):
            entry["final_ppl_ratio_vs_baseline"] = r["final_valid_ppl"] / base["final_valid_ppl"]
            entry["final_ppl_gap_pct"] = 100 * (entry["final_ppl_ratio_vs_baseline"] - 1)
            entry["final_loss_gap"] = r["final_valid_loss"] - base["final_valid_loss"]
        if base and r["steps"] != base["steps"]:
            entry["warning"] = "different step count than the baseline"
        merged["variants"][name] = entry
    return merged


def merged_markdown(m: dict) -> str:
    cfg = m.get("config", {})
    ds = m.get("dataset", {})
    lines = [f"# Convergence: {m.get('device', '?')}", ""]
    if cfg:
        lines += [
            f"{cfg['layers']} layers, hidden {cfg['hidden']}, {cfg['heads']} heads, ffn "
            f"{cfg['ffn']}, seq {cfg['seq']}, micro-batch {cfg['micro_batch']}, vocab "
            f"{cfg['vocab']} (BPE), {m.get('model_params', 0) / 1e6:.1f}M parameters, "
            f"{cfg['precision']}, lr {cfg['lr']} (warmup {cfg['warmup']}, cosine to "
            f"{cfg['min_lr']}); training split {ds.get('train_tokens', 0):,} tokens, "
            f"validation {ds.get('valid_tokens', 0):,} tokens", ""]
    lines += ["| variant | steps | tokens | epochs | final valid loss | final valid ppl | "
              "ppl vs baseline | final train loss | wall s/step |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name, e in m["variants"].items():
        ratio = e.get("final_ppl_ratio_vs_baseline")
        lines.append(
            f"| {name} | {e['steps']} | {e['tokens']:,} | {e['epochs']:.2f} | "
            f"{e['final_valid_loss']:.4f} | {e['final_valid_ppl']:.3f} | "
            f"{'-' if ratio is None else f'{ratio:.4f}'} | {e['final_train_loss_avg']:.4f} | "
            f"{e['s_per_step']:.3f} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--variant", choices=list(VARIANTS))
    mode.add_argument("--prepare", action="store_true", help="only build the tokenized data")
    mode.add_argument("--merge", action="store_true", help="combine the per-variant JSONs")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke size (a few steps)")
    parser.add_argument("--out-dir", default=str(HERE / "results"))
    parser.add_argument("--prefix", default="convergence", help="output file prefix")
    parser.add_argument("--cache-dir", default=str(HERE.parent / ".cache" / "compact_dist_bench"),
                        help="dataset cache (default: <repo>/.cache/compact_dist_bench, "
                             "git-ignored)")
    parser.add_argument("--corpus", default=None,
                        help="JSONL corpus ({'text': ...} per line) instead of the stdlib")
    parser.add_argument("--export-corpus", default=None,
                        help="with --prepare: write the stdlib corpus to this JSONL first")
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps (default: --epochs of the training split)")
    parser.add_argument("--epochs", type=float, default=None)
    for key in ("layers", "hidden", "heads", "seq", "micro_batch", "vocab", "max_bytes",
                "warmup", "eval_interval", "eval_batches"):
        parser.add_argument("--" + key.replace("_", "-"), type=int, default=None)
    for key in ("lr", "min_lr"):
        parser.add_argument("--" + key.replace("_", "-"), type=float, default=None)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--zero-stage", type=int, default=1, choices=[0, 1, 2, 3])
    args = parser.parse_args(argv)
    preset = TINY if args.tiny else DEFAULTS
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def main(argv: Optional[list[str]] = None) -> None:
    import warnings

    # megatron-core 0.16.1 warns about its own default cuda_graph_scope on every config
    warnings.filterwarnings("ignore", message="full scope is deprecated")
    args = parse_args(argv)
    out_dir = Path(args.out_dir)
    if args.merge:
        merged = merge(out_dir, args.prefix)
        (out_dir / f"{args.prefix}.json").write_text(json.dumps(merged, indent=1))
        (out_dir / f"{args.prefix}.md").write_text(merged_markdown(merged))
        print(merged_markdown(merged))
        return
    if args.prepare:
        if args.export_corpus:
            export_corpus(args, Path(args.export_corpus))
            args.corpus = args.export_corpus
        meta, path = prepare(args)
        print(json.dumps(meta, indent=1))
        samples = (meta["train_tokens"] - 1) // args.seq
        steps = args.steps or int(args.epochs * samples / args.micro_batch)
        print(f"{samples} training samples of {args.seq} tokens; steps per variant: {steps} "
              f"({steps * args.micro_batch / samples:.2f} epochs at micro-batch "
              f"{args.micro_batch})")
        return
    report = run_variant(args)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{args.prefix}_{slug(args.variant)}.json"
    path.write_text(json.dumps(report, indent=1))
    print(f"{args.variant}: {report['steps']} steps, {report['tokens']:,} tokens "
          f"({report['epochs']:.2f} epochs) in {report['wall_s']:.0f} s; final valid ppl "
          f"{report.get('final_valid_ppl', float('nan')):.3f} -> {path}")


if __name__ == "__main__":
    main()
