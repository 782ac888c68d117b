#!/usr/bin/env bash
# Issue acceptance cells in one-H200 device calls (each stage fits one call of < 10 minutes):
#   bash tests/gpu/run_acceptance.sh encode   GPU encode checks (bf16 outputs vs stock), encode of 6,000
#                                             documents at 512 for five models and 1,024 for Qwen3-4B
#                                             (stock, flat, fastst)
#   bash tests/gpu/run_acceptance.sh train    LoRA 256 for all six models (stock, flat, fastst) and the
#                                             bert-base reranker's predict on 6,000 pairs
#   bash tests/gpu/run_acceptance.sh probe    encode profile (host timeline) of MiniLM and bert-base;
#                                             LoRA 256 for the three BERT-family models
#   bash tests/gpu/run_acceptance.sh mem      CachedMNRL at 1,024 pairs (profile + bench), Gemma3/Qwen3 LoRA 256
#                                             under selective / per-layer checkpointing, Qwen3 memory
#                                             breakdown, MiniLM / bert-base encode
#   bash tests/gpu/run_acceptance.sh graphs   checkpointing / cached losses through CUDA graphs: bf16
#                                             correctness, CachedMNRL at 1,024 pairs, Gemma3/Qwen3 LoRA
#                                             256 with selective / per-layer checkpointing
#   bash tests/gpu/run_acceptance.sh cached   CachedMNRL at 1,024 pairs: bf16 gradients vs MNRL, stock and
#                                             fastst at mini-batch 64, fastst at 256, plain MNRL
#   bash tests/gpu/run_acceptance.sh infer    encode checks, the encode cells (stock, fastst) and predict, the
#                                             host timeline and one batch's kernels (MiniLM, bert-base)
#   bash tests/gpu/run_acceptance.sh amp      graphs under autocast (default since it passed; =0 eager): parity and
#                                             speed; MiniLM's bench step alone / beside stock / phases
#   bash tests/gpu/run_acceptance.sh long     1024-token cells (large graphs and eager), bert-base 128/512,
#                                             full FT peaks, MiniLM host profile
#   bash tests/gpu/run_acceptance.sh seventh  CachedMNRL and SPLADE training under bf16 autocast (graphed), the
#                                             sparse-encode bench cell, 1024-token Gemma3/Qwen3 kernel profiles
#   bash tests/gpu/run_acceptance.sh gqa      direct flash kernels vs varlen_attn (values, grads, time); 1024-token
#                                             Gemma3/Qwen3 cells
#   bash tests/gpu/run_acceptance.sh eighth   MiniLM's step after the one-node pooling / Normalize / cos_sim
#                                             (alone, A/B, phases, backward split); the 1024-token Gemma3 cell on an
#                                             emulated 80 GB card (pool-aware large-graph headroom)
#   bash tests/gpu/run_acceptance.sh ninth    bf16/fp32 MNRL loss parity through packed_columns (one-node pooling,
#                                             Normalize, cos_sim) on all five families; the fused cos_sim A/B-
#                                             interleaved in one process (fastst vs fastst+FASTST_FUSED_SIMILARITY=0);
#                                             the 1024-token Gemma3 cell on an emulated 80 GB card, stock timed too
#   bash tests/gpu/run_acceptance.sh card80   issue #6's 1024-token cells on an emulated 80 GB card (stock timed alone
#                                             when it runs out of memory beside fastst); MiniLM's busy share, 3 runs
#   bash tests/gpu/run_acceptance.sh recompute  the MLP activation recomputed in backward instead of stored (default)
#                                             vs stored (FASTST_RECOMPUTE_ACTIVATION=0), A/B in one process: loss
#                                             parity, peaks and speed at 128/256 (LoRA, full), Gemma3 at 1024
#   bash tests/gpu/run_acceptance.sh tenth    what the ninth session could not time: the activation recompute
#                                             under autocast (fp32 weights, bf16=True) and QLoRA; where MiniLM's
#                                             128-token peak goes (0.64 of stock, target 0.625)
#   bash tests/gpu/run_acceptance.sh normparity normbench   the norm recompute (default since the tenth session):
#                                             GPU loss parity; peaks and speed A/B (=0) at 128/256 on all five families
#   bash tests/gpu/run_acceptance.sh cachedab cachedkeep   CachedMNRL after the loss stage's / first pass's chunks;
#                                             the first mini-batch kept under graphs (FASTST_CACHED_KEEP_FIRST=1)
#   bash tests/gpu/run_acceptance.sh cachedphases  CachedMNRL at 1,024 pairs by phase (pass 1, loss stage, replay)
#                                             beside plain MNRL; the loss stage's chunks A/B; a kernel profile
#   bash tests/gpu/run_acceptance.sh eleventh  CachedMNRL's first mini-batch kept in the graph pool, the merged
#                                             no-gradient LoRA forward: GPU checks, the 1,024-pair cell A/B, phases
#   bash tests/gpu/run_acceptance.sh plainbatch attnmap  plain MNRL at 2,048 / 3,072 pairs (issue #8's "largest batch
#                                             that fits"); the attention's block map (opt-in then, built per call) A/B
#   bash tests/gpu/run_acceptance.sh twelfth  the block map on by default and shared by a forward's layers, the rotated
#                                             q/k recomputed in backward: parity, peaks, A/B (also twelfth2-4, profile8)
#   bash tests/gpu/run_acceptance.sh aa           A/A: one fastst configuration built twice in a process (build-order bias)
#   bash tests/gpu/run_acceptance.sh nineteenth   the gradient sink for large gradient sets only: MiniLM A/B, cached cells
#   bash tests/gpu/run_acceptance.sh eighteenth   issue #5's cells (GPU busy, peaks) with the gradient sink; MiniLM 128/256 A/B
#   bash tests/gpu/run_acceptance.sh seventeenth  issue #8 with the session's defaults: cached vs plain (3,072 / 3,584 pairs, 80 GB)
#   bash tests/gpu/run_acceptance.sh sixteenth    one gradient sink for all buckets' backward graphs: parity, CachedMNRL full FT
#                                             A/B with stock (peaks), plain full FT at 3,584 pairs (80 GB), issue #5 cells
#   bash tests/gpu/run_acceptance.sh fifteenth    issue #8: cached mini-batches filled to graph buckets vs equal shares;
#                                             plain MNRL at the largest batch an emulated 80 GB card holds
#   bash tests/gpu/run_acceptance.sh fourteenth   issue #8's cell in full fine-tuning; LoRA with the exact first pass
#   bash tests/gpu/run_acceptance.sh thirteenth  (run in the thirteenth session) LoRA parity with today's defaults; does CachedMNRL's
#                                             merged no-gradient first pass drift from stock's trajectory?
# Several stages may be named in one call (bash tests/gpu/run_acceptance.sh cachedphases tenth).
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
loss_summary() {  # one line per record of gpu_checks.py loss
  grep '^{' $R/loss.log | python3 -c "import json,sys
for l in sys.stdin:
    r=json.loads(l); print(r.get('model'), r.get('dtype'), r.get('variant'), 'loss diff', r.get('loss_abs_diff'), 'grad rel max', r.get('grad_rel_err_max'),
      'vs fp32', r.get('grad_rel_err_vs_fp32_max'), 'stock vs fp32', r.get('stock_bf16_grad_rel_err_vs_fp32_max'), r.get('error',''))"
}
cached_vs_plain() {  # DIR CONTENDERS TIMEOUT [PLAIN_CONTENDERS]: issue #8's cell (bert-base LoRA, 1,024 pairs, CachedMNRL
                     # mini-batch 64), then plain MNRL (default: fastst) in the same table (warm-up 8: its first reps
                     # would include large-graph captures)
  timeout $3 $B train --no-dropout --steps 4 --repeats 3 --warmup 5 --no-profile --models bert-base --batch-size 1024 \
    --contenders $2 --loss cached-mnrl --mini-batch-size 64 --out $R/$1 > $R/$1.log 2>&1
  timeout 90 $B train --no-dropout --steps 4 --repeats 3 --warmup 8 --no-profile --models bert-base --batch-size 1024 \
    --contenders ${4:-fastst} --out $R/$1 --append >> $R/$1.log 2>&1
  grep -h "rep [0-9]\|out of memory" $R/$1.log >> $R/timeline.txt
}
for STAGE in "${@:-encode}"; do  # several stages in one call: their files side by side
case "$STAGE" in
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
mem)  # issue #8's CachedMNRL cell with a profile; issue #6's memory at 256 per checkpointing mode; encode re-check
  stage cached-profile; OUT=$R timeout 120 python3 tests/gpu/profile_step.py bert-base --batch-size 1024 --steps 4 \
    --extra '--loss cached-mnrl --mini-batch-size 64' --tag=-cached > $R/prof-cached.log 2>&1
  stage cached;  timeout 120 $B train --no-dropout --steps 4 --repeats 2 --warmup 3 --no-profile --models bert-base --batch-size 1024 \
    --contenders fastst --loss cached-mnrl --mini-batch-size 64 --out $R/cached > $R/cached.log 2>&1
  timeout 60 $B train --no-dropout --steps 4 --repeats 2 --warmup 3 --no-profile --models bert-base --batch-size 1024 \
    --contenders fastst --out $R/cached --append >> $R/cached.log 2>&1
  for m in selective layer; do stage ckpt-$m
    timeout 90 $B train $T --no-profile --models embeddinggemma-300m,qwen3-0.6b --contenders fastst \
      --fastst-opt gradient_checkpointing=$m --out $R/ckpt-$m > $R/ckpt-$m.log 2>&1; done
  stage breakdown; OUT=$R timeout 90 python3 tests/gpu/memory_breakdown.py --models qwen3-0.6b > $R/breakdown.log 2>&1
  stage encode;  timeout 100 $B encode --corpus-size 6000 --models minilm,bert-base --contenders stock,fastst --repeats 2 \
    --out $R/encode > $R/encode.log 2>&1
  ;;
