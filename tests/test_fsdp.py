"""torch FSDP2 (compact_dist.fsdp, CPU, gloo) as the second training engine: training compact
layers at DP=2 (two micro-batches accumulated per step) matches the single-process
full-batch run (test_zero's reference), including merges, resamples and A's moments; compact-train's `train.engine=fsdp2` at DP=2 and
TP=2 x DP=2 matches torch DDP's run (test_train's reference), and its resume continues the
uninterrupted run bit for bit.

megatron-core 0.16.1's own DistributedDataParallel and distributed optimizer, the engine
issue 26 asks for first, need CUDA: param_and_grad_buffer.py:800 allocates the gradient
buffer on torch.cuda.current_device(), distrib_optimizer.py:420 accepts only
'torch.cuda.FloatTensor' parameters, clip_grads.py:115 allocates the norm on 'cuda'.
"""

import pytest
import torch

from distributed import run_distributed, run_distributed_raw
from test_train import small, train_many
from test_zero import LR, STEPS, WD, _compression, _reference_losses


def _fsdp_run(rank, moments, projection, expected):
    from megatron.core import parallel_state as ps
    from torch.distributed.tensor import DTensor

    from compact_dist import SubspaceStepper, compact_layers, optimizer_param_groups
    from compact_dist.core.backend_registry import backend_for
    from compact_dist.core.moments import subspace_step_count
    from compact_dist.fsdp.backend import FSDP2_BACKEND
    from compact_dist.fsdp.shard import shard_model, tensor_parallel_duplicates
    from compact_dist.training.engine_fsdp import FSDP2TrainingEngine
    from gpt_utils import text_batch, tiny_gpt

    model = tiny_gpt(_compression(moments, projection))
    duplicates = tensor_parallel_duplicates(model)
    shard_model(model, torch.device("cpu"))
    layers = compact_layers(model)
    # W0 and A really are sharded by rows over the 2 data-parallel ranks
    assert all(isinstance(l.weight, DTensor) and isinstance(l.subspace_factor, DTensor)
               for l in layers)
    assert all(2 * l.weight.to_local().shape[0] == l.weight.shape[0] for l in layers)
    opt = torch.optim.AdamW(optimizer_param_groups(model, WD), lr=LR)
    assert backend_for(opt, [layers[0].subspace_factor]) is FSDP2_BACKEND
    # two micro-batches of one sequence per step: the engine's gradient accumulation
    engine = FSDP2TrainingEngine(model, opt, None, 2, 0.0, torch.device("cpu"), duplicates)
    stepper = SubspaceStepper(model, _compression(moments, projection))
    dp = ps.get_data_parallel_world_size()
    losses = []
    for step in range(STEPS):
        tokens, positions, labels = text_batch(batch=4, seed=step)
        total = torch.zeros(())
        for i in (2 * rank, 2 * rank + 1):
            mine = slice(i, i + 1)
            loss = engine(tokens[mine], positions[mine], None,
                          labels=labels[mine]).float().mean()
            engine.backward(loss)
            total += loss.detach() / 2
        engine.step()
        assert engine.get_global_grad_norm() > 0 and engine.skipped_steps == 0
        stepper.after_step(LR, WD, engine.optimizer)
        assert all(not l.subspace_factor.to_local().any() for l in layers)  # merged: A = 0
        torch.distributed.all_reduce(total)
        losses.append(total.item() / dp)
    assert all(l.projection_epoch == STEPS // 2 + (projection != "gaussian") for l in layers)
    assert subspace_step_count(opt) == (1 if moments == "reset" else STEPS)
    assert losses == pytest.approx(expected, rel=1e-5, abs=1e-6), (losses, expected)


@pytest.mark.parametrize("moments, projection", [("transport", "pca")])
def test_fsdp2_matches_full_batch_reference(megatron_tp1, moments, projection):
    expected = _reference_losses(moments, projection)
    assert expected[-1] < expected[0]
    run_distributed(_fsdp_run, 2, moments, projection, expected, tp=1)


def test_compact_train_fsdp2_at_tp2_dp2_matches_ddp_and_resumes(tmp_path, dp2_runs):
    """compact-train with train.engine=fsdp2 (ZeRO-3-like: reshard after forward) at
    TP=2 x DP=2 follows torch DDP's run at DP=2 (conftest.dp2_runs; kept-energy probes,
    merges, resamples, clipping over FSDP2 x TP); resumed from its step-2 checkpoint (one DCP
    checkpoint per TP rank; both runs in one launch), it repeats steps 3-4 bit for bit."""
    ckpt = tmp_path / "ckpt"
    reference = dp2_runs["ddp"]["losses"]
    assert reference[-1] < reference[0]
    fsdp = small(tmp_path) + ["train.engine=fsdp2", "train.zero_stage=3",
                              "parallel.tensor_model_parallel_size=2", f"checkpoint.dir={ckpt}",
                              "checkpoint.save_interval=2", "checkpoint.keep_last=5"]
    runs = train_many(4, [("full", fsdp), ("resumed", fsdp, (str(ckpt), "step_00000002"))],
                      tmp_path)  # resumed as if the job had died after step 2
    full = runs["full"]
    assert full["losses"] == pytest.approx(reference, rel=1e-4), (full, reference)
    assert full["kept_energy"]  # the probe ran through FSDP2's sharded model
    assert runs["resumed.latest_before"] == "step_00000004"
    assert sorted(p.name for p in (ckpt / "step_00000002").glob("fsdp2_tp*")) == [
        "fsdp2_tp00", "fsdp2_tp01"]
    resumed = runs["resumed"]["losses"]
    assert resumed == pytest.approx(full["losses"][2:], rel=1e-6, abs=1e-6), (resumed, full)


def test_fsdp2_skipped_step_keeps_parameters_and_schedule(megatron_tp1):
    """A non-finite gradient norm skips the update as DeepSpeed's engine does
    (engine._take_model_step: skipped_steps += 1 and no lr_scheduler.step()): the
    parameters and the learning rate stay; the next finite step applies the same rate."""
    from compact_dist import optimizer_param_groups
    from compact_dist.fsdp.grad_norm import local_grad
    from compact_dist.fsdp.shard import shard_model, tensor_parallel_duplicates
    from compact_dist.training.engine_fsdp import FSDP2TrainingEngine
    from gpt_utils import text_batch, tiny_gpt

    model = tiny_gpt(_compression())
    duplicates = tensor_parallel_duplicates(model)
    shard_model(model, torch.device("cpu"))
    opt = torch.optim.AdamW(optimizer_param_groups(model, WD), lr=LR)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (step + 1))
    engine = FSDP2TrainingEngine(model, opt, schedule, 1, 1.0, torch.device("cpu"), duplicates)
    tokens, positions, labels = text_batch(batch=2)

    def backward():
        engine.backward(engine(tokens, positions, None, labels=labels).float().mean())

    backward()
    trained = [p for p in model.parameters() if p.grad is not None]
    local_grad(trained[0]).view(-1)[0] = float("inf")
    before = [p.detach().to_local().clone() for p in trained]
    engine.step()
    assert engine.skipped_steps == 1 and engine.get_global_grad_norm() == float("inf")
    assert all(torch.equal(p.detach().to_local(), b) for p, b in zip(trained, before))
    assert engine.lr == LR  # the schedule did not advance
    backward()
    engine.step()
    assert engine.skipped_steps == 1 and engine.lr == LR / 2


