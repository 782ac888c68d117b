#!/usr/bin/env bash
# Multi-GPU (DDP) acceptance, issue #9, in ONE device call on a 2-GPU host (kind nvidia-h200-x2),
# from the repo root, carrying .whl (the image has no `datasets`, which SentenceTransformerTrainer needs):
#   bash tests/gpu/run_ddp.sh
# For bert-base (LoRA r=32 and full fine-tuning) and EmbeddingGemma-300m (LoRA r=32), with and without
# gradient checkpointing: a 1-GPU run (CUDA_VISIBLE_DEVICES=0) and a 2-GPU torchrun run with the same
# global batch (128 pairs, 64 per GPU), seed and data, 50 steps each, fastst, bf16 weights, no dropout,
# MNRL with gather_across_devices; then the comparison (max |loss diff| over the 50 steps, 2-GPU / 1-GPU
# real-token throughput). Typical ~4-6 min; every step has its own timeout, so it ends within ~8 min.
# $OUT gets 4 files: ddp-compare.md (the tables), ddp-runs.jsonl (every run's step and summary lines;
# `python -m fastst_plugin.bench.ddp compare ddp-runs.jsonl` re-renders the tables), ddp-log.txt,
# ddp-env.txt. Knobs: GLOBAL (pairs per step, default 128), STEPS (default 50), EXTRA (more runner options;
# a CPU dry run of the plumbing: EXTRA="--smoke --max-seq-length 64 --warmup 1" GLOBAL=8 STEPS=3).
set -uo pipefail
START=$SECONDS
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD:${PYTHONPATH:-}"
# NVLink multicast stays off (the host's GPUs are shared; see the device notes).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
RUNS=/tmp/ddp-runs; rm -rf "$RUNS"; mkdir -p "$RUNS"
LOG="$OUT/ddp-log.txt"; : > "$LOG"

# ---- datasets for the trainer: the carried wheels; datasets 4.8.5 (.whl/ddp, known to import on this
# image) if the wheel in .whl does not work with the image's huggingface_hub / pyarrow.
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null \
    && export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
trainer_ok() {
  python3 -c "import datasets; datasets.Dataset.from_dict({'a': ['x']}); from sentence_transformers.util import is_training_available as f; assert f()" 2>>"$LOG"
}
if ! trainer_ok && ls .whl/ddp/datasets-*.whl >/dev/null 2>&1; then
  echo "datasets from .whl did not work here: trying .whl/ddp" | tee -a "$LOG"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site-ddp .whl/ddp/*.whl 2>>"$LOG" \
    && export PYTHONPATH=/tmp/site-ddp:$PYTHONPATH
fi
trainer_ok || echo "WARNING: SentenceTransformerTrainer is not usable (datasets/accelerate missing?): the runs will fail" | tee -a "$LOG"

{
  nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
  nvidia-smi topo -m 2>/dev/null
  python3 -c "import torch, transformers, sentence_transformers, peft, triton, accelerate, datasets; print('torch', torch.__version__, '| transformers', transformers.__version__, '| sentence-transformers', sentence_transformers.__version__, '| peft', peft.__version__, '| triton', triton.__version__, '| accelerate', accelerate.__version__, '| datasets', datasets.__version__, '| nccl', torch.cuda.nccl.version())"
} > "$OUT/ddp-env.txt" 2>&1
cat "$OUT/ddp-env.txt"

COMMON="--global-batch ${GLOBAL:-128} --max-seq-length 256 --steps ${STEPS:-50} --warmup 5 --seed 0 --bf16 --no-dropout --out $RUNS ${EXTRA:-}"
ONE="python3 -m fastst_plugin.bench.ddp"
TWO="python3 -m torch.distributed.run --standalone --nproc_per_node 2 -m fastst_plugin.bench.ddp"

step() {  # step NAME SECONDS COMMAND...: output to the log; status and each run's result line to the terminal
  local name=$1 secs=$2; shift 2
  local before; before=$(wc -l <"$LOG")
  echo "=== $name (max ${secs}s, at $((SECONDS - START))s): $*" >>"$LOG"
  timeout -k 10 "$secs" "$@" >>"$LOG" 2>&1
  local rc=$?
  echo "=== $name: rc=$rc, at $((SECONDS - START))s" | tee -a "$LOG"
  tail -n +"$((before + 1))" "$LOG" | grep -E "^\[ddp r0 .*: loss " | sed -E 's/, fast path .*//'
  [ "$rc" -eq 0 ] || tail -n +"$((before + 1))" "$LOG" | grep -E "Error|error:" | tail -n 5
}

# bert-base first (1 GPU warms the Triton cache for the 2 ranks), then EmbeddingGemma. In a process the
# runs go LoRA before full, no checkpointing before checkpointing: a timeout cuts the least important.
step "bert-base 1 GPU" 150 env CUDA_VISIBLE_DEVICES=0 $ONE --model bert-base --lora-r 32,0 --gradient-checkpointing off,on $COMMON
step "bert-base 2 GPUs" 110 $TWO --model bert-base --lora-r 32,0 --gradient-checkpointing off,on $COMMON
step "embeddinggemma-300m 1 GPU" 120 env CUDA_VISIBLE_DEVICES=0 $ONE --model embeddinggemma-300m --lora-r 32 --gradient-checkpointing off,on $COMMON
step "embeddinggemma-300m 2 GPUs" 90 $TWO --model embeddinggemma-300m --lora-r 32 --gradient-checkpointing off,on $COMMON

cat "$RUNS"/ddp-*.jsonl > "$OUT/ddp-runs.jsonl" 2>/dev/null
$ONE compare "$RUNS" | tee "$OUT/ddp-compare.md"
echo "done in $((SECONDS - START))s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