graphs)  # checkpointing and cached losses replayed from CUDA graphs: correctness, then speed and memory
  stage checks; OUT=$R timeout 200 python3 tests/gpu/memory_checks.py graph_modes cached > $R/memory_checks.log 2>&1
  stage cached;  timeout 150 $B train --no-dropout --steps 3 --repeats 2 --warmup 3 --no-profile --models bert-base --batch-size 1024 \
    --contenders stock,fastst --loss cached-mnrl --mini-batch-size 64 --out $R/cached > $R/cached.log 2>&1
  timeout 60 $B train --no-dropout --steps 4 --repeats 2 --warmup 3 --no-profile --models bert-base --batch-size 1024 \
    --contenders fastst --out $R/cached --append >> $R/cached.log 2>&1
  stage ckpt-selective; timeout 120 $B train $T --models embeddinggemma-300m,qwen3-0.6b --contenders stock,fastst \
      --fastst-opt gradient_checkpointing=selective --out $R/ckpt-selective > $R/ckpt-selective.log 2>&1
  stage ckpt-layer; timeout 60 $B train $T --no-profile --models embeddinggemma-300m,qwen3-0.6b --contenders fastst \
      --fastst-opt gradient_checkpointing=layer --out $R/ckpt-layer > $R/ckpt-layer.log 2>&1
  ;;
cached)  # issue #8's CachedMNRL cell: correctness, then cached (stock, fastst) and plain MNRL at 1,024 pairs
  stage checks; OUT=$R timeout 100 python3 tests/gpu/memory_checks.py cached > $R/memory_checks.log 2>&1
  stage cached;  timeout 200 $B train --no-dropout --steps 4 --repeats 3 --warmup 5 --no-profile --models bert-base --batch-size 1024 \
    --contenders stock,fastst --loss cached-mnrl --mini-batch-size 64 --out $R/cached > $R/cached.log 2>&1
  timeout 100 $B train --no-dropout --steps 4 --repeats 3 --warmup 5 --no-profile --models bert-base --batch-size 1024 \
    --contenders fastst --loss cached-mnrl --mini-batch-size 256 --out $R/cached --append >> $R/cached.log 2>&1
  timeout 60 $B train --no-dropout --steps 4 --repeats 3 --warmup 3 --no-profile --models bert-base --batch-size 1024 \
    --contenders fastst --out $R/cached --append >> $R/cached.log 2>&1
  ;;
seventh)  # combos unchecked since graphs under autocast became the default (CachedMNRL, SPLADE training),
          # the SparseEncoder encode cell of the bench, and where the 1024-token Gemma3 / Qwen3 steps spend
          # their GPU time (issue #6: both GPU-bound, 5.81x and 4.08x of the 6x target)
  stage cached-amp; OUT=$R timeout 120 python3 tests/gpu/memory_checks.py cached_amp > $R/cached-amp.log 2>&1
  stage sparse; OUT=$R FASTST_SPARSE_CHECKS_DEADLINE=120 timeout 160 python3 tests/gpu/sparse_checks.py > $R/sparse.log 2>&1
  stage sparse-encode; timeout 90 $B encode --api sparse-encode --models bert-base --corpus-size 2000 --contenders stock,fastst \
    --repeats 2 --out $R/sparse-encode > $R/sparse-encode.log 2>&1
  for m in embeddinggemma-300m qwen3-0.6b; do stage prof-$m
    FASTST_CUDA_GRAPHS=0 OUT=$R timeout 110 python3 tests/gpu/profile_step.py $m --steps 6 --max-seq-length 1024 \
      --extra=--long-docs --tag=-1024-eager > $R/prof-$m.log 2>&1; done
  ;;
eighth)  # issue #5: MiniLM's host-bound step after pooling, Normalize and the loss's cos_sim became one
         # autograd node each (alone, beside stock, phases, backward split; FASTST_FUSED_SIMILARITY=0 A/B); issue #6 on an emulated 80 GB card (a ballast
         # tensor takes the rest of the H200): does the pool-aware headroom rule capture the 1024-token
         # Gemma3 buckets there?
  stage minilm-alone; timeout 50 $B train --no-dropout --steps 30 --repeats 3 --warmup 5 --models minilm --contenders fastst \
    --out $R/minilm-alone > $R/minilm-alone.log 2>&1
  stage minilm-ab; timeout 80 $B train --no-dropout --steps 30 --repeats 3 --warmup 5 --models minilm --contenders stock,fastst \
    --out $R/minilm-ab > $R/minilm-ab.log 2>&1
  stage minilm-phases; OUT=$R timeout 60 python3 tests/gpu/profile_step.py minilm --steps 30 > $R/prof-minilm.log 2>&1
  stage backward-timing; OUT=$R timeout 60 python3 tests/gpu/backward_timing.py minilm > $R/backward-timing.log 2>&1
  stage minilm-no-fused-sim; FASTST_FUSED_SIMILARITY=0 timeout 50 $B train --no-dropout --steps 30 --repeats 3 --warmup 5 \
    --models minilm --contenders fastst --out $R/minilm-no-fused-sim > $R/minilm-no-fused-sim.log 2>&1
  L="--no-dropout --steps 4 --repeats 2 --warmup 8 --long-docs --max-seq-length 1024"
  stage long-gemma-80gb; timeout 170 python3 tests/gpu/emulate_card.py --gib 79 -- train $L --models embeddinggemma-300m \
    --contenders stock,fastst --out $R/long-80gb > $R/long-80gb.log 2>&1
  grep -E "runs without CUDA graphs|emulate_card" $R/long-80gb.log >> $R/timeline.txt
  ;;
ninth)  # issue #5: is the fused cos_sim a gain? (eighth: fastst alone 5.2 ms / 63 % busy, then with it off
        # 3.6 ms / 92 % busy, two processes minutes apart: not an A/B); the new Functions on the GPU; issue #6
        # on an 80 GB card with stock timed (eighth: stock ran out of memory beside fastst's graph pool)
  stage loss-parity; OUT=$R timeout 200 python3 tests/gpu/gpu_checks.py loss minilm bert-base modernbert-base \
    embeddinggemma-300m qwen3-0.6b > $R/loss.log 2>&1
  AB="fastst,fastst+FASTST_FUSED_SIMILARITY=0"
  stage sim-ab-minilm; timeout 90 $B train --no-dropout --steps 30 --repeats 6 --warmup 5 --models minilm --contenders $AB \
    --out $R/sim-ab > $R/sim-ab.log 2>&1
  stage sim-ab-bert; timeout 90 $B train --no-dropout --steps 20 --repeats 4 --warmup 5 --no-profile --models bert-base,modernbert-base \
    --contenders $AB --out $R/sim-ab --append >> $R/sim-ab.log 2>&1
  L="--no-dropout --steps 4 --repeats 2 --warmup 8 --long-docs --max-seq-length 1024"
  stage long-gemma-80gb; timeout 150 python3 tests/gpu/emulate_card.py --gib 79 -- train $L --models embeddinggemma-300m \
    --contenders stock,fastst --out $R/long-80gb > $R/long-80gb.log 2>&1
  grep -E "runs without CUDA graphs|emulate_card|timed alone|out of memory" $R/long-80gb.log >> $R/timeline.txt
  grep -h "rep [0-9]" $R/sim-ab.log >> $R/timeline.txt
  loss_summary >> $R/timeline.txt
  ;;
