#!/usr/bin/env bash
# One ~7-minute call on a 2-GPU host (each memory variant in its own process, --isolate):
#   phase 1 (at once): convergence r1/4 then r1/4_reset (GPU 0), r1/2 then r1/4_bf16W0 (GPU 1)
#   phase 2: DP=2 through the deepspeed launcher, 1.3b: ZeRO-1 (baseline, r1/4, r1/8 bf16 W0)
#     and ZeRO-3 (baseline, r1/4 bf16 W0: ZeRO-3 partitions W0 in bf16)
#   phase 3 (at once): single GPU 1.3b baseline + r1/8 bf16 W0 (GPU 0); TP=1 fp32 invariance
#     reference (GPU 1); then TP=2 fp32 invariance (GPUs 0, 1)
# Results go to a tarball: bash benchmarks/gpu_call_c.sh "$OUT"
set -u
OUT_DIR=${1:-benchmarks/results}
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
PY=${PY:-python3}
if [ "${SMALL:-0}" = 1 ]; then P=tiny IP=tiny CVX="--tiny"; else P=1.3b IP=350m CVX=""; fi
R=$(mktemp -d /tmp/bench_c.XXXX)
B=benchmarks
START=$(date +%s)
$PY -c "import megatron.core, deepspeed, pydantic, tokenizers, compact_dist" || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv > "$R/gpus.csv" 2>&1 || true
$PY $B/convergence.py --prepare $CVX --cache-dir "$R/cache" > "$R/convergence_prepare.log" 2>&1
CV="$PY $B/convergence.py $CVX --cache-dir $R/cache --out-dir $R"
(export CUDA_VISIBLE_DEVICES=0; timeout 110 $CV --variant r1/4 > "$R/cv_r1-4.log" 2>&1
 timeout 110 $CV --variant r1/4_reset > "$R/cv_r1-4_reset.log" 2>&1) &
(export CUDA_VISIBLE_DEVICES=1; timeout 110 $CV --variant r1/2 > "$R/cv_r1-2.log" 2>&1
 timeout 110 $CV --variant r1/4_bf16W0 > "$R/cv_r1-4_bf16W0.log" 2>&1) &
wait
rm -rf "$R/cache" "$R"/ckpt_*  # datasets and convergence checkpoints stay out of the tarball
echo "phase 1 done at $(( $(date +%s) - START )) s"
MT="$PY $B/memory_throughput.py --isolate --out-dir $R"
timeout 130 $MT --launcher deepspeed --nproc 2 --name mt_dp2_z1 --time-limit-s 110 --preset $P \
  --zero-stage 1 --variants baseline,compact_r1/4,compact_r1/8_bf16W0 > "$R/mt_dp2_z1.log" 2>&1
timeout 100 $MT --launcher deepspeed --nproc 2 --name mt_dp2_z3 --time-limit-s 80 --preset $P \
  --zero-stage 3 --variants baseline,compact_r1/4_bf16W0 > "$R/mt_dp2_z3.log" 2>&1
echo "phase 2 done at $(( $(date +%s) - START )) s"
INV="--skip-throughput --tp-invariance-steps 20 --tp-invariance-preset $IP --precision fp32 --tp-invariance-variants baseline,compact_r1/4"
CUDA_VISIBLE_DEVICES=0 timeout 90 $MT --name mt_1.3b_r8bf16 --time-limit-s 75 --preset $P \
  --variants baseline,compact_r1/8_bf16W0 > "$R/mt_1.3b_r8bf16.log" 2>&1 &
CUDA_VISIBLE_DEVICES=1 timeout 90 $MT --name inv_fp32_tp1 --time-limit-s 75 --preset $P \
  --tp 1 $INV > "$R/inv_fp32_tp1.log" 2>&1 &
wait
left=$((520 - $(date +%s) + START))
timeout $((left > 30 ? left : 30)) $MT --launcher torchrun --nproc 2 --name inv_fp32_tp2 \
  --time-limit-s $((left > 40 ? left - 10 : 30)) --preset $P --tp 2 $INV > "$R/inv_fp32_tp2.log" 2>&1
echo "elapsed $(( $(date +%s) - START )) s" | tee "$R/elapsed.txt"
mkdir -p "$OUT_DIR"
tar czf "$OUT_DIR/bench_call_c.tgz" --exclude='*.tmp' -C "$R" .
ls -la "$R"
tail -n 3 "$R"/*.log
