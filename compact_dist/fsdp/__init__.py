"""torch FSDP2 glue (`torch.distributed.fsdp.fully_shard` over Megatron's data-parallel
group): the parallel backend (backend), the sharding of a Megatron GPT (shard) and the global
gradient norm over FSDP2 x Megatron TP (grad_norm). Importing this package registers the
backend (compact_dist.core.backend_registry); the package root imports it (nothing of FSDP2
is imported until a model is sharded)."""

from compact_dist.core.backend_registry import register_backend
from compact_dist.fsdp.backend import FSDP2_BACKEND

register_backend(FSDP2_BACKEND)
