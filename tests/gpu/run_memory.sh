#!/usr/bin/env bash
# Issue #8 (memory) on one H200, in one device call of < 8 minutes, from the repo root:
#
#   bash tests/gpu/run_memory.sh          (device tool: carry [".whl"], timeout 540)
#
# .whl/ holds the bitsandbytes wheel the GPU image lacks (QLoRA for stock and fastst), fetched here with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl bitsandbytes==0.50.2
# (git-ignored through .git/info/exclude, hence the carry).
#
# Writes 8 files to $OUT: memory_checks.jsonl (GPU correctness of every checkpointing mode, QLoRA
# vs peft, CachedMNRL vs MNRL, per-mode peaks), tables.md (the card, then every bench table), and the
# results.jsonl of each bench run (merge with `fastst bench report --inputs ...`): gemma-lora,
# gemma-qlora, qwen4b-qlora, cached-64, cached-256, mnrl.
# Every step has its own timeout (sum 455 s), so the script ends in < 8 min whatever happens.
set -uo pipefail
[ -d .whl ] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
export PYTHONPATH=$PWD:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import bitsandbytes as b; print('bitsandbytes', b.__version__)" 2>&1 | tail -n 1; echo; } > "$OUT/tables.md"
cat "$OUT/tables.md"

# 1. correctness on the GPU (bf16): checkpoint modes vs off (4 families), QLoRA fast path vs peft,
#    CachedMNRL vs MNRL (graphs on), then per-mode peaks of the EmbeddingGemma 1024-token cell
timeout 95 python3 tests/gpu/memory_checks.py modes qlora cached peaks 2>&1 | grep -v '^\[fastst\] patched' | tail -n 40

# 2. the #8 cells (fastst_plugin.bench; dropout off so that contenders compute the same function)
B="python3 -m fastst_plugin.bench train --no-dropout --no-profile --steps 2 --repeats 2 --warmup 2"
# EmbeddingGemma-300m, 64 pairs of long documents at 1024: LoRA (target <= 4 GB) and QLoRA (<= 2.5 GB)
timeout 75 $B --models embeddinggemma-300m --max-seq-length 1024 --long-docs --batch-size 64 --mode lora \
  --contenders stock,fastst --fastst-opt gradient_checkpointing=offload --out /tmp/m1
timeout 75 $B --models embeddinggemma-300m --max-seq-length 1024 --long-docs --batch-size 64 --mode qlora \
  --contenders stock,fastst --fastst-opt gradient_checkpointing=offload --out /tmp/m2
# Qwen3-Embedding-4B configuration, QLoRA, 32 pairs x 512 (long documents): target <= 10 GB; stock
# would need minutes for this cell, fastst only
timeout 55 $B --models qwen3-4b --max-seq-length 512 --long-docs --batch-size 32 --mode qlora \
  --contenders fastst --fastst-opt gradient_checkpointing=offload --out /tmp/m3
# CachedMNRL, 1,024 pairs per batch, bert-base: fastst vs stock (mini-batch 64), fastst with a larger
# mini-batch, and fastst's plain MNRL at 1,024 pairs (fits on the card).
# Targets: fastst cached >= 0.7x fastst plain MNRL, >= 5x stock cached.
timeout 80 $B --models bert-base --loss cached-mnrl --batch-size 1024 --mini-batch-size 64 \
  --contenders stock,fastst --out /tmp/m4
timeout 35 $B --models bert-base --loss cached-mnrl --batch-size 1024 --mini-batch-size 256 \
  --contenders fastst --out /tmp/m5
timeout 40 $B --models bert-base --loss mnrl --batch-size 1024 --contenders fastst --out /tmp/m6

i=0
for name in gemma-lora gemma-qlora qwen4b-qlora cached-64 cached-256 mnrl; do
  i=$((i + 1))
  cp "/tmp/m$i/results.jsonl" "$OUT/$name.jsonl" 2>/dev/null
  { echo "## $name"; cat "/tmp/m$i/table.md" 2>/dev/null; echo; } >> "$OUT/tables.md"
done
cat "$OUT/tables.md"
