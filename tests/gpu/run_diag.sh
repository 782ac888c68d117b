#!/usr/bin/env bash
# Diagnostics for the training step's GPU time (one device call, ~5 min on an H200):
# GPU parity through pytest, the attention kernels alone (launch-config sweep, CUDA-graph replay),
# and a bert-base LoRA profile grouped by Python stack (graphs off so the stacks show).
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH="$PWD:${PYTHONPATH:-}"
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
timeout 150 python3 tests/gpu/attention_bench.py --kernel-only --sweep > "$OUT/attn.log" 2>&1; tail -n 50 "$OUT/attn.log"
FASTST_CUDA_GRAPHS=0 timeout 120 python3 tests/gpu/profile_step.py bert-base --stacks --steps 10 --tag=-eager > "$OUT/prof.log" 2>&1; tail -n 3 "$OUT/prof.log"
timeout 200 python3 -m pytest -q tests/gpu/test_gpu_parity.py > "$OUT/gp.log" 2>&1; tail -n 5 "$OUT/gp.log"
