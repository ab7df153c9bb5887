"""Checkpoints are never lost and a run never continues silently wrong: atomic saves, rotation
by step, `latest` fallback, checkpoint.load_step, resume checks against the checkpoint's
config, the optimizer settings a resumed run uses, Ctrl-C, and the stop on a non-finite loss
or gradient norm. One spawned process runs the training scenarios (`runs`); the checks that
happen before any process group run here, on files only."""

import json
import math
import os
import re
import signal
import time
from pathlib import Path

import pytest
import torch

from distributed import run_distributed_raw
from test_train import small

PLANTED = "step_99999999"  # a newer-named step_* directory (old code: a killed save's)


def _scenario(rank, tmp, out):
    """The stages of `runs`, in one process (one start-up). Each stage records its history
    (or the exception it raised), what it printed, and the (lr, weight decay, betas, is the
    subspace group) of every param group the torch optimizer steps."""
    import contextlib
    import io

    from megatron.core import parallel_state
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    import compact_dist.training.train as train
    from compact_dist.core.moments import SUBSPACE_GROUP_KEY
    from compact_dist.training.logger import Logger
    from compact_dist.training.train_config import load_train_config

    tmp, results, groups = Path(tmp), {}, []
    ckpt = tmp / "ckpt"

    def record(optimizer, args, kwargs):  # ZeRO 1-2 step one group per call
        groups.extend((g["lr"], g["weight_decay"], list(g["betas"]),
                       bool(g.get(SUBSPACE_GROUP_KEY))) for g in optimizer.param_groups)

    register_optimizer_step_pre_hook(record)
    logger_step = Logger.step

    def stage(name, overrides, sigint_at=None, entry="run"):
        def step(logger, s, scalars, line, **kwargs):
            if s == sigint_at:
                os.kill(os.getpid(), signal.SIGINT)
            return logger_step(logger, s, scalars, line, **kwargs)

        Logger.step = step
        groups.clear()
        printed, result = io.StringIO(), {}
        try:
            with contextlib.redirect_stdout(printed):
                if entry == "main":
                    train.main(overrides)
                else:
                    result = train.run(load_train_config(None, overrides))
        except BaseException as err:  # KeyboardInterrupt, SystemExit included
            result = {"error": f"{type(err).__name__}: {err}"}
        text = re.sub(r"^\[[\d :-]+\] ", "", printed.getvalue(), flags=re.M)  # timestamps
        results[name] = {**result, "printed": text, "groups": list(groups)}
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()

    common = small(tmp, f"checkpoint.dir={ckpt}", "checkpoint.save_interval=2")
    # A: Ctrl-C at step 3 of 4 (keep_last 1: step_2 rotated out by step_3)
    stage("sigint", common + ["checkpoint.keep_last=1"], sigint_at=3)
    # B: a newer-named directory and a killed save's leftover; resume at step 3 with other
    # optimizer settings, 3 more steps, saves at 4 and 6, keep_last 1
    (ckpt / PLANTED).mkdir(parents=True)
    (ckpt / PLANTED / "junk").write_text("x")
    (ckpt / "step_00000005.partial").mkdir()
    changed = ["optim.lr=1e-3", "optim.beta2=0.99", "optim.weight_decay=0.05"]
    stage("resumed", common + changed + ["train.train_steps=6", "checkpoint.keep_last=1"])
    results["files_after_resumed"] = sorted(p.name for p in ckpt.iterdir())
    # C: `latest` truncated: the newest complete checkpoint (step_6), with a warning
    (ckpt / "latest").write_bytes(b"step_000")
    stage("truncated", common + changed + ["train.train_steps=7", "checkpoint.keep_last=2"])
    # D: checkpoint.load_step=6 while `latest` names step_7 (its save replaces step_7)
    stage("load_step", common + changed + ["train.train_steps=7", "checkpoint.keep_last=2",
                                           "checkpoint.load_step=6"])
    # E, F: Megatron's NaN repro (lr 1e4, no clipping): ZeRO-0 (norm from our optimizer hook)
    # through run(), ZeRO-1 (DeepSpeed's norm) through the CLI's main()
    nan = ["optim.lr=1e4", "optim.min_lr=0", "optim.grad_clip=0", "train.train_steps=8",
           "checkpoint.save_interval=2", "checkpoint.keep_last=1"]
    stage("nan_zero0", small(tmp, f"checkpoint.dir={tmp / 'nan0'}", "train.zero_stage=0", *nan))
    stage("nan_zero1", small(tmp, f"checkpoint.dir={tmp / 'nan1'}", *nan), entry="main")
    Path(out).write_text(json.dumps(results))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("safety")
    run_distributed_raw(_scenario, 1, str(tmp), str(tmp / "out.json"))
    return tmp, json.loads((tmp / "out.json").read_text())


