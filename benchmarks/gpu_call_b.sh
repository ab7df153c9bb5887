#!/usr/bin/env bash
# One ~9.5-minute call on a 4-GPU host: tensor/sequence parallelism, TP x DP with ZeRO-1 and
# ZeRO-3, and the TP-invariance check (same losses at TP = 1, 2, 4 and at TP2 x DP2).
#   phase 1 (at once): GPUs 0,1 TP=2 SP 1.3b | GPU 2 TP=1 350m invariance | GPU 3 TP=1 1.3b
#   phase 2: GPUs 0-3 TP=4 SP 1.3b
#   phase 3: GPUs 0-3 TP=2 x DP=2 ZeRO-1 (SP) 1.3b
#   phase 4: GPUs 0-3 TP=2 x DP=2 ZeRO-3 (no SP: unsupported with ZeRO-3) 1.3b
# Every TP > 1 job also counts the bytes all-gathered over the TP group in backward, and runs
# 20 TP-invariance steps of a 350m model (CPU-initialised: identical weights at any TP).
# Results go to a tarball: bash benchmarks/gpu_call_b.sh "$OUT"
set -u
OUT_DIR=${1:-benchmarks/results}
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-python3}
# CPU dry run of this script's mechanics: SMALL=1 (tiny models)
if [ "${SMALL:-0}" = 1 ]; then P=tiny IP=tiny; else P=1.3b IP=350m; fi
R=$(mktemp -d /tmp/bench_b.XXXX)
B=benchmarks
START=$(date +%s)
$PY -c "import megatron.core, deepspeed, pydantic, compact_dist" || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv > "$R/gpus.csv" 2>&1 || true

INV="--tp-invariance-steps 20 --tp-invariance-preset $IP --tp-invariance-variants baseline,compact_r1/4"
VARS="--variants baseline,compact_r1/4,compact_r1/8"
# ZeRO-3 partitions W0 in the training dtype (bf16), so ZeRO-3 runs the bf16-W0 variant and
# the ZeRO-1 run of the same layout adds it for the comparison
VARS3="--variants baseline,compact_r1/4_bf16W0,compact_r1/4"
VARSZ3="--variants baseline,compact_r1/4_bf16W0"
mt() {  # mt <timeout s> <gpus> <nproc> <port> <name> args...
  local t=$1 gpus=$2 n=$3 port=$4 name=$5; shift 5
  CUDA_VISIBLE_DEVICES=$gpus OMP_NUM_THREADS=$((16 / n > 1 ? 16 / n : 1)) timeout "$t" \
    $PY -m torch.distributed.run --nproc_per_node "$n" --master_port "$port" \
    $B/memory_throughput.py --preset $P --out-dir "$R" --name "$name" \
    --time-limit-s $((t - 45)) "$@" > "$R/$name.log" 2>&1
}

# phase 1
mt 160 0,1 2 29611 mt_tp2_sp_z1 --tp 2 --zero-stage 1 $VARS $INV &
mt 160 2 1 29612 inv_tp1 --tp 1 --skip-throughput $INV &
mt 160 3 1 29613 mt_tp1_z1 --tp 1 --zero-stage 1 $VARS &
wait
echo "phase 1 done at $(( $(date +%s) - START )) s"
# phase 2
mt 145 0,1,2,3 4 29621 mt_tp4_sp_z1 --tp 4 --zero-stage 1 $VARS $INV
echo "phase 2 done at $(( $(date +%s) - START )) s"
# phase 3
mt 130 0,1,2,3 4 29631 mt_tp2dp2_sp_z1 --tp 2 --zero-stage 1 $VARS3 \
  --tp-invariance-steps 20 --tp-invariance-preset $IP --tp-invariance-variants compact_r1/4
echo "phase 3 done at $(( $(date +%s) - START )) s"
# phase 4
left=$((565 - $(date +%s) + START))
mt $((left > 60 ? left : 60)) 0,1,2,3 4 29641 mt_tp2dp2_z3 --tp 2 --zero-stage 3 $VARSZ3
echo "elapsed $(( $(date +%s) - START )) s" | tee "$R/elapsed.txt"
mkdir -p "$OUT_DIR"
tar czf "$OUT_DIR/bench_call_b.tgz" -C "$R" .
ls -la "$R"
tail -n 4 "$R"/*.log
