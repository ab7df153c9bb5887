"""`compact-plan`: predict the peak GPU memory of a run and pick the fastest config that fits.

    compact-plan --config configs/train/llama_1_3b.yaml --world-size 8 --budget-gib 40
    compact-plan --predict --config X [section.key=value ...]      # one JSON line

The planner tries every combination of the levers below (ZeRO stage, optimizer offload,
compression ratio, W0 dtype, FP8 storage, fused loss, recompute, micro-batch), keeps only
what compact-train
accepts for the target world size and device (TrainConfig.check_launch: the trainer's own
rules), ranks them by predicted step time, then the lowest ZeRO stage (least communication,
which the time model leaves out), then the predicted peak, and writes the first that fits
the budget (default ./plan.yaml).

Prediction (bytes per GPU, this TP rank), every term a short formula below:

    peak = persistent + max(forward/backward, optimizer, estimate phase)
    persistent = static (W0, trainable params, fp32 masters, Adam moments; as the ZeRO stage
                 partitions them, `compact_dist.tools.memory_report.static_bytes`) + P (cached
                 blocks, data-aware basis, the estimating step's sketch)
    forward/backward = saved activations of one micro-batch (`layer_activations`: one row per
                 tensor a transformer layer keeps, `head_activations`: embedding, final norm,
                 output layer, loss) + the largest backward transient (logits / loss,
                 recompute's re-run chunk, ZeRO-3 gathered parameters, reduce buckets)
    optimizer  = gradients + the step's temporaries (flat copy, fp32 gradient partition) or
                 the subspace merge's temporaries
    estimate   = a data-aware P's estimate after the estimating step's merge (`estimate_bytes`):
                 the new bases and one chunk's fp64 transients (no group-wide Y)
    reserved   = peak * (1 + FRAGMENTATION) + CUDA_CONTEXT_GIB: what must fit the budget.

ZeRO-1/2 keep the bf16 gradients of every parameter (ZeRO-1) or of their partition (ZeRO-2)
across the micro-batches of a gradient-accumulation window, so with accumulation they sit
beside the activations. Optimizer offload (train.offload_optimizer=cpu, DeepSpeed's
ZeRO-Offload) moves the fp32 masters, Adam moments and the fp32 gradient partition to host
memory (`host` in the prediction: those, DeepSpeed's bf16 staging copy of the partition and,
ZeRO-2, its host gradient accumulation buffer) and adds one GPU staging buffer of the
largest trainable parameter; ZeRO-2/3 then keep no gradient partition on the GPU. Its time:
the AdamW step on the host (HOST_ADAM_ELEMENTS_PER_S) and the PCIe copies
(PCIE_BYTES_PER_S): ZeRO-1 copies the gradients out and the parameters back once per
optimizer step; ZeRO-2 moves each micro-batch's gradients out and the running sum back in
(DeepSpeed 0.19.8 accumulates on the host in bf16), ZeRO-3 moves them out.

The activation rows are what `compact-memory` measures (tests/test_memory_plan.py checks them
against the profiler on CPU). The bf16 GPU case was checked against the 1.3B measurements in
benchmarks/results (docs/MEMORY.md); the transient and allocator terms are estimates.

Step time is a FLOP model, not a measurement: 6 x matmul FLOPs + causal attention per token
(compact_dist.training.progress.model_flops), plus recompute's extra forward, minus the weight-gradient
FLOPs CompAct replaces by dY^T Z, plus its projection X P, plus the fused loss's logits
recomputed in backward; over ASSUMED_FLOPS; plus a fixed cost per layer and micro-batch
(favours larger micro-batches), FP8 pack / unpack traffic, the optimizer step and the
subspace merge as memory traffic over HBM_BYTES_PER_S. It ranks candidates; it does not
predict a wall-clock time.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import sys
from pathlib import Path
from typing import Optional

import yaml

from compact_dist.core import basis
from compact_dist.core.basis import oversampling
from compact_dist.core.config import ALL_ROLES, COLUMN_ROLES
from compact_dist.core.config_loading import validate
from compact_dist.tools.memory_report import static_bytes
from compact_dist.training.train_config import TrainConfig, load_train_config

GiB = 2 ** 30
FRAGMENTATION = 0.05         # reserved / allocated - 1 of the caching allocator (measured 0-5%)
CUDA_CONTEXT_GIB = 0.75      # CUDA context, cuBLAS / NCCL workspaces: outside the allocator
ASSUMED_FLOPS = 0.40 * 989.4e12   # 40% of an H100's dense bf16 peak
HBM_BYTES_PER_S = 3.35e12    # H100 SXM
# memory traffic per parameter of one optimizer step (fused AdamW: bf16 param r/w, fp32 master,
# m, v r/w, grad r) and of the subspace merge per W0 element (fp32: read, write, A P^T;
# bf16: stochastic rounding, calibrated: 1.3B bf16-W0 r1/4 ran 24 ms/step slower than fp32 W0)
ADAM_BYTES_PER_PARAM = 36
# bf16: the fused Triton stochastic-rounding pass reads W0 and A P^T, writes W0 (1.3B r1/4,
# H200, mt_1.3b_options: 183.6 vs 170.0 ms/step for bf16 vs fp32 W0)
# bf16 pair: the same kernel, reading and writing the low word too (not calibrated apart)
MERGE_BYTES_PER_W0 = {"fp32": 12, "bf16": 30, "bf16_pair": 34}
# FP8 storage, measured step-time cost per token per layer (1.3B, micro-batch 4, H200): the
# three kinds together cost 22 ms per step over CompAct r1/4 (benchmarks/results/
# steptime_1.3b, interleaved: lean 1.045x vs 0.933x of the baseline's 200.5 ms), split in
# proportion to their kernel time per layer (profile_model --host: attention 0.14, swiglu
# 0.15, norm 0.10 ms; the rest of the 22 ms is host time of the pack / unpack calls)
FP8_STEP_S_PER_TOKEN_LAYER = {"attention": 4.1e-8, "swiglu": 4.4e-8, "norm": 2.9e-8}
LAYER_LAUNCH_S = 2e-4       # fixed cost per layer per micro-batch (kernel launches, small GEMMs)
DEEPSPEED_BUCKET = 50_000_000        # reduce / all-gather bucket (elements), engine config
# optimizer offload: host AdamW elements per second and the pinned host <-> GPU copy rate
# (PCIe Gen5 x16 moves ~50 GB/s per direction at best). Calibrated on one H200 host
# (benchmarks/results/offload_7b_24gb.json, 7B ZeRO-1 offload at 64 and 256 micro-batches
# per step): the step times fit 0.233 s per sequence + 3.46 s per step (2.0-4.9 s from single
# steps), where 4e9/s predicted 1.1 s; torch's fused CPU AdamW at 1.0e9/s (its rate on 2
# cores of the build machine) puts the fixed part at 2.8 s. Which of the host step and the
# copies is slower is not measured.
HOST_ADAM_ELEMENTS_PER_S = 1e9
PCIE_BYTES_PER_S = 25e9
ZERO3_LIVE_PARAMETERS = 1_000_000_000  # DeepSpeed's default stage3_max_live_parameters

PRESETS: dict[str, dict[str, int]] = {  # benchmarks/memory_throughput.py's shapes
    "tiny": dict(num_layers=2, hidden_size=128, num_attention_heads=4, ffn_hidden_size=352,
                 seq_length=128, vocab_size=2048),
    "350m": dict(num_layers=24, hidden_size=1024, num_attention_heads=16, ffn_hidden_size=2816,
                 seq_length=2048, vocab_size=32000),
    "1.3b": dict(num_layers=24, hidden_size=2048, num_attention_heads=16, ffn_hidden_size=5504,
                 seq_length=2048, vocab_size=32000),
    "7b": dict(num_layers=32, hidden_size=4096, num_attention_heads=32, ffn_hidden_size=11008,
               seq_length=2048, vocab_size=32000),
}


@dataclasses.dataclass(frozen=True)
class Setup:
    """A config resolved to what memory depends on. device: 'cuda' (bf16 unless precision says
    fp32, rope unless learned positions are set, fused RMSNorm kernel) or 'cpu' (fp32, learned
    positions, torch's composite RMSNorm which also keeps the normalized input).
    attention: SDPA backend: 'flash' (flash / memory-efficient / CPU flash: q, k, v, out and
    the log-sum-exp) or 'math' (scaled q and k, the [b, heads, s, s] probabilities)."""

    cfg: TrainConfig
    world_size: int
    vocab: int                 # padded vocabulary
    device: str = "cuda"
    attention: str = "flash"

    @property
    def tp(self) -> int:
        return self.cfg.parallel.tensor_model_parallel_size

    @property
    def dp(self) -> int:
        return self.world_size // self.tp

    @property
    def bf16(self) -> bool:
        p = self.cfg.train.precision
        return p == "bf16" or (p == "auto" and self.device == "cuda")

    @property
    def e(self) -> int:        # bytes per activation / trainable parameter element
        return 2 if self.bf16 else 4

    @property
    def rope(self) -> bool:
        pos = self.cfg.model.position_embedding
        return pos == "rope" or (pos == "auto" and self.device == "cuda")

    @property
    def kv(self) -> int:       # key / value channels (GQA: groups x head dim)
        return self.cfg.model.kv_channels


def roles(setup: Setup) -> dict[str, dict]:
    """Per linear role: global in / out features, parallel kind, and when compressed the
    rank r, the local width of Z ([s, b, r] column-parallel, [s, b, r/tp] row-parallel) and
    the local A shape. `exact`: the role keeps its exact input (compression.exact_input).
    p_elems: this rank's P blocks; sketch_elems: what a warm-started estimate's sketch
    stores (compact_dist.core.basis.SubspaceSketch): S [blocks, b, r_b + p] and Q0's extra
    columns [blocks, b, p] (Q0's first r_b columns are the layer's basis itself);
    local_blocks, block_in (b), block_rank (r_b), test_width (k = r_b + p): the estimate's
    shapes."""
    m, c, tp = setup.cfg.model, setup.cfg.compression, setup.tp
    shapes = {role: (n, mo) for role, (_, n, mo) in m.linear_shapes().items()}
    exact = set(getattr(c, "exact_input", []) or [])
    out = {}
    for role in ALL_ROLES:
        n, mo = shapes[role]
        column = role in COLUMN_ROLES
        info = {"in": n, "out": mo, "column": column, "setting": c.for_role(role)}
        s = info["setting"]
        if s is not None:
            blocks = 1 if column else c.row_parallel_blocks
            r = s.rank_for(n, blocks)
            local_blocks = 1 if column else blocks // tp
            b, rb = n // blocks, r // blocks
            extra = oversampling(b, rb)
            info.update(rank=r, z_width=r if column else r // tp,
                        a_shape=(mo // tp, r) if column else (mo, r // tp),
                        p_elems=(n * r) if column else (n * r // blocks // tp),
                        sketch_elems=local_blocks * b * (rb + 2 * extra),
                        local_blocks=local_blocks, block_in=b, block_rank=rb,
                        test_width=rb + extra,
                        saves_z=role not in exact)
        out[role] = info
    return out


def param_counts(setup: Setup) -> dict[str, int]:
    """Local (this TP rank) element counts: w0 (frozen bases), a (trainable factors), other
    (every other trainable parameter) and w0_bytes (at the base dtype), p (projection
    elements), sketch (the elements an estimating step's sketches store, `roles`),
    largest_w0 (elements of the biggest frozen matrix), output (the output layer's weight),
    largest_a / largest_trainable (of one factor A / any trainable tensor)."""
    m, c, tp = setup.cfg.model, setup.cfg.compression, setup.tp
    h = m.hidden_size
    counts = dict(w0=0, w0_bytes=0, a=0, other=0, p=0, sketch=0, largest_w0=0, largest_a=0)
    for role, info in roles(setup).items():
        full = info["in"] * info["out"] // tp
        s = info["setting"]
        if s is not None and s.mode == "subspace":
            a = math.prod(info["a_shape"])
            counts["w0"] += full
            counts["w0_bytes"] += full * (2 if c.base_dtype == "bf16" else 4)
            counts["a"] += a
            counts["largest_w0"] = max(counts["largest_w0"], full)
            counts["largest_a"] = max(counts["largest_a"], a)
        else:
            counts["other"] += full
        if s is not None:
            counts["p"] += info["p_elems"]
            counts["sketch"] += info["sketch_elems"]
    L = m.num_layers
    for key in ("w0", "w0_bytes", "a", "other", "p", "sketch"):
        counts[key] *= L
    counts["other"] += 2 * h * L + h                          # norms, final norm
    counts["output"] = setup.vocab // tp * h
    counts["other"] += 2 * counts["output"]                   # embedding + output layer
    if not setup.rope:
        counts["other"] += m.seq_length * h                   # learned positions
    counts["largest_trainable"] = max(counts["largest_a"], counts["output"])
    return counts


def estimate_bytes(setup: Setup) -> dict[str, float]:
    """What the estimate of a data-aware P holds beyond `persistent` (which counts the basis,
    the sketches and the cached P), bytes per GPU, by sub-step; the estimating step's
    'estimate P' phase is the largest of 'reduce', 'step 1', 'step 3' (new bases + chunk)
    and 'share'. It runs after that step's optimizer step and merge
    (SubspaceStepper.after_step -> resample_projections -> compact_dist.core.subspace.
    estimate_bases). Per shape group of blocks (b, r_b, k = r_b + p; n blocks over the
    layers, kb per layer; c1 / c3 blocks per chunk of step 1 / 3: basis.CHUNK_ELEMENTS //
    (b k) / (b r_b), at least 1, at most n):
      reduce (DP or TP > 1): the flat fp32 copy of every S (_reduce_sketches);
      step 1 (nystrom_factors): S -> Y and Q0 fp64 [c1, b, k], 3 fp64 [c1, k, k] (or,
        if more, the largest S's |S| and isfinite(S) of the check which sketches saw data);
      step 3 (bases_from_factors): one layer's fp32 new basis [kb, b, r_b] (a layer's
        sketch is freed as soon as its basis is done, before the next layer's is made: the
        bases of finished layers take fewer bytes than the sketches they replace) + the
        larger of Y, T and Y T fp64 ([c3, b, k], [c3, k, r_b], [c3, b, r_b]) and 3 fp64
        [c3, b, r_b] (re-orthonormalisation), 3 fp64 [c3, r_b, r_b];
      share (DP or TP > 1): the sketches freed, every new basis and its flat copy
        (_share_bases)."""
    groups: dict[tuple, dict] = {}
    L = setup.cfg.model.num_layers
    s_elems = largest_s = 0
    for info in roles(setup).values():
        if info["setting"] is None:
            continue
        b, r, k, kb = (info["block_in"], info["block_rank"], info["test_width"],
                       info["local_blocks"])
        g = groups.setdefault((b, r, k), {"n": 0, "kb": 0})
        g["n"] += kb * L
        g["kb"] = max(g["kb"], kb)
        s_elems += kb * b * k * L
        largest_s = max(largest_s, kb * b * k)
    new_bases, step1, step3 = 0.0, 5.0 * largest_s, 0.0
    for (b, r, k), g in groups.items():
        n, kb = g["n"], g["kb"]
        c1 = min(n, max(1, basis.CHUNK_ELEMENTS // (b * k)))
        c3 = min(n, max(1, basis.CHUNK_ELEMENTS // (b * r)))
        step1 = max(step1, 8 * c1 * (2 * b * k + 3 * k * k))
        chunk = 8 * c3 * (max(b * k + k * r + b * r, 3 * b * r) + 3 * r * r)
        if 4 * kb * b * r + chunk > new_bases + step3:
            new_bases, step3 = 4 * kb * b * r, chunk
    out = {"step 1: one chunk's fp64 S / Y, Q0, k x k products": step1,
           "step 3: one layer's new basis": new_bases,
           "step 3: one chunk's fp64 Y, Y T, re-orthonormalisation": step3}
    if setup.dp > 1 or setup.tp > 1:
        n = param_counts(setup)  # this rank's P and sketch elements over the layers
        out["reduce: flat copy of every S"] = 4 * s_elems
        out["share: every new basis and its flat copy, sketches freed"] = max(
            0, 8 * n["p"] - 4 * n["sketch"])
    return out


def estimate_phase(terms: dict[str, float]) -> float:
    """The 'estimate P' phase of `estimate_bytes`'s terms: its largest sub-step."""
    step3 = sum(v for k, v in terms.items() if k.startswith("step 3"))
    return max([step3] + [v for k, v in terms.items() if not k.startswith("step 3")])


def _fp8(elems: float, last_dim: int) -> float:
    """Bytes of compact_dist.megatron.fp8_storage: 1 per element + a fp32 scale per block of 128
    (the whole row when the last dim is not a multiple of 128)."""
    block = 128 if last_dim % 128 == 0 else last_dim
    return elems * (1 + 4 / block)


def layer_activations(setup: Setup, micro_batch: Optional[int] = None) -> list[tuple[str, float]]:
    """(tensor, bytes) kept for backward by one transformer layer for one micro-batch on this
    TP rank (full recompute: what the re-run keeps). t: tokens, ts: tokens of a
    sequence-sharded tensor (SP)."""
    m, a, tp, e = setup.cfg.model, setup.cfg.activations, setup.tp, setup.e
    b = micro_batch or setup.cfg.train.micro_batch_size
    s, h, ffn, kv = m.seq_length, m.hidden_size, m.ffn, setup.kv
    heads, d = m.num_attention_heads, m.hidden_size // m.num_attention_heads
    t = s * b
    ts = t // tp if setup.cfg.parallel.sequence_parallel else t
    fp8 = set(a.fp8_storage)
    gqa = (m.num_query_groups or heads) != heads
    composite_norm = setup.device == "cpu"
    selective = setup.cfg.recompute.granularity == "selective"
    info = roles(setup)

    def linear_input(role: str, width: int, tokens: int) -> tuple[str, float]:
        r = info[role]
        if r["setting"] is not None and r["saves_z"]:
            return f"{role}: Z = X P [.., {r['z_width']}]", e * r["z_width"] * tokens
        return f"{role}: input X [.., {width}]", e * width * tokens

    def norm(name: str) -> list[tuple[str, float]]:
        if "norm" in fp8:
            return [(f"{name}: input (fp8)", _fp8(h * ts, h)), (f"{name}: rstd", 4 * ts)]
        rows = [(f"{name}: input", e * h * ts), (f"{name}: rstd (fp32)", 4 * ts)]
        if composite_norm:
            rows.append((f"{name}: normalized input (composite norm)", e * h * ts))
        return rows

    rows = norm("input_layernorm")
    rows.append(linear_input("qkv", h, ts))
    # attention inputs. q is a new tensor with rope, or a reshaped copy with GQA (groups > 1);
    # k with rope; k and v repeated to all heads with GQA. Views of the fused qkv output keep
    # that whole output alive. Selective recompute keeps only the core attention's inputs
    # (q, k, v before the repeat) and recomputes its internals.
    groups = m.num_query_groups or heads
    q_new = setup.rope or (gqa and groups > 1)
    attn_out_saved = False
    if "attention" in fp8 and not selective:
        rows += [(f"attention: {x} (fp8)", _fp8(n * t // tp, d))
                 for x, n in (("q", h), ("k", h if gqa else kv), ("v", h if gqa else kv),
                              ("out", h))]
        attn_out_saved = True          # shared with linear_proj's saved input
    else:
        repeat = gqa and not selective
        k_view = not repeat and not setup.rope
        if (not q_new) or k_view or not repeat:            # a q, k or v view
            rows.append(("linear_qkv output (q/k/v views)", e * (h + 2 * kv) * t // tp))
        if q_new:
            rows.append(("rope: q" if setup.rope else "q (reshaped copy, GQA)", e * h * t // tp))
        if setup.rope and not repeat:
            rows.append(("rope: k", e * kv * t // tp))
        if repeat:
            rows.append(("attention: k, v repeated to all heads", 2 * e * h * t // tp))
        if selective:
            pass
        elif setup.attention == "math":
            rows += [("attention (math): q * sqrt(scale)", e * h * t // tp),
                     ("attention (math): k * sqrt(scale)", e * (h if gqa else kv) * t // tp),
                     ("attention (math): probabilities [b, heads, s, s]",
                      e * b * heads // tp * s * s)]
        else:
            rows += [("attention: out", e * h * t // tp),
                     ("attention: log-sum-exp (fp32)", 4 * heads // tp * t)]
            attn_out_saved = True
    if setup.rope:
        rows.append(("rope: cos, sin of q and k (per layer)", 4 * e * s * d))
    # linear_proj's input is the attention output: the same storage when attention saves it
    r = info["proj"]
    if r["setting"] is not None and r["saves_z"]:
        rows.append(linear_input("proj", h // tp, t))
    elif not attn_out_saved:
        rows.append(("proj: input X (attention out)", e * h * t // tp))
    rows += norm("pre_mlp_layernorm")
    rows.append(linear_input("fc1", h, ts))
    f = ffn // tp
    if "swiglu" in fp8:
        rows.append(("swiglu: fc1 output (fp8)", _fp8(2 * f * t, 2 * f)))
    else:
        rows.append(("swiglu: fc1 output", e * 2 * f * t))
        if not a.swiglu_fusion(setup.device == "cuda"):
            rows += [("swiglu (unfused): silu(gate)", e * f * t),
                     ("swiglu (unfused): linear half + offset", e * f * t)]
    rows.append(linear_input("fc2", f, t))
    return rows


def head_activations(setup: Setup, micro_batch: Optional[int] = None) -> list[tuple[str, float]]:
    """Kept once per micro-batch outside the layers: embedding indices, final norm, output
    layer input, loss (Megatron's fp32 softmax, or the fused loss's lse)."""
    m, a, tp, e = setup.cfg.model, setup.cfg.activations, setup.tp, setup.e
    b = micro_batch or setup.cfg.train.micro_batch_size
    t = m.seq_length * b
    ts = t // tp if setup.cfg.parallel.sequence_parallel else t
    h, v = m.hidden_size, setup.vocab // tp
    rows = [("embedding: token ids (int64)", 8 * t)]
    if not setup.rope:
        rows.append(("position embedding: position ids (int64)", 8 * m.seq_length))
    rows += [("final_layernorm: input", e * h * ts), ("final_layernorm: rstd (fp32)", 4 * ts)]
    if setup.device == "cpu":
        rows.append(("final_layernorm: normalized input (composite norm)", e * h * ts))
    rows.append(("output_layer: input", e * h * ts))
    if a.fused_cross_entropy:
        rows.append(("fused cross-entropy: target (int64), lse (fp32)", 12 * t))
    else:
        rows += [("cross-entropy: softmax [s, b, V/tp] (fp32)", 4 * v * t),
                 ("cross-entropy: target mask (bool), masked target (int64)", 9 * t)]
    return rows


def activation_bytes(setup: Setup, micro_batch: Optional[int] = None) -> dict[str, float]:
    """Saved bytes of one micro-batch: per layer, head, total (what the profiler measures
    in forward), and `recompute_chunk`: what full recompute re-creates at once in backward."""
    cfg = setup.cfg
    per_layer = sum(x for _, x in layer_activations(setup, micro_batch))
    head = sum(x for _, x in head_activations(setup, micro_batch))
    m, r = cfg.model, cfg.recompute
    b = micro_batch or cfg.train.micro_batch_size
    t = m.seq_length * b
    ts = t // setup.tp if cfg.parallel.sequence_parallel else t
    chunk = 0.0
    if r.granularity == "full":
        chunks = math.ceil(m.num_layers / r.num_layers)
        layers = chunks * setup.e * m.hidden_size * ts       # each chunk's input
        if setup.rope:
            layers += 4 * m.seq_length * (m.hidden_size // m.num_attention_heads)  # freqs
        chunk = min(r.num_layers, m.num_layers) * per_layer
    else:
        layers = m.num_layers * per_layer
    return {"per_layer": per_layer, "layers": layers, "head": head, "total": layers + head,
            "recompute_chunk": chunk}


def predict(setup: Setup) -> dict:
    """Peak memory (bytes per GPU) of `setup`, its terms, and the FLOP-model step time."""
    cfg = setup.cfg
    c, zero, dp, e, tp = cfg.compression, cfg.train.zero_stage, setup.dp, setup.e, setup.tp
    n = param_counts(setup)
    static = static_bytes(w0_bytes=n["w0_bytes"], w0_elems=n["w0"], a=n["a"], other=n["other"],
                          zero_stage=zero, dp=dp, bf16=setup.bf16)
    trainable = n["a"] + n["other"]
    accumulation = cfg.gradient_accumulation_steps(dp)
    host = host_bytes(setup, n)
    if host:   # ZeRO-Offload: the optimizer's partition lives in host memory
        static = {**static, "fp32 masters": 0.0, "Adam moments": 0.0}
    data_aware = c.enabled and c.kind.data_aware
    proj = {"P blocks (cached, activation dtype)": e * n["p"]}
    if data_aware:
        proj["P basis (fp32, data-aware)"] = 4 * n["p"]
        # estimating steps: S [blocks, n_b, k] and Q0's extra columns [blocks, n_b, k - r_b]
        # (fp32, k = r_b + oversampling); Q0's first r_b columns are the basis above. The
        # first estimate (from the Gaussian P, no basis yet) stores all of Q0: the same bytes
        proj["sketch S, Q0 extra columns (fp32, estimating steps)"] = 4 * n["sketch"]
    persistent = (static["W0 (frozen bases)"] + static["A (trainable factors)"]
                  + static["other trainable params"] + static["fp32 masters"]
                  + static["Adam moments"] + sum(proj.values()))
    grads = static["gradients"]
    acts = activation_bytes(setup)
    m = cfg.model
    b = cfg.train.micro_batch_size
    t = m.seq_length * b
    v = setup.vocab // tp
    a = cfg.activations
    buffers = {}
    if zero >= 2:   # the flat gradient partition and the reduce bucket live across steps
        if not host:   # offloaded: the partition is on the host
            buffers["gradient partition (ZeRO-2/3)"] = grads
        buffers["reduce bucket"] = e * DEEPSPEED_BUCKET
    if host:   # DeepSpeed's device buffer for one parameter's gradient on its way
        buffers["offload: gradient staging buffer (largest trainable tensor)"] = (
            e * n["largest_trainable"])
    if cfg.parallel.sequence_parallel:   # Megatron's global all-gather buffer, [s, b, h]
        buffers["sequence-parallel all-gather buffer"] = e * t * m.hidden_size
    persistent += sum(buffers.values())
    transient = {}
    if a.fused_cross_entropy:   # one chunk of fp32 logits and its gradient in the input dtype
        transient["loss: one chunk's logits"] = min(a.cross_entropy_chunk_tokens, t) * v * (4 + e)
    elif e == 2:                # bf16 logits beside the fp32 softmax (forward end / backward)
        transient["loss: bf16 logits or their gradient"] = e * v * t
    transient["output layer weight gradient"] = e * n["output"]
    if acts["recompute_chunk"]:
        transient["recompute: re-run chunk"] = acts["recompute_chunk"]
    if zero <= 1 and accumulation > 1:   # summed over the window's micro-batches
        transient["gradients of the earlier micro-batches (ZeRO-0/1)"] = grads
    if zero == 3:
        # parameters stay gathered across the forward -> backward turn up to
        # stage3_max_reuse_distance / stage3_max_live_parameters (DeepSpeed default 1e9 each);
        # the subspace factors A are not among them (compact_dist.deepspeed.zero3_factor)
        total = n["w0"] + n["other"]
        transient["ZeRO-3: parameters kept gathered (<= 1e9 elements)"] = e * min(
            ZERO3_LIVE_PARAMETERS, total)
    backward = acts["total"] + sum(transient.values())
    # optimizer step: ZeRO-0/1 flatten the bf16 gradients of their partition and upcast them
    # to fp32; ZeRO-2/3 upcast their flat gradient partition
    step = {"fp32 gradient partition": 4 * trainable / (dp if zero else 1)}
    if zero <= 1:
        step["gradients"] = grads
        step["flattened gradient partition"] = e * trainable / (dp if zero else 1)
    if host:   # the step runs on the host; gradients leave one tensor at a time
        step = ({"gradients": grads} if zero <= 1 else
                {"offload: one tensor's fp32 gradient": 4 * n["largest_trainable"]})
    merge = {}
    if c.enabled and c.mode == "subspace" and n["largest_w0"]:
        per = 4 + e + (4 if c.base_dtype == "bf16" else 0)   # fp32 sum, A P^T, SR noise
        merge["merge: one W0's temporaries"] = per * n["largest_w0"]
        if zero == 3:
            merge["merge: gathered A masters (256 MiB bucket)"] = min(256 * 2 ** 20, 4 * n["a"])
    phases = {"forward/backward": backward, "optimizer step": sum(step.values()),
              "subspace merge": sum(merge.values())}
    estimate = estimate_bytes(setup) if data_aware else {}
    if estimate:   # the estimating step, after its merge
        phases["estimate P"] = estimate_phase(estimate)
    peak = persistent + max(phases.values())
    reserved = peak * (1 + FRAGMENTATION) + CUDA_CONTEXT_GIB * GiB
    return {
        "static": static, "projection": proj, "buffers": buffers, "persistent": persistent,
        "activations": acts, "backward_transients": transient, "step_transients": step,
        "merge_transients": merge, "estimate_transients": estimate, "phases": phases,
        "peak_phase": max(phases, key=phases.get),
        "peak_allocated": peak, "peak_reserved": reserved,
        "host": host, "host_bytes": sum(host.values()),
        "step_time_s": step_time(setup, n),
    }


def host_bytes(setup: Setup, counts: Optional[dict] = None) -> dict[str, float]:
    """Host memory per rank that optimizer offload takes (empty without it): this rank's
    optimizer partition (trainable elements / dp) as fp32 masters, Adam moments and fp32
    gradients, DeepSpeed's bf16 staging copy of it (ZeRO-1/2: the step's result on its way
    to the GPU) and, ZeRO-2 with gradient accumulation, its host accumulation buffer (bf16)."""
    cfg = setup.cfg
    if cfg.train.offload_optimizer == "none":
        return {}
    counts = counts or param_counts(setup)
    zero, e = cfg.train.zero_stage, setup.e
    part = (counts["a"] + counts["other"]) / setup.dp
    host = {"fp32 masters": 4 * part, "Adam moments": 8 * part,
            "fp32 gradient partition": 4 * part}
    if zero <= 2:
        host["bf16 staging copy of the partition"] = e * part
    if zero == 2 and cfg.gradient_accumulation_steps(setup.dp) > 1:
        host["gradient accumulation (bf16)"] = e * part
    return host


def offload_copy_bytes(setup: Setup, counts: dict) -> float:
    """Bytes over PCIe per optimizer step with optimizer offload (each direction summed):
    the gradients out (ZeRO-1 once, fp32; ZeRO-2 every micro-batch out and the running sum
    back in, then fp32; ZeRO-3 every micro-batch out), the updated parameters back in, and
    the merge's copy of A to its host masters (ZeRO-3: read and zeroed through DeepSpeed's
    accessors)."""
    cfg, e = setup.cfg, setup.e
    zero, ga = cfg.train.zero_stage, cfg.gradient_accumulation_steps(setup.dp)
    part = (counts["a"] + counts["other"]) / setup.dp
    grads = {1: 4, 2: (2 * ga - 1) * e + 4, 3: ga * e}[zero] * part
    merge = 8 * counts["a"] / setup.dp if zero == 3 else e * counts["a"]
    return grads + e * part + merge


def step_time(setup: Setup, counts: Optional[dict] = None) -> float:
    """FLOP-model seconds of one optimizer step (all micro-batches of it) on one GPU."""
    from compact_dist.training.progress import model_flops

    cfg, m = setup.cfg, setup.cfg.model
    counts = counts or param_counts(setup)
    h, L, s = m.hidden_size, m.num_layers, m.seq_length
    flops = model_flops(L, h, m.ffn, s, setup.vocab, setup.kv)
    per_token = flops["per_token"]
    layer_fwd = 2 * (flops["matmul_params"] - h * setup.vocab) + 2 * L * h * s
    if cfg.recompute.granularity == "full":
        per_token += layer_fwd
    elif cfg.recompute.granularity == "selective":
        per_token += 2 * L * h * s
    for info in roles(setup).values():
        if info["setting"] is None:
            continue
        n_in, n_out, r = info["in"], info["out"], info["rank"]
        blocks = 1 if info["column"] else cfg.compression.row_parallel_blocks
        # weight gradient dY^T Z (m x r) instead of dY^T X (m x n); Z = X P costs 2 n r/blocks
        per_token += L * (2 * n_out * r - 2 * n_out * n_in + 2 * n_in * r / blocks)
    if cfg.activations.fused_cross_entropy:      # logits recomputed in backward
        per_token += 2 * h * setup.vocab
    micro_batches = cfg.gradient_accumulation_steps(setup.dp)
    tokens = m.seq_length * cfg.train.micro_batch_size * micro_batches
    seconds = per_token * tokens / setup.tp / ASSUMED_FLOPS
    seconds += LAYER_LAUNCH_S * L * micro_batches
    # FP8 storage: the measured cost per token and layer of each stored tensor kind
    seconds += sum(FP8_STEP_S_PER_TOKEN_LAYER[kind] for kind in cfg.activations.fp8_storage
                   ) * tokens / setup.tp * L
    trainable = counts["a"] + counts["other"]
    zero_div = setup.dp if cfg.train.zero_stage else 1
    if cfg.train.offload_optimizer == "none":
        seconds += ADAM_BYTES_PER_PARAM * trainable / zero_div / HBM_BYTES_PER_S
    else:   # the step on the host, the copies over PCIe (not overlapped)
        seconds += trainable / zero_div / HOST_ADAM_ELEMENTS_PER_S
        seconds += offload_copy_bytes(setup, counts) / PCIE_BYTES_PER_S
    if counts["w0"]:
        seconds += (MERGE_BYTES_PER_W0[cfg.compression.base_dtype] * counts["w0"]
                    / HBM_BYTES_PER_S)
    return seconds


# -- CLI ----------------------------------------------------------------------------------------

def setup_from(cfg: TrainConfig, world_size: int, device: str, attention: str,
               vocab: Optional[int] = None) -> Setup:
    """The Setup of `cfg`; `vocab` (before padding) defaults to the data's (model_vocab_size:
    data.vocab_size for bpe, 257 for byte, a path tokenizer's size), padded as compact-train
    pads it."""
    from compact_dist.training.tokenizer import model_vocab_size
    from compact_dist.training.model_setup import padded_vocab_size

    if vocab is None:
        vocab = model_vocab_size(cfg.data)
    return Setup(cfg=cfg, world_size=world_size, device=device, attention=attention,
                 vocab=padded_vocab_size(vocab, cfg.parallel.tensor_model_parallel_size))


def _candidates(base: TrainConfig, zeros, offloads, ratios, w0s, fp8s, fused_ce, recomputes,
                micro_batches):
    """Config trees of every combination; ratio None = compression disabled."""
    for zero, offload, ratio, w0, fp8, ce, rec, mbs in itertools.product(
            zeros, offloads, ratios, w0s, fp8s, fused_ce, recomputes, micro_batches):
        if ratio is None and w0 != w0s[0]:
            continue                                   # W0 dtype means nothing without CompAct
        tree = base.model_dump()
        tree["train"]["zero_stage"] = zero
        tree["train"]["offload_optimizer"] = offload
        tree["compression"]["enabled"] = ratio is not None
        if ratio is not None:
            tree["compression"].update(ratio=ratio, rank=None, base_dtype=w0)
        tree["activations"].update(fp8_storage=list(fp8), fused_cross_entropy=ce)
        tree["recompute"]["granularity"] = rec
        tree["train"]["micro_batch_size"] = mbs
        yield tree


def _fp8_subsets(text: str) -> list[tuple[str, ...]]:
    """'none,swiglu,swiglu+attention' -> [(), ('swiglu',), ('swiglu', 'attention')]."""
    out = []
    for item in text.split(","):
        item = item.strip()
        out.append(() if item in ("", "none") else tuple(x for x in item.split("+") if x))
    return out


def _ratio(text: str) -> Optional[float]:
    text = text.strip()
    if text in ("none", "disabled", "off"):
        return None
    if "/" in text:
        num, den = text.split("/")
        return float(num) / float(den)
    return float(text)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="compact-plan", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="compact-train YAML (default: the embedded default job)")
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="model shape of benchmarks/memory_throughput.py (overrides model.*)")
    p.add_argument("--world-size", type=int, default=1)
    p.add_argument("--tp", type=int, help="parallel.tensor_model_parallel_size")
    p.add_argument("--zero", help="ZeRO stages to try, e.g. 1,2 (default: 1,2,3; ZeRO-0 never "
                   "predicts less memory or time than ZeRO-1, so it is tried only when listed); "
                   "with --predict one stage (default: the config's train.zero_stage)")
    p.add_argument("--vocab", type=int, help="vocabulary before padding (default: the data's)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--attention", choices=["flash", "math"], default="flash",
                   help="SDPA backend (flash: flash / memory-efficient / CPU flash)")
    p.add_argument("--predict", action="store_true",
                   help="print the prediction for the config as one JSON line and exit")
    p.add_argument("--budget-gib", type=float, help="per-GPU memory budget")
    p.add_argument("--offload", default="none,cpu",
                   help="train.offload_optimizer values to try (cpu: DeepSpeed's ZeRO-Offload "
                   "of the fp32 masters, Adam moments and fp32 gradients; needs ZeRO >= 1)")
    p.add_argument("--ratios", default="none,1/2,1/4",
                   help="compression ratios to try; 'none' = compression disabled. The planner "
                   "models memory and time, not quality: 1/8 is left out by default because it "
                   "cost +15%% validation perplexity at 110M where 1/4 cost none "
                   "(benchmarks/results/convergence110m.md); add it when memory demands")
    p.add_argument("--w0", default="fp32,bf16", help="W0 dtypes to try")
    p.add_argument("--fp8", default="none,swiglu,swiglu+attention,swiglu+attention+norm",
                   help="activations.fp8_storage subsets to try ('+' joins, ',' separates)")
    p.add_argument("--fused-ce", default="false,true")
    p.add_argument("--recompute", default="none,selective,full")
    p.add_argument("--micro-batches", default=None,
                   help="micro-batch sizes to try (default: 1, 2, 4, ... up to the config's)")
    p.add_argument("--out", default="plan.yaml",
                   help="where to write the fastest fitting config (default: %(default)s in the "
                   "current directory, replaced if it exists)")
    p.add_argument("--top", type=int, default=20, help="rows of the table")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    return p.parse_intermixed_args(argv)


def _load(args) -> TrainConfig:
    overrides = []
    if args.preset:
        shape = dict(PRESETS[args.preset])
        overrides.append(f"data.vocab_size={shape.pop('vocab_size')}")
        overrides += [f"model.{k}={v}" for k, v in shape.items()]
    if args.tp:
        overrides.append(f"parallel.tensor_model_parallel_size={args.tp}")
    if args.predict and args.zero is not None:
        overrides.append(f"train.zero_stage={args.zero}")
    return load_train_config(args.config, overrides + list(args.overrides))


def _zero_stages(text: Optional[str]) -> list[int]:
    stages = [int(x) for x in (text or "1,2,3").split(",")]
    if not stages or any(z not in (0, 1, 2, 3) for z in stages):
        raise ValueError(f"--zero {text}: stages are 0, 1, 2 or 3")
    return stages


def _gib(x: float) -> str:
    return f"{x / GiB:.2f}"


def prediction_line(setup: Setup) -> dict:
    """The one-line JSON summary `--predict` prints (GiB, per GPU)."""
    p = predict(setup)
    cfg = setup.cfg
    return {
        "peak_allocated_GiB": round(p["peak_allocated"] / GiB, 3),
        "peak_reserved_GiB": round(p["peak_reserved"] / GiB, 3),
        "peak_phase": p["peak_phase"],
        "persistent_GiB": round(p["persistent"] / GiB, 3),
        "host_GiB": round(p["host_bytes"] / GiB, 3),
        "activations_GiB": round(p["activations"]["total"] / GiB, 3),
        "activations_MiB_per_sequence": round(
            activation_bytes(setup, 1)["total"] / 2 ** 20, 1),
        "static_GiB": {k: round(v / GiB, 3) for k, v in p["static"].items()},
        "phases_GiB": {k: round(v / GiB, 3) for k, v in p["phases"].items()},
        "step_time_s": round(p["step_time_s"], 4),
        "world_size": setup.world_size, "tp": setup.tp, "dp": setup.dp,
        "zero_stage": cfg.train.zero_stage, "offload_optimizer": cfg.train.offload_optimizer,
        "micro_batch": cfg.train.micro_batch_size,
        "gradient_accumulation": cfg.gradient_accumulation_steps(setup.dp),
        "compression": (cfg.compression.ratio if cfg.compression.enabled else None),
        "base_dtype": cfg.compression.base_dtype, "recompute": cfg.recompute.granularity,
        "fp8_storage": cfg.activations.fp8_storage,
        "fused_cross_entropy": cfg.activations.fused_cross_entropy,
        "device": setup.device, "attention": setup.attention, "bf16": setup.bf16,
    }


def plan(args) -> tuple[list[dict], Optional[dict]]:
    """Rows (dicts) of every candidate compact-train accepts at --world-size on --device,
    sorted by (step time, ZeRO stage, peak), and the first that fits the budget."""
    base = _load(args)
    vocab = args.vocab  # once, not per candidate (a path tokenizer loads its files)
    if vocab is None:
        from compact_dist.training.tokenizer import model_vocab_size

        vocab = model_vocab_size(base.data)
    budget = args.budget_gib * GiB
    if args.micro_batches:
        mbs = [int(x) for x in args.micro_batches.split(",")]
    else:
        mbs = [1 << i for i in range(16) if 1 << i <= base.train.micro_batch_size]
        mbs = mbs if base.train.micro_batch_size in mbs else mbs + [base.train.micro_batch_size]
    rows, refused = [], {}
    dp = args.world_size // base.parallel.tensor_model_parallel_size
    offloads = [x.strip() for x in args.offload.split(",")]
    for tree in _candidates(base, _zero_stages(args.zero), offloads,
                            [_ratio(x) for x in args.ratios.split(",")],
                            [x.strip() for x in args.w0.split(",")], _fp8_subsets(args.fp8),
                            [x.strip().lower() == "true" for x in args.fused_ce.split(",")],
                            [x.strip() for x in args.recompute.split(",")], mbs):
        # the same tokens per optimizer step as the base config, so step times compare
        tree["train"]["global_batch_size"] = base.train.global_batch_size or (
            base.train.micro_batch_size * max(1, dp))
        try:  # compact-train's own checks decide what is a candidate
            cfg = validate(TrainConfig, tree)
            cfg.check_launch(args.world_size, has_cuda=args.device == "cuda")
        except ValueError as err:
            reason = str(err)
            refused[reason] = refused.get(reason, 0) + 1
            continue
        setup = setup_from(cfg, args.world_size, args.device, args.attention, vocab)
        p = predict(setup)
        rows.append({"cfg": cfg, "tree": tree, "peak": p["peak_allocated"],
                     "reserved": p["peak_reserved"], "time": p["step_time_s"],
                     "host": p["host_bytes"],
                     "fits": p["peak_reserved"] <= budget, "phase": p["peak_phase"]})
    if not rows:
        why = "; ".join(f"{reason} ({n}x)" for reason, n in refused.items())
        raise ValueError(f"compact-train accepts none of the candidates at world size "
                         f"{args.world_size} on {args.device}: {why}")
    rows = _without_idle_stages(rows)
    rows.sort(key=lambda r: (r["time"], r["cfg"].train.zero_stage, r["peak"]))
    fitting = [r for r in rows if r["fits"]]
    return rows, (fitting[0] if fitting else None)


def _without_idle_stages(rows: list[dict]) -> list[dict]:
    """Drop each candidate whose ZeRO stage predicts no lower peak than a lower stage with
    the same other settings (at data-parallel size 1 ZeRO-2/3 partition nothing and only add
    buffers): a higher stage costs communication, so it is listed only where it saves memory."""
    lowest_peak: dict[tuple, float] = {}
    kept = []
    for r in sorted(rows, key=lambda r: r["cfg"].train.zero_stage):
        others = tuple(_describe(r["cfg"])[1:])
        if others in lowest_peak and r["peak"] >= lowest_peak[others]:
            continue
        lowest_peak[others] = r["peak"]
        kept.append(r)
    return kept


def _describe(cfg: TrainConfig) -> list[str]:
    c, a = cfg.compression, cfg.activations
    offload = cfg.train.offload_optimizer
    return [str(cfg.train.zero_stage), "-" if offload == "none" else offload,
            f"{c.ratio:g}" if c.enabled else "off",
            c.base_dtype if c.enabled else "-",
            "+".join(a.fp8_storage) or "-", "yes" if a.fused_cross_entropy else "no",
            cfg.recompute.granularity, str(cfg.train.micro_batch_size)]


def write_config(cfg: TrainConfig, path: str, target: str = "") -> None:
    """Write `cfg` as a compact-train YAML (every field explicit; `target`: the header's
    description of the world it was planned for) and check it loads back."""
    tree = cfg.model_dump()
    header = f"# written by compact-plan{' for ' + target if target else ''}\n"
    Path(path).write_text(header + yaml.safe_dump(tree, sort_keys=False))
    loaded = load_train_config(path)
    if loaded.model_dump() != tree:
        raise ValueError(f"{path} does not load back to the planned configuration")


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        if args.predict:
            cfg = _load(args)
            print(json.dumps(prediction_line(setup_from(cfg, args.world_size, args.device,
                                                        args.attention, args.vocab))))
            return
        if args.budget_gib is None:
            raise ValueError("--budget-gib is required (or --predict)")
        rows, best = plan(args)
    except ValueError as err:
        sys.exit(f"compact-plan: {err}")
    if best is None:
        small = min(rows, key=lambda r: r["reserved"])
        sys.exit(f"compact-plan: no candidate fits {args.budget_gib:g} GiB per GPU; the "
                 f"smallest ({', '.join(_describe(small['cfg']))}: ZeRO, offload, ratio, W0, fp8, "
                 f"fused CE, recompute, micro-batch) is predicted at {_gib(small['reserved'])} GiB "
                 f"reserved ({_gib(small['peak'])} GiB allocated)")
    fitting = [r for r in rows if r["fits"]]
    head = ["ZeRO", "offload", "ratio", "W0", "fp8", "fusedCE", "recompute", "mbs",
            "peak GiB", "reserved GiB", "host GiB", "step s", "peak in"]
    print(f"{len(fitting)} of {len(rows)} candidates fit {args.budget_gib:g} GiB per GPU "
          f"(reserved = peak x {1 + FRAGMENTATION:g} + {CUDA_CONTEXT_GIB} GiB context); "
          "step time: FLOP model at 40% of H100 bf16 peak + optimizer/merge memory traffic "
          "(recompute's extra forward and CompAct's projection FLOPs included; offload: the "
          "host AdamW step and the PCIe copies); host GiB: what offload keeps in host memory "
          "per rank")
    table = [head] + [_describe(r["cfg"]) + [_gib(r["peak"]), _gib(r["reserved"]),
                                              _gib(r["host"]), f"{r['time']:.3f}", r["phase"]]
                      for r in fitting[:args.top]]
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for row in table:
        print("  ".join(x.rjust(w) for x, w in zip(row, widths)))
    write_config(best["cfg"], args.out, f"world size {args.world_size} on {args.device}, "
                 f"{args.budget_gib:g} GiB per GPU")
    print(f"fastest fitting config written to {args.out} (compact-train --config {args.out})")


if __name__ == "__main__":
    main()
