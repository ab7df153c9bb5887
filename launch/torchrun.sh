#!/usr/bin/env bash
# compact-train under torchrun, one or more nodes. Run the same command on every node.
set -euo pipefail
LAUNCH_NAME="launch/torchrun.sh"
# shellcheck source=launch/common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
    cat <<'EOF'
Usage: CONFIG=<yaml> [NNODES=N NODE_RANK=i MASTER_ADDR=host] launch/torchrun.sh [section.key=value ...]

Runs `compact-train --config $CONFIG [overrides]` under torchrun on this node. For several
nodes, run the same command on every node with its own NODE_RANK (0 .. NNODES-1).

Required:
  CONFIG           training config, e.g. configs/train/llama_60m.yaml (relative to the
                   current directory or the repository root)
  NODE_RANK        this node's index (only when NNODES > 1 and RDZV_BACKEND=static)
  MASTER_ADDR      address of node 0, reachable from every node (only when NNODES > 1)
  GPUS_PER_NODE    only on machines without GPUs: CPU ranks per node (default: number of
                   visible GPUs). NPROC_PER_NODE, its old name, still works (deprecated).

Optional:
  NNODES=1         number of nodes
  MASTER_PORT=29500
  RDZV_BACKEND=static   static: fixed NODE_RANKs, node 0 hosts the store at
                        MASTER_ADDR:MASTER_PORT; c10d: torchrun's dynamic rendezvous at
                        MASTER_ADDR:MASTER_PORT (node ranks assigned on arrival, NODE_RANK unused)
  RDZV_ID=compact-train rendezvous id (c10d; use the job id on shared clusters)
  TORCHRUN_ARGS    extra torchrun arguments, e.g. "--max-restarts 3"
  TRAIN_CMD=compact-train   the training entrypoint
  NCCL_*           passed through; NCCL_NVLS_ENABLE defaults to 0 (see launch/README.md)

Without GPUs the ranks run on CPU with gloo (DS_ACCELERATOR=cpu).

Examples:
  CONFIG=configs/train/llama_60m.yaml launch/torchrun.sh
  # two nodes, on node A (10.0.0.1) and node B:
  CONFIG=configs/train/llama_1_3b.yaml NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 launch/torchrun.sh
  CONFIG=configs/train/llama_1_3b.yaml NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 launch/torchrun.sh
EOF
}

prepare_launch "$@"
command -v torchrun >/dev/null 2>&1 || die "torchrun is not on PATH (it comes with torch)"

NNODES="${NNODES:-1}"
MASTER_PORT="${MASTER_PORT:-29500}"
RDZV_BACKEND="${RDZV_BACKEND:-static}"
require_uint NNODES
require_uint MASTER_PORT
[[ "$NNODES" -ge 1 ]] || die "NNODES must be at least 1"

resolve_gpus_per_node
if [[ -z "${GPUS_PER_NODE:-}" ]]; then
    GPUS_PER_NODE="$(gpu_count)"
    [[ "$GPUS_PER_NODE" -gt 0 ]] || die "GPUS_PER_NODE is not set and no GPU was found (set it to the number of CPU ranks per node)"
fi
require_uint GPUS_PER_NODE

args=(--nnodes "$NNODES" --nproc-per-node "$GPUS_PER_NODE")
if [[ "$NNODES" -gt 1 ]]; then
    require_var MASTER_ADDR "address of node 0, needed when NNODES=$NNODES > 1"
fi
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
case "$RDZV_BACKEND" in
    static)
        if [[ "$NNODES" -gt 1 ]]; then
            require_var NODE_RANK "this node's index 0..$((NNODES - 1)), needed when NNODES > 1"
        fi
        NODE_RANK="${NODE_RANK:-0}"
        require_uint NODE_RANK
        [[ "$NODE_RANK" -lt "$NNODES" ]] || die "NODE_RANK=$NODE_RANK is not below NNODES=$NNODES"
        args+=(--node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT")
        ;;
    c10d)
        args+=(--rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT"
               --rdzv-id "${RDZV_ID:-compact-train}")
        ;;
    *) die "RDZV_BACKEND=$RDZV_BACKEND is not static or c10d" ;;
esac

device_setup "$GPUS_PER_NODE"
# shellcheck disable=SC2206
extra=(${TORCHRUN_ARGS:-})
info "torchrun ${args[*]} ${extra[*]} $TRAIN_CMD --config $CONFIG $*"
exec torchrun "${args[@]}" "${extra[@]}" --no-python "$TRAIN_CMD" --config "$CONFIG" "$@"
