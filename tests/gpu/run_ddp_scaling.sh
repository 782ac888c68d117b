#!/usr/bin/env bash
# Data-parallel scaling at fixed pairs per GPU (issue #9's throughput criterion), on nvidia-h200-x2,
# from the repo root, carrying .gpu/site (datasets for the trainer):
#   PD="256 1024" bash tests/gpu/run_ddp_scaling.sh bert-base:32,0 embeddinggemma-300m:32
# For every MODEL:RANKS and every per-device batch in PD: one run on GPU 0 alone and one torchrun
# run on both GPUs with the same pairs per GPU (fastst, bf16 weights, no dropout, MNRL with
# gather_across_devices, max_seq_length 256); then `fastst_plugin.bench.ddp compare` prints the
# "same pairs per GPU" table (2-GPU / 1-GPU real-token throughput).
# PROFILE=1: cProfile of every rank's training thread after the warm-up ($OUT/prof/*.prof).
set -uo pipefail
START=$SECONDS
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH="$PWD:$PWD/.gpu/site:${PYTHONPATH:-}"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-gpu-out}; mkdir -p "$OUT/prof"
RUNS=/tmp/ddp-scaling; rm -rf "$RUNS"; mkdir -p "$RUNS"
LOG="$OUT/ddp-scaling-log.txt"; : > "$LOG"
COMMON="--max-seq-length 256 --warmup ${WARMUP:-5} --seed 0 --bf16 --no-dropout --steps ${STEPS:-25} ${EXTRA:-}"
PROF_ENV=""; [ -n "${PROFILE:-}" ] && PROF_ENV="FASTST_DDP_PROFILE=$OUT/prof/p"
for spec in "$@"; do
  model=${spec%%:*}; ranks=${spec#*:}; [ "$ranks" = "$spec" ] && ranks=32
  for pd in ${PD:-256}; do
    for n in 1 2; do
      if [ $n = 1 ]; then launch="env CUDA_VISIBLE_DEVICES=0 $PROF_ENV python3 -m fastst_plugin.bench.ddp"
      else launch="env $PROF_ENV python3 -m torch.distributed.run --standalone --nproc_per_node 2 -m fastst_plugin.bench.ddp"; fi
      echo "=== $model r=$ranks pd=$pd gpus=$n (at $((SECONDS - START))s)" | tee -a "$LOG"
      timeout -k 10 ${RUN_TIMEOUT:-150} $launch --model "$model" --lora-r "$ranks" --per-device-batch "$pd" --out "$RUNS" $COMMON >>"$LOG" 2>&1
      echo "rc=$?" | tee -a "$LOG"
      grep -E "^\[ddp r0 .*: loss " "$LOG" | tail -n 2 | sed -E 's/ -> \/tmp.*//'
    done
  done
done
cat "$RUNS"/ddp-*.jsonl > "$OUT/ddp-scaling-runs.jsonl" 2>/dev/null
python3 -m fastst_plugin.bench.ddp compare "$RUNS" | sed -n '/^Same pairs per GPU/,$p' | tee "$OUT/ddp-scaling.md"
echo "done in $((SECONDS - START))s"
