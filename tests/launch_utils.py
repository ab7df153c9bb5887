"""Helpers of the launcher tests: run launch/ scripts as subprocesses (own process group,
killed on timeout or failure), parse the training log, inspect checkpoints."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
TINY = "configs/train/tiny.yaml"
DEFAULT = "configs/train/default.yaml"  # the embedded default job
STEP_LINE = re.compile(r"^\[[\d :-]+\] iteration\s+(\d+)/\d+ \| consumed tokens [\d,]+ \| "
                       r"loss ([0-9.]+) \|", re.M)


def quick(cache: Path, steps: int = 3, *extra: str) -> list[str]:
    """Overrides for a few logged steps of any config, data cache outside the repository."""
    return [f"data.cache_dir={cache}", f"train.train_steps={steps}", "train.log_interval=1",
            "train.eval_batches=2", "logging.progress=false", *extra]


def script_env(**extra: str) -> dict[str, str]:
    """The test environment without any launcher / Slurm / rank variables, the interpreter's
    bin directory first on PATH (compact-train, torchrun, deepspeed), CPU only."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "PMI_", "OMPI_"))
           and k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                         "MASTER_PORT", "NODE_RANK", "NNODES", "NPROC_PER_NODE", "GPUS_PER_NODE",
                         "CONFIG",
                         "HOSTFILE", "CKPT_DIR", "TRAIN_CMD", "GROUP_RANK")}
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env["CUDA_VISIBLE_DEVICES"] = ""  # the launchers count GPUs; these tests run on CPU
    env["PYTHONUNBUFFERED"] = "1"
    env["OMP_NUM_THREADS"] = "1"  # same arithmetic under every launcher (compared losses)
    env.update(extra)
    return env


def start(cmd: list[str], env: dict, log: Path, cwd: Path = ROOT) -> subprocess.Popen:
    """Start cmd in its own session (so the whole tree can be killed), output to log."""
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def kill_tree(proc: subprocess.Popen) -> None:
    """Kill the process group we started (leader's pid = group id)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)


def wait_all(procs: list[subprocess.Popen], timeout: float) -> list[int]:
    """Wait for every process; on timeout kill them all and raise."""
    deadline = time.monotonic() + timeout
    try:
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        raise AssertionError(f"launch did not finish within {timeout:.0f} s")
    finally:
        for proc in procs:
            kill_tree(proc)
    return [proc.returncode for proc in procs]


def run_script(cmd: list[str], env: dict, timeout: float = 60,
               cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Run a short command (help / failing config) and return its output."""
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def losses(log_text: str) -> dict[int, float]:
    """{step: loss} from the `[date time] iteration N/total | consumed tokens T | loss X | ...`
    lines of rank 0."""
    return {int(s): float(v) for s, v in STEP_LINE.findall(log_text)}


def checkpoint_layout(ckpt: Path) -> tuple[str, set[str]]:
    """(content of `latest`, file names inside the checkpoint it names)."""
    latest = (ckpt / "latest").read_text().strip()
    return latest, {p.name for p in (ckpt / latest).iterdir()}


def assert_tp2_dp2_checkpoint(ckpt: Path, step: int) -> None:
    """A complete checkpoint of a TP=2 x DP=2 run: two model shards (one per TP rank), the
    ZeRO optimizer states of every (DP, TP) pair and the per-rank CompAct state of 4 ranks."""
    latest, files = checkpoint_layout(ckpt)
    assert latest == f"step_{step:08d}"
    for tp in (0, 1):  # ZeRO-1/2: mp_rank_0T_model_states.pt; ZeRO-3: one per DP rank too
        assert any(f.endswith(f"mp_rank_{tp:02d}_model_states.pt") for f in files), files
    for dp in (0, 1):
        for tp in (0, 1):
            assert f"zero_pp_rank_{dp}_mp_rank_{tp:02d}_optim_states.pt" in files, files
    assert {f"compact_rank{r}.pt" for r in range(4)} <= files, files
    assert "compact_rank4.pt" not in files


def have(program: str) -> bool:
    return shutil.which(program) is not None
