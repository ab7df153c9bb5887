"""launch/slurm/pretrain.sbatch on a real Slurm cluster on localhost.

The module installs Debian's slurm-wlm and munge when they are missing (skipped only where
that is impossible: not root, no apt-get, or apt-get cannot reach a mirror), starts munged,
slurmctld and one slurmd per emulated node (two nodes; one node if this Slurm build cannot run
several slurmd on one host) with the configuration tests/slurm/slurm.conf.in, submits the
batch script, and stops every daemon it started by PID, also on failure.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path
from string import Template

import pytest

from conftest import free_port
from launch_utils import (DEFAULT, LAUNCH, ROOT, TINY, assert_tp2_dp2_checkpoint, checkpoint_layout,
                          losses, quick, script_env)

SBATCH_SCRIPT = str(LAUNCH / "slurm" / "pretrain.sbatch")
TEMPLATE = Path(__file__).parent / "slurm" / "slurm.conf.in"
SBIN_PATH = "/usr/local/sbin:/usr/sbin:/sbin"
PROGRAMS = ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo", "munged")
CRED_EXPIRE = 10  # seconds; also the wait before a requeued job may start again
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


def _which(program: str) -> str | None:
    return shutil.which(program, path=os.environ.get("PATH", "") + os.pathsep + SBIN_PATH)


def _install_slurm() -> str | None:
    """None when the Slurm and munge programs are available, else why they cannot be."""
    if all(_which(p) for p in PROGRAMS):
        return None
    if os.geteuid() != 0:
        return "slurm-wlm/munge are not installed and installing them needs root"
    if not _which("apt-get"):
        return "slurm-wlm/munge are not installed and there is no apt-get to install them"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    env["PATH"] = env.get("PATH", "") + os.pathsep + SBIN_PATH
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "slurm-wlm", "munge"]
    # Keep the packages' init scripts from starting system daemons: this test runs its own.
    policy = Path("/usr/sbin/policy-rc.d")
    created = not policy.exists()
    if created:
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    try:
        proc = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:  # stale package lists: update once and retry
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True,
                           timeout=600)
            proc = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        return "apt-get install slurm-wlm munge timed out (no network?)"
    finally:
        if created:
            policy.unlink()
    if proc.returncode != 0:
        return f"apt-get install slurm-wlm munge failed (no network?): {proc.stderr[-500:]}"
    missing = [p for p in PROGRAMS if not _which(p)]
    return f"installed, but {missing} not found" if missing else None


class Cluster:
    """munged + slurmctld + N slurmd on localhost, all started (and stopped) by us."""

    def __init__(self, base: Path, nodes: int):
        self.dir = base / f"cluster{nodes}"
        self.nodes = nodes
        self.node_names = [f"node{i + 1}" for i in range(nodes)]
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.conf = self.dir / "slurm.conf"

    # -- environment of the client commands and of submitted jobs
    def env(self, **extra: str) -> dict[str, str]:
        env = script_env(SLURM_CONF=str(self.conf), **extra)
        env["PATH"] = env["PATH"] + os.pathsep + SBIN_PATH
        return env

    def run(self, *cmd: str, timeout: float = 30, check: bool = True) -> str:
        proc = subprocess.run(cmd, env=self.env(), capture_output=True, text=True,
                              timeout=timeout, cwd=ROOT)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stdout}{proc.stderr}")
        return proc.stdout

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = open(self.dir / "log" / f"{name}.out", "wb")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.dir,
                                env=self.env(), start_new_session=True)
        log.close()
        self.procs.append((name, proc))
        return proc

    def _wait(self, what: str, ready, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited ({proc.returncode}) while waiting for "
                                       f"{what}:\n{self.logs()}")
            try:
                if ready():
                    return
            except (RuntimeError, subprocess.TimeoutExpired):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"timed out waiting for {what}:\n{self.logs()}")

    def logs(self) -> str:
        out = []
        for path in sorted((self.dir / "log").glob("*")):
            out.append(f"--- {path.name}\n{path.read_text(errors='replace')[-2000:]}")
        return "\n".join(out)

    def start(self) -> None:
        for sub in ("state", "log", "munge", *(f"spool/{n}" for n in self.node_names)):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        munge = self.dir / "munge"
        munge.chmod(0o755)
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(stat.S_IRUSR | stat.S_IWUSR)
        socket_path = munge / "munge.socket"
        self._spawn("munged", [_which("munged"), "--foreground", "--force",
                               f"--socket={socket_path}", f"--key-file={key}",
                               f"--pid-file={munge / 'munged.pid'}",
                               f"--log-file={self.dir / 'log' / 'munged.log'}",
                               f"--seed-file={munge / 'munged.seed'}"])
        self._wait("munged", socket_path.exists, 30)

        hostname = socket.gethostname().split(".")[0]
        node_lines = "\n".join(
            f"NodeName={name} NodeHostname={hostname} NodeAddr=127.0.0.1 Port={free_port()} "
            f"CPUs=2 RealMemory=1000 State=UNKNOWN" for name in self.node_names)
        self.conf.write_text(Template(TEMPLATE.read_text()).substitute(
            hostname=hostname, ctld_port=free_port(), slurmd_port=free_port(),
            munge_socket=socket_path, cred_expire=CRED_EXPIRE, dir=self.dir,
            node_lines=node_lines, nodes=self.nodes))

        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-f", str(self.conf)])
        self._wait("slurmctld", lambda: "UP" in self.run("scontrol", "ping", timeout=10), 60)
        for name in self.node_names:
            self._spawn(f"slurmd-{name}", [_which("slurmd"), "-D", "-f", str(self.conf),
                                           "-N", name])
        self._wait(f"{self.nodes} idle node(s)", self._all_idle, 90)

    def _all_idle(self) -> bool:
        states = self.run("sinfo", "-h", "-N", "-o", "%N %T", timeout=10).split()
        return states.count("idle") == self.nodes

    def stop(self) -> None:
        """Cancel jobs, then stop the daemons we started (SIGTERM, then SIGKILL) by PID."""
        try:
            if any(n == "slurmctld" and p.poll() is None for n, p in self.procs):
                self.run("scancel", "--user", "root", check=False, timeout=15)
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline and self.run(
                        "squeue", "-h", "-o", "%i", check=False, timeout=10).strip():
                    time.sleep(0.5)
        except (subprocess.TimeoutExpired, OSError):
            pass
        for name, proc in reversed(self.procs):  # slurmd, slurmctld, then munged
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=15)

    # -- jobs
    def submit(self, sbatch_args: list[str], env: dict[str, str], script_args: list[str]) -> str:
        proc = subprocess.run(["sbatch", "--parsable", *sbatch_args, SBATCH_SCRIPT, *script_args],
                              env=self.env(**env), capture_output=True, text=True, timeout=30,
                              cwd=ROOT)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        text = self.run("scontrol", "show", "job", "-o", job_id, timeout=10)
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def wait_job(self, job_id: str, timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in FINAL_STATES:
                return info
            time.sleep(1)
        self.run("scancel", job_id, check=False)
        raise AssertionError(f"job {job_id} did not finish in {timeout} s: {self.job(job_id)}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = _install_slurm()
    if reason:
        pytest.skip(reason)
    base = tmp_path_factory.mktemp("slurm")
    errors = []
    for nodes in (2, 1):  # two emulated nodes if this Slurm build runs several slurmd per host
        c = Cluster(base, nodes)
        try:
            c.start()
        except Exception as err:  # noqa: BLE001 - fall back to one node, report both
            errors.append(f"{nodes} node(s): {err}")
            c.stop()
            continue
        try:
            yield c
        finally:
            c.stop()
        return
    raise RuntimeError("could not start a Slurm cluster on localhost:\n" + "\n".join(errors))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("slurm_data")


def _layout(cluster: Cluster, ranks: int) -> list[str]:
    """sbatch options for `ranks` tasks spread over the emulated nodes (CPU, no GPUs)."""
    per_node = ranks // cluster.nodes
    return [f"--nodes={cluster.nodes}", f"--ntasks-per-node={per_node}", "--cpus-per-task=1",
            "--gpus-per-node=0", "--time=10"]


def test_sbatch_two_tasks_trains_and_checkpoints(cluster, tmp_path, cache):
    ckpt = tmp_path / "ckpt"
    out = tmp_path / "job-%j.out"
    job = cluster.submit(
        [*_layout(cluster, 2), f"--output={out}", "--job-name=compact-test"],
        {"CONFIG": DEFAULT, "CKPT_DIR": str(ckpt), "MASTER_PORT": str(free_port())},
        quick(cache, 3, "checkpoint.save_interval=2"))
    info = cluster.wait_job(job, 600)
    log = Path(str(out).replace("%j", job)).read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, log[-4000:])
    assert f"job {job} restart 0: {cluster.nodes} node(s)" in log
    assert "mode srun" in log and "master 127.0.0.1:" in log
    assert sorted(losses(log)) == [1, 2, 3], log[-4000:]
    assert "done: 3 steps" in log
    assert "training finished with exit status 0" in log
    latest, files = checkpoint_layout(ckpt)
    assert latest == "step_00000003"
    assert {"compact_rank0.pt", "compact_rank1.pt"} <= files and "compact_rank2.pt" not in files
    assert (ckpt / "step_00000002").is_dir()  # save_interval=2, keep_last=2


def test_sbatch_torchrun_mode_tp2_dp2(cluster, tmp_path, cache):
    """LAUNCH_MODE=torchrun: one srun task per node, torchrun starts the ranks (4 in all)."""
    ckpt = tmp_path / "ckpt"
    out = tmp_path / "job-%j.out"
    job = cluster.submit(
        [f"--nodes={cluster.nodes}", "--ntasks-per-node=1", "--cpus-per-task=1",
         "--gpus-per-node=0", "--time=10", f"--output={out}"],
        {"CONFIG": TINY, "CKPT_DIR": str(ckpt), "MASTER_PORT": str(free_port()),
         "LAUNCH_MODE": "torchrun", "GPUS_PER_NODE": str(4 // cluster.nodes)},
        quick(cache, 3, "parallel.tensor_model_parallel_size=2"))
    info = cluster.wait_job(job, 600)
    log = Path(str(out).replace("%j", job)).read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, log[-4000:])
    assert "mode torchrun" in log
    assert sorted(losses(log)) == [1, 2, 3], log[-4000:]
    assert_tp2_dp2_checkpoint(ckpt, 3)


REQUEUE_STEPS = 80
REQUEUE_SAVE_INTERVAL = 10


@pytest.fixture(scope="module")
def requeued(cluster, tmp_path_factory, cache):
    """One job per launch mode (srun: a task per rank; torchrun: a task per node), submitted
    together so that they run side by side (each takes one of the two CPUs of every emulated
    node). When a job's first checkpoint appears, SIGUSR1 goes to its batch shell (what
    --signal=B:USR1@300 sends before the time limit), whose trap requeues the job.
    {mode: (job id, final `scontrol show job`, the job's log, CKPT_DIR)}."""
    base = tmp_path_factory.mktemp("requeue")
    submitted = {}
    for mode in ("srun", "torchrun"):
        ckpt, out = base / mode / "ckpt", base / mode / "job-%j.out"
        ckpt.parent.mkdir()
        layout, env = _layout(cluster, 2), {}
        if mode == "torchrun":
            layout = [f"--nodes={cluster.nodes}", "--ntasks-per-node=1", "--cpus-per-task=1",
                      "--gpus-per-node=0", "--time=10"]
            env = {"LAUNCH_MODE": "torchrun", "GPUS_PER_NODE": str(2 // cluster.nodes)}
        job = cluster.submit(
            [*layout, f"--output={out}"],
            {"CONFIG": TINY, "CKPT_DIR": str(ckpt), "MASTER_PORT": str(free_port()), **env},
            quick(cache, REQUEUE_STEPS, f"checkpoint.save_interval={REQUEUE_SAVE_INTERVAL}",
                  f"train.log_interval={REQUEUE_SAVE_INTERVAL}", "checkpoint.keep_last=10"))
        submitted[mode] = job, out, ckpt
    waiting = dict(submitted)
    deadline = time.monotonic() + 300
    while waiting:
        for mode, (job, _, ckpt) in list(waiting.items()):
            if (ckpt / "latest").exists():
                cluster.run("scancel", "--batch", "--signal=USR1", job)
                del waiting[mode]
                continue
            info = cluster.job(job)
            assert info["JobState"] in ("PENDING", "CONFIGURING", "RUNNING"), (mode, info)
        assert time.monotonic() < deadline, f"no checkpoint within 300 s: {sorted(waiting)}"
        time.sleep(0.2)
    done = {}
    for mode, (job, out, ckpt) in submitted.items():
        info = cluster.wait_job(job, 600)
        done[mode] = job, info, Path(str(out).replace("%j", job)).read_text(), ckpt
    return done


@pytest.mark.parametrize("mode", ["srun", "torchrun"])
def test_sbatch_requeues_on_usr1_and_resumes_from_the_checkpoint(requeued, mode):
    """SIGUSR1 to the batch shell (fixture `requeued`) -> scontrol requeue -> the same job id
    runs again and resumes from CKPT_DIR/latest. In torchrun mode the requeue's SIGTERM
    reaches the ranks through torchrun."""
    job, info, log, ckpt = requeued[mode]
    steps = REQUEUE_STEPS
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, log[-4000:])
    assert info["Restarts"] == "1", info
    first, _, second = log.partition(f"job {job} restart 1:")
    assert second, log[-4000:]  # the requeued run appended to the same log (--open-mode=append)
    assert "received SIGUSR1" in first and f"requeueing job {job}" in first
    assert f"mode {mode}" in first
    assert "done:" not in first  # interrupted before the end
    # the requeue's SIGTERM made compact-train finish its step and checkpoint there
    # (GracefulStop), so the next run starts from that step, not the last periodic checkpoint
    stopped = re.search(r"stopped by SIG\w+ after step (\d+), checkpoint", first)
    resumed = re.search(r"resumed from step (\d+)", second)
    assert stopped and resumed, (first[-4000:], second[-4000:])
    assert int(resumed.group(1)) == int(stopped.group(1)), (stopped.group(0), resumed.group(0))
    assert REQUEUE_SAVE_INTERVAL <= int(resumed.group(1)) < steps
    assert f"done: {steps} steps" in second
    assert checkpoint_layout(ckpt)[0] == f"step_{steps:08d}"


def test_sbatch_without_srun_stops_with_an_explanation(cluster, tmp_path):
    """A batch script that runs compact-train itself (no srun) in a 2-task job is one process
    of a world of 2 that never starts: it stops at once with a line saying so (before, rank
    0 waited for rank 1 until the rendezvous timed out)."""
    out = tmp_path / "job-%j.out"
    proc = subprocess.run(
        ["sbatch", "--parsable", *_layout(cluster, 2), f"--output={out}",
         f"--wrap=compact-train --config {TINY} train.train_steps=1"],
        env=cluster.env(), capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip().split(";")[0]
    info = cluster.wait_job(job, 120)
    log = Path(str(out).replace("%j", job)).read_text()
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", (info, log)
    assert log.strip() == (
        "compact-train: invalid configuration: SLURM_NTASKS=2 but this is Slurm's batch "
        "script, not one of 2 srun tasks (no SLURM_STEP_ID): start one process per task with "
        "srun (launch/slurm/pretrain.sbatch does), or torchrun"), log


@pytest.mark.parametrize("env, message", [
    ({}, "CONFIG is not set"),
    ({"CONFIG": "configs/train/nope.yaml"}, "CONFIG=configs/train/nope.yaml does not exist"),
    ({"CONFIG": TINY, "CONTAINER_IMAGE": "/images/compact.sqsh"}, "CKPT_DIR is not set"),
])
def test_sbatch_with_missing_variables_fails_clearly(cluster, tmp_path, env, message):
    out = tmp_path / "job-%j.out"
    job = cluster.submit([*_layout(cluster, 2), f"--output={out}"], env, [])
    info = cluster.wait_job(job, 120)
    log = Path(str(out).replace("%j", job)).read_text()
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", (info, log)
    assert message in log
    assert "step " not in log  # nothing was launched