card80)  # issue #6's 1024-token cells as an H100 would hold them (times stay H200 times), stock in the same
         # process; then issue #5's MiniLM busy share in three separate processes (the host's speed drifts)
  L="--no-dropout --steps 4 --repeats 2 --warmup 8 --long-docs --max-seq-length 1024"
  stage long-gemma-80gb; timeout 170 python3 tests/gpu/emulate_card.py --gib 79 -- train $L --models embeddinggemma-300m \
    --contenders stock,fastst --out $R/long-80gb > $R/long-80gb.log 2>&1
  stage long-qwen-80gb; timeout 200 python3 tests/gpu/emulate_card.py --gib 79 -- train $L --models qwen3-0.6b \
    --contenders stock,fastst --out $R/long-80gb --append >> $R/long-80gb.log 2>&1
  for i in 1 2 3; do stage minilm-alone-$i; timeout 50 $B train --no-dropout --steps 30 --repeats 3 --warmup 5 --models minilm \
    --contenders fastst --out $R/minilm-alone --append > $R/minilm-alone-$i.log 2>&1; done
  stage minilm-phases; OUT=$R timeout 60 python3 tests/gpu/profile_step.py minilm --steps 30 > $R/prof-minilm.log 2>&1
  grep -E "runs without CUDA graphs|emulate_card|timed alone|out of memory|rep [0-9]" $R/long-80gb.log >> $R/timeline.txt
  grep -h "rep [0-9]" $R/minilm-alone-*.log >> $R/timeline.txt; grep -h "host ms per step" $R/prof-minilm.log >> $R/timeline.txt
  ;;
final10)  # the tenth session's defaults (norm recompute on, first-pass / loss-stage chunks) on the cells they move:
          # issue #6's EmbeddingGemma 1024 on an emulated 80 GB card (A/B the norm recompute), issue #8's cached cell
  L="--no-dropout --steps 4 --repeats 2 --warmup 8 --long-docs --max-seq-length 1024"
  stage long-gemma-80gb; timeout 200 python3 tests/gpu/emulate_card.py --gib 79 -- train $L --models embeddinggemma-300m \
    --contenders stock,fastst,fastst+FASTST_RECOMPUTE_NORM=0 --out $R/long-80gb > $R/long-80gb.log 2>&1
  grep -E "runs without CUDA graphs|emulate_card|timed alone|out of memory|rep [0-9]" $R/long-80gb.log >> $R/timeline.txt
  stage cached; cached_vs_plain cached stock,fastst 200
  ;;
workspace)  # (not run yet) are MiniLM's extra 33.6 MB blocks cuBLAS workspaces, one pair per stream? the
            # 128-token breakdown with torch's default workspace and with a 4 MiB one (CUBLAS_WORKSPACE_CONFIG)
  stage breakdown-default; OUT=$R timeout 120 python3 tests/gpu/memory_breakdown.py --models minilm --max-seq-length 128 \
    > $R/breakdown-default.log 2>&1
  stage breakdown-4mib; CUBLAS_WORKSPACE_CONFIG=:4096:1 OUT=$R timeout 120 python3 tests/gpu/memory_breakdown.py --models minilm \
    --max-seq-length 128 > $R/breakdown-4mib.log 2>&1
  grep -h "peak\|largest" $R/breakdown-*.log >> $R/timeline.txt
  ;;
recompute)  # issue #5 / #6 memory: the activation output no longer stored from forward to backward
  stage loss-parity; OUT=$R timeout 150 python3 tests/gpu/gpu_checks.py loss minilm bert-base modernbert-base \
    embeddinggemma-300m qwen3-0.6b > $R/loss.log 2>&1
  AB="stock,fastst,fastst+FASTST_RECOMPUTE_ACTIVATION=0"
  stage lora-256; timeout 120 $B train $T --models minilm,bert-base,modernbert-base --contenders $AB --out $R/recompute > $R/recompute.log 2>&1
  stage lora-128; timeout 90 $B train $T --no-profile --max-seq-length 128 --models minilm,bert-base,modernbert-base --contenders $AB \
    --out $R/recompute --append >> $R/recompute.log 2>&1
  stage full-256; timeout 80 $B train $T --no-profile --mode full --models minilm,bert-base --contenders $AB --out $R/recompute \
    --append >> $R/recompute.log 2>&1
  stage decoders-256; timeout 80 $B train $T --no-profile --models embeddinggemma-300m,qwen3-0.6b \
    --contenders fastst,fastst+FASTST_RECOMPUTE_ACTIVATION=0 --out $R/recompute --append >> $R/recompute.log 2>&1
  stage gemma-1024; timeout 90 $B train --no-dropout --steps 4 --repeats 2 --warmup 8 --long-docs --max-seq-length 1024 --no-profile \
    --models embeddinggemma-300m --contenders fastst,fastst+FASTST_RECOMPUTE_ACTIVATION=0 --out $R/recompute --append >> $R/recompute.log 2>&1
  grep -h "rep [0-9]\|out of memory" $R/recompute.log >> $R/timeline.txt
  loss_summary >> $R/timeline.txt
  ;;
cachedphases)  # issue #8: where CachedMNRL's step goes (pass 1, loss stage, replay) next to plain MNRL's, the
              # loss stage in few chunks (default) vs stock's chunks; the step's kernels
  stage cached-phases; OUT=$R timeout 240 python3 tests/gpu/cached_phases.py \
    --contenders fastst,fastst+FASTST_CACHED_FIRST_PASS=mini-batch,fastst+FASTST_CACHED_LOSS_CHUNKS=stock > $R/cached-phases.log 2>&1
  grep '^{' $R/cached-phases.log >> $R/timeline.txt
  [ -n "${CACHED_PROFILE:-}" ] && { stage cached-profile; OUT=$R timeout 150 python3 tests/gpu/profile_step.py bert-base \
    --batch-size 1024 --steps 4 --extra '--loss cached-mnrl --mini-batch-size 64' --tag=-cached > $R/prof-cached.log 2>&1; }
  ;;
cachedkeep)  # issue #8: the first mini-batch's eager graph kept from the first pass under CUDA graphs too
             # (FASTST_CACHED_KEEP_FIRST=1) A/B in one process; plain MNRL warmed up longer (large graphs)
  stage cached-keep; cached_vs_plain cached-keep fastst,fastst+FASTST_CACHED_KEEP_FIRST=1 150
  stage cached-keep-phases; OUT=$R timeout 150 python3 tests/gpu/cached_phases.py \
    --contenders fastst+FASTST_CACHED_KEEP_FIRST=1,fastst > $R/cached-phases.log 2>&1
  grep '^{' $R/cached-phases.log >> $R/timeline.txt
  ;;
normparity)  # the norm recompute (FASTST_RECOMPUTE_NORM, default on; passed on an H200 in the tenth session): GPU loss parity
  stage norm-parity; FASTST_RECOMPUTE_NORM=1 OUT=$R timeout 150 python3 tests/gpu/gpu_checks.py loss minilm bert-base \
    modernbert-base embeddinggemma-300m qwen3-0.6b > $R/loss.log 2>&1
  loss_summary >> $R/timeline.txt
  ;;
