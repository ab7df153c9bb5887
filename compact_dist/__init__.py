"""compact_dist: CompAct (arXiv 2410.15352) compressed-activation linear layers for
Megatron-core models trained under DeepSpeed."""

import warnings

# apex and transformer-engine are optional accelerators here; megatron-core's notice that they
# are absent (printed once per process at import) is expected, not actionable.
warnings.filterwarnings(
    "ignore", message=r"(Apex is not installed|Transformer Engine and Apex are not installed)"
)

import compact_dist.deepspeed  # registers the DeepSpeed ZeRO 0-3 backend (nothing is imported
# from the deepspeed library until a DeepSpeed engine is used)
import compact_dist.fsdp  # registers the torch FSDP2 backend
from compact_dist.core.config import CompressionConfig, LayerCompression
from compact_dist.core.layers import CompactColumnParallelLinear, CompactRowParallelLinear
from compact_dist.megatron.spec import get_compact_gpt_block_spec, get_compact_gpt_layer_spec
from compact_dist.core.subspace import (
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
    "get_compact_gpt_block_spec",
    "get_compact_gpt_layer_spec",
    "SubspaceStepper",
    "assign_layer_ids",
    "compact_layers",
    "merge_subspace_factors",
    "optimizer_param_groups",
]
