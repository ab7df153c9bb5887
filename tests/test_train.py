"""The compact-train entrypoint on CPU: config errors, ZeRO stages vs DDP, TP x DP, recompute,
resume and atomic checkpoints."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distributed import run_distributed_raw

ROOT = Path(__file__).resolve().parents[1]


def small(tmp: Path, *extra: str) -> list[str]:
    """Overrides for a ~1 s/step model on a 300 kB slice of the stdlib corpus."""
    return [
        "model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
        "model.seq_length=32", "train.micro_batch_size=2", "train.train_steps=4",
        "train.eval_interval=1000", "train.eval_batches=2", "train.log_interval=1",
        "logging.progress=false", "optim.warmup_steps=1", "compression.resample_interval=2",
        "data.max_bytes=300000", "data.vocab_size=512", f"data.cache_dir={tmp / 'cache'}",
        *extra,
    ]


def _train(rank, overrides, out):
    from compact_dist.training.train import run
    from compact_dist.training.train_config import load_train_config

    history = run(load_train_config(None, overrides))
    if rank == 0:
        Path(out).write_text(json.dumps(history))


def train(world: int, overrides: list[str], tmp: Path, name: str) -> dict:
    out = tmp / f"{name}.json"
    run_distributed_raw(_train, world, overrides, str(out))
    return json.loads(out.read_text())


def _one_after_another(rank, runs, out):
    """Each (name, overrides[, rewind]) of `runs` in turn in the same processes (one start-up
    for all): name "ddp*" is _ddp_losses's DDP run, any other name compact-train's run().
    rewind = (checkpoint dir, step directory name[, aside]): before the run, rank 0 points
    `latest` at that step, as if the job had died there (what `latest` said is kept as
    "<name>.latest_before"; with `aside`, the checkpoint it named is moved there first, so the
    run writes that step anew). Each run sets the model-parallel state up itself and this tears
    it down after it; the world group stays. Rank 0 writes {name: the run's history (DDP:
    {"losses": [...]})}."""
    from megatron.core import parallel_state

    from compact_dist.training.train import run
    from compact_dist.training.train_config import load_train_config

    got = {}
    for name, overrides, *rewind in runs:
        if rewind:
            ckpt, step, *aside = rewind[0]
            if rank == 0:
                got[f"{name}.latest_before"] = before = (Path(ckpt) / "latest").read_text()
                if aside:
                    (Path(ckpt) / before).rename(aside[0])
                (Path(ckpt) / "latest").write_text(step)
            torch.distributed.barrier()
        if name.startswith("ddp"):
            got[name] = {"losses": _ddp_losses(overrides)}
        else:
            got[name] = run(load_train_config(None, overrides))
        parallel_state.destroy_model_parallel()
        torch.distributed.barrier()
    if rank == 0:
        Path(out).write_text(json.dumps(got))


def train_many(world: int, runs: list[tuple], tmp: Path) -> dict:
    """{name: history} of the runs, one after another in one launch of `world` processes."""
    out = tmp / "runs.json"
    run_distributed_raw(_one_after_another, world, runs, str(out))
    return json.loads(out.read_text())


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["parallel.tensor_model_parallel_size=3"], "does not divide num_attention_heads"),
        (["compression.ratio=1.5"], "less than or equal to 1"),
        (["data.source=files", "data.paths=['/nonexistent/*.txt']"], "no files match"),
        (["parallel.sequence_parallel=true"], "sequence_parallel needs tensor_model_parallel_size > 1"),
        (["train.zero_stage=4"], "zero_stage"),
        (["train.global_batch_size=3"], "not a multiple of micro_batch_size"),
        (["model.typo=1"], "unknown key 'model.typo'"),
        (["checkpoint.load_step=3"], "checkpoint.load_step needs checkpoint.dir"),
    ],
)
def test_config_errors_fail_with_one_message_before_any_process_group(
        overrides, message, monkeypatch):
    from megatron.core import parallel_state

    from compact_dist.training.train_config import load_train_config

    def no_group(*args, **kwargs):
        raise AssertionError("a process group was created before the config was validated")

    monkeypatch.setattr(torch.distributed, "init_process_group", no_group)
    monkeypatch.setattr(parallel_state, "initialize_model_parallel", no_group)
    with pytest.raises(ValueError, match=message) as info:
        cfg = load_train_config(None, overrides)
        cfg.check_environment(world_size=1, has_cuda=False)
    assert str(info.value).count("\n") < 6  # one message, not a wall of errors


def test_cli_reports_bad_config_and_exits_nonzero(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "compact_dist.training.train", "compression.ratio=0"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode != 0
    assert "invalid configuration" in proc.stderr and "ratio" in proc.stderr
    assert "Traceback" not in proc.stderr


def _ddp_losses(overrides):
    """The losses (mean over the data-parallel ranks, per step) of the same model, data and
    schedule trained with torch DDP + torch AdamW."""
    from megatron.core import parallel_state as ps

    from compact_dist.training.data import build_data
    from compact_dist.megatron.model import build_gpt_model
    from compact_dist.megatron.rope import install_host_rotary
    from compact_dist.core.subspace import SubspaceStepper, optimizer_param_groups
    from compact_dist.training.distributed import init_distributed
    from compact_dist.training.engine_setup import lr_lambda
    from compact_dist.training.model_setup import transformer_config
    from compact_dist.training.train import probe_loss
    from compact_dist.training.train_config import load_train_config

    cfg = load_train_config(None, overrides)
    init_distributed(cfg)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    micro = cfg.train.micro_batch_size  # the sample counts compact-train builds the data for
    tok, it, _ = build_data(cfg.data, cfg.model.seq_length, micro, dp_rank, dp,
                            train_samples=cfg.train.train_steps * micro
                            * cfg.gradient_accumulation_steps(dp) * dp,
                            valid_samples=cfg.train.eval_batches * micro * dp)
    torch.manual_seed(cfg.train.seed)
    vocab = -(-tok.vocab_size // 64) * 64
    model = build_gpt_model(transformer_config(cfg, False), cfg.compression, vocab,
                            cfg.model.seq_length, cfg.model.position_embedding)
    install_host_rotary(model)  # RoPE (the default) without CUDA
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(optimizer_param_groups(model, cfg.optim.weight_decay),
                            lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    stepper = SubspaceStepper(model, cfg.compression)
    losses = []
    for _ in range(cfg.train.train_steps):
        b = next(it)
        stepper.before_step(lambda: probe_loss(model, b))  # projection=gradient only
        loss = ddp(b["tokens"], b["position_ids"], None, labels=b["labels"]).float().mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                       cfg.optim.grad_clip)
        lr = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        stepper.after_step(lr, cfg.optim.weight_decay, opt)
        total = loss.detach().clone()
        torch.distributed.all_reduce(total)
        losses.append(total.item() / dp)
    return losses


def test_zero_1_2_3_match_ddp(dp2_runs):
    """compact-train at ZeRO-1, 2 and 3 follows torch DDP's run (conftest.dp2_runs: all in
    one launch)."""
    reference = dp2_runs["ddp"]["losses"]
    assert reference[-1] < reference[0]
    for stage in (1, 2, 3):
        got = dp2_runs[f"z{stage}"]
        assert got["losses"] == pytest.approx(reference, rel=1e-4), (stage, got, reference)


@pytest.mark.parametrize("stage, projection", [(2, "gradient"), (1, "pca")])
def test_data_aware_projections_match_ddp(tmp_path, stage, projection):
    """The probe (gradient) or the in-forward sketch (pca) under DeepSpeed gives the P that
    DDP's reference computes, and the probe's backward leaves ZeRO's gradients alone."""
    overrides = small(tmp_path, f"compression.projection={projection}",
                      "compression.moments_on_resample=transport")
    runs = train_many(2, [("ddp", overrides),
                          (projection, overrides + [f"train.zero_stage={stage}"])], tmp_path)
    reference = runs["ddp"]["losses"]
    got = runs[projection]
    assert got["losses"] == pytest.approx(reference, rel=1e-4), (got, reference)


