"""A torch LayerNorm / RMSNorm that supports sequence parallelism (no apex, no TE needed).

Megatron-core's fallback norm without apex or transformer-engine (`WrappedTorchNorm`) refuses
`sequence_parallel=True`. Under sequence parallelism a norm sees only its TP rank's slice of
the sequence, so its weight gradient is partial; like Megatron's FusedLayerNorm, this norm tags
its parameters `sequence_parallel=True` so that the gradient is summed over the TP group
(megatron/sequence_parallel.py's allreduce_sequence_parallel_grads under DeepSpeed,
Megatron's finalize_model_grads under Megatron's DDP). Input [s(/tp), b, h] -> output of the
same shape.

With fp8_storage=True (`activations.fp8_storage: [norm]`) the factory builds Fp8RMSNorm /
Fp8LayerNorm: subclasses of torch's norms (same parameters, state-dict keys and forward
output) whose backward sees the input as `compact_dist.megatron.fp8_storage.pack` kept it (1 byte per
element + one fp32 scale per 128); backward recomputes the norm from the dequantized input
under autograd (torch's own norm backward) to get the input, weight and bias gradients.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from compact_dist.megatron.fp8_storage import needs_storage, pack, unpack


def _norm(x: torch.Tensor, shape: tuple[int, ...], weight: Optional[torch.Tensor],
          bias: Optional[torch.Tensor], eps: Optional[float], rms: bool) -> torch.Tensor:
    """What torch.nn.RMSNorm / LayerNorm.forward compute."""
    if rms:
        return F.rms_norm(x, shape, weight, eps)
    return F.layer_norm(x, shape, weight, bias, eps)


class Fp8NormFunction(torch.autograd.Function):
    """x [..., h] -> norm(x) [..., h]; saves pack(x) and references to weight / bias."""

    @staticmethod
    def forward(ctx, x, weight, bias, shape, eps, rms: bool):
        ctx.shape, ctx.eps, ctx.rms, ctx.dtype = shape, eps, rms, x.dtype
        ctx.save_for_backward(*pack(x), weight, bias)
        return _norm(x, shape, weight, bias, eps, rms)

    @staticmethod
    def backward(ctx, grad_out):
        payload, scales, weight, bias = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        with torch.enable_grad():
            inputs = [unpack(payload, scales, ctx.dtype), weight, bias]
            inputs = [None if t is None else t.detach().requires_grad_(need)
                      for t, need in zip(inputs, needs)]
            out = _norm(*inputs[:1], ctx.shape, inputs[1], inputs[2], ctx.eps, ctx.rms)
            wanted = [t for t, need in zip(inputs, needs) if t is not None and need]
            grads = iter(torch.autograd.grad(out, wanted, grad_out))
        return (*(next(grads) if t is not None and need else None
                  for t, need in zip(inputs, needs)), None, None, None)


class Fp8RMSNorm(torch.nn.RMSNorm):
    """torch.nn.RMSNorm keeping its input in FP8 for backward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not needs_storage(x, self.weight):
            return super().forward(x)
        return Fp8NormFunction.apply(x, self.weight, None, tuple(self.normalized_shape),
                                     self.eps, True)


class Fp8LayerNorm(torch.nn.LayerNorm):
    """torch.nn.LayerNorm keeping its input in FP8 for backward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not needs_storage(x, self.weight, self.bias):
            return super().forward(x)
        return Fp8NormFunction.apply(x, self.weight, self.bias, tuple(self.normalized_shape),
                                     self.eps, False)


_NORMS = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}
_FP8_NORMS = {"LayerNorm": Fp8LayerNorm, "RMSNorm": Fp8RMSNorm}


class SequenceParallelTorchNorm:
    """Factory with the constructor Megatron's ModuleSpec passes to norms."""

    def __new__(
        cls,
        config: TransformerConfig,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: str = "LayerNorm",
        fp8_storage: bool = False,
    ) -> torch.nn.Module:
        kind = config.normalization
        if kind not in _NORMS:
            raise ValueError(f"normalization={kind!r} is not one of {sorted(_NORMS)}")
        if config.layernorm_zero_centered_gamma:
            raise ValueError("layernorm_zero_centered_gamma needs apex or transformer-engine")
        norm = (_FP8_NORMS if fp8_storage else _NORMS)[kind](
            hidden_size, eps=eps, dtype=config.params_dtype)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm
