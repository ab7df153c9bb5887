#!/usr/bin/env bash
# The GPU results of benchmarks/results/, one named job per result, in one command:
#
#   bash benchmarks/gpu_suite.sh [options] JOB [JOB ...]     (JOB: a name of --list, or all)
#   bash benchmarks/gpu_suite.sh --list                       (jobs, GPUs, minutes, results)
#
#   --deadline-s S    the whole invocation ends within S seconds of its start (default 540:
#                     a 10-minute device call minus the caller's set-up); a job starts only
#                     when its minimum time is left, and gets min(its time, what is left)
#   --gpus N          GPUs to use (default: every visible one, torch.cuda.device_count)
#   --serial          one job at a time (default: jobs run side by side on free GPUs, in the
#                     order given; a job waits until enough GPUs are free)
#   --dry-run         print the commands (each line: [job] ENV... command) and run nothing
#   --tiny            CPU-sized models (smoke run; results go to <work>/results)
#   --results-dir D   where result files go (default benchmarks/results)
#   --work-dir D      logs, isolated parts, state (default .cache/gpu_suite/<time>)
#
# Each job needs a number of GPUs (or "all": every GPU, at least one) and is skipped, with
# the reason in the summary, when fewer are visible or when it cannot start before the
# deadline. Results (JSON + markdown) go to the results directory, plots are redone by
# plot_results.py at the end; with OUT set, the new or changed result files (json/md/png) are
# copied to $OUT: as they are when there are at most 6 of them at the top of the results
# directory, else as gpu_suite_results.tgz (tar xzf ... -C benchmarks/results), next to
# gpu_suite_summary.txt and gpu_suite_logs.tgz (at most 8 files: what the device tool returns).
# Needs megatron-core, deepspeed, pydantic, tokenizers (+ hjson) importable: install the
# wheels before calling it (benchmarks/README.md, "Reproduce").
set -u
cd "$(dirname "$0")/.." || exit 1
START=$(date +%s)
B=benchmarks
PY=${PY:-python3}
DEADLINE_S=540 NGPU="" SERIAL=0 DRY=0 TINY=0 RES="" WORK="" LIST=0
RESERVE_S=25   # plotting, archives and copies at the end
JOBS=()

# name|GPUs|time limit s|minimum s|minutes (one call)|results (in the results directory)|what
JOB_TABLE='mt_350m|1|300|90|4|mt_350m.{json,md}, mt_350m_memory_vs_time.png|350M, one GPU, every variant
mt_1.3b|1|300|90|4|mt_1.3b.{json,md}, mt_1.3b_memory_vs_time.png|1.3B, one GPU, every variant
mt_1.3b_r8bf16|1|75|50|1|mt_1.3b_r8bf16.{json,md}, mt_1.3b_r8bf16_memory_vs_time.png|1.3B, one GPU, baseline + r1/8 bf16 W0
tp2_sp|2|150|90|2|mt_tp2_sp_z1.{json,md}, mt_tp2_sp_z1_memory_vs_time.png|TP=2 + SP, ZeRO-1, 1.3B
inv_tp2|2|100|45|1|inv_tp2.{json,md}|TP-invariance at TP=2 + SP, bf16 (20 steps, 350M)
inv_tp1|1|100|45|1|inv_tp1.{json,md}|TP-invariance reference, TP=1, bf16
inv_fp32|2|220|140|3|inv_fp32_tp1.{json,md}, inv_fp32_tp2.{json,md}|TP-invariance in fp32 at TP=1 then TP=2
dp2_z1|2|110|60|1.5|mt_dp2_z1.{json,md}, mt_dp2_z1_memory_vs_time.png|DP=2 ZeRO-1 (deepspeed launcher), 1.3B
dp2_z3|2|80|70|1|mt_dp2_z3.{json,md}, mt_dp2_z3_memory_vs_time.png|DP=2 ZeRO-3 (deepspeed launcher, bf16 W0), 1.3B
mt_1.3b_lean|1|330|120|6|mt_1.3b_lean.{json,md}, mt_1.3b_lean_memory_vs_time.png|1.3B, micro-batch 4, one GPU: Megatron-default (fused) and unfused baselines, CompAct r1/4 with and without lean activations (issue 11)
mt_1.3b_options|1|330|150|6|mt_1.3b_options.{json,md}, mt_1.3b_options_memory_vs_time.png|1.3B, micro-batch 4, one GPU: each activation option alone (fused CE, FP8 swiglu / attention / norm, bf16 W0)
steptime_1.3b|1|420|150|3|steptime_1.3b.{json,md}|1.3B, micro-batch 4, one GPU: step-time ratios to the baseline of r1/4, bf16 W0 lean, lean, measured interleaved (step_time.py: 8 rounds of 5 steps, balanced order)
mt_7b_lean|1|240|150|4|mt_7b_lean.{json,md}, mt_7b_lean_mb8.{json,md}|7B on one GPU without recompute: r1/8, bf16 W0, lean activations at micro-batch 4 and 8
mt_1.3b_pca_memory|1|200|90|2|mt_1.3b_pca_memory.{json,md}, mt_1.3b_pca_memory_memory_vs_time.png|1.3B, micro-batch 4: peak memory of pca vs gaussian P with the estimate steps inside the measured steps, and r1/4 bf16 W0 lean
convergence110m_lr|1|0|150|2 x 9|convergence110m_lr.{json,md}, convergence110m_lr_ppl.png, convergence110m_lr/|the learning-rate control at 110M (issue 25): baseline and the pca r1/4 default at lr 5e-4 and 2e-3 (four runs sharing one GPU), beside their lr 1e-3 runs (copied from convergence110m_fused / convergence110m_prior), best-vs-best; resumable
convergence110m_lr2|1|0|150|4 calls of 9|convergence110m_lr2.{json,md}, convergence110m_lr2_ppl.png, convergence110m_lr2/|the learning-rate control at 110M in the data order of megatron GPTDataset (the data path since issue 24; convergence110m_lr ran the order before it): baseline at 5e-4, 1e-3 (2 seeds) and 2e-3, the pca r1/4 default at 1e-3 (2 seeds), 2e-3 and 4e-3, four runs at a time sharing one GPU, best-vs-best; resumable
convergence350m|1|0|150|2 x 9|convergence350m.{json,md}, convergence350m_ppl.png, convergence350m/|350M, baseline and the pca r1/4 default, two seeds each (four runs sharing one GPU), 8M tokens of the host corpus of the 110M preset, with the kept-energy telemetry of the pca runs; resumable
kept_energy_7b|1|300|200|5|kept_energy_7b.{json,md}|kept_energy.py at 7B on one GPU (the compact-plan config for world size 1: TP 1, ZeRO-1, fp32 W0, micro-batch 2, no recompute), 80 steps, P re-estimated every 20
offload_7b_24gb|1|560|420|9|offload_7b_24gb.{json,md}|capped_train.py: the 7B preset configs/train/llama_7b_24gb.yaml (ZeRO-1 + optimizer offload, bf16 W0, full recompute, micro-batch 1) under a 24 GiB cap (set_per_process_memory_fraction) at global batch 64 and 256, 3 optimizer steps each: peak allocated / reserved, host RSS, step time, tokens/s, MFU beside compact-plan
offload_7b_24gb_ga512|1|580|460|8|offload_7b_24gb_ga512.{json,md}|capped_train.py: the preset at global batch 512 (its default), the same cap, 3 optimizer steps: MFU where the host AdamW step amortises
offload_7b_24gb_pca|1|300|150|3|offload_7b_24gb_pca.{json,md}|capped_train.py: the pca default in the leanest pca plan of compact-plan for 24 GiB (the preset with compression.projection=pca, ZeRO-2, P re-estimated every step so that steps 1-2 use the warm-started sketch) under the 24 GiB cap, global batch 64
convergence110m_offload|1|0|150|6|convergence110m_offload.{json,md}, convergence110m_offload_ppl.png, convergence110m_offload/|the pca r1/4 default with the optimizer offloaded to the host (ZeRO-1 + DeepSpeed offload, issue 28), two seeds sharing one GPU, in the data order of convergence110m_lr2, beside its baseline and on-GPU pca seeds (copied); resumable
convergence110m_preset24|1|0|150|12|convergence110m_preset24.{json,md}, convergence110m_preset24_ppl.png, convergence110m_preset24/|the numerics of the 24 GB 7B preset at 110M (gaussian r1/4, bf16 W0, optimizer offload; two seeds) beside gaussian r1/4 with an fp32 W0 on the GPU (two seeds), four runs sharing one GPU, in the data order of convergence110m_lr2, with its baseline seeds (copied); resumable
megatron_lm_client|1|560|300|9|megatron_lm_client.{json,md}|megatron_lm_client.py: Megatron-LM own pretrain_gpt.py (core_v0.16.1 checkout in .mlm, or MLM=dir) with the compact_dist spec and merge, beside compact-train with the same settings on the same indexed data (compact-train stdlib corpus, vocabulary 4096), tiny GPT, 200 iterations: fp32 two seeds each, bf16, and the Megatron local-spec baseline (issue 26 item 6)
kept_energy_1.3b|1|480|300|8|kept_energy_1.3b.{json,md}|kept_energy.py: what P of the pca r1/4 default keeps of the weight gradient of every layer at 1.3B, micro-batch 8, host corpus, 300 steps from scratch, measured before each re-estimate (every 25 steps)
estimate_cost|1|200|90|2|estimate_cost.json|estimate_cost.py: what a data-aware re-estimate of P costs per step, 110M and 1.3B
eigh_cost|1|90|30|1|eigh_cost.json|eigh_cost.py: the k x k eigendecompositions of a 1.3B estimate, cusolver vs host thread pools
zero_stages|1|240|120|3|zero_stages.{json,md}|the embedded default at ZeRO-0 and ZeRO-1 side by side, 200 steps, bf16: validation perplexity per evaluation (ZeRO-0 + bf16 merged every update again before issue 23)
profile_1.3b|1|150|60|2|profile_1.3b.json|per-kernel CUDA time of forward+backward (4 layers of 1.3B): CompAct r1/4 alone and with each FP8 option, baseline
projection_cost|1|90|30|1|projection_cost.json|P generation, projection, merge per linear role, 1.3B shapes
convergence33m|all|0|120|3-6 (4/2 GPUs)|convergence/convergence_*.json, convergence/convergence.{json,md}, convergence.md, convergence_ppl.png|33M on the stdlib corpus, 8 variants over the GPUs, resumable (state: .cache/gpu_suite/convergence33m)
convergence110m|all|0|150|2 x 9 (4 GPUs)|convergence110m.{json,md}, convergence110m_ppl.png, convergence110m/|110M on the host corpus by benchmarks/convergence_gpu.sh, resumable (unfused SwiGLU: the code before the fused default)
convergence110m_fused|all|0|150|2 x 9 (2 GPUs)|convergence110m_fused.{json,md}, convergence110m_fused_ppl.png, convergence110m_fused/|110M with the Megatron default fusions: 2 baseline seeds, gaussian, pca r1/4 (2 seeds; W0 in fp32, as a bf16 pair, in bf16) and r1/8, pca + lean activations (FP8 cost), resumable
convergence110m_prior|1|0|150|9|convergence110m_prior.{json,md}, convergence110m_prior_ppl.png, convergence110m_prior/|110M, pca r1/4 default (2 seeds) after the transport prior for new directions (issue 23 item 3), against the convergence110m_fused baseline seeds (copied: the baseline has no compact layer), resumable
tp4_sp_z1|4|240|130|3|mt_tp4_sp_z1.{json,md}, mt_tp4_sp_z1_memory_vs_time.png|TP=4 + SP, ZeRO-1, 1.3B (r1/4 with an fp32 W0 and a bf16 pair, r1/8)
tp2_dp2_z1|4|150|70|2|mt_tp2_dp2_z1.{json,md}, mt_tp2_dp2_z1_memory_vs_time.png|TP=2 x DP=2 + SP, ZeRO-1, 1.3B
tp2_dp2_z2|4|150|70|2|mt_tp2_dp2_z2.{json,md}, mt_tp2_dp2_z2_memory_vs_time.png|TP=2 x DP=2 + SP, ZeRO-2, 1.3B
dp4_z3_1.3b|4|120|80|2|mt_dp4_z3_1.3b.{json,md}, mt_dp4_z3_1.3b_memory_vs_time.png|DP=4 ZeRO-3 (deepspeed launcher, bf16 W0), 1.3B
dp4_z3_7b|4|400|240|6|mt_dp4_z3_7b.{json,md}, mt_dp4_z3_7b_memory_vs_time.png|DP=4 ZeRO-3 (deepspeed launcher, bf16 W0), 7B, micro-batch 1
merge_cost|1|150|60|2|merge_cost.json|merge_cost.py: host and device time of the merge per step, one merge per layer vs grouped by shape, at the per-rank shapes of 1.3B at TP 1, 2, 4
steptime_dp2_z3|2|200|120|3|steptime_dp2_z3.{json,md}, steptime_dp2_z3_profile.{json,md}|DP=2 ZeRO-3, 1.3B, micro-batch 4: interleaved step-time ratio (step_time.py under torchrun) of r1/4 bf16 W0, and a torch.profiler summary per variant
steptime_tp2|2|320|150|5|steptime_tp2_mb4.{json,md}, steptime_tp2_mb4_profile.{json,md}, steptime_tp2_mb2.{json,md}|TP=2 + SP, ZeRO-1, 1.3B: interleaved step-time ratios (r1/4 with an fp32 W0, a bf16 pair, a bf16 W0) at micro-batch 4 (with a profile) and 2 (the per-GPU work of TP=4 at micro-batch 4)
steptime_tp4|4|300|150|5|steptime_tp4_mb4.{json,md}, steptime_tp4_mb4_profile.{json,md}|TP=4 + SP, ZeRO-1, 1.3B, micro-batch 4: interleaved step-time ratios (r1/4 with an fp32 W0, a bf16 pair, a bf16 W0) and a torch.profiler summary per variant
steptime_dp4_z3|4|200|120|3|steptime_dp4_z3_1.3b.{json,md}, steptime_dp4_z3_1.3b_profile.{json,md}|DP=4 ZeRO-3, 1.3B, micro-batch 4: interleaved step-time ratio of r1/4 bf16 W0, and a torch.profiler summary per variant
steptime_dp4_z3_7b|4|420|240|7|steptime_dp4_z3_7b.{json,md}|DP=4 ZeRO-3, 7B, micro-batch 1: interleaved step-time ratio of r1/4 bf16 W0
inv_tp4|4|160|100|2|inv_tp4.{json,md}, inv_fp32_tp4.{json,md}|TP-invariance at TP=4, bf16 then fp32'

job_names() { echo "$JOB_TABLE" | cut -d'|' -f1; }
field() {  # field <job> <column 2..7>
  echo "$JOB_TABLE" | awk -F'|' -v j="$1" -v c="$2" '$1 == j { print $c }'
}

while [ $# -gt 0 ]; do
  case "$1" in
    --list) LIST=1; shift ;;
    --deadline-s) DEADLINE_S=$2; shift 2 ;;
    --gpus) NGPU=$2; shift 2 ;;
    --serial) SERIAL=1; shift ;;
    --dry-run) DRY=1; shift ;;
    --tiny) TINY=1; shift ;;
    --results-dir) RES=$2; shift 2 ;;
    --work-dir) WORK=$2; shift 2 ;;
    -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
    all) mapfile -t JOBS < <(job_names); shift ;;
    -*) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
    *) if [ -z "$(field "$1" 2)" ]; then
         echo "unknown job $1; jobs: $(job_names | tr '\n' ' ')" >&2; exit 2
       fi
       JOBS+=("$1"); shift ;;
  esac
done

if [ "$LIST" = 1 ]; then
  printf '%-16s %-4s %-15s %s\n' job GPUs minutes "what / results (in $B/results/)"
  while IFS='|' read -r name gpus _ _ minutes results what; do
    printf '%-16s %-4s %-15s %s\n%37s-> %s\n' "$name" "$gpus" "$minutes" "$what" "" "$results"
  done <<< "$JOB_TABLE"
  exit 0
fi
if [ ${#JOBS[@]} -eq 0 ]; then
  echo "no job given; --list shows them" >&2; exit 2
fi

export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True TOKENIZERS_PARALLELISM=true
if [ -z "$WORK" ] && [ "$DRY" = 1 ]; then
  WORK=$(mktemp -d /tmp/gpu_suite.XXXXXX); trap 'rm -rf "$WORK"' EXIT
fi
WORK=${WORK:-.cache/gpu_suite/$(date +%Y%m%d-%H%M%S)}
if [ "$TINY" = 1 ]; then
  P350=tiny P13=tiny P7=tiny PINV=tiny CVX=(--tiny) RES=${RES:-$WORK/results}
  EC=(--preset tiny --steps 20 --interval 6) EIGH=(--shapes "4x64,8x32")
  KE=(--config configs/train/tiny.yaml --steps 6 --resample-interval 2 --warmup 1
      --corpus-max-bytes 2000000)
  KE7=("${KE[@]}") CVDATA=$WORK/host110m
  CAP=(--config configs/train/tiny.yaml --cap-gib 0 --global-batch "2,4" --steps 2
       --corpus-max-bytes 2000000 train.offload_pin_memory=false)
  CAP512=("${CAP[@]}" --global-batch 8) CAPPCA=("${CAP[@]}" --global-batch 2)
  CV33_STATE=$WORK/convergence33m
else
  P350=350m P13=1.3b P7=7b PINV=350m CVX=() RES=${RES:-$B/results}
  EC=(--preset 110m --preset 1.3b) EIGH=()
  KE=(--steps 300 --resample-interval 25)
  KE7=(--config configs/train/llama_7b.yaml --steps 80 --resample-interval 20 --warmup 20
       parallel.tensor_model_parallel_size=1 train.zero_stage=1 train.micro_batch_size=2
       compression.ratio=0.25 compression.base_dtype=fp32 recompute.granularity=none)
  CAP=(--global-batch "64,256" --steps 3)
  CAP512=(--global-batch 512 --steps 3) CAPPCA=(--global-batch 64 --steps 3)
  CVDATA=.cache/host110m   # one host corpus + tokenized dataset for the 110M and 350M jobs
  CV33_STATE=.cache/gpu_suite/convergence33m
fi
CV33_VARIANTS=${CV33_VARIANTS:-baseline,r1/2,r1/4,r1/4_bf16W0,unbiased_r1/4,r1/4_reset,r1/4_T50,r1/4_T50_reset}
mkdir -p "$WORK/logs" "$WORK/rc" "$RES"

if [ -z "$NGPU" ]; then
  if [ "$DRY" = 1 ]; then NGPU=0
  else NGPU=$($PY -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
  fi
fi
IFS=',' read -ra DEVS <<< "${CUDA_VISIBLE_DEVICES:-}"
[ ${#DEVS[@]} -lt "$NGPU" ] && mapfile -t DEVS < <(seq 0 $(( NGPU - 1 )))
DEVS=("${DEVS[@]:0:$NGPU}")

now() { echo $(( $(date +%s) - START )); }
left() { echo $(( DEADLINE_S - RESERVE_S - $(now) )); }
log() { echo "[gpu_suite +$(now)s] $*"; }
SUMMARY=$WORK/summary.txt
note() { echo "$*" >> "$SUMMARY"; log "$*"; }
: > "$SUMMARY"

# ------------------------------------------------------------------ helpers used by the jobs
# Inside a job: JOB (name), JW (its work directory), JSTART, JT (its seconds), CUDA_VISIBLE_DEVICES.
jleft() { echo $(( JT - ($(date +%s) - JSTART) )); }
x() {  # x <hard timeout s> command...: logged to <work>/logs/<job>.log, or printed (--dry-run)
  local t=$1; shift
  if [ "$DRY" = 1 ]; then
    echo "[$JOB] CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-} timeout -k 15 $t $(printf '%q ' "$@")"
    return 0
  fi
  echo "=== $(date -Is) CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-} timeout -k 15 $t $*" \
    >> "$WORK/logs/$JOB.log"
  timeout -k 15 "$t" "$@" >> "$WORK/logs/$JOB.log" 2>&1
}
lr2_references() {  # lr2_references <prefix> <run>...: convergence110m_lr2's runs (the same
  # data order, on the GPU) copied in as <prefix>'s reference runs; 1 if one is missing
  local prefix=$1 run src missing=0; shift
  [ "$DRY" = 1 ] && return 0
  mkdir -p "$RES/$prefix"
  for run in "$@"; do
    src=$RES/convergence110m_lr2/convergence110m_lr2_$run.json
    if [ -e "$src" ]; then cp "$src" "$RES/$prefix/${prefix}_$run.json"
    else log "$prefix: no $src (the reference runs): the table will lack them"; missing=1
    fi
  done
  return $missing
}
keep() {  # keep <file>...: from the job's work directory to the results directory
  local f
  for f in "$@"; do
    if [ "$DRY" = 1 ]; then echo "[$JOB] # writes $RES/$f"; continue; fi
    if [ -e "$JW/$f" ]; then cp "$JW/$f" "$RES/$f"; else echo "$JOB: no $f" >> "$WORK/logs/$JOB.log"; fi
  done
}
mt() {  # mt <time limit s> <name> <none|torchrun|deepspeed> <nproc> memory_throughput args...
  local t=$1 name=$2 launcher=$3 n=$4 rc; shift 4
  local launch=()
  [ "$t" -lt 10 ] && t=10
  [ "$launcher" != none ] && launch=(--launcher "$launcher" --nproc "$n")
  OMP_NUM_THREADS=${OMP_NUM_THREADS:-8} x $(( t + 30 )) "$PY" "$B"/memory_throughput.py --isolate \
    ${launch[@]+"${launch[@]}"} --out-dir "$JW" --name "$name" --time-limit-s "$t" "$@"
  rc=$?
  keep "$name.json" "$name.md"
  return $rc
}
st() {  # st <time limit s> <name> <nproc> step_time args...: torchrun when nproc > 1
  local t=$1 name=$2 n=$3 rc; shift 3
  local launch=("$PY")
  [ "$n" -gt 1 ] && launch=("$PY" -m torch.distributed.run --nproc_per_node "$n"
                            --master_port "$(( 29500 + RANDOM % 2000 ))")
  OMP_NUM_THREADS=${OMP_NUM_THREADS:-8} x $(( t + 30 )) "${launch[@]}" "$B"/step_time.py \
    --out-dir "$JW" --name "$name" --time-limit-s "$t" "$@"
  rc=$?
  keep "$name.json" "$name.md"
  [ -e "$JW/${name}_profile.json" ] && keep "${name}_profile.json" "${name}_profile.md"
  return $rc
}
VARS=(--variants "baseline,compact_r1/4,compact_r1/8")
OPTS="baseline,compact_r1/4,compact_r1/4_fusedce,compact_r1/4_fp8swiglu,compact_r1/4_fp8attention"
OPTS+=",compact_r1/4_fp8norm,compact_r1/4_bf16W0,compact_r1/4_bf16W0_lean,compact_r1/4_gaussian"
STEPTIME="baseline,compact_r1/4,compact_r1/4_bf16W0_lean,compact_r1/4_lean"
STTP=(--variants "baseline,compact_r1/4,compact_r1/4_bf16pair,compact_r1/4_bf16W0" --rounds 12
      --steps-per-round 4
      --warmup 4)
INV=(--tp-invariance-steps 20 --tp-invariance-preset "$PINV"
     --tp-invariance-variants "baseline,compact_r1/4")
INV_FP32=(--skip-throughput "${INV[@]}" --precision fp32)

convergence33m() {  # the 33M variants over the job's GPUs, one process per GPU at a time
  local runs=$CV33_STATE/runs claims=$CV33_STATE/claims.$$ v w rc=0
  local cv=("$PY" "$B"/convergence.py ${CVX[@]+"${CVX[@]}"} --out-dir "$runs")
  local devs queue
  [ "$DRY" = 0 ] && mkdir -p "$runs" "$claims"
  OMP_NUM_THREADS=4 x "$(jleft)" "${cv[@]}" --prepare || { rm -rf "$claims"; return 1; }
  IFS=',' read -ra devs <<< "${CUDA_VISIBLE_DEVICES:-0}"
  IFS=',' read -ra queue <<< "$CV33_VARIANTS"
  variant() {  # variant <device> <variant>
    local limit=$(( $(jleft) - 40 ))   # the merge, and 15 s to stop with a checkpoint
    if [ "$limit" -lt 40 ]; then note "$JOB: $2 not started (${limit}s left)"; return 0; fi
    CUDA_VISIBLE_DEVICES=$1 OMP_NUM_THREADS=4 x $(( limit + 15 )) "${cv[@]}" \
      --variant "$2" --time-limit-s "$limit"
  }
  worker() {  # one per GPU: takes the next unclaimed variant until none is left
    local v
    for v in "${queue[@]}"; do
      mkdir "$claims/${v//\//-}" 2> /dev/null && variant "$1" "$v"
    done
  }
  if [ "$DRY" = 1 ]; then  # the order a real run would most likely take
    for w in "${!queue[@]}"; do variant "${devs[w % ${#devs[@]}]}" "${queue[w]}"; done
  else
    for w in "${devs[@]}"; do worker "$w" & done
  fi
  wait
  rm -rf "$claims"
  if [ "$DRY" = 1 ]; then
    echo "[$JOB] # copies $runs/convergence_*.json to $RES/convergence/"
  else
    mkdir -p "$RES/convergence"
    for v in "$runs"/convergence_*.json; do
      [ -e "$v" ] && cp "$v" "$RES/convergence/"
    done
    for v in "$RES"/convergence/convergence_*.part.json; do  # finished since
      [ -e "${v%.part.json}.json" ] && rm -f "$v"
    done
  fi
  x 60 "$PY" "$B"/convergence.py --merge --out-dir "$RES/convergence" || rc=$?
  return $rc
}

run_job() {  # run_job <job>, with JOB, JW, JSTART, JT, CUDA_VISIBLE_DEVICES set
  local t rc=0 last
  local -a extra=()
  case "$1" in
    mt_350m) mt "$JT" mt_350m none 1 --preset "$P350" ;;
    mt_1.3b) mt "$JT" mt_1.3b none 1 --preset "$P13" ;;
    mt_1.3b_r8bf16) mt "$JT" mt_1.3b_r8bf16 none 1 --preset "$P13" \
                      --variants baseline,compact_r1/8_bf16W0 ;;
    tp2_sp) mt "$JT" mt_tp2_sp_z1 torchrun 2 --preset "$P13" --tp 2 "${VARS[@]}" ;;
    inv_tp2) mt "$JT" inv_tp2 torchrun 2 --preset "$P13" --tp 2 --skip-throughput "${INV[@]}" ;;
    inv_tp1) mt "$JT" inv_tp1 none 1 --preset "$P13" --tp 1 --skip-throughput "${INV[@]}" ;;
    inv_fp32)
      t=$(( JT / 2 ))
      CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES%%,*} \
        mt "$t" inv_fp32_tp1 none 1 --preset "$P13" --tp 1 "${INV_FP32[@]}" || rc=$?
      mt "$(( $(jleft) - 35 ))" inv_fp32_tp2 torchrun 2 --preset "$P13" --tp 2 "${INV_FP32[@]}" \
        || rc=$? ;;
    dp2_z1) mt "$JT" mt_dp2_z1 deepspeed 2 --preset "$P13" --zero-stage 1 \
              --variants baseline,compact_r1/4,compact_r1/8_bf16W0 ;;
    dp2_z3) mt "$JT" mt_dp2_z3 deepspeed 2 --preset "$P13" --zero-stage 3 \
              --variants baseline,compact_r1/4_bf16W0 ;;
    mt_1.3b_lean) mt "$JT" mt_1.3b_lean none 1 --preset "$P13" --micro-batch 4 --no-max-mbs \
                    --variants baseline,compact_r1/4_lean,baseline_unfused,compact_r1/4,compact_r1/8_bf16W0_lean ;;
    mt_1.3b_options) mt "$JT" mt_1.3b_options none 1 --preset "$P13" --micro-batch 4 --no-max-mbs \
                       --warmup 3 --steps 6 --variants "$OPTS" ;;
    steptime_1.3b)
      OMP_NUM_THREADS=${OMP_NUM_THREADS:-8} x $(( JT + 30 )) "$PY" "$B"/step_time.py \
        --preset "$P13" --micro-batch 4 --variants "$STEPTIME" --rounds 8 --steps-per-round 5 \
        --warmup 10 --time-limit-s "$JT" --out-dir "$JW" --name steptime_1.3b || rc=$?
      keep steptime_1.3b.json steptime_1.3b.md ;;
    mt_7b_lean)
      t=$(( JT / 2 ))
      mt "$t" mt_7b_lean none 1 --preset "$P7" --micro-batch 4 --no-max-mbs --warmup 2 \
        --steps 3 --variants compact_r1/8_bf16W0_lean || rc=$?
      mt "$(( $(jleft) - 35 ))" mt_7b_lean_mb8 none 1 --preset "$P7" --micro-batch 8 \
        --no-max-mbs --warmup 2 --steps 3 --variants compact_r1/8_bf16W0_lean || rc=$? ;;
    mt_1.3b_pca_memory) mt "$JT" mt_1.3b_pca_memory none 1 --preset "$P13" --micro-batch 4 \
                          --no-max-mbs --warmup 3 --steps 12 \
                          --variants compact_r1/4,compact_r1/4_gaussian,compact_r1/4_bf16W0_lean ;;
    kept_energy_1.3b)
      x "$JT" "$PY" "$B"/kept_energy.py "${KE[@]}" --out-dir "$JW" --name kept_energy_1.3b \
        --cache-dir "$WORK/kept_energy" || rc=$?
      keep kept_energy_1.3b.json kept_energy_1.3b.md ;;
    offload_7b_24gb)
      x "$JT" "$PY" "$B"/capped_train.py "${CAP[@]}" --out-dir "$JW" --name offload_7b_24gb \
        --cache-dir "$WORK/kept_energy" train.eval_batches=1 || rc=$?
      keep offload_7b_24gb.json offload_7b_24gb.md ;;
    offload_7b_24gb_ga512)
      x "$JT" "$PY" "$B"/capped_train.py "${CAP512[@]}" --out-dir "$JW" \
        --name offload_7b_24gb_ga512 --cache-dir "$WORK/kept_energy" train.eval_batches=1 || rc=$?
      keep offload_7b_24gb_ga512.json offload_7b_24gb_ga512.md ;;
    offload_7b_24gb_pca)
      x "$JT" "$PY" "$B"/capped_train.py "${CAPPCA[@]}" --out-dir "$JW" \
        --name offload_7b_24gb_pca --cache-dir "$WORK/kept_energy" train.eval_batches=1 \
        compression.projection=pca train.zero_stage=2 compression.resample_interval=1 || rc=$?
      keep offload_7b_24gb_pca.json offload_7b_24gb_pca.md ;;
    megatron_lm_client)
      x "$JT" "$PY" "$B"/megatron_lm_client.py --megatron-lm "${MLM:-.mlm}" \
        --timeout-s "$(( JT / 8 ))" --out-dir "$JW" --name megatron_lm_client || rc=$?
      keep megatron_lm_client.json megatron_lm_client.md ;;
    kept_energy_7b)
      x "$JT" "$PY" "$B"/kept_energy.py "${KE7[@]}" --out-dir "$JW" --name kept_energy_7b \
        --cache-dir "$WORK/kept_energy" || rc=$?
      keep kept_energy_7b.json kept_energy_7b.md ;;
    convergence110m_lr)
      [ "$TINY" = 1 ] && extra=(--tiny --state-dir "$WORK/convergence110m_lr")
      [ "$DRY" = 1 ] || mkdir -p "$RES/convergence110m_lr"
      for run in fused/baseline fused/baseline_seed2 prior/pca_r1-4 prior/pca_r1-4_seed2; do
        src=$RES/convergence110m_${run%/*}/convergence110m_${run%/*}_${run#*/}.json  # lr 1e-3
        [ "$DRY" = 0 ] && [ -e "$src" ] &&
          cp "$src" "$RES/convergence110m_lr/convergence110m_lr_${run#*/}.json"
      done
      x $(( JT + 20 )) env -u OUT bash "$B"/convergence_gpu.sh --deadline-s "$JT" \
        --prefix convergence110m_lr --results-dir "$RES" --per-gpu 4 --data-dir "$CVDATA" \
        --variants baseline_lr0.0005,baseline_lr0.002,pca_r1/4_lr0.0005,pca_r1/4_lr0.002 \
        ${extra[@]+"${extra[@]}"} || rc=$? ;;
    convergence110m_lr2)
      [ "$TINY" = 1 ] && extra=(--tiny --state-dir "$WORK/convergence110m_lr2")
      x $(( JT + 20 )) env -u OUT bash "$B"/convergence_gpu.sh --deadline-s "$JT" \
        --prefix convergence110m_lr2 --results-dir "$RES" --per-gpu 4 --data-dir "$CVDATA" \
        --variants baseline,baseline_lr0.002,pca_r1/4_lr0.002,pca_r1/4_lr0.004,baseline_seed2,baseline_lr0.0005,pca_r1/4,pca_r1/4_seed2 \
        ${extra[@]+"${extra[@]}"} || rc=$? ;;
    convergence110m_offload)
      [ "$TINY" = 1 ] && extra=(--tiny --state-dir "$WORK/convergence110m_offload")
      lr2_references convergence110m_offload baseline baseline_seed2 pca_r1-4 pca_r1-4_seed2 || rc=1
      x $(( JT + 20 )) env -u OUT bash "$B"/convergence_gpu.sh --deadline-s "$JT" \
        --prefix convergence110m_offload --results-dir "$RES" --per-gpu 2 --data-dir "$CVDATA" \
        --variants pca_r1/4_offload,pca_r1/4_offload_seed2 ${extra[@]+"${extra[@]}"} || rc=$? ;;
    convergence110m_preset24)
      [ "$TINY" = 1 ] && extra=(--tiny --state-dir "$WORK/convergence110m_preset24")
      lr2_references convergence110m_preset24 baseline baseline_seed2 || rc=1
      x $(( JT + 20 )) env -u OUT bash "$B"/convergence_gpu.sh --deadline-s "$JT" \
        --prefix convergence110m_preset24 --results-dir "$RES" --per-gpu 4 --data-dir "$CVDATA" \
        --variants gaussian_r1/4,gaussian_r1/4_seed2,gaussian_r1/4_preset24,gaussian_r1/4_preset24_seed2 \
        ${extra[@]+"${extra[@]}"} || rc=$? ;;
    convergence350m)
      [ "$TINY" = 1 ] && extra=(--tiny --state-dir "$WORK/convergence350m")
      x $(( JT + 20 )) env -u OUT bash "$B"/convergence_gpu.sh --deadline-s "$JT" \
        --prefix convergence350m --preset 350m --results-dir "$RES" --per-gpu 4 \
        --data-dir "$CVDATA" --variants baseline,baseline_seed2,pca_r1/4,pca_r1/4_seed2 \
        ${extra[@]+"${extra[@]}"} || rc=$? ;;
    estimate_cost)
      x "$JT" "$PY" "$B"/estimate_cost.py "${EC[@]}" --out "$JW/estimate_cost.json" || rc=$?
      keep estimate_cost.json ;;
    zero_stages)
      x "$JT" "$PY" "$B"/zero_stages.py --stages 0 1 --steps 200 --out-dir "$JW" || rc=$?
      keep zero_stages.json zero_stages.md ;;
    eigh_cost)
      x "$JT" "$PY" "$B"/eigh_cost.py ${EIGH[@]+"${EIGH[@]}"} --out "$JW/eigh_cost.json" || rc=$?
      keep eigh_cost.json ;;
    profile_1.3b)
      x "$JT" "$PY" "$B"/profile_model.py --preset "$P13" --layers 4 --micro-batch 4 \
        --variant "compact=compression.ratio=0.25" \
        --variant "fp8attention=compression.ratio=0.25;activations.fp8_storage=[attention]" \
        --variant "fp8swiglu=compression.ratio=0.25;activations.fp8_storage=[swiglu]" \
        --variant "fp8norm=compression.ratio=0.25;activations.fp8_storage=[norm]" \
        --variant "baseline=compression.enabled=false" --out "$JW/profile_1.3b.json" || rc=$?
      keep profile_1.3b.json ;;
    convergence110m_fused)
      [ "$TINY" = 1 ] && extra=(--tiny --state-dir "$WORK/convergence110m_fused")
      x $(( JT + 20 )) env -u OUT bash "$B"/convergence_gpu.sh --deadline-s "$JT" \
        --prefix convergence110m_fused --results-dir "$RES" \
        --variants baseline,baseline_seed2,gaussian_r1/4,pca_r1/4,pca_r1/4_lean,pca_r1/8,pca_r1/4_seed2,pca_r1/4_bf16pair,pca_r1/4_bf16W0 \
        ${extra[@]+"${extra[@]}"} || rc=$? ;;
    convergence110m_prior)
      [ "$TINY" = 1 ] && extra=(--tiny --state-dir "$WORK/convergence110m_prior")
      [ "$DRY" = 1 ] || mkdir -p "$RES/convergence110m_prior"
      for seed in baseline baseline_seed2; do  # the same runs as convergence110m_fused's
        [ "$DRY" = 0 ] && [ -e "$RES/convergence110m_fused/convergence110m_fused_$seed.json" ] &&
          cp "$RES/convergence110m_fused/convergence110m_fused_$seed.json" \
            "$RES/convergence110m_prior/convergence110m_prior_$seed.json"
      done
      x $(( JT + 20 )) env -u OUT bash "$B"/convergence_gpu.sh --deadline-s "$JT" \
        --prefix convergence110m_prior --results-dir "$RES" \
        --variants pca_r1/4,pca_r1/4_seed2 ${extra[@]+"${extra[@]}"} || rc=$? ;;
    projection_cost)
      [ "$TINY" = 1 ] && extra=(--hidden 128 --ffn 352 --tokens 256)
      x "$JT" "$PY" "$B"/projection_cost.py ${extra[@]+"${extra[@]}"} \
        --out "$JW/projection_cost.json" || rc=$?
      keep projection_cost.json ;;
    convergence33m) convergence33m || rc=$? ;;
    convergence110m)
      [ "$TINY" = 1 ] && extra=(--tiny --state-dir "$WORK/convergence110m")
      x $(( JT + 20 )) env -u OUT bash "$B"/convergence_gpu.sh --deadline-s "$JT" \
        --results-dir "$RES" ${extra[@]+"${extra[@]}"} || rc=$? ;;
    tp4_sp_z1) mt "$JT" mt_tp4_sp_z1 torchrun 4 --preset "$P13" --tp 4 \
                 --variants baseline,compact_r1/4,compact_r1/4_bf16pair,compact_r1/8 ;;
    tp2_dp2_z1) mt "$JT" mt_tp2_dp2_z1 torchrun 4 --preset "$P13" --tp 2 --zero-stage 1 \
                  "${VARS[@]}" ;;
    tp2_dp2_z2) mt "$JT" mt_tp2_dp2_z2 torchrun 4 --preset "$P13" --tp 2 --zero-stage 2 \
                  "${VARS[@]}" ;;
    dp4_z3_1.3b) mt "$JT" mt_dp4_z3_1.3b deepspeed 4 --preset "$P13" --zero-stage 3 \
                   --variants baseline,compact_r1/4_bf16W0 ;;
    dp4_z3_7b) mt "$JT" mt_dp4_z3_7b deepspeed 4 --preset "$P7" --zero-stage 3 \
                 --variants baseline,compact_r1/4_bf16W0 ;;
    merge_cost)
      [ "$TINY" = 1 ] && extra=(--preset tiny --repeats 2)
      x "$JT" "$PY" "$B"/merge_cost.py ${extra[@]+"${extra[@]}"} --out "$JW/merge_cost.json" \
        || rc=$?
      keep merge_cost.json ;;
    steptime_dp2_z3) st "$JT" steptime_dp2_z3 2 --preset "$P13" --zero-stage 3 --micro-batch 4 \
                       --variants baseline,compact_r1/4_bf16W0 --rounds 12 \
                       --steps-per-round 4 --warmup 4 --profile-steps 2 ;;
    steptime_tp2)
      t=$(( JT * 3 / 5 ))
      st "$t" steptime_tp2_mb4 2 --preset "$P13" --tp 2 --micro-batch 4 "${STTP[@]}" \
        --profile-steps 2 || rc=$?
      st "$(( $(jleft) - 35 ))" steptime_tp2_mb2 2 --preset "$P13" --tp 2 --micro-batch 2 \
        "${STTP[@]}" || rc=$? ;;
    steptime_tp4) st "$JT" steptime_tp4_mb4 4 --preset "$P13" --tp 4 --micro-batch 4 \
                    "${STTP[@]}" --profile-steps 2 ;;
    steptime_dp4_z3) st "$JT" steptime_dp4_z3_1.3b 4 --preset "$P13" --zero-stage 3 \
                       --micro-batch 4 --variants baseline,compact_r1/4_bf16W0 --rounds 8 \
                       --steps-per-round 4 --warmup 4 --profile-steps 2 ;;
    steptime_dp4_z3_7b) st "$JT" steptime_dp4_z3_7b 4 --preset "$P7" --zero-stage 3 \
                          --micro-batch 1 --variants baseline,compact_r1/4_bf16W0 --rounds 4 \
                          --steps-per-round 3 --warmup 2 ;;
    inv_tp4)
      t=$(( JT / 2 ))
      mt "$t" inv_tp4 torchrun 4 --preset "$P13" --tp 4 --skip-throughput "${INV[@]}" || rc=$?
      mt "$(( $(jleft) - 35 ))" inv_fp32_tp4 torchrun 4 --preset "$P13" --tp 4 "${INV_FP32[@]}" \
        || rc=$? ;;
    *) echo "no such job $1" >&2; return 2 ;;
  esac
  last=$?
  [ "$rc" -ne 0 ] && return "$rc"
  return "$last"
}