def test_sigint_finishes_the_step_and_checkpoints(runs):
    tmp, got = runs
    a = got["sigint"]
    assert "error" not in a, a
    assert a["stopped_early"] is True and a["step"] == 3, a
    assert "stopped by SIGINT after step 3" in a["printed"]
    assert got["resumed"]["printed"].count("resumed from step 3") == 1


def test_rotation_keeps_the_checkpoint_just_written_and_cleans_killed_saves(runs):
    """keep_last=1 next to a newer-named directory: the old rotation (tags sorted by name)
    deleted the checkpoint it had just written, and the next run started at step 0."""
    tmp, got = runs
    b = got["resumed"]
    assert "error" not in b, b
    assert len(b["losses"]) == 3 and b["step"] == 6
    assert got["files_after_resumed"] == sorted(["latest", PLANTED, "step_00000006",
                                                 "zero_to_fp32.py", "zero_to_torch.py"])
    assert (tmp / "ckpt" / PLANTED / "junk").is_file()  # not ours: never deleted


def test_truncated_latest_falls_back_to_the_newest_complete_checkpoint(runs):
    tmp, got = runs
    c = got["truncated"]
    assert "error" not in c, c
    warning = (f"warning: {tmp / 'ckpt' / 'latest'} names 'step_000', not a step_NNNNNNNN "
               "tag: resuming from step_00000006, the newest complete checkpoint")
    assert warning in c["printed"].splitlines(), c["printed"]
    assert len(c["losses"]) == 1 and c["step"] == 7  # not a restart from step 0


def test_load_step_resumes_that_step(runs):
    tmp, got = runs
    c, d = got["truncated"], got["load_step"]
    assert "error" not in d, d
    assert re.search(r"^resumed from step 6 in \S+: loaded checkpoint \S+/step_00000006 in "
                     r"\d+\.\d\d s$", d["printed"], re.M), d["printed"]  # path and seconds
    assert d["losses"] == pytest.approx(c["losses"], rel=1e-6)  # the same step 7 again
    ckpt = tmp / "ckpt"
    assert (ckpt / "latest").read_text() == "step_00000007"
    assert sorted(p.name for p in ckpt.glob("step_0*")) == ["step_00000006", "step_00000007"]


def test_resume_uses_the_new_optimizer_settings_and_says_so(runs):
    """The checkpoint was written with lr 2e-3, beta2 0.95, weight decay 0.1 over 4 steps;
    the resumed run's config says 1e-3, 0.99, 0.05 over 6. Every optimizer step after the
    resume uses the config's values and its schedule at the resumed step."""
    from compact_dist.training.engine_setup import lr_lambda
    from compact_dist.training.train_config import load_train_config

    tmp, got = runs
    b = got["resumed"]
    line = ("resuming step_00000003 with other optimizer settings (checkpoint -> config): "
            "optim.lr 0.002 -> 0.001, optim.beta2 0.95 -> 0.99, optim.weight_decay 0.1 -> 0.05, "
            "train.train_steps 4 -> 6; this run uses the config's values (Adam's moments and "
            "step count and the schedule's step come from the checkpoint)")
    assert line in b["printed"].splitlines(), b["printed"]
    cfg = load_train_config(None, small(tmp, "optim.lr=1e-3", "train.train_steps=6"))
    schedule = lr_lambda(cfg)
    expected = [1e-3 * schedule(k) for k in (3, 4, 5)]  # the scheduler's steps 3..5
    assert [lr for lr, _, _, sub in b["groups"] if sub] == pytest.approx(expected, rel=1e-12)
    assert {lr for lr, _, _, _ in b["groups"]} == set(
        lr for lr, _, _, sub in b["groups"] if sub)
    assert {wd for _, wd, _, _ in b["groups"]} == {0.05, 0.0}  # decay / no-decay groups
    assert all(betas == [0.9, 0.99] for _, _, betas, _ in b["groups"])


