#!/usr/bin/env bash
# Issue acceptance cells in one-H200 device calls (each stage fits one call of < 10 minutes):
#   bash tests/gpu/run_acceptance.sh encode   GPU encode checks (bf16 outputs vs stock), encode of 6,000
#                                             documents at 512 for five models and 1,024 for Qwen3-4B
#                                             (stock, flat, fastst)
#   bash tests/gpu/run_acceptance.sh train    LoRA 256 for all six models (stock, flat, fastst) and the
#                                             bert-base reranker's predict on 6,000 pairs
#   bash tests/gpu/run_acceptance.sh probe    encode profile (host timeline) of MiniLM and bert-base;
#                                             LoRA 256 for the three BERT-family models
#   bash tests/gpu/run_acceptance.sh diag     bf16 parity of Gemma3/Qwen3 against an fp32 copy too;
#                                             an eager bert-base LoRA profile
# Needs .gpu/ carried (.gpu/site: bitsandbytes, datasets; .gpu/minilm: the real all-MiniLM-L6-v2).
# Everything lands in $OUT/acceptance.tgz plus $OUT/summary.txt (the tool returns at most 8 files).
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH="$PWD:$PWD/.gpu/site:${PYTHONPATH:-}"
export FASTST_MINILM_PATH=$PWD/.gpu/minilm TOKENIZERS_PARALLELISM=true
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
R=/tmp/acceptance; rm -rf $R; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > $R/device.txt
B="python3 -m fastst_plugin.bench"
T="--no-dropout --steps 6 --repeats 3 --warmup 3"
stage() { echo "== $1 $(date +%T)" | tee -a $R/timeline.txt; }
case "${1:-encode}" in
diag)  # bf16 parity of the decoder families with the fp32 yardstick; eager bert-base profile by stack
  stage parity;  OUT=$R timeout 170 python3 tests/gpu/gpu_checks.py parity embeddinggemma-300m qwen3-0.6b > $R/parity.log 2>&1
  stage profile; FASTST_CUDA_GRAPHS=0 OUT=$R timeout 70 python3 tests/gpu/profile_step.py bert-base --stacks --steps 10 --tag=-eager > $R/prof.log 2>&1
  ;;
probe)  # where encode's time goes (host side), and the training cells of issue #5
  stage profile-encode; OUT=$R timeout 150 python3 tests/gpu/profile_encode.py --models minilm,bert-base > $R/profile-encode.log 2>&1
  stage train;   timeout 200 $B train $T --models minilm,bert-base,modernbert-base --contenders stock,flat,fastst --out $R/train \
    --time-budget 180 > $R/train.log 2>&1
  ;;
encode)  # issue #7's cells and issue #4's encode table: outputs vs stock, then 6,000 documents at 512
  stage encode-checks; OUT=$R timeout 100 python3 tests/gpu/encode_checks.py > $R/encode_checks.log 2>&1
  stage encode;  timeout 300 $B encode --corpus-size 6000 --models minilm,bert-base,modernbert-base,embeddinggemma-300m,qwen3-0.6b \
    --contenders stock,flat,fastst --repeats 2 --out $R/encode --time-budget 270 > $R/encode.log 2>&1
  stage encode4b; timeout 110 $B encode --corpus-size 1024 --models qwen3-4b --contenders stock,flat,fastst \
    --repeats 2 --out $R/encode4b > $R/encode4b.log 2>&1
  ;;
train)  # issue #4's training table (six models, LoRA r=32, 256 tokens) and the reranker's predict
  stage train;   timeout 300 $B train $T --models minilm,bert-base,modernbert-base,embeddinggemma-300m,qwen3-0.6b \
    --contenders stock,flat,fastst --out $R/train --time-budget 270 > $R/train.log 2>&1
  stage train4b; timeout 150 $B train --no-dropout --steps 3 --repeats 2 --warmup 2 --models qwen3-4b \
    --contenders stock,flat,fastst --out $R/train4b > $R/train4b.log 2>&1
  stage predict; timeout 60 $B encode --api predict --models bert-base --corpus-size 6000 --contenders stock,fastst \
    --repeats 2 --out $R/predict > $R/predict.log 2>&1
  ;;
esac
stage done
for d in $R/*/; do [ -f $d/table.md ] && { echo "## $(basename $d)"; cat $d/table.md; }; done > $OUT/summary.txt
{ cat $R/timeline.txt; tail -n 25 $R/parity.log 2>/dev/null; tail -n 30 $R/encode_checks.log 2>/dev/null; } >> $OUT/summary.txt
tar czf $OUT/acceptance.tgz -C /tmp acceptance