def test_tp2_dp2_equals_tp1_dp2(tmp_path, dp2_runs):
    base = dp2_runs["z1"]  # the same job at TP=1 x DP=2 (ZeRO-1, the default)
    tp2 = train(4, small(tmp_path, "parallel.tensor_model_parallel_size=2"), tmp_path, "tp2")
    assert tp2["losses"] == pytest.approx(base["losses"], rel=1e-4)


def test_recompute_variants_give_the_same_losses(tmp_path):
    extra = ["model.hidden_dropout=0.1", "model.attention_dropout=0.1", "train.train_steps=3"]
    runs = train_many(1, [(name, small(tmp_path, *extra, *opts)) for name, opts in {
        "none": [],
        "full": ["recompute.granularity=full"],
        "selective": ["recompute.granularity=selective"],
        "deepspeed": ["recompute.granularity=full", "recompute.deepspeed_checkpointing=true"],
    }.items()], tmp_path)
    runs = {name: history["losses"] for name, history in runs.items()}
    for name in ("full", "selective", "deepspeed"):
        assert runs[name] == pytest.approx(runs["none"], rel=1e-5), (name, runs)


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    ckpt = tmp_path / "ckpt"
    common = small(tmp_path, "train.train_steps=6", "train.zero_stage=3",
                   f"checkpoint.dir={ckpt}", "checkpoint.save_interval=3",
                   "checkpoint.keep_last=5")
    runs = train_many(2, [("full", common), ("resumed", common, (str(ckpt), "step_00000003"))],
                      tmp_path)  # resumed as if the job had died after step 3
    full, resumed = runs["full"]["losses"], runs["resumed"]["losses"]
    assert runs["resumed.latest_before"] == "step_00000006"
    assert len(resumed) == 3
    assert resumed == pytest.approx(full[3:], rel=1e-6, abs=1e-6)


