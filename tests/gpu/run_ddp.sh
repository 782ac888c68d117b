#!/usr/bin/env bash
# Multi-GPU (DDP) acceptance, issue #9, on a 2-GPU host (kind nvidia-h200-x2), from the repo root,
# carrying .gpu (.gpu/site: datasets 4.8.5, dill, multiprocess; the image has no `datasets`, which
# SentenceTransformerTrainer needs):
#   bash tests/gpu/run_ddp.sh [bert-base] [embeddinggemma-300m]      (default: both, ~8-9 min)
#   QUICK=1 bash tests/gpu/run_ddp.sh                                  (no probe, no A/B runs: ~5 min)
# Per model, fastst, bf16 weights, no dropout, MNRL with gather_across_devices, 50 steps, seed 0:
#   * probe (first model only): CUDA graphs under DDP (FASTST_DDP_GRAPHS=1), 2 GPUs, 12 steps, capture
#     mode thread_local, then relaxed if that failed; the main 2-GPU runs use the mode that captured
#     on both ranks (else they run eagerly, as fastst does under a process group by default).
#   * 1 GPU, global batch 128 (LoRA r=32 [and full fine-tuning for bert-base], checkpointing off/on):
#     the loss-curve reference; plus LoRA at 64 pairs (the fixed-work-per-GPU reference) and, for
#     bert-base, LoRA at 128 with FASTST_TRAINER_OVERLAP=0 (the trainer step before the overlap).
#   * 2 GPUs (torchrun), global batch 128 = 64 pairs per GPU, the same configurations.
# Then `python -m fastst_plugin.bench.ddp compare`: max |loss diff| over the 50 steps, 2-GPU / 1-GPU
# real-token throughput at the same global batch and at the same pairs per GPU.
# $OUT: ddp-compare.md, ddp-runs.jsonl (every run's step and summary lines), ddp-log.txt, ddp-env.txt.
# Knobs: STEPS (default 50), EXTRA (more runner options; CPU dry run of the plumbing:
# EXTRA="--smoke --max-seq-length 64 --warmup 1" STEPS=3).
set -uo pipefail
START=$SECONDS
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH="$PWD:$PWD/.gpu/site:${PYTHONPATH:-}"
# NVLink multicast stays off (the host's GPUs are shared; see the device notes).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
RUNS=/tmp/ddp-runs; rm -rf "$RUNS"; mkdir -p "$RUNS/probe"
LOG="$OUT/ddp-log.txt"; : > "$LOG"
MODELS=("$@"); [ ${#MODELS[@]} -gt 0 ] || MODELS=(bert-base embeddinggemma-300m)

{
  nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
  nvidia-smi topo -m 2>/dev/null
  nproc
  python3 -c "import torch, transformers, sentence_transformers, peft, triton, accelerate, datasets; print('torch', torch.__version__, '| transformers', transformers.__version__, '| sentence-transformers', sentence_transformers.__version__, '| peft', peft.__version__, '| triton', triton.__version__, '| accelerate', accelerate.__version__, '| datasets', datasets.__version__, '| nccl', torch.cuda.nccl.version())"
} > "$OUT/ddp-env.txt" 2>&1
cat "$OUT/ddp-env.txt"

NGPU=$(python3 -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
# One GPU (the 2-GPU kind not lent): the probe runs one process with DDP forced around the model
# (NCCL, DDP's reducer, one rank), and only the 1-GPU runs follow.
if [ "$NGPU" = 1 ]; then PROBE_PROCS=1; PROBE_EXTRA=--force-ddp; else PROBE_PROCS=2; PROBE_EXTRA=; fi
COMMON="--max-seq-length 256 --warmup 5 --seed 0 --bf16 --no-dropout ${EXTRA:-}"
ONE="python3 -m fastst_plugin.bench.ddp"
TWO="python3 -m torch.distributed.run --standalone --nproc_per_node 2 -m fastst_plugin.bench.ddp"

step() {  # step NAME SECONDS COMMAND...: output to the log; status and each run's result line to the terminal
  local name=$1 secs=$2; shift 2
  local before; before=$(wc -l <"$LOG")
  echo "=== $name (max ${secs}s, at $((SECONDS - START))s): $*" >>"$LOG"
  timeout -k 10 "$secs" "$@" >>"$LOG" 2>&1
  local rc=$?
  echo "=== $name: rc=$rc, at $((SECONDS - START))s" | tee -a "$LOG"
  tail -n +"$((before + 1))" "$LOG" | grep -E "^\[ddp r0 .*: loss " | sed -E 's/ -> \/tmp.*//'
  [ "$rc" -eq 0 ] || tail -n +"$((before + 1))" "$LOG" | grep -E "Error|error:" | tail -n 5
  return $rc
}

captured_on_all_ranks() {  # FILE: every rank captured graphs and none was disabled
  python3 - "$1" <<'EOF'
import json, sys
try:
    rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
except OSError:
    sys.exit(1)
s = [r for r in rows if r.get("record") == "summary"]
ranks = (s[-1].get("fast_path_per_rank") or []) if s else []
ok = bool(ranks) and all(r.get("graphs", 0) > 0 and not r.get("graph_disabled") for r in ranks)
print("graphs per rank:", [(r.get("graphs"), r.get("graph_disabled")) for r in ranks])
sys.exit(0 if ok else 1)
EOF
}

# ---- probe: CUDA graphs under DDP (first model), each mode in its own processes (a failed capture
# poisons the CUDA RNG state of its process).
MODE=""
first=${MODELS[0]}
# QUICK=1: no probe (graphs under DDP follow fastst's default: on without dropout) and no A/B runs.
MODES="thread_local relaxed"; [ -n "${QUICK:-}" ] && MODES=""
for mode in $MODES; do
  step "probe $first graphs under DDP, $mode" 100 \
    env FASTST_DDP_GRAPHS=1 FASTST_GRAPH_CAPTURE_MODE=$mode FASTST_LOG_LEVEL=DEBUG \
    python3 -m torch.distributed.run --standalone --nproc_per_node $PROBE_PROCS -m fastst_plugin.bench.ddp \
    --model "$first" --lora-r 32 --global-batch 128 --steps ${PROBE_STEPS:-12} $PROBE_EXTRA \
    --out "$RUNS/probe" --tag "probe-$mode" $COMMON
  f=$(ls "$RUNS"/probe/*probe-$mode*.jsonl 2>/dev/null | head -1)
  if [ -n "$f" ] && captured_on_all_ranks "$f" | tee -a "$LOG"; then MODE=$mode; break; fi
done
grep -E "CUDA graph capture failed|Traceback|Error" "$LOG" | head -n 20
if [ -n "${QUICK:-}" ]; then
  GRAPHS_ENV="FASTST_LOG_LEVEL=INFO"  # fastst's default under DDP
elif [ -n "$MODE" ]; then
  echo "graphs under DDP captured with mode $MODE: the 2-GPU runs use them" | tee -a "$LOG"
  GRAPHS_ENV="FASTST_DDP_GRAPHS=1 FASTST_GRAPH_CAPTURE_MODE=$MODE"
else
  echo "graphs under DDP did not capture in any mode: the 2-GPU runs are eager" | tee -a "$LOG"
  GRAPHS_ENV="FASTST_DDP_GRAPHS=0"
fi

for model in "${MODELS[@]}"; do
  if [ "$model" = bert-base ]; then R=32,0; T1=170; T2=150; else R=32; T1=150; T2=120; fi
  step "$model 1 GPU" $T1 env CUDA_VISIBLE_DEVICES=0 $ONE --model "$model" --lora-r $R --gradient-checkpointing off,on \
    --global-batch 128 --steps "${STEPS:-50}" --out "$RUNS" $COMMON
  step "$model 1 GPU, 64 pairs" 60 env CUDA_VISIBLE_DEVICES=0 $ONE --model "$model" --lora-r 32 --per-device-batch 64 \
    --steps "${STEPS:-50}" --out "$RUNS" $COMMON
  if [ "$model" = bert-base ] && [ -z "${QUICK:-}" ]; then
    step "$model 1 GPU, trainer overlap off" 60 env CUDA_VISIBLE_DEVICES=0 FASTST_TRAINER_OVERLAP=0 $ONE --model "$model" \
      --lora-r 32 --global-batch 128 --steps "${STEPS:-50}" --out "$RUNS/probe" --tag nooverlap $COMMON
  fi
  if [ "$NGPU" = 1 ]; then
    if { [ -n "$MODE" ] || [ -n "${QUICK:-}" ]; } && [ "$model" = "$first" ]; then  # inside DDP (one rank): the same losses?
      step "$model 1 GPU inside DDP, graphs (${MODE:-default})" 90 env $GRAPHS_ENV python3 -m torch.distributed.run --standalone \
        --nproc_per_node 1 -m fastst_plugin.bench.ddp --force-ddp --model "$model" --lora-r 32 --global-batch 128 \
        --steps "${STEPS:-50}" --out "$RUNS/probe" --tag ddp1 $COMMON
      python3 -m fastst_plugin.bench.ddp compare "$RUNS"/ddp-$model-lora32-1gpu-nockpt.jsonl \
        "$RUNS"/probe/ddp-$model-lora32-1gpu-nockpt-ddp1.jsonl --same-world | tee -a "$LOG"
    fi
    continue
  fi
  step "$model 2 GPUs" $T2 env $GRAPHS_ENV $TWO --model "$model" --lora-r $R --gradient-checkpointing off,on \
    --global-batch 128 --steps "${STEPS:-50}" --out "$RUNS" $COMMON
done

cat "$RUNS"/ddp-*.jsonl "$RUNS"/probe/ddp-*.jsonl > "$OUT/ddp-runs.jsonl" 2>/dev/null
{
  $ONE compare "$RUNS"
  echo; echo "Probe and A/B runs (graphs under DDP; trainer overlap off):"; echo
  $ONE compare "$RUNS"/probe/ddp-*.jsonl 2>/dev/null | sed -n '/^| run |/,$p'
} | tee "$OUT/ddp-compare.md"
echo "done in $((SECONDS - START))s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
