#!/usr/bin/env bash
# Install compact_dist into a Python environment that already has torch (the NGC PyTorch
# image's CUDA build), keeping that torch. docker/Dockerfile runs it; tests/test_docker.py
# runs the Dockerfile's RUN lines, and so this script, in a fresh virtual environment.
#
#   docker/install.sh deps      every dependency in pyproject.toml except torch
#                               (megatron-core, deepspeed, pydantic, ...)
#   docker/install.sh package   compact_dist itself, with --no-deps
#   docker/install.sh           both
#
# PYTHON selects the interpreter (default: python on PATH).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python}"
what="${1:-all}"
case "$what" in deps|package|all) ;; *) echo "usage: docker/install.sh [deps|package|all]" >&2; exit 2 ;; esac

if ! "$PYTHON" -c 'import torch' >/dev/null 2>&1; then
    echo "docker/install.sh: error: '$PYTHON' cannot import torch. This script keeps the" \
         "environment's torch: start from an NGC PyTorch image (or pip install torch first)." >&2
    exit 2
fi
"$PYTHON" -c 'import torch; print(f"docker/install.sh: keeping torch {torch.__version__} (CUDA {torch.version.cuda})")'

if [[ "$what" != package ]]; then
    # pyproject.toml is the one list of dependencies (pins included); torch is left out.
    mapfile -t reqs < <("$PYTHON" - <<'PY'
import re, tomllib
with open("pyproject.toml", "rb") as f:
    deps = tomllib.load(f)["project"]["dependencies"]
for dep in deps:
    if re.split(r"[\s<>=!~;\[]", dep, maxsplit=1)[0].lower() != "torch":
        print(dep)
PY
    )
    # DeepSpeed ships only a source archive whose setup.py imports torch: build it against this
    # torch (--no-build-isolation, which needs setuptools and wheel here) and without compiling
    # its C++/CUDA ops (DS_BUILD_OPS=0: they are JIT-built on first use).
    "$PYTHON" -m pip install setuptools wheel
    DS_BUILD_OPS=0 "$PYTHON" -m pip install --no-build-isolation "${reqs[@]}"
fi

if [[ "$what" != deps ]]; then
    "$PYTHON" -m pip install --no-build-isolation --no-deps .
fi
