"""GPU checks of the SparseEncoder (SPLADE) fast path against stock, one process, < 2 min on an H200.

    python tests/gpu/sparse_checks.py            # JSON lines to $OUT/sparse_checks.jsonl (default ./gpu-out)
    FASTST_CHECK_DEVICE=cpu python tests/gpu/sparse_checks.py   # a dry run on the CPU (tiny model, fp32)

A bert-base-sized ``BertForMaskedLM`` (random weights from ``BertConfig``, seed 0; BERT WordPiece
tokenizer, 30,522 columns) + ``SpladePooling("max")``, no downloads. Stock and fast are two copies of the
same saved folder.

1. ``forward``: bf16 weights, ``model(features)`` on 256 Debian documents and queries, max and sum
   pooling: cosine per row of ``sentence_embedding`` (min must be >= 0.999), the overlap of the
   top-64 active dimensions per row, the largest difference, the output dtype.
2. ``encode``: bf16, ``encode`` with ``convert_to_sparse_tensor`` True/False and ``max_active_dims=64``,
   ``encode_query``: cosine per row, equal shapes/layouts, whether the fast pipeline ran.
3. ``training``: fp32 weights, SpladeLoss(SparseMultipleNegativesRankingLoss) on 32 pairs, stock vs
   fast loss and parameter gradients (relative error per parameter and over all), once in fp32 (TF32
   off: must be <= 2e-3; this random-init model's saturated MNRL scores amplify fp32 rounding: the CPU tests hold
   1e-4 on a tamer model) and once under bf16 autocast (bf16 rounding differs between a padded and a
   packed forward: fast's distance from the fp32 stock gradients must be within 1.5x stock's own);
   peak memory and time of one step each (one call of the loss, no trainer: no packed columns; under
   autocast fastst's encoder runs eagerly, no CUDA graphs).
4. ``training_lora_bf16``: the sparse-like model (see 5), bf16 weights, ``enable_fast(lora=32)``, 64
   pairs, no autocast: fast step vs the same model after ``disable_fast`` (stock forward, same
   adapters): loss, gradients, time, peak memory; fast's gradient distance from an fp32 stock step of
   the same weights must be within 1.5x stock bf16's.
5. ``encode_speed``: 2,000 Debian documents (max_seq_length 256), bf16, default arguments (sparse
   COO output): stock vs fast ``encode`` (one warm-up pass each, then the best of two timed passes),
   on a "sparse-like" copy (decoder bias shifted: ~200 active dimensions per document, as a trained
   SPLADE model) at batch_size 32 and 128, and on the random (dense) model at 128. Cosine >= 0.999
   against stock bf16, or (the sparse-like rows at batch_size 32) no farther from an fp32 stock run
   than stock bf16 is.

Every record has ``ok``; a global deadline skips what is left (recorded as skipped).
"""

from __future__ import annotations

import gc
import json
import os
import sys
import tempfile
import time
import traceback

import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

OUT = os.environ.get("OUT", "gpu-out")
os.makedirs(OUT, exist_ok=True)
START = time.perf_counter()
DEADLINE_S = float(os.environ.get("FASTST_SPARSE_CHECKS_DEADLINE", "110"))
DEVICE = os.environ.get("FASTST_CHECK_DEVICE", "cuda")
DRY = DEVICE != "cuda"
DTYPE = torch.float32 if DRY else torch.bfloat16
MAX_SEQ_LENGTH = 64 if DRY else 256
TOP_K = 64