eleventh)  # issue #8: the first mini-batch kept in the graph pool (FASTST_CACHED_KEEP_FIRST, default auto) and the
          # no-gradient merged LoRA forward (FASTST_LORA_MERGE_NO_GRAD, default on): GPU checks, then the 1,024-pair
          # cell A/B in one process (each switch off, both off = the tenth session's default), phases
  stage checks; OUT=$R timeout 150 python3 tests/gpu/memory_checks.py cached lora_merge > $R/memory_checks.log 2>&1
  grep '^{' $R/memory_checks.log | cut -c1-420 >> $R/timeline.txt
  stage cached; cached_vs_plain cached \
    fastst,fastst+FASTST_CACHED_KEEP_FIRST=0,fastst+FASTST_LORA_MERGE_NO_GRAD=0,fastst+FASTST_CACHED_KEEP_FIRST=0+FASTST_LORA_MERGE_NO_GRAD=0 230
  stage cached-phases; OUT=$R timeout 150 python3 tests/gpu/cached_phases.py --steps 4 \
    --contenders fastst,fastst+FASTST_CACHED_KEEP_FIRST=0+FASTST_LORA_MERGE_NO_GRAD=0 > $R/cached-phases.log 2>&1
  grep '^{' $R/cached-phases.log >> $R/timeline.txt
  ;;
eleventh2)  # graphs reading the cached concatenation of frozen Q/K/V weights (FASTST_GRAPH_CACHED_CAT, default on) and
           # the LoRA node without scale multiplies: LoRA parity vs stock peft (graphed, eager, after a frozen weight is
           # written), cached checks; issue #8's cell with stock and the switch A/B; #5's LoRA cells A/B
  stage lora-parity; OUT=$R timeout 170 python3 tests/gpu/gpu_checks.py lora minilm bert-base modernbert-base \
    embeddinggemma-300m qwen3-0.6b > $R/lora-parity.log 2>&1
  grep '^{' $R/lora-parity.log | python3 -c "import json,sys
for l in sys.stdin:
    r=json.loads(l); print(r.get('model'), r.get('variant'), 'cos', r.get('cos_min'), 'grad rel max', r.get('grad_rel_err_max'), 'graphs', r.get('graphs_captured'), r.get('error',''))" >> $R/timeline.txt
  stage checks; OUT=$R timeout 120 python3 tests/gpu/memory_checks.py cached lora_merge > $R/memory_checks.log 2>&1
  grep '^{' $R/memory_checks.log | cut -c1-420 >> $R/timeline.txt
  stage cached; timeout 200 $B train --no-dropout --steps 4 --repeats 3 --warmup 5 --no-profile --models bert-base --batch-size 1024 \
    --contenders stock,fastst,fastst+FASTST_GRAPH_CACHED_CAT=0 --loss cached-mnrl --mini-batch-size 64 --out $R/cached > $R/cached.log 2>&1
  timeout 100 $B train --no-dropout --steps 4 --repeats 3 --warmup 8 --no-profile --models bert-base --batch-size 1024 \
    --contenders fastst,fastst+FASTST_GRAPH_CACHED_CAT=0 --out $R/cached --append >> $R/cached.log 2>&1
  grep -h "rep [0-9]\|out of memory" $R/cached.log >> $R/timeline.txt
  stage lora-256; timeout 120 $B train $T --no-profile --models minilm,bert-base,modernbert-base \
    --contenders stock,fastst,fastst+FASTST_GRAPH_CACHED_CAT=0 --out $R/lora256 > $R/lora256.log 2>&1
  ;;
eleventh3)  # issue #6's memory at 256 (no checkpointing) with graphs reading cached frozen concatenations vs
           # concatenating in the graph: one contender per process (the first contender built in a process also
           # pays the capture stream's cuBLAS workspaces, which would skew an in-process peak comparison)
  for c in fastst fastst+FASTST_GRAPH_CACHED_CAT=0; do stage "decoders-256 $c"
    timeout 100 $B train $T --no-profile --models embeddinggemma-300m,qwen3-0.6b --contenders $c \
      --out $R/decoders-256-$(echo $c | tr '+=' '__') > $R/decoders-256-$(echo $c | tr '+=' '__').log 2>&1
  done
  grep -h "rep [0-9]\|out of memory" $R/decoders-256-*.log >> $R/timeline.txt
  ;;
eleventh4)  # fused LoRA projections' frozen weights as row blocks (no kept concatenation) vs concatenated once and kept
           # (FASTST_FROZEN_PROJECTIONS, default auto: blocks over 4 MiB, i.e. Qwen3, not BERT/Gemma): LoRA parity with
           # blocks forced; EmbeddingGemma / Qwen3-0.6B at 256 with each setting forced, one process each (peaks)
  stage lora-parity-blocks; FASTST_FROZEN_PROJECTIONS=blocks OUT=$R timeout 100 python3 tests/gpu/gpu_checks.py lora \
    embeddinggemma-300m qwen3-0.6b > $R/lora-parity.log 2>&1
  grep '^{' $R/lora-parity.log | python3 -c "import json,sys
for l in sys.stdin:
    r=json.loads(l); print(r.get('model'), r.get('variant'), 'cos', r.get('cos_min'), 'grad rel max', r.get('grad_rel_err_max'), 'graphs', r.get('graphs_captured'), r.get('error',''))" >> $R/timeline.txt
  for c in fastst+FASTST_FROZEN_PROJECTIONS=cat fastst+FASTST_FROZEN_PROJECTIONS=blocks; do stage "decoders-256 $c"
    timeout 100 $B train $T --no-profile --models embeddinggemma-300m,qwen3-0.6b --contenders $c \
      --out $R/decoders-256-$(echo $c | tr '+=' '__') > $R/decoders-256-$(echo $c | tr '+=' '__').log 2>&1
  done
  grep -h "rep [0-9]\|out of memory" $R/decoders-256-*.log >> $R/timeline.txt
  ;;
eleventh5)  # the eleventh session's defaults on the scoreboard's LoRA 256 cells (five families, stock vs fastst) and
           # Qwen3-4B LoRA 256 (fastst alone: its peak with the frozen projections as row blocks; stock unchanged)
  stage train4b; timeout 100 $B train --no-dropout --steps 3 --repeats 2 --warmup 2 --models qwen3-4b \
    --contenders fastst --out $R/train4b > $R/train4b.log 2>&1
  stage train; timeout 230 $B train $T --no-profile --models minilm,bert-base,modernbert-base,embeddinggemma-300m,qwen3-0.6b \
    --contenders stock,fastst --out $R/train --time-budget 210 > $R/train.log 2>&1
  grep -h "rep [0-9]\|out of memory" $R/train4b.log $R/train.log >> $R/timeline.txt
  ;;
eleventh6)  # issue #6's EmbeddingGemma 1024 cell on an emulated 80 GB card with this session's defaults (graphs reading
           # the kept Q/K/V and gate/up concatenations; FASTST_GRAPH_CACHED_CAT=0 concatenates per replay, as before)
  L="--no-dropout --steps 4 --repeats 2 --warmup 8 --long-docs --max-seq-length 1024"
  stage long-gemma-80gb; timeout 220 python3 tests/gpu/emulate_card.py --gib 79 -- train $L --models embeddinggemma-300m \
    --contenders stock,fastst,fastst+FASTST_GRAPH_CACHED_CAT=0 --out $R/long-80gb > $R/long-80gb.log 2>&1
  grep -E "runs without CUDA graphs|emulate_card|timed alone|out of memory|rep [0-9]" $R/long-80gb.log >> $R/timeline.txt
  ;;
eleventh7)  # LoRA parity vs stock peft with an fp32 stock copy as the yardstick (is the decoders' 0.06-0.07 bf16?)
  stage lora-yardstick; OUT=$R timeout 150 python3 tests/gpu/gpu_checks.py lora bert-base embeddinggemma-300m qwen3-0.6b \
    > $R/lora-parity.log 2>&1
  grep '^{' $R/lora-parity.log | python3 -c "import json,sys
for l in sys.stdin:
    r=json.loads(l); print(r.get('model'), r.get('variant'), 'cos', r.get('cos_min'), 'grad rel max', r.get('grad_rel_err_max'),
      'vs fp32', r.get('grad_rel_err_vs_fp32_max'), 'stock vs fp32', r.get('stock_bf16_grad_rel_err_vs_fp32_max'), r.get('error',''))" >> $R/timeline.txt
  ;;
