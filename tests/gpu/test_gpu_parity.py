"""bf16 parity on the GPU for the real configurations (cosine >= 0.999, gradient relative error <= 2e-2, or
no further from an fp32 copy than stock bf16 is), through CUDA graphs, their replay, and the eager packed
path. Skipped without CUDA.

The checks run in a child process with ``TRITON_INTERPRET=0``: ``tests/conftest.py`` turns Triton's CPU
interpreter on for the kernel tests, and a GPU check run under the interpreter would test nothing real
(and the interpreter cannot run inside a CUDA graph capture).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.gpu

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(os.path.dirname(HERE))


@pytest.mark.parametrize("key", ["minilm", "bert-base", "modernbert-base", "embeddinggemma-300m", "qwen3-0.6b"])
def test_bf16_parity(key, tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), TRITON_INTERPRET="0")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "gpu_checks.py"), "parity", key],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = [json.loads(line) for line in open(tmp_path / "gpu_checks.jsonl")]
    assert rows, proc.stdout[-4000:]
    for row in rows:
        assert "error" not in row, row
        assert row["cos_min"] >= 0.999, row
        # Gradients: within 2e-2 of stock bf16, or, where stock bf16 itself is further than that
        # from fp32 (EmbeddingGemma / Qwen3 q/k-norm weights: 0.047 / 0.043 measured on an H200),
        # no further from an fp32 copy of the model than stock's own bf16 gradients are (10 % slack).
        fp32_bound = 1.1 * row.get("stock_bf16_grad_rel_err_vs_fp32_max", 0.0)
        assert row["grad_rel_err_max"] <= 2e-2 or row.get("grad_rel_err_vs_fp32_max", 1.0) <= fp32_bound, row
