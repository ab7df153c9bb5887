"""`compact-train` / `python -m compact_dist.training.train`: pretrain a Megatron-core GPT with CompAct
layers under DeepSpeed ZeRO (`train.engine: deepspeed`, the default) or torch FSDP2
(`train.engine: fsdp2`), both behind compact_dist.training.engine_base.TrainingEngine.

    compact-train [--config configs/train/tiny.yaml] [section.key=value ...]

Without --config it runs the embedded default: a 4-layer LLaMA-style model on the running
interpreter's standard-library source, BPE tokenizer trained locally, CompAct ratio 1/4.
`compression.enabled=false` trains the Megatron baseline for comparison. Ranks come from the
environment (torchrun, the deepspeed launcher or srun), so the same command runs under each.

This module is the training loop; what it drives comes from the modules beside it: the
processes (distributed.py), the model (model_setup.py), the engine and its schedule
(engine_setup.py), the checkpoints (checkpoint.py, resume.py) and the output (logger.py,
progress.py).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import os
import signal
import sys
import threading
import time
from typing import Optional

import torch

from compact_dist.training.checkpoint_dir import CheckpointError
from compact_dist.training.distributed import init_distributed
from compact_dist.training.engine_setup import build_training_engine
from compact_dist.training.logger import Logger
from compact_dist.training.model_setup import build_model
from compact_dist.training.nonfinite import NonFiniteError
from compact_dist.training.progress import throughput_meter
from compact_dist.training.train_config import TrainConfig, load_train_config, world_from_environment


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="compact-train", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Config keys (sections model, parallel, data, optim, train, recompute, "
               "checkpoint, logging,\ncompression, activations): compact-train --help-config",
    )
    parser.add_argument("--config", help="YAML config (default: the embedded default job)")
    parser.add_argument("--print-config", action="store_true",
                        help="validate, print the resolved config as JSON and exit")
    parser.add_argument("--help-config", action="store_true",
                        help="list every config key with its type, default and meaning, "
                             "and exit")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help=argparse.SUPPRESS)  # passed by the deepspeed launcher; env wins
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    return parser.parse_args(argv)


class GracefulStop:
    """SIGTERM / SIGUSR1 / SIGINT (Ctrl-C) end training after the current optimizer step, with
    a checkpoint when checkpoint.dir is set. The handler only sets a flag; `requested_anywhere`
    all-reduces it over the world group once per step, so every rank stops after the same step.
    A second SIGINT more than REPEAT_S after the first raises KeyboardInterrupt (quit at once;
    saves are atomic); sooner ones are ignored, because a launcher forwards the terminal's
    Ctrl-C to workers that already got it (torchrun). `install` (before the training loop) and
    `restore` (when run() returns or raises) swap the previous handlers in and out; before the
    loop the signals keep their previous meaning."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
    REPEAT_S = 2.0

    def __init__(self) -> None:
        self.requested = False
        self.signal: Optional[int] = None
        self._previous: dict = {}
        self._first_sigint: Optional[float] = None

    def _handler(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            now = time.monotonic()
            if self._first_sigint is None:
                self._first_sigint = now
                if os.environ.get("RANK", "0") == "0":
                    os.write(2, b"compact-train: SIGINT: stopping after this step (with a "
                                b"checkpoint if checkpoint.dir is set); Ctrl-C again to quit "
                                b"at once\n")
            elif now - self._first_sigint > self.REPEAT_S:
                raise KeyboardInterrupt
        if not self.requested:
            self.requested, self.signal = True, signum

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # Python sets signal handlers in the main thread only
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handler)

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)
        self._previous.clear()

    def requested_anywhere(self, device: torch.device) -> bool:
        import torch.distributed as dist

        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return self.requested
        flag = torch.tensor(float(self.requested), device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() > 0


def probe_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Loss of the first half (at least one) of a micro-batch's sequences: the probe that
    projection='gradient' runs at each resample and the kept-energy telemetry before it. Half
    a micro-batch with uncompressed linear inputs saves fewer bytes than a full compressed
    one, so the probe does not raise the peak. The stepper freezes the parameters during the
    probe: the embedding's output is made a leaf that requires grad, for the backward to
    flow from."""
    half = max(1, batch["tokens"].shape[0] // 2)
    hook = model.embedding.register_forward_hook(
        lambda module, args, out: out.detach().requires_grad_())
    try:
        return model(batch["tokens"][:half], batch["position_ids"][:half], None,
                     labels=batch["labels"][:half]).float().mean()
    finally:
        hook.remove()


def run(cfg: TrainConfig) -> dict:
    """Train per `cfg`; returns {"losses": [...], "valid": [(step, loss)], "kept_energy":
    [(step, {layer name: fraction})], "step": int, "stopped_early": bool} (rank-local,
    DP-averaged): the losses of the steps this call ran, the kept-energy measurements, the
    step reached, and whether SIGTERM / SIGUSR1 stopped it before train.train_steps
    (GracefulStop; it saved a checkpoint at that step when checkpoint.dir is set)."""
    stop = GracefulStop()
    try:
        return _train(cfg, stop)
    finally:
        stop.restore()


class _Run:
    """What the training loop holds: the config, the process groups' sizes, the data, the
    engine (compact_dist.training.engine_base.TrainingEngine) with its stepper, the logger
    and meters, the step reached and the newest checkpoint of this trajectory."""

    def __init__(self, cfg: TrainConfig) -> None:
        from megatron.core import parallel_state as ps

        from compact_dist.training import resume
        from compact_dist.training.data import build_data

        rank, _, world = world_from_environment()
        cfg.check_environment(world, torch.cuda.is_available())
        self.cfg = cfg
        self.plan = resume.plan(cfg)  # checkpoint.dir writable, what to resume: before groups
        self.device = init_distributed(cfg)
        resume.same_on_every_rank(self.plan.tag)
        self.bf16 = cfg.train.precision == "bf16" or (
            cfg.train.precision == "auto" and self.device.type == "cuda")
        self.world, self.rank = world, rank
        self.dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        self.grad_accum = cfg.gradient_accumulation_steps(self.dp)
        if cfg.recompute.deepspeed_checkpointing:  # train.engine=deepspeed (checked at load)
            from compact_dist.deepspeed.engine import use_deepspeed_checkpointing

            use_deepspeed_checkpointing(cfg.train.seed)
        micro = cfg.train.micro_batch_size
        self.tokenizer, self.train_iter, self.valid_batches = build_data(
            cfg.data, cfg.model.seq_length, micro, dp_rank, self.dp,
            train_samples=cfg.train.train_steps * micro * self.grad_accum * self.dp,
            valid_samples=cfg.train.eval_batches * micro * self.dp)
        self.tokens_per_step = micro * self.grad_accum * self.dp * cfg.model.seq_length
        self.step, self.saved = 0, self.plan.tag  # saved: the newest checkpoint of this run
        self.history = {"losses": [], "valid": [], "kept_energy": [], "lines": [],
                        "stopped_early": False}

    def to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}


def _build(run_: _Run) -> None:
    """The model, the start-up lines (data, parameters, layout, memory of the linears and
    of the saved activations), the engine and its stepper, the kept-energy report."""
    from compact_dist.training import startup
    from compact_dist.training.quality import KeptEnergyReport
    from compact_dist.training.run_files import write_run_files
    from compact_dist.training.startup import linear_memory_table

    cfg, device = run_.cfg, run_.device
    micro, tp = cfg.train.micro_batch_size, cfg.parallel.tensor_model_parallel_size
    model = build_model(cfg, device, run_.bf16, run_.tokenizer.vocab_size)
    run_.run_files = functools.partial(write_run_files, cfg=cfg, tokenizer=run_.tokenizer,
                                       model=model)
    log = run_.log = Logger(cfg, run_.rank, 0)
    for line in run_.train_iter.summary:
        log.print(line)
    log.print(startup.parameter_line(startup.parameter_counts(model, tp)))
    log.print(startup.layout_line(run_.world, tp, cfg.parallel.sequence_parallel,
                                  cfg.train.zero_stage, micro, run_.grad_accum,
                                  cfg.model.seq_length, "bf16" if run_.bf16 else "fp32",
                                  cfg.train.engine))
    log.print(linear_memory_table(model, cfg.model.seq_length, micro, device))
    log.print(startup.saved_activation_line(*startup.saved_activation_bytes(
        model, micro, cfg.model.seq_length, device, cfg.train.seed)))
    if device.type == "cuda":  # the progress lines' peaks: training's, not this measurement's
        torch.cuda.reset_peak_memory_stats(device)
    run_.engine, run_.stepper = build_training_engine(cfg, model, run_.bf16, device, run_.dp)
    run_.stepper.measure_kept_energy = cfg.logging.kept_energy
    run_.quality = KeptEnergyReport(run_.engine.module, cfg.compression,
                                    cfg.logging.kept_energy_warn_below)


def _resume(run_: _Run) -> None:
    """Load the planned checkpoint (engine, stepper, data position), if any."""
    from compact_dist.training import resume

    cfg, log = run_.cfg, run_.log
    for note in run_.plan.notes:
        log.print(note)
    if run_.plan.tag is not None:
        started = time.perf_counter()
        state = resume.load_with_run_settings(run_.engine, cfg.checkpoint.dir, run_.plan.tag)
        run_.step = state["step"]
        run_.stepper.steps = state["stepper_steps"]
        run_.train_iter.load_state_dict(state["data"])
        log.print(f"resumed from step {run_.step} in {cfg.checkpoint.dir}: loaded checkpoint "
                  f"{os.path.join(cfg.checkpoint.dir, run_.plan.tag)} in "
                  f"{time.perf_counter() - started:.2f} s")
    if log.bar:
        log.bar.n = run_.step


def _optimizer_step(run_: _Run) -> tuple[float, float]:
    """One optimizer step: the probe (when the stepper needs one), forward and backward of
    each micro-batch, the engine's step, the merge (and resample); returns (the loss
    averaged over micro-batches and data-parallel ranks, the learning rate the step used)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    engine, stepper = run_.engine, run_.stepper
    loss_sum = torch.zeros((), device=run_.device)
    batches = (run_.to_device(next(run_.train_iter)) for _ in range(run_.grad_accum))
    first = next(batches)
    stepper.before_step(lambda: probe_loss(engine.module, first))
    for b in itertools.chain([first], batches):
        loss = engine(b["tokens"], b["position_ids"], None, labels=b["labels"]).float().mean()
        engine.backward(loss)
        loss_sum += loss.detach()
    lr = engine.lr  # the rate this optimizer step uses
    engine.step()
    stepper.after_step(lr, run_.cfg.optim.weight_decay, engine.optimizer)
    run_.step += 1
    dist.all_reduce(loss_sum, group=ps.get_data_parallel_group())
    return (loss_sum / (run_.grad_accum * run_.dp)).item(), lr


