"""compact_dist: CompAct (arXiv 2410.15352) compressed-activation linear layers for
Megatron-core models trained under DeepSpeed."""

from compact_dist.config import CompressionConfig, LayerCompression
from compact_dist.layers import CompactColumnParallelLinear, CompactRowParallelLinear
from compact_dist.spec import get_compact_gpt_layer_spec
from compact_dist.subspace import (
    SubspaceStepper,
    assign_layer_ids,
    compact_layers,
    merge_subspace_factors,
    optimizer_param_groups,
)

__all__ = [
    "CompressionConfig",
    "LayerCompression",
    "CompactColumnParallelLinear",
    "CompactRowParallelLinear",
    "get_compact_gpt_layer_spec",
    "SubspaceStepper",
    "assign_layer_ids",
    "compact_layers",
    "merge_subspace_factors",
    "optimizer_param_groups",
]