attnmap)  # NOT RUN YET (written after the eleventh session's device time ran out): the attention's program -> sequence
         # map (FASTST_ATTN_BLOCK_MAP=1) instead of each program scanning all N boundaries. Parity with it on, then A/B:
         # the LoRA 256 cells (N = 128 texts), plain MNRL at 1,024 pairs (N = 2,048), issue #8's cached cell
  stage attnmap-parity; FASTST_ATTN_BLOCK_MAP=1 OUT=$R timeout 150 python3 tests/gpu/gpu_checks.py loss minilm bert-base \
    modernbert-base embeddinggemma-300m qwen3-0.6b > $R/loss.log 2>&1
  loss_summary >> $R/timeline.txt
  stage attnmap-256; timeout 120 $B train $T --no-profile --models minilm,bert-base,modernbert-base,embeddinggemma-300m \
    --contenders fastst,fastst+FASTST_ATTN_BLOCK_MAP=1 --out $R/attnmap-256 > $R/attnmap-256.log 2>&1
  stage attnmap-cached; cached_vs_plain attnmap-cached fastst,fastst+FASTST_ATTN_BLOCK_MAP=1 150 fastst,fastst+FASTST_ATTN_BLOCK_MAP=1
  ;;
twelfth)  # the attention's block map on by default and shared by a forward's layers; the rotated q/k recomputed in
          # backward (FASTST_RECOMPUTE_ROPE): parity, rope families' peaks one process per setting (stock beside the
          # default), the block map A/B at 128 texts and at 1,024 pairs (plain and cached), plain MNRL at 3,072 pairs
  stage parity; OUT=$R timeout 150 python3 tests/gpu/gpu_checks.py loss minilm bert-base modernbert-base \
    embeddinggemma-300m qwen3-0.6b > $R/loss.log 2>&1
  loss_summary >> $R/timeline.txt
  for c in stock,fastst fastst+FASTST_RECOMPUTE_ROPE=0; do stage "rope-256 $c"
    timeout 130 $B train $T --no-profile --models modernbert-base,embeddinggemma-300m,qwen3-0.6b --contenders $c \
      --out $R/rope-256-$(echo $c | tr '+=,' '___') > $R/rope-256-$(echo $c | tr '+=,' '___').log 2>&1
  done
  stage map-256; timeout 120 $B train $T --no-profile --models minilm,bert-base,modernbert-base \
    --contenders fastst,fastst+FASTST_ATTN_BLOCK_MAP=0 --out $R/map-256 > $R/map-256.log 2>&1
  stage map-cached; cached_vs_plain map-cached fastst,fastst+FASTST_ATTN_BLOCK_MAP=0 150 fastst,fastst+FASTST_ATTN_BLOCK_MAP=0
  stage plain-3072; timeout 150 $B train --no-dropout --steps 4 --repeats 3 --warmup 8 --no-profile --models bert-base \
    --batch-size 3072 --contenders fastst --out $R/plain-3072 > $R/plain-3072.log 2>&1
  grep -h "rep [0-9]\|out of memory" $R/rope-256-*.log $R/map-*.log $R/plain-3072.log >> $R/timeline.txt
  ;;
twelfth2)  # the RoPE recompute's step time A/B in one process (twelfth had the settings in two processes, one with
           # stock in it); Qwen3-4B LoRA 256 and Qwen3-0.6B LoRA 1024 peaks with it (fastst alone, one process each)
  stage rope-ab; timeout 120 $B train $T --no-profile --models modernbert-base,embeddinggemma-300m,qwen3-0.6b \
    --contenders fastst,fastst+FASTST_RECOMPUTE_ROPE=0 --out $R/rope-ab > $R/rope-ab.log 2>&1
  stage train4b; timeout 100 $B train --no-dropout --steps 3 --repeats 2 --warmup 2 --no-profile --models qwen3-4b \
    --contenders fastst --out $R/train4b > $R/train4b.log 2>&1
  for c in fastst fastst+FASTST_RECOMPUTE_ROPE=0; do stage "qwen-1024 $c"
    timeout 120 $B train --no-dropout --steps 3 --repeats 2 --warmup 3 --no-profile --long-docs --max-seq-length 1024 \
      --models qwen3-0.6b --contenders $c --out $R/qwen-1024-$(echo $c | tr '+=' '__') > $R/qwen-1024-$(echo $c | tr '+=' '__').log 2>&1
  done
  grep -h "rep [0-9]\|out of memory" $R/rope-ab.log $R/train4b.log $R/qwen-1024-*.log >> $R/timeline.txt
  ;;
profile8)  # issue #8: the kernels of CachedMNRL's step (1,024 pairs, mini-batch 64) and of plain MNRL's (1,024 pairs),
          # with this session's defaults: where the cached step spends more than plain beyond its first pass
  stage prof-cached; OUT=$R timeout 200 python3 tests/gpu/profile_step.py bert-base --batch-size 1024 --steps 4 \
    --extra '--loss cached-mnrl --mini-batch-size 64' --tag=-cached > $R/prof-cached.log 2>&1
  stage prof-plain; OUT=$R timeout 150 python3 tests/gpu/profile_step.py bert-base --batch-size 1024 --steps 4 \
    --tag=-plain > $R/prof-plain.log 2>&1
  ;;
twelfth3)  # the LoRA node over the merged weight with gradients (FASTST_LORA_MERGE_GRAD; run as the default "auto", then
          # made opt-in after this run's final losses): LoRA parity vs stock peft with an fp32 yardstick, the LoRA 256
          # cells A/B in one process, issue #8's cached and plain cells A/B
  stage lora-parity-merged; FASTST_LORA_MERGE_GRAD=auto OUT=$R timeout 150 python3 tests/gpu/gpu_checks.py lora minilm bert-base modernbert-base \
    embeddinggemma-300m qwen3-0.6b > $R/lora-parity.log 2>&1
  grep '^{' $R/lora-parity.log | python3 -c "import json,sys
for l in sys.stdin:
    r=json.loads(l); print(r.get('model'), r.get('variant'), 'cos', r.get('cos_min'), 'grad rel max', r.get('grad_rel_err_max'),
      'vs fp32', r.get('grad_rel_err_vs_fp32_max'), 'stock vs fp32', r.get('stock_bf16_grad_rel_err_vs_fp32_max'), r.get('error',''))" >> $R/timeline.txt
  stage merge-256; timeout 150 $B train $T --no-profile --models minilm,bert-base,modernbert-base,embeddinggemma-300m,qwen3-0.6b \
    --contenders fastst+FASTST_LORA_MERGE_GRAD=auto,fastst+FASTST_LORA_MERGE_GRAD=0 --out $R/merge-256 > $R/merge-256.log 2>&1
  stage merge-cached; cached_vs_plain merge-cached fastst+FASTST_LORA_MERGE_GRAD=auto,fastst+FASTST_LORA_MERGE_GRAD=0 150 \
    fastst+FASTST_LORA_MERGE_GRAD=auto,fastst+FASTST_LORA_MERGE_GRAD=0
  grep -h "rep [0-9]\|out of memory" $R/merge-*.log >> $R/timeline.txt
  ;;
twelfth4)  # this session's defaults on the cells still missing a stock column (MiniLM, bert-base LoRA 256) and issue #8's
          # ratio once more: CachedMNRL and plain MNRL at 1,024 pairs, plain at 3,072 (the largest that fits 80 GB)
  stage train; timeout 100 $B train $T --no-profile --models minilm,bert-base --contenders stock,fastst \
    --out $R/train > $R/train.log 2>&1
  stage cached; cached_vs_plain cached fastst 100
  stage plain-3072; timeout 80 $B train --no-dropout --steps 4 --repeats 3 --warmup 8 --no-profile --models bert-base \
    --batch-size 3072 --contenders fastst --out $R/plain-3072 > $R/plain-3072.log 2>&1
  grep -h "rep [0-9]\|out of memory" $R/train.log $R/cached.log $R/plain-3072.log >> $R/timeline.txt
  ;;
thirteenth)  # NOT RUN YET (written after the twelfth session's device time ran out): LoRA parity vs stock peft with
            # the twelfth session's defaults (block map, RoPE recompute; the merged-with-gradients node off), and
            # whether CachedMNRL's merged no-gradient first pass drifts: stock vs fastst vs fastst without the merge,
            # final losses after 4 x 5 timed steps (the twelfth session's with-gradient merge drifted visibly)
  stage lora-parity; OUT=$R timeout 150 python3 tests/gpu/gpu_checks.py lora minilm bert-base modernbert-base \
    embeddinggemma-300m qwen3-0.6b > $R/lora-parity.log 2>&1
  grep '^{' $R/lora-parity.log | python3 -c "import json,sys
