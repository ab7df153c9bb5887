"""Training-speed accounting for the progress line: throughput over the last log interval
(not the average since start, which reads as a speed-up while start-up costs fade), step time,
model FLOPs utilisation, and the totals of a run.

MFU = model FLOPs per token x tokens/s / (GPUs x peak dense bf16 FLOP/s of one GPU), with
model FLOPs per token = 6 N_matmul + 6 L h s (causal attention; N_matmul counts the
transformer's and the output layer's matmul weights, not the embedding lookup).
"""

from __future__ import annotations

import time
from typing import Callable, Optional

# dense bf16 FLOP/s of one GPU, by a substring of torch.cuda.get_device_name()
PEAK_BF16_FLOPS = {"H100": 989.4e12, "H200": 989.4e12, "GH200": 989.4e12, "A100": 312e12,
                   "B200": 2250e12}


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


class ThroughputMeter:
    """Tokens/s, step time and MFU over the steps since the previous `interval()` call.

    tokens_per_step: global tokens of one optimizer step; flops_per_token: model FLOPs;
    peak: FLOP/s of one GPU (None: no MFU); gpus: how many share the work; clock: for tests.
    """

    def __init__(self, tokens_per_step: int, flops_per_token: float, peak: Optional[float],
                 gpus: int, start_step: int, clock: Callable[[], float] = time.perf_counter):
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.peak, self.gpus, self.clock = peak, gpus, clock
        self.start_time = self._mark_time = clock()
        self.start_step = self._mark_step = start_step

    def interval(self, step: int) -> dict[str, float]:
        """Rates over (previous call, now]; starts the next interval."""
        now = self.clock()
        steps, seconds = step - self._mark_step, max(now - self._mark_time, 1e-9)
        self._mark_time, self._mark_step = now, step
        tokens_per_s = self.tokens_per_step * steps / seconds
        out = {"perf/tokens_per_s": tokens_per_s, "perf/step_time_s": seconds / max(steps, 1)}
        if self.peak:
            out["perf/mfu"] = self.flops_per_token * tokens_per_s / (self.gpus * self.peak)
        return out

    def totals(self, step: int) -> dict[str, float]:
        """Steps, tokens, seconds and mean tokens/s since the meter started."""
        seconds = max(self.clock() - self.start_time, 1e-9)
        steps = step - self.start_step
        return {"steps": steps, "tokens": steps * self.tokens_per_step, "seconds": seconds,
                "tokens_per_s": steps * self.tokens_per_step / seconds}
