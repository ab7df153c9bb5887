"""The training-engine interface compact-train's loop drives (one class per engine:
engine_deepspeed.DeepSpeedTrainingEngine, engine_fsdp.FSDP2TrainingEngine).

One optimizer step of the loop is: `forward` and `backward` for each of the step's
micro-batches (the engine accumulates the gradients, each micro-batch's loss weighted
1 / micro-batches, and averages them over the data-parallel group), then `step`. `lr` is the
learning rate the next `step` applies. The compact-layer method reaches the engine only
through `module` (the model; compact_dist.core.subspace walks it) and `optimizer` (what the
parallel backend is given: compact_dist.core.backend_registry.backend_for).

Checkpoints: `save_checkpoint` / `load_checkpoint` write and read the engine's own state
(module, optimizer, learning-rate schedule, the client state dict) under `directory/tag`,
with DeepSpeed's signatures, so compact_dist.training.checkpoint's atomic save (the
`.partial` directory, the marker, `latest`) wraps any engine.
"""

from __future__ import annotations

from typing import Any, Optional

import torch


class TrainingEngine:
    """What the training loop needs from an engine (see the module docstring)."""

    name: str = "abstract"
    module: torch.nn.Module
    device: torch.device
    lr_scheduler: Optional[Any] = None

    @property
    def optimizer(self):
        """What the parallel backend is given for A's master and moments (the torch
        optimizer, or the engine's wrapper of it)."""
        raise NotImplementedError

    def train(self) -> None:
        self.module.train()

    def eval(self) -> None:
        self.module.eval()

    def forward(self, *args, **kwargs):
        raise NotImplementedError

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's loss (scalar, this rank's mean)."""
        raise NotImplementedError

    def step(self) -> None:
        """The optimizer step after the step's micro-batches (clipping, learning-rate
        schedule, gradients cleared)."""
        raise NotImplementedError

    @property
    def lr(self) -> float:
        """The learning rate of the first param group that the next `step` applies."""
        raise NotImplementedError

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps the engine skipped (a non-finite gradient norm)."""
        raise NotImplementedError

    @property
    def computes_grad_norm(self) -> bool:
        """Does get_global_grad_norm() give the norm of every step (else
        compact_dist.training.nonfinite measures it in a step pre-hook)?"""
        raise NotImplementedError

    def get_global_grad_norm(self) -> Optional[float]:
        """The last step's global gradient norm (None where the engine computes none)."""
        raise NotImplementedError

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict,
                        save_latest: bool = False) -> None:
        """Collective: write the engine's state under save_dir/tag."""
        raise NotImplementedError

    def load_checkpoint(self, load_dir: str, tag: str, load_optimizer_states: bool = True,
                        load_lr_scheduler_states: bool = True) -> tuple[Optional[str], Any]:
        """Collective: read what save_checkpoint wrote; returns (path, client state), the
        client state None where there is no checkpoint of this engine."""
        raise NotImplementedError
