"""DeepSpeed's optimizer offload (train.offload_optimizer=cpu: ZeRO-Offload, A's fp32 masters
and Adam moments in host memory) trains compact layers as the same run without offload:
ZeRO 1-3, fp32 and bf16 (DeepSpeed's CPU accelerator runs bf16), gradient accumulation 2,
one and two data-parallel ranks (gloo), a merge after every step and a resample (P changes,
moments transported) after step 2. Losses within rel 1e-6, parameters and A's masters within
1e-6 / 1e-7 (measured: equal). Gradient clipping is on at two ranks; at one rank in bf16 it
is off: there DeepSpeed's host path computes the clipping norm otherwise (W0 then differs by
up to ~3e-5 after 4 steps). On CPU both runs keep the masters on the same device, so
this checks DeepSpeed's offload paths (host gradient accumulation, the host step, the copy
back into the bf16 A, ZeRO-3's accessor copies of the masters) against the method, not the
device copies (compact_dist.core.grouped_merge copies A to the masters' device).

After every merge A's fp32 master keeps at most what the module's bf16 A rounded away (fp32:
nothing): a master the merge left behind would be merged again at the next step."""

import pytest
import torch

from distributed import run_distributed

STEPS, LR, WD, GA = 3, 3e-3, 0.01, 2
# what a bf16 master keeps after the merge, relative to A before it (the bf16 rounding:
# at most 2^-9 of each element; a master left whole: 1)
RESIDUAL = {"fp32": 0.0, "bf16": 2.0 ** -7}


def _compression(base):
    from compact_dist import CompressionConfig

    return CompressionConfig(ratio=0.25, resample_interval=2, base_dtype=base, projection="pca")


def _master(factor) -> torch.Tensor:
    """A's full fp32 master [out, r] (collective over the data-parallel group)."""
    from deepspeed.utils import safe_get_full_fp32_param

    return safe_get_full_fp32_param(factor)


def _run(rank, stage, precision, clip, offload):
    """(losses, final parameters, final masters of A, residual ratios after each merge)."""
    from megatron.core import parallel_state as ps

    from compact_dist import SubspaceStepper, compact_layers, optimizer_param_groups
    from compact_dist.deepspeed.engine import deepspeed_config, initialize_engine
    from gpt_utils import text_batch, tiny_gpt

    base = "bf16" if stage == 3 and precision == "bf16" else "fp32"
    dp = ps.get_data_parallel_world_size()
    model = tiny_gpt(_compression(base))
    opt = torch.optim.AdamW(optimizer_param_groups(model, WD), lr=LR)
    engine = initialize_engine(model, opt, deepspeed_config(
        zero_stage=stage, micro_batch_size=1, gradient_accumulation_steps=GA,
        data_parallel_size=dp, bf16=precision == "bf16", grad_clip=clip,
        offload_optimizer="cpu" if offload else "none"))
    zero = engine.optimizer
    assert (zero.offload_optimizer if stage == 3 else zero.cpu_offload) == offload
    factors = [l.subspace_factor for l in compact_layers(engine.module)
               if l.subspace_factor is not None]
    stepper = SubspaceStepper(engine.module, _compression(base))
    losses, residuals = [], []
    for step in range(STEPS):
        tokens, positions, labels = text_batch(batch=GA * dp, seed=step)
        for micro in range(GA):
            mine = slice(GA * rank + micro, GA * rank + micro + 1)
            loss = engine(tokens[mine], positions[mine], None, labels=labels[mine]).float().mean()
            engine.backward(loss)
            engine.step()
            total = loss.detach().clone()
            torch.distributed.all_reduce(total)
            losses.append(total.item() / dp)
        before = [_master(f).abs().sum().item() for f in factors]
        stepper.after_step(LR, WD, engine.optimizer)
        after = [_master(f).abs().sum().item() for f in factors]
        residuals.append(sum(after) / sum(before))
    params = {}
    for name, p in engine.module.named_parameters():
        if hasattr(p, "ds_id"):  # ZeRO-3: gather the partitions
            import deepspeed

            with deepspeed.zero.GatheredParameters([p]):
                params[name] = p.detach().float().clone()
        else:
            params[name] = p.detach().float().clone()
    return losses, params, [_master(f).clone() for f in factors], residuals


