"""A compact-train checkpoint read back on the CPU, TP shard by TP shard, without a process
group, a GPU or a Megatron model (compact-export's input, compact_dist/tools/export.py).

What is read (one checkpoint tag, `compact_dist.training.checkpoint` layout):
- per TP rank t, DeepSpeed's files `*mp_rank_{t:02d}_*`. The module state holds every tensor
  at ZeRO 0-2 (trainable ones in the training dtype) and the layers' extra state (projection
  epoch, data-aware basis P) at every stage. Where ZeRO optimizer files exist (ZeRO 1-3), the
  trainable tensors are taken from their fp32 masters and the frozen W0 from DeepSpeed's
  frozen-parameter fragments (ZeRO-3: partitions over DP), merged by DeepSpeed's own
  `deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint` on a view of the
  tag directory holding only that TP rank's files. ZeRO-0 with bf16 (DeepSpeed's
  BF16_Optimizer, no ZeRO partitions) is read from the module's bf16 weights;
- compact_rank{R}.pt of the rank with TP rank t and DP rank 0: per compact layer its module
  name, its `projection.Projection` (seed, layer id, blocks of this TP rank), mode and update
  scale.
- train.engine=fsdp2 instead of DeepSpeed's files: fsdp2_tp{t:02d}/ (the model and optimizer
  as torch.distributed.checkpoint, trainable tensors fp32) and fsdp2_extra_rank{R}.pt (the
  extra states), training/engine_fsdp.py.
(The run's config and tokenizer, compact_run.json: compact_dist/training/run_files.py.)

Per compact layer and TP shard: W_eff = W0 + update_scale * A P^T (subspace mode; the
trainable W itself in unbiased mode), with P the data-aware basis of the extra state or the
seeded Gaussian blocks of the layer's projection epoch, through `projection.unproject`, the
code the layer's own `effective_weight` / `merge_subspace` use. A is its fp32 master
(ZeRO 1-3): zero after a merge in fp32; in a bf16 run the master keeps the bf16 rounding
residual the next step folds in, so the export includes it (a difference below bf16
resolution from the forward at the save).
"""

from __future__ import annotations

import contextlib
import glob
import io
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Optional

import torch

from compact_dist.training.checkpoint_dir import LATEST
from compact_dist.training.run_files import RUN_FILE


def resolve_tag_dir(checkpoint_dir: str | Path, tag: Optional[str]) -> Path:
    """The tag directory to read: `tag` under checkpoint_dir, else the one its `latest` names,
    or checkpoint_dir itself when it is a tag directory (holds compact_run.json)."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        raise ValueError(f"checkpoint directory {str(root)!r} does not exist")
    if (root / RUN_FILE).is_file() and tag is None:
        return root  # a tag directory itself
    if tag is None:
        pointer = root / LATEST
        if not pointer.is_file():
            raise ValueError(f"{str(root)!r} has no {LATEST!r} file and no {RUN_FILE}: not a "
                             "compact-train checkpoint directory (or pass --tag)")
        tag = pointer.read_text().strip()
    tag_dir = root / tag
    if not tag_dir.is_dir():
        raise ValueError(f"checkpoint tag {tag!r} is missing in {str(root)!r}")
    return tag_dir


def _load(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=False)


def tp_module_state(tag_dir: Path, tp_rank: int) -> dict[str, Any]:
    """The module state of one TP rank, every tensor whole (TP-local shape), trainable ones
    from the fp32 masters where ZeRO optimizer files exist; extra states included."""
    if (tag_dir / f"fsdp2_tp{tp_rank:02d}").is_dir():
        return _fsdp2_module_state(tag_dir, tp_rank)
    mp = f"mp_rank_{tp_rank:02d}"
    model_files = sorted(glob.glob(str(tag_dir / f"*{mp}_model_states.pt")))
    optim_files = sorted(glob.glob(str(tag_dir / f"*zero_pp_rank_*_{mp}_optim_states.pt")))
    if not model_files:
        raise ValueError(f"{str(tag_dir)!r} has no DeepSpeed model states of TP rank {tp_rank} "
                         f"(*{mp}_model_states.pt)")
    state = dict(_load(Path(model_files[0]))["module"])
    if optim_files:
        first = torch.load(optim_files[0], map_location="cpu", weights_only=False,
                           mmap=True)["optimizer_state_dict"]  # a peek: nothing read in full
        if "zero_stage" in first:  # ZeRO 1-3 (BF16_Optimizer at stage 0 has no partitions)
            state.update(_zero_fp32_state(tag_dir, model_files + optim_files))
    return state


def _fsdp2_module_state(tag_dir: Path, tp_rank: int) -> dict[str, Any]:
    """train.engine=fsdp2 (compact_dist/training/engine_fsdp.py): the model part of the TP
    rank's torch.distributed.checkpoint (fsdp2_tp{t}/, read whole without a process group)
    and the extra states of its rank of DP rank 0 (fsdp2_extra_rank{R}.pt)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    directory = str(tag_dir / f"fsdp2_tp{tp_rank:02d}")
    stored = dcp.FileSystemReader(directory).read_metadata().state_dict_metadata
    model = {key[len("model."):]: torch.empty(meta.size, dtype=meta.properties.dtype)
             for key, meta in stored.items()
             if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)}
    with warnings.catch_warnings():  # "torch.distributed is ... uninitialized": no_dist
        warnings.simplefilter("ignore", UserWarning)
        dcp.load({"model": model}, checkpoint_id=directory, no_dist=True)
    for path in sorted(tag_dir.glob("compact_rank*.pt")):
        ranks = _load(path)
        if (ranks.get("tp_rank"), ranks.get("dp_rank")) == (tp_rank, 0):
            return {**model, **_load(tag_dir / path.name.replace("compact_rank",
                                                                 "fsdp2_extra_rank"))}
    raise ValueError(f"{str(tag_dir)!r} has no compact_rank*.pt of DP rank 0 and TP rank "
                     f"{tp_rank}")


