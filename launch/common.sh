# shellcheck shell=bash
# Shared helpers of launch/deepspeed.sh and launch/torchrun.sh (sourced, not executed).
# The Slurm script (launch/slurm/pretrain.sbatch) is self-contained because sbatch runs a
# copy of it from the spool directory.

COMPACT_LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
COMPACT_ROOT="$(cd "$COMPACT_LAUNCH_DIR/.." && pwd)"

die() {
    echo "${LAUNCH_NAME:-launch}: error: $*" >&2
    echo "${LAUNCH_NAME:-launch}: run with --help for the variables it reads" >&2
    exit 2
}

info() {
    echo "${LAUNCH_NAME:-launch}: $*" >&2
}

# require_var NAME WHY: fail clearly when the environment variable NAME is unset or empty.
require_var() {
    if [[ -z "${!1:-}" ]]; then
        die "$1 is not set ($2)"
    fi
}

# require_uint NAME: the variable must be a non-negative integer.
require_uint() {
    if [[ ! "${!1}" =~ ^[0-9]+$ ]]; then
        die "$1=${!1} is not a non-negative integer"
    fi
}

# resolve_config: CONFIG must name an existing YAML file, relative to the current directory
# or to the repository root (so `CONFIG=configs/train/llama_60m.yaml` works from anywhere).
resolve_config() {
    require_var CONFIG "a training config, e.g. CONFIG=configs/train/llama_60m.yaml"
    if [[ -f "$CONFIG" ]]; then
        CONFIG="$(cd "$(dirname "$CONFIG")" && pwd)/$(basename "$CONFIG")"
    elif [[ -f "$COMPACT_ROOT/$CONFIG" ]]; then
        CONFIG="$COMPACT_ROOT/$CONFIG"
    else
        local presets=("$COMPACT_ROOT"/configs/train/*.yaml)
        die "CONFIG=$CONFIG does not exist (presets: ${presets[*]#"$COMPACT_ROOT"/})"
    fi
    export CONFIG
}

# resolve_entrypoint: the one training entrypoint (TRAIN_CMD, default compact-train).
resolve_entrypoint() {
    TRAIN_CMD="${TRAIN_CMD:-compact-train}"
    if ! command -v "$TRAIN_CMD" >/dev/null 2>&1; then
        die "training entrypoint '$TRAIN_CMD' is not on PATH (install the package: pip install --no-deps -e . , or set TRAIN_CMD)"
    fi
    TRAIN_CMD="$(command -v "$TRAIN_CMD")"
}

# prepare_launch ARGS...: --help prints the caller's usage and exits; else CONFIG and the
# entrypoint are resolved (both launchers start this way).
prepare_launch() {
    local arg
    for arg in "$@"; do
        case "$arg" in -h|--help) usage; exit 0 ;; esac
    done
    resolve_config
    resolve_entrypoint
}

# resolve_gpus_per_node: GPUS_PER_NODE is the ranks started per node (every launcher, and
# launch/slurm/pretrain.sbatch, reads this name); NPROC_PER_NODE, its old name in these two
# scripts, is still accepted with a deprecation line.
resolve_gpus_per_node() {
    if [[ -n "${NPROC_PER_NODE:-}" ]]; then
        if [[ -n "${GPUS_PER_NODE:-}" && "$GPUS_PER_NODE" != "$NPROC_PER_NODE" ]]; then
            die "GPUS_PER_NODE=$GPUS_PER_NODE and NPROC_PER_NODE=$NPROC_PER_NODE disagree (NPROC_PER_NODE is the deprecated name of GPUS_PER_NODE: set only GPUS_PER_NODE)"
        fi
        info "NPROC_PER_NODE is deprecated: use GPUS_PER_NODE (the same number, ranks per node)"
        GPUS_PER_NODE="$NPROC_PER_NODE"
    fi
}

# gpu_count: GPUs this node may use (CUDA_VISIBLE_DEVICES, else nvidia-smi, else 0).
gpu_count() {
    if [[ -n "${CUDA_VISIBLE_DEVICES+x}" ]]; then
        local list="${CUDA_VISIBLE_DEVICES//[[:space:]]/}"
        if [[ -z "$list" || "$list" == "-1" ]]; then echo 0; else echo $(( $(tr -cd ',' <<<"$list" | wc -c) + 1 )); fi
    elif command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
    else
        echo 0
    fi
}

# device_setup NPROC: CPU fallback (DeepSpeed's CPU accelerator, gloo; one OpenMP share of the
# cores per rank) and NCCL defaults for GPUs. Every NCCL_* variable already set wins.
device_setup() {
    local nproc="$1"
    NUM_GPUS_HERE="$(gpu_count)"
    if [[ "$NUM_GPUS_HERE" -eq 0 ]]; then
        export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
        local cores
        cores="$(nproc 2>/dev/null || echo 1)"
        export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( cores / nproc > 0 ? cores / nproc : 1 ))}"
        info "no GPU found: CPU run (DS_ACCELERATOR=$DS_ACCELERATOR, gloo, OMP_NUM_THREADS=$OMP_NUM_THREADS)"
    else
        # NVLink SHARP (NVLS) multicast: keep it off on shared / partitioned hosts, where its
        # multicast objects can fail to allocate; enable it only on whole dedicated NVSwitch nodes.
        export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}"
        export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
        export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
    fi
}
