"""docs/BAD_INPUT.md is the test: every row of its table is an input and the one line
compact-train prints for it. Rows whose test column names `test_table_row` run here through
compact-train's main() in this process (no process group may be created, the device is a
CPU); every other row must name a test that exists. Plus the behaviours around bad input
that are not one printed line: a free MASTER_PORT for a single process, and sbatch without
srun (tests/test_slurm.py runs that one on a real Slurm cluster)."""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "BAD_INPUT.md"
HERE = "test_bad_input.py::test_table_row"
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
ENV_WORD = re.compile(r"^[A-Z][A-Z0-9_]*=")


def table_rows() -> list[tuple[str, str, str]]:
    """(input, printed line, test) of every row of the doc's table, backticks stripped."""
    rows = []
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) != 3 or set(cells[0]) <= set("-: "):
            continue
        if cells[0] == "input":
            continue
        rows.append(tuple(c.strip("`") for c in cells))
    return rows


ROWS = table_rows()


def test_the_table_is_there_and_every_test_it_names_exists():
    assert len(ROWS) >= 25, ROWS
    for given, printed, test in ROWS:
        if test == "test_bad_input.py::test_table_row":  # run as a command line below
            assert given.split()[0] == "compact-train" or ENV_WORD.match(given), given
            assert printed.startswith("compact-train: "), printed
        path, _, name = test.partition("::")
        source = ROOT / "tests" / path
        assert source.is_file() and re.search(rf"^def {re.escape(name)}\(",
                                              source.read_text(), re.M), test
    inputs = [given for given, _, _ in ROWS]
    assert len(set(inputs)) == len(inputs), "an input is listed twice"


def run_main(words: list[str], monkeypatch, capsys) -> tuple[int, list[str]]:
    """compact-train's main() on `words` (leading NAME=value words: the environment), from
    the repository root, no CUDA; (exit status, stderr lines). Creating a process group
    fails the test."""
    from megatron.core import parallel_state

    from compact_dist.training.train import main

    def no_group(*args, **kwargs):
        raise AssertionError("a process group was created before the input was refused")

    monkeypatch.setattr(torch.distributed, "init_process_group", no_group)
    monkeypatch.setattr(parallel_state, "initialize_model_parallel", no_group)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.chdir(ROOT)
    for key in list(os.environ):
        if key in LAUNCH_VARIABLES or key.startswith("SLURM_"):
            monkeypatch.delenv(key)
    while words and ENV_WORD.match(words[0]):
        key, value = words.pop(0).split("=", 1)
        monkeypatch.setenv(key, value)
    assert words[0] == "compact-train", words
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(words[1:])
    return info.value.code, capsys.readouterr().err.splitlines()


@pytest.mark.parametrize("given, printed", [(g, p) for g, p, t in ROWS if t == HERE],
                         ids=[g for g, _, t in ROWS if t == HERE])
def test_table_row(given, printed, monkeypatch, capsys):
    status, lines = run_main(shlex.split(given), monkeypatch, capsys)
    assert status == 2 and lines == [printed.replace("<repo>", str(ROOT))], (given, lines)


def test_single_process_picks_a_free_master_port(tmp_path):
    """Two one-process runs on one host: the second finds 29500 taken (held here) and still
    starts its process group, on a port of its own; a launcher's MASTER_PORT is kept."""
    code = ("import os, torch\n"
            "from compact_dist.training.distributed import init_distributed\n"
            "from compact_dist.training.train_config import load_train_config\n"
            "init_distributed(load_train_config(None))\n"
            "print('port', os.environ['MASTER_PORT'], torch.distributed.get_world_size())\n")
    env = {k: v for k, v in os.environ.items()
           if k not in LAUNCH_VARIABLES and not k.startswith("SLURM_")}
    env.update(PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="")
    with socket.socket() as held:
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            held.bind(("", 29500))
            held.listen()
        except OSError:
            pass  # something else holds 29500 already: the same situation
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    port = int(re.search(r"^port (\d+) 1$", proc.stdout, re.M).group(1))
    assert port != 29500


def test_rendezvous_address_of_a_launcher_or_several_processes_is_kept(monkeypatch):
    from compact_dist.training.distributed import set_rendezvous_address

    for key in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    set_rendezvous_address(2)   # several processes agree on the fixed default
    assert os.environ["MASTER_PORT"] == "29500" and os.environ["MASTER_ADDR"] == "127.0.0.1"
    monkeypatch.setenv("MASTER_PORT", "23456")
    set_rendezvous_address(1)   # a launcher's port wins
    assert os.environ["MASTER_PORT"] == "23456"


def test_world_from_slurm_tasks_under_srun(monkeypatch):
    """srun's tasks (SLURM_STEP_ID set) give the rank and world; torchrun's variables win."""
    from compact_dist.training.train_config import world_from_environment

    for key in list(os.environ):
        if key in LAUNCH_VARIABLES or key.startswith("SLURM_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    assert world_from_environment() == (3, 1, 4)
    monkeypatch.delenv("SLURM_STEP_ID")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")   # torchrun inside the batch script
    assert world_from_environment() == (1, 0, 2)
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv("SLURM_NTASKS", "1")  # a one-task batch script is one process
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_LOCALID", "0")
    assert world_from_environment() == (0, 0, 1)
