"""Resuming a compact-train run: which checkpoint, whether it fits the config, and which
optimizer settings the run then uses.

`plan` runs on every rank before any process group exists (files only): checkpoint.dir must
be writable (created, a probe file written and removed), the checkpoint to resume is chosen
(compact_dist.training.checkpoint_dir.choose: load_step's, else `latest`'s, else the newest
complete one with a warning), and its compact_run.json must agree with the config on every
setting that fixes the checkpoint's tensors (`LAYOUT`, the compression settings): otherwise
one CheckpointError line lists each difference. Optimizer settings (`OPTIMIZER`) may change:
the run uses its config's values; the checkpoint gives Adam's moments and step count and the
schedule's step (Megatron-LM's --override-opt_param-scheduler); one line lists the changes.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Optional

from compact_dist.training.checkpoint_dir import CheckpointError, check_writable, choose
from compact_dist.training.checkpoint_dir import complete_steps, tag_of
from compact_dist.training.run_files import RUN_FILE

LAYOUT = ("model.num_layers", "model.hidden_size", "model.num_attention_heads",
          "model.num_query_groups", "model.ffn_hidden_size", "model.position_embedding",
          "parallel.tensor_model_parallel_size", "train.zero_stage", "train.engine",
          "data.tokenizer",
          "data.vocab_size", "compression.enabled")
COMPRESSION = ("compression.mode", "compression.ratio", "compression.rank",
               "compression.ratios", "compression.layers", "compression.base_dtype",
               "compression.projection", "compression.row_parallel_blocks")
OPTIMIZER = ("optim.lr", "optim.min_lr", "optim.warmup_steps", "optim.beta1", "optim.beta2",
             "optim.weight_decay", "optim.grad_clip", "train.train_steps")
_ABSENT = "(absent)"


@dataclasses.dataclass
class Resume:
    """tag: the checkpoint to load (None: start at step 0); notes: lines rank 0 prints."""

    tag: Optional[str] = None
    notes: list[str] = dataclasses.field(default_factory=list)


def _values(tree: dict, keys: tuple[str, ...]) -> dict[str, Any]:
    """Config values by dotted key, resolved where a default depends on other values."""
    from compact_dist.training.train_config import ModelConfig

    out = {}
    for key in keys:
        node: Any = tree
        for part in key.split("."):
            node = node.get(part, _ABSENT) if isinstance(node, dict) else _ABSENT
        out[key] = sorted(node) if key == "compression.layers" and node != _ABSENT else node
    model = tree.get("model", {})
    if "model.num_query_groups" in out:
        out["model.num_query_groups"] = (model.get("num_query_groups")
                                         or model.get("num_attention_heads"))
    if out.get("train.engine") == _ABSENT:  # written before train.engine existed
        out["train.engine"] = "deepspeed"
    if "model.ffn_hidden_size" in out:
        out["model.ffn_hidden_size"] = ModelConfig.model_construct(**model).ffn
    return out


def differences(saved: dict, config: dict, keys: tuple[str, ...]) -> list[str]:
    """'key old -> new' for each key whose value differs between two config trees."""
    old, new = _values(saved, keys), _values(config, keys)
    return [f"{key} {json.dumps(old[key])} -> {json.dumps(new[key])}"
            for key in keys if old[key] != new[key]]


def _saved_config(tag_dir: Path) -> dict:
    path = tag_dir / RUN_FILE
    try:
        return json.loads(path.read_text())["config"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path}: cannot read the run's config "
                              f"({type(err).__name__}: {err})") from None


def plan(cfg) -> Resume:
    """What a run of `cfg` (a TrainConfig) resumes; raises CheckpointError (one line)."""
    c = cfg.checkpoint
    if not c.dir:
        return Resume()
    root = Path(c.dir)
    check_writable(root)
    if not c.resume:
        steps = complete_steps(root)
        if not steps:
            return Resume()
        return Resume(None, [f"checkpoint.resume=false: starting at step 0; this run's saves "
                             f"replace or rotate out the checkpoints in {root} "
                             f"({tag_of(steps[0])} .. {tag_of(steps[-1])})"])
    choice = choose(root, c.load_step)
    notes = [choice.note] if choice.note else []
    if choice.tag is None:
        return Resume(None, notes)
    saved, config = _saved_config(root / choice.tag), cfg.model_dump(mode="json")
    keys = LAYOUT + (COMPRESSION if config["compression"]["enabled"]
                     or saved.get("compression", {}).get("enabled") else ())
    fixed = differences(saved, config, keys)
    if fixed:
        raise CheckpointError(
            f"cannot resume from {root / choice.tag}: it was written with other settings "
            f"(checkpoint -> config): {', '.join(fixed)}; use the checkpoint's values, or "
            "checkpoint.resume=false or another checkpoint.dir to start at step 0")
    changed = differences(saved, config, OPTIMIZER)
    if changed:
        notes.append(f"resuming {choice.tag} with other optimizer settings (checkpoint -> "
                     f"config): {', '.join(changed)}; this run uses the config's values "
                     "(Adam's moments and step count and the schedule's step come from the "
                     "checkpoint)")
    return Resume(choice.tag, notes)


def same_on_every_rank(tag: Optional[str]) -> None:
    """Collective over the world group: every rank chose the same checkpoint (a checkpoint.dir
    on node-local disks shows each node other files)."""
    import torch.distributed as dist

    tags: list = [None] * dist.get_world_size()
    dist.all_gather_object(tags, tag)
    if len(set(tags)) > 1:
        raise CheckpointError(
            f"the ranks found different checkpoints to resume ({dict(enumerate(tags))}): "
            "checkpoint.dir must be one directory every node sees")


def load_with_run_settings(engine, directory: str, tag: str) -> dict:
    """compact_dist.training.checkpoint.load_checkpoint of a training engine
    (compact_dist.training.engine_base.TrainingEngine), keeping this run's optimizer
    hyperparameters: torch's Optimizer.load_state_dict brings back the checkpoint's param-group
    values (lr, betas, weight decay, ...) and LambdaLR's load_state_dict its base rates. Both
    are put back to the values the engine was built with, and each group's rate to the run's
    schedule at the checkpoint's scheduler step. Returns the client state."""
    from torch.optim.lr_scheduler import LambdaLR

    from compact_dist.training.checkpoint import load_checkpoint

    groups = engine.optimizer.param_groups
    settings = [{k: v for k, v in g.items() if k != "params"} for g in groups]
    state = load_checkpoint(engine, directory, tag)
    groups = engine.optimizer.param_groups
    if len(groups) != len(settings):
        raise CheckpointError(f"{Path(directory) / tag}: {len(groups)} optimizer parameter "
                              f"groups in the checkpoint, {len(settings)} in this run")
    for group, values in zip(groups, settings):
        group.update(values)
    scheduler = engine.lr_scheduler
    if scheduler is not None:
        if not isinstance(scheduler, LambdaLR):
            raise TypeError(f"load_with_run_settings handles LambdaLR, not {type(scheduler)}")
        scheduler.base_lrs = [g["initial_lr"] for g in groups]
        rates = [base * fn(scheduler.last_epoch)
                 for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
        for group, rate in zip(groups, rates):
            group["lr"] = rate
        scheduler._last_lr = rates
    return state