def _record(run_: _Run, loss: float, lr: float) -> Optional[str]:
    """The step's loss, the non-finite check, the kept energy, the scalars and, on log
    steps, the progress line; returns what was not finite (None: all finite)."""
    from compact_dist.training.progress import memory_over_ranks

    step, engine, quality = run_.step, run_.engine, run_.quality
    run_.history["losses"].append(loss)
    problem = run_.nonfinite.problem(step, loss)  # before this step's checkpoint
    run_.nonfinite_since_line += bool(problem)
    stepper = run_.stepper
    kept = {} if stepper.kept_energy is None else quality.record(step, stepper.kept_energy)
    line = step % run_.cfg.train.log_interval == 0 or step == 1 or bool(kept) or bool(problem)
    scalars = {"train/loss": loss, "train/lr": lr, **kept}
    if run_.nonfinite.norm is not None:
        scalars["train/grad_norm"] = run_.nonfinite.norm
    if line:  # the same steps on every rank: memory_over_ranks is a collective
        scalars.update({
            "train/consumed_tokens": step * run_.tokens_per_step,
            "train/skipped_steps": engine.skipped_steps,
            "train/skipped_steps_interval": engine.skipped_steps - run_.skipped_at_line,
            "train/nonfinite_steps_interval": run_.nonfinite_since_line,
            **run_.meter.interval(step), **memory_over_ranks(run_.device)})
        run_.skipped_at_line, run_.nonfinite_since_line = engine.skipped_steps, 0
    run_.log.step(step, scalars, line=line, fields=quality.fields() if kept else "")
    if line:
        run_.history["lines"].append({"step": step, **scalars})
    if kept:
        run_.history["kept_energy"].append((step, dict(zip(quality.names, quality.values))))
        if quality.warning():
            run_.log.print(quality.warning())
    return problem


