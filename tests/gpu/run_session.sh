#!/usr/bin/env bash
# One device call on a 2-GPU host (kind nvidia-h200-x2) that measures issues #5, #7 and #8 at once:
# two independent lanes, one per GPU, each with its own timeouts (the cards do not share work).
#   GPU 0: attention micro-benchmark, training bench (LoRA and full, 256) with the default attention and
#          with the Triton varlen attention, encode bench (5 models) and CrossEncoder predict.
#   GPU 1: bf16 encode checks, then tests/gpu/run_memory.sh (checkpointing, QLoRA, CachedMNRL).
# Needs .gpu/ carried: .gpu/site (bitsandbytes without the CUDA 11/12 builds, datasets 4.8.5, dill,
# multiprocess) and .gpu/minilm (the real all-MiniLM-L6-v2, weights stored in fp16 to fit the transfer).
# Everything lands in $OUT/session.tgz (the tool brings back at most 8 files) plus $OUT/summary.txt.
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH="$PWD:$PWD/.gpu/site:${PYTHONPATH:-}"
export FASTST_MINILM_PATH=$PWD/.gpu/minilm
R=/tmp/session; rm -rf $R; mkdir -p $R
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader > $R/device.txt
B="python3 -m fastst_plugin.bench"
lane0() {
  export CUDA_VISIBLE_DEVICES=0
  timeout 80 python3 tests/gpu/attention_bench.py > $R/attention.txt 2>&1
  timeout 150 $B train --no-dropout --models minilm,bert-base,modernbert-base --mode lora --contenders stock,flat,fastst \
    --steps 6 --repeats 3 --warmup 3 --out $R/train-lora --time-budget 120 > $R/train-lora.log 2>&1
  FASTST_TRITON_ATTENTION=1 timeout 110 $B train --no-dropout --models minilm,bert-base,modernbert-base --mode lora \
    --contenders stock,fastst --steps 6 --repeats 3 --warmup 3 --out $R/train-lora-tri --time-budget 80 > $R/train-lora-tri.log 2>&1
  FASTST_TRITON_ATTENTION=1 timeout 90 $B train --no-dropout --models minilm,bert-base,modernbert-base --mode full \
    --contenders stock,fastst --steps 6 --repeats 3 --warmup 3 --out $R/train-full-tri --time-budget 60 > $R/train-full-tri.log 2>&1
  # tokenizers' default (parallel) for both contenders: what a user's encode() gets
  TOKENIZERS_PARALLELISM=true timeout 130 $B encode --corpus-size 6000 --models minilm,bert-base,modernbert-base,embeddinggemma-300m,qwen3-0.6b \
    --contenders stock,fastst --repeats 2 --out $R/encode --time-budget 110 > $R/encode.log 2>&1
  TOKENIZERS_PARALLELISM=true timeout 40 $B encode --api predict --models bert-base --corpus-size 6000 --contenders stock,fastst \
    --repeats 2 --out $R/predict > $R/predict.log 2>&1
}
lane1() {
  export CUDA_VISIBLE_DEVICES=1
  timeout 95 python3 tests/gpu/encode_checks.py > $R/encode_checks.log 2>&1
  mkdir -p $R/mem; OUT=$R/mem timeout 440 bash tests/gpu/run_memory.sh > $R/memory.log 2>&1
}
lane0 & P0=$!
lane1 & P1=$!
wait $P0 $P1
cp $OUT/*.jsonl $R/ 2>/dev/null
for d in train-lora train-lora-tri train-full-tri encode predict; do echo "## $d"; cat $R/$d/table.md 2>/dev/null; done > $OUT/summary.txt
{ echo "## attention"; cat $R/attention.txt; echo "## memory"; cat $R/mem/tables.md 2>/dev/null; tail -30 $R/encode_checks.log; } >> $OUT/summary.txt
tar czf $OUT/session.tgz -C /tmp session
