"""Training-speed and memory accounting for the progress line: throughput over the last log
interval (not the average since start, which reads as a speed-up while start-up costs fade),
step time, TFLOP/s and model FLOPs utilisation per GPU, ETA, the peak memory as the maximum
over ranks, and the totals of a run; `progress_line` words them as the log step's line and
`throughput_meter` builds the meter of a TrainConfig.

MFU = model FLOPs per token x tokens/s / (GPUs x peak dense bf16 FLOP/s of one GPU), with
model FLOPs per token = 6 N_matmul + 6 L h s (causal attention; N_matmul counts the
transformer's and the output layer's matmul weights, not the embedding lookup).
"""

from __future__ import annotations

import time
from typing import Callable, Optional

import torch

from compact_dist.training.model_setup import padded_vocab_size
from compact_dist.training.train_config import TrainConfig

# dense (no sparsity) bf16 tensor-core FLOP/s of one GPU, by a substring of
# torch.cuda.get_device_name(); the longest matching key wins ("H100 PCIe" before "H100").
# Vendor data sheets; `logging.peak_tflops` overrides the table (other GPUs, clocks).
PEAK_BF16_FLOPS = {
    "A100": 312e12, "A800": 312e12, "RTX A6000": 154.8e12,
    "L40": 181.05e12, "L40S": 362.05e12, "RTX 4090": 165.2e12, "RTX 6000 Ada": 364.2e12,
    "H100": 989.4e12, "H100 PCIe": 756.5e12, "H100 NVL": 835.5e12, "H800": 989.4e12,
    "H200": 989.4e12, "GH200": 989.4e12,
    "B100": 1750e12, "B200": 2250e12, "GB200": 2500e12,
}


def model_flops(layers: int, hidden: int, ffn: int, seq: int, vocab_padded: int,
                kv_channels_total: Optional[int] = None) -> dict[str, float]:
    """Model FLOPs per token and the matmul parameter count of a LLaMA-style GPT (SwiGLU,
    GQA with `kv_channels_total` key/value channels, untied output layer)."""
    kv = hidden if kv_channels_total is None else kv_channels_total
    per_layer = hidden * (hidden + 2 * kv) + hidden * hidden + 3 * hidden * ffn
    n_matmul = layers * per_layer + hidden * vocab_padded
    causal_attn = 6 * layers * hidden * seq
    return {"matmul_params": n_matmul, "per_token": 6 * n_matmul + causal_attn,
            "per_token_full_attention": 6 * n_matmul + 2 * causal_attn}


def peak_flops(device_name: str) -> Optional[float]:
    """Peak dense bf16 FLOP/s of a GPU by name; None when unknown (no MFU reported)."""
    for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):
        if key in device_name:
            return PEAK_BF16_FLOPS[key]
    return None


def format_eta(seconds: float) -> str:
    """'1d 02:03:04' / '02:03:04' for the progress line."""
    seconds = max(0, int(round(seconds)))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    text = f"{hours:02d}:{rest // 60:02d}:{rest % 60:02d}"
    return f"{days}d {text}" if days else text


def local_memory_gib(device: torch.device) -> tuple[float, float]:
    """(allocated, reserved) peaks of this process in GiB: CUDA max_memory_allocated /
    max_memory_reserved; on CPU the resident set size for both."""
    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated(device) / 2**30,
                torch.cuda.max_memory_reserved(device) / 2**30)
    import psutil

    rss = psutil.Process().memory_info().rss / 2**30
    return rss, rss


def memory_over_ranks(device: torch.device) -> dict[str, float]:
    """The largest allocated and reserved peak over the world group's ranks and the rank
    holding each (one all-reduce of a [world, 2] fp32 tensor on `device`: every rank fills its
    row; collective, call it on every rank). Scalars perf/memory_allocated_GiB,
    perf/memory_allocated_rank, perf/memory_reserved_GiB, perf/memory_reserved_rank."""
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    table = torch.zeros(world, 2, device=device)
    table[rank] = torch.tensor(local_memory_gib(device), device=device)
    if world > 1:
        dist.all_reduce(table)
    value, where = table.max(dim=0)
    return {"perf/memory_allocated_GiB": value[0].item(),
            "perf/memory_allocated_rank": where[0].item(),
            "perf/memory_reserved_GiB": value[1].item(),
            "perf/memory_reserved_rank": where[1].item()}