def _stop_on_nonfinite(run_: _Run, problem: str) -> None:
    cfg = run_.cfg
    run_.log.close()
    where = (f"the last checkpoint is {os.path.join(cfg.checkpoint.dir, run_.saved)}"
             if run_.saved else "no checkpoint was saved" if cfg.checkpoint.dir
             else "checkpoint.dir is not set")
    raise NonFiniteError(f"{problem}: stopped without saving this step; {where}")


def _evaluate(run_: _Run) -> float:
    """The validation loss over train.eval_batches micro-batches per data-parallel rank."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    engine, device = run_.engine, run_.device
    engine.eval()
    total, count = torch.zeros((), device=device), 0
    with torch.no_grad():
        for batch in run_.valid_batches(run_.cfg.train.eval_batches):
            b = run_.to_device(batch)
            total += engine(b["tokens"], b["position_ids"], None,
                            labels=b["labels"]).float().mean()
            count += 1
    engine.train()
    dist.all_reduce(total, group=ps.get_data_parallel_group())
    return (total / (count * run_.dp)).item()


def _validate_if_due(run_: _Run) -> None:
    step, cfg = run_.step, run_.cfg
    if not (step % cfg.train.eval_interval == 0 or step == cfg.train.train_steps):
        return
    vloss = _evaluate(run_)
    run_.history["valid"].append((step, vloss))
    run_.log.print(f"step {step:5d} | validation loss {vloss:.4f} | "
                   f"perplexity {math.exp(min(vloss, 50)):.2f}")
    run_.log.scalars(step, {"valid/loss": vloss, "valid/perplexity": math.exp(min(vloss, 50))})


def _save_if_due(run_: _Run, stopping: bool) -> None:
    """A checkpoint at save_interval steps, at the last step and when stopping."""
    from compact_dist.training.checkpoint import save_checkpoint

    step, cfg = run_.step, run_.cfg
    interval = cfg.checkpoint.save_interval
    if not cfg.checkpoint.dir or not ((interval and step % interval == 0) or stopping
                                      or step == cfg.train.train_steps):
        return
    started = time.perf_counter()
    run_.saved = save_checkpoint(run_.engine, cfg.checkpoint.dir, step, {
        "step": step, "stepper_steps": run_.stepper.steps,
        "data": run_.train_iter.state_dict()}, cfg.checkpoint.keep_last, run_.run_files)
    run_.log.print(f"saved checkpoint of step {step} to "
                   f"{os.path.join(cfg.checkpoint.dir, run_.saved)} in "
                   f"{time.perf_counter() - started:.2f} s")


def _note_stop(run_: _Run, stop: GracefulStop) -> None:
    cfg = run_.cfg
    run_.history["stopped_early"] = run_.step < cfg.train.train_steps
    by = signal.Signals(stop.signal).name if stop.signal else "another rank's signal"
    run_.log.print(f"stopped by {by} after step {run_.step}"
                   + (f", checkpoint in {cfg.checkpoint.dir}" if cfg.checkpoint.dir else ""))


def _summary(run_: _Run) -> None:
    """The run's last lines: losses, validation, kept energy, totals and peak memory."""
    from compact_dist.training.progress import local_memory_gib

    history, step = run_.history, run_.step
    if not history["losses"]:
        return
    first, last = history["losses"][0], history["losses"][-1]
    ended = "stopped" if history["stopped_early"] else "done"
    summary = f"{ended}: {step} steps, train loss {first:.3f} -> {last:.3f}"
    if history["valid"]:
        vloss = history["valid"][-1][1]
        summary += f", validation loss {vloss:.3f} (perplexity {math.exp(min(vloss, 50)):.1f})"
    if run_.quality.summary():
        summary += "\n" + run_.quality.summary()
    total = run_.meter.totals(step)
    allocated, reserved = local_memory_gib(run_.device)
    run_.log.print(summary + f"\ntotals: {total['steps']} steps, {total['tokens']:,} tokens in "
                   f"{total['seconds']:.1f} s ({total['tokens_per_s']:,.0f} tokens/s with "
                   f"evaluations and checkpoints), peak memory of rank 0: allocated "
                   f"{allocated:.2f} GiB, reserved {reserved:.2f} GiB")


