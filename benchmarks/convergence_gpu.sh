#!/usr/bin/env bash
# Convergence of the 110M model on the host corpus, one variant per GPU, in calls bounded by a
# wall-clock deadline; call it again (same machine, .cache/ kept) to continue.
#
#   bash benchmarks/convergence_gpu.sh [--variants a,b,...|all] [--gpus N] [--per-gpu K]
#        [--deadline-s 540]
#        [--segment-s S] [--finish-only] [--min-run-s 120] [--prefix convergence110m]
#        [--preset 110m] [--tiny] [--state-dir DIR] [--data-dir DIR] [--results-dir DIR]
#        [-- convergence.py args]
#
# (i)   builds the host corpus (benchmarks/host_corpus.py) and the tokenized dataset once, under
#       --data-dir (default: the state directory .cache/<prefix>/; git-ignored; skipped when
#       already there: jobs that pass one --data-dir share one corpus and dataset);
# (ii)  trains the variants not finished yet, unfinished ones (checkpoint + part JSON) first,
#       K processes per GPU (--per-gpu, default 1: variants that fit K to a GPU share it;
#       their s/step is then the shared GPU's), CUDA_VISIBLE_DEVICES=i, its own MASTER_PORT; GPU i starts with
#       the i-th variant and each GPU then takes the next unclaimed one, so the GPUs stay busy
#       (a round-robin that balances). Every process gets `--time-limit-s T` (SIGTERM to
#       itself: stop after the step, checkpoint, part JSON) with T = min(--segment-s, time
#       left before the deadline - the merge reserve - the stop grace) under a hard
#       `timeout` at T + stop grace; a variant is not started with less than --min-run-s left,
#       nor with --finish-only when it cannot finish in time (estimated from the step times
#       reported so far: use it when the next call may find a fresh machine without the
#       checkpoints);
# (iii) merges and plots whatever exists: benchmarks/results/<prefix>.{json,md},
#       <prefix>_ppl.png, per-variant JSONs (final or .part) and logs in
#       benchmarks/results/<prefix>/;
# (iv)  when OUT is set: $OUT/<prefix>.{json,md}, <prefix>_ppl.png and <prefix>_runs.tgz (the
#       per-variant JSONs and logs; `tar xzf ... -C benchmarks/results` puts them in place).
# The whole script ends before --deadline-s seconds after its start. Results carried in the
# working tree (benchmarks/results/<prefix>/) are copied into the state first, so finished
# variants are not trained again on a fresh machine; checkpoints live only in .cache/.
set -u
cd "$(dirname "$0")/.."
START=$(date +%s)
VARIANTS="baseline,baseline_seed2,gaussian_r1/4,unbiased_r1/4,pca_r1/4,pca_r1/4_step2,pca_r1/4_step2_T50,pca_r1/4_step2_T50_keep,gradient_r1/4_step2_T50,pca_r1/8_step2.83_T50"
GPUS="" PER_GPU=1 DEADLINE_S=540 SEGMENT_S=0 PREFIX=convergence110m PRESET=110m
MIN_RUN_S=120 STOP_GRACE_S=30 MERGE_RESERVE_S=20 STATE="" RESULTS=benchmarks/results
CORPUS_MAX_BYTES="" FINISH_ONLY=0 EXTRA=() DATA=""
while [ $# -gt 0 ]; do
  case "$1" in
    --variants) VARIANTS=$2; shift 2 ;;
    --gpus) GPUS=$2; shift 2 ;;
    --per-gpu) PER_GPU=$2; shift 2 ;;
    --deadline-s) DEADLINE_S=$2; shift 2 ;;
    --segment-s) SEGMENT_S=$2; shift 2 ;;
    --prefix) PREFIX=$2; shift 2 ;;
    --preset) PRESET=$2; shift 2 ;;
    --tiny) PRESET=tiny; CORPUS_MAX_BYTES=3000000; MIN_RUN_S=20; STOP_GRACE_S=30
            MERGE_RESERVE_S=30; shift ;;
    --min-run-s) MIN_RUN_S=$2; shift 2 ;;
    --finish-only) FINISH_ONLY=1; shift ;;
    --stop-grace-s) STOP_GRACE_S=$2; shift 2 ;;
    --state-dir) STATE=$2; shift 2 ;;
    --data-dir) DATA=$2; shift 2 ;;
    --results-dir) RESULTS=$2; shift 2 ;;
    --corpus-max-bytes) CORPUS_MAX_BYTES=$2; shift 2 ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
