#!/usr/bin/env bash
# One ~9.5-minute call on a 2- or 4-GPU host; every variant runs in its own process (--isolate).
#   phase 1 (at once): GPU 0 single-GPU 350m, all variants | GPU 1 single-GPU 1.3b, all
#     variants | with 4 GPUs: GPUs 2,3 TP=2 SP 1.3b (baseline, r1/4, r1/8) + 20 TP-invariance
#     steps of 350m, then the TP=1 invariance reference on GPU 2
#   phase 2: with 2 GPUs, the TP=2 job and the TP=1 reference of phase 1 here; with 4 GPUs,
#     TP=4 SP 1.3b (baseline, r1/4, r1/8) + TP-invariance
# Results go to a tarball: bash benchmarks/gpu_call_b.sh "$OUT"
set -u
OUT_DIR=${1:-benchmarks/results}
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-python3}
if [ "${SMALL:-0}" = 1 ]; then P1=tiny P2=tiny P=tiny IP=tiny; else P1=350m P2=1.3b P=1.3b IP=350m; fi
R=$(mktemp -d /tmp/bench_b.XXXX)
B=benchmarks
START=$(date +%s)
$PY -c "import megatron.core, deepspeed, pydantic, compact_dist" || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv > "$R/gpus.csv" 2>&1 || true
INV="--tp-invariance-steps 20 --tp-invariance-preset $IP --tp-invariance-variants baseline,compact_r1/4"
VARS="--variants baseline,compact_r1/4,compact_r1/8"
mt() {  # mt <seconds> <gpus> <nproc> <name> args...
  local t=$1 gpus=$2 n=$3 name=$4; shift 4
  local launch=""; [ "$n" -gt 1 ] && launch="--launcher torchrun --nproc $n"
  CUDA_VISIBLE_DEVICES=$gpus OMP_NUM_THREADS=8 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True \
    timeout $((t + 20)) $PY $B/memory_throughput.py --isolate $launch --out-dir "$R" \
    --name "$name" --time-limit-s "$t" "$@" > "$R/$name.log" 2>&1
}
NGPU=${NGPU:-$(nvidia-smi -L 2>/dev/null | wc -l)}
# phase 1
mt 300 0 1 mt_350m --preset $P1 &
mt 300 1 1 mt_1.3b --preset $P2 &
if [ "$NGPU" -ge 4 ]; then
  (mt 200 2,3 2 mt_tp2_sp_z1 --preset $P --tp 2 $VARS $INV
   mt 100 2 1 inv_tp1 --preset $P --tp 1 --skip-throughput $INV) &
fi
wait
echo "phase 1 done at $(( $(date +%s) - START )) s"
left=$((555 - $(date +%s) + START))
if [ "$NGPU" -ge 4 ]; then
  mt $((left > 60 ? left : 60)) 0,1,2,3 4 mt_tp4_sp_z1 --preset $P --tp 4 $VARS $INV
else
  mt $((left - 60 > 60 ? left - 60 : 60)) 0,1 2 mt_tp2_sp_z1 --preset $P --tp 2 $VARS $INV
  left=$((555 - $(date +%s) + START))
  mt $((left > 30 ? left : 30)) 0 1 inv_tp1 --preset $P --tp 1 --skip-throughput $INV
fi
echo "elapsed $(( $(date +%s) - START )) s" | tee "$R/elapsed.txt"
mkdir -p "$OUT_DIR"
tar czf "$OUT_DIR/bench_call_b.tgz" --exclude='*.tmp' -C "$R" .
ls -la "$R"
tail -n 3 "$R"/*.log