def emit(record: dict) -> None:
    record["elapsed_s"] = round(time.perf_counter() - START, 1)
    print(json.dumps(record), flush=True)
    with open(os.path.join(OUT, "sparse_checks.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


def time_left() -> float:
    return DEADLINE_S - (time.perf_counter() - START)


def sync() -> None:
    if not DRY:
        torch.cuda.synchronize()


def free() -> None:
    gc.collect()
    if not DRY:
        torch.cuda.empty_cache()


def dense(x):
    if isinstance(x, list):
        return torch.stack([dense(r) for r in x])
    return x.to_dense() if x.is_sparse else x


def compare(out: torch.Tensor, ref: torch.Tensor) -> dict:
    """Cosine per row, top-k active-dimension overlap per row, largest difference."""
    out, ref = dense(out).float(), dense(ref).float()
    cos = torch.nn.functional.cosine_similarity(out, ref, dim=-1)
    k = min(TOP_K, out.shape[-1])
    top_o, top_r = out.topk(k, dim=-1).indices, ref.topk(k, dim=-1).indices
    overlap = torch.tensor([len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(top_o, top_r)])
    return {
        "cos_min": round(float(cos.min()), 6), "cos_mean": round(float(cos.mean()), 6), "rows": int(cos.numel()),
        f"top{k}_overlap_min": round(float(overlap.min()), 4), f"top{k}_overlap_mean": round(float(overlap.mean()), 4),
        "max_abs_diff": float((out - ref).abs().max()), "active_mean": round(float((ref != 0).sum(-1).float().mean()), 1),
    }


class FastCalls:
    """Counts encode calls that went through the fast pipeline while active."""

    def __enter__(self):
        from fastst_plugin import inference

        self.inference, self.n = inference, 0
        self.original = inference._compute

        def spy(*a, **k):
            out = self.original(*a, **k)
            self.n += 1
            return out

        inference._compute = spy
        return self

    def __exit__(self, *exc):
        self.inference._compute = self.original


# --------------------------------------------------------------------------------------------- model


def save_splade(active_dims: int | None = None) -> str:
    """A saved SparseEncoder folder: random bert-base BertForMaskedLM (fp32) + SpladePooling("max").

    With random weights most of the vocabulary is active in every row (the worst case for sparse
    outputs); ``active_dims`` shifts the decoder bias so that about that many dimensions per document
    stay active, like a trained SPLADE model (a few hundred)."""
    from sentence_transformers import SparseEncoder
    from sentence_transformers.base.modules.transformer import Transformer
    from sentence_transformers.sparse_encoder.modules import SpladePooling
    from transformers import BertConfig, BertForMaskedLM

    from fastst_plugin.bench.models import write_model_folder

    size = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128) if DRY else {}
    config = BertConfig(vocab_size=30522, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        architectures=["BertForMaskedLM"], **size)
    root = tempfile.mkdtemp(prefix="fastst-sparse-checks-")
    hf_dir = os.path.join(root, "hf")
    note = write_model_folder(config, hf_dir)
    torch.manual_seed(0)
    hf = BertForMaskedLM(config)
    if active_dims is not None:
        docs, _ = texts(8)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(hf_dir)
        with torch.no_grad():
            enc = tok(docs, padding=True, truncation=True, max_length=MAX_SEQ_LENGTH, return_tensors="pt")
            logits = hf(**enc).logits.masked_fill(~enc["attention_mask"].bool()[..., None], float("-inf"))
            per_doc_max = logits.amax(1).flatten()
            shift = torch.quantile(per_doc_max[::7].float(), 1 - active_dims / config.vocab_size)
            hf.cls.predictions.bias -= shift
    hf.save_pretrained(hf_dir)
    transformer = Transformer(hf_dir, transformer_task="fill-mask", max_seq_length=MAX_SEQ_LENGTH)
    model = SparseEncoder(modules=[transformer, SpladePooling("max")], device="cpu")
    path = os.path.join(root, "splade")
    model.save_pretrained(path)
    emit({"check": "model", "layers": config.num_hidden_layers, "hidden": config.hidden_size, "vocab": config.vocab_size,
          "tokenizer": note, "max_seq_length": MAX_SEQ_LENGTH, "target_active_dims": active_dims, "ok": True})
    return path


def load(path: str, dtype, fast: bool, strategy: str = "max"):
    import fastst_plugin
    from sentence_transformers import SparseEncoder

    model = SparseEncoder(path, device=DEVICE, model_kwargs={"dtype": dtype})
    model.max_seq_length = MAX_SEQ_LENGTH
    model[1].pooling_strategy = strategy
    if fast:
        fastst_plugin.enable_fast(model)
    return model


def texts(n: int) -> tuple[list[str], list[str]]:
    from fastst_plugin.bench.data import load_pairs

    pairs = load_pairs(limit=n)
    return list(pairs.documents[:n]), list(pairs.queries[:n])


# --------------------------------------------------------------------------------------------- checks


def batch_to_device(features: dict, device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in features.items()}


def forward_check(path: str) -> None:
    docs, queries = texts(128 if not DRY else 16)
    batch = docs + queries + ["", " ".join(docs[:30])]  # an empty text; one far past max_seq_length
    for strategy in ("max", "sum"):
        stock, fast = load(path, DTYPE, False, strategy), load(path, DTYPE, True, strategy)
        stock.eval()
        fast.eval()
        results = {}
        with torch.inference_mode():
            for i in range(0, len(batch), 64):
                part = batch[i : i + 64]
                ref = stock(batch_to_device(stock.preprocess(part), DEVICE))["sentence_embedding"]
                out = fast(batch_to_device(fast.preprocess(part), DEVICE))["sentence_embedding"]
                results.setdefault("ref", []).append(ref)
                results.setdefault("out", []).append(out)
        ref, out = torch.cat(results["ref"]), torch.cat(results["out"])
        stats = compare(out, ref)
        emit({"check": "forward", "strategy": strategy, "dtype": str(DTYPE), "out_dtype": str(out.dtype),
              "ref_dtype": str(ref.dtype), **stats, "ok": stats["cos_min"] >= 0.999 and out.dtype == ref.dtype})
        del stock, fast
        free()


def encode_check(path: str) -> None:
    docs, queries = texts(300 if not DRY else 24)
    corpus = docs + ["", " ".join(docs[:30]), docs[0]]
    stock, fast = load(path, DTYPE, False), load(path, DTYPE, True)
    cases = {
        "sparse": dict(),
        "dense": dict(convert_to_sparse_tensor=False),
        "max_active_dims": dict(max_active_dims=TOP_K),
        "list": dict(convert_to_tensor=False, batch_size=16),
    }
    from sentence_transformers.util import select_max_active_dims

    fast_dense = None
    for name, kwargs in cases.items():
        ref = stock.encode(corpus, **kwargs)
        with FastCalls() as calls:
            out = fast.encode(corpus, **kwargs)
        layout_ok = type(out) is type(ref) and (isinstance(ref, list) or (out.is_sparse == ref.is_sparse and out.shape == ref.shape))
        stats = compare(out, ref)
        ok = stats["cos_min"] >= 0.999
        if name == "dense":
            fast_dense = dense(out)
        if name == "max_active_dims" and fast_dense is not None:
            # With most of the vocabulary active (random weights), bf16 near-ties make the top-k choice
            # itself differ from stock's; what must hold is stock's selection applied to fast's rows.
            ok = torch.equal(dense(out), select_max_active_dims(fast_dense, max_active_dims=TOP_K))
            stats["equals_stock_selection_of_fast_rows"] = ok
        emit({"check": "encode", "case": name, **stats, "fast_calls": calls.n, "layout_ok": layout_ok,
              "ok": ok and calls.n == 1 and layout_ok})
    stock.prompts = fast.prompts = {"query": "query: "}
    ref = stock.encode_query(queries)
    with FastCalls() as calls:
        out = fast.encode_query(queries)
    stats = compare(out, ref)
    emit({"check": "encode", "case": "encode_query_prompt", **stats, "fast_calls": calls.n,
          "ok": stats["cos_min"] >= 0.999 and calls.n == 1})
    del stock, fast
    free()


def _step(model, loss_fn, features, autocast: bool):
    model.zero_grad(set_to_none=True)
    if not DRY:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    sync()
    t = time.perf_counter()
    with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
        values = loss_fn([dict(f) for f in features], None)
        total = sum(values.values())
    total.backward()
    sync()
    elapsed = time.perf_counter() - t
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if not DRY else 0.0
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(total.detach()), grads, elapsed, peak


def training_check(path: str) -> None:
    from sentence_transformers.sparse_encoder.losses import SparseMultipleNegativesRankingLoss, SpladeLoss

    docs, queries = texts(32 if not DRY else 8)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    fp32_grads = None
    for autocast in (False, True):
        stock, fast = load(path, torch.float32, False), load(path, torch.float32, True)
        results = {}
        for name, model in (("stock", stock), ("fast", fast)):
            model.train()
            loss_fn = SpladeLoss(model, SparseMultipleNegativesRankingLoss(model), document_regularizer_weight=3e-3,
                                 query_regularizer_weight=5e-3)
            features = [model.preprocess(queries), model.preprocess(docs)]
            features = [batch_to_device(f, DEVICE) for f in features]
            _step(model, loss_fn, features, autocast)  # warm-up (kernels, autotuning)
            results[name] = _step(model, loss_fn, features, autocast)
        (ref_loss, ref, ref_t, ref_mem), (loss, got, t, mem) = results["stock"], results["fast"]
        errs = {n: float((got[n] - g).norm() / g.norm().clamp_min(1e-30)) for n, g in ref.items() if n in got}
        # key biases: zero gradient in exact arithmetic (softmax is shift-invariant), rounding noise only
        big = {n: e for n, e in errs.items() if not n.endswith("key.bias") and ref[n].norm() > 1e-6 * max(g.norm() for g in ref.values())}
        overall = float(torch.sqrt(sum(((got[n] - ref[n]) ** 2).sum() for n in ref)) / torch.sqrt(sum((g**2).sum() for g in ref.values())))
        worst = sorted(big.items(), key=lambda kv: -kv[1])[:3]
        limit = 2e-3 if not autocast else 5e-2

        def overall_vs(grads, base):
            return float(torch.sqrt(sum(((grads[n] - base[n]) ** 2).sum() for n in base)) / torch.sqrt(sum((g**2).sum() for g in base.values())))

        yardstick = {}
        if fp32_grads is None:
            fp32_grads = ref
        else:  # how far each bf16 run is from the fp32 stock gradients: fastst should be no farther than stock
            yardstick = {"stock_bf16_vs_fp32": overall_vs(ref, fp32_grads), "fast_bf16_vs_fp32": overall_vs(got, fp32_grads)}
        emit({
            **yardstick,
            "check": "training", "autocast_bf16": autocast, "loss_stock": ref_loss, "loss_fast": loss,
            "loss_rel_err": abs(loss - ref_loss) / max(abs(ref_loss), 1e-30), "grad_rel_err_overall": overall,
            "grad_rel_err_max": max(big.values()), "worst": [[n, round(e, 6)] for n, e in worst],
            "same_params": set(got) == set(ref), "step_ms_stock": round(ref_t * 1e3, 1), "step_ms_fast": round(t * 1e3, 1),
            "peak_mib_stock": round(ref_mem), "peak_mib_fast": round(mem),
            "ok": set(got) == set(ref) and overall <= limit and abs(loss - ref_loss) <= limit * max(abs(ref_loss), 1.0)
            and (not yardstick or yardstick["fast_bf16_vs_fp32"] <= 1.5 * yardstick["stock_bf16_vs_fp32"]),
        })
        del stock, fast, results, got
        free()


def training_lora_check(path: str) -> None:
    """The usual fastst training setup: bf16 weights, LoRA r=32 (enable_fast), no autocast. Stock is
    the same model after ``disable_fast`` (same adapters, stock forward). Both run one warm-up step,
    then a timed one (the fast encoder replays its CUDA graph there)."""
    import fastst_plugin
    from sentence_transformers.sparse_encoder.losses import SparseMultipleNegativesRankingLoss, SpladeLoss

    docs, queries = texts(64 if not DRY else 8)
    model = load(path, DTYPE, False)
    fastst_plugin.enable_fast(model, lora=32)
    with torch.no_grad():  # LoRA B starts at zero: give the adapters something to carry
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.01)
    model.train()
    loss_fn = SpladeLoss(model, SparseMultipleNegativesRankingLoss(model), document_regularizer_weight=3e-3,
                         query_regularizer_weight=5e-3)
    features = [batch_to_device(model.preprocess(queries), DEVICE), batch_to_device(model.preprocess(docs), DEVICE)]
    _step(model, loss_fn, features, False)
    loss, got, t, mem = _step(model, loss_fn, features, False)
    fastst_plugin.disable_fast(model)
    _step(model, loss_fn, features, False)
    ref_loss, ref, ref_t, ref_mem = _step(model, loss_fn, features, False)
    model.float()  # the same weights and adapters in fp32, stock forward: the yardstick for bf16 rounding
    _, exact, _, _ = _step(model, loss_fn, features, False)

    def distance(grads, base):
        return float(torch.sqrt(sum(((grads[n] - base[n]) ** 2).sum() for n in base)) / torch.sqrt(sum((g**2).sum() for g in base.values())))

    fast_vs, stock_vs = distance(got, exact), distance(ref, exact)
    emit({"check": "training_lora_bf16", "pairs": len(docs), "loss_stock": ref_loss, "loss_fast": loss,
          "loss_rel_err": abs(loss - ref_loss) / max(abs(ref_loss), 1e-30), "grad_rel_err_overall": distance(got, ref),
          "fast_bf16_vs_fp32": fast_vs, "stock_bf16_vs_fp32": stock_vs,
          "same_params": set(got) == set(ref), "step_ms_stock": round(ref_t * 1e3, 1), "step_ms_fast": round(t * 1e3, 1),
          "speedup": round(ref_t / t, 2), "peak_mib_stock": round(ref_mem), "peak_mib_fast": round(mem),
          "ok": set(got) == set(ref) and fast_vs <= 1.5 * stock_vs + 1e-3})
    del model, loss_fn, got, ref, exact
    free()