def test_resume_restores_a_bf16_pair_w0(tmp_path):
    """ZeRO-2 keeps the pair's low words (buffers) in its module checkpoint: the resumed run
    merges into the same W0 as the uninterrupted one (a lost low word changes which way the
    high words round, and the losses after the next merge)."""
    ckpt = tmp_path / "ckpt"
    common = small(tmp_path, "train.train_steps=6", "train.zero_stage=2",
                   "compression.base_dtype=bf16_pair", "optim.lr=3e-3",
                   f"checkpoint.dir={ckpt}", "checkpoint.save_interval=3",
                   "checkpoint.keep_last=5")
    runs = train_many(2, [("full", common), ("resumed", common, (str(ckpt), "step_00000003"))],
                      tmp_path)
    resumed = runs["resumed"]["losses"]
    assert resumed == pytest.approx(runs["full"]["losses"][3:], rel=1e-6, abs=1e-6)


def _killed_save(rank, overrides, out):
    import compact_dist.training.checkpoint as ckpt_mod
    from compact_dist.training.train import run
    from compact_dist.training.train_config import load_train_config

    original = torch.save

    def dying_save(obj, path, *a, **k):
        if "compact_rank" in str(path) and "step_00000004" in str(path):
            raise KeyboardInterrupt("killed during save")
        return original(obj, path, *a, **k)

    ckpt_mod.torch.save = dying_save
    try:
        run(load_train_config(None, overrides))
    except KeyboardInterrupt:
        Path(out + f".{rank}").write_text("killed")


def test_killed_save_leaves_previous_checkpoint_loadable(tmp_path):
    ckpt = tmp_path / "ckpt"
    common = small(tmp_path, f"checkpoint.dir={ckpt}", "checkpoint.save_interval=2")
    run_distributed_raw(_killed_save, 1, common, str(tmp_path / "killed"))
    assert (tmp_path / "killed.0").exists()
    assert (ckpt / "latest").read_text() == "step_00000002"
    assert (ckpt / "step_00000004.partial").exists()  # the half-written one, under its
    assert not (ckpt / "step_00000004").exists()      # temporary name
    resumed = train(1, common, tmp_path, "after_kill")["losses"]
    assert len(resumed) == 2  # steps 3 and 4, continuing from step 2
    assert not (ckpt / "step_00000004.partial").exists()  # removed by the next save
    assert (ckpt / "step_00000004" / "complete").is_file()


def _run_signalled(rank, overrides, stop_rank, stop_step):
    """compact_dist.training.train.run where only `stop_rank` gets SIGUSR1, at step
    `stop_step`; its history plus "restored": whether run() put the previous handler back."""
    import signal

    import compact_dist.training.train as train_mod
    from compact_dist.training.logger import Logger
    from compact_dist.training.train_config import load_train_config

    original = Logger.step

    def step(logger, step, scalars, line, **kwargs):
        if rank == stop_rank and step == stop_step:
            os.kill(os.getpid(), signal.SIGUSR1)
        return original(logger, step, scalars, line, **kwargs)

    def mine(*args):
        pass

    Logger.step = step
    signal.signal(signal.SIGUSR1, mine)  # run() must put this one back
    try:
        history = train_mod.run(load_train_config(None, overrides))
    finally:
        Logger.step = original
    return {**history, "restored": signal.getsignal(signal.SIGUSR1) is mine}


