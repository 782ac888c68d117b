#!/usr/bin/env bash
# What one device call runs (the lease is short), from the repo root on the GPU machine:
#   bash tests/gpu/run_device.sh core   GPU parity (graphs, replay, eager vs stock, bf16), then LoRA and
#                                       full fine-tuning at max_seq_length 256 for the five models
#   bash tests/gpu/run_device.sh more   ModernBERT at 256, long documents at 1024 (EmbeddingGemma,
#                                       Qwen3-0.6B) and Qwen3-4B LoRA at 64 x 512
# Results land in $OUT (the device tool brings back at most 8 files): merge them locally with
# `python -m fastst_plugin.bench report --inputs ... --out ...`.
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH="$PWD:${PYTHONPATH:-}"
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
B="python3 -m fastst_plugin.bench train --no-dropout"
case "${1:-core}" in
core)
  timeout 100 python3 tests/gpu/gpu_checks.py parity bert-base embeddinggemma-300m qwen3-0.6b 2>&1 | tail -n 40
  timeout 230 $B --models bert-base,minilm,modernbert-base,embeddinggemma-300m,qwen3-0.6b \
    --contenders stock,flat,fastst --steps 6 --repeats 3 --warmup 3 --out "$OUT/train" --time-budget 170
  timeout 100 $B --mode full --models bert-base,minilm,modernbert-base --contenders stock,flat,fastst \
    --steps 6 --repeats 3 --warmup 3 --out "$OUT/full" --time-budget 60
  ;;
more)
  timeout 60 $B --models modernbert-base --contenders stock,flat,fastst --steps 6 --repeats 3 --warmup 3 --out /tmp/r1
  timeout 45 $B --mode full --models modernbert-base --contenders stock,flat,fastst --steps 6 --repeats 3 --warmup 3 --out /tmp/r2
  timeout 130 $B --long-docs --max-seq-length 1024 --models embeddinggemma-300m,qwen3-0.6b --contenders stock,flat,fastst \
    --steps 4 --repeats 2 --warmup 2 --out /tmp/r3 --time-budget 70
  timeout 45 $B --max-seq-length 512 --models qwen3-4b --contenders fastst --steps 4 --repeats 2 --warmup 2 --out /tmp/r4
  for r in r1 r2 r3 r4; do cp /tmp/$r/results.jsonl "$OUT/$r.jsonl" 2>/dev/null; cat /tmp/$r/table.md 2>/dev/null; done
  ;;
esac
