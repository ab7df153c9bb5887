"""A torch LayerNorm / RMSNorm that supports sequence parallelism (no apex, no TE needed).

Megatron-core's fallback norm without apex or transformer-engine (`WrappedTorchNorm`) refuses
`sequence_parallel=True`. Under sequence parallelism a norm sees only its TP rank's slice of
the sequence, so its weight gradient is partial; like Megatron's FusedLayerNorm, this norm tags
its parameters `sequence_parallel=True` so that the gradient is summed over the TP group
(`compact_dist.engine.allreduce_sequence_parallel_grads` under DeepSpeed, Megatron's
finalize_model_grads under Megatron's DDP). Input [s(/tp), b, h] -> output of the same shape.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

_NORMS = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}


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
    ) -> torch.nn.Module:
        kind = config.normalization
        if kind not in _NORMS:
            raise ValueError(f"normalization={kind!r} is not one of {sorted(_NORMS)}")
        if config.layernorm_zero_centered_gamma:
            raise ValueError("layernorm_zero_centered_gamma needs apex or transformer-engine")
        norm = _NORMS[kind](hidden_size, eps=eps, dtype=config.params_dtype)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm
