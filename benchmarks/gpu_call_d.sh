#!/usr/bin/env bash
# One ~3-minute call on one GPU: the resample-policy convergence variants, concurrently
# (baseline again for a same-machine reference). bash benchmarks/gpu_call_d.sh "$OUT"
set -u
OUT_DIR=${1:-benchmarks/results}
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-python3}
if [ "${SMALL:-0}" = 1 ]; then CVX="--tiny"; else CVX=""; fi
R=$(mktemp -d /tmp/bench_d.XXXX)
B=benchmarks
$PY $B/convergence.py --prepare $CVX --cache-dir "$R/cache" > "$R/convergence_prepare.log" 2>&1
CV="$PY $B/convergence.py $CVX --cache-dir $R/cache --out-dir $R"
for v in baseline r1/4_reset r1/4_T50 r1/4_T50_reset; do
  timeout 240 $CV --variant $v > "$R/cv_${v//\//-}.log" 2>&1 &
done
wait
rm -rf "$R/cache" "$R"/ckpt_*  # datasets and convergence checkpoints stay out of the tarball
mkdir -p "$OUT_DIR"
tar czf "$OUT_DIR/bench_call_d.tgz" -C "$R" .
tail -n 2 "$R"/*.log