# ------------------------------------------------------------------ checks, snapshot
if [ "$DRY" = 0 ]; then
  if ! $PY -c "import megatron.core, deepspeed, pydantic, tokenizers, compact_dist" \
      > "$WORK/logs/imports.log" 2>&1; then
    tail -n 5 "$WORK/logs/imports.log"
    echo "megatron-core, deepspeed, pydantic, tokenizers and compact_dist must be importable" \
      "(install the wheels first: benchmarks/README.md, Reproduce)" >&2
    exit 1
  fi
  nvidia-smi --query-gpu=name,memory.total --format=csv > "$WORK/gpus.csv" 2>&1 || true
fi
snapshot() {
  (cd "$RES" && find . -type f \( -name '*.json' -o -name '*.md' -o -name '*.png' \) \
     -not -path '*/ckpt_*' -exec md5sum {} + | sort)
}
[ "$DRY" = 0 ] && snapshot > "$WORK/before.md5"
log "jobs: ${JOBS[*]}; ${NGPU} GPU(s) [${DEVS[*]}]; deadline ${DEADLINE_S}s; results $RES; work $WORK"

# ------------------------------------------------------------------ scheduler
# GPUs are handed out in the order of DEVS, the lowest free ones first. The deepspeed launcher
# (memory_throughput.py --launcher deepspeed passes --num_gpus) ignores CUDA_VISIBLE_DEVICES
# and takes GPUs 0..N-1: its jobs wait for the first N GPUs.
PINNED=" dp2_z1 dp2_z3 dp4_z3_1.3b dp4_z3_7b "
declare -A BUSY JOB_GPUS JOB_T0   # BUSY[device]=job
RUNNING=() SKIPPED=()
reap() {  # release the GPUs of finished jobs
  local j d still=()
  for j in ${RUNNING[@]+"${RUNNING[@]}"}; do
    if [ -e "$WORK/rc/$j" ]; then
      note "$j: rc $(cat "$WORK/rc/$j") after $(( $(date +%s) - JOB_T0[$j] ))s on GPU(s) ${JOB_GPUS[$j]}"
      for d in "${!BUSY[@]}"; do [ "${BUSY[$d]}" = "$j" ] && unset "BUSY[$d]"; done
    else
      still+=("$j")
    fi
  done
  RUNNING=(${still[@]+"${still[@]}"})
}
pick() {  # pick <job> <n>: the GPUs it gets now (comma-separated), or nothing
  local d got=()
  if [[ "$PINNED" == *" $1 "* ]]; then
    for d in "${DEVS[@]:0:$2}"; do [ -n "${BUSY[$d]:-}" ] && return 0; done
    got=("${DEVS[@]:0:$2}")
  else
    for d in "${DEVS[@]}"; do
      [ ${#got[@]} -lt "$2" ] && [ -z "${BUSY[$d]:-}" ] && got+=("$d")
    done
    [ ${#got[@]} -lt "$2" ] && return 0
  fi
  (IFS=,; echo "${got[*]}")
}
for job in "${JOBS[@]}"; do
  gpus=$(field "$job" 2) limit=$(field "$job" 3) min=$(field "$job" 4)
  if [ "$gpus" = all ]; then need=$NGPU; [ "$need" -lt 1 ] && need=1; else need=$gpus; fi
  if [ "$need" -gt "$NGPU" ]; then
    note "$job: skipped: needs $gpus GPU(s), $NGPU visible"; SKIPPED+=("$job"); continue
  fi
  mine=""
  while true; do
    if [ "$SERIAL" = 0 ] || [ ${#RUNNING[@]} -eq 0 ]; then mine=$(pick "$job" "$need"); fi
    [ -n "$mine" ] && break
    sleep 2; reap
  done
  l=$(left)
  if [ "$l" -lt "$min" ]; then
    note "$job: skipped: cannot start in time (${l}s left, needs at least ${min}s)"
    SKIPPED+=("$job"); continue
  fi
  t=$l; [ "$limit" -gt 0 ] && [ "$limit" -lt "$l" ] && t=$limit
  IFS=',' read -ra got <<< "$mine"
  for d in "${got[@]}"; do BUSY[$d]=$job; done
  JOB_GPUS[$job]=$mine JOB_T0[$job]=$(date +%s)
  log "$job: start on GPU(s) $mine for at most ${t}s"
  if [ "$DRY" = 1 ]; then
    (JOB=$job JW=$WORK/$job JSTART=$(date +%s) JT=$t CUDA_VISIBLE_DEVICES=$mine run_job "$job")
    echo 0 > "$WORK/rc/$job"
  else
    mkdir -p "$WORK/$job"
    (JSTART=$(date +%s)
     export JOB=$job JW=$WORK/$job JSTART JT=$t CUDA_VISIBLE_DEVICES=$mine
     run_job "$job"; echo $? > "$WORK/rc/$job") &
  fi
  RUNNING+=("$job")
  reap
done
while [ ${#RUNNING[@]} -gt 0 ]; do sleep 2; reap; done
[ ${#SKIPPED[@]} -gt 0 ] && note "skipped: ${SKIPPED[*]} (again: bash $B/gpu_suite.sh ${SKIPPED[*]})"

# ------------------------------------------------------------------ plots, results, $OUT
if [ "$DRY" = 1 ]; then
  echo "[plot] $PY $B/plot_results.py $RES $RES/convergence"
  exit 0
fi
if [ -n "$(find "$RES" -name '*.json' -not -path '*/ckpt_*' -print -quit)" ]; then
  inputs=("$RES"); [ -d "$RES/convergence" ] && inputs+=("$RES/convergence")
  timeout 60 "$PY" "$B"/plot_results.py "${inputs[@]}" --out-dir "$RES" \
    > "$WORK/logs/plot_results.log" 2>&1 || note "plot_results failed: see logs/plot_results.log"
fi
snapshot > "$WORK/after.md5"
mapfile -t CHANGED < <(comm -13 "$WORK/before.md5" "$WORK/after.md5" | awk '{ print $2 }' \
                       | sed 's|^\./||' | sort -u)
note "new or changed in $RES (${#CHANGED[@]}): ${CHANGED[*]:-none}"
note "elapsed $(now)s of ${DEADLINE_S}s"
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  flat=1
  for f in ${CHANGED[@]+"${CHANGED[@]}"}; do [ "${f#*/}" != "$f" ] && flat=0; done
  if [ ${#CHANGED[@]} -gt 6 ] || [ "$flat" = 0 ]; then
    tar czf "$OUT/gpu_suite_results.tgz" -C "$RES" "${CHANGED[@]}"
  elif [ ${#CHANGED[@]} -gt 0 ]; then
    (cd "$RES" && cp "${CHANGED[@]}" "$OUT/")
  fi
  cp "$SUMMARY" "$OUT/gpu_suite_summary.txt"
  tar czf "$OUT/gpu_suite_logs.tgz" --exclude='ckpt_*' --exclude='*.tmp' --exclude='*.bin' \
    --exclude='*.idx' --exclude='*.jsonl' --exclude='./convergence110m/data' -C "$WORK" .
fi
for j in "${JOBS[@]}"; do
  [ -e "$WORK/logs/$j.log" ] && { echo "--- $j"; tail -n 3 "$WORK/logs/$j.log"; }
done
exit 0
