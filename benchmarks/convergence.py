"""Pretraining convergence, Megatron baseline vs CompAct, on real text with `compact-train`.

A LLaMA-style GPT is pretrained with compact_dist.training.train.run for a fixed token budget, then the
validation perplexity curves are compared. Presets (`--preset`):
- `33m` (default): 8 layers, hidden 512, 8 heads, SwiGLU ffn 1344, seq 512, micro-batch 16,
  BPE vocabulary 8192 (~33M parameters), 3 epochs of the embedded corpus (the interpreter's
  standard-library source, compact_dist.training.data), validation on the whole split every 50 steps.
- `110m`: 12 layers, hidden 768, 12 heads, ffn 2048, seq 1024, micro-batch 32 (one GPU),
  BPE vocabulary 16384 (110.1M parameters), 45M tokens (1373 steps), lr 1e-3 cosine to 1e-4
  after 100 warm-up steps, validation every 50 steps on 3 fixed batches (98k tokens; on an
  H100 an evaluation batch took ~0.045 s and a training step 0.105 s, so an evaluation costs
  ~2.6% of the 50 steps before it), a checkpoint every 250 steps. Meant for `--corpus` =
  the host corpus of benchmarks/host_corpus.py (a few hundred MB; BPE trained on a 64 MB
  sample of it, `--tokenizer-train-bytes`); benchmarks/convergence_gpu.sh runs it.
- `tiny`: CPU smoke size (`--tiny`).
One variant per process, so variants can run concurrently on different GPUs; `--merge`
combines them (per-variant JSONs, final or partial) into `<prefix>.json` / `.md` and the plot
`<prefix>_ppl.png`.

Segments and resume. Every variant trains with `checkpoint.dir=<ckpt-root>/ckpt_<slug>`
(default ckpt-root: the output directory) and resumes from its `latest` checkpoint when run
again. SIGTERM / SIGUSR1 (`timeout -s TERM`, or `--time-limit-s N`, which sends SIGTERM to
the process itself after N seconds) end a segment after the current optimizer step with a
checkpoint (compact_dist.training.train.GracefulStop). After each segment the curve so far (the
previous segments' training losses and evaluations stitched by step with this one's) goes to
`<out>/<prefix>_<slug>.part.json`; when the step count is reached, `<prefix>_<slug>.json`
replaces it. A variant already complete is not trained again (`--fresh` starts it over); a
checkpoint or part written under other settings is refused.

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
import re
import shutil
import signal
import socket
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

PROCESS_START = time.perf_counter()
HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # run from a checkout without installing the package
    sys.path.append(str(HERE.parent))

# The paper's CompAct (the defaults before data-aware projections): a seeded Gaussian P, Adam
# moments kept across resamples. The 33M results in results/convergence were run with it.
_GAUSSIAN = {"compression.projection": "gaussian", "compression.moments_on_resample": "keep"}
_PCA = {"compression.projection": "pca", "compression.moments_on_resample": "transport"}
VARIANTS: dict[str, dict[str, Any]] = {
    "baseline": {"compression.enabled": False},
    # second baseline: other initialisation (train.seed + 1), the same data order (data.seed)
    "baseline_seed2": {"compression.enabled": False, "_train_seed_offset": 1},
    "r1/2": {"compression.ratio": 0.5, **_GAUSSIAN},
    "r1/4": {"compression.ratio": 0.25, **_GAUSSIAN},
    "r1/8": {"compression.ratio": 0.125, **_GAUSSIAN},
    "r1/4_bf16W0": {"compression.ratio": 0.25, "compression.base_dtype": "bf16", **_GAUSSIAN},
    "r1/4_reset": {"compression.ratio": 0.25, **_GAUSSIAN,
                   "compression.moments_on_resample": "reset"},
    "r1/4_T50": {"compression.ratio": 0.25, "compression.resample_interval": 50, **_GAUSSIAN},
    "r1/4_T50_reset": {"compression.ratio": 0.25, "compression.resample_interval": 50,
                       **_GAUSSIAN, "compression.moments_on_resample": "reset"},
    "unbiased_r1/4": {"compression.mode": "unbiased", "compression.ratio": 0.25, **_GAUSSIAN},
    "gaussian_r1/4": {"compression.ratio": 0.25, **_GAUSSIAN},
    "gaussian_r1/4_seed2": {"compression.ratio": 0.25, **_GAUSSIAN, "_train_seed_offset": 1},
    # the numerics of configs/train/llama_7b_24gb.yaml: gaussian P, a bf16 W0 (stochastically
    # rounded merges), the optimizer offloaded to the host (issue 28)
    "gaussian_r1/4_preset24": {"compression.ratio": 0.25, **_GAUSSIAN,
                               "compression.base_dtype": "bf16",
                               "train.offload_optimizer": "cpu"},
    "gaussian_r1/4_preset24_seed2": {"compression.ratio": 0.25, **_GAUSSIAN,
                                     "compression.base_dtype": "bf16",
                                     "train.offload_optimizer": "cpu", "_train_seed_offset": 1},
    # the defaults (pca, transport, T = 200, update_scale 1)
    "pca_r1/4": {"compression.ratio": 0.25, **_PCA},
    # the defaults with W0 as a bf16 pair / in bf16, and with another initialisation
    "pca_r1/4_bf16pair": {"compression.ratio": 0.25, **_PCA,
                          "compression.base_dtype": "bf16_pair"},
    "pca_r1/4_bf16W0": {"compression.ratio": 0.25, **_PCA, "compression.base_dtype": "bf16"},
    "pca_r1/4_seed2": {"compression.ratio": 0.25, **_PCA, "_train_seed_offset": 1},
    # the defaults with the optimizer offloaded to the host (DeepSpeed ZeRO-Offload, issue 28)
    "pca_r1/4_offload": {"compression.ratio": 0.25, **_PCA, "train.offload_optimizer": "cpu"},
    "pca_r1/4_offload_seed2": {"compression.ratio": 0.25, **_PCA,
                               "train.offload_optimizer": "cpu", "_train_seed_offset": 1},
    # lean activations (fused CE exact; FP8 storage lossy: its convergence cost is measured)
    "pca_r1/4_lean": {"compression.ratio": 0.25, **_PCA, "activations.fused_cross_entropy": True,
                      "activations.fp8_storage": ["swiglu", "attention", "norm"]},
    "pca_r1/8": {"compression.ratio": 0.125, **_PCA},
    "gradient_r1/4": {"compression.ratio": 0.25, **_PCA, "compression.projection": "gradient"},
    "pca_unbiased_r1/4": {"compression.mode": "unbiased", "compression.ratio": 0.25,
                          "compression.projection": "pca"},
    # update_scale 2 (r = n/4) / 2.83 (r = n/8): the first data-aware runs, whose update had
    # the total size of a full-rank Adam step, i.e. sqrt(n / r) x its step per kept direction
    "pca_r1/4_step2": {"compression.ratio": 0.25, **_PCA, "compression.update_scale": 2.0},
    "pca_r1/4_step2_T50": {"compression.ratio": 0.25, **_PCA, "compression.update_scale": 2.0,
                           "compression.resample_interval": 50},
    "pca_r1/4_step2_T50_keep": {"compression.ratio": 0.25, **_PCA,
                                "compression.update_scale": 2.0,
                                "compression.resample_interval": 50,
                                "compression.moments_on_resample": "keep"},
    "gradient_r1/4_step2_T50": {"compression.ratio": 0.25, **_PCA,
                                "compression.projection": "gradient",
                                "compression.update_scale": 2.0,
                                "compression.resample_interval": 50},
    "pca_r1/8_step2.83_T50": {"compression.ratio": 0.125, **_PCA,
                              "compression.update_scale": 2.828427,
                              "compression.resample_interval": 50},
}
# The learning-rate control (issue 25): baseline and the pca default at other peak rates
# (`_lr`: optim.lr, with optim.min_lr = lr / 10 as in the presets); at the preset's own rate
# they are the variants above.
LR_CONTROL = {"baseline": VARIANTS["baseline"], "pca_r1/4": VARIANTS["pca_r1/4"]}
for _side, _settings in LR_CONTROL.items():
    for _lr in (5e-4, 2e-3, 4e-3):
        VARIANTS[f"{_side}_lr{_lr:g}"] = {**_settings, "_lr": _lr}
BASELINE_SEEDS = ("baseline", "baseline_seed2")  # their mean is the reference of the merge

PRESETS: dict[str, dict[str, Any]] = {
    "33m": dict(layers=8, hidden=512, heads=8, seq=512, micro_batch=16, vocab=8192,
                max_bytes=10**9, lr=1e-3, min_lr=1e-4, warmup=100, eval_interval=50,
                epochs=3.0, eval_batches=1000, prefix="convergence"),
    "110m": dict(layers=12, hidden=768, heads=12, ffn=2048, seq=1024, micro_batch=32,
                 vocab=16384, max_bytes=4 * 10**9, tokenizer_train_bytes=64 * 10**6, lr=1e-3,
                 min_lr=1e-4, warmup=100, eval_interval=50, eval_batches=3, tokens=45 * 10**6,
                 save_interval=250, keep_last=1, prefix="convergence110m"),
    # 350M (configs/train/llama_350m.yaml's shape) on the 110m preset's tokenized host corpus
    # (same vocabulary, sequence length and split: one dataset), micro-batch 16 so that four
    # variants share one H200 (~28 GiB each); tokens: what one session's device time allows
    "350m": dict(layers=24, hidden=1024, heads=16, ffn=2816, seq=1024, micro_batch=16,
                 vocab=16384, max_bytes=4 * 10**9, tokenizer_train_bytes=64 * 10**6, lr=1e-3,
                 min_lr=1e-4, warmup=100, eval_interval=50, eval_batches=6, tokens=8 * 10**6,
                 save_interval=250, keep_last=1, prefix="convergence350m"),
    # CPU smoke size: a couple of steps on a 300 kB slice of the corpus
    "tiny": dict(layers=2, hidden=64, heads=4, seq=32, micro_batch=2, vocab=512,
                 max_bytes=300_000, lr=1e-3, min_lr=1e-4, warmup=1, eval_interval=2, steps=3,
                 eval_batches=2, prefix="convergence"),
}
DEFAULTS, TINY = PRESETS["33m"], PRESETS["tiny"]


def slug(variant: str) -> str:
    return variant.replace("/", "-")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def data_overrides(args) -> list[str]:
    out = [f"data.vocab_size={args.vocab}", f"data.max_bytes={args.max_bytes}",
           f"data.cache_dir={args.cache_dir}", "data.tokenizer=bpe"]
    if args.tokenizer_train_bytes:  # only when set: the 33m datasets keep their cache key
        out.append(f"data.tokenizer_train_bytes={args.tokenizer_train_bytes}")
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
    if args.ffn:
        o["model.ffn_hidden_size"] = args.ffn
    settings = dict(VARIANTS[variant])
    o["train.seed"] += settings.pop("_train_seed_offset", 0)
    if "_lr" in settings:
        o["optim.lr"] = settings.pop("_lr")
        o["optim.min_lr"] = o["optim.lr"] / 10
    o.update(settings)
    return [f"{k}={json.dumps(v) if isinstance(v, bool) else v}" for k, v in o.items()] + \
        data_overrides(args) + list(args.override or [])


def checkpoint_dir(args, variant: str) -> Path:
    return Path(args.ckpt_root or args.out_dir) / f"ckpt_{slug(variant)}"


def checkpoint_overrides(args, variant: str) -> list[str]:
    return [f"checkpoint.dir={checkpoint_dir(args, variant)}", "checkpoint.resume=true",
            f"checkpoint.save_interval={args.save_interval}",
            f"checkpoint.keep_last={args.keep_last}"]


def fingerprint(args, variant: str, steps: int, meta: dict) -> dict:
    """What must not change between the segments of a variant: the settings (not where the
    data cache or the checkpoints live) and the dataset (its cache key hashes the text)."""
    keep = [o for o in overrides(args, variant, steps)
            if not o.startswith(("data.cache_dir=", "data.paths="))]
    return {"overrides": keep, "dataset_key": Path(meta["path"]).name}


def train_steps(args, meta: dict) -> int:
    """--steps, else --epochs if given, else --tokens, else the preset's epochs."""
    train_samples = (meta["train_tokens"] - 1) // args.seq
    if args.steps:
        return args.steps
    if args.epochs is None and args.tokens:
        return max(1, args.tokens // (args.micro_batch * args.seq))
    return max(1, int((args.epochs or 3.0) * train_samples / args.micro_batch))


def model_params(layers: int, hidden: int, ffn: int, vocab_padded: int) -> int:
    """GPT parameters (untied embedding/output, RMSNorm, no biases)."""
    per_layer = 4 * hidden * hidden + 3 * hidden * ffn + 2 * hidden
    return layers * per_layer + 2 * vocab_padded * hidden + hidden


def prepare(args) -> tuple[dict, Path]:
    """Build (or find) the tokenized dataset; returns (meta.json, directory)."""
    from compact_dist.training.data import prepare_dataset
    from compact_dist.training.train_config import load_train_config

    cfg = load_train_config(None, data_overrides(args))
    t = time.perf_counter()
    _, path = prepare_dataset(cfg.data)
    meta = json.loads((path / "meta.json").read_text())
    meta["prepare_s"] = time.perf_counter() - t
    meta["path"] = str(path)
    meta["bytes_on_disk"] = sum(f.stat().st_size for f in path.iterdir())
    return meta, path


def export_corpus(args, out: Path) -> None:
    """Write the corpus documents (as compact_dist.training.data reads them) to a JSONL file."""
    from compact_dist.training.data import read_corpus
    from compact_dist.training.train_config import load_train_config

    docs = read_corpus(load_train_config(None, [f"data.max_bytes={args.max_bytes}"]).data)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}) + "\n")
    print(f"exported {len(docs)} documents, {out.stat().st_size / 1e6:.1f} MB -> {out}")


