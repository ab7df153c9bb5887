#!/usr/bin/env bash
# compact-train under the DeepSpeed launcher: one node, or a hostfile of nodes.
set -euo pipefail
LAUNCH_NAME="launch/deepspeed.sh"
# shellcheck source=launch/common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
    cat <<'EOF'
Usage: CONFIG=<yaml> [HOSTFILE=<file>] launch/deepspeed.sh [section.key=value ...]

Runs `compact-train --config $CONFIG [overrides]` on every slot of the hostfile through the
`deepspeed` launcher (it passes --local_rank and sets RANK/LOCAL_RANK/WORLD_SIZE).

Required:
  CONFIG           training config, e.g. configs/train/llama_1_3b.yaml (relative to the
                   current directory or the repository root)
  GPUS_PER_NODE    only without HOSTFILE on a machine without GPUs (CPU ranks)

Optional:
  HOSTFILE         MPI-style hostfile, one `hostname slots=<GPUs>` line per node. Unset: this
                   node only, GPUS_PER_NODE ranks (default: all visible GPUs).
                   With several hosts the launcher reaches them by passwordless ssh + pdsh
                   (DS_LAUNCHER), or set NODE_RANK and run this script on every node yourself.
  NODE_RANK        launch only this node's ranks (deepspeed --no_ssh --node_rank); run the
                   same command on every host of HOSTFILE with NODE_RANK=0,1,...
  MASTER_ADDR      address of the first host (default: the first hostfile entry; 127.0.0.1
                   for localhost or without a hostfile)
  MASTER_PORT=29500
  GPUS_PER_NODE    with HOSTFILE: use at most this many slots per host
                   (NPROC_PER_NODE, its old name, still works: deprecated)
  DS_LAUNCHER=pdsh multi-node backend of the deepspeed launcher: pdsh, openmpi, mpich,
                   impi, mvapich, slurm
  DEEPSPEED_ARGS   extra launcher arguments, e.g. "--ssh_port 2222"
  TRAIN_CMD=compact-train   the training entrypoint
  NCCL_*           passed through; NCCL_NVLS_ENABLE defaults to 0 (see launch/README.md).
                   With pdsh, put variables the remote ranks need in ./.deepspeed_env
                   (NAME=value lines): the launcher forwards only NCCL_*/PYTHON*/UCX*/MV2*.

Without GPUs the ranks run on CPU with gloo (DS_ACCELERATOR=cpu).

Examples:
  CONFIG=configs/train/llama_350m.yaml launch/deepspeed.sh train.zero_stage=2
  printf 'node-a slots=8\nnode-b slots=8\n' > hostfile
  CONFIG=configs/train/llama_7b.yaml HOSTFILE=hostfile launch/deepspeed.sh
  # without ssh: on every node
  CONFIG=configs/train/llama_7b.yaml HOSTFILE=hostfile NODE_RANK=<0|1> MASTER_ADDR=node-a launch/deepspeed.sh
EOF
}

prepare_launch "$@"
command -v deepspeed >/dev/null 2>&1 || die "the deepspeed launcher is not on PATH (pip install deepspeed==0.19.8)"

MASTER_PORT="${MASTER_PORT:-29500}"
require_uint MASTER_PORT
resolve_gpus_per_node
args=(--master_port "$MASTER_PORT")
hosts=()
if [[ -n "${HOSTFILE:-}" ]]; then
    [[ -f "$HOSTFILE" ]] || die "HOSTFILE=$HOSTFILE does not exist"
    while read -r host rest; do
        [[ -z "$host" || "$host" == \#* ]] && continue
        [[ "$rest" =~ slots=([0-9]+) ]] || die "HOSTFILE line '$host $rest' has no slots=<n>"
        hosts+=("$host")
        slots="${BASH_REMATCH[1]}"
    done < "$HOSTFILE"
    [[ "${#hosts[@]}" -gt 0 ]] || die "HOSTFILE=$HOSTFILE lists no hosts"
    args+=(--hostfile "$HOSTFILE")
    if [[ -z "${MASTER_ADDR:-}" ]]; then
        case "${hosts[0]}" in localhost|127.*) MASTER_ADDR=127.0.0.1 ;; *) MASTER_ADDR="${hosts[0]}" ;; esac
    fi
    if [[ -n "${GPUS_PER_NODE:-}" ]]; then
        require_uint GPUS_PER_NODE
        args+=(--num_gpus "$GPUS_PER_NODE")
        slots="$GPUS_PER_NODE"
    fi
    if [[ -n "${NODE_RANK:-}" ]]; then
        require_uint NODE_RANK
        [[ "$NODE_RANK" -lt "${#hosts[@]}" ]] || die "NODE_RANK=$NODE_RANK but HOSTFILE lists ${#hosts[@]} hosts"
        args+=(--no_ssh --node_rank "$NODE_RANK")
    elif [[ "${#hosts[@]}" -eq 1 ]]; then
        args+=(--no_ssh_check)  # one host: the launcher starts the ranks locally, no ssh
    else
        DS_LAUNCHER="${DS_LAUNCHER:-pdsh}"
        if [[ "$DS_LAUNCHER" == pdsh ]] && ! command -v pdsh >/dev/null 2>&1; then
            die "HOSTFILE lists ${#hosts[@]} hosts and DS_LAUNCHER=pdsh, but pdsh is not installed (apt-get install pdsh, or set NODE_RANK on every node)"
        fi
        args+=(--launcher "$DS_LAUNCHER")
    fi
else
    if [[ -n "${NODE_RANK:-}" ]]; then
        die "NODE_RANK is set but HOSTFILE is not (multi-node runs need the hostfile on every node)"
    fi
    if [[ -z "${GPUS_PER_NODE:-}" ]]; then
        GPUS_PER_NODE="$(gpu_count)"
        [[ "$GPUS_PER_NODE" -gt 0 ]] || die "GPUS_PER_NODE is not set and no GPU was found (set it to the number of CPU ranks)"
    fi
    require_uint GPUS_PER_NODE
    args+=(--num_gpus "$GPUS_PER_NODE")
    slots="$GPUS_PER_NODE"
fi
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
args+=(--master_addr "$MASTER_ADDR")

device_setup "$slots"
# shellcheck disable=SC2206
extra=(${DEEPSPEED_ARGS:-})
info "deepspeed ${args[*]} ${extra[*]} $TRAIN_CMD --config $CONFIG $*"
exec deepspeed "${args[@]}" "${extra[@]}" --no_python "$TRAIN_CMD" --config "$CONFIG" "$@"
