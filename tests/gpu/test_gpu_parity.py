"""bf16 parity on the GPU for the real configurations (cosine >= 0.999, gradient relative error <= 2e-2),
through CUDA graphs, their replay, and the eager packed path. Skipped without CUDA."""

from __future__ import annotations

import json
import os
import sys

import pytest

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("key", ["minilm", "bert-base", "modernbert-base", "embeddinggemma-300m", "qwen3-0.6b"])
def test_bf16_parity(key, tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path))
    sys.path.insert(0, os.path.dirname(__file__))
    import gpu_checks

    monkeypatch.setattr(gpu_checks, "OUT", str(tmp_path))
    gpu_checks.parity(key)
    rows = [json.loads(line) for line in open(tmp_path / "gpu_checks.jsonl")]
    for row in rows:
        assert row["cos_min"] >= 0.999, row
        assert row["grad_rel_err_max"] <= 2e-2, row