def part_path(out_dir: Path, prefix: str, variant: str) -> Path:
    return out_dir / f"{prefix}_{slug(variant)}.part.json"


def final_path(out_dir: Path, prefix: str, variant: str) -> Path:
    return out_dir / f"{prefix}_{slug(variant)}.json"


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def start_time_limit(seconds: Optional[float]) -> Optional[threading.Timer]:
    """SIGTERM to this process after `seconds` (a daemon timer thread): inside the training
    loop GracefulStop turns it into stop + checkpoint; before it, the process just ends."""
    if not seconds:
        return None
    timer = threading.Timer(seconds, os.kill, (os.getpid(), signal.SIGTERM))
    timer.daemon = True
    timer.start()
    return timer


class StepTimes:
    """Wall-clock time of every optimizer step of compact_dist.training.train.run, taken from its
    Logger.step call (after the step, before evaluation and checkpoint): the loop time, the
    median step, and the evaluation cost (the step after an evaluation minus the median).
    signal_at_step: SIGTERM to this process at that step (tests: a stop at a known step)."""

    def __init__(self, signal_at_step: Optional[int] = None) -> None:
        self.times: list[tuple[int, float]] = []
        self.signal_at_step = signal_at_step

    def __enter__(self) -> "StepTimes":
        from compact_dist.training.logger import Logger

        self._logger, self._original = Logger, Logger.step
        original, times, stop_at = self._original, self.times, self.signal_at_step

        def step(logger, step: int, scalars: dict, line: bool, **kwargs) -> None:
            times.append((step, time.perf_counter()))
            if stop_at is not None and step == stop_at:
                os.kill(os.getpid(), signal.SIGTERM)
            return original(logger, step, scalars, line, **kwargs)

        Logger.step = step
        return self

    def __exit__(self, *exc) -> None:
        self._logger.step = self._original

    def summary(self, eval_interval: int, save_interval: int) -> dict:
        n = len(self.times)
        if n < 2:
            return {"loop_s": None, "step_s_median": None, "eval_s_mean": None}
        steps = [s for s, _ in self.times]
        dts = [b - a for (_, a), (_, b) in zip(self.times, self.times[1:])]
        median = statistics.median(dts)
        # the interval after step k holds its evaluation (every eval_interval steps)
        evals = [dt - median for k, dt in zip(steps, dts)
                 if k % eval_interval == 0 and not (save_interval and k % save_interval == 0)]
        return {"loop_s": (self.times[-1][1] - self.times[0][1]) * n / (n - 1),
                "step_s_median": median,
                "eval_s_mean": statistics.mean(evals) if evals else None}


