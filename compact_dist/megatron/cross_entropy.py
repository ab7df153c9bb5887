"""The GPT output layer fused with Megatron's vocab-parallel cross-entropy, over chunks of tokens.

Megatron computes logits = hidden W^T ([s, b, V/tp] in the training dtype) and
`tensor_parallel.vocab_parallel_cross_entropy` keeps their fp32 softmax ([s, b, V/tp]) for
backward: at V = 32000, bf16, s b = 8192 tokens and TP = 1 that is 1 GiB saved plus 1.5 GiB of
transient logits. `fused_linear_cross_entropy` never holds more than one chunk of
`chunk_tokens` tokens of logits (a micro-batch's per-token loss is exact, as Megatron's):
- forward (no graph), per chunk: logits_c = h_c W^T in the input dtype, upcast to fp32, this
  shard's max, sum of exp and target logit; then, once for all tokens, the TP all-reduces
  (max; sum-exp rescaled to the global max and target logit in one SUM) give
  lse = log sum_v exp(logit_v) (fp32 [tokens]) and loss = lse - logit_target.
  Saved: hidden (as Megatron's output layer saves it: the local sequence shard with sequence
  parallelism), the weight (by reference), this shard's target index per token and lse.
- backward, per chunk: logits_c recomputed, d = (exp(logits_c - lse) - onehot) * dloss in
  fp32 (the one-hot only on the shard that owns the target), cast to the input dtype (where
  Megatron's gradient reaches the bf16 logits); dh_c = d W, dW += d^T h_c (fp32 sum over
  chunks, cast to W's dtype at the end). Gradients are returned, never written to `.grad`,
  so DeepSpeed's and Megatron's hooks see them as from any layer.

Shapes and groups (tp: the output layer's tensor-parallel group): hidden [s, b, h] (with
sequence parallelism the local [s/tp, b, h], all-gathered over tp inside, as Megatron's
ColumnParallelLinear does, and its gradient reduce-scattered), weight [V/tp, h] (this rank's
vocab rows, Megatron's layout: rank r owns [r V/tp, (r+1) V/tp)), labels [b, s] int64 (full,
equal on all tp ranks), loss [b, s] fp32 (equal on all tp ranks), what
GPTModel.compute_language_model_loss returns. Without sequence parallelism hidden's gradient
is all-reduced over tp by Megatron's copy_to_tensor_model_parallel_region, applied outside the
autograd function.

The per-chunk softmax work runs in Triton kernels on CUDA tensors when triton is installed
(`backend="auto"`): one pass over the bf16/fp32 logits for the forward's online max / sum-exp
and one that turns the recomputed logits into d in place; the torch path is the reference and
runs everywhere else.

`FusedCrossEntropyGPTModel` is Megatron's GPTModel with that path for `labels` (built by
`compact_dist.megatron.model.build_gpt_model` when `activations.fused_cross_entropy` is set).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

from compact_dist.core.collectives import all_gather_first_dim, reduce_scatter_first_dim

try:  # the GPU image has triton; CPU machines (CI) do not
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = None

BACKENDS = ("auto", "torch", "triton")


# ---------------------------------------------------------------- per-chunk math: torch path
def _stats_torch(logits: torch.Tensor, target: torch.Tensor):
    """logits [c, v] (any float dtype), target [c] (local index, -1 = another shard's) ->
    fp32 [c] each: row max, sum of exp(logit - max), target logit (0 where not owned)."""
    x = logits.float()  # may alias logits when fp32: a temporary of ours either way
    owned = target >= 0
    tgt = x.gather(1, target.clamp(min=0).unsqueeze(1)).squeeze(1) * owned
    row_max = x.amax(dim=1)
    sum_exp = x.sub_(row_max.unsqueeze(1)).exp_().sum(dim=1)
    return row_max, sum_exp, tgt


def _grad_torch(logits: torch.Tensor, lse: torch.Tensor, target: torch.Tensor,
                scale: torch.Tensor) -> torch.Tensor:
    """d = (exp(logits - lse) - onehot(target)) * scale (fp32 math), in logits' dtype.
    logits [c, v], lse / scale fp32 [c], target [c] (-1: no one-hot on this shard)."""
    p = logits.float().sub_(lse.unsqueeze(1)).exp_()
    owned = (target >= 0).to(p.dtype).unsqueeze(1)
    p.scatter_add_(1, target.clamp(min=0).unsqueeze(1), -owned)
    return p.mul_(scale.unsqueeze(1)).to(logits.dtype)


# ------------------------------------------------------------------- per-chunk math: Triton
if triton is not None:

    @triton.jit
    def _stats_kernel(logits_ptr, row_stride, target_ptr, max_ptr, sum_exp_ptr, tgt_ptr,
                      n_cols, BLOCK: tl.constexpr):
        """One program per row: online max / sum-exp over the row, and its target logit."""
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * row_stride
        m = float("-inf")
        s = 0.0
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(base + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
            new_m = tl.maximum(m, tl.max(x, axis=0))
            s = s * tl.exp(m - new_m) + tl.sum(tl.exp(x - new_m), axis=0)
            m = new_m
        t = tl.load(target_ptr + row)
        owned = t >= 0
        x_t = tl.load(base + tl.where(owned, t, 0)).to(tl.float32)
        tl.store(max_ptr + row, m)
        tl.store(sum_exp_ptr + row, s)
        tl.store(tgt_ptr + row, tl.where(owned, x_t, 0.0))

    @triton.jit
    def _grad_kernel(logits_ptr, row_stride, lse_ptr, target_ptr, scale_ptr, n_cols,
                     BLOCK: tl.constexpr):
        """One program per row: logits <- (exp(logits - lse) - onehot) * scale, in place."""
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * row_stride
        lse = tl.load(lse_ptr + row)
        g = tl.load(scale_ptr + row)
        t = tl.load(target_ptr + row)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n_cols
            x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
            p = tl.exp(x - lse)
            p = tl.where(cols == t, p - 1.0, p)
            tl.store(base + cols, (p * g).to(logits_ptr.dtype.element_ty), mask=mask)


def _launch(n_cols: int):
    block = min(4096, triton.next_power_of_2(n_cols))
    return block, (8 if block >= 2048 else 4)


def _stats_triton(logits: torch.Tensor, target: torch.Tensor):
    """Same contract as `_stats_torch`; reads logits once, in their own dtype."""
    rows, n_cols = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    out = torch.empty(3, rows, dtype=torch.float32, device=logits.device)
    block, warps = _launch(n_cols)
    _stats_kernel[(rows,)](logits, logits.stride(0), target.contiguous(), out[0], out[1], out[2],
                           n_cols, BLOCK=block, num_warps=warps)
    return out[0], out[1], out[2]


def _grad_triton(logits: torch.Tensor, lse: torch.Tensor, target: torch.Tensor,
                 scale: torch.Tensor) -> torch.Tensor:
    """Same contract as `_grad_torch`, overwriting logits (a fresh, contiguous chunk)."""
    rows, n_cols = logits.shape
    if logits.stride(1) != 1:
        raise ValueError("the Triton path needs row-contiguous logits")
    block, warps = _launch(n_cols)
    _grad_kernel[(rows,)](logits, logits.stride(0), lse.contiguous(), target.contiguous(),
                          scale.contiguous(), n_cols, BLOCK=block, num_warps=warps)
    return logits


def _use_triton(backend: str, t: torch.Tensor) -> bool:
    if backend == "triton":
        if triton is None:
            raise RuntimeError("backend='triton' needs the triton package")
        return True
    return backend == "auto" and triton is not None and t.is_cuda


# ------------------------------------------------------------------------ autograd function
def _tp_rank_size(group: Optional[dist.ProcessGroup]) -> tuple[int, int]:
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    """See the module docstring. Inputs: hidden [s(/tp), b, h], weight [V/tp, h], labels
    [b, s]; output: loss [b, s] fp32. Non-tensor arguments: chunk_tokens, tp_group,
    sequence_parallel, backend."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_tokens, tp_group, sequence_parallel,
                backend):
        total = all_gather_first_dim(hidden, tp_group)[0] if sequence_parallel else hidden
        s, b, h = total.shape
        if labels.shape != (b, s):
            raise ValueError(f"labels have shape {tuple(labels.shape)}, expected [b, s] = "
                             f"{(b, s)} for hidden [s, b, h] = {tuple(total.shape)}")
        x = total.reshape(s * b, h)  # token i = (seq i // b, batch i % b), as Megatron's [s, b]
        w = weight.to(x.dtype)
        rank, world = _tp_rank_size(tp_group)
        start = rank * weight.shape[0]
        target = labels.t().reshape(-1) - start
        target = torch.where((target >= 0) & (target < weight.shape[0]), target, -1)
        triton_path = _use_triton(backend, x)
        stats = _stats_triton if triton_path else _stats_torch

        n = x.shape[0]
        row_max = torch.empty(n, dtype=torch.float32, device=x.device)
        sum_exp, tgt = torch.empty_like(row_max), torch.empty_like(row_max)
        for c0 in range(0, n, chunk_tokens):
            c1 = min(n, c0 + chunk_tokens)
            logits = torch.matmul(x[c0:c1], w.t())  # [c, V/tp], the input dtype
            row_max[c0:c1], sum_exp[c0:c1], tgt[c0:c1] = stats(logits, target[c0:c1])
            del logits
        if world > 1:  # vocab-parallel: combine the shards' statistics, once for all chunks
            global_max = row_max.clone()
            dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=tp_group)
            packed = torch.stack([sum_exp * torch.exp(row_max - global_max), tgt])
            dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=tp_group)
            row_max, (sum_exp, tgt) = global_max, packed
        lse = row_max + torch.log(sum_exp)
        loss = lse - tgt

        ctx.save_for_backward(hidden, weight, target, lse)
        ctx.chunk_tokens, ctx.tp_group = chunk_tokens, tp_group
        ctx.sequence_parallel, ctx.triton_path = sequence_parallel, triton_path
        return loss.view(s, b).t().contiguous()

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, target, lse = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        total = (all_gather_first_dim(hidden, ctx.tp_group)[0] if ctx.sequence_parallel
                 else hidden)
        s, b, h = total.shape
        x = total.reshape(s * b, h)
        w = weight.to(x.dtype)
        scale = grad_loss.t().reshape(-1).float()  # [b, s] -> token order [s b]
        grad = _grad_triton if ctx.triton_path else _grad_torch

        n, chunk = x.shape[0], ctx.chunk_tokens
        grad_x = torch.empty_like(x) if need_hidden else None
        grad_w = None
        if need_weight:
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for c0 in range(0, n, chunk):
            c1 = min(n, c0 + chunk)
            d = grad(torch.matmul(x[c0:c1], w.t()), lse[c0:c1], target[c0:c1], scale[c0:c1])
            if need_hidden:
                torch.matmul(d, w, out=grad_x[c0:c1])
            if need_weight:
                if d.dtype == torch.float32:
                    grad_w.addmm_(d.t(), x[c0:c1])
                else:  # bf16 GEMM (fp32 accumulate inside), chunks summed in fp32
                    grad_w.add_(torch.matmul(d.t(), x[c0:c1]))
            del d

        grad_hidden = None
        if need_hidden:
            grad_hidden = grad_x.view(s, b, h)
            if ctx.sequence_parallel:
                grad_hidden = reduce_scatter_first_dim(grad_hidden, ctx.tp_group)[0]
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        return grad_hidden, grad_w, None, None, None, None, None


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_tokens: int = 2048,
    tp_group: Optional[dist.ProcessGroup] = None,
    sequence_parallel: bool = False,
    grad_reduce: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """Per-token loss [b, s] fp32 of logits = hidden weight^T against labels, vocab-parallel over
    `tp_group` (None: one process). hidden is the output layer's input as Megatron's
    ColumnParallelLinear receives it ([s/tp, b, h] with sequence_parallel, else [s, b, h]);
    `grad_reduce` (Megatron's `not disable_grad_reduce`) all-reduces hidden's gradient over
    tp when not sequence-parallel. backend: 'auto' (Triton on CUDA when installed, else
    torch), 'torch' (the reference), 'triton'."""
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be a positive integer, got {chunk_tokens!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if hidden.dim() != 3 or weight.dim() != 2 or weight.shape[1] != hidden.shape[2]:
        raise ValueError(f"expected hidden [s, b, h] and weight [V/tp, h], got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    _, world = _tp_rank_size(tp_group)
    if sequence_parallel and world == 1:
        sequence_parallel = False
    if world > 1 and not sequence_parallel and grad_reduce:
        hidden = copy_to_tensor_model_parallel_region(hidden, group=tp_group)
    return FusedLinearCrossEntropyFunction.apply(
        hidden, weight, labels, chunk_tokens, tp_group, sequence_parallel, backend)


# ----------------------------------------------------------------------- Megatron integration
class FusedOutputLayer(ColumnParallelLinear):
    """Megatron's output ColumnParallelLinear (same parameters, state dict and init) whose
    forward, given `labels`, returns (per-token loss [b, s] fp32, None) from
    `fused_linear_cross_entropy` instead of (logits, bias). The loss is computed inside this
    module's forward so that DeepSpeed ZeRO-3 gathers its weight (module hooks) in forward and
    again before its backward, as for the logits."""

    cross_entropy_chunk_tokens: int = 2048

    def forward(self, input_, weight=None, runtime_gather_output=None, labels=None):
        if labels is None:
            return super().forward(input_, weight=weight,
                                   runtime_gather_output=runtime_gather_output)
        if weight is None:
            if self.weight is None:
                raise RuntimeError("weight was not supplied to the output layer and "
                                   "skip_weight_param_allocation is True")
            weight = self.weight
        loss = fused_linear_cross_entropy(
            input_, weight, labels, chunk_tokens=self.cross_entropy_chunk_tokens,
            tp_group=self.tp_group, sequence_parallel=self.sequence_parallel,
            grad_reduce=not self.disable_grad_reduce)
        return loss, None


class FusedCrossEntropyGPTModel(GPTModel):
    """Megatron's GPTModel whose forward with `labels` returns the per-token loss [b, s] fp32 of
    the output layer fused with the vocab-parallel cross-entropy (this module's function), never
    materialising the logits. Without labels (logits, inference) it is GPTModel unchanged.
    Supports TP, sequence parallelism and share_embeddings_and_output_weights; rejects
    multi-token prediction, deferred embedding wgrad and gradient-accumulation fusion (Megatron
    DDP's main_grad), which GPTModel's own output path handles and this one does not."""

    def __init__(self, *args, cross_entropy_chunk_tokens: int = 2048, **kwargs):
        if (isinstance(cross_entropy_chunk_tokens, bool)
                or not isinstance(cross_entropy_chunk_tokens, int)
                or cross_entropy_chunk_tokens < 1):
            raise ValueError(f"cross_entropy_chunk_tokens must be a positive integer, got "
                             f"{cross_entropy_chunk_tokens!r}")
        super().__init__(*args, **kwargs)
        unsupported = [name for name, on in (
            ("mtp_num_layers", self.config.mtp_num_layers is not None),
            ("defer_embedding_wgrad_compute", self.config.defer_embedding_wgrad_compute),
            ("gradient_accumulation_fusion", self.config.gradient_accumulation_fusion),
        ) if on]
        if unsupported:
            raise ValueError(f"fused_cross_entropy does not support {', '.join(unsupported)}")
        if self.post_process:
            # GPTModel builds its output layer itself; the subclass only adds a method, so
            # swapping the class keeps its parameters, initialisation and state-dict keys.
            self.output_layer.__class__ = FusedOutputLayer
            self.output_layer.cross_entropy_chunk_tokens = cross_entropy_chunk_tokens

    def _postprocess(self, hidden_states, input_ids, position_ids, labels, *args, **kwargs):
        if labels is None or not self.post_process or kwargs.get("inference_context") is not None:
            return super()._postprocess(hidden_states, input_ids, position_ids, labels, *args,
                                        **kwargs)
        output_weight = None
        if self.share_embeddings_and_output_weights:
            output_weight = self.shared_embedding_or_output_weight()
        loss, _ = self.output_layer(hidden_states, weight=output_weight, labels=labels)
        return loss