def _train(cfg: TrainConfig, stop: GracefulStop) -> dict:
    from compact_dist.training.nonfinite import NonFiniteCheck

    run_ = _Run(cfg)
    _build(run_)
    _resume(run_)
    stop.install()
    run_.meter = throughput_meter(cfg, tokens_per_step=run_.tokens_per_step, bf16=run_.bf16,
                                  device=run_.device, start_step=run_.step,
                                  vocab_size=run_.tokenizer.vocab_size)
    run_.nonfinite = NonFiniteCheck(run_.engine)
    run_.skipped_at_line, run_.nonfinite_since_line = run_.engine.skipped_steps, 0
    run_.engine.train()
    while run_.step < cfg.train.train_steps:
        loss, lr = _optimizer_step(run_)
        problem = _record(run_, loss, lr)
        if problem:
            _stop_on_nonfinite(run_, problem)
        _validate_if_due(run_)
        stopping = stop.requested_anywhere(run_.device)  # every rank agrees (all-reduced)
        _save_if_due(run_, stopping)
        if stopping:
            _note_stop(run_, stop)
            break
    run_.nonfinite.close()
    run_.history["step"] = run_.step
    _summary(run_)
    run_.log.close()
    return run_.history


INVALID_CONFIGURATION_EXIT = 2  # like a usage error (argparse, the launch scripts' die)


def main(argv: Optional[list[str]] = None) -> None:
    import warnings

    # megatron-core 0.16.1 warns about its own default cuda_graph_scope on every config
    warnings.filterwarnings("ignore", message="full scope is deprecated")
    args = parse_args(argv)
    if args.help_config:
        from compact_dist.training.config_help import help_config

        print(help_config())
        return
    try:  # every configuration error surfaces here, before any process group exists
        cfg = load_train_config(args.config, args.overrides)
        _, _, world = world_from_environment()
        cfg.check_environment(world, torch.cuda.is_available())
    except ValueError as err:  # one line (compact_dist.core.config_loading); docs/BAD_INPUT.md
        print(f"compact-train: invalid configuration: {err}", file=sys.stderr)
        sys.exit(INVALID_CONFIGURATION_EXIT)
    if args.print_config:
        print(json.dumps(cfg.model_dump(), indent=1))
        return
    try:
        run(cfg)
    except (CheckpointError, NonFiniteError) as err:  # one line on every rank, exit status 1
        sys.exit(f"compact-train: {err}")
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