def stitch(prev: Optional[dict], losses: list[float], valid: list[dict], end_step: int
           ) -> tuple[list[Optional[float]], list[dict], int]:
    """The previous segments' training losses (index i: step i + 1) and evaluations before
    this segment's first step, then this segment's. A step no segment reported (a part JSON
    lost after its checkpoint was written) is None; returns (losses, valid, missing steps)."""
    first = end_step - len(losses) + 1
    old = list(prev["losses"][: first - 1]) if prev else []
    old += [None] * (first - 1 - len(old))
    old_valid = [p for p in prev["valid"] if p["step"] < first] if prev else []
    stitched = old + list(losses)
    return stitched, old_valid + list(valid), sum(x is None for x in stitched)


def run_variant(args, timer: Optional[threading.Timer] = None) -> dict:
    """Train one variant (a segment: until done or stopped), write its part / final JSON and
    return the report. timer: the --time-limit-s timer, cancelled once training returned."""
    import torch

    from compact_dist.training.model_setup import padded_vocab_size

    from compact_dist.training.train import run
    from compact_dist.training.train_config import load_train_config

    wall_start = PROCESS_START  # a segment's wall time counts the imports too
    out_dir = Path(args.out_dir)
    part, final = (f(out_dir, args.prefix, args.variant) for f in (part_path, final_path))
    ckpt = checkpoint_dir(args, args.variant)
    if args.fresh:
        shutil.rmtree(ckpt, ignore_errors=True)
        for path in (part, final):
            path.unlink(missing_ok=True)
    meta, _ = prepare(args)
    train_samples = (meta["train_tokens"] - 1) // args.seq
    tokens_per_step = args.micro_batch * args.seq
    steps = train_steps(args, meta)
    fp = fingerprint(args, args.variant, steps, meta)
    done = _read_json(final)
    prev = _read_json(part)
    if prev is not None and not (ckpt / "latest").is_file():  # e.g. a fresh machine
        print(f"{args.variant}: {part.name} exists but no checkpoint in {ckpt}: starting over")
        prev = None
    for name, old in (("final", done), ("part", prev)):
        if old is not None and old.get("fingerprint") not in (None, fp):
            raise SystemExit(
                f"{args.variant}: the {name} JSON in {out_dir} was written with other settings "
                f"or data; --fresh starts this variant over (and removes {ckpt})")
    if done is not None:
        print(f"{args.variant}: already done ({final}); --fresh to train it again")
        if timer:
            timer.cancel()
        return done
    if "WORLD_SIZE" not in os.environ and "SLURM_NTASKS" not in os.environ:
        os.environ.setdefault("MASTER_PORT", str(_free_port()))  # concurrent runs on a host
    cfg = load_train_config(None, overrides(args, args.variant, steps)
                            + checkpoint_overrides(args, args.variant))
    vocab_padded = padded_vocab_size(meta["vocab_size"], 1)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    try:
        with StepTimes(args.signal_at_step) as step_times:
            history = run(cfg)
    finally:
        if timer:
            timer.cancel()
        for sig in (signal.SIGTERM, signal.SIGUSR1):  # a late signal must not cut the writes
            signal.signal(sig, signal.SIG_IGN)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    wall = time.perf_counter() - wall_start
    end_step = int(history.get("step", steps))
    new_valid = [{"step": int(s), "tokens": int(s) * tokens_per_step, "loss": float(l),
                  "ppl": math.exp(min(float(l), 50.0))} for s, l in history["valid"]]
    losses, valid, missing = stitch(prev, history["losses"], new_valid, end_step)
    timing = step_times.summary(args.eval_interval, args.save_interval)
    segment = {
        "start_step": end_step - len(history["losses"]), "end_step": end_step,
        "steps": len(history["losses"]), "stopped_early": bool(history.get("stopped_early")),
        "wall_s": wall, **timing,
        "peak_mem_GiB": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    segments = (prev or {}).get("segments", []) + [segment]
    timed = [g for g in segments if g.get("loop_s") and g["steps"] > 1]
    timed_steps = sum(g["steps"] for g in timed)
    peaks = [g["peak_mem_GiB"] for g in segments if g.get("peak_mem_GiB") is not None]
    complete = end_step >= steps and not missing
    report = {
        "benchmark": "convergence" if end_step >= steps else "convergence_part",
        "variant": args.variant, "complete": complete,
        "device": segment["device"],
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "date": segment["date"],
        "command": " ".join(sys.argv),
        "fingerprint": fp,
        "config": {
            "overrides": overrides(args, args.variant, steps),
            "preset": args.preset,
            "layers": args.layers, "hidden": args.hidden, "heads": args.heads,
            "ffn": cfg.model.ffn, "seq": args.seq, "micro_batch": args.micro_batch,
            "vocab": meta["vocab_size"], "vocab_padded": vocab_padded,
            "precision": "bf16" if cuda else "fp32",
            "lr": cfg.optim.lr, "min_lr": cfg.optim.min_lr, "warmup": args.warmup,
            "eval_interval": args.eval_interval, "eval_batches": args.eval_batches,
            "eval_tokens": args.eval_batches * args.micro_batch * args.seq,
            "zero_stage": args.zero_stage, "train_seed": cfg.train.seed,
            "data_seed": cfg.data.seed, "checkpoint": cfg.checkpoint.model_dump(),
            "compression": cfg.compression.model_dump(),
        },
        "model_params": model_params(args.layers, args.hidden, cfg.model.ffn, vocab_padded),
        "dataset": meta,
        "steps": steps, "step_reached": end_step, "missing_steps": missing,
        "tokens_per_step": tokens_per_step, "tokens": steps * tokens_per_step,
        "epochs": steps * args.micro_batch / train_samples,
        "segments": segments,
        "wall_s": sum(g["wall_s"] for g in segments),
        "train_loop_s": sum(g["loop_s"] or 0.0 for g in segments),
        # the training loop's time per step, evaluations and checkpoints included
        "s_per_step": (sum(g["loop_s"] for g in timed) / timed_steps if timed_steps
                       else sum(g["wall_s"] for g in segments) / max(1, end_step)),
        "s_per_step_median": (sum(g["step_s_median"] * g["steps"] for g in timed) / timed_steps
                              if timed_steps else None),
        "peak_mem_GiB": max(peaks) if peaks else None,
        "losses": losses,
        "valid": valid,
        # per measurement (step, {compact layer: kept fraction}); logging.kept_energy
        "kept_energy": (prev or {}).get("kept_energy", []) + [
            [int(s), layers] for s, layers in history.get("kept_energy", [])],
    }
    evals = [g for g in timed if g.get("eval_s_mean") is not None]
    if evals and report["s_per_step_median"]:
        eval_s = statistics.mean(g["eval_s_mean"] for g in evals)
        report["eval_s_mean"] = eval_s
        report["eval_fraction"] = eval_s / (args.eval_interval * report["s_per_step_median"])
    if valid:
        report["last_valid_step"] = valid[-1]["step"]
        if end_step >= steps and valid[-1]["step"] == steps:
            report["final_valid_loss"] = valid[-1]["loss"]
            report["final_valid_ppl"] = valid[-1]["ppl"]
    known = [x for x in losses if x is not None]
    tail = known[-max(1, len(known) // 20):]
    if tail:
        report["final_train_loss_avg"] = sum(tail) / len(tail)
    out_dir.mkdir(parents=True, exist_ok=True)
    if end_step >= steps:
        _write_json(final, report)
        part.unlink(missing_ok=True)
    else:
        _write_json(part, report)
    return report


def load_runs(out_dir: Path, prefix: str) -> dict[str, dict]:
    """Per variant its final JSON, or its part JSON while it is unfinished."""
    runs: dict[str, dict] = {}
    for path in sorted(out_dir.glob(f"{prefix}_*.json")):
        r = _read_json(path)
        if not isinstance(r, dict) or r.get("benchmark") not in ("convergence",
                                                                 "convergence_part"):
            continue
        if r["benchmark"] == "convergence" or r["variant"] not in runs:
            runs[r["variant"]] = r
    return runs


def _order(name: str) -> tuple:
    if name in BASELINE_SEEDS:
        return (0, BASELINE_SEEDS.index(name), name)
    return (1, list(VARIANTS).index(name) if name in VARIANTS else len(VARIANTS), name)


def reference_curve(runs: dict[str, dict]) -> dict[int, dict]:
    """step -> mean validation ppl / loss of the baseline seeds that evaluated that step
    (all of them), the seeds' ppl and, with two or more, the seed noise
    (max - min) / mean in % (two seeds: |ppl1 - ppl2| / mean)."""
    seeds = [b for b in BASELINE_SEEDS if b in runs]
    if not seeds:
        return {}
    curves = [{p["step"]: p for p in runs[b]["valid"]} for b in seeds]
    ref = {}
    for step in sorted(set.intersection(*(set(c) for c in curves))):
        ppl = [c[step]["ppl"] for c in curves]
        mean = sum(ppl) / len(ppl)
        ref[step] = {"step": step, "tokens": curves[0][step]["tokens"], "ppl_mean": mean,
                     "loss_mean": sum(c[step]["loss"] for c in curves) / len(curves),
                     "ppl": dict(zip(seeds, ppl)),
                     "noise_pct": 100 * (max(ppl) - min(ppl)) / mean if len(ppl) > 1 else None}
    return ref


def merge(out_dir: Path, prefix: str) -> dict:
    runs = load_runs(out_dir, prefix)
    if not runs:
        raise SystemExit(f"no {prefix}_<variant>.json or .part.json in {out_dir}")
    seeds = [b for b in BASELINE_SEEDS if b in runs]
    ref = reference_curve(runs)
    merged: dict[str, Any] = {"benchmark": "convergence_merged", "variants": {},
                              "date": datetime.datetime.now().isoformat(timespec="seconds"),
                              "reference": {"seeds": seeds, "curve": list(ref.values())}}
    first = runs[seeds[0]] if seeds else runs[sorted(runs, key=_order)[0]]
    merged["config"] = {k: v for k, v in first["config"].items() if k != "overrides"}
    for key in ("model_params", "dataset", "device", "steps", "tokens"):
        merged[key] = first.get(key)
    if ref:
        last = ref[max(ref)]
        merged["reference"].update(
            step=last["step"], ppl_mean=last["ppl_mean"], noise_pct=last["noise_pct"],
            complete=all(runs[b].get("complete", True) and last["step"] == runs[b]["steps"]
                         for b in seeds))
    for name in sorted(runs, key=_order):
        r = runs[name]
        complete = r["benchmark"] == "convergence" and r.get("complete", True)
        entry = {
            "complete": complete, "steps": r["steps"],
            "step_reached": r.get("step_reached", r["steps"]),
            "tokens": r["tokens"], "epochs": r["epochs"], "wall_s": r["wall_s"],
            "s_per_step": r["s_per_step"], "s_per_step_median": r.get("s_per_step_median"),
            "peak_mem_GiB": r.get("peak_mem_GiB"), "eval_fraction": r.get("eval_fraction"),
            "segments": len(r.get("segments", [None])),
            "curve": [{"step": p["step"], "tokens": p["tokens"], "loss": p["loss"],
                       "ppl": p["ppl"],
                       "ppl_ratio_vs_baseline": (p["ppl"] / ref[p["step"]]["ppl_mean"]
                                                 if p["step"] in ref else None)}
                      for p in r["valid"]],
            "final_valid_loss": r.get("final_valid_loss"),
            "final_valid_ppl": r.get("final_valid_ppl"),
            "final_train_loss_avg": r.get("final_train_loss_avg"),
        }
        common = [p for p in r["valid"] if p["step"] in ref]
        if common:  # the last evaluation this variant shares with every baseline seed
            p = common[-1]
            base = ref[p["step"]]
            gap = 100 * (p["ppl"] / base["ppl_mean"] - 1)
            entry.update(compare_step=p["step"], compare_tokens=p["tokens"],
                         compare_ppl=p["ppl"], compare_loss=p["loss"],
                         baseline_mean_ppl=base["ppl_mean"], gap_pct=gap,
                         loss_gap=p["loss"] - base["loss_mean"])
            if base["noise_pct"] is not None:
                entry["seed_noise_pct"] = base["noise_pct"]
                entry["within_seed_noise"] = abs(gap) <= base["noise_pct"]
            if complete and p["step"] == r["steps"] and entry["final_valid_ppl"] is not None:
                entry["final_ppl_ratio_vs_baseline"] = p["ppl"] / base["ppl_mean"]
                entry["final_ppl_gap_pct"] = gap
                entry["final_loss_gap"] = entry["loss_gap"]
        if seeds and r["steps"] != runs[seeds[0]]["steps"]:
            entry["warning"] = "different step count than the baseline"
        entry["lr"] = r["config"]["lr"]
        entry["kept_energy"] = [
            {"step": step, "mean": sum(layers.values()) / len(layers),
             "worst": min(layers.values()), "worst_layer": min(layers, key=layers.get)}
            for step, layers in r.get("kept_energy", []) if layers]
        merged["variants"][name] = entry
    merged["lr_control"] = lr_control(merged["variants"])
    return merged


def side_of(variant: str) -> str:
    """The method a variant trains, without its seed and learning-rate suffixes:
    baseline_seed2 -> baseline, pca_r1/4_lr0.002 -> pca_r1/4."""
    return re.sub(r"(_seed2|_lr[0-9.e+-]+)+$", "", variant)


def lr_control(variants: dict[str, dict]) -> Optional[dict]:
    """With more than one learning rate on a side: per side and rate the final validation
    perplexities (the seeds' mean where there are several), for a rate whose run did not
    finish its last evaluation as a ratio to the baseline mean at that step, the best finished
    rate per side (at the edge of the rates tried, finished or not, or inside), and the gap of
    each side's best to the baseline's best (None when no side has two rates)."""
    table: dict[str, dict[float, list[float]]] = {}
    partial: dict[str, dict[float, dict]] = {}
    for name, e in variants.items():
        side = side_of(name)
        if e.get("final_valid_ppl") is not None:
            table.setdefault(side, {}).setdefault(e["lr"], []).append(e["final_valid_ppl"])
        elif e["curve"] and e["curve"][-1].get("ppl_ratio_vs_baseline") is not None:
            last = e["curve"][-1]
            partial.setdefault(side, {})[e["lr"]] = {
                "step": last["step"], "ppl": last["ppl"],
                "ppl_ratio_vs_baseline": last["ppl_ratio_vs_baseline"]}
    tried = {side: set(table.get(side, {})) | set(partial.get(side, {}))
             for side in set(table) | set(partial)}
    if not any(len(rates) > 1 for rates in tried.values()):
        return None
    sides = {}
    for side, rates in table.items():
        mean = {lr: sum(v) / len(v) for lr, v in sorted(rates.items())}
        best = min(mean, key=mean.get)
        sides[side] = {"ppl": {f"{lr:g}": m for lr, m in mean.items()},
                       "seeds": {f"{lr:g}": len(rates[lr]) for lr in mean},
                       "unfinished": {f"{lr:g}": v for lr, v in
                                      sorted(partial.get(side, {}).items())},
                       "best_lr": best, "best_ppl": mean[best],
                       "best_at_edge": best in (min(tried[side]), max(tried[side]))}
    out: dict[str, Any] = {"sides": sides}
    if "baseline" in sides:
        base = sides["baseline"]["best_ppl"]
        out["best_vs_best_pct"] = {side: 100 * (v["best_ppl"] / base - 1)
                                   for side, v in sides.items() if side != "baseline"}
    return out


def _fmt(x: Optional[float], spec: str, missing: str = "-") -> str:
    return missing if x is None else format(x, spec)


def merged_markdown(m: dict) -> str:
    cfg = m.get("config", {})
    ds = m.get("dataset", {})
    lines = [f"# Convergence: {m.get('device', '?')}", ""]
    if cfg:
        lines += [
            f"{cfg['layers']} layers, hidden {cfg['hidden']}, {cfg['heads']} heads, ffn "
            f"{cfg['ffn']}, seq {cfg['seq']}, micro-batch {cfg['micro_batch']}, vocab "
            f"{cfg['vocab']} (BPE), {(m.get('model_params') or 0) / 1e6:.1f}M parameters, "
            f"{cfg['precision']}, lr {cfg['lr']} (warmup {cfg['warmup']}, cosine to "
            f"{cfg['min_lr']}); training split {ds.get('train_tokens', 0):,} tokens, "
            f"validation {ds.get('valid_tokens', 0):,} tokens"
            + (f" (each evaluation: {cfg['eval_batches']} batches, {cfg['eval_tokens']:,} "
               f"tokens, every {cfg['eval_interval']} steps)" if "eval_tokens" in cfg else ""),
            ""]
    ref = m.get("reference") or {}
    if ref.get("step") is not None:
        noise = ref.get("noise_pct")
        lines += [
            f"Reference: the mean validation perplexity of the baseline seeds "
            f"({', '.join(ref['seeds'])}; other initialisation, same data order), "
            f"{ref['ppl_mean']:.3f} at step {ref['step']}"
            + ("" if ref.get("complete") else " (not finished)")
            + (f"; seed noise |ppl seed1 - ppl seed2| / mean = {noise:.2f}%" if noise is not None
               else "; one seed only: no noise estimate")
            + ". Gap: a variant's perplexity over the reference at the last evaluation both "
              "have (the final one when both finished); within noise: |gap| <= seed noise at "
              "that step.", ""]
    lines += ["| variant | steps | tokens | compared at step | valid loss | valid ppl | "
              "gap vs baseline mean | seed noise | within noise | final train loss | "
              "s/step | peak GiB |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, e in m["variants"].items():
        done = e.get("step_reached", e["steps"])
        steps = f"{done}" if e.get("complete", True) else f"{done}/{e['steps']} (running)"
        step = e.get("compare_step")
        curve = {p["step"]: p for p in e["curve"]}
        point = curve.get(step) or (e["curve"][-1] if e["curve"] else {})
        gap = e.get("gap_pct", e.get("final_ppl_gap_pct"))
        within = e.get("within_seed_noise")
        lines.append(
            f"| {name} | {steps} | {e['tokens']:,} | {_fmt(step or point.get('step'), 'd')} | "
            f"{_fmt(point.get('loss'), '.4f')} | {_fmt(point.get('ppl'), '.3f')} | "
            f"{_fmt(gap, '+.2f')}{'%' if gap is not None else ''} | "
            f"{_fmt(e.get('seed_noise_pct'), '.2f')}{'%' if e.get('seed_noise_pct') else ''} | "
            f"{'-' if within is None else ('yes' if within else 'no')} | "
            f"{_fmt(e.get('final_train_loss_avg'), '.4f')} | {_fmt(e['s_per_step'], '.3f')} | "
            f"{_fmt(e.get('peak_mem_GiB'), '.2f')} |")
    lines += ["", "s/step: the training loop's wall time per optimizer step (evaluations and "
              "checkpoints included; the first segment's start-up excluded); peak GiB: "
              "torch.cuda.max_memory_allocated over the variant's segments."]
    control = m.get("lr_control")
    if control:
        rates = sorted({float(lr) for v in control["sides"].values()
                        for lr in [*v["ppl"], *v.get("unfinished", {})]})
        lines += ["", "## Learning-rate control", "",
                  "Final validation perplexity per side and peak learning rate (min_lr = lr / "
                  "10; the mean of the seeds where a rate has several, their count in "
                  "brackets; an unfinished run as its ratio to the baseline seeds' mean at its "
                  "last evaluation); best lr: the best finished rate, marked when it is the "
                  "lowest or highest rate tried; best-vs-best: a side's best over the "
                  "baseline's best.", "",
                  "| side | " + " | ".join(f"lr {lr:g}" for lr in rates)
                  + " | best lr | best ppl | best vs baseline's best |",
                  "|---|" + "---|" * (len(rates) + 3)]
        for side, v in control["sides"].items():
            unfinished = v.get("unfinished", {})
            cells = [(f"{v['ppl'][f'{lr:g}']:.3f} ({v['seeds'][f'{lr:g}']})"
                      if f"{lr:g}" in v["ppl"] else
                      (f"unfinished: {unfinished[f'{lr:g}']['ppl_ratio_vs_baseline']:.2f}x the "
                       f"baseline mean at step {unfinished[f'{lr:g}']['step']}"
                       if f"{lr:g}" in unfinished else "-")) for lr in rates]
            gap = (control.get("best_vs_best_pct") or {}).get(side)
            lines.append(f"| {side} | " + " | ".join(cells) + f" | {v['best_lr']:g}"
                         + (" (edge of the sweep)" if v["best_at_edge"] else "")
                         + f" | {v['best_ppl']:.3f} | "
                         + ("-" if gap is None else f"{gap:+.2f}%") + " |")
    kept = {n: e["kept_energy"] for n, e in m["variants"].items() if e.get("kept_energy")}
    if kept:
        lines += ["", "## Kept energy", "",
                  "What P keeps of the compact layers' weight-gradient energy, ||G Q||^2 / "
                  "||G||^2, on a probe micro-batch right before each re-estimate of P: mean "
                  "over the layers / worst layer.", "",
                  "| variant | " + " | ".join(f"step {k['step']}" for k in
                                              max(kept.values(), key=len)) + " |",
                  "|---|" + "---|" * len(max(kept.values(), key=len))]
        for name, ks in kept.items():
            lines.append(f"| {name} | " + " | ".join(
                f"{k['mean']:.3f} / {k['worst']:.3f}" for k in ks) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--variant", choices=list(VARIANTS))
    mode.add_argument("--prepare", action="store_true", help="only build the tokenized data")
    mode.add_argument("--merge", action="store_true",
                      help="combine the per-variant JSONs (final or part) and plot them")
    parser.add_argument("--preset", choices=list(PRESETS), default=None,
                        help="model / data / schedule sizes (default 33m)")
    parser.add_argument("--tiny", action="store_true", help="= --preset tiny (CPU smoke size)")
    parser.add_argument("--out-dir", default=str(HERE / "results"))
    parser.add_argument("--prefix", default=None,
                        help="output file prefix (default: the preset's, convergence / "
                             "convergence110m)")
    parser.add_argument("--cache-dir", default=str(HERE.parent / ".cache" / "compact_dist_bench"),
                        help="dataset cache (default: <repo>/.cache/compact_dist_bench, "
                             "git-ignored)")
    parser.add_argument("--corpus", default=None,
                        help="JSONL corpus ({'text': ...} per line) instead of the stdlib")
    parser.add_argument("--export-corpus", default=None,
                        help="with --prepare: write the stdlib corpus to this JSONL first")
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps (default: --epochs if given, else --tokens)")
    parser.add_argument("--epochs", type=float, default=None,
                        help="epochs of the training split (33m default: 3)")
    parser.add_argument("--tokens", type=int, default=None,
                        help="token budget: steps = tokens / (micro_batch * seq) (110m: 45M)")
    for key in ("layers", "hidden", "heads", "ffn", "seq", "micro_batch", "vocab", "max_bytes",
                "tokenizer_train_bytes", "warmup", "eval_interval", "eval_batches",
                "save_interval", "keep_last"):
        parser.add_argument("--" + key.replace("_", "-"), type=int, default=None)
    for key in ("lr", "min_lr"):
        parser.add_argument("--" + key.replace("_", "-"), type=float, default=None)
    parser.add_argument("--seed", type=int, default=1234, help="train.seed (baseline_seed2: +1)")
    parser.add_argument("--zero-stage", type=int, default=1, choices=[0, 1, 2, 3])
    parser.add_argument("--override", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="extra compact-train override, after the variant's (repeatable)")
    parser.add_argument("--ckpt-root", default=None,
                        help="checkpoints go to <ckpt-root>/ckpt_<variant> (default: --out-dir)")
    parser.add_argument("--time-limit-s", type=float, default=None,
                        help="SIGTERM to itself after this many seconds: the run stops after "
                             "the current step with a checkpoint and writes its part JSON")
    parser.add_argument("--fresh", action="store_true",
                        help="remove this variant's checkpoint and JSONs first")
    parser.add_argument("--signal-at-step", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tiny:
        if args.preset not in (None, "tiny"):
            parser.error("--tiny is --preset tiny")
        args.preset = "tiny"
    args.preset = args.preset or "33m"
    preset = {**dict(ffn=None, tokenizer_train_bytes=None, epochs=None, tokens=None,
                     steps=None, save_interval=0, keep_last=2), **PRESETS[args.preset]}
    if args.epochs is not None and args.tokens is None:
        preset["tokens"] = None  # an explicit --epochs wins over the preset's token budget
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def plot_merged(merged: dict, out_dir: Path, prefix: str) -> Optional[Path]:
    try:
        from plot_results import plot_convergence
    except ImportError as err:  # matplotlib missing: the JSON / markdown are still written
        print(f"no plot ({err})")
        return None
    return plot_convergence(merged, out_dir, prefix)


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
        png = plot_merged(merged, out_dir, args.prefix)
        print(merged_markdown(merged))
        if png:
            print(png)
        return
    if args.prepare:
        if args.export_corpus:
            export_corpus(args, Path(args.export_corpus))
            args.corpus = args.export_corpus
        meta, path = prepare(args)
        print(json.dumps(meta, indent=1))
        samples = (meta["train_tokens"] - 1) // args.seq
        steps = train_steps(args, meta)
        print(f"{samples} training samples of {args.seq} tokens; steps per variant: {steps} "
              f"({steps * args.micro_batch / samples:.2f} epochs at micro-batch "
              f"{args.micro_batch}, {steps * args.micro_batch * args.seq:,} tokens)")
        return
    report = run_variant(args, start_time_limit(args.time_limit_s))
    reached = report.get("step_reached", report["steps"])
    state = ("done" if reached >= report["steps"] else
             f"stopped at step {reached} of {report['steps']}")
    print(f"{args.variant}: {state}, {report['tokens']:,} tokens "
          f"({report['epochs']:.2f} epochs), {report['wall_s']:.0f} s in "
          f"{len(report.get('segments', []))} segment(s); last valid ppl "
          f"{report['valid'][-1]['ppl'] if report['valid'] else float('nan'):.3f}")


if __name__ == "__main__":
    main()
