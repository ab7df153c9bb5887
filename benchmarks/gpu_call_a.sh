#!/usr/bin/env bash
# Convergence, all variants, two GPUs at once (GPU 0: baseline, r1/2, r1/4_bf16W0; GPU 1:
# r1/4, r1/8, unbiased_r1/4), then the merge. Results go to a tarball:
#   bash benchmarks/gpu_call_a.sh "$OUT"        (SMALL=1: CPU dry run with a tiny model)
set -u
OUT_DIR=${1:-benchmarks/results}
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-python3}
if [ "${SMALL:-0}" = 1 ]; then CVX="--tiny"; else CVX=""; fi
R=$(mktemp -d /tmp/bench_a.XXXX)
B=benchmarks
START=$(date +%s)
$PY -c "import megatron.core, deepspeed, pydantic, tokenizers, compact_dist" || exit 1
$PY $B/convergence.py --prepare $CVX --cache-dir "$R/cache" > "$R/convergence_prepare.log" 2>&1
CV="$PY $B/convergence.py $CVX --cache-dir $R/cache --out-dir $R"
(export CUDA_VISIBLE_DEVICES=0
 for v in baseline r1/2 r1/4_bf16W0; do timeout 270 $CV --variant $v > "$R/cv_${v//\//-}.log" 2>&1; done) &
(export CUDA_VISIBLE_DEVICES=1
 for v in r1/4 r1/8 unbiased_r1/4; do timeout 270 $CV --variant $v > "$R/cv_${v//\//-}.log" 2>&1; done) &
wait
$PY $B/convergence.py --merge --out-dir "$R" > "$R/convergence_merge.log" 2>&1
rm -rf "$R/cache" "$R"/ckpt_*  # datasets and convergence checkpoints stay out of the tarball
echo "elapsed $(( $(date +%s) - START )) s" | tee "$R/elapsed.txt"
mkdir -p "$OUT_DIR"
tar czf "$OUT_DIR/bench_call_a.tgz" -C "$R" .
tail -n 3 "$R"/*.log