for l in sys.stdin:
    r=json.loads(l); print(r.get('model'), r.get('variant'), 'cos', r.get('cos_min'), 'grad rel max', r.get('grad_rel_err_max'),
      'vs fp32', r.get('grad_rel_err_vs_fp32_max'), 'stock vs fp32', r.get('stock_bf16_grad_rel_err_vs_fp32_max'), r.get('error',''))" >> $R/timeline.txt
  stage cached-drift; timeout 300 $B train --no-dropout --steps 5 --repeats 4 --warmup 5 --no-profile --models bert-base \
    --batch-size 1024 --loss cached-mnrl --mini-batch-size 64 \
    --contenders stock,fastst,fastst+FASTST_LORA_MERGE_NO_GRAD=0 --out $R/cached-drift > $R/cached-drift.log 2>&1
  grep -h "rep [0-9]\|out of memory" $R/cached-drift.log >> $R/timeline.txt
  ;;
aa)  # A/A: the same fastst configuration built twice in one process (FASTST_AA_TWIN=1 changes nothing), to size
     # the build-order bias of fastst-vs-fastst A/Bs (peak and step time), MiniLM 128/256 and bert-base 256
  stage aa-minilm; timeout 120 $B train $T --models minilm --max-seq-length 128,256 \
    --contenders stock,fastst,fastst+FASTST_AA_TWIN=1 --out $R/aa > $R/aa.log 2>&1
  stage aa-bert; timeout 100 $B train $T --models bert-base --contenders fastst,fastst+FASTST_AA_TWIN=1 \
    --out $R/aa --append >> $R/aa.log 2>&1
  grep -h "rep [0-9]\|out of memory\|failed" $R/aa.log >> $R/timeline.txt
  ;;
nineteenth)  # the gradient sink for large gradient sets only (auto): MiniLM LoRA 128/256 (no sink) vs the sink forced,
            # CachedMNRL 1,024 pairs full FT (sink) and LoRA (none) with the final defaults
  stage minilm; timeout 120 $B train $T --models minilm --max-seq-length 128,256 \
    --contenders stock,fastst,fastst+FASTST_GRAPH_GRAD_SINK=1 --out $R/minilm > $R/minilm.log 2>&1
  CELL="--no-dropout --steps 4 --repeats 3 --no-profile --models bert-base --warmup 5 --batch-size 1024 --loss cached-mnrl --mini-batch-size 64"
  stage full-cached; timeout 90 $B train --mode full $CELL --contenders fastst --out $R/cached > $R/cached.log 2>&1
  stage lora-cached; timeout 90 $B train $CELL --contenders fastst --out $R/cached --append >> $R/cached.log 2>&1
  grep -h "rep [0-9]\|out of memory\|failed" $R/minilm.log $R/cached.log >> $R/timeline.txt
  ;;
eighteenth)  # issue #5's cells with the session's defaults (gradient sink), GPU busy share measured; MiniLM at 128 and
            # 256 with stock built first (it takes the process's one-time cuBLAS workspaces), then fastst and
            # fastst without the sink, so their peaks compare
  stage minilm; timeout 150 $B train $T --models minilm --max-seq-length 128,256 \
    --contenders stock,fastst,fastst+FASTST_GRAPH_GRAD_SINK=0 --out $R/minilm > $R/minilm.log 2>&1
  stage bert-modernbert; timeout 150 $B train $T --models bert-base,modernbert-base --contenders stock,fastst \
    --out $R/bert > $R/bert.log 2>&1
  grep -h "rep [0-9]\|out of memory\|failed" $R/minilm.log $R/bert.log >> $R/timeline.txt
  ;;
seventeenth)  # issue #8 with the session's defaults (filled cuts, fine buckets for cached mini-batches, gradient sink):
             # cached-gradient checks; CachedMNRL full FT (A/B equal-share cuts) and LoRA; plain MNRL at 3,072 / 3,584
             # pairs on an emulated 80 GB card, full and LoRA
  stage cached-checks; OUT=$R timeout 100 python3 tests/gpu/memory_checks.py cached cached_amp > $R/memory_checks.log 2>&1
  grep -h '^{' $R/memory_checks.log | cut -c1-500 >> $R/timeline.txt
  CELL="--no-dropout --steps 4 --repeats 3 --no-profile --models bert-base"
  stage full-cached; timeout 100 $B train --mode full $CELL --warmup 5 --batch-size 1024 --loss cached-mnrl --mini-batch-size 64 \
    --contenders fastst,fastst+FASTST_CACHED_CUTS=balanced --out $R/full > $R/full.log 2>&1
  for n in 3072 3584; do stage full-plain-$n
    timeout 80 python3 tests/gpu/emulate_card.py --gib 79 -- train --mode full $CELL --warmup 8 --batch-size $n \
      --contenders fastst --out $R/full-plain-$n > $R/full-plain-$n.log 2>&1
  done
  stage lora-cached; timeout 80 $B train $CELL --warmup 5 --batch-size 1024 --loss cached-mnrl --mini-batch-size 64 \
    --contenders fastst --out $R/lora > $R/lora.log 2>&1
  for n in 3072 3584; do stage lora-plain-$n
    timeout 80 python3 tests/gpu/emulate_card.py --gib 79 -- train $CELL --warmup 8 --batch-size $n \
      --contenders fastst --out $R/lora-plain-$n > $R/lora-plain-$n.log 2>&1
  done
  grep -h "rep [0-9]\|out of memory\|emulate_card\|without CUDA graphs\|failed" $R/full*.log $R/lora*.log >> $R/timeline.txt
  ;;
sixteenth)  # one gradient sink shared by every bucket's backward graph (FASTST_GRAPH_GRAD_SINK, default on): GPU
            # parity (full fine-tuning under autocast, LoRA, cached losses), then CachedMNRL full fine-tuning A/B
            # with stock beside (peaks), plain full FT at 3,584 pairs on an emulated 80 GB card, issue #5's cells
  stage parity-amp; OUT=$R timeout 120 python3 tests/gpu/gpu_checks.py amp minilm bert-base > $R/amp.log 2>&1
  stage parity-lora; OUT=$R timeout 100 python3 tests/gpu/gpu_checks.py lora minilm bert-base > $R/lora-parity.log 2>&1
  grep -h '^{' $R/amp.log $R/lora-parity.log | python3 -c "import json,sys
for l in sys.stdin:
    r=json.loads(l); print(r.get('check'), r.get('model'), r.get('variant'), 'cos', r.get('cos_min'), 'grad rel max', r.get('grad_rel_err_max'), 'graphs', r.get('graphs_captured'), r.get('error',''))" >> $R/timeline.txt
  stage cached-checks; OUT=$R timeout 120 python3 tests/gpu/memory_checks.py cached cached_amp cached_exact > $R/memory_checks.log 2>&1
  grep -h '^{' $R/memory_checks.log | cut -c1-500 >> $R/timeline.txt
  CELL="--no-dropout --steps 4 --repeats 3 --no-profile --models bert-base"
  stage full-cached; timeout 200 $B train --mode full $CELL --warmup 5 --batch-size 1024 --loss cached-mnrl --mini-batch-size 64 \
    --contenders stock,fastst,fastst+FASTST_GRAPH_GRAD_SINK=0 --out $R/full > $R/full.log 2>&1
  stage full-plain-3584; timeout 100 python3 tests/gpu/emulate_card.py --gib 79 -- train --mode full $CELL --warmup 8 --batch-size 3584 \
    --contenders fastst --out $R/full-plain-3584 > $R/full-plain-3584.log 2>&1
  stage issue5; timeout 70 $B train $T --no-profile --models minilm,bert-base --contenders fastst,fastst+FASTST_GRAPH_GRAD_SINK=0 \
    --out $R/issue5 > $R/issue5.log 2>&1
  timeout 70 $B train $T --no-profile --models minilm,bert-base --contenders fastst,fastst+FASTST_GRAPH_GRAD_SINK=0 \
    --mode full --out $R/issue5 --append >> $R/issue5.log 2>&1
  grep -h "rep [0-9]\|out of memory\|emulate_card\|without CUDA graphs\|failed" $R/full*.log $R/issue5.log >> $R/timeline.txt
  ;;
