#!/usr/bin/env bash
# One ~9.5-minute call on a 4-GPU host, four jobs at once:
#   GPU 0: memory_throughput 350m (all 10 variants, max micro-batch search)
#   GPU 1: memory_throughput 1.3b (all 10 variants, max micro-batch search)
#   GPU 2: convergence baseline, then r1/2, then r1/4_bf16W0 (if time is left)
#   GPU 3: convergence r1/4, then r1/8, then unbiased_r1/4 (if time is left)
# Results (JSON, markdown, logs) go to a tarball: bash benchmarks/gpu_call_a.sh "$OUT"
# Every job has its own timeout, so the tarball is written even when a job overruns; the
# JSONs of memory_throughput are rewritten after every variant (partial results survive).
set -u
OUT_DIR=${1:-benchmarks/results}
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-python3}
# CPU dry run of this script's mechanics: SMALL=1 (tiny models, a few convergence steps)
if [ "${SMALL:-0}" = 1 ]; then P1=tiny P2=tiny CVX="--tiny"; else P1=350m P2=1.3b CVX=""; fi
R=$(mktemp -d /tmp/bench_a.XXXX)
B=benchmarks
START=$(date +%s)
left() { local l=$((560 - $(date +%s) + START)); echo $((l > 5 ? l : 5)); }  # s to 560
$PY -c "import megatron.core, deepspeed, pydantic, tokenizers, compact_dist" || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv > "$R/gpus.csv" 2>&1 || true

# the max micro-batch search benefits from less fragmentation (peak *allocated* is unaffected)
#: DeepSpeed's bf16 cast would otherwise make the base_dtype=fp32 W0 bf16 too
MT="timeout 560 env PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True $PY $B/memory_throughput.py --out-dir $R --time-limit-s 500"
CUDA_VISIBLE_DEVICES=0 $MT --preset $P1 --name mt_350m > "$R/mt_350m.log" 2>&1 &
CUDA_VISIBLE_DEVICES=1 $MT --preset $P2 --name mt_1.3b > "$R/mt_1.3b.log" 2>&1 &

# tokenized stdlib corpus (BPE 8192) once, then two convergence runs per GPU
$PY $B/convergence.py --prepare $CVX --cache-dir "$R/cache" > "$R/convergence_prepare.log" 2>&1
CV="$PY $B/convergence.py $CVX --cache-dir $R/cache --out-dir $R"
# (each run is expected to take 1-2 min; a third one gets whatever time is left)
(export CUDA_VISIBLE_DEVICES=2
 timeout 270 $CV --variant baseline > "$R/cv_baseline.log" 2>&1
 timeout $(left) $CV --variant r1/2 > "$R/cv_r1-2.log" 2>&1
 timeout $(left) $CV --variant r1/4_bf16W0 > "$R/cv_r1-4_bf16W0.log" 2>&1) &
(export CUDA_VISIBLE_DEVICES=3
 timeout 270 $CV --variant r1/4 > "$R/cv_r1-4.log" 2>&1
 timeout $(left) $CV --variant r1/8 > "$R/cv_r1-8.log" 2>&1
 timeout $(left) $CV --variant unbiased_r1/4 > "$R/cv_unbiased_r1-4.log" 2>&1) &
wait
$PY $B/convergence.py --merge --out-dir "$R" > "$R/convergence_merge.log" 2>&1
rm -rf "$R/cache"
echo "elapsed $(( $(date +%s) - START )) s" | tee "$R/elapsed.txt"
mkdir -p "$OUT_DIR"
tar czf "$OUT_DIR/bench_call_a.tgz" -C "$R" .
ls -la "$R"
tail -n 5 "$R"/*.log