class ThroughputMeter:
    """Tokens/s (global and per GPU), step time, TFLOP/s per GPU, MFU and ETA over the steps
    since the previous `interval()` call.

    tokens_per_step: global tokens of one optimizer step; flops_per_token: model FLOPs;
    peak: FLOP/s of one GPU (None: no MFU); gpus: how many share the work; total_steps: the
    run's last step (ETA); clock: for tests.
    """

    def __init__(self, tokens_per_step: int, flops_per_token: float, peak: Optional[float],
                 gpus: int, start_step: int, total_steps: Optional[int] = None,
                 clock: Callable[[], float] = time.perf_counter):
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.peak, self.gpus, self.clock = peak, gpus, clock
        self.total_steps = total_steps
        self.start_time = self._mark_time = clock()
        self.start_step = self._mark_step = start_step

    def interval(self, step: int) -> dict[str, float]:
        """Rates over (previous call, now]; starts the next interval. perf/eta_s: the steps
        left to total_steps at this interval's step time."""
        now = self.clock()
        steps, seconds = step - self._mark_step, max(now - self._mark_time, 1e-9)
        self._mark_time, self._mark_step = now, step
        tokens_per_s = self.tokens_per_step * steps / seconds
        step_time = seconds / max(steps, 1)
        flops_per_gpu = self.flops_per_token * tokens_per_s / self.gpus
        out = {"perf/tokens_per_s": tokens_per_s,
               "perf/tokens_per_s_per_gpu": tokens_per_s / self.gpus,
               "perf/step_time_s": step_time,
               "perf/tflops_per_gpu": flops_per_gpu / 1e12}
        if self.peak:
            out["perf/mfu"] = flops_per_gpu / self.peak
        if self.total_steps is not None:
            out["perf/eta_s"] = max(0, self.total_steps - step) * step_time
        return out

    def totals(self, step: int) -> dict[str, float]:
        """Steps, tokens, seconds and mean tokens/s since the meter started."""
        seconds = max(self.clock() - self.start_time, 1e-9)
        steps = step - self.start_step
        return {"steps": steps, "tokens": steps * self.tokens_per_step, "seconds": seconds,
                "tokens_per_s": steps * self.tokens_per_step / seconds}


def progress_line(step: int, total_steps: int, s: dict[str, float]) -> str:
    """One log line of a log step, fields as Megatron-LM words them where it has them:
    'iteration 20/400 | consumed tokens 163,840 | loss 5.1234 | lr 1.90E-03 | grad norm
    0.812 | skipped 0 | nan 0 | 123.4 ms/step | tokens/s/GPU 1,234 | tokens/s 2,468 |
    TFLOP/s/GPU 12.3 | MFU 4.0% | mem allocated 1.23 GiB (rank 1) reserved 1.50 GiB
    (rank 1) | ETA 00:12:34' (MFU only with a known peak; memory: the maximum over ranks)."""
    width = len(str(total_steps))
    norm = s.get("train/grad_norm")
    parts = [
        f"iteration {step:{width}d}/{total_steps}",
        f"consumed tokens {int(s['train/consumed_tokens']):,}",
        f"loss {s['train/loss']:.4f}",
        f"lr {s['train/lr']:.3E}",
        f"grad norm {'n/a' if norm is None else f'{norm:.3f}'}",
        f"skipped {int(s['train/skipped_steps_interval'])}",
        f"nan {int(s['train/nonfinite_steps_interval'])}",
        f"{s['perf/step_time_s'] * 1e3:,.1f} ms/step",
        f"tokens/s/GPU {s['perf/tokens_per_s_per_gpu']:,.0f}",
        f"tokens/s {s['perf/tokens_per_s']:,.0f}",
        f"TFLOP/s/GPU {s['perf/tflops_per_gpu']:.3g}",
    ]
    if "perf/mfu" in s:
        parts.append(f"MFU {100 * s['perf/mfu']:.1f}%")
    parts.append(f"mem allocated {s['perf/memory_allocated_GiB']:.2f} GiB (rank "
                 f"{int(s['perf/memory_allocated_rank'])}) reserved "
                 f"{s['perf/memory_reserved_GiB']:.2f} GiB (rank "
                 f"{int(s['perf/memory_reserved_rank'])})")
    parts.append(f"ETA {format_eta(s['perf/eta_s'])}")
    return " | ".join(parts)


def throughput_meter(cfg: TrainConfig, tokens_per_step: int, bf16: bool, device: torch.device,
                     start_step: int, vocab_size: int):
    """The ThroughputMeter of a run: model FLOPs of cfg's GPT, the peak FLOP/s of one GPU
    (logging.peak_tflops, else the table for bf16 on a known GPU; None: no MFU), every rank's
    GPU sharing the tokens, ETA to train.train_steps."""
    import torch.distributed as dist

    m = cfg.model
    kv = (m.num_query_groups or m.num_attention_heads) * (m.hidden_size // m.num_attention_heads)
    flops = model_flops(m.num_layers, m.hidden_size, m.ffn, m.seq_length,
                        padded_vocab_size(vocab_size, cfg.parallel.tensor_model_parallel_size), kv)
    peak = (peak_flops(torch.cuda.get_device_name(device))
            if bf16 and device.type == "cuda" else None)
    if cfg.logging.peak_tflops is not None:
        peak = cfg.logging.peak_tflops * 1e12
    return ThroughputMeter(tokens_per_step, flops["per_token"], peak, dist.get_world_size(),
                           start_step, total_steps=cfg.train.train_steps)
