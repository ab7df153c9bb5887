"""DeepSpeed's engine (ZeRO 0-3, compact_dist.deepspeed.engine) behind the training-engine
interface (compact_dist.training.engine_base): every call is the DeepSpeed engine's own, in
the order compact-train always made them (DeepSpeed counts micro-batches in engine.step(),
which steps the optimizer only at the gradient-accumulation boundary)."""

from __future__ import annotations

from typing import Any, Optional

import torch

from compact_dist.training.engine_base import TrainingEngine


class DeepSpeedTrainingEngine(TrainingEngine):
    """Wraps `engine` (deepspeed.initialize's, built by compact_dist.training.engine_setup.
    build_engine)."""

    name = "deepspeed"

    def __init__(self, engine) -> None:
        self.engine = engine
        self.module = engine.module
        self.device = engine.device

    @property
    def optimizer(self):
        return self.engine.optimizer

    @property
    def lr_scheduler(self):
        return self.engine.lr_scheduler

    def train(self) -> None:
        self.engine.train()

    def eval(self) -> None:
        self.engine.eval()

    def forward(self, *args, **kwargs):
        return self.engine(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()  # a micro-step: DeepSpeed only counts it

    def step(self) -> None:
        if not self.engine.is_gradient_accumulation_boundary():
            raise RuntimeError("step() before the step's last micro-batch's backward()")
        self.engine.step()

    @property
    def lr(self) -> float:
        return self.engine.get_lr()[0]

    @property
    def skipped_steps(self) -> int:
        return self.engine.skipped_steps

    @property
    def computes_grad_norm(self) -> bool:
        # ZeRO 1-3 and bf16 wrap the optimizer and compute it; ZeRO-0 fp32 steps it bare
        return hasattr(self.engine.optimizer, "_global_grad_norm")

    def get_global_grad_norm(self) -> Optional[float]:
        return self.engine.get_global_grad_norm()

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict,
                        save_latest: bool = False) -> None:
        self.engine.save_checkpoint(save_dir, tag=tag, client_state=client_state,
                                    save_latest=save_latest)

    def load_checkpoint(self, load_dir: str, tag: str, load_optimizer_states: bool = True,
                        load_lr_scheduler_states: bool = True) -> tuple[Optional[str], Any]:
        return self.engine.load_checkpoint(
            load_dir, tag=tag, load_optimizer_states=load_optimizer_states,
            load_lr_scheduler_states=load_lr_scheduler_states)
