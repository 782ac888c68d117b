"""CPU smoke test of the benchmark harness (``fastst bench``): tiny configs, two steps, so the harness
never rots. It checks that the results, table and chart are produced and that the contenders compute
the same thing; it measures nothing."""

from __future__ import annotations

import json
import math
import os

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sentence_transformers")

from fastst_plugin.bench import main  # noqa: E402
from fastst_plugin.bench import flat, measure  # noqa: E402

# one warm-up + one timed step per contender; fastst on its torch reference ops (fast on the CPU)
SMOKE = ["--smoke", "--device", "cpu", "--steps", "1", "--warmup", "1", "--repeats", "1", "--no-dropout", "--fastst-opt", "kernels=torch"]


def _records(out_dir):
    with open(os.path.join(out_dir, "results.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if r["record"] == "env"], [r for r in rows if r["record"] == "result"]


def _check_outputs(out_dir, contenders):
    envs, results = _records(out_dir)
    assert len(envs) == 1 and envs[0]["versions"]["torch"]
    assert [r["contender"] for r in results] == contenders
    table = open(os.path.join(out_dir, "table.md")).read()
    for col in ("real tok/s", "vs stock", "vs flat", "MFU %", "peak alloc GB", "pad %", "GPU busy %", "step ms"):
        assert col in table
    for c in contenders:
        assert f"| {c} |" in table
    with open(os.path.join(out_dir, "chart.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    return {r["contender"]: r for r in results}


@pytest.fixture(scope="module")
def train_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("bench-train"))
    rc = main(["train", *SMOKE, "--models", "minilm", "--contenders", "stock,flat,unsloth,fastst", "--out", out])
    assert rc == 0
    return out


def test_train_smoke(train_run):
    by = _check_outputs(train_run, ["stock", "flat", "unsloth", "fastst"])
    for name in ("stock", "flat"):
        r = by[name]
        assert r["status"] == "ok", r.get("error")
        assert r["tokens_per_s"] > 0 and r["pairs_per_s"] > 0 and r["step_ms"] > 0
        assert r["real_tokens_per_step"] > 0 and r["flops_per_step"] > 0
        assert math.isfinite(r["loss_first"]) and math.isfinite(r["loss_final"])
    assert by["stock"]["speedup_vs_stock"] == 1.0
    assert by["stock"]["pad_fraction"] > 0  # MNRL's padded forward
    assert by["flat"]["pad_fraction"] == 0.0  # ST's flattened features
    assert by["flat"]["flat_backend"].startswith("CPU reference")
    # same weights, same batch, no dropout: the flattened path computes the same first loss
    assert by["flat"]["loss_first"] == pytest.approx(by["stock"]["loss_first"], abs=1e-4)
    # Unsloth is not installed in CI: reported, not crashed
    assert by["unsloth"]["status"] in ("ok", "unavailable", "failed")
    # fastst may be incomplete while it is developed: then it is recorded as failed, never a crash
    fast = by["fastst"]
    assert fast["status"] in ("ok", "failed", "unavailable")
    if fast["status"] == "ok":
        assert fast["loss_first"] == pytest.approx(by["stock"]["loss_first"], abs=1e-3)
    else:
        assert fast["error"]


def test_report_merges_runs(train_run, tmp_path):
    merged = str(tmp_path / "merged")
    assert main(["report", "--out", merged, "--inputs", train_run]) == 0
    _, results = _records(merged)
    assert len(results) == 4
    assert os.path.exists(os.path.join(merged, "chart.png"))


def test_encode_smoke(tmp_path):
    # Qwen3 (tiny): causal attention, left padding, last-token pooling; the flattened path must agree
    out = str(tmp_path / "enc")
    rc = main(["encode", *SMOKE, "--models", "qwen3-0.6b", "--contenders", "stock,flat,fastst", "--corpus-size", "8", "--out", out])
    assert rc == 0
    by = _check_outputs(out, ["stock", "flat", "fastst"])
    assert by["stock"]["status"] == "ok" and by["flat"]["status"] == "ok", (by["stock"].get("error"), by["flat"].get("error"))
    assert by["flat"]["agreement"] > 0.9999  # mean cosine to stock's embeddings
    assert by["fastst"]["status"] in ("ok", "failed", "unavailable")


def test_sparse_encode_smoke(tmp_path):
    # SparseEncoder (SPLADE): the tiny BertForMaskedLM + SpladePooling, decoder bias shifted for ~200
    # active dims; Qwen3 has no masked-LM head: its cell is skipped and says why
    out = str(tmp_path / "sparse")
    rc = main(["encode", *SMOKE, "--api", "sparse-encode", "--models", "minilm,qwen3-0.6b", "--contenders", "stock,flat,fastst",
               "--corpus-size", "8", "--out", out])
    assert rc == 0
    _, results = _records(out)
    mini = {r["contender"]: r for r in results if r["model"] == "minilm"}
    assert list(mini) == ["stock", "flat", "fastst"]
    for name in ("stock", "fastst"):
        r = mini[name]
        assert r["status"] == "ok", (r.get("error"), r.get("traceback"))
        assert r["api"] == "sparse-encode" and r["tokens_per_s"] > 0 and r["flops_per_step"] > 0
        assert 20 < r["active_dims_mean"] < 2000  # the bias shift left a SPLADE-like number, not ~30k
        assert any("bias shifted" in n for n in r["notes"])
    assert mini["stock"]["agreement"] == 1.0
    assert mini["fastst"]["agreement"] > 0.999  # mean cosine of the dense rows to stock's
    assert "packed" in mini["fastst"]["fastst_backend"]
    assert mini["flat"]["status"] == "unavailable" and "SparseEncoder" in mini["flat"]["error"]
    qwen = [r for r in results if r["model"] == "qwen3-0.6b"]
    assert len(qwen) == 3 and all(r["status"] == "skipped" and "masked-LM" in r["error"] for r in qwen)
    table = open(os.path.join(out, "table.md")).read()
    assert "| minilm | 32 | sparse-encode | fastst |" in table and "cos=" in table
    # --sparse-active-dims 0: the random weights as they are (nearly the whole vocabulary active)
    dense_out = str(tmp_path / "sparse-random")
    rc = main(["encode", *SMOKE, "--api", "sparse-encode", "--sparse-active-dims", "0", "--models", "minilm",
               "--contenders", "stock", "--corpus-size", "4", "--out", dense_out])
    assert rc == 0
    (r,) = _records(dense_out)[1]
    assert r["status"] == "ok" and r["active_dims_mean"] > 10 * mini["stock"]["active_dims_mean"]
    assert any("no bias shift" in n for n in r["notes"])


def test_time_budget_and_position_limit(tmp_path):
    out = str(tmp_path / "skip")
    rc = main(["train", *SMOKE, "--models", "minilm", "--max-seq-length", "1024", "--contenders", "stock", "--out", out])
    assert rc == 0
    _, results = _records(out)
    assert results[0]["status"] == "skipped" and "max_position_embeddings" in results[0]["error"]


# ------------------------------------------------------------------------------ the varlen adapter


def _fake_varlen(new_api: bool):
    """Stand-ins for torch.nn.attention.varlen.varlen_attn's two signatures, computed by the reference."""

    if new_api:

        def varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1), enable_gqa=False):
            if k.shape[1] != q.shape[1]:
                assert enable_gqa
            causal = window_size[1] == 0
            window = None if window_size[0] < 0 else (window_size[0], -1 if causal else window_size[1])
            return flat._reference_varlen(q, k, v, cu_q, cu_k, scale, causal, window)

    else:

        def varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=False, return_aux=None):
            assert k.shape[1] == q.shape[1], "the old kernel has no GQA: heads must be repeated"
            return flat._reference_varlen(q, k, v, cu_q, cu_k, None, is_causal, None)

    return varlen_attn