def _stopped_then_resumed(rank, overrides, ckpt, out):
    """In the same processes (one start-up): the run that SIGUSR1 reaches on rank 1 alone at
    step 2, then the next run, which resumes from what it saved. Rank r writes {"stopped":
    history, "latest": `latest` between the runs, "resumed": history} to out.r."""
    from megatron.core import parallel_state

    stopped = _run_signalled(rank, overrides, 1, 2)
    parallel_state.destroy_model_parallel()  # run() sets the parallel state up again
    torch.distributed.barrier()
    latest = (Path(ckpt) / "latest").read_text()
    resumed = _run_signalled(rank, overrides, -1, 0)
    Path(f"{out}.{rank}").write_text(json.dumps(
        {"stopped": stopped, "latest": latest, "resumed": resumed}))


def test_signal_stops_every_rank_after_the_step_with_a_checkpoint(tmp_path):
    """SIGUSR1 to rank 1 alone at step 2 of 5: both ranks finish step 2 (the flag is
    all-reduced), save step_00000002 (save_interval 0: no other save before the end), return
    stopped_early with the step reached, and restore the previous handlers; the next run
    resumes at step 3."""
    ckpt = tmp_path / "ckpt"
    common = small(tmp_path, "train.train_steps=5", f"checkpoint.dir={ckpt}",
                   "checkpoint.save_interval=0")
    run_distributed_raw(_stopped_then_resumed, 2, common, str(ckpt), str(tmp_path / "out"))
    runs = [json.loads((tmp_path / f"out.{r}").read_text()) for r in range(2)]
    for h in (r["stopped"] for r in runs):
        assert h["stopped_early"] is True and h["step"] == 2 and len(h["losses"]) == 2
        assert h["restored"]
    assert runs[0]["stopped"]["losses"] == runs[1]["stopped"]["losses"]
    assert runs[0]["latest"] == "step_00000002"
    assert sorted(p.name for p in (ckpt / "step_00000002").glob("compact_rank*.pt")) == [
        "compact_rank0.pt", "compact_rank1.pt"]  # kept: keep_last 2
    resumed = runs[0]["resumed"]
    assert resumed["stopped_early"] is False and resumed["step"] == 5
    assert len(resumed["losses"]) == 3 and resumed["restored"]
    assert (ckpt / "latest").read_text() == "step_00000005"


def test_progress_rates_cover_the_last_interval_not_the_run():
    """A slow first interval (start-up) must not make later lines read as a speed-up: each
    line reports its own interval; MFU uses the model FLOPs and the GPU's peak."""
    from compact_dist.training.progress import ThroughputMeter, model_flops, peak_flops

    now = [0.0]
    meter = ThroughputMeter(tokens_per_step=1000, flops_per_token=6e9, peak=1e15, gpus=2,
                            start_step=0, total_steps=121, clock=lambda: now[0])
    now[0] = 10.0  # step 1 took 10 s (compilation, warm-up)
    first = meter.interval(1)
    now[0] = 12.0  # steps 2..21 took 0.1 s each
    second = meter.interval(21)
    assert first["perf/tokens_per_s"] == pytest.approx(100.0)
    assert second["perf/tokens_per_s"] == pytest.approx(10000.0)  # not 21000 / 12
    assert second["perf/step_time_s"] == pytest.approx(0.1)
    assert second["perf/mfu"] == pytest.approx(6e9 * 10000.0 / 2e15)
    assert second["perf/tokens_per_s_per_gpu"] == pytest.approx(5000.0)
    assert second["perf/tflops_per_gpu"] == pytest.approx(6e9 * 5000.0 / 1e12)
    assert second["perf/eta_s"] == pytest.approx(100 * 0.1)  # 100 steps left at 0.1 s
    totals = meter.totals(21)
    assert totals["tokens"] == 21000 and totals["tokens_per_s"] == pytest.approx(1750.0)
    assert peak_flops("NVIDIA H200") == peak_flops("NVIDIA H100 80GB HBM3") == 989.4e12
    assert peak_flops("NVIDIA GH200 480GB") == 989.4e12 and peak_flops("cpu") is None
    assert peak_flops("NVIDIA H100 PCIe") == 756.5e12  # the longest matching name wins
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("NVIDIA B200") == 2250e12
    assert peak_flops("NVIDIA L40S") == 362.05e12 and peak_flops("NVIDIA L40") == 181.05e12
    assert peak_flops("NVIDIA GeForce RTX 4090") == 165.2e12
    f = model_flops(layers=2, hidden=4, ffn=8, seq=16, vocab_padded=64)
    assert f["per_token"] == 6 * f["matmul_params"] + 6 * 2 * 4 * 16