fifteenth)  # issue #8: cached mini-batches cut to fill CUDA-graph buckets (default) vs equal shares, A/B in one process,
            # full fine-tuning and LoRA; plain MNRL at 3,072 / 3,584 (full) and 3,072 / 4,096 (LoRA) pairs on an
            # emulated 80 GB card: the largest batch that fits the issue's card
  CELL="--no-dropout --steps 4 --repeats 3 --no-profile --models bert-base"
  AB=fastst,fastst+FASTST_CACHED_CUTS=balanced
  stage full-cached; timeout 150 $B train --mode full $CELL --warmup 5 --batch-size 1024 --loss cached-mnrl --mini-batch-size 64 \
    --contenders $AB --out $R/full > $R/full.log 2>&1
  for n in 3072 3584; do stage full-plain-$n
    timeout 100 python3 tests/gpu/emulate_card.py --gib 79 -- train --mode full $CELL --warmup 8 --batch-size $n \
      --contenders fastst --out $R/full-plain-$n > $R/full-plain-$n.log 2>&1
  done
  stage lora-cached; timeout 130 $B train $CELL --warmup 5 --batch-size 1024 --loss cached-mnrl --mini-batch-size 64 \
    --contenders $AB --out $R/lora > $R/lora.log 2>&1
  for n in 3072 4096; do stage lora-plain-$n
    timeout 90 python3 tests/gpu/emulate_card.py --gib 79 -- train $CELL --warmup 8 --batch-size $n \
      --contenders fastst --out $R/lora-plain-$n > $R/lora-plain-$n.log 2>&1
  done
  grep -h "rep [0-9]\|out of memory\|emulate_card\|without CUDA graphs" $R/full*.log $R/lora*.log >> $R/timeline.txt
  ;;
fourteenth)  # issue #8's cached-vs-plain cell in full fine-tuning (sentence-transformers' default training mode;
             # every earlier session timed LoRA only), plain MNRL at 1,024 / 2,048 / 3,072 pairs to find the
             # largest batch that fits 80 GB; then LoRA with the exact (unmerged) first pass, now the default,
             # against the merged one (FASTST_LORA_MERGE_NO_GRAD=1) and plain MNRL, one process
  stage full-cached; timeout 240 $B train --mode full --no-dropout --steps 4 --repeats 3 --warmup 5 --no-profile \
    --models bert-base --batch-size 1024 --loss cached-mnrl --mini-batch-size 64 --contenders stock,fastst \
    --out $R/full > $R/full.log 2>&1
  for n in 1024 2048 3072; do stage full-plain-$n
    timeout 120 $B train --mode full --no-dropout --steps 4 --repeats 3 --warmup 8 --no-profile --models bert-base \
      --batch-size $n --contenders fastst --out $R/full-plain-$n > $R/full-plain-$n.log 2>&1
  done
  grep -h "rep [0-9]\|out of memory" $R/full*.log >> $R/timeline.txt
  stage lora-cached; cached_vs_plain lora-cached fastst,fastst+FASTST_LORA_MERGE_NO_GRAD=1 200
  ;;
profile8full)  # issue #8 in full fine-tuning: the kernels of CachedMNRL's step and of plain MNRL's (1,024 pairs)
  stage prof-cached-full; OUT=$R timeout 200 python3 tests/gpu/profile_step.py bert-base --mode full --batch-size 1024 \
    --steps 4 --extra '--loss cached-mnrl --mini-batch-size 64' --tag=-cached-full > $R/prof-cached.log 2>&1
  stage prof-plain-full; OUT=$R timeout 150 python3 tests/gpu/profile_step.py bert-base --mode full --batch-size 1024 \
    --steps 4 --tag=-plain-full > $R/prof-plain.log 2>&1
  ;;
replaydiff)  # issue #8: why CachedMNRL's replay (every mini-batch embedded again with gradients, ~16k tokens each)
            # costs more than plain MNRL's whole 1,024-pair step: per-kernel GPU time per step of both (JSON, all
            # rows), the cached step's phases with the exact first pass, and cached vs MNRL gradients with moved adapters
  stage prof-cached; OUT=$R timeout 150 python3 tests/gpu/profile_step.py bert-base --batch-size 1024 --steps 4 \
    --extra '--loss cached-mnrl --mini-batch-size 64' --tag=-cached > $R/prof-cached.log 2>&1
  stage prof-plain; OUT=$R timeout 120 python3 tests/gpu/profile_step.py bert-base --batch-size 1024 --steps 4 \
    --tag=-plain > $R/prof-plain.log 2>&1
  stage phases; OUT=$R timeout 150 python3 tests/gpu/cached_phases.py --steps 4 --contenders fastst,fastst+FASTST_LORA_MERGE_NO_GRAD=1 \
    > $R/cached-phases.log 2>&1
  stage cached-exact; OUT=$R timeout 100 python3 tests/gpu/memory_checks.py cached_exact > $R/memory_checks.log 2>&1
  grep -h '^{' $R/cached-phases.log $R/memory_checks.log >> $R/timeline.txt
  ;;
densegrads)  # graphed steps' static gradients made dense (a fused Q/K/V's LoRA B slices sent the replay's multi-tensor
            # copy down the per-tensor slow path): LoRA parity with graphs, cached gradients (mini-batch accumulation),
            # MiniLM's host profile, the LoRA 256 cells of issue #5
  stage lora-parity; OUT=$R timeout 100 python3 tests/gpu/gpu_checks.py lora minilm bert-base > $R/lora-parity.log 2>&1
  grep '^{' $R/lora-parity.log | python3 -c "import json,sys
for l in sys.stdin:
    r=json.loads(l); print(r.get('model'), r.get('variant'), 'cos', r.get('cos_min'), 'grad rel max', r.get('grad_rel_err_max'), r.get('error',''))" >> $R/timeline.txt
  stage cached; OUT=$R timeout 100 python3 tests/gpu/memory_checks.py cached cached_exact > $R/memory_checks.log 2>&1
  grep -h '^{' $R/memory_checks.log | cut -c1-400 >> $R/timeline.txt
  stage profile-minilm; OUT=$R timeout 80 python3 tests/gpu/profile_step.py minilm --steps 30 --tag=-dense > $R/prof.log 2>&1
  head -2 $R/profile-minilm-*.txt >> $R/timeline.txt; grep "_foreach_mul\|aten::mul " $R/profile-minilm-*.txt | cut -c1-120 >> $R/timeline.txt
  stage train; timeout 120 $B train $T --models minilm,bert-base --contenders stock,fastst --out $R/train > $R/train.log 2>&1
  ;;
final13)  # issue #8's LoRA cell with the thirteenth session's final defaults (exact first pass, dense graphed gradients)
  stage cached; cached_vs_plain final fastst 150
  ;;
plainbatch)  # issue #8 compares against plain MNRL "at the largest batch that fits"; plain at 1,024 pairs
             # peaks at 20.9 GB, so time plain at 2,048 and 3,072 pairs too (pairs/s is the column to compare)
  for n in 2048 3072; do stage plain-$n
    timeout 150 $B train --no-dropout --steps 4 --repeats 3 --warmup 8 --no-profile --models bert-base --batch-size $n \
      --contenders fastst --out $R/plain-$n > $R/plain-$n.log 2>&1
  done
  grep -h "rep [0-9]\|out of memory" $R/plain-*.log >> $R/timeline.txt
  ;;
cachedab)  # issue #8's cell after the loss stage's and the first pass's chunks: bf16 gradients vs MNRL, then
           # cached (stock, fastst, fastst with stock's first pass) and plain MNRL at 1,024 pairs, one process each
  stage checks; OUT=$R timeout 100 python3 tests/gpu/memory_checks.py cached > $R/memory_checks.log 2>&1
  stage cached; cached_vs_plain cached stock,fastst,fastst+FASTST_CACHED_FIRST_PASS=mini-batch 220
  ;;
tenth)  # the recompute (ninth session) on the paths it was not timed on, and MiniLM's 128-token peak
  AB="stock,fastst,fastst+FASTST_RECOMPUTE_ACTIVATION=0"
  stage amp; timeout 110 $B train $T --no-profile --dtype amp-bf16 --models minilm,bert-base --contenders $AB \
    --out $R/recompute-amp > $R/recompute-amp.log 2>&1
  stage qlora; timeout 120 $B train $T --no-profile --mode qlora --models bert-base,embeddinggemma-300m \
    --contenders fastst,fastst+FASTST_RECOMPUTE_ACTIVATION=0 --out $R/recompute-qlora > $R/recompute-qlora.log 2>&1
  stage breakdown-128; OUT=$R timeout 120 python3 tests/gpu/memory_breakdown.py --models minilm --max-seq-length 128 \
    > $R/breakdown-128.log 2>&1
  grep -h "rep [0-9]\|out of memory" $R/recompute-*.log >> $R/timeline.txt
  ;;
