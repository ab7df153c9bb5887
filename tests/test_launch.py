"""launch/torchrun.sh and launch/deepspeed.sh run for real on CPU (gloo): two torchrun
"nodes" and the deepspeed launcher (one launcher for a localhost hostfile, and one launcher
per "node" without ssh), each a TP=2 x DP=2 job of the embedded default
(configs/train/default.yaml) for a few steps. Plus --help and
the clear failures on missing / bad variables of all three launch scripts."""

import pytest

from conftest import free_port
from launch_utils import (DEFAULT, LAUNCH, TINY, assert_tp2_dp2_checkpoint, have, losses,
                          run_script, script_env, start, quick, wait_all)

TORCHRUN = str(LAUNCH / "torchrun.sh")
DEEPSPEED = str(LAUNCH / "deepspeed.sh")
SBATCH = str(LAUNCH / "slurm" / "pretrain.sbatch")
STEPS = 3
TP2 = "parallel.tensor_model_parallel_size=2"
TIMEOUT = 300


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One data cache (tokenizer + indexed dataset) shared by the runs of this module."""
    return tmp_path_factory.mktemp("launch_data")


# ---------------------------------------------------------------------------- usage / errors

@pytest.mark.parametrize("script, expected", [
    (TORCHRUN, ["Usage:", "CONFIG", "NNODES", "NODE_RANK", "MASTER_ADDR", "RDZV_BACKEND"]),
    (DEEPSPEED, ["Usage:", "CONFIG", "HOSTFILE", "NODE_RANK", "slots="]),
    (SBATCH, ["#SBATCH --requeue", "CONFIG (required)", "CKPT_DIR", "NCCL_SOCKET_IFNAME",
              "NCCL_NVLS_ENABLE=0", "--signal=B:USR1@"]),
])
def test_help_describes_the_variables(script, expected):
    for flag in ("--help", "-h"):
        proc = run_script(["bash", script, flag], script_env(), timeout=30)
        assert proc.returncode == 0, proc.stderr
        for text in expected:
            assert text in proc.stdout, (text, proc.stdout)


@pytest.mark.parametrize("script, env, message", [
    (TORCHRUN, {}, "CONFIG is not set"),
    (TORCHRUN, {"CONFIG": "configs/train/nope.yaml"}, "CONFIG=configs/train/nope.yaml does not exist"),
    (TORCHRUN, {"CONFIG": TINY}, "GPUS_PER_NODE is not set and no GPU was found"),
    (TORCHRUN, {"CONFIG": TINY, "GPUS_PER_NODE": "2", "NNODES": "2"}, "MASTER_ADDR is not set"),
    (TORCHRUN, {"CONFIG": TINY, "GPUS_PER_NODE": "2", "NNODES": "2", "MASTER_ADDR": "127.0.0.1"},
     "NODE_RANK is not set"),
    (TORCHRUN, {"CONFIG": TINY, "GPUS_PER_NODE": "2", "NNODES": "2", "MASTER_ADDR": "127.0.0.1",
                "NODE_RANK": "2"}, "NODE_RANK=2 is not below NNODES=2"),
    (TORCHRUN, {"CONFIG": TINY, "GPUS_PER_NODE": "two"}, "GPUS_PER_NODE=two is not a non-negative integer"),
    (TORCHRUN, {"CONFIG": TINY, "GPUS_PER_NODE": "2", "RDZV_BACKEND": "etcd"}, "RDZV_BACKEND=etcd"),
    (TORCHRUN, {"CONFIG": TINY, "GPUS_PER_NODE": "2", "TRAIN_CMD": "no-such-train"},
     "'no-such-train' is not on PATH"),
    (DEEPSPEED, {}, "CONFIG is not set"),
    (DEEPSPEED, {"CONFIG": TINY}, "GPUS_PER_NODE is not set and no GPU was found"),
    (DEEPSPEED, {"CONFIG": TINY, "HOSTFILE": "/nonexistent/hostfile"},
     "HOSTFILE=/nonexistent/hostfile does not exist"),
    (DEEPSPEED, {"CONFIG": TINY, "GPUS_PER_NODE": "2", "NODE_RANK": "0"},
     "NODE_RANK is set but HOSTFILE is not"),
    (SBATCH, {"CONFIG": TINY}, "not inside a Slurm job: submit with sbatch"),
    # the old name of GPUS_PER_NODE: still read, with a deprecation line
    (TORCHRUN, {"CONFIG": TINY, "NPROC_PER_NODE": "two"},
     "NPROC_PER_NODE is deprecated: use GPUS_PER_NODE"),
    (TORCHRUN, {"CONFIG": TINY, "NPROC_PER_NODE": "two"}, "GPUS_PER_NODE=two is not a"),
    (DEEPSPEED, {"CONFIG": TINY, "NPROC_PER_NODE": "2", "NODE_RANK": "0"},
     "NPROC_PER_NODE is deprecated: use GPUS_PER_NODE"),
    (TORCHRUN, {"CONFIG": TINY, "NPROC_PER_NODE": "2", "GPUS_PER_NODE": "4"},
     "GPUS_PER_NODE=4 and NPROC_PER_NODE=2 disagree"),
])
def test_missing_or_bad_variables_fail_clearly(script, env, message):
    proc = run_script(["bash", script, "train.train_steps=1"], script_env(**env), timeout=60)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "step " not in proc.stdout  # nothing was launched


def test_deepspeed_hostfile_errors(tmp_path):
    bad = tmp_path / "bad_hostfile"
    bad.write_text("node-a\n")
    proc = run_script(["bash", DEEPSPEED], script_env(CONFIG=TINY, HOSTFILE=str(bad)))
    assert proc.returncode != 0 and "has no slots=<n>" in proc.stderr, proc.stderr
    two = tmp_path / "two_hosts"
    two.write_text("node-a slots=2\nnode-b slots=2\n")
    proc = run_script(["bash", DEEPSPEED], script_env(CONFIG=TINY, HOSTFILE=str(two), NODE_RANK="2"))
    assert proc.returncode != 0 and "NODE_RANK=2 but HOSTFILE lists 2 hosts" in proc.stderr
    if not have("pdsh"):
        proc = run_script(["bash", DEEPSPEED], script_env(CONFIG=TINY, HOSTFILE=str(two)))
        assert proc.returncode != 0 and "pdsh is not installed" in proc.stderr, proc.stderr


def test_bad_training_config_fails_through_the_launcher(tmp_path, cache):
    """A config error inside compact-train surfaces as a nonzero exit of the launcher."""
    proc = run_script(["bash", TORCHRUN, *quick(cache), "compression.ratio=0"],
                      script_env(CONFIG=TINY, GPUS_PER_NODE="1", MASTER_PORT=str(free_port())),
                      timeout=120)
    assert proc.returncode != 0
    assert "invalid configuration" in proc.stdout + proc.stderr


# ------------------------------------------------------------------------------ real runs

def _two_nodes(tmp_path, script, node_env, overrides, name):
    """Start the same launch script twice, as node 0 and node 1, concurrently."""
    logs = [tmp_path / f"{name}_node{r}.log" for r in (0, 1)]
    procs = [start(["bash", script, *overrides], node_env(r), logs[r]) for r in (0, 1)]
    codes = wait_all(procs, TIMEOUT)
    texts = [log.read_text() for log in logs]
    assert codes == [0, 0], (codes, texts[0][-3000:], texts[1][-3000:])
    return texts


@pytest.fixture(scope="module")
def torchrun_two_nodes(tmp_path_factory, cache):
    """Two torchrun "nodes" (node_rank 0 and 1 on 127.0.0.1) x 2 processes: TP=2 x DP=2."""
    tmp = tmp_path_factory.mktemp("torchrun")
    ckpt = tmp / "ckpt"
    port = str(free_port())

    def env(rank):
        return script_env(CONFIG=DEFAULT, NNODES="2", NODE_RANK=str(rank), GPUS_PER_NODE="2",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=port)

    texts = _two_nodes(tmp, TORCHRUN, env,
                       quick(cache, STEPS, TP2, f"checkpoint.dir={ckpt}"), "torchrun")
    return texts, ckpt


def test_torchrun_two_nodes_tp2_dp2(torchrun_two_nodes):
    (node0, node1), ckpt = torchrun_two_nodes
    assert "--nnodes 2 --nproc-per-node 2 --node-rank 0" in node0
    assert "--node-rank 1" in node1
    got = losses(node0)
    assert sorted(got) == list(range(1, STEPS + 1)), node0[-3000:]
    assert got[STEPS] < got[1] + 0.1  # trains (loss does not blow up)
    assert f"done: {STEPS} steps" in node0
    assert losses(node1) == {}  # only global rank 0 (on node 0) logs
    assert_tp2_dp2_checkpoint(ckpt, STEPS)


def test_deepspeed_launcher_localhost_hostfile_tp2_dp2(tmp_path, cache, torchrun_two_nodes):
    """One deepspeed launcher for `localhost slots=4`: local launch, no ssh."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# one node\nlocalhost slots=4\n")
    ckpt = tmp_path / "ckpt"
    log = tmp_path / "deepspeed.log"
    proc = start(["bash", DEEPSPEED, *quick(cache, STEPS, TP2, f"checkpoint.dir={ckpt}")],
                 script_env(CONFIG=DEFAULT, HOSTFILE=str(hostfile), MASTER_PORT=str(free_port())), log)
    (code,) = wait_all([proc], TIMEOUT)
    text = log.read_text()
    assert code == 0, text[-3000:]
    assert "--no_ssh_check" in text and "DS_ACCELERATOR=cpu" in text
    assert "dist_world_size=4" in text
    assert "--local_rank=3" in text  # the launcher's argument reaches compact-train
    assert_tp2_dp2_checkpoint(ckpt, STEPS)
    # Same ranks layout, data and seeds as the torchrun job: the same losses.
    assert losses(text) == losses(torchrun_two_nodes[0][0])


def test_deepspeed_launcher_two_nodes_without_ssh_tp2_dp2(tmp_path, cache, torchrun_two_nodes):
    """A two-host hostfile, one launcher per "node" (NODE_RANK -> deepspeed --no_ssh)."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=2\nnode-b slots=2\n")
    ckpt = tmp_path / "ckpt"
    port = str(free_port())

    def env(rank):
        return script_env(CONFIG=DEFAULT, HOSTFILE=str(hostfile), NODE_RANK=str(rank),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=port)

    node0, node1 = _two_nodes(tmp_path, DEEPSPEED, env,
                              quick(cache, STEPS, TP2, f"checkpoint.dir={ckpt}"), "ds")
    assert "--no_ssh --node_rank 0" in node0 and "--no_ssh --node_rank 1" in node1
    assert "'node-b': [2, 3]" in node1  # global ranks 2, 3 on the second "node"
    assert_tp2_dp2_checkpoint(ckpt, STEPS)
    assert losses(node0) == losses(torchrun_two_nodes[0][0])
