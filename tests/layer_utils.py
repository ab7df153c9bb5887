"""Builders shared by the layer tests: Megatron's layers and ours with identical init."""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.transformer_config import TransformerConfig

from compact_dist.core.config import LayerCompression
from compact_dist.core.layers import CompactColumnParallelLinear, CompactRowParallelLinear


def layer_config(**overrides) -> TransformerConfig:
    kw = dict(num_layers=1, hidden_size=32, num_attention_heads=4, use_cpu_initialization=True)
    kw.update(overrides)
    return TransformerConfig(**kw)


def init_method(w):
    return torch.nn.init.normal_(w, std=0.05)


def build(kind: str, n: int, m: int, compression: LayerCompression | None, *, seed=0,
          config=None, layer_id=11, **kw):
    """kind 'column' or 'row'; compression None builds Megatron's own layer."""
    config = config or layer_config()
    torch.manual_seed(seed)
    common = dict(config=config, init_method=init_method, bias=True)
    if kind == "column":
        common.update(gather_output=False)
        cls = ColumnParallelLinear if compression is None else CompactColumnParallelLinear
    else:
        common.update(input_is_parallel=True, skip_bias_add=False)
        cls = RowParallelLinear if compression is None else CompactRowParallelLinear
    common.update(kw)
    if compression is not None:
        common.update(compression=compression, layer_id=layer_id)
    return cls(n, m, **common)
