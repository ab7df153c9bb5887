"""Core attention on torch.nn.functional.scaled_dot_product_attention.

A drop-in for Megatron-core's local DotProductAttention (same constructor and forward), which
needs neither transformer-engine nor the CUDA-only global memory buffer / fused softmax mask,
and which never materialises the [b, heads, s, s] scores on backends with flash or
memory-efficient kernels.

FP8 storage (`activations.fp8_storage: [attention]`, `SDPACoreAttention(fp8_storage=True)`):
`Fp8AttentionFunction` runs attention without keeping bf16 q, k, v or output for backward;
it keeps `compact_dist.megatron.fp8_storage.pack` of each (1 byte per element plus one fp32 scale per
head row of head_dim elements, or per 128 when head_dim is a multiple of 128), with k and v
in their GQA group form [sk, b, groups, d] (SDPA's own backward keeps them repeated to the
head count). It runs the fused kernel that F.scaled_dot_product_attention itself would pick
for these inputs (`sdpa_backend`, torch's own choice: `torch._fused_sdp_choice`), so the
forward output is the one of the non-FP8 path, and calls that kernel's backward on the
dequantized tensors:
  - cudnn (torch prefers cuDNN attention on Hopper for these shapes; its backward is faster
    than flash's there: 0.47 vs 0.83 ms per layer of the 1.3B preset, H200) and
  - flash: aten._scaled_dot_product_{cudnn,flash}_attention keep the logsumexp [b, h, sq]
    (fp32) and the philox state; backward calls the matching
    aten._scaled_dot_product_*_attention_backward on the dequantized q, k, v, output.
    Saved: q, k, v, out in FP8 + logsumexp.
  - recompute (CPU, fp32, an explicit mask, the memory-efficient or math backends): forward
    is F.scaled_dot_product_attention under no_grad; backward recomputes attention from the
    dequantized q, k, v under autograd (one more attention forward). The output is not
    needed and not kept. Saved: q, k, v in FP8 (+ the mask, an input).
Attention dropout is not supported with FP8 storage (rejected at construction, and at config
load by ActivationConfig.check_model): the recompute path cannot replay SDPA's dropout mask.
The output feeds linear_proj. SDPA allocates its output like q ([sq, b, h, d] in memory when
q is a view of Megatron's [sq, b, ...] qkv), so `context.permute(2, 0, 1, 3).reshape(sq, b,
-1)` is a view: without FP8, SDPA's saved output and an uncompressed linear_proj's saved
input are one storage (tests/test_fp8_storage.py checks it on CPU and CUDA). Hence
`share_output` (set by compact_dist.megatron.spec when linear_proj keeps its exact input: Megatron's
linear, or compression.exact_input): the cudnn and flash paths then reference that bf16 tensor
instead of adding an FP8 copy; with a CompAct proj (which keeps only X P) they keep the FP8
copy.
"""

from __future__ import annotations

import math
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend
from megatron.core import tensor_parallel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide

from compact_dist.megatron.fp8_storage import needs_storage, pack, unpack


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
           mask: Optional[torch.Tensor], causal: bool, scale: float, dropout_p: float = 0.0
           ) -> torch.Tensor:
    """SDPA in Megatron's layout: query [sq, b, h, d], key/value [sk, b, g, d] (g divides h;
    repeated to h heads) -> context [sq, b, h * d]. mask: SDPA's convention (True = attend)."""
    q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    context = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal, scale=scale)
    return context.permute(2, 0, 1, 3).reshape(query.shape[0], query.shape[1], -1)


Backend = Literal["cudnn", "flash", "recompute"]
_FUSED = {SDPBackend.CUDNN_ATTENTION.value: "cudnn", SDPBackend.FLASH_ATTENTION.value: "flash"}


def sdpa_backend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 mask: Optional[torch.Tensor], causal: bool, scale: float) -> Backend:
    """Fp8AttentionFunction's path for heads-first q [b, h, sq, d], k/v [b, h, sk, d] (k, v
    repeated to h heads): 'cudnn' or 'flash' when torch's SDPA would run that kernel on these
    inputs (CUDA, no explicit mask, dropout 0), else 'recompute'."""
    if not query.is_cuda or mask is not None:
        return "recompute"
    choice = torch._fused_sdp_choice(query, key, value, None, 0.0, causal, scale=scale)
    return _FUSED.get(int(choice), "recompute")


def _heads_first(t: torch.Tensor, rep: int = 1) -> torch.Tensor:
    """[s, b, n, d] -> [b, n * rep, s, d] (a view unless rep > 1)."""
    t = t.permute(1, 2, 0, 3)
    return t.repeat_interleave(rep, dim=1) if rep > 1 else t


def _fused_forward(backend: Backend, q, k, v, causal: bool, scale: float):
    """(out [b, h, sq, d], logsumexp, kernel state for the backward) of the fused kernel."""
    if backend == "cudnn":
        (out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _) = (
            torch.ops.aten._scaled_dot_product_cudnn_attention(
                q, k, v, None, True, 0.0, causal, False, scale=scale))
        return out, lse, (cum_q, cum_k, max_q, max_k, seed, offset)
    (out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _) = (
        torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False,
                                                           scale=scale))
    return out, lse, (cum_q, cum_k, max_q, max_k, seed, offset)