@pytest.mark.parametrize("new_api", [True, False])
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_adapter_matches_reference(monkeypatch, new_api, causal):
    torch.manual_seed(0)
    lens = [5, 9, 3]
    cu = torch.tensor([0, 5, 14, 17], dtype=torch.int32)
    hq, hk, d = 4, 2, 8
    q, k, v = torch.randn(17, hq, d), torch.randn(17, hk, d), torch.randn(17, hk, d)
    scale = 0.3
    monkeypatch.setattr(flat, "_varlen_impl", lambda: _fake_varlen(new_api))
    window = None if not new_api else (2, 0 if causal else 2)
    got = flat._cuda_varlen(q, k, v, cu, cu, max(lens), max(lens), scale, causal, window)
    want = flat._reference_varlen(q, k, v, cu, cu, scale, causal, window)
    assert torch.allclose(got, want, atol=1e-5)


def test_reference_varlen_equals_padded_sdpa():
    torch.manual_seed(1)
    q = torch.randn(7, 2, 4)
    k = torch.randn(7, 2, 4)
    v = torch.randn(7, 2, 4)
    cu = torch.tensor([0, 3, 7])
    out = flat._reference_varlen(q, k, v, cu, cu, None, False, None)
    for a, b in ((0, 3), (3, 7)):
        ref = torch.nn.functional.scaled_dot_product_attention(
            q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1)
        ).transpose(0, 1)
        assert torch.allclose(out[a:b], ref, atol=1e-6)


