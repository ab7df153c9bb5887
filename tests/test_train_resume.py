"""compact-train under ZeRO-3 with dropout: a resumed run reproduces the uninterrupted one
(RNG states and the merged W0 partitions come back), and every merge uses the learning rate
of the optimizer step it follows, under a schedule that changes the rate every step."""

import json
from pathlib import Path

import pytest

from distributed import run_distributed_raw
from test_train import small


def _full_then_resumed(rank, common, ckpt, out):
    """Both runs in the same processes (one start-up): 4 steps with checkpoints at 2 and 4,
    then, with `latest` pointing at step 2 as if the job had died there, the resumed run."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from compact_dist.core.moments import SUBSPACE_GROUP_KEY
    from compact_dist.core.subspace import SubspaceStepper
    from compact_dist.training.train import run
    from compact_dist.training.train_config import load_train_config

    stepped, merged = [], []  # A's rate in each optimizer step / the rate each merge got

    def record_step(optimizer, args, kwargs):
        rates = [g["lr"] for g in optimizer.param_groups if g.get(SUBSPACE_GROUP_KEY)]
        if rates:
            stepped.append(rates[0])

    after_step = SubspaceStepper.after_step

    def recording_after_step(self, lr, weight_decay, optimizer=None):
        merged.append((lr, stepped[-1] if stepped else None))
        return after_step(self, lr, weight_decay, optimizer)

    register_optimizer_step_pre_hook(record_step)
    SubspaceStepper.after_step = recording_after_step
    cfg = load_train_config(None, common)
    full = run(cfg)["losses"]
    dist.barrier()
    if rank == 0:
        (Path(ckpt) / "latest").write_text("step_00000002")
    dist.barrier()
    parallel_state.destroy_model_parallel()  # run() sets the parallel state up again
    resumed = run(load_train_config(None, common))["losses"]
    if rank == 0:
        Path(out).write_text(json.dumps({"full": full, "resumed": resumed, "merged": merged}))
    torch.distributed.barrier()


def test_resume_with_dropout_and_merge_learning_rates(tmp_path):
    ckpt = tmp_path / "ckpt"
    common = small(tmp_path, "model.hidden_dropout=0.2", "model.attention_dropout=0.2",
                   "train.zero_stage=3", "optim.warmup_steps=2", "optim.weight_decay=0.5",
                   f"checkpoint.dir={ckpt}", "checkpoint.save_interval=2",
                   "checkpoint.keep_last=5")
    out = tmp_path / "out.json"
    run_distributed_raw(_full_then_resumed, 2, common, str(ckpt), str(out))
    got = json.loads(out.read_text())
    full, resumed = got["full"], got["resumed"]
    assert len(full) == 4 and len(resumed) == 2
    assert resumed == pytest.approx(full[2:], rel=1e-6, abs=1e-6), (full, resumed)

    merged = got["merged"]
    assert len(merged) == 6  # 4 merges in the full run, 2 in the resumed one
    for merge_lr, step_lr in merged:  # the rate of the step just taken, not of the next one
        assert merge_lr == step_lr, merged
    rates = [lr for lr, _ in merged[:4]]
    assert len(set(rates)) == 4, rates  # warm-up then cosine: a new rate every step
    assert [lr for lr, _ in merged[4:]] == rates[2:]