def _logged(rank, overrides, out):
    """run() with stdout (not a terminal: no bar) and every scalar key that reaches
    TensorBoard recorded; rank 1 holds 400 MB more than rank 0, so the memory maximum over
    ranks is rank 1's."""
    import contextlib
    import io

    import compact_dist.training.train as train_mod
    from tensorboardX import SummaryWriter

    from compact_dist.training.train_config import load_train_config

    ballast = torch.ones(100 * 2**20) if rank == 1 else None  # 400 MB resident on rank 1
    printed, keys = io.StringIO(), set()
    original_add = SummaryWriter.add_scalar

    def add_scalar(writer, key, value, step):
        keys.add(key)
        original_add(writer, key, value, step)

    SummaryWriter.add_scalar = add_scalar
    with contextlib.redirect_stdout(printed):
        train_mod.run(load_train_config(None, overrides + ["train.train_steps=2"]))
    if rank == 0:
        Path(out).write_text(json.dumps({"lines": printed.getvalue().splitlines(),
                                         "keys": sorted(keys)}))
    del ballast


def test_log_lines_carry_what_megatron_users_grep_for(tmp_path):
    """2 ranks (DP=2), stdout not a terminal: start-up parameter counts, layout and whole-model
    saved ratio; per log step a line with every field (memory: the maximum over ranks, held by
    rank 1) and the same scalars in TensorBoard; the checkpoint save line with step, path and
    seconds (the load line: test_checkpoint_safety)."""
    import re

    ckpt = tmp_path / "ckpt"
    overrides = small(tmp_path, f"checkpoint.dir={ckpt}",
                      f"logging.tensorboard_dir={tmp_path / 'tb'}", "logging.peak_tflops=1")
    run_distributed_raw(_logged, 2, overrides, str(tmp_path / "log.json"))
    got = json.loads((tmp_path / "log.json").read_text())
    text = "\n".join(got["lines"])
    assert re.search(r"parameters: [\d,]+ total, [\d,]+ trainable \(subspace factors A: "
                     r"[\d,]+\), [\d,]+ frozen \(W0\)", text), text
    assert ("layout: world 2 = TP 1 x DP 2 (PP 1), sequence parallel off, ZeRO-1, fp32; micro "
            "batch 2, global batch 4 sequences = 128 tokens (gradient accumulation 1)") in text
    ratio = re.search(r"saved for backward, whole model .* ratio (\d\.\d+)", text)
    assert ratio and 0.5 < float(ratio.group(1)) < 1.0, text
    line = re.compile(
        r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] iteration 2/2 \| consumed tokens 256 \| "
        r"loss \d+\.\d{4} \| lr \d\.\d{3}E-0\d \| grad norm \d+\.\d{3} \| skipped 0 \| nan 0 \| "
        r"[\d,.]+ ms/step \| tokens/s/GPU [\d,]+ \| tokens/s [\d,]+ \| TFLOP/s/GPU [\d.e-]+ \| "
        r"MFU [\d.]+% \| mem allocated [\d.]+ GiB \(rank 1\) reserved [\d.]+ GiB \(rank 1\) \| "
        r"ETA 00:00:00")
    assert any(line.match(t) for t in got["lines"]), text
    assert re.search(r"saved checkpoint of step 2 to \S+step_00000002 in \d+\.\d\d s", text)
    for key in ("train/loss", "train/lr", "train/grad_norm", "train/consumed_tokens",
                "train/skipped_steps", "perf/step_time_s", "perf/tokens_per_s",
                "perf/tokens_per_s_per_gpu", "perf/tflops_per_gpu", "perf/mfu", "perf/eta_s",
                "perf/memory_allocated_GiB", "perf/memory_allocated_rank",
                "perf/memory_reserved_GiB", "valid/loss"):
        assert key in got["keys"], key

