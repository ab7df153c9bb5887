"""Megatron-LM's own pretrain_gpt.py with CompAct (docs/MEGATRON_LM.md) on one GPU, next to
compact-train with the same settings on the same data: the loss per iteration of a tiny
LLaMA-style GPT (4 layers, hidden 256, seq 256, batch 8) on one Megatron indexed dataset.

    python benchmarks/megatron_lm_client.py --megatron-lm .mlm --out-dir benchmarks/results \\
        --name megatron_lm_client [--corpus-dir DIR]

--megatron-lm: a Megatron-LM checkout at the release of megatron-core 0.16.1 (tag
core_v0.16.1; pretrain_gpt.py, gpt_builders.py, model_provider.py and megatron/training,
legacy, rl, post_training are what it needs; megatron.core comes from the installed wheel).
--corpus-dir: a directory with tokenizer.json and the indexed prefixes train / valid (what
compact-train's stdlib corpus builder writes into data.cache_dir); absent, it is built there
(vocabulary 4096, 4 MB of the Python standard library).

Variants `SIDE_KIND_PRECISION_sSEED`: SIDE mlm (Megatron-LM's pretrain_gpt.py; `compact`
through `-m compact_dist.megatron.megatron_lm` and the spec object, `baseline` with
Megatron's local spec) or train (compact-train, ZeRO-1; `baseline`:
compression.enabled=false); PRECISION fp32 or
bf16 (--bf16; compact-train train.precision=bf16). Both sides read the same samples in the
same order: megatron-core's GPTDataset over the same prefix, seed (Megatron-LM's --seed is
also its data seed; compact-train gets data.seed = train.seed), sequence length and sample
count, consumed in order. The settings match: no warm-up (the two schedules differ only in
warm-up), cosine 1e-3 -> 1e-4, AdamW betas (0.9, 0.95), weight decay 0.1, clip 1.0, RoPE,
RMSNorm, SwiGLU unfused, no dropout, pca P at r = n/4 re-estimated every 20 steps; the
model is built from the same layer spec under the same seeds. Megatron-LM's tokenizer is
its NullTokenizer at the same vocabulary (the token ids come from the dataset either way).
Each run is its own process; the loss of every iteration is read from its log. Writes
<name>.json (curves, commands, exit status, log tails, comparisons) and <name>.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from statistics import mean
from typing import Optional

MLM_LOSS = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?lm loss: ([0-9.Ee+-]+) \|")
TRAIN_LOSS = re.compile(r"iteration\s+(\d+)/\d+ \|.*? \| loss ([0-9.Ee+-]+) \|")
VOCAB = 4096
SHAPE = dict(num_layers=4, hidden_size=256, num_attention_heads=4, ffn_hidden_size=704,
             seq_length=256)
OPTIM = dict(lr=1e-3, min_lr=1e-4, weight_decay=0.1, beta1=0.9, beta2=0.95, grad_clip=1.0)
MICRO_BATCH = 8
# Megatron-LM arguments of the shape, optimizer and kernels (no transformer-engine, no apex)
MLM_ARGS = [
    "--num-layers", str(SHAPE["num_layers"]), "--hidden-size", str(SHAPE["hidden_size"]),
    "--num-attention-heads", str(SHAPE["num_attention_heads"]),
    "--ffn-hidden-size", str(SHAPE["ffn_hidden_size"]),
    "--seq-length", str(SHAPE["seq_length"]),
    "--max-position-embeddings", str(SHAPE["seq_length"]),
    "--normalization", "RMSNorm", "--swiglu", "--disable-bias-linear",
    "--position-embedding-type", "rope", "--untie-embeddings-and-output-weights",
    "--micro-batch-size", str(MICRO_BATCH), "--global-batch-size", str(MICRO_BATCH),
    "--lr", str(OPTIM["lr"]), "--min-lr", str(OPTIM["min_lr"]), "--lr-decay-style", "cosine",
    "--lr-warmup-iters", "0", "--weight-decay", str(OPTIM["weight_decay"]),
    "--adam-beta1", str(OPTIM["beta1"]), "--adam-beta2", str(OPTIM["beta2"]),
    "--clip-grad", str(OPTIM["grad_clip"]), "--init-method-std", "0.02",
    "--tokenizer-type", "NullTokenizer", "--vocab-size", str(VOCAB - 1),  # + its eod
    "--eval-iters", "0", "--eval-interval", "1000000", "--log-interval", "1",
    "--transformer-impl", "local", "--no-persist-layer-norm",
    "--no-gradient-accumulation-fusion", "--no-masked-softmax-fusion",
    "--no-bias-dropout-fusion", "--no-bias-swiglu-fusion", "--no-rope-fusion",
    "--attention-dropout", "0", "--hidden-dropout", "0"]
COMPRESSION = dict(ratio=0.25, projection="pca")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--megatron-lm", required=True, help="Megatron-LM checkout (core_v0.16.1)")
    p.add_argument("--corpus-dir", default=None,
                   help="tokenizer.json + train/valid prefixes (default: built in the out dir)")
    p.add_argument("--iterations", type=int, default=200)
    p.add_argument("--resample-interval", type=int, default=20)
    p.add_argument("--variants", default=",".join([
        "mlm_compact_fp32_s1234", "train_compact_fp32_s1234",
        "mlm_compact_fp32_s42", "train_compact_fp32_s42", "mlm_baseline_fp32_s1234",
        "mlm_compact_bf16_s1234", "train_compact_bf16_s1234", "mlm_baseline_bf16_s1234"]))
    p.add_argument("--timeout-s", type=int, default=240, help="per run")
    p.add_argument("--out-dir", default="benchmarks/results")
    p.add_argument("--name", default="megatron_lm_client")
    args = p.parse_args(argv)
    for variant in args.variants.split(","):
        parse_variant(variant)
    return args


def parse_variant(variant: str) -> tuple[str, str, str, int]:
    """'mlm_compact_fp32_s1234' -> ('mlm', 'compact', 'fp32', 1234); SystemExit if malformed."""
    m = re.fullmatch(r"(mlm|train)_(compact|baseline)_(fp32|bf16)_s(\d+)", variant)
    if not m:
        raise SystemExit(f"megatron_lm_client.py: variant {variant!r}: expected "
                         "{mlm,train}_{compact,baseline}_{fp32,bf16}_sSEED")
    return m.group(1), m.group(2), m.group(3), int(m.group(4))


def build_corpus(directory: Path) -> Path:
    """compact-train's stdlib corpus (4 MB, BPE vocabulary 4096) tokenized into `directory`;
    returns the directory holding tokenizer.json, train.{bin,idx} and valid.{bin,idx}."""
    from compact_dist.training.data import DataConfig, prepare_dataset

    _, out = prepare_dataset(DataConfig(source="stdlib", vocab_size=VOCAB,
                                        max_bytes=4_000_000, cache_dir=str(directory)))
    return out


def command(args, variant: str, corpus: Path, work: Path) -> list[str]:
    """The command line of one variant (module docstring)."""
    side, kind, precision, seed = parse_variant(variant)
    train_prefix, valid_prefix = str(corpus / "train"), str(corpus / "valid")
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1",
              "--master-port", str(29500 + sum(map(ord, variant)) % 1000)]
    if side == "train":
        s = SHAPE
        return [*launch, "-m", "compact_dist.training.train",
                f"model.num_layers={s['num_layers']}", f"model.hidden_size={s['hidden_size']}",
                f"model.num_attention_heads={s['num_attention_heads']}",
                f"model.ffn_hidden_size={s['ffn_hidden_size']}",
                f"model.seq_length={s['seq_length']}", "model.position_embedding=rope",
                "model.init_std=0.02", "data.source=indexed", f"data.paths={train_prefix}",
                f"data.valid_paths={valid_prefix}", f"data.tokenizer={corpus}/tokenizer.json",
                f"data.cache_dir={work}/cache_{variant}", f"data.seed={seed}",
                *(f"optim.{k}={v}" for k, v in OPTIM.items()), "optim.warmup_steps=0",
                f"train.micro_batch_size={MICRO_BATCH}", f"train.train_steps={args.iterations}",
                f"train.seed={seed}", f"train.precision={precision}", "train.zero_stage=1",
                "train.log_interval=1", "train.eval_interval=1000000", "train.eval_batches=1",
                "logging.kept_energy=false", "logging.progress=false",
                *((f"compression.{k}={v}" for k, v in COMPRESSION.items()) if kind == "compact"
                  else ["compression.enabled=false"]),
                f"compression.resample_interval={args.resample_interval}",
                "activations.fused_swiglu=false"]
    script = str(Path(args.megatron_lm) / "pretrain_gpt.py")
    compact = kind == "compact"
    plain = str(Path(__file__).with_name("megatron_lm_plain.py"))  # the wheel's helpers
    target = ["-m", "compact_dist.megatron.megatron_lm", script] if compact else [plain, script]
    extra = (["--spec", "compact_dist.megatron.megatron_lm", "compact_gpt_layer_spec"]
             if compact else [])
    if precision == "bf16":
        extra.append("--bf16")
    return [*launch, *target, *MLM_ARGS, "--train-iters", str(args.iterations),
            "--seed", str(seed), "--train-data-path", train_prefix,
            "--valid-data-path", valid_prefix,
            "--data-cache-path", str(work / f"cache_{variant}"), *extra]


def losses_of(log: str, side: str = "mlm") -> dict[int, float]:
    """iteration -> loss, from Megatron-LM's ('lm loss: ...') or compact-train's
    ('| loss ... |') training log lines (--log-interval 1 / train.log_interval=1).

    Megatron-LM does not reset its loss sums after logging the first iteration
    (megatron/training/training.py, training_log: `should_reset = not is_first_iteration`),
    so the 'lm loss' it prints at iteration 2 is the mean of iterations 1 and 2; iteration 2's
    own loss is 2 x printed - iteration 1's, which this returns."""
    pattern = MLM_LOSS if side == "mlm" else TRAIN_LOSS
    curve = {int(m.group(1)): float(m.group(2)) for m in pattern.finditer(log)}
    if side == "mlm" and 1 in curve and 2 in curve:
        curve[2] = 2 * curve[2] - curve[1]
    return curve