def test_flop_helpers():
    assert measure.attention_pairs(10, False, None) == 100
    assert measure.attention_pairs(10, True, None) == 55
    assert measure.attention_pairs(10, False, 2) == 10 + 2 * (2 * 10 - 3)
    assert measure.attention_pairs(4, False, 8) == 16  # window wider than the sequence
    assert measure.union_ms([(0, 10), (5, 20), (30, 40)]) == pytest.approx(0.03)
    full = measure.step_flops(workload="train", mode="full", n_lin=10, lora_rank_sum=0, tokens=2, attn_fwd=1.0)
    lora = measure.step_flops(workload="train", mode="lora", n_lin=10, lora_rank_sum=1, tokens=2, attn_fwd=1.0)
    enc = measure.step_flops(workload="encode", mode="inference", n_lin=10, lora_rank_sum=0, tokens=2, attn_fwd=1.0)
    assert (full, lora, enc) == (123.0, 95.0, 41.0)


def test_contender_with_environment(tmp_path):
    """``fastst+NAME=value`` A/B-interleaves a switch against the default in one process: the setting
    holds while that contender builds and steps, and is gone afterwards."""
    from fastst_plugin.bench.contenders import Run, parse_contender

    assert parse_contender("fastst+FASTST_FUSED_SIMILARITY=0+FASTST_CUDA_GRAPHS=1") == (
        "fastst", {"FASTST_FUSED_SIMILARITY": "0", "FASTST_CUDA_GRAPHS": "1"})
    for bad in ("fastest", "fastst+lower=1", "fastst+NOVALUE", "unsloth+A=1"):
        with pytest.raises(ValueError):
            parse_contender(bad)
    with pytest.raises(SystemExit, match="expected NAME=value"):
        main(["train", *SMOKE, "--models", "minilm", "--contenders", "fastst+x", "--out", str(tmp_path / "bad")])

    run = Run("fastst+FASTST_BENCH_PROBE=on")
    assert run.kind == "fastst" and "FASTST_BENCH_PROBE" not in os.environ
    with run.env_ctx():
        assert os.environ["FASTST_BENCH_PROBE"] == "on"
    assert "FASTST_BENCH_PROBE" not in os.environ

    out = str(tmp_path / "env")
    names = ["fastst", "fastst+FASTST_FUSED_SIMILARITY=0"]
    rc = main(["train", *SMOKE, "--models", "minilm", "--contenders", ",".join(names), "--out", out])
    assert rc == 0 and "FASTST_FUSED_SIMILARITY" not in os.environ
    by = _check_outputs(out, names)
    assert all(by[n]["status"] == "ok" for n in names), [by[n].get("error") for n in names]
    assert by[names[1]]["loss_first"] == pytest.approx(by["fastst"]["loss_first"], rel=1e-5)


def test_oom_beside_others_is_timed_alone(tmp_path, monkeypatch):
    """A contender that runs out of memory while timed beside another (on an 80 GB card the fast
    model's graph pool can take what stock's cache held) is rebuilt and timed alone, not lost."""
    from fastst_plugin.bench import runner

    first = {}
    real_step = runner.train_step

    def step(run, *args, **kwargs):
        if run.kind == "stock" and first.setdefault("run", run) is run and run.step_index >= 1:
            raise RuntimeError("CUDA out of memory. Tried to allocate 192.00 MiB (simulated)")
        return real_step(run, *args, **kwargs)

    monkeypatch.setattr(runner, "train_step", step)
    out = str(tmp_path / "oom")
    assert main(["train", *SMOKE, "--models", "minilm", "--contenders", "stock,fastst", "--out", out]) == 0
    by = _check_outputs(out, ["stock", "fastst"])
    assert by["stock"]["status"] == "ok" and by["fastst"]["status"] == "ok"
    assert any("timed alone" in n for n in by["stock"]["notes"])
    assert by["fastst"]["speedup_vs_stock"] is not None


def test_freed_contenders_release_their_models(tmp_path, monkeypatch):
    """After a contender is freed nothing of the harness keeps its model alive: on a GPU a fast
    model's CUDA-graph pool (27 GB for EmbeddingGemma at 1,024 tokens) would otherwise stay taken
    and the next contender of the cell run out of memory."""
    import gc
    import weakref

    from fastst_plugin.bench.contenders import Run

    alive_after_free = {}
    real_free = Run.free

    def free(self):
        ref = weakref.ref(self.built.model) if self.built is not None else None
        real_free(self)  # the Run itself stays alive (the cell's record is written later)
        if ref is not None:
            gc.collect()
            alive_after_free[self.name] = ref() is not None

    monkeypatch.setattr(Run, "free", free)
    assert main(["train", *SMOKE, "--models", "minilm", "--contenders", "stock,fastst", "--out", str(tmp_path)]) == 0
    assert alive_after_free == {"stock": False, "fastst": False}