def test_gradient_projection_refused_only_for_deepspeed_zero3():
    """projection=gradient's probe needs DeepSpeed's engine hooks to gather ZeRO-3's
    partitions, not FSDP2's module hooks: train.engine=fsdp2 at zero_stage 3 (reshard after
    forward) is accepted (compact-train, DP=2, 3 steps, resample every step: the losses of
    fsdp2 at zero_stage 3, fsdp2 at 2 and DeepSpeed ZeRO-1 are the same to the last bit)."""
    from compact_dist.training.train_config import load_train_config

    gradient = ["compression.projection=gradient", "train.zero_stage=3"]
    assert load_train_config(None, gradient + ["train.engine=fsdp2"]).train.zero_stage == 3
    with pytest.raises(ValueError, match="does not support ZeRO-3"):
        load_train_config(None, gradient)


def _load_with_a_missing_rank_file(rank, directory):
    from pathlib import Path

    from compact_dist import optimizer_param_groups
    from compact_dist.fsdp.shard import shard_model, tensor_parallel_duplicates
    from compact_dist.training.engine_fsdp import FSDP2TrainingEngine
    from gpt_utils import tiny_gpt

    model = tiny_gpt(_compression())
    duplicates = tensor_parallel_duplicates(model)
    shard_model(model, torch.device("cpu"))
    opt = torch.optim.AdamW(optimizer_param_groups(model, WD), lr=LR)
    engine = FSDP2TrainingEngine(model, opt, None, 1, 1.0, torch.device("cpu"), duplicates)
    engine.save_checkpoint(directory, "step", {"step": 1})
    torch.distributed.barrier()
    if rank == 0:  # as a run on more ranks than wrote the checkpoint finds it
        (Path(directory) / "step" / "fsdp2_extra_rank1.pt").unlink()
    torch.distributed.barrier()
    assert engine.load_checkpoint(directory, "step") == (None, None)


