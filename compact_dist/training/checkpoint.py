"""Atomic, resumable training checkpoints around a training engine's own checkpoint files,
for every engine behind compact_dist.training.engine_base.TrainingEngine (DeepSpeed's:
training/engine_deepspeed.py; FSDP2's: training/engine_fsdp.py, which documents its files).
Only the engine's `save_checkpoint` / `load_checkpoint` know the engine; the rest is torch and
the directory rules of compact_dist.training.checkpoint_dir.

Layout under `dir` (names and the choice of the checkpoint to resume: checkpoint_dir):
    step_00000100/          the engine's checkpoint (module, optimizer, scheduler, client
                            state: step, data position, subspace stepper); DeepSpeed's
                            engine: module, ZeRO optimizer partitions
    step_00000100/compact_rank{R}.pt
                            per-rank state the engine does not keep: RNG states (CPU, CUDA,
                            Megatron tracker), the rank's TP / DP rank, per compact layer its
                            module name, projection (seeds, shape, blocks), mode, update
                            scale, epoch and whether A was merged (zero). The frozen W0
                            bases, which merges change, are the engine's: DeepSpeed's module
                            state at ZeRO 0-1, and at ZeRO 2-3 the frozen-parameter fragments
                            every rank saves and restores (ZeRO-3: its partitions); FSDP2's
                            sharded model state dict
    step_00000100/compact_run.json, tokenizer.json
                            the resolved run config and the tokenizer (compact-train writes
                            them; compact_dist.tools.export reads them)
    step_00000100/complete  the marker: rank 0 writes it after every rank finished writing
                            into step_00000100.partial/, then renames that directory
    latest                  name of the newest complete checkpoint, replaced atomically
                            (os.replace) after the rename; a save killed midway leaves
                            `latest` and every complete checkpoint as they were.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import random as mpu_random

from compact_dist.core.backend_registry import backend_for
from compact_dist.core.subspace import compact_layers
from compact_dist.training import checkpoint_dir
from compact_dist.training.engine_base import TrainingEngine

LATEST = checkpoint_dir.LATEST


def _rank_state(model: torch.nn.Module) -> dict[str, Any]:
    from megatron.core import parallel_state as ps

    names = {id(m): name for name, m in model.named_modules()}
    layers = []
    for layer in compact_layers(model):
        # name, projection (the fields of projection.Projection), mode and scale let
        # compact_dist.tools.export rebuild W_eff = W0 + scale A P^T without building the model
        layers.append({"epoch": layer.projection_epoch, "merges": layer.merge_count,
                       "factor_zero": layer.subspace_factor is not None and layer.factor_is_zero,
                       "name": names.get(id(layer)), "mode": layer.compression.mode,
                       "scale": layer.merge_scale,
                       "projection": dataclasses.asdict(layer.projection)})
    return {
        "tp_rank": ps.get_tensor_model_parallel_rank(),
        "dp_rank": ps.get_data_parallel_rank(),
        "cpu_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": {k: v.clone() for k, v in mpu_random.get_cuda_rng_tracker().get_states().items()},
        "layers": layers,
    }


def _restore_rank_state(model: torch.nn.Module, state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu_rng"])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng"])
    mpu_random.get_cuda_rng_tracker().set_states(dict(state["tracker"]))
    layers = compact_layers(model)
    if len(layers) != len(state["layers"]):
        raise ValueError("checkpoint was written by a model with other compact layers")
    for layer, entry in zip(layers, state["layers"]):
        layer.projection_epoch, layer.merge_count = entry["epoch"], entry["merges"]
        if layer.subspace_factor is None:
            continue
        if entry.get("factor_zero"):
            # back to the state the merge before the save left: every module copy of A zero
            # (a bf16 run's fp32 masters keep only the rounding residual, restored by the
            # engine). The engine writes A on load behind the layer's back (DeepSpeed through
            # `.data`); A was zero at the save, so this makes sure it is, and lets forward
            # skip the A P^T term again
            backend_for(None, [layer.subspace_factor]).zero_factor(layer)
        else:
            layer.mark_factor_written()


def save_checkpoint(engine: TrainingEngine, directory: str, step: int, client_state: dict,
                    keep_last: int,
                    write_run_files: Optional[Callable[[Path], None]] = None) -> str:
    """Collective: every rank calls. Returns the tag written. Every rank writes into
    `step_N.partial/`; rank 0 then writes the marker, renames it `step_N/` (replacing an
    earlier save of step N), points `latest` at it and deletes the complete checkpoints older
    than step N beyond the newest `keep_last` (checkpoint_dir.rotate). write_run_files(tag
    directory): called on rank 0 before the rename, for files that describe the run (the
    resolved config and the tokenizer, compact_dist.training.run_files.write_run_files)."""
    root = Path(directory)
    tag = checkpoint_dir.tag_of(step)
    partial = tag + checkpoint_dir.PARTIAL
    if dist.get_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        for leftover in checkpoint_dir.scratch_dirs(root):  # of killed saves and rotations
            shutil.rmtree(leftover)
    dist.barrier()
    engine.save_checkpoint(str(root), tag=partial, client_state=client_state, save_latest=False)
    rank_file = root / partial / f"compact_rank{dist.get_rank()}.pt"
    tmp = rank_file.with_suffix(".tmp")
    torch.save(_rank_state(engine.module), tmp)
    os.replace(tmp, rank_file)
    if write_run_files is not None and dist.get_rank() == 0:
        write_run_files(root / partial)
    dist.barrier()
    if dist.get_rank() == 0:
        checkpoint_dir.mark_complete(root / partial, step, dist.get_world_size())
        replaced = root / (tag + checkpoint_dir.OLD)
        if (root / tag).exists():
            os.rename(root / tag, replaced)
        os.rename(root / partial, root / tag)
        checkpoint_dir.fsync_dir(root)
        checkpoint_dir.write_atomic(root / checkpoint_dir.LATEST, tag)
        shutil.rmtree(replaced, ignore_errors=True)
        checkpoint_dir.rotate(root, step, keep_last)
    dist.barrier()
    return tag


def latest_tag(directory: str) -> Optional[str]:
    """The complete checkpoint `latest` names, or None."""
    return checkpoint_dir.read_latest(Path(directory))[0]


def load_checkpoint(engine: TrainingEngine, directory: str, tag: str) -> dict:
    """Collective. Loads checkpoint `tag` (checkpoint_dir.choose picks it); returns its client
    state. Raises CheckpointError when the engine finds no checkpoint of its own there."""
    _, client_state = engine.load_checkpoint(
        directory, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if client_state is None:
        raise checkpoint_dir.CheckpointError(
            f"{Path(directory) / tag}: the {engine.name} engine found no checkpoint of its "
            "own to load")
    state = torch.load(
        Path(directory) / tag / f"compact_rank{dist.get_rank()}.pt", weights_only=False
    )
    _restore_rank_state(engine.module, state)
    dist.barrier()
    return client_state