STATE=${STATE:-.cache/$PREFIX}
DATA=${DATA:-$STATE}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} TOKENIZERS_PARALLELISM=true
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-python3}
B=benchmarks
mkdir -p "$STATE/runs" "$STATE/ckpt" "$STATE/logs" "$DATA/data"
LOG="$STATE/logs/convergence_gpu.log"
log() { echo "[$(date +%H:%M:%S) +$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }
left() { echo $(( DEADLINE_S - ($(date +%s) - START) )); }
within() { local b=$(( $(left) - $1 )); echo $(( b > 1 ? b : 1 )); }  # seconds left - $1, >= 1
[ "$VARIANTS" = all ] && VARIANTS=$($PY -c "import sys; sys.path.insert(0, '$B')
import convergence; print(','.join(convergence.VARIANTS))")
log "start: preset $PRESET, prefix $PREFIX, deadline ${DEADLINE_S}s, segment ${SEGMENT_S}s, state $STATE"

# ---------------------------------------------------------------- (i) corpus + tokenized data
CORPUS="$DATA/host_corpus.jsonl"
if [ ! -s "$CORPUS" ]; then
  log "building the host corpus -> $CORPUS"
  timeout "$(within "$MERGE_RESERVE_S")" $PY $B/host_corpus.py --out "$CORPUS" \
      ${CORPUS_MAX_BYTES:+--max-bytes $CORPUS_MAX_BYTES} > "$STATE/logs/host_corpus.log" 2>&1 \
    || { log "host corpus failed:"; tail -n 20 "$STATE/logs/host_corpus.log"; }
  tail -n 1 "$STATE/logs/host_corpus.log" | tee -a "$LOG"
fi
CV=($PY $B/convergence.py --preset "$PRESET" --prefix "$PREFIX" --corpus "$CORPUS"
    --cache-dir "$DATA/data" --out-dir "$STATE/runs" --ckpt-root "$STATE/ckpt")
PREPARED=0
if [ -s "$CORPUS" ]; then
  log "tokenized dataset (built once, then found by its key)"
  if timeout "$(within "$MERGE_RESERVE_S")" "${CV[@]}" --prepare "${EXTRA[@]}" \
      > "$STATE/logs/prepare.log" 2>&1; then
    PREPARED=1
    grep -E '"prepare_s"|"train_tokens"|"valid_tokens"|steps per variant' "$STATE/logs/prepare.log" \
      | tee -a "$LOG"
  else
    log "prepare failed or ran out of time:"; tail -n 20 "$STATE/logs/prepare.log"
  fi
fi

# ---------------------------------------------------------------- (ii) variants over the GPUs
for f in "$RESULTS/$PREFIX/${PREFIX}"_*.json; do   # results carried in the working tree
  [ -e "$f" ] && [ ! -e "$STATE/runs/$(basename "$f")" ] && cp "$f" "$STATE/runs/"
done
slug() { echo "${1//\//-}"; }
need_s() {  # seconds variant $1 needs to finish: 40 s start-up + 1.1 x steps left x s/step
  # (its own s/step, else the slowest seen); 0 while no variant has reported a step time
  $PY - "$STATE/runs" "$PREFIX" "$(slug "$1")" <<'EOF'
import glob, json, os, sys
runs, prefix, name = sys.argv[1:]
seen = {}
for f in glob.glob(os.path.join(runs, f"{prefix}_*.json")):
    try:
        r = json.load(open(f))
    except (OSError, ValueError):
        continue
    if isinstance(r, dict) and r.get("s_per_step") and r.get("steps"):
        seen[os.path.basename(f)[len(prefix) + 1:].split(".")[0]] = r
own = seen.get(name)
sps = own["s_per_step"] if own else max((r["s_per_step"] for r in seen.values()), default=0)
steps = (own or next(iter(seen.values()), {})).get("steps", 0)
left = steps - (own.get("step_reached", 0) if own else 0)
print(int(40 + 1.1 * sps * left) if sps else 0)
EOF
}
QUEUE=() LATER=()
IFS=',' read -ra ALL <<< "$VARIANTS"
for v in "${ALL[@]}"; do
  s=$(slug "$v")
  if [ -e "$STATE/runs/${PREFIX}_$s.json" ]; then
    log "$v: done"
  elif [ -e "$STATE/runs/${PREFIX}_$s.part.json" ] && [ -e "$STATE/ckpt/ckpt_$s/latest" ]; then
    QUEUE+=("$v")   # resume first
  else
    LATER+=("$v")
  fi
done
QUEUE+=(${LATER[@]+"${LATER[@]}"})
if [ -z "$GPUS" ]; then
  GPUS=$($PY -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
fi
if [ "$GPUS" -gt 0 ]; then
  IFS=',' read -ra DEVS <<< "${CUDA_VISIBLE_DEVICES:-}"
  [ ${#DEVS[@]} -eq 0 ] && DEVS=($(seq 0 $(( GPUS - 1 ))))
  SHARED=()
  for k in $(seq 1 "$PER_GPU"); do SHARED+=("${DEVS[@]:0:$GPUS}"); done
  DEVS=("${SHARED[@]}")
  WORKERS=${#DEVS[@]}
else
  DEVS=("") WORKERS=1   # no GPU: one CPU worker (dry runs with --tiny)
fi
CLAIMS="$STATE/claims.$$"
mkdir -p "$CLAIMS"
log "queue (${#QUEUE[@]}): ${QUEUE[*]:-nothing}; $WORKERS worker(s) on device(s) ${DEVS[*]:-cpu}"

worker() {  # worker index
  local w=$1 dev=${DEVS[$1]} v s limit hard rc need
  sleep "$w"   # GPU w claims the w-th variant first
  while [ "$PREPARED" = 1 ]; do
    v=""
    for cand in ${QUEUE[@]+"${QUEUE[@]}"}; do
      if mkdir "$CLAIMS/$(slug "$cand")" 2>/dev/null; then v=$cand; break; fi
    done
    [ -z "$v" ] && return 0
    s=$(slug "$v")
    limit=$(( $(left) - MERGE_RESERVE_S - STOP_GRACE_S ))
    if [ "$limit" -lt "$MIN_RUN_S" ]; then
      log "gpu ${dev:-cpu}: not starting $v (${limit}s left < --min-run-s $MIN_RUN_S)"
      rmdir "$CLAIMS/$s"
      return 0
    fi
    if [ "$SEGMENT_S" -gt 0 ] && [ "$SEGMENT_S" -lt "$limit" ]; then limit=$SEGMENT_S; fi
    if [ "$FINISH_ONLY" = 1 ]; then
      need=$(need_s "$v")
      if [ "$need" -gt "$limit" ]; then  # the claim stays: no other GPU has more time
        log "gpu ${dev:-cpu}: not starting $v (needs ~${need}s to finish, ${limit}s left)"
        continue
      fi
    fi
    hard=$(( limit + STOP_GRACE_S - 10 ))
    log "gpu ${dev:-cpu}: $v for at most ${limit}s (hard stop ${hard}s + 10s)"
    echo "=== $(date -Is) gpu ${dev:-cpu} limit ${limit}s" >> "$STATE/logs/$s.log"
    CUDA_VISIBLE_DEVICES=$dev timeout -s TERM -k 10 "$hard" "${CV[@]}" --variant "$v" \
        --time-limit-s "$limit" "${EXTRA[@]}" >> "$STATE/logs/$s.log" 2>&1
    rc=$?
    log "gpu ${dev:-cpu}: $v exit $rc: $(grep -E "^$v: |Error|error:" "$STATE/logs/$s.log" | tail -n 1)"
  done
}
pids=()
for w in $(seq 0 $(( WORKERS - 1 ))); do
  worker "$w" & pids+=($!)
done
wait "${pids[@]}"
rm -rf "$CLAIMS"

# ---------------------------------------------------------------- (iii) merge, plot, copy
log "merge"
if ls "$STATE/runs/${PREFIX}"_*.json > /dev/null 2>&1; then
  timeout "$(within 3)" $PY $B/convergence.py --merge --prefix "$PREFIX" --out-dir "$STATE/runs" \
      > "$STATE/logs/merge.log" 2>&1 || { log "merge failed:"; tail -n 20 "$STATE/logs/merge.log"; }
  cat "$STATE/runs/$PREFIX.md" 2>/dev/null | tee -a "$LOG"
fi
copy_results() {  # destination directory
  mkdir -p "$1/$PREFIX/logs"
  cp "$STATE/runs/${PREFIX}"_*.json "$1/$PREFIX/" 2>/dev/null
  for f in "$1/$PREFIX/${PREFIX}"_*.part.json; do   # parts of variants finished since
    [ -e "${f%.part.json}.json" ] && rm -f "$f"
  done
  cp "$STATE/logs/"*.log "$1/$PREFIX/logs/" 2>/dev/null
  cp "$DATA/host_corpus.jsonl.meta.json" "$1/$PREFIX/" 2>/dev/null
  for f in "$PREFIX.json" "$PREFIX.md" "${PREFIX}_ppl.png"; do
    [ -e "$STATE/runs/$f" ] && cp "$STATE/runs/$f" "$1/"
  done
}
copy_results "$RESULTS"
if [ -n "${OUT:-}" ]; then  # the device tool returns at most 8 files: the merge + one tarball
  mkdir -p "$OUT"
  for f in "$PREFIX.json" "$PREFIX.md" "${PREFIX}_ppl.png"; do
    [ -e "$RESULTS/$f" ] && cp "$RESULTS/$f" "$OUT/"
  done
  tar czf "$OUT/${PREFIX}_runs.tgz" -C "$RESULTS" "$PREFIX"
fi
log "end: $(( $(date +%s) - START ))s of ${DEADLINE_S}s"