def tail_mean(curve: dict[int, float], last: int = 20) -> Optional[float]:
    """Mean loss of the last `last` iterations (None for an empty curve)."""
    if not curve:
        return None
    keys = sorted(curve)[-last:]
    return mean(curve[k] for k in keys)


def compare(a: dict[int, float], b: dict[int, float]) -> dict:
    """Max |a - b| over the first 10 / 50 / all common iterations and the difference of the
    last-20 means."""
    common = sorted(set(a) & set(b))
    out = {"iterations": len(common)}
    for label, n in (("max_abs_diff_first10", 10), ("max_abs_diff_first50", 50),
                     ("max_abs_diff_all", len(common))):
        keys = common[:n]
        out[label] = max((abs(a[k] - b[k]) for k in keys), default=None)
    ta, tb = tail_mean(a), tail_mean(b)
    out["tail20_diff"] = None if ta is None or tb is None else ta - tb
    return out


def comparisons(runs: dict) -> list[dict]:
    """mlm vs train at the same precision and seed (the client against compact-train), the
    two seeds of one side (the noise), compact vs baseline on Megatron-LM."""
    curves = {v: r["losses"] for v, r in runs.items()}
    out = []

    def add(what: str, a: str, b: str) -> None:
        if a in curves and b in curves and curves[a] and curves[b]:
            out.append({"what": what, "a": a, "b": b, **compare(curves[a], curves[b])})

    for v in curves:
        side, kind, precision, seed = parse_variant(v)
        if side == "mlm":
            add("Megatron-LM vs compact-train" if kind == "baseline" else
                "Megatron-LM client vs compact-train", v, f"train_{kind}_{precision}_s{seed}")
        if side == "mlm" and kind == "compact":
            add("compact vs Megatron baseline (Megatron-LM)", v,
                f"mlm_baseline_{precision}_s{seed}")
    seeds = {}
    for v in curves:
        side, kind, precision, seed = parse_variant(v)
        seeds.setdefault((side, kind, precision), []).append(v)
    for (side, kind, precision), vs in seeds.items():
        for other in vs[1:]:
            add(f"seed noise ({side} {kind} {precision})", vs[0], other)
    return out