def encode_speed(path: str, sparse_path: str) -> None:
    docs, _ = texts(2000 if not DRY else 64)
    exact = None  # fp32 stock rows of the sparse-like model (the bf16 yardstick)
    for model_path, batch_size in ((sparse_path, 32), (sparse_path, 128), (path, 128)):
        kind = "sparse-like" if model_path == sparse_path else "random-dense"
        if time_left() < 20:
            emit({"check": "encode_speed", "model": kind, "batch_size": batch_size, "skipped": "deadline", "ok": True})
            continue
        path_ = model_path
        stock, fast = load(path_, DTYPE, False), load(path_, DTYPE, True)
        timings = {}
        for name, model in (("stock", stock), ("fast", fast)):
            model.encode(docs, batch_size=batch_size)  # warm-up (graph capture on the fast side)
            best = float("inf")
            for _ in range(2):
                sync()
                t = time.perf_counter()
                out = model.encode(docs, batch_size=batch_size)
                sync()
                best = min(best, time.perf_counter() - t)
            timings[name] = (best, out)
        stats = compare(timings["fast"][1], timings["stock"][1])
        record = {"check": "encode_speed", "model": kind, "batch_size": batch_size, "texts": len(docs), "active_mean": stats["active_mean"],
                  "stock_s": round(timings["stock"][0], 3), "fast_s": round(timings["fast"][0], 3),
                  "speedup": round(timings["stock"][0] / timings["fast"][0], 2),
                  "texts_per_s_fast": round(len(docs) / timings["fast"][0]), "cos_min": stats["cos_min"], "cos_mean": stats["cos_mean"]}
        ok = stats["cos_min"] >= 0.999
        if kind == "sparse-like":
            # Sparse rows hold few, small values: bf16 rounding flips near-zero entries on and off, so
            # the yardstick is stock's own bf16 distance from an fp32 stock run of the same texts.
            del stock
            free()
            if exact is None:
                fp32 = load(path_, torch.float32, False)
                exact = fp32.encode(docs, batch_size=64)
                del fp32
            fast_vs, stock_vs = compare(timings["fast"][1], exact), compare(timings["stock"][1], exact)
            record.update(fast_vs_fp32_cos_min=fast_vs["cos_min"], stock_vs_fp32_cos_min=stock_vs["cos_min"],
                          fast_vs_fp32_cos_mean=fast_vs["cos_mean"], stock_vs_fp32_cos_mean=stock_vs["cos_mean"])
            ok = ok or fast_vs["cos_min"] >= stock_vs["cos_min"] - 1e-3
        emit({**record, "ok": ok})
        del fast, timings
        free()


def main() -> int:
    import fastst_plugin

    emit({"check": "env", "torch": torch.__version__, "device": torch.cuda.get_device_name() if not DRY else "cpu",
          "fastst": getattr(fastst_plugin, "__version__", "?"), "ok": True})
    path = save_splade()
    sparse_path = save_splade(active_dims=200)
    failed = 0
    checks = (
        (forward_check, (path,)), (encode_check, (path,)), (training_check, (path,)),
        (training_lora_check, (sparse_path,)), (encode_speed, (path, sparse_path)),
    )
    for check, args in checks:
        if time_left() <= 5:
            emit({"check": check.__name__, "skipped": "deadline", "ok": True})
            continue
        try:
            check(*args)
        except Exception as exc:  # one failing check must not hide the others
            failed += 1
            emit({"check": check.__name__, "error": repr(exc), "traceback": traceback.format_exc()[-2000:], "ok": False})
            free()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