def _fused_backward(backend: Backend, grad, q, k, v, out, lse, state, causal: bool,
                    scale: float):
    """(dq, dk, dv) [b, h, s, d] of the fused kernel that produced `out`."""
    cum_q, cum_k, max_q, max_k, seed, offset = state
    if backend == "cudnn":
        return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            grad, q, k, v, out, lse, seed, offset, None, cum_q, cum_k, max_q, max_k, 0.0,
            causal, scale=scale)
    return torch.ops.aten._scaled_dot_product_flash_attention_backward(
        grad, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, 0.0, causal, seed, offset,
        scale=scale)


class Fp8AttentionFunction(torch.autograd.Function):
    """query [sq, b, h, d], key/value [sk, b, g, d] -> context [sq, b, h * d], keeping q, k, v
    (and, on the cudnn / flash paths, the output) in FP8 for backward. Dropout 0 only.
    backend: None = `sdpa_backend` (what SDPA would run), or force one (tests).
    share_output (cudnn / flash): keep a reference to the returned context instead of an FP8
    copy, for when linear_proj keeps that same tensor anyway (an uncompressed proj)."""

    @staticmethod
    def forward(ctx, query, key, value, mask, causal: bool, scale: float,
                backend: Optional[Backend] = None, share_output: bool = False):
        sq, b, h, d = query.shape
        rep = h // key.shape[2]
        if backend is None and (not query.is_cuda or mask is not None):
            backend = "recompute"
        if backend != "recompute":
            q, k, v = _heads_first(query), _heads_first(key, rep), _heads_first(value, rep)
            backend = backend or sdpa_backend(q, k, v, mask, causal, scale)
        ctx.causal, ctx.scale, ctx.backend, ctx.rep = causal, scale, backend, rep
        ctx.share_output = share_output
        ctx.dtypes = (query.dtype, key.dtype, value.dtype)
        packed = [*pack(query), *pack(key), *pack(value)]
        if backend == "recompute":
            context = attend(query, key, value, mask, causal, scale)
            ctx.save_for_backward(*packed, mask)
            return context
        out, lse, state = _fused_forward(backend, q, k, v, causal, scale)
        context = out.permute(2, 0, 1, 3).reshape(sq, b, h * d)
        cum_q, cum_k, ctx.max_q, ctx.max_k, seed, offset = state
        kept_out = (context, None) if share_output else pack(context.view(sq, b, h, d))
        ctx.save_for_backward(*packed, *kept_out, lse, cum_q, cum_k, seed, offset)
        return context

    @staticmethod
    def backward(ctx, grad_context):
        saved = ctx.saved_tensors
        q, k, v = (unpack(saved[2 * i], saved[2 * i + 1], ctx.dtypes[i]) for i in range(3))
        sq, b, h, d = q.shape
        if ctx.backend == "recompute":
            mask = saved[6]
            with torch.enable_grad():
                q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
                context = attend(q, k, v, mask, ctx.causal, ctx.scale)
                dq, dk, dv = torch.autograd.grad(context, (q, k, v), grad_context)
            return dq, dk, dv, None, None, None, None, None
        out = (saved[6].reshape(sq, b, h, d) if ctx.share_output
               else unpack(saved[6], saved[7], ctx.dtypes[0]))
        lse, cum_q, cum_k, seed, offset = saved[8:]
        # grad and out in one layout ([sq, b, h, d] memory, heads-first view), as cuDNN wants
        grad = grad_context.contiguous().view(sq, b, h, d)
        dq, dk, dv = _fused_backward(
            ctx.backend, _heads_first(grad), _heads_first(q), _heads_first(k, ctx.rep),
            _heads_first(v, ctx.rep), _heads_first(out), lse,
            (cum_q, cum_k, ctx.max_q, ctx.max_k, seed, offset), ctx.causal, ctx.scale)
        if ctx.rep > 1:  # sum the gradients of each group's repeated heads
            dk, dv = (t.unflatten(1, (-1, ctx.rep)).sum(2) for t in (dk, dv))
        dq, dk, dv = (t.permute(2, 0, 1, 3) for t in (dq, dk, dv))
        return dq, dk, dv, None, None, None, None, None


class SDPACoreAttention(MegatronModule):
    """Input q [sq, b, heads/tp, d], k/v [sk, b, groups/tp, d]; output [sq, b, heads/tp * d]."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
        fp8_storage: bool = False,
        share_output: bool = False,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPACoreAttention does not support context parallelism")
        if config.softmax_type != "vanilla":
            raise ValueError(f"SDPACoreAttention supports softmax_type='vanilla' only")
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        tp = pg_collection.tp.size()
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.heads_per_partition = divide(config.num_attention_heads, tp)
        self.groups_per_partition = divide(config.num_query_groups, tp)
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(head_dim)
        if config.apply_query_key_layer_scaling:
            self.softmax_scale /= self.layer_number
        self.dropout_p = (
            config.attention_dropout if attention_dropout is None else attention_dropout
        )
        self.fp8_storage, self.share_output = fp8_storage, share_output
        if fp8_storage and self.dropout_p > 0.0:
            raise ValueError("fp8_storage 'attention' does not support attention dropout "
                             f"(dropout_p={self.dropout_p})")

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPACoreAttention supports neither packed sequences nor a bias")
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        causal = mask_type == AttnMaskType.causal
        # Megatron masks are True where attention is *not* allowed; SDPA's the opposite.
        mask = None if causal or attention_mask is None else ~attention_mask
        dropout_p = self.dropout_p if self.training else 0.0
        if self.fp8_storage and needs_storage(query, key, value):
            return Fp8AttentionFunction.apply(query, key, value, mask, causal,
                                              self.softmax_scale, None, self.share_output)

        def run():
            return attend(query, key, value, mask, causal, self.softmax_scale, dropout_p)

        if dropout_p > 0.0 and not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                return run()
        return run()
