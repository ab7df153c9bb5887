"""GPT / LLaMA layer spec with CompAct linears and SDPA core attention.

Built on megatron-core's local spec (no transformer-engine): the four linears are swapped for
ModuleSpecs of the compact layers carrying each role's resolved LayerCompression, and the
core attention for SDPACoreAttention. Roles left out of `CompressionConfig.layers` (or a
disabled config) keep Megatron's ColumnParallelLinear / RowParallelLinear, which makes the
same function build the uncompressed baseline. Megatron's torch fallback norm (used without
apex / transformer-engine, and always for RMSNorm) refuses sequence parallelism, so it is
swapped for SequenceParallelTorchNorm (same math, SP-aware).

`activations.fp8_storage` (compact_dist.megatron.activations) selects the FP8-storing variants:
'swiglu' -> the MLP becomes compact_dist.megatron.swiglu.Fp8SwiGLUMLP; 'attention' ->
SDPACoreAttention(fp8_storage=True) (sharing its output with linear_proj's saved input when
proj is uncompressed); 'norm' -> SequenceParallelTorchNorm(fp8_storage=True), for the two
layer norms and the final norm.
"""

from __future__ import annotations

import copy
from typing import Optional

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig

from compact_dist.megatron.activations import ActivationConfig
from compact_dist.megatron.attention import SDPACoreAttention
from compact_dist.core.config import CompressionConfig
from compact_dist.core.layers import CompactColumnParallelLinear, CompactRowParallelLinear
from compact_dist.megatron.norm import SequenceParallelTorchNorm
from compact_dist.megatron.swiglu import Fp8SwiGLUMLP


def _linear(role: str, compression: CompressionConfig, megatron_linear, compact_cls):
    setting = compression.for_role(role)
    if setting is None:
        return megatron_linear
    return ModuleSpec(module=compact_cls, params={"compression": setting})


def _keeps_exact_input(role: str, compression: CompressionConfig) -> bool:
    """Does the `role` linear save its exact input (Megatron's linear, or exact_input)?"""
    setting = compression.for_role(role)
    return setting is None or setting.exact_input


def get_compact_gpt_layer_spec(
    compression: CompressionConfig,
    normalization: Optional[str] = None,
    qk_layernorm: bool = False,
    activations: Optional[ActivationConfig] = None,
) -> ModuleSpec:
    """TransformerLayer spec: compact linear_qkv / linear_proj / linear_fc1 / linear_fc2 (per
    `compression`) and SDPA attention. normalization: 'RMSNorm' (LLaMA) or 'LayerNorm'.
    activations: its fp8_storage picks the FP8-storing SwiGLU MLP / attention / norms."""
    fp8 = set(activations.fp8_storage) if activations is not None else set()
    spec = copy.deepcopy(
        get_gpt_layer_local_spec(normalization=normalization, qk_layernorm=qk_layernorm)
    )
    attn = spec.submodules.self_attention.submodules
    mlp = spec.submodules.mlp.submodules
    attn.core_attention = SDPACoreAttention
    if "attention" in fp8:
        attn.core_attention = ModuleSpec(module=SDPACoreAttention, params={
            "fp8_storage": True, "share_output": _keeps_exact_input("proj", compression)})
    if "swiglu" in fp8:
        spec.submodules.mlp.module = Fp8SwiGLUMLP
    attn.linear_qkv = _linear("qkv", compression, attn.linear_qkv, CompactColumnParallelLinear)
    attn.linear_proj = _linear("proj", compression, attn.linear_proj, CompactRowParallelLinear)
    mlp.linear_fc1 = _linear("fc1", compression, mlp.linear_fc1, CompactColumnParallelLinear)
    mlp.linear_fc2 = _linear("fc2", compression, mlp.linear_fc2, CompactRowParallelLinear)
    layer = spec.submodules
    norm = SequenceParallelTorchNorm
    if "norm" in fp8:
        norm = ModuleSpec(module=SequenceParallelTorchNorm, params={"fp8_storage": True})
    for name in ("input_layernorm", "pre_mlp_layernorm"):
        # FP8 norms replace apex's FusedLayerNorm too (the same math)
        if getattr(layer, name) is WrappedTorchNorm or "norm" in fp8:
            setattr(layer, name, norm)
    return spec


def get_compact_gpt_block_spec(
    config: TransformerConfig,
    compression: CompressionConfig,
    qk_layernorm: bool = False,
    activations: Optional[ActivationConfig] = None,
) -> TransformerBlockSubmodules:
    """Decoder block spec: this rank's layers (pipeline-aware count) of the compact layer spec
    and a sequence-parallel-capable final norm. Pass it to GPTModel as transformer_layer_spec."""
    layer = get_compact_gpt_layer_spec(compression, config.normalization, qk_layernorm,
                                       activations)
    return TransformerBlockSubmodules(
        layer_specs=[layer] * get_num_layers_to_build(config),
        layer_norm=layer.submodules.input_layernorm,
    )