def _finite_module(tag_dir: Path) -> int:
    """Number of tensors in DeepSpeed's module state of a checkpoint, asserting each finite."""
    state = torch.load(tag_dir / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    tensors = [t for t in state.values() if torch.is_tensor(t) and t.is_floating_point()]
    for t in tensors:
        assert torch.isfinite(t).all()
    return len(tensors)


@pytest.mark.parametrize("stage, norm", [("nan_zero0", "nan"), ("nan_zero1", "inf")])
def test_non_finite_gradient_stops_the_run_and_keeps_the_last_finite_checkpoint(
        runs, stage, norm):
    """lr 1e4 without clipping: the gradients turn non-finite at step 4. The run stops there
    with one line (the CLI: exit status 1), saves nothing after it, and keep_last=1 leaves the
    finite step_2. Before: loss nan from then on, exit 0, only NaN checkpoints kept."""
    tmp, got = runs
    r = got[stage]
    ckpt = tmp / ("nan0" if stage == "nan_zero0" else "nan1")
    message = (f"step 4: the gradient norm is {norm} (loss 6.2383): stopped without saving "
               f"this step; the last checkpoint is {ckpt / 'step_00000002'}")
    if stage == "nan_zero1":  # main(): sys.exit(one line), i.e. exit status 1
        assert r["error"] == f"SystemExit: compact-train: {message}", r
    else:
        assert r["error"] == f"NonFiniteError: {message}", r
    assert (ckpt / "latest").read_text() == "step_00000002"
    assert sorted(p.name for p in ckpt.glob("step_*")) == ["step_00000002"]
    assert _finite_module(ckpt / "step_00000002") > 10


# ---------------------------------------------------------------- before any process group

def _complete(root: Path, step: int, cfg) -> Path:
    """A complete checkpoint as far as the checks before training look: the marker and
    compact_run.json with cfg's resolved config."""
    tag = root / f"step_{step:08d}"
    tag.mkdir(parents=True)
    (tag / "complete").write_text(json.dumps({"step": step}))
    (tag / "compact_run.json").write_text(json.dumps({"config": cfg.model_dump(mode="json")}))
    return tag


def _fails_before_training(monkeypatch, overrides, message):
    """run() raises CheckpointError(message) before any process group exists."""
    import compact_dist.training.train as train
    from compact_dist.training.checkpoint_dir import CheckpointError
    from compact_dist.training.train_config import load_train_config

    def no_group(*args, **kwargs):
        raise AssertionError("a process group was created before the checkpoint check")

    monkeypatch.setattr(train, "init_distributed", no_group)
    with pytest.raises(CheckpointError) as info:
        train.run(load_train_config(None, overrides))
    assert str(info.value) == message  # compact-train prints "compact-train: " + this


def test_unwritable_checkpoint_dir_fails_before_step_1(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    bad = tmp_path / "file" / "ckpt"
    _fails_before_training(monkeypatch, small(tmp_path, f"checkpoint.dir={bad}"),
                           f"checkpoint.dir='{bad}' is not a writable directory: "
                           "Not a directory")


def test_resume_with_other_model_or_compression_lists_the_differences(tmp_path, monkeypatch):
    from compact_dist.training.train_config import load_train_config

    ckpt = tmp_path / "ckpt"
    common = small(tmp_path, f"checkpoint.dir={ckpt}")
    _complete(ckpt, 4, load_train_config(None, common))
    (ckpt / "latest").write_text("step_00000004")
    _fails_before_training(
        monkeypatch, common + ["compression.ratio=0.5", "model.num_layers=3",
                               "compression.layers=[qkv,fc1]", "compression.base_dtype=bf16"],
        f"cannot resume from {ckpt / 'step_00000004'}: it was written with other settings "
        "(checkpoint -> config): model.num_layers 2 -> 3, compression.ratio 0.25 -> 0.5, "
        'compression.layers ["fc1", "fc2", "proj", "qkv"] -> ["fc1", "qkv"], '
        'compression.base_dtype "fp32" -> "bf16"; use the checkpoint\'s values, or '
        "checkpoint.resume=false or another checkpoint.dir to start at step 0")


def test_missing_load_step_is_an_error(tmp_path, monkeypatch):
    from compact_dist.training.train_config import load_train_config

    ckpt = tmp_path / "ckpt"
    common = small(tmp_path, f"checkpoint.dir={ckpt}")
    for step in (2, 4):
        _complete(ckpt, step, load_train_config(None, common))
    _fails_before_training(monkeypatch, common + ["checkpoint.load_step=3"],
                           f"checkpoint.load_step=3: {ckpt} has no complete checkpoint "
                           "step_00000003 (complete: step_00000002, step_00000004)")


def test_checkpoints_without_a_complete_one_are_an_error(tmp_path, monkeypatch):
    """`latest` names a directory without the marker (and no other is complete): starting at
    step 0 next to it would be the silent restart; the run refuses."""
    ckpt = tmp_path / "ckpt"
    (ckpt / "step_00000004").mkdir(parents=True)
    (ckpt / "latest").write_text("step_00000004")
    _fails_before_training(
        monkeypatch, small(tmp_path, f"checkpoint.dir={ckpt}"),
        f"{ckpt} has no complete checkpoint to resume (latest names step_00000004, which is "
        "not a complete checkpoint; without the 'complete' marker: step_00000004): set "
        "checkpoint.resume=false or another checkpoint.dir to start at step 0")


def test_resume_false_next_to_checkpoints_says_what_happens_to_them(tmp_path):
    from compact_dist.training.resume import plan
    from compact_dist.training.train_config import load_train_config

    ckpt = tmp_path / "ckpt"
    cfg = load_train_config(None, small(tmp_path, f"checkpoint.dir={ckpt}",
                                        "checkpoint.resume=false"))
    for step in (2, 4):
        _complete(ckpt, step, cfg)
    got = plan(cfg)
    assert got.tag is None and got.notes == [
        f"checkpoint.resume=false: starting at step 0; this run's saves replace or rotate out "
        f"the checkpoints in {ckpt} (step_00000002 .. step_00000004)"]


def test_latest_that_is_not_text_falls_back(tmp_path):
    from compact_dist.training.checkpoint_dir import choose
    from compact_dist.training.train_config import load_train_config

    cfg = load_train_config(None, small(tmp_path))
    for step in (9, 10):  # by step, not name: step_00000010 is newer
        _complete(tmp_path, step, cfg)
    (tmp_path / "latest").write_bytes(b"\xff\xfe\x00garbage")
    choice = choose(tmp_path)
    assert choice.tag == "step_00000010"
    assert choice.note == (f"warning: {tmp_path / 'latest'} is not a text file: resuming from "
                           "step_00000010, the newest complete checkpoint")


def test_rotation_deletes_by_step_and_never_latest_nor_later_steps(tmp_path):
    from compact_dist.training.checkpoint_dir import rotate
    from compact_dist.training.train_config import load_train_config

    cfg = load_train_config(None, small(tmp_path))
    for step in (5, 20, 100, 150, 300):
        _complete(tmp_path, step, cfg)
    (tmp_path / "step_00000001").mkdir()  # not ours (no marker)
    (tmp_path / "latest").write_text("step_00000020")  # e.g. a user's rewind
    assert rotate(tmp_path, written=150, keep_last=2) == ["step_00000005"]
    assert sorted(p.name for p in tmp_path.glob("step_*")) == [
        "step_00000001", "step_00000020", "step_00000100", "step_00000150", "step_00000300"]


def test_second_sigint_quits_only_after_a_pause(monkeypatch):
    """A launcher forwards the terminal's Ctrl-C to a worker that got it too (two SIGINTs at
    once): that stops after the step. Ctrl-C again later quits at once."""
    from compact_dist.training import train

    now = [100.0]
    monkeypatch.setattr(train.time, "monotonic", lambda: now[0])
    stop = train.GracefulStop()
    stop._handler(signal.SIGINT, None)
    stop._handler(signal.SIGINT, None)  # forwarded by torchrun, same instant
    assert stop.requested and stop.signal == signal.SIGINT
    now[0] += stop.REPEAT_S + 0.1
    with pytest.raises(KeyboardInterrupt):
        stop._handler(signal.SIGINT, None)


def test_ranks_that_see_different_checkpoints_stop(monkeypatch):
    """A checkpoint.dir on node-local disks: rank 0 finds step_4, rank 1 nothing. The ranks
    raise instead of one resuming and the other starting at step 0 (the all-gather of a
    world of 2 simulated here: rank 1's answer is None)."""
    import torch.distributed as dist

    from compact_dist.training.checkpoint_dir import CheckpointError
    from compact_dist.training.resume import same_on_every_rank

    def all_gather_object(out, obj):
        out[:] = [obj, None]

    monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: 2)
    monkeypatch.setattr(dist, "all_gather_object", all_gather_object)
    same_on_every_rank(None)
    with pytest.raises(CheckpointError) as info:
        same_on_every_rank("step_00000004")
    assert str(info.value) == (
        "the ranks found different checkpoints to resume ({0: 'step_00000004', 1: None}): "
        "checkpoint.dir must be one directory every node sees")


def test_a_checkpoint_from_before_the_marker_that_latest_names_is_resumed(tmp_path):
    """compact_dist before the `complete` marker moved `latest` only after every rank wrote
    its files: that checkpoint is resumed; an unmarked newer one (a killed save then) is not."""
    from compact_dist.training.checkpoint_dir import CheckpointError, choose

    for step in (4, 6):
        (tmp_path / f"step_0000000{step}").mkdir()
    (tmp_path / "step_00000004" / "compact_rank0.pt").write_bytes(b"")
    (tmp_path / "latest").write_text("step_00000004")
    assert choose(tmp_path).tag == "step_00000004"
    (tmp_path / "latest").write_text("step_00000006")  # no per-rank files: not complete
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        choose(tmp_path)
