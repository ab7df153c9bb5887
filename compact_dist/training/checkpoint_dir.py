"""What a checkpoint directory holds and which checkpoint a run resumes: files only (no torch,
no process group), so compact-train decides and checks it before any process group exists.

    step_00000100/            a complete checkpoint: every rank wrote its files into
                              step_00000100.partial/, then rank 0 wrote the marker COMPLETE
                              inside and renamed the directory
    step_00000100.partial/    a save in progress, or what a killed save left
    step_00000100.old/        a checkpoint being deleted (rotation) or replaced (a new save
                              of the same step)
    latest                    the tag of the checkpoint saved last, replaced atomically

Scratch directories (`.partial`, `.old`) are removed by the next save. A `step_*` directory
without the marker was not written by this code (or predates the marker): never loaded, and
deleted only when a save of the same step replaces it; except the one `latest` names when it
holds per-rank files (`compact_rank*.pt`): compact_dist before the marker moved `latest` only
after every rank had written, so that one is complete (a legacy checkpoint, resumed). Rotation deletes only complete
checkpoints older, by step, than the one just written.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import socket
from pathlib import Path
from typing import Optional

LATEST = "latest"
COMPLETE = "complete"
PARTIAL, OLD = ".partial", ".old"
_TAG = re.compile(r"^step_(\d{8,})$")
_SCRATCH = re.compile(r"^step_\d{8,}\.(partial|old)$")


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be written or resumed from (one line)."""


def tag_of(step: int) -> str:
    return f"step_{step:08d}"


def step_of(tag: str) -> Optional[int]:
    match = _TAG.match(tag)
    return int(match.group(1)) if match else None


def is_complete(root: Path, tag: str) -> bool:
    return step_of(tag) is not None and (root / tag / COMPLETE).is_file()


def complete_steps(root: Path) -> list[int]:
    """Steps of the complete checkpoints under root, ascending."""
    if not root.is_dir():
        return []
    return sorted(step_of(p.name) for p in root.iterdir() if is_complete(root, p.name))


def unmarked_tags(root: Path) -> list[str]:
    """`step_*` directories without the marker (not written completely by this code)."""
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir()
                  if p.is_dir() and step_of(p.name) is not None and not is_complete(root, p.name))


def scratch_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and _SCRATCH.match(p.name))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def mark_complete(directory: Path, step: int, world_size: int) -> None:
    write_atomic(directory / COMPLETE, json.dumps({"step": step, "world_size": world_size}))


def remove_dir(root: Path, tag: str) -> None:
    """Rename to `.old` (one atomic step out of the checkpoints), then delete."""
    old = root / (tag + OLD)
    shutil.rmtree(old, ignore_errors=True)
    os.rename(root / tag, old)
    shutil.rmtree(old)


def rotate(root: Path, written: int, keep_last: int) -> list[str]:
    """Delete the complete checkpoints older than step `written` beyond the newest `keep_last`
    (the one written counts), never the one `latest` names; returns the tags deleted.
    Checkpoints of later steps (another run's, kept by a resume from an earlier step) stay."""
    older = [s for s in complete_steps(root) if s < written]
    keep = set(older[max(0, len(older) - (keep_last - 1)):]) if keep_last > 1 else set()
    latest, _ = read_latest(root)
    deleted = [tag_of(s) for s in older if s not in keep and tag_of(s) != latest]
    for tag in deleted:
        remove_dir(root, tag)
    return deleted


def check_writable(root: Path, key: str = "checkpoint.dir",
                   error: type = CheckpointError) -> None:
    """Create root and write + remove a probe file in it, or raise `error` with one line
    naming the config `key`."""
    probe = root / f".write_probe.{socket.gethostname()}.{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"probe")
        probe.unlink()
    except OSError as err:
        raise error(f"{key}={str(root)!r} is not a writable directory: "
                    f"{err.strerror or err}") from None


def read_latest(root: Path) -> tuple[Optional[str], Optional[str]]:
    """(tag `latest` names if it is a complete checkpoint, else None; what is wrong with
    `latest` when the tag is None, else None)."""
    pointer = root / LATEST
    if not pointer.is_file():
        return None, "is missing"
    try:
        text = pointer.read_bytes().decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None, "is not a text file"
    if not text:
        return None, "is empty"
    if step_of(text) is None:
        return None, f"names {text[:40]!r}, not a step_NNNNNNNN tag"
    if not is_complete(root, text) and not is_legacy_complete(root, text):
        return None, f"names {text}, which is not a complete checkpoint"
    return text, None


def is_legacy_complete(root: Path, tag: str) -> bool:
    """A checkpoint written before the marker existed: `latest` names it (only then is this
    asked) and it holds the per-rank files, written before the old code moved `latest`."""
    return (root / tag).is_dir() and any((root / tag).glob("compact_rank*.pt"))


@dataclasses.dataclass
class Choice:
    """The checkpoint to resume (None: start at step 0) and the line to print about it."""

    tag: Optional[str]
    note: Optional[str] = None


def choose(root: Path, load_step: Optional[int] = None) -> Choice:
    """`load_step`'s checkpoint, else the one `latest` names, else (with a warning) the newest
    complete one. Raises CheckpointError when load_step's is not complete, or when the
    directory shows checkpoints (`latest`, `step_*` directories) of which none is complete:
    a run never silently starts again at step 0 next to checkpoints."""
    steps = complete_steps(root)
    if load_step is not None:
        if load_step not in steps:
            have = ", ".join(tag_of(s) for s in steps) or "none"
            raise CheckpointError(f"checkpoint.load_step={load_step}: {root} has no complete "
                                  f"checkpoint {tag_of(load_step)} (complete: {have})")
        return Choice(tag_of(load_step))
    tag, problem = read_latest(root)
    if tag is not None:
        return Choice(tag)
    if steps:
        newest = tag_of(steps[-1])
        return Choice(newest, f"warning: {root / LATEST} {problem}: resuming from {newest}, "
                              "the newest complete checkpoint")
    unmarked = unmarked_tags(root)
    if unmarked or problem != "is missing":
        found = ", ".join(unmarked[:3]) + (" ..." if len(unmarked) > 3 else "")
        raise CheckpointError(
            f"{root} has no complete checkpoint to resume ({LATEST} {problem}"
            + (f"; without the {COMPLETE!r} marker: {found}" if unmarked else "")
            + "): set checkpoint.resume=false or another checkpoint.dir to start at step 0")
    scratch = [p.name for p in scratch_dirs(root)] if root.is_dir() else []
    if scratch:
        return Choice(None, f"{root} holds only what killed saves left ({', '.join(scratch)}): "
                            "starting at step 0")
    return Choice(None)