def _offload_equals_plain(rank, cases):
    import logging

    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    failures = []
    for stage, precision, clip in cases:
        what = f"ZeRO-{stage} {precision} clip {clip}"
        plain = _run(rank, stage, precision, clip, offload=False)
        off = _run(rank, stage, precision, clip, offload=True)
        if off[0] != pytest.approx(plain[0], rel=1e-6):
            failures.append(f"{what}: losses {off[0]} vs {plain[0]}")
        for name in plain[1]:
            if not torch.allclose(off[1][name], plain[1][name], rtol=0, atol=1e-6):
                failures.append(f"{what}: {name} differs by "
                                f"{(off[1][name] - plain[1][name]).abs().max().item()}")
        if not all(torch.allclose(a, b, rtol=0, atol=1e-7) for a, b in zip(off[2], plain[2])):
            failures.append(f"{what}: A's masters differ")
        for run, (_, _, _, residuals) in (("offload", off), ("plain", plain)):
            if max(residuals) > RESIDUAL[precision]:
                failures.append(f"{what} {run}: A's masters keep {residuals} of A after the "
                                "merges")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("dp, cases", [
    (1, [(1, "bf16", 0.0), (2, "bf16", 0.0), (3, "bf16", 0.0)]),
    (2, [(1, "fp32", 1.0), (2, "bf16", 1.0), (3, "fp32", 1.0)]),
])
def test_offloaded_optimizer_trains_as_without(dp, cases):
    run_distributed(_offload_equals_plain, dp, cases, tp=1)


def _train_recording_the_engine(rank, path, overrides, out):
    """compact-train's run() on `path`; records what DeepSpeed was given and built."""
    import json
    from pathlib import Path

    import deepspeed

    from compact_dist.training.train import run
    from compact_dist.training.train_config import load_train_config

    seen = {}
    original = deepspeed.initialize

    def recording(*args, **kwargs):
        engine, *rest = original(*args, **kwargs)
        seen["offload"] = kwargs["config"]["zero_optimization"].get("offload_optimizer")
        seen["cpu_offload"] = bool(getattr(engine.optimizer, "cpu_offload", False))
        return (engine, *rest)

    deepspeed.initialize = recording
    history = run(load_train_config(path, overrides))
    Path(out).write_text(json.dumps({**seen, "losses": history["losses"]}))


def test_trainer_runs_the_offload_config_the_planner_writes(tmp_path, capsys):
    """compact-plan, allowed only offload, writes a config; compact-train's run() trains it
    with DeepSpeed's optimizer offload on (zero_optimization.offload_optimizer, ZeRO-2)."""
    import json

    from compact_dist.tools.memory_plan import main as plan_main
    from compact_dist.training.train_config import load_train_config
    from distributed import run_distributed_raw

    path = tmp_path / "plan.yaml"
    plan_main(["--preset", "tiny", "--device", "cpu", "--budget-gib", "80", "--offload", "cpu",
               "--zero", "2", "--ratios", "1/4", "--w0", "fp32", "--fp8", "none",
               "--fused-ce", "false", "--recompute", "none", "--micro-batches", "2",
               "--out", str(path), "model.seq_length=32", "data.vocab_size=512"])
    capsys.readouterr()
    cfg = load_train_config(str(path))
    assert cfg.train.offload_optimizer == "cpu" and cfg.train.zero_stage == 2
    cfg.check_environment(world_size=1, has_cuda=False)
    out = tmp_path / "run.json"
    run_distributed_raw(_train_recording_the_engine, 1, str(path), [
        "train.train_steps=2", "train.eval_interval=1000", "logging.progress=false",
        "logging.kept_energy=false", "data.max_bytes=100000",
        f"data.cache_dir={tmp_path / 'cache'}"], str(out))
    got = json.loads(out.read_text())
    assert got["offload"] == {"device": "cpu", "pin_memory": True} and got["cpu_offload"], got
    assert len(got["losses"]) == 2 and all(0 < x < 20 for x in got["losses"]), got
