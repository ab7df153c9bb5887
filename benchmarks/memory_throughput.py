"""Peak memory, step time, throughput, MFU and the largest micro-batch that fits, for a
LLaMA-style GPT trained the way `compact-train` trains it: Megatron-core model built by
compact_dist.megatron.model.build_gpt_model (SDPA attention for every variant), DeepSpeed engine with
ZeRO (default stage 1), bf16 on CUDA, torch AdamW over compact_dist.core.subspace's parameter
groups, and the subspace merge (SubspaceStepper.after_step) after every engine.step().
Baseline (Megatron's own linears, optionally with Megatron full/selective recompute) and
CompAct variants run on synthetic token batches, one after another in one process, or with
--isolate each in a fresh process (or launcher job, --launcher torchrun|deepspeed --nproc N),
so that nothing one variant leaves in the allocator or in DeepSpeed's / Megatron's globals
can reach the next; the parts are merged into one report. Use --isolate for numbers.

Single GPU:
    python benchmarks/memory_throughput.py --preset 350m --name h100_350m
Tensor parallel (sequence parallel on by default for TP > 1 and ZeRO < 3), TP x DP, ZeRO:
    torchrun --nproc_per_node 4 benchmarks/memory_throughput.py --preset 1.3b --tp 2 \
        --zero-stage 3 --variants baseline,compact_r1/4 --name tp2dp2_z3
TP-invariance (K training steps on fixed deterministic data; compare the losses of runs at
TP = 1, 2, 4 with plot_results.py):
    torchrun --nproc_per_node 2 benchmarks/memory_throughput.py --preset 350m --tp 2 \
        --tp-invariance-steps 20 --skip-throughput --variants baseline,compact_r1/4

Every variant records the W0 dtype it trained with (compact_dist.deepspeed.engine.initialize_engine
keeps base_dtype=fp32 W0 in fp32 through DeepSpeed's bf16 cast under ZeRO 0-2).

Writes <out-dir>/<name>.json (rewritten after every variant, so a killed run keeps what it
measured) and <out-dir>/<name>.md. Only global rank 0 writes. On a machine without CUDA
the same code runs in fp32 on the gloo backend with learned positions: step time by
time.perf_counter, no peak-memory or max-micro-batch numbers (those need the CUDA
allocator); the bytes saved for backward are measured on every device.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import importlib
import json
import math
import os
import platform
import socket
import statistics
import sys
import time
import traceback
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Optional

import torch

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # run from a checkout, uninstalled
    sys.path.append(str(Path(__file__).resolve().parents[1]))

from compact_dist.training.progress import PEAK_BF16_FLOPS as _PEAKS  # noqa: E402
from compact_dist.training.progress import model_flops  # noqa: E402,F401  (used below, and by tests)

GiB = 2**30
PEAK_BF16_FLOPS = _PEAKS["H100"]  # H100 / H200 SXM dense bf16
GEMM_CEILING_FLOPS = 786e12  # measured bf16 GEMM ceiling on the lent H100/H200

PRESETS: dict[str, dict[str, int]] = {
    # CPU smoke size (fp32 on CPU); vocabulary and sequence are small to keep it fast
    "tiny": dict(num_layers=2, hidden_size=128, num_attention_heads=4, ffn_hidden_size=352,
                 seq_length=128, vocab_size=2048, micro_batch_size=2),
    "350m": dict(num_layers=24, hidden_size=1024, num_attention_heads=16, ffn_hidden_size=2816,
                 seq_length=2048, vocab_size=32000, micro_batch_size=8),
    "1.3b": dict(num_layers=24, hidden_size=2048, num_attention_heads=16, ffn_hidden_size=5504,
                 seq_length=2048, vocab_size=32000, micro_batch_size=4),
    # configs/train/llama_7b.yaml's shape (LLaMA 7B); micro-batch 1 (DP=4 ZeRO-3 on 80 GB cards)
    "7b": dict(num_layers=32, hidden_size=4096, num_attention_heads=32, ffn_hidden_size=11008,
               seq_length=2048, vocab_size=32000, micro_batch_size=1),
}

# name -> overrides of compact_dist.training.train_config.TrainConfig (section.key: value).
# Ordered by priority ('all' runs them in this order and --time-limit-s drops the tail);
# the baseline comes first: ratios are taken against it.
_LEAN = {"activations.fused_cross_entropy": True,
         "activations.fp8_storage": ["swiglu", "attention", "norm"]}
VARIANTS: dict[str, dict[str, Any]] = {
    # Megatron-LM's default fusions without transformer-engine (fused SwiGLU and
    # bias-dropout-add: compact_dist.megatron.activations, on with CUDA); the old, unfused baseline is
    # kept as baseline_unfused so the change is visible
    "baseline": {"compression.enabled": False},
    "compact_r1/4": {"compression.ratio": 0.25},
    "compact_r1/4_lean": {"compression.ratio": 0.25, **_LEAN},
    "compact_r1/8_bf16W0_lean": {"compression.ratio": 0.125, "compression.base_dtype": "bf16",
                                 **_LEAN},
    "baseline_unfused": {"compression.enabled": False, "activations.fused_swiglu": False},
    "compact_r1/4_fusedce": {"compression.ratio": 0.25,
                             "activations.fused_cross_entropy": True},
    "compact_r1/4_bf16W0_lean": {"compression.ratio": 0.25, "compression.base_dtype": "bf16",
                                 **_LEAN},
    "compact_r1/4_fp8swiglu": {"compression.ratio": 0.25, "activations.fp8_storage": ["swiglu"]},
    "compact_r1/4_fp8attention": {"compression.ratio": 0.25,
                                  "activations.fp8_storage": ["attention"]},
    "compact_r1/4_fp8norm": {"compression.ratio": 0.25, "activations.fp8_storage": ["norm"]},
    "compact_r1/4_proj_projected": {"compression.ratio": 0.25, "compression.exact_input": []},
    "compact_r1/4_gaussian": {"compression.ratio": 0.25, "compression.projection": "gaussian"},
    "baseline_lean": {"compression.enabled": False, **_LEAN},
    "baseline_recompute_full": {"compression.enabled": False, "recompute.granularity": "full",
                                "recompute.num_layers": 1},
    "compact_r1/8": {"compression.ratio": 0.125},
    "compact_r1/2": {"compression.ratio": 0.5},
    "compact_r1/4_bf16W0": {"compression.ratio": 0.25, "compression.base_dtype": "bf16"},
    "compact_r1/4_bf16pair": {"compression.ratio": 0.25, "compression.base_dtype": "bf16_pair"},
    "unbiased_r1/4": {"compression.mode": "unbiased", "compression.ratio": 0.25},
    "baseline_recompute_selective": {"compression.enabled": False,
                                     "recompute.granularity": "selective"},
    "unbiased_r1/2": {"compression.mode": "unbiased", "compression.ratio": 0.5},
    "unbiased_r1/8": {"compression.mode": "unbiased", "compression.ratio": 0.125},
    "compact_r1/8_bf16W0": {"compression.ratio": 0.125, "compression.base_dtype": "bf16"},
    "compact_r1/8_bf16W0_lean_recompute_full": {
        "compression.ratio": 0.125, "compression.base_dtype": "bf16", **_LEAN,
        "recompute.granularity": "full", "recompute.num_layers": 1},
}

FLOPS_FORMULA = (
    "model FLOPs per token = 6 * N_matmul + 6 * L * h * s, where N_matmul = L * (h * (h + "
    "2 * kv) + h * h + 3 * h * ffn) + h * V_padded (QKV, attention output, SwiGLU fc1 (2 * ffn "
    "columns) and fc2, output layer; the embedding lookup is no matmul) and 6 * L * h * s is "
    "causal attention (QK^T and AV: 4 * s * h per token per layer forward, halved by the causal "
    "mask, x3 for forward + backward). Recompute and CompAct's projection FLOPs are not counted "
    "(model FLOPs). mfu = achieved per-GPU model FLOP/s / 989.4e12 (H100/H200 SXM dense bf16); "
    "frac_of_gemm_ceiling = the same over the measured 786e12 bf16 GEMM ceiling. "
    "mfu_full_attention counts attention as 12 * L * h * s (no causal halving, the "
    "Megatron/PaLM convention)."
)


# ----------------------------------------------------------------------------- pure helpers

def fit_peak(m1: int, p1: float, m2: int, p2: float) -> tuple[float, float]:
    """peak(mbs) = a + b * mbs through two measurements; returns (a, b)."""
    if m1 == m2:
        raise ValueError("two different micro-batch sizes are needed for the fit")
    b = (p1 - p2) / (m1 - m2)
    return p1 - b * m1, b


def predict_max_micro_batch(a: float, b: float, budget: float, cap: int) -> int:
    """Largest mbs with a + b * mbs <= budget, within [0, cap] (cap when b <= 0)."""
    if b <= 0:
        return cap
    return max(0, min(cap, int(math.floor((budget - a) / b))))


def verify_max_micro_batch(predicted: int, try_fn: Callable[[int], Optional[float]],
                           max_tries: int = 3, cap: int = 64) -> dict[str, Any]:
    """Run `try_fn(mbs)` (-> peak bytes, or None when it ran out of memory) from the predicted
    micro-batch down until one fits, at most `max_tries` runs. Steps down by max(1, 8%)."""
    mbs = min(predicted, cap)
    tries = []
    for _ in range(max_tries):
        if mbs < 1:
            break
        peak = try_fn(mbs)
        tries.append({"micro_batch": mbs, "fits": peak is not None,
                      "peak_GiB": None if peak is None else peak / GiB})
        if peak is not None:
            return {"verified": mbs, "tries": tries}
        mbs = min(mbs - 1, int(mbs * 0.92))
    return {"verified": None, "tries": tries}


def should_start(elapsed: float, limit: Optional[float], estimate: float) -> bool:
    """Start a phase that is estimated to take `estimate` s only if it ends before `limit`."""
    return limit is None or elapsed + estimate <= limit


def markdown_table(report: dict) -> str:
    cfg = report["config"]
    lines = [
        f"# {report['name']}: {report['device']} x{report['world_size']}",
        "",
        f"preset {cfg['preset']} (L={cfg['num_layers']}, h={cfg['hidden_size']}, "
        f"heads={cfg['num_attention_heads']}, ffn={cfg['ffn_hidden_size']}), seq "
        f"{cfg['seq_length']}, vocab {cfg['vocab_size']}, micro-batch {cfg['micro_batch_size']}"
        f", TP {cfg['tp']} (SP {cfg['sequence_parallel']}), DP {cfg['dp']}, ZeRO "
        f"{cfg['zero_stage']}, {cfg['precision']}; torch {report['versions']['torch']}, "
        f"megatron-core {report['versions']['megatron_core']}, deepspeed "
        f"{report['versions']['deepspeed']}; {report['date']}",
        "",
        "| variant | W0 | peak GiB/GPU | vs base | step ms | vs base | tokens/s | MFU | of GEMM "
        "ceiling | saved-for-bwd MiB/seq | max mbs pred / verified | TP all-gather bwd MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def f(value, fmt):
        return "-" if value is None else format(value, fmt)

    for name, r in report["variants"].items():
        if "error" in r and "step_ms" not in r:
            lines.append(f"| {name} | error: {r['error'][:60]} |" + " |" * 10)
            continue
        ratio = report["ratios_vs_baseline"].get(name, {})
        mm = r.get("max_micro_batch") or {}
        ag = (r.get("tp_allgather_bytes") or {}).get("backward", {}).get("tp")
        w0 = ", ".join(sorted(r.get("w0_dtypes_after_init") or {})) or "-"
        lines.append(
            f"| {name} | {w0} | {f(r.get('peak_alloc_GiB'), '.2f')} | "
            f"{f(ratio.get('peak_memory'), '.3f')} | {f(r.get('step_ms'), '.1f')} | "
            f"{f(ratio.get('step_time'), '.3f')} | {f(r.get('tokens_per_s'), ',.0f')} | "
            f"{f(r.get('mfu'), '.3f')} | {f(r.get('frac_of_gemm_ceiling'), '.3f')} | "
            f"{f(r.get('saved_for_backward_bytes_per_sequence', 0) / 2**20, '.1f')} | "
            f"{mm.get('predicted', '-')} / {mm.get('verified', '-')} | "
            f"{f(None if ag is None else ag / 2**20, '.1f')} |")
    inv = report.get("tp_invariance")
    if inv:
        lines += ["", f"TP-invariance losses ({inv['steps']} steps, global batch "
                      f"{inv['global_batch']}):", ""]
        for name, losses in inv["losses"].items():
            lines.append(f"- {name}: " + ", ".join(f"{x:.4f}" for x in losses))
    if report.get("skipped"):
        lines += ["", "not run (time limit): " + ", ".join(report["skipped"])]
    lines += ["", FLOPS_FORMULA, ""]
    return "\n".join(lines)


def synthetic_batch(mbs: int, seq: int, vocab: int, seed: int, device) -> dict:
    """Uniform random tokens (timing only)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (mbs, seq + 1), generator=g)
    return _to_batch(x, device)


