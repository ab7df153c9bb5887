"""Where compact-train's rank-0 output goes: the tqdm bar, timestamped log lines, TensorBoard
and Weights & Biases (Logger); the log step's line itself is progress.progress_line."""

from __future__ import annotations

import sys
import time

from compact_dist.training.progress import progress_line
from compact_dist.training.train_config import TrainConfig


class Logger:
    """Rank-0 output: a tqdm bar on a terminal, timestamped log lines that Megatron-LM users
    grep for (`progress_line`) and the same scalars in TensorBoard (logging.tensorboard_dir)
    and Weights & Biases (logging.wandb_project, when wandb is installed)."""

    def __init__(self, cfg: TrainConfig, rank: int, start_step: int):
        self.active = rank == 0
        self.bar = self.writer = self.wandb = None
        self.total_steps = cfg.train.train_steps
        self.postfix = ""  # the bar's rates and memory of the last log line
        if not self.active:
            return
        if cfg.logging.progress:
            from tqdm import tqdm

            # disable=None: no bar when stdout is not a terminal (logs keep the step lines)
            self.bar = tqdm(total=cfg.train.train_steps, initial=start_step, unit="step",
                            dynamic_ncols=True, file=sys.stdout, disable=None)
        if cfg.logging.tensorboard_dir:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(cfg.logging.tensorboard_dir)
        if cfg.logging.wandb_project:
            import wandb  # checked importable at config load (TrainConfig.check_environment)

            self.wandb = wandb.init(project=cfg.logging.wandb_project,
                                    config=cfg.model_dump(mode="json"), resume="allow")

    def print(self, text: str) -> None:
        """A timestamped line on rank 0 (above the bar on a terminal)."""
        if not self.active:
            return
        line = f"[{timestamp()}] {text}"
        if self.bar:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def scalars(self, step: int, scalars: dict[str, float]) -> None:
        if not self.active:
            return
        if self.writer:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, step)
        if self.wandb:
            self.wandb.log(scalars, step=step)

    def step(self, step: int, scalars: dict[str, float], line: bool, fields: str = "") -> None:
        """scalars: train/loss, train/lr every step; on `line` steps also train/grad_norm,
        the skipped and non-finite step counts, the ThroughputMeter's rates over the steps
        since the previous line, the memory maximum over ranks (progress.memory_over_ranks),
        and on steps that measured the kept energy its scalars (compact_dist.training.quality)
        and `fields` for the line."""
        if not self.active:
            return
        self.scalars(step, scalars)
        if line:
            self.postfix = (f"{scalars['perf/tokens_per_s']:,.0f} tok/s "
                            f"mem {scalars['perf/memory_allocated_GiB']:.2f} GiB")
        if self.bar:
            self.bar.update(1)
            self.bar.set_postfix_str(f"loss {scalars['train/loss']:.3f} {self.postfix}",
                                     refresh=False)
        if line:
            self.print(progress_line(step, self.total_steps, scalars)
                       + (f" | {fields}" if fields else ""))

    def close(self) -> None:
        if self.bar:
            self.bar.close()
        if self.writer:
            self.writer.close()
        if self.wandb:
            self.wandb.finish()


def timestamp() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")