def test_fsdp2_load_agrees_on_every_rank_that_the_checkpoint_is_missing(tmp_path):
    """A rank that lacks its file of the checkpoint (more ranks than wrote it) must not leave
    the others in the collective DCP load (gloo: a peer-closed error, NCCL: a hang): every rank
    finds no checkpoint, and compact-train prints its one CheckpointError line."""
    run_distributed(_load_with_a_missing_rank_file, 2, str(tmp_path), tp=1)


def test_resume_of_a_deepspeed_checkpoint_with_fsdp2_is_one_line(tmp_path, monkeypatch):
    """A checkpoint DeepSpeed wrote, resumed with train.engine=fsdp2: one CheckpointError
    line, before any process group."""
    from test_checkpoint_safety import _complete, _fails_before_training

    from compact_dist.training.train_config import load_train_config

    ckpt = tmp_path / "ckpt"
    common = small(tmp_path, f"checkpoint.dir={ckpt}")
    _complete(ckpt, 4, load_train_config(None, common))
    _fails_before_training(
        monkeypatch, common + ["train.engine=fsdp2", "train.zero_stage=3"],
        f"cannot resume from {ckpt / 'step_00000004'}: it was written with other settings "
        '(checkpoint -> config): train.zero_stage 1 -> 3, train.engine "deepspeed" -> '
        '"fsdp2"; use the checkpoint\'s values, or checkpoint.resume=false or another '
        "checkpoint.dir to start at step 0")


def _train_keeping_weights(rank, overrides, out):
    """compact-train's run(); rank 0 saves the model's whole tensors at the end (A is zero
    after the last merge) and the extra states of its compact layers."""
    from compact_dist.training import train as loop
    from compact_dist.training.train_config import load_train_config

    summary = loop._summary

    def keeping(run_):
        whole = {n: t.full_tensor() for n, t in run_.engine.module.state_dict().items()
                 if hasattr(t, "full_tensor")}
        if rank == 0:
            extra = {n: t for n, t in run_.engine.module.state_dict().items()
                     if n.endswith("_extra_state")}
            torch.save({"tensors": whole, "extra": extra}, out)
        summary(run_)

    loop._summary = keeping
    loop.run(load_train_config(None, overrides))


def test_fsdp2_checkpoint_reads_back_for_compact_export(tmp_path):
    """compact-export's reader (tools/checkpoint_shards.tp_module_state) of an FSDP2
    checkpoint: every tensor of the module whole (W0, A, norms, embedding) as the trained
    model holds it, and the compact layers' extra states (data-aware basis P); compact-export
    writes the HF model from it."""
    from compact_dist.tools.checkpoint_shards import tp_module_state

    ckpt = tmp_path / "ckpt"
    overrides = small(tmp_path, "train.engine=fsdp2", "train.zero_stage=3",
                      "train.train_steps=2", f"checkpoint.dir={ckpt}")
    run_distributed_raw(_train_keeping_weights, 2, overrides, str(tmp_path / "model.pt"))
    model = torch.load(tmp_path / "model.pt", weights_only=False)
    state = tp_module_state(ckpt / "step_00000002", 0)
    for name, tensor in model["tensors"].items():
        assert torch.equal(state[name], tensor), name
    bases = [k for k, v in model["extra"].items() if v and v.get("basis") is not None]
    assert bases  # pca: a data-aware basis per compact layer
    for name in bases:
        assert torch.equal(state[name]["basis"], model["extra"][name]["basis"]), name
    from safetensors.torch import load_file

    from compact_dist.tools.export import export_checkpoint

    info = export_checkpoint(ckpt, tmp_path / "hf")
    hf = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert info["compact_layers"] and info["max_abs_factor"] == 0  # merged at step 2: A = 0
    assert torch.equal(hf["model.layers.1.mlp.down_proj.weight"],
                       model["tensors"]["decoder.layers.1.mlp.linear_fc2.weight"])


def test_fsdp2_run_imports_no_deepspeed(tmp_path):
    """compact-train with train.engine=fsdp2 (recompute on, checkpoint saved) in a process
    where `import deepspeed` fails: the FSDP2 path needs no DeepSpeed (process set-up, model
    hooks, recompute, checkpoints)."""
    import subprocess
    import sys

    ckpt = tmp_path / "ckpt"
    overrides = small(tmp_path, "train.engine=fsdp2", "train.zero_stage=3",
                      "train.train_steps=2", "recompute.granularity=full",
                      f"checkpoint.dir={ckpt}")
    code = ("import sys; sys.modules['deepspeed'] = None\n"  # any import of it raises
            "from compact_dist.training.train import main\n"
            "main(sys.argv[1:])\n")
    proc = subprocess.run([sys.executable, "-c", code, *overrides], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "done: 2 steps" in proc.stdout + proc.stderr
    assert (ckpt / "step_00000002").is_dir()