def chain_batch(step: int, global_batch: int, seq: int, vocab: int, seed: int) -> torch.Tensor:
    """Deterministic learnable data for the TP-invariance check: a fixed random permutation
    `perm` of the vocabulary; token t+1 = perm[token t], replaced by a random token with
    probability 0.1. Depends on (step, seed) only, never on TP / DP sizes. [global_batch, s+1]."""
    perm = torch.randperm(vocab, generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    x = torch.empty(global_batch, seq + 1, dtype=torch.long)
    x[:, 0] = torch.randint(0, vocab, (global_batch,), generator=g)
    noise = torch.rand(global_batch, seq + 1, generator=g) < 0.1
    rnd = torch.randint(0, vocab, (global_batch, seq + 1), generator=g)
    for t in range(1, seq + 1):
        x[:, t] = torch.where(noise[:, t], rnd[:, t], perm[x[:, t - 1]])
    return x


def _to_batch(x: torch.Tensor, device) -> dict:
    b, s = x.shape[0], x.shape[1] - 1
    return {"tokens": x[:, :-1].contiguous().to(device),
            "labels": x[:, 1:].contiguous().to(device),
            "position_ids": torch.arange(s).unsqueeze(0).expand(b, s).contiguous().to(device)}


# ----------------------------------------------------------------------------- all-gather bytes

class AllGatherCounter:
    """Counts the bytes of every all-gather output while `phase` is set, per process group
    ('tp', 'dp', 'world' or 'other'), by wrapping torch.distributed.all_gather_into_tensor /
    _all_gather_base / all_gather_single (the names looked up at call time, e.g. by
    compact_dist.core.collectives) and the copies megatron-core bound at import
    (dist_all_gather_func). torch's own functions call each other through the c10d module,
    not these names, so nothing is counted twice."""

    TARGETS = (("torch.distributed", "all_gather_into_tensor"),
               ("torch.distributed", "_all_gather_base"),
               ("torch.distributed", "all_gather_single"),  # newer torch; same signature
               ("megatron.core.tensor_parallel.mappings", "dist_all_gather_func"),
               ("megatron.core.tensor_parallel.layers", "dist_all_gather_func"),
               ("megatron.core.utils", "dist_all_gather_func"))

    def __init__(self, groups: dict[str, Any]):
        import torch.distributed as dist

        self._ranks = {name: tuple(dist.get_process_group_ranks(g)) for name, g in groups.items()
                       if g is not None}
        self.phase: Optional[str] = None
        self.bytes: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.calls: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self._saved: list = []

    def _group_name(self, group) -> str:
        import torch.distributed as dist

        ranks = tuple(dist.get_process_group_ranks(group)) if group is not None else None
        if ranks is None:
            return "world"
        for name, r in self._ranks.items():
            if r == ranks:
                return name
        return "other"

    def _wrap(self, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if self.phase is not None:
                out = args[0] if args else kwargs.get("output_tensor", kwargs.get("output"))
                group = kwargs.get("group", args[2] if len(args) > 2 else None)
                name = self._group_name(group)
                self.bytes[self.phase][name] += out.numel() * out.element_size()
                self.calls[self.phase][name] += 1
            return fn(*args, **kwargs)

        wrapper._compact_counter = True
        return wrapper

    def __enter__(self) -> "AllGatherCounter":
        for module_name, attr in self.TARGETS:
            try:
                module = importlib.import_module(module_name)
            except ImportError:
                continue
            fn = getattr(module, attr, None)
            if fn is None or getattr(fn, "_compact_counter", False):
                continue
            self._saved.append((module, attr, fn))
            setattr(module, attr, self._wrap(fn))
        return self

    def __exit__(self, *exc) -> None:
        for module, attr, fn in reversed(self._saved):
            setattr(module, attr, fn)
        self._saved.clear()
        self.phase = None

    def result(self) -> dict[str, dict[str, int]]:
        return {phase: dict(v) for phase, v in self.bytes.items()}


# ----------------------------------------------------------------------------- W0 dtype

def base_weight_dtypes(model: torch.nn.Module) -> dict[str, int]:
    """{dtype name: count} of the frozen bases W0 of the subspace-mode compact layers."""
    from compact_dist.core.subspace import compact_layers

    out: dict[str, int] = defaultdict(int)
    for layer in compact_layers(model):
        if layer.subspace_factor is not None:
            out[str(layer.weight.dtype).replace("torch.", "")] += 1
    return dict(out)


# ----------------------------------------------------------------------------- the benchmark

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _versions() -> dict[str, str]:
    out = {"torch": torch.__version__, "python": platform.python_version(),
           "cuda": torch.version.cuda}
    for key, mod, attr in (("megatron_core", "megatron.core.package_info", "__version__"),
                           ("deepspeed", "deepspeed", "__version__")):
        try:
            out[key] = getattr(importlib.import_module(mod), attr)
        except Exception:  # noqa: BLE001 - informational only
            out[key] = None
    return out


class Bench:
    """One process of the benchmark (one rank under torchrun)."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.t0 = time.perf_counter()
        self.shape = self.shape_of(args.preset, args.seq, args.vocab, args.micro_batch)
        self.inv_shape = self.shape_of(args.tp_invariance_preset or args.preset,
                                       args.tp_invariance_seq or args.seq, args.vocab, None)
        self.cuda = torch.cuda.is_available()
        if args.sequence_parallel == "auto":
            self.sp = args.tp > 1 and self.cuda
        else:
            self.sp = args.sequence_parallel == "on"

    # -- config ---------------------------------------------------------------------------
    @staticmethod
    def shape_of(preset: str, seq: Optional[int], vocab: Optional[int],
                 micro_batch: Optional[int]) -> dict[str, int]:
        p = dict(PRESETS[preset])
        for key, value in (("seq_length", seq), ("vocab_size", vocab),
                           ("micro_batch_size", micro_batch)):
            if value is not None:
                p[key] = value
        return p

    def padded_vocab(self, shape: dict[str, int]) -> int:
        from compact_dist.training.model_setup import padded_vocab_size

        return padded_vocab_size(shape["vocab_size"], self.args.tp)

    def overrides(self, variant: dict[str, Any], micro_batch: Optional[int] = None,
                  shape: Optional[dict[str, int]] = None) -> list[str]:
        p, a = shape or self.shape, self.args
        base = {
            "model.num_layers": p["num_layers"], "model.hidden_size": p["hidden_size"],
            "model.num_attention_heads": p["num_attention_heads"],
            "model.ffn_hidden_size": p["ffn_hidden_size"], "model.seq_length": p["seq_length"],
            "parallel.tensor_model_parallel_size": a.tp,
            "parallel.sequence_parallel": self.sp,
            "train.micro_batch_size": micro_batch or p["micro_batch_size"],
            "train.zero_stage": a.zero_stage, "train.seed": a.seed,
            "train.precision": a.precision, "optim.lr": a.lr, "optim.min_lr": 0.0,
            "optim.weight_decay": a.weight_decay,
            "optim.grad_clip": a.grad_clip, "logging.progress": False,
        }
        base.update(variant)
        return [f"{k}={json.dumps(v) if isinstance(v, bool) else v}" for k, v in base.items()]

    def config(self, variant: dict[str, Any], micro_batch: Optional[int] = None,
               shape: Optional[dict[str, int]] = None):
        from compact_dist.training.train_config import load_train_config

        return load_train_config(None, self.overrides(variant, micro_batch, shape))

    # -- process setup ----------------------------------------------------------------------
    def init(self) -> None:
        from megatron.core import parallel_state as ps

        from compact_dist.training.distributed import init_distributed
        from compact_dist.training.train_config import world_from_environment

        rank, _, world = world_from_environment()
        if "WORLD_SIZE" not in os.environ and "SLURM_NTASKS" not in os.environ:
            # a lone process: a free port, so single-GPU runs can share the host
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        cfg = self.config(VARIANTS["baseline"])
        cfg.check_environment(world, self.cuda)  # ValueError before any process group
        self.device = init_distributed(cfg)
        self.bf16 = cfg.train.precision == "bf16" or (
            cfg.train.precision == "auto" and self.device.type == "cuda")
        self.rank, self.world = rank, world
        self.dp = ps.get_data_parallel_world_size()
        self.dp_rank = ps.get_data_parallel_rank()
        self.tp = ps.get_tensor_model_parallel_world_size()
        self.vocab_padded = self.padded_vocab(self.shape)
        import logging

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)

    def log(self, *text) -> None:
        if self.rank == 0:
            print(f"[{time.perf_counter() - self.t0:7.1f}s]", *text, flush=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def agree(self, flag: bool) -> bool:
        """True on every rank iff rank 0 says so (collective)."""
        if self.world == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        torch.distributed.broadcast(t, src=0)
        return bool(t.item())

    def reduce_max(self, value: Optional[float]) -> Optional[float]:
        if value is None or self.world == 1:
            return value
        t = torch.tensor([float(value)], device=self.device, dtype=torch.float64)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return t.item()

    # -- engine ---------------------------------------------------------------------------
    def build(self, cfg, cpu_init: bool = False, saved_bytes: bool = False,
              vocab: Optional[int] = None) -> dict:
        """Model + DeepSpeed engine built by training.model_setup.build_model and engine_setup.build_engine,
        as compact-train builds them (constant learning rate optim.lr)."""
        from compact_dist.training.saved_tensors import saved_activation_bytes
        from compact_dist.training.engine_setup import build_engine
        from compact_dist.training.model_setup import build_model

        vocab = vocab or self.shape["vocab_size"]
        model = build_model(cfg, self.device, self.bf16, vocab, cpu_init=cpu_init)
        info = {
            "params_local": sum(p.numel() for p in model.parameters()),
            "trainable_params_local": sum(p.numel() for p in model.parameters()
                                          if p.requires_grad),
        }
        info["frozen_params_local"] = info["params_local"] - info["trainable_params_local"]
        if saved_bytes:
            # bytes autograd keeps for backward in one forward of ONE sequence (per TP rank)
            b = synthetic_batch(1, cfg.model.seq_length, vocab,
                                self.args.seed + 7, self.device)
            info["saved_for_backward_bytes_per_sequence"] = saved_activation_bytes(
                lambda: model(b["tokens"], b["position_ids"], None, labels=b["labels"]), model)
            del b
        engine, stepper = build_engine(cfg, model, self.bf16, self.dp, schedule=False)
        del model
        info["w0_dtypes_after_init"] = base_weight_dtypes(engine.module)
        info["engine"] = engine
        info["stepper"] = stepper
        info["weight_decay"] = cfg.optim.weight_decay
        return info

    def release(self, state: Optional[dict]) -> None:
        if state is not None:
            engine = state.pop("engine", None)
            state.pop("stepper", None)
            if engine is not None and hasattr(engine, "destroy"):
                try:
                    engine.destroy()
                except Exception as err:  # noqa: BLE001 - cleanup must go on
                    self.log(f"engine.destroy() failed: {err!r}")
            del engine
        gc.collect()
        if self.cuda:
            from megatron.core import parallel_state as ps

            # Megatron's global buffer (sequence-parallel all-gathers) outlives models
            if getattr(ps, "_GLOBAL_MEMORY_BUFFER", None) is not None:
                ps.destroy_global_memory_buffer()
                ps._set_global_memory_buffer()
            torch.cuda.synchronize()
            torch.cuda.empty_cache()

    def train_step(self, state: dict, batch: dict, counter: Optional[AllGatherCounter] = None):
        engine = state["engine"]
        if counter is not None:
            counter.phase = "forward"
        loss = engine(batch["tokens"], batch["position_ids"], None,
                      labels=batch["labels"]).float().mean()
        if counter is not None:
            counter.phase = "backward"
        engine.backward(loss)
        if counter is not None:
            counter.phase = None
        lr = engine.get_lr()[0]
        engine.step()
        state["stepper"].after_step(lr, state["weight_decay"], engine.optimizer)
        return loss.detach()

    def timed_steps(self, state: dict, batch: dict, n: int) -> list[float]:
        """Per-step milliseconds of n train steps (CUDA events on GPU, perf_counter on CPU)."""
        if n <= 0:
            return []
        if self.cuda:
            events = [torch.cuda.Event(enable_timing=True) for _ in range(n + 1)]
            events[0].record()
            for i in range(n):
                self.train_step(state, batch)
                events[i + 1].record()
            torch.cuda.synchronize()
            return [events[i].elapsed_time(events[i + 1]) for i in range(n)]
        times = []
        for _ in range(n):
            t = time.perf_counter()
            self.train_step(state, batch)
            times.append((time.perf_counter() - t) * 1e3)
        return times

    def batch(self, mbs: int) -> dict:
        return synthetic_batch(mbs, self.shape["seq_length"], self.shape["vocab_size"],
                               self.args.seed * 1000 + self.dp_rank, self.device)

    def peak_at(self, state: dict, mbs: int, steps: int = 2) -> float:
        """Steady-state peak allocated bytes (max over ranks) of `steps` steps at `mbs`."""
        batch = self.batch(mbs)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(steps):
            self.train_step(state, batch)
        torch.cuda.synchronize()
        del batch
        return self.reduce_max(torch.cuda.max_memory_allocated())

    # -- one variant ----------------------------------------------------------------------
    def run_variant(self, name: str, res: dict) -> dict:
        """Measure one variant, filling `res` as it goes (kept if something fails)."""
        a, p = self.args, self.shape
        cfg = self.config(VARIANTS[name])
        mbs = cfg.train.micro_batch_size
        res["overrides"] = VARIANTS[name]
        start = time.perf_counter()
        if self.cuda:
            res["residual_before_GiB"] = self.reduce_max(torch.cuda.memory_allocated()) / GiB
        res["planner"] = self.prediction(cfg)
        state = self.build(cfg, saved_bytes=True)
        for key in ("params_local", "trainable_params_local", "frozen_params_local",
                    "saved_for_backward_bytes_per_sequence", "w0_dtypes_after_init"):
            res[key] = state[key]
        try:
            batch = self.batch(mbs)
            if self.cuda:
                res["allocated_after_init_GiB"] = self.reduce_max(
                    torch.cuda.memory_allocated()) / GiB
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            warm = self.timed_steps(state, batch, a.warmup)
            peak_warm = torch.cuda.max_memory_allocated() if self.cuda else None
            if self.cuda:
                torch.cuda.reset_peak_memory_stats()
            times = self.timed_steps(state, batch, a.steps)
            if self.cuda:
                peak_steady = torch.cuda.max_memory_allocated()
                res["peak_alloc_abs_GiB"] = self.reduce_max(max(peak_warm, peak_steady)) / GiB
                res["peak_alloc_GiB"] = res["peak_alloc_abs_GiB"] - res["residual_before_GiB"]
                res["peak_steady_GiB"] = self.reduce_max(peak_steady) / GiB
                res["peak_reserved_GiB"] = self.reduce_max(
                    torch.cuda.max_memory_reserved()) / GiB
                res["allocated_between_steps_GiB"] = self.reduce_max(
                    torch.cuda.memory_allocated()) / GiB
            else:
                import psutil

                res["peak_alloc_GiB"] = None
                res["rss_GiB"] = psutil.Process().memory_info().rss / GiB
            step_ms = self.reduce_max(statistics.median(times)) if times else None
            res["warmup_ms"] = warm
            res["step_ms_all"] = times
            res["step_ms"] = step_ms
            if step_ms:
                tokens = mbs * self.dp * p["seq_length"]
                res["tokens_per_s"] = tokens / (step_ms / 1e3)
                per_gpu = self.flops["per_token"] * tokens / (step_ms / 1e3) / self.world
                res["model_tflops_per_gpu"] = per_gpu / 1e12
                res["mfu"] = per_gpu / PEAK_BF16_FLOPS
                res["frac_of_gemm_ceiling"] = per_gpu / GEMM_CEILING_FLOPS
                res["mfu_full_attention"] = (self.flops["per_token_full_attention"] * tokens
                                             / (step_ms / 1e3) / self.world / PEAK_BF16_FLOPS)
            if self.tp > 1:
                with AllGatherCounter(self._groups()) as counter:
                    self.train_step(state, batch, counter)
                    if self.cuda:
                        torch.cuda.synchronize()
                res["tp_allgather_bytes"] = counter.result()
                res["tp_allgather_calls"] = {k: dict(v) for k, v in counter.calls.items()}
            del batch
            main_s = time.perf_counter() - start
            res["main_phase_s"] = main_s
            if self.cuda and not a.no_max_mbs:
                if self.agree(should_start(self.elapsed(), a.time_limit_s, 1.5 * main_s)):
                    state = self.max_micro_batch(name, state, res, mbs)
                else:
                    res["max_micro_batch"] = {"skipped": "time limit"}
        finally:
            self.release(state)
        res["wall_s"] = time.perf_counter() - start
        return res

    def prediction(self, cfg) -> Optional[dict]:
        """compact-plan's prediction for this variant (compact_dist.tools.memory_plan), recorded
        next to the measurement; {"error": ...} when the planner cannot model the setup."""
        from compact_dist.tools.memory_plan import prediction_line, setup_from

        try:
            return prediction_line(setup_from(
                cfg, self.world, "cuda" if self.cuda else "cpu",
                "flash" if self.cuda else "math", vocab=self.shape["vocab_size"]))
        except Exception as err:  # noqa: BLE001 - the measurement matters more
            return {"error": f"{type(err).__name__}: {err}"}

    def _groups(self) -> dict[str, Any]:
        from megatron.core import parallel_state as ps

        return {"tp": ps.get_tensor_model_parallel_group(),
                "dp": ps.get_data_parallel_group()}

    def max_micro_batch(self, name: str, state: dict, res: dict, mbs: int) -> dict:
        a = self.args
        budget = a.budget_gib * GiB if a.budget_gib else (
            torch.cuda.get_device_properties(self.device).total_memory - 4 * GiB)
        budget = self.reduce_max(-budget) * -1  # the smallest card's budget
        m2 = mbs // 2 if mbs >= 2 else 2
        p1 = self.reduce_max(torch.cuda.max_memory_allocated())  # steady peak at mbs
        p2 = self.peak_at(state, m2)
        intercept, slope = fit_peak(mbs, p1, m2, p2)
        predicted = predict_max_micro_batch(intercept, slope, budget, a.max_mbs_cap)
        out: dict[str, Any] = {
            "budget_GiB": budget / GiB, "fit_points": [[mbs, p1 / GiB], [m2, p2 / GiB]],
            "intercept_GiB": intercept / GiB, "slope_GiB_per_sample": slope / GiB,
            "predicted": predicted, "cap": a.max_mbs_cap}
        res["max_micro_batch"] = out  # filled in further below; kept if verification fails
        verify = self.world == 1 or a.verify_distributed
        if not verify:
            out["verified"] = None
            out["note"] = ("not verified: an out-of-memory on one rank would hang the others "
                           "(pass --verify-distributed to try)")
        elif predicted >= 1:
            holder = {"state": state}

            def try_fn(m: int) -> Optional[float]:
                if holder["state"] is None:
                    holder["state"] = self.build(self.config(VARIANTS[name], m))
                oom = False
                try:
                    peak = self.peak_at(holder["state"], m)
                except RuntimeError as err:  # OutOfMemoryError, or cuBLAS/NCCL "out of memory"
                    if not (isinstance(err, torch.cuda.OutOfMemoryError)
                            or "out of memory" in str(err).lower()):
                        raise
                    oom = True
                if oom:  # the engine may be mid-step: rebuild it for the next try
                    self.release(holder["state"])
                    holder["state"] = None
                    return None
                return peak

            out.update(verify_max_micro_batch(predicted, try_fn, a.max_mbs_tries,
                                              a.max_mbs_cap))
            state = holder["state"]
        else:
            out["verified"] = None
        return state

    # -- TP invariance ------------------------------------------------------------------------
    def tp_invariance(self, name: str) -> dict:
        """K steps on chain_batch data with a CPU-initialised (TP-invariant) model."""
        a, p = self.args, self.inv_shape
        gb = a.tp_invariance_global_batch
        if gb % self.dp:
            raise ValueError(f"--tp-invariance-global-batch {gb} is not divisible by DP {self.dp}")
        mbs = gb // self.dp
        cfg = self.config({**VARIANTS[name], "optim.lr": a.tp_invariance_lr}, mbs, p)
        state = self.build(cfg, cpu_init=True, vocab=p["vocab_size"])
        losses, norms = [], []
        try:
            for step in range(a.tp_invariance_steps):
                x = chain_batch(step, gb, p["seq_length"], p["vocab_size"], a.seed)
                batch = _to_batch(x[self.dp_rank * mbs:(self.dp_rank + 1) * mbs], self.device)
                loss = self.train_step(state, batch).clone()
                if self.dp > 1:
                    from megatron.core import parallel_state as ps

                    torch.distributed.all_reduce(loss, group=ps.get_data_parallel_group())
                    loss /= self.dp
                losses.append(loss.item())
                norm = state["engine"].get_global_grad_norm()
                norms.append(None if norm is None else float(norm))
        finally:
            self.release(state)
        return {"losses": losses, "grad_norms": norms}

    # -- the whole run ------------------------------------------------------------------------
    def run(self) -> dict:
        a, p = self.args, self.shape
        names = list(VARIANTS) if a.variants == "all" else a.variants.split(",")
        unknown = [n for n in names + (a.tp_invariance_variants or "").split(",")
                   if n and n not in VARIANTS]
        if unknown:
            raise SystemExit(f"unknown variants {unknown}; known: {list(VARIANTS)}")
        self.init()
        self.flops = model_flops(p["num_layers"], p["hidden_size"], p["ffn_hidden_size"],
                                 p["seq_length"], self.vocab_padded)
        report: dict[str, Any] = {
            "benchmark": "memory_throughput", "name": a.name,
            "device": torch.cuda.get_device_name(self.device) if self.cuda else "cpu",
            "world_size": self.world, "versions": _versions(),
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join(sys.argv),
            "config": {
                "preset": a.preset, **p, "vocab_padded": self.vocab_padded, "tp": self.tp,
                "dp": self.dp, "sequence_parallel": self.sp, "zero_stage": a.zero_stage,
                "precision": "bf16" if self.bf16 else "fp32", "warmup": a.warmup,
                "steps": a.steps, "lr": a.lr, "optimizer": "torch AdamW (fused on CUDA)",
                "attention": "SDPACoreAttention", "data": "uniform random tokens",
                "tokens_per_step_global": p["micro_batch_size"] * self.dp * p["seq_length"],
            },
            "flops": {"formula": FLOPS_FORMULA, **self.flops, "peak_flops": PEAK_BF16_FLOPS,
                      "gemm_ceiling_flops": GEMM_CEILING_FLOPS},
            "variants": {}, "ratios_vs_baseline": {}, "skipped": [], "complete": False,
        }
        if a.tp_invariance_steps:
            inv_names = (names if a.tp_invariance_variants is None
                         else a.tp_invariance_variants.split(","))
            report["tp_invariance"] = {
                "preset": a.tp_invariance_preset or a.preset, "shape": self.inv_shape,
                "steps": a.tp_invariance_steps, "global_batch": a.tp_invariance_global_batch,
                "lr": a.tp_invariance_lr, "data": chain_batch.__doc__.split("\n")[0],
                "init": "use_cpu_initialization=True (Megatron slices a full CPU-initialised "
                        "matrix: the same weights at any TP)", "losses": {}, "grad_norms": {}}
            for name in inv_names:
                if not self.agree(should_start(self.elapsed(), a.time_limit_s, 0.0)):
                    report["skipped"].append(f"tp_invariance:{name}")
                    continue
                self.log(f"TP-invariance {name}: {a.tp_invariance_steps} steps")
                failed = False
                try:
                    r = self.tp_invariance(name)
                except Exception as err:  # noqa: BLE001 - record and go on
                    failed = True
                    report["tp_invariance"].setdefault("errors", {})[name] = (
                        f"{type(err).__name__}: {err}\n{traceback.format_exc()}")
                    self.log(traceback.format_exc())
                if failed:
                    self.release(None)
                else:
                    report["tp_invariance"]["losses"][name] = r["losses"]
                    report["tp_invariance"]["grad_norms"][name] = r["grad_norms"]
                    self.log(f"  losses {['%.4f' % x for x in r['losses']]}")
                self.write(report)
        longest = 0.0
        for name in ([] if a.skip_throughput else names):
            if not self.agree(should_start(self.elapsed(), a.time_limit_s, 1.1 * longest)):
                report["skipped"].append(name)
                continue
            self.log(f"variant {name}")
            res: dict[str, Any] = {}
            failed = False
            try:
                self.run_variant(name, res)
            except Exception as err:  # noqa: BLE001 - record and go on with the next variant
                failed = True
                res["error"] = f"{type(err).__name__}: {err}"
                res["traceback"] = traceback.format_exc()
                self.log(res["traceback"])
            if failed:  # outside the except block: the traceback's tensors are gone now
                self.release(None)
            report["variants"][name] = res
            longest = max(longest, res.get("wall_s", 0.0))
            self.log("  " + ", ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in res.items()
                if k in ("peak_alloc_GiB", "step_ms", "tokens_per_s", "mfu",
                         "saved_for_backward_bytes_per_sequence", "wall_s", "error")))
            if "max_micro_batch" in res:
                self.log(f"  max micro-batch {res['max_micro_batch']}")
            self.ratios(report)
            self.write(report)
        report["complete"] = not report["skipped"]
        report["elapsed_s"] = self.elapsed()
        self.write(report)
        return report

    @staticmethod
    def ratios(report: dict) -> None:
        base = report["variants"].get("baseline")
        if not base or "step_ms" not in base:
            return
        for name, r in report["variants"].items():
            ratio = {}
            for key, field in (("peak_memory", "peak_alloc_GiB"), ("step_time", "step_ms"),
                               ("tokens_per_s", "tokens_per_s"),
                               ("saved_for_backward", "saved_for_backward_bytes_per_sequence")):
                if r.get(field) and base.get(field):
                    ratio[key] = r[field] / base[field]
            for key in ("verified", "predicted"):
                mine = (r.get("max_micro_batch") or {}).get(key)
                theirs = (base.get("max_micro_batch") or {}).get(key)
                if mine and theirs:
                    ratio[f"max_micro_batch_{key}"] = mine / theirs
            ag = ((r.get("tp_allgather_bytes") or {}).get("backward") or {}).get("tp")
            ag0 = ((base.get("tp_allgather_bytes") or {}).get("backward") or {}).get("tp")
            if ag is not None and ag0:
                ratio["tp_allgather_backward_bytes"] = ag / ag0
            report["ratios_vs_baseline"][name] = ratio

    def write(self, report: dict) -> None:
        if self.rank == 0:
            write_report(Path(self.args.out_dir), self.args.name, report)


def write_report(out: Path, name: str, report: dict,
                 render: Callable[[dict], str] = markdown_table) -> None:
    """<out>/<name>.json (atomically) and <out>/<name>.md (`render(report)`)."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{name}.json.tmp"
    tmp.write_text(json.dumps(report, indent=1, default=str))
    os.replace(tmp, out / f"{name}.json")
    (out / f"{name}.md").write_text(render(report))


_CHILD_ENV = "COMPACT_BENCH_PART"


def run_isolated(args: argparse.Namespace, argv: list[str]) -> dict:
    """Each variant (and the TP-invariance steps, first) in its own process or launcher job,
    then one merged report <out-dir>/<name>.json. A part that fails or overruns is recorded
    (rc, log tail) and the next one starts; --time-limit-s bounds the whole run."""
    import subprocess
    import tempfile

    t0 = time.perf_counter()
    names = list(VARIANTS) if args.variants == "all" else args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    script = str(Path(__file__).resolve())
    if args.launcher == "torchrun":
        prefix = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                  str(args.nproc)]
        port_flag = "--master_port"
    elif args.launcher == "deepspeed":
        prefix = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus",
                  str(args.nproc)]
        port_flag = "--master_port"
    else:
        prefix, port_flag = [sys.executable], None
    parts = ([("tp_invariance", ["--skip-throughput"])] if args.tp_invariance_steps else [])
    if not args.skip_throughput:
        parts += [(n, ["--variants", n, "--tp-invariance-steps", "0"]) for n in names]
    tmp = Path(tempfile.mkdtemp(prefix=f"{args.name}.", dir=args.out_dir))
    merged: Optional[dict] = None
    records, longest = [], 0.0
    for i, (label, extra) in enumerate(parts):
        left = None if args.time_limit_s is None else args.time_limit_s - (
            time.perf_counter() - t0)
        if left is not None and left < max(20.0, 1.1 * longest):
            records.append({"part": label, "skipped": "time limit"})
            continue
        part_name = f"part{i:02d}"
        cmd = list(prefix)
        if port_flag:
            cmd += [port_flag, str(_free_port())]
        cmd += [script, *argv, *extra, "--name", part_name, "--out-dir", str(tmp)]
        if left is not None:
            cmd += ["--time-limit-s", str(max(10.0, left - 15.0))]
        start = time.perf_counter()
        log = tmp / f"{part_name}.log"
        try:
            with open(log, "w") as f:
                rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT,
                                    env={**os.environ, _CHILD_ENV: label},
                                    timeout=None if left is None else left).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        wall = time.perf_counter() - start
        longest = max(longest, wall)
        record = {"part": label, "rc": rc, "wall_s": wall}
        path = tmp / f"{part_name}.json"
        if path.is_file():
            part = json.loads(path.read_text())
            if merged is None:
                merged = {**part, "variants": {}, "ratios_vs_baseline": {}, "skipped": []}
                merged.pop("tp_invariance", None)
            merged["variants"].update(part.get("variants", {}))
            merged["skipped"] += part.get("skipped", [])
            if "tp_invariance" in part:
                merged["tp_invariance"] = part["tp_invariance"]
        if rc != 0:
            record["log_tail"] = log.read_text()[-3000:]
        records.append(record)
        print(f"[{time.perf_counter() - t0:7.1f}s] part {label}: rc={rc} in {wall:.1f} s",
              flush=True)
        if merged is not None:
            merged.update(name=args.name, parts=records, isolated=True,
                          command=" ".join([sys.executable, script, *sys.argv[1:]]),
                          elapsed_s=time.perf_counter() - t0,
                          complete=all(r.get("rc") == 0 for r in records))
            Bench.ratios(merged)
            write_report(Path(args.out_dir), args.name, merged)
    if merged is None:
        raise SystemExit(f"no part produced a report; logs in {tmp}")
    return merged


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=list(PRESETS), default="350m")
    parser.add_argument("--variants", default="all",
                        help=f"comma-separated subset of: {', '.join(VARIANTS)} (or 'all')")
    parser.add_argument("--seq", type=int, help="sequence length (default: preset's, 2048)")
    parser.add_argument("--vocab", type=int, help="vocabulary (default: preset's, 32000)")
    parser.add_argument("--micro-batch", type=int, help="micro-batch per GPU (default: preset's)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size (DP = world/TP)")
    parser.add_argument("--sequence-parallel", choices=["auto", "on", "off"], default="auto",
                        help="auto: on when TP > 1 and CUDA")
    parser.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], default=1)
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6, help="timed steps (median reported)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--grad-clip", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--budget-gib", type=float, default=None,
                        help="memory budget for the max micro-batch (default: card - 4 GiB)")
    parser.add_argument("--no-max-mbs", action="store_true", help="skip the max micro-batch")
    parser.add_argument("--max-mbs-cap", type=int, default=64)
    parser.add_argument("--max-mbs-tries", type=int, default=3)
    parser.add_argument("--verify-distributed", action="store_true",
                        help="also verify the max micro-batch when world > 1 (OOM may hang)")
    parser.add_argument("--time-limit-s", type=float, default=None,
                        help="start no variant (or max-mbs search) expected to end after this")
    parser.add_argument("--tp-invariance-steps", type=int, default=0)
    parser.add_argument("--tp-invariance-global-batch", type=int, default=8)
    parser.add_argument("--tp-invariance-lr", type=float, default=1e-3)
    parser.add_argument("--tp-invariance-preset", choices=list(PRESETS), default=None,
                        help="model of the TP-invariance steps (default: --preset)")
    parser.add_argument("--tp-invariance-seq", type=int, default=None,
                        help="sequence length of the TP-invariance steps (default: --seq)")
    parser.add_argument("--tp-invariance-variants", default=None,
                        help="variants of the TP-invariance steps (default: --variants)")
    parser.add_argument("--skip-throughput", action="store_true",
                        help="only the TP-invariance steps")
    parser.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--name", default=None, help="output file stem (default: derived)")
    parser.add_argument("--isolate", action="store_true",
                        help="every variant in a fresh process / launcher job (see above)")
    parser.add_argument("--launcher", choices=["none", "torchrun", "deepspeed"], default="none",
                        help="with --isolate: how each part is started")
    parser.add_argument("--nproc", type=int, default=1,
                        help="with --isolate and a launcher: processes (GPUs) per part")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help=argparse.SUPPRESS)  # the deepspeed launcher passes it
    args = parser.parse_args(argv)
    if args.name is None:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        args.name = (f"mt_{args.preset}_tp{args.tp}_dp{world // max(1, args.tp)}"
                     f"_z{args.zero_stage}")
    return args


def _drop_options(argv: list[str], options: dict[str, int]) -> list[str]:
    """argv without the given options (option -> number of values; '--opt=value' too)."""
    out, skip = [], 0
    for item in argv:
        if skip:
            skip -= 1
            continue
        key = item.split("=", 1)[0]
        if key in options:
            skip = 0 if "=" in item else options[key]
            continue
        out.append(item)
    return out


def main(argv: Optional[list[str]] = None) -> None:
    import warnings

    # megatron-core 0.16.1 warns about its own default cuda_graph_scope on every config
    warnings.filterwarnings("ignore", message="full scope is deprecated")
    args = parse_args(argv)
    if args.isolate and _CHILD_ENV not in os.environ:
        raw = list(sys.argv[1:] if argv is None else argv)
        raw = _drop_options(raw, {"--isolate": 0, "--launcher": 1, "--nproc": 1, "--name": 1,
                                  "--out-dir": 1, "--time-limit-s": 1})
        run_isolated(args, raw)
        return
    bench = Bench(args)
    try:
        bench.run()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
