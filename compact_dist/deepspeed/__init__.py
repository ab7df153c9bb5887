"""DeepSpeed glue: the parallel backend for ZeRO 0-3 (backend, zero3_merge), engine set-up
(ZeRO 0-3, parameter groups, persistence), the subspace factors outside the ZeRO-3 fetch
(zero3_factor), and checkpoints. Importing this package registers the backend
(compact_dist.core.backend_registry); the package root imports it."""

from compact_dist.core.backend_registry import register_backend
from compact_dist.deepspeed.backend import DEEPSPEED_BACKEND

register_backend(DEEPSPEED_BACKEND)