def _zero_fp32_state(tag_dir: Path, files: list[str]) -> dict[str, torch.Tensor]:
    """DeepSpeed's consolidation (fp32 masters of trainable parameters, frozen parameters from
    their fragments) over a directory view that holds only one TP rank's files."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with tempfile.TemporaryDirectory() as view:
        (Path(view) / "tag").mkdir()
        for f in files:
            os.symlink(os.path.abspath(f), Path(view) / "tag" / Path(f).name)
        quiet = io.StringIO()  # its progress prints and bars
        with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            merged = get_fp32_state_dict_from_zero_checkpoint(view, tag="tag")
    return {k: v.contiguous() for k, v in merged.items()}


def compact_layers_by_tp_rank(tag_dir: Path, tp: int) -> list[dict[str, dict]]:
    """Per TP rank, {module name: entry} of its compact layers (compact_rank*.pt of the rank
    with that TP rank and DP rank 0; the DP replicas hold the same projections)."""
    found: dict[int, dict[str, dict]] = {}
    for path in sorted(tag_dir.glob("compact_rank*.pt")):
        state = _load(path)
        if "tp_rank" not in state:
            raise ValueError(f"{str(path)!r} does not record its TP rank and layer projections "
                             "(written by an older compact-train)")
        if state["dp_rank"] == 0:
            found[state["tp_rank"]] = {entry["name"]: entry for entry in state["layers"]}
    missing = [t for t in range(tp) if t not in found]
    if missing:
        raise ValueError(f"{str(tag_dir)!r} has no compact_rank*.pt of DP rank 0 and TP "
                         f"rank(s) {missing}")
    return [found[t] for t in range(tp)]


@torch.no_grad()
def effective_weight(state: dict, name: str, layer: Optional[dict]) -> torch.Tensor:
    """fp32 W_eff of one TP shard of `name` (a linear's module name): W0 + s A P^T (W0: the
    weight, plus its low word for base_dtype bf16_pair)."""
    from compact_dist.core.projection import Projection, unproject

    weight = state[f"{name}.weight"].float()
    low = state.get(f"{name}.weight_lo")
    if low is not None:
        weight = weight + low.float()
    factor = state.get(f"{name}.subspace_factor")
    if factor is None or layer is None or layer["mode"] != "subspace":
        return weight
    extra = state.get(f"{name}._extra_state") or {}
    basis = extra.get("basis")
    epoch = int(extra.get("projection_epoch", layer["epoch"]))
    blocks = (basis.float() if basis is not None
              else Projection(**layer["projection"]).blocks(epoch, torch.device("cpu"),
                                                            torch.float32))
    if factor.shape != (weight.shape[0], blocks.shape[0] * blocks.shape[2]):
        raise ValueError(f"{name}: A of shape {tuple(factor.shape)} does not fit W0 "
                         f"{tuple(weight.shape)} and P blocks {tuple(blocks.shape)}")
    return weight + layer["scale"] * unproject(factor.float(), blocks)