def report(args, runs: dict, compared: list[dict]) -> str:
    f = lambda x: "-" if x is None else f"{x:.4f}"  # noqa: E731
    lines = [f"# {args.name}: Megatron-LM pretrain_gpt.py and compact-train, tiny GPT, "
             f"{args.iterations} iterations, same indexed data", "",
             "| variant | exit | loss at 1 / 10 / 50 / last | mean of last 20 |",
             "|---|---|---|---|"]
    for variant, run in runs.items():
        c = run["losses"]
        at = " / ".join(f(c.get(i)) for i in (1, 10, 50, max(c or [0])))
        lines.append(f"| {variant} | {run['rc']} | {at} | {f(tail_mean(c))} |")
    lines += ["", "| comparison | a | b | max abs diff first 10 / 50 / all | "
              "last-20 mean a - b |", "|---|---|---|---|---|"]
    for c in compared:
        lines.append(f"| {c['what']} | {c['a']} | {c['b']} | {f(c['max_abs_diff_first10'])} / "
                     f"{f(c['max_abs_diff_first50'])} / {f(c['max_abs_diff_all'])} | "
                     f"{f(c['tail20_diff'])} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    work = out / f"{args.name}_work"
    work.mkdir(exist_ok=True)
    corpus = Path(args.corpus_dir) if args.corpus_dir else build_corpus(work / "corpus")
    for needed in ("tokenizer.json", "train.bin", "train.idx", "valid.bin", "valid.idx"):
        if not (corpus / needed).is_file():
            raise SystemExit(f"megatron_lm_client.py: {corpus / needed} is missing")
    config = work / "compact.yaml"  # the Megatron-LM side's compression settings
    config.write_text("compression:\n" + "".join(f"  {k}: {v}\n" for k, v in COMPRESSION.items())
                      + f"  resample_interval: {args.resample_interval}\n")
    env = {**os.environ, "COMPACT_DIST_CONFIG": str(config), "NCCL_NVLS_ENABLE": "0",
           "CUDA_DEVICE_MAX_CONNECTIONS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"),
                                                        str(Path(args.megatron_lm))]))}
    runs = {}
    for variant in args.variants.split(","):
        cmd = command(args, variant, corpus, work)
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                                  timeout=args.timeout_s)
            log, rc = proc.stdout + proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as err:
            log = ((err.stdout or b"").decode(errors="replace")
                   + (err.stderr or b"").decode(errors="replace"))
            rc = "timeout"
        curve = losses_of(log, parse_variant(variant)[0])
        head = [line for line in log.splitlines() if "iteration" in line][:12]
        runs[variant] = {"rc": rc, "losses": curve, "command": cmd, "log_head": head,
                         "log_tail": log[-4000:]}
        last = curve[max(curve)] if curve else None
        print(f"{variant}: rc {rc}, {len(curve)} iterations, last loss {last}", flush=True)
        compared = comparisons(runs)
        (out / f"{args.name}.json").write_text(json.dumps(
            {"runs": runs, "comparisons": compared}, indent=1))
    text = report(args, runs, compared)
    (out / f"{args.name}.md").write_text(text)
    print(text)
    if any(run["rc"] != 0 or len(run["losses"]) != args.iterations for run in runs.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
