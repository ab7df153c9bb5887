"""torch FSDP2 (`fully_shard`, compact_dist.fsdp) behind the training-engine interface
(compact_dist.training.engine_base): a torch optimizer over the sharded parameters, gradient
accumulation, the global gradient norm and clipping over FSDP2 x Megatron TP
(compact_dist.fsdp.grad_norm), and checkpoints through torch.distributed.checkpoint.

Checkpoint layout in save_dir/tag (inside compact_dist.training.checkpoint's atomic save):
    fsdp2_tp{T}/        torch.distributed.checkpoint (DCP) of the model and optimizer state
                        dicts (torch.distributed.checkpoint.state_dict: sharded DTensors by
                        parameter name), one per TP rank T, written by its data-parallel group
                        (Megatron's TP shards share names: one DCP checkpoint each)
    fsdp2_extra_rank{R}.pt
                        rank R: the modules' extra states (a compact layer's projection: its
                        epoch, seeds and data-aware basis, None or a tensor, which DCP's
                        load plan cannot take in place of each other)
    fsdp2_engine.pt     rank 0: the client state and the learning-rate scheduler's state
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import torch

from compact_dist.training.engine_base import TrainingEngine

ENGINE_FILE = "fsdp2_engine.pt"
EXTRA_STATE = "_extra_state"


def _extra_file(root: Path) -> Path:
    import torch.distributed as dist

    return root / f"fsdp2_extra_rank{dist.get_rank()}.pt"


def _dcp_dir(root: Path) -> Path:
    from megatron.core import parallel_state as ps

    return root / f"fsdp2_tp{ps.get_tensor_model_parallel_rank():02d}"


class FSDP2TrainingEngine(TrainingEngine):
    """`module`: the model after compact_dist.fsdp.shard.shard_model; `torch_optimizer`:
    built over its (sharded) parameters (compact_dist.core.subspace.optimizer_param_groups);
    `tp_duplicates`: compact_dist.fsdp.shard.tensor_parallel_duplicates, read before
    sharding; grad_clip 0: no clipping."""

    name = "fsdp2"

    def __init__(self, module: torch.nn.Module, torch_optimizer: torch.optim.Optimizer,
                 lr_scheduler, gradient_accumulation_steps: int, grad_clip: float,
                 device: torch.device, tp_duplicates: set[str]) -> None:
        self.module = module
        self._optimizer = torch_optimizer
        self.lr_scheduler = lr_scheduler
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.grad_clip = grad_clip
        self.device = device
        self.tp_duplicates = tp_duplicates
        self._micro_batches = 0
        self._skipped = 0
        self._norm: Optional[float] = None

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self._optimizer

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        """FSDP2 reduce-scatters (averages over the data-parallel group) in each backward;
        the shards accumulate over the step's micro-batches."""
        if self.gradient_accumulation_steps > 1:
            loss = loss / self.gradient_accumulation_steps
        loss.backward()
        self._micro_batches += 1

    def step(self) -> None:
        """Clip to grad_clip by the global norm, step and advance the schedule; a non-finite
        norm skips the update and the schedule's step (as DeepSpeed's engine does;
        compact-train then stops with one line)."""
        from compact_dist.fsdp.grad_norm import clip_grads, global_grad_norm

        if self._micro_batches != self.gradient_accumulation_steps:
            raise RuntimeError(f"step() after {self._micro_batches} micro-batches, not "
                               f"{self.gradient_accumulation_steps}")
        self._micro_batches = 0
        params = [p for g in self._optimizer.param_groups for p in g["params"]]
        norm = global_grad_norm(self.module.named_parameters(), self.tp_duplicates)
        self._norm = norm.item()
        if math.isfinite(self._norm):
            clip_grads(params, norm, self.grad_clip)
            self._optimizer.step()
            if self.lr_scheduler is not None:
                self.lr_scheduler.step()
        else:  # as DeepSpeed's engine (_take_model_step): the schedule does not advance
            self._skipped += 1
        self._optimizer.zero_grad(set_to_none=True)

    @property
    def lr(self) -> float:
        return self._optimizer.param_groups[0]["lr"]

    @property
    def skipped_steps(self) -> int:
        return self._skipped

    @property
    def computes_grad_norm(self) -> bool:
        return True

    def get_global_grad_norm(self) -> Optional[float]:
        return self._norm

    # ------------------------------------------------------------------------ checkpoints
    def _state_dicts(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model, optim = get_state_dict(self.module, self._optimizer)
        extra = {k: model.pop(k) for k in list(model) if k.endswith(EXTRA_STATE)}
        return {"model": model, "optim": optim}, extra

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict,
                        save_latest: bool = False) -> None:
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp
        from megatron.core import parallel_state as ps

        root = Path(save_dir) / tag
        target = _dcp_dir(root)
        target.mkdir(parents=True, exist_ok=True)
        state, extra = self._state_dicts()
        dcp.save(state, checkpoint_id=str(target), process_group=ps.get_data_parallel_group())
        torch.save(extra, _extra_file(root))
        if dist.get_rank() == 0:
            scheduler = None if self.lr_scheduler is None else self.lr_scheduler.state_dict()
            torch.save({"client_state": client_state, "lr_scheduler": scheduler,
                        "skipped_steps": self._skipped}, root / ENGINE_FILE)

    def load_checkpoint(self, load_dir: str, tag: str, load_optimizer_states: bool = True,
                        load_lr_scheduler_states: bool = True) -> tuple[Optional[str], Any]:
        """Collective (world group); (None, None) on every rank where any rank lacks its
        files (a run on more ranks than wrote the checkpoint)."""
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp
        from megatron.core import parallel_state as ps
        from torch.distributed.checkpoint.state_dict import set_state_dict

        if not (load_optimizer_states and load_lr_scheduler_states):
            raise ValueError("the FSDP2 engine loads model, optimizer and schedule together")
        root = Path(load_dir) / tag
        found = all(p.exists() for p in (root / ENGINE_FILE, _dcp_dir(root), _extra_file(root)))
        agreed = torch.tensor(float(found), device=self.device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN)  # no rank left alone in dcp.load
        if not agreed.item():
            return None, None  # compact_dist.training.checkpoint raises CheckpointError
        state, _ = self._state_dicts()
        dcp.load(state, checkpoint_id=str(_dcp_dir(root)),
                 process_group=ps.get_data_parallel_group())
        state["model"].update(torch.load(_extra_file(root), weights_only=False))
        set_state_dict(self.module, self._optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])
        engine = torch.load(root / ENGINE_FILE, weights_only=False)
        if self.lr_scheduler is not None:
            self.lr_scheduler.load_state_dict(engine["lr_scheduler"])
        self._skipped = engine["skipped_steps"]
        return str(root), engine["client_state"]