normbench)  # the norm recompute: what it saves, what it costs (=0 stores the norm outputs)
  NB="fastst,fastst+FASTST_RECOMPUTE_NORM=0"
  stage norm-128-256; timeout 200 $B train $T --no-profile --max-seq-length 128,256 --models minilm,bert-base,modernbert-base \
    --contenders stock,$NB --out $R/recompute-norm > $R/recompute-norm.log 2>&1
  stage norm-decoders; timeout 100 $B train $T --no-profile --models embeddinggemma-300m,qwen3-0.6b --contenders $NB \
    --out $R/recompute-norm --append >> $R/recompute-norm.log 2>&1
  grep -h "rep [0-9]\|out of memory" $R/recompute-norm.log >> $R/timeline.txt
  ;;
gqa)  # ATen's flash kernels called directly (K/V heads as they are) vs varlen_attn with repeated K/V, then
      # issue #6's 1024-token cells (graph padding now in short dummy sequences)
  stage flash; OUT=$R timeout 120 python3 tests/gpu/flash_direct_check.py > $R/flash.log 2>&1
  L="--no-dropout --steps 4 --repeats 2 --warmup 8 --long-docs --max-seq-length 1024"  # two passes over the 4 batches: large buckets are captured on their second sighting
  stage long-gemma; timeout 130 $B train $L --models embeddinggemma-300m --contenders stock,fastst --out $R/long > $R/long.log 2>&1
  stage long-qwen; timeout 160 $B train $L --models qwen3-0.6b --contenders stock,fastst --out $R/long --append >> $R/long.log 2>&1
  cat $R/flash.log >> $R/timeline.txt
  ;;
long)  # issue #6's 1024-token cells (large training buckets captured, and eager for comparison), issue #5's
       # 128 / 512 cells and full fine-tuning peaks, and where MiniLM's 64-pair step spends its host time
  stage profile-minilm; OUT=$R timeout 60 python3 tests/gpu/profile_step.py minilm --steps 30 > $R/prof-minilm.log 2>&1
  L="--no-dropout --steps 4 --repeats 2 --warmup 8 --long-docs --max-seq-length 1024"  # two passes over the 4 batches: large buckets are captured on their second sighting
  stage long-gemma; timeout 130 $B train $L --models embeddinggemma-300m --contenders stock,fastst --out $R/long > $R/long.log 2>&1
  stage long-eager; FASTST_LARGE_GRAPHS=0 timeout 50 $B train $L --no-profile --models embeddinggemma-300m --contenders fastst \
    --out $R/long-eager > $R/long-eager.log 2>&1
  stage long-qwen; timeout 160 $B train $L --models qwen3-0.6b --contenders stock,fastst --out $R/long --append >> $R/long.log 2>&1
  stage lengths; timeout 100 $B train $T --no-profile --models bert-base --max-seq-length 128,512 --contenders stock,fastst \
    --out $R/lengths > $R/lengths.log 2>&1
  stage full; timeout 70 $B train $T --mode full --models minilm,bert-base --contenders stock,fastst --out $R/full > $R/full.log 2>&1
  ;;
direct)  # parameter gradients written by the graphed step itself (default) vs one autograd edge each
        # (FASTST_GRAPH_GRADS=edges): the trainer's step (DDP runner, one GPU) and the LoRA 256 table
  D="python3 -m fastst_plugin.bench.ddp --model bert-base --lora-r 32 --global-batch 128 --steps 50 --max-seq-length 256 --warmup 5 --seed 0 --bf16 --no-dropout"
  stage trainer-direct; timeout 70 $D --out $R/trainer --tag direct > $R/trainer.log 2>&1
  stage trainer-edges; FASTST_GRAPH_GRADS=edges timeout 70 $D --out $R/trainer --tag edges >> $R/trainer.log 2>&1
  python3 -m fastst_plugin.bench.ddp compare $R/trainer/*direct*.jsonl $R/trainer/*edges*.jsonl --same-world > $R/trainer-compare.md 2>&1
  stage train;   timeout 200 $B train $T --models minilm,bert-base,modernbert-base,embeddinggemma-300m,qwen3-0.6b \
    --contenders stock,fastst --out $R/train --time-budget 180 > $R/train.log 2>&1
  stage profile-long; OUT=$R timeout 80 python3 tests/gpu/profile_step.py embeddinggemma-300m --steps 6 --max-seq-length 1024 \
    --extra=--long-docs --tag=-1024 > $R/prof-long.log 2>&1
  cat $R/trainer-compare.md >> $R/timeline.txt
  ;;
amp)  # graphs under autocast (FASTST_AUTOCAST_GRAPHS, on by default; passed on an H200 2026-11-29): fp32 weights + bf16
     # autocast, parity (graphs / replay / eager vs stock) and speed against stock and against the
     # eager run (FASTST_AUTOCAST_GRAPHS=0); then MiniLM's bench step with and without the stock contender
     # alive in the process (the 6.2-7.6 ms bench step vs 4.2 ms in profile_step's loop is unexplained)
  stage amp-parity; FASTST_AUTOCAST_GRAPHS=1 OUT=$R timeout 90 python3 tests/gpu/gpu_checks.py amp bert-base minilm > $R/amp.log 2>&1
  stage amp-train; FASTST_AUTOCAST_GRAPHS=1 timeout 90 $B train $T --no-profile --dtype amp-bf16 --models bert-base \
    --contenders stock,fastst --out $R/amp > $R/amp-train.log 2>&1
  stage amp-eager; FASTST_AUTOCAST_GRAPHS=0 timeout 60 $B train $T --no-profile --dtype amp-bf16 --models bert-base --contenders fastst \
    --out $R/amp-eager > $R/amp-eager.log 2>&1
  stage minilm-alone; timeout 50 $B train --no-dropout --steps 30 --repeats 3 --warmup 5 --models minilm --contenders fastst \
    --out $R/minilm-alone > $R/minilm-alone.log 2>&1
  stage minilm-ab; timeout 80 $B train --no-dropout --steps 30 --repeats 3 --warmup 5 --models minilm --contenders stock,fastst \
    --out $R/minilm-ab > $R/minilm-ab.log 2>&1
  stage minilm-phases; OUT=$R timeout 60 python3 tests/gpu/profile_step.py minilm --steps 30 > $R/prof-minilm.log 2>&1
  grep '^{' $R/amp.log >> $R/timeline.txt
  ;;
infer)  # issue #7: outputs vs stock, the encode cells (stock, fastst; steady state after two warm-up
        # passes) and predict, then the host timeline and one batch's kernels (MiniLM, bert-base)
  stage encode-checks; OUT=$R timeout 80 python3 tests/gpu/encode_checks.py > $R/encode_checks.log 2>&1
  stage encode;  timeout 250 $B encode --corpus-size 6000 --models minilm,bert-base,modernbert-base,embeddinggemma-300m,qwen3-0.6b \
    --contenders stock,fastst --repeats 2 --out $R/encode --time-budget 230 > $R/encode.log 2>&1
  stage predict; timeout 60 $B encode --api predict --models bert-base --corpus-size 6000 --contenders stock,fastst \
    --repeats 2 --out $R/predict > $R/predict.log 2>&1
  grep -h "rep [12]/2" $R/encode.log $R/predict.log >> $R/timeline.txt
  stage profile; PROFILE_STOCK=0 OUT=$R timeout 70 python3 tests/gpu/profile_encode.py --models minilm,bert-base > $R/profile-encode.log 2>&1
  ;;
esac
done
stage done
for d in $R/*/; do [ -f $d/table.md ] && { echo "## $(basename $d)"; cat $d/table.md; }; done > $OUT/summary.txt
{ cat $R/timeline.txt; tail -n 25 $R/parity.log 2>/dev/null; tail -n 30 $R/encode_checks.log 2>/dev/null;
  grep '^{' $R/memory_checks.log 2>/dev/null; } >> $OUT/summary.txt
tar czf $OUT/acceptance.tgz -C /tmp acceptance
