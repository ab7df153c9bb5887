"""Build a megatron-core GPTModel with the compact layer spec."""

from __future__ import annotations

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from compact_dist.megatron.activations import ActivationConfig
from compact_dist.core.config import CompressionConfig
from compact_dist.megatron.cross_entropy import FusedCrossEntropyGPTModel
from compact_dist.megatron.spec import get_compact_gpt_block_spec
from compact_dist.core.subspace import assign_layer_ids


def build_gpt_model(
    config: TransformerConfig,
    compression: CompressionConfig,
    vocab_size: int,
    max_sequence_length: int,
    position_embedding_type: str | None = None,
    activations: ActivationConfig | None = None,
) -> GPTModel:
    """GPT/LLaMA model whose linears follow `compression` (a disabled config builds the
    Megatron baseline with the same SDPA attention). Needs Megatron's parallel state.

    Rotary embeddings are the default on GPUs; megatron-core 0.16.1 moves RoPE frequencies to
    torch.cuda.current_device() in forward, so on CPU the default is learned positions.
    With `activations.fused_cross_entropy` the model is a `FusedCrossEntropyGPTModel`: its loss
    never materialises the logits (compact_dist.megatron.cross_entropy).
    """
    compression.check_parallel(config.tensor_model_parallel_size)
    if position_embedding_type is None:
        position_embedding_type = "rope" if torch.cuda.is_available() else "learned_absolute"
    activations = activations or ActivationConfig()
    model_class, extra = GPTModel, {}
    if activations.fused_cross_entropy:
        model_class = FusedCrossEntropyGPTModel
        extra = dict(cross_entropy_chunk_tokens=activations.cross_entropy_chunk_tokens)
    model = model_class(
        config=config,
        transformer_layer_spec=get_compact_gpt_block_spec(config, compression,
                                                          activations=activations),
        vocab_size=vocab_size,
        max_sequence_length=max_sequence_length,
        position_embedding_type=position_embedding_type,
        **extra,
    )
    assign_layer_ids(model)
    return model
