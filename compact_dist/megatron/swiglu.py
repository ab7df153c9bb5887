"""SwiGLU that keeps its input for backward in FP8 (`activations.fp8_storage: [swiglu]`).

The SwiGLU input is the fc1 output, x [s, b, 2 * ffn / tp] (gate half, then linear half;
plus fc1's bias when there is one). Megatron's MLP keeps it in the activation dtype (its
fused path: x only; its unfused path: x, silu(gate) and the halves, 1.5x x). Here x is kept
as `compact_dist.megatron.fp8_storage.pack(x)`: 1 byte per element plus a fp32 scale per 128, i.e.
0.516x of Megatron's fused path in bf16.

Why not Megatron's `config.activation_func_fp8_input_store`: (1) it only acts on Megatron's
fused path (`bias_activation_fusion`); the unfused path ignores it. (2) It casts x to e4m3
without a scale: e4m3's normals start at 2^-6 = 0.0156 and end at 448, so small-magnitude
rows fall among the subnormals (spacing 2^-9) and |x| > 448 saturates. Measured on bf16 rows
N(0, 1) * sigma, 256 x 2048 (relative error of the SwiGLU input gradient dx vs the exact
one; unscaled cast vs this module's scaled blocks): sigma 0.005: 0.113 vs 0.027; 0.02: 0.033
vs 0.027; 0.05: 0.027 vs 0.027; 0.1..3: equal (0.027-0.030); rows of mixed sigma
0.02..3: 0.029 both. So on typical fc1 outputs (std ~ 0.02 sqrt(hidden) ~ 1) both are equal;
the scaled format keeps its bound (2^-4 relative per element) at every magnitude, for 3.1%
more memory (one fp32 scale per 128 elements). It is used, one format for all three options
(test_scaled_beats_unscaled asserts the sigma = 0.005 and > 448 cases).

`Fp8SwiGLUMLP` is Megatron's MLP with the activation step replaced, selected by
`compact_dist.megatron.spec` for the 'swiglu' option. Its forward output is bit-identical to the MLP's
(the same functions compute it: Megatron's fused `bias_swiglu`/`swiglu` when
`config.bias_activation_fusion`, else the eager silu(gate) * linear); backward uses
Megatron's fused `swiglu_back` (fused) or autograd on the eager expression (unfused), on the
dequantized x.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.fusions import fused_bias_swiglu
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from compact_dist.megatron.fp8_storage import needs_storage, pack, unpack


def _glu(x: torch.Tensor) -> torch.Tensor:
    """Megatron's unfused MLP activation for SwiGLU (no clamp, no offset)."""
    gate, linear = torch.chunk(x, 2, dim=-1)
    return F.silu(gate) * linear


def swiglu_forward(x: torch.Tensor, bias: Optional[torch.Tensor], fused: bool) -> torch.Tensor:
    """What Megatron's MLP computes: fused -> bias_swiglu_impl's forward; else glu(x + bias)."""
    if fused:
        flat = x.reshape(-1, x.shape[-1])
        out = (fused_bias_swiglu.swiglu(flat) if bias is None
               else fused_bias_swiglu.bias_swiglu(flat, bias))
        return out.view(*x.shape[:-1], -1)
    return _glu(x if bias is None else x + bias)


class Fp8SwiGLUFunction(torch.autograd.Function):
    """x [..., 2f], bias [2f] or None -> silu(x1 + b1) * (x2 + b2) [..., f]; saves
    pack(x + bias) (fp8 payload [..., 2f], fp32 scales [..., 2f / block])."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: Optional[torch.Tensor], fused: bool):
        out = swiglu_forward(x, bias, fused)
        ctx.save_for_backward(*pack(x if bias is None else x + bias))
        ctx.dtype, ctx.fused, ctx.has_bias = x.dtype, fused, bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        payload, scales = ctx.saved_tensors
        x = unpack(payload, scales, ctx.dtype)
        if ctx.fused:
            flat = fused_bias_swiglu.swiglu_back(grad_out.reshape(-1, grad_out.shape[-1]),
                                                 x.reshape(-1, x.shape[-1]))
            grad_x = flat.view(x.shape)
        else:
            with torch.enable_grad():
                x = x.detach().requires_grad_(True)
                (grad_x,) = torch.autograd.grad(_glu(x), x, grad_out)
        grad_bias = grad_x.reshape(-1, grad_x.shape[-1]).sum(0) if ctx.has_bias else None
        return grad_x, grad_bias, None


def fp8_swiglu(x: torch.Tensor, bias: Optional[torch.Tensor], fused: bool) -> torch.Tensor:
    """SwiGLU of x (+ bias) keeping x in FP8 for backward; plain forward when nothing is
    recorded (eval, no_grad, a recompute's first pass)."""
    if not needs_storage(x, bias):
        return swiglu_forward(x, bias, fused)
    return Fp8SwiGLUFunction.apply(x, bias, fused)


class _UnknownMlpFilter(logging.Filter):
    """TransformerLayer passes tp_group only to ModuleSpecs whose module *is* MLP and logs
    'Unknown MLP type' for a subclass; Fp8SwiGLUMLP takes the same TP group from Megatron's
    parallel state (as MLP does without tp_group), so that warning is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Unknown MLP type" not in record.getMessage()


logging.getLogger("megatron.core.transformer.transformer_layer").addFilter(_UnknownMlpFilter())


class Fp8SwiGLUMLP(MLP):
    """Megatron's MLP (same constructor, parameters and state-dict keys) whose SwiGLU keeps
    its input in FP8. Needs gated_linear_unit with activation_func=F.silu; rejects
    transformer-engine activations, clamping, glu_linear_offset and expert use."""

    def __init__(
        self,
        config: TransformerConfig,
        submodules: MLPSubmodules,
        is_expert: bool = False,
        input_size: Optional[int] = None,
        ffn_hidden_size: Optional[int] = None,
        tp_group: Optional[torch.distributed.ProcessGroup] = None,
    ):
        if not (config.gated_linear_unit and config.activation_func is F.silu):
            raise ValueError("fp8_storage 'swiglu' needs gated_linear_unit=True with "
                             "activation_func=F.silu (SwiGLU)")
        if (config.use_te_activation_func or config.activation_func_clamp_value is not None
                or config.glu_linear_offset != 0.0 or is_expert):
            raise ValueError("fp8_storage 'swiglu' supports the plain SwiGLU MLP only (no TE "
                             "activation, clamp, glu_linear_offset or experts)")
        super().__init__(config, submodules, is_expert, input_size,
                         ffn_hidden_size or config.ffn_hidden_size, tp_group)

    def forward(self, hidden_states, per_token_scale=None, **kwargs):
        """hidden_states [s, b, h] -> (output [s, b, h], bias or None), as MLP.forward."""
        if per_token_scale is not None:
            raise ValueError("Fp8SwiGLUMLP does not support per_token_scale (MoE)")
        intermediate, bias = self.linear_fc1(hidden_states)
        intermediate = fp8_swiglu(intermediate, bias, self.config.bias_activation_fusion)
        return self.linear_fc2(intermediate)
