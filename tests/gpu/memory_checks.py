"""GPU checks of the memory features (issue #8), bf16, real architectures with random weights.

    python tests/gpu/memory_checks.py [modes] [graph_modes] [yardstick] [peaks] [cached] [cached_exact] [cached_amp] [lora_merge] [qlora]   (default: all)

modes   every gradient checkpointing mode vs "off", four families (MiniLM, ModernBERT, EmbeddingGemma,
        Qwen3-0.6B), LoRA r=16: embedding cosine and the largest relative LoRA-gradient error, next
        to the error between two "off" runs (FlashAttention's backward accumulates with atomics, so
        two identical bf16 runs already differ in the last bits); peak memory and time per mode
graph_modes  the same with CUDA graphs on (checkpointing is captured when no dropout is active)
yardstick  bf16 "off" and "offload" against an fp32 copy (offload differs from "off" by more than
        the run-to-run noise on EmbeddingGemma, but is no further from fp32)
peaks   the #8 cell (EmbeddingGemma, 64 pairs of long documents, max_seq_length 1024): peak memory of
        one forward + backward per mode, LoRA and QLoRA (weights included, optimizer excluded)
cached  bert-base: CachedMultipleNegativesRankingLoss gradients vs MultipleNegativesRankingLoss through
        fastst (CUDA graphs on), then a few cached steps (graphs captured in both passes?)
cached_exact  bert-base LoRA with moved adapters: CachedMNRL's gradients vs MNRL's with the exact
        (default) and the merged first pass
cached_amp  the same with fp32 weights under bf16 autocast (graphs captured under autocast), and
        against stock's CachedMultipleNegativesRankingLoss under the same autocast
lora_merge  encode of a LoRA model (bert-base, Qwen3-0.6B) with the no-gradient merged LoRA forward
        (under inference mode: encode), unmerged, and through stock peft
qlora   EmbeddingGemma nf4: the fast path (fused, de-quantizing inside the LoRA node) vs peft's own
        bitsandbytes forward (enable_fast(kernels="off")), per checkpointing mode

One JSON object per line in $OUT/memory_checks.jsonl (and on stdout). Speed and memory of whole
training steps come from `fastst bench`, not from here.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import sys
import time
import traceback

import torch

OUT = os.environ.get("OUT", "gpu-out")
os.makedirs(OUT, exist_ok=True)
# FASTST_CHECK_DEVICE=cpu FASTST_CHECK_SMOKE=1: a CPU dry run of this script (tiny configs, fp32).
DEV = os.environ.get("FASTST_CHECK_DEVICE", "cuda")
SMOKE = os.environ.get("FASTST_CHECK_SMOKE") == "1"
DT = torch.bfloat16 if DEV == "cuda" else torch.float32
MODES = ("off", "layer", "selective", "offload")
CUDA = DEV == "cuda"


def _n(full, smoke):
    return smoke if SMOKE else full


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _allocated():
    return torch.cuda.memory_allocated() if CUDA else 0


def _reset_peak():
    if CUDA:
        torch.cuda.reset_peak_memory_stats()


def _peak():
    return torch.cuda.max_memory_allocated() if CUDA else 0


def _emit(record):
    line = json.dumps(record, default=str)
    print(line, flush=True)
    with open(os.path.join(OUT, "memory_checks.jsonl"), "a") as f:
        f.write(line + "\n")


def _free():
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()


def _guarded(check: str, body, **ids) -> None:
    """Run one check's ``body`` (one model's, or a whole check's): an exception becomes an error
    record instead of hiding the checks after it, and the body's models (its locals, released when
    it returns or its traceback is dropped) are freed before the next one is built."""
    try:
        body()
    except Exception as exc:
        traceback.print_exc()
        _emit({"check": check, **ids, "ok": False, "error": f"{type(exc).__name__}: {exc}"})
    finally:
        _free()


def _texts(n, long_len=None, offset=0):
    from fastst_plugin.bench.data import load_pairs, long_documents

    pairs = load_pairs(limit=offset + n)
    qs = list(pairs.queries[offset : offset + n])
    ds = long_documents(pairs, long_len, n) if long_len else list(pairs.documents[offset : offset + n])
    return qs, ds


def _build(key, max_len, *, lora_r=16, quantization=None, kernels="triton", dropout=False, cuda_graphs=False, dtype=None, **opts):
    """A bench model (real architecture, random weights) with LoRA; eager unless ``cuda_graphs``
    (checkpointed steps always run eagerly: "off" is compared eager to eager)."""
    import fastst_plugin
    from fastst_plugin.bench.models import MODELS, build_model, lora_config

    built = build_model(MODELS[key], max_seq_length=max_len, device=DEV, dtype=dtype or DT, dropout=dropout, smoke=SMOKE)
    model = built.model
    torch.manual_seed(1)
    cfg = lora_config(built.hf_model, lora_r) if lora_r else None
    fastst_plugin.enable_fast(model, lora=cfg, quantization=quantization, kernels=kernels, cuda_graphs=cuda_graphs, **opts)
    if cfg is not None:
        torch.manual_seed(2)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.02)
    model.train()
    return model


def _to_dev(features):
    return {k: (v.to(DEV, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in features.items()}


def _fwd_bwd(model, features):
    """One forward + backward of a fixed linear read-out; (embeddings, grads, peak above start, seconds)."""
    model.zero_grad(set_to_none=True)
    _sync()
    start = _allocated()
    _reset_peak()
    t0 = time.perf_counter()
    out = model(dict(features))["sentence_embedding"]
    w = torch.linspace(-1, 1, out.shape[-1], device=DEV)
    (out.float() * w).sum().backward()
    _sync()
    seconds = time.perf_counter() - t0
    peak = _peak()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.detach().float(), grads, (peak - start) / 1e9, peak / 1e9, seconds


def _errs(ref, got):
    out_r, g_r = ref[:2]
    out, g = got[:2]
    cos = torch.nn.functional.cosine_similarity(out_r, out).min().item()
    errs = sorted((((g[n] - g_r[n]).norm() / g_r[n].norm().clamp_min(1e-20)).item(), n) for n in g_r)
    missing = sorted(set(g_r) ^ set(g))
    return cos, errs[-1][0] if errs else 0.0, errs[-1][1] if errs else None, missing


def modes(keys=("minilm", "modernbert-base", "embeddinggemma-300m", "qwen3-0.6b"), cuda_graphs=False):
    import fastst_plugin

    check = "graph-modes" if cuda_graphs else "modes"
    for key in keys:
        def one(key=key):
            model = _build(key, _n(512, 64), cuda_graphs=cuda_graphs)
            qs, ds = _texts(_n(32, 4), long_len=_n(512, 64))
            features = _to_dev(model.preprocess(qs + ds))
            fastst_plugin.enable_fast(model, gradient_checkpointing="off")
            _fwd_bwd(model, features)  # warm-up (Triton compiles, autotuning)
            ref = _fwd_bwd(model, features)
            noise = _errs(ref, _fwd_bwd(model, features))
            for mode in MODES[1:]:
                fastst_plugin.enable_fast(model, gradient_checkpointing=mode)
                _fwd_bwd(model, features)
                got = _fwd_bwd(model, features)
                cos, err, worst, missing = _errs(ref, got)
                # Pass: same function (cosine), gradients within a few times the run-to-run noise
                # of "off" itself (and never beyond bf16 resolution).
                ok = cos >= 0.9999 and not missing and err <= max(4 * noise[1], 2e-3) and err <= 3e-2
                graphed = fastst_plugin.api.get_state(model).encoder.graphed
                _emit({"check": check, "model": key, "mode": mode, "ok": ok, "cos_min": cos, "grad_rel_err_max": err,
                       "graphs": sorted(k[-2] for k in graphed.graphs) if graphed else [],
                       "graphs_disabled": graphed.disabled_reason if graphed else None,
                       "worst": worst, "off_vs_off_grad_rel_err": noise[1], "missing": missing,
                       "tokens": int(features["attention_mask"].sum()),
                       "peak_gb_above_model": round(got[2], 3), "peak_gb_off": round(ref[2], 3),
                       "ms": round(got[4] * 1000, 1), "ms_off": round(ref[4] * 1000, 1)})

        _guarded(check, one, model=key)


def graph_modes():
    """``modes`` with CUDA graphs on: checkpointed steps are captured too when nothing is random."""
    modes(("minilm", "embeddinggemma-300m", "qwen3-0.6b"), cuda_graphs=True)


def yardstick(keys=("embeddinggemma-300m", "qwen3-0.6b"), modes_=("off", "offload")):
    """bf16 "off" and "offload" against the same model in fp32: is a mode's distance from "off"
    more than bf16 rounding? (H200, 2026-11-29: offload vs off 1.1e-2 on EmbeddingGemma, 5x the
    run-to-run noise, yet vs fp32 offload 0.0440 and off 0.0442; Qwen3 0.0362 vs 0.0364.)"""
    import fastst_plugin

    for key in keys:
        def one(key=key):
            model = _build(key, _n(512, 64))
            qs, ds = _texts(_n(32, 4), long_len=_n(512, 64))
            features = _to_dev(model.preprocess(qs + ds))
            got = {}
            for mode in modes_:
                fastst_plugin.enable_fast(model, gradient_checkpointing=mode)
                _fwd_bwd(model, features)
                got[mode] = _fwd_bwd(model, features)
            model.float()
            fastst_plugin.enable_fast(model, gradient_checkpointing="off")
            ref = _fwd_bwd(model, features)
            errs = {mode: _errs(ref, g) for mode, g in got.items()}
            for mode, (cos, err, worst, _missing) in errs.items():
                ok = err <= 1.05 * errs["off"][1]  # no further from fp32 than bf16 "off"
                _emit({"check": "yardstick", "model": key, "mode": mode, "ok": ok, "cos_vs_fp32": cos,
                       "grad_rel_err_vs_fp32": err, "worst": worst})

        _guarded("yardstick", one, model=key)


def peaks():
    """The #8 cell: 64 pairs of long documents at 1024, forward + backward per mode."""
    import fastst_plugin

    qs, ds = _texts(_n(64, 4), long_len=_n(1024, 64))
    for quantization, mode_list in ((None, MODES), ("4bit", ("layer", "selective", "offload"))):
        def one(quantization=quantization, mode_list=mode_list):
            model = _build("embeddinggemma-300m", _n(1024, 64), lora_r=32, quantization=quantization)
            features = _to_dev(model.preprocess(qs + ds))
            resident = _allocated() / 1e9
            for mode in mode_list:
                fastst_plugin.enable_fast(model, gradient_checkpointing=mode)
                _fwd_bwd(model, features)
                got = _fwd_bwd(model, features)
                _emit({"check": "peaks", "model": "embeddinggemma-300m", "quantization": quantization, "mode": mode,
                       "tokens": int(features["attention_mask"].sum()), "resident_gb": round(resident, 3),
                       "peak_gb_total": round(got[3], 3), "peak_gb_above_resident": round(got[2], 3),
                       "ms": round(got[4] * 1000, 1)})

        _guarded("peaks", one, quantization=quantization)


def _loss_step(model, features, loss_fn, plain, autocast=None):
    """One loss call + backward (plain losses inside ``packed_columns``, as the trainer runs them);
    (loss, fp32 parameter gradients). ``autocast``: a context to run the loss call under."""
    from fastst_plugin.packed_loss import packed_columns

    feats = [dict(f) for f in features]
    ctx = packed_columns(model, feats, loss=loss_fn) if plain else contextlib.nullcontext()
    with autocast or contextlib.nullcontext(), ctx:
        loss = loss_fn(feats, None)
    loss.backward()
    _sync()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


def _max_rel_err(grads, ref):
    return max(((grads[n] - ref[n]).norm() / ref[n].norm().clamp_min(1e-20)).item() for n in ref)


def cached():
    import fastst_plugin
    from sentence_transformers.sentence_transformer import losses

    from fastst_plugin import cached_losses

    decide = cached_losses._keep_first_mode

    def body():
        try:
            model = _build("bert-base", _n(256, 64), cuda_graphs=True)
            qs, ds = _texts(_n(256, 8))
            features = [_to_dev(model.preprocess(qs)), _to_dev(model.preprocess(ds))]

            def step(loss_fn, plain):
                return _loss_step(model, features, loss_fn, plain)

            mnrl = losses.MultipleNegativesRankingLoss(model)
            step(mnrl, True)
            ref_loss, ref = step(mnrl, True)
            _, again = step(mnrl, True)
            noise = _max_rel_err(again, ref)
            modes_seen = []
            cached_losses._keep_first_mode = lambda *a: modes_seen.append(decide(*a)) or modes_seen[-1]
            # keep: FASTST_CACHED_KEEP_FIRST ("graph" forces the first mini-batch's graph kept in the pool,
            # which "auto" picks only when the rest of the first pass is eager anyway: 1,024 pairs)
            for mbs, ckpt, keep in ((_n(32, 2), "off", "auto"), (_n(8, 1), "off", "auto"), (_n(32, 2), "layer", "auto"),
                                    (_n(32, 2), "off", "graph"), (_n(64, 2), "off", "graph")):
                os.environ["FASTST_CACHED_KEEP_FIRST"] = keep
                modes_seen.clear()
                fastst_plugin.enable_fast(model, gradient_checkpointing=ckpt)
                cm = losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=mbs)
                loss, grads = step(cm, False)
                err = _max_rel_err(grads, ref)
                times = []
                for _ in range(3):  # more steps: graphs captured for recurring buckets
                    t0 = time.perf_counter()
                    step(cm, False)
                    times.append(time.perf_counter() - t0)
                graphed = fastst_plugin.api.get_state(model).encoder.graphed
                _emit({"check": "cached", "model": "bert-base", "pairs": len(qs), "mini_batch_size": mbs, "checkpointing": ckpt,
                       "keep_first_setting": keep, "keep_first_modes": [str(m) for m in modes_seen],
                       "ok": abs(loss - ref_loss) <= 2e-2 * abs(ref_loss) and err <= max(4 * noise, 3e-2),
                       "loss_mnrl": ref_loss, "loss_cached": loss, "grad_rel_err_max": err, "mnrl_vs_mnrl_grad_rel_err": noise,
                       "graphs_captured": len(graphed.graphs) if graphed else 0,
                       "graphs_disabled": graphed.disabled_reason if graphed else None,
                       "step_ms": [round(t * 1000, 1) for t in times]})
            fastst_plugin.enable_fast(model, gradient_checkpointing="off")
        finally:
            os.environ.pop("FASTST_CACHED_KEEP_FIRST", None)
            cached_losses._keep_first_mode = decide

    _guarded("cached", body)


def cached_exact():
    """Does CachedMNRL's first pass embed with the model its replay differentiates? bert-base LoRA with
    adapters that moved (B ~ N(0, 1e-3): updates of the order of half a bf16 step of W), bf16, CUDA
    graphs on: MNRL's gradients (the reference; twice, for the run-to-run noise) against CachedMNRL
    with the exact first pass (default) and with the merged one (FASTST_LORA_MERGE_NO_GRAD=1)."""
    from sentence_transformers.sentence_transformer import losses

    def body():
        model = _build("bert-base", _n(256, 64), lora_r=32, cuda_graphs=True)
        gen = torch.Generator(device="cpu").manual_seed(0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_((torch.randn(p.shape, generator=gen) * 1e-3).to(p.dtype))
        qs, ds = _texts(_n(512, 8))
        features = [_to_dev(model.preprocess(qs)), _to_dev(model.preprocess(ds))]
        mnrl = losses.MultipleNegativesRankingLoss(model)
        _loss_step(model, features, mnrl, True)
        ref_loss, ref = _loss_step(model, features, mnrl, True)
        _, again = _loss_step(model, features, mnrl, True)
        rec = {"check": "cached_exact", "model": "bert-base", "pairs": len(qs), "loss_mnrl": ref_loss,
               "mnrl_vs_mnrl_grad_rel_err": _max_rel_err(again, ref)}
        for label, setting in (("exact", None), ("merged", "1")):
            if setting is not None:
                os.environ["FASTST_LORA_MERGE_NO_GRAD"] = setting
            try:
                cm = losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=_n(32, 2))
                _loss_step(model, features, cm, False)  # graphs captured
                loss, grads = _loss_step(model, features, cm, False)
            finally:
                os.environ.pop("FASTST_LORA_MERGE_NO_GRAD", None)
            rec[f"loss_cached_{label}"] = loss
            rec[f"{label}_vs_mnrl_grad_rel_err"] = _max_rel_err(grads, ref)
            rec[f"{label}_vs_mnrl_loss_abs_diff"] = abs(loss - ref_loss)
        rec["ok"] = rec["exact_vs_mnrl_grad_rel_err"] <= max(4 * rec["mnrl_vs_mnrl_grad_rel_err"], 3e-2)
        _emit(rec)

    _guarded("cached_exact", body)


def lora_merge():
    """No-gradient LoRA forwards fold the adapter into the weight (``kernels/lora.py``, ``merge_pays``):
    encode with adapters that moved (B random) merged, unmerged (FASTST_LORA_MERGE_NO_GRAD=0) and
    through stock peft (after ``disable_fast``), bf16, eager; cosine of each to stock. Also the
    cached first pass vs its replay: the merged first pass's embeddings vs the with-gradient ones."""
    import fastst_plugin

    for key in ("bert-base", "qwen3-0.6b"):
        def one(key=key):
            model = _build(key, 256)
            model.eval()
            qs, ds = _texts(_n(512, 8))
            seconds = {"merged": [], "unmerged": []}

            def enc(name):  # timed (eager: indicative, not the bench); the two settings alternate
                if name == "unmerged":
                    os.environ["FASTST_LORA_MERGE_NO_GRAD"] = "0"
                try:
                    _sync()
                    t0 = time.perf_counter()
                    out = model.encode(ds, batch_size=_n(256, 4), convert_to_tensor=True).float()
                    _sync()
                finally:
                    os.environ.pop("FASTST_LORA_MERGE_NO_GRAD", None)
                seconds.setdefault(name, []).append(round(time.perf_counter() - t0, 4))
                return out

            enc("merged"), enc("unmerged")  # warm-up
            seconds = {"merged": [], "unmerged": []}
            for _ in range(3):
                merged, unmerged = enc("merged"), enc("unmerged")
            fastst_plugin.disable_fast(model)
            stock = enc("stock")
            rec = {"check": "lora_merge", "model": key, "texts": len(ds), "encode_s": seconds,
                   "merged_vs_stock": cos_stats(merged, stock), "unmerged_vs_stock": cos_stats(unmerged, stock),
                   "merged_vs_unmerged": cos_stats(merged, unmerged)}
            rec["ok"] = rec["merged_vs_stock"]["min"] >= min(0.999, rec["unmerged_vs_stock"]["min"] - 1e-3)
            _emit(rec)

        _guarded("lora_merge", one, model=key)


def cos_stats(a, b):
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    return {"min": round(cos.min().item(), 6), "mean": round(cos.mean().item(), 6)}


def cached_amp():
    """fp32 weights under bf16 autocast (a trainer with ``bf16=True``), CUDA graphs on (captured under
    autocast, the default): fastst CachedMNRL vs fastst MNRL, and stock CachedMNRL (the same model
    after ``disable_fast``) under the same autocast. The backward (where GradCache replays the
    mini-batches) runs outside autocast, as in the trainer."""
    import fastst_plugin
    from sentence_transformers.sentence_transformer import losses

    def body():
        model = _build("bert-base", _n(256, 64), cuda_graphs=True, dtype=torch.float32)
        qs, ds = _texts(_n(256, 8))
        features = [_to_dev(model.preprocess(qs)), _to_dev(model.preprocess(ds))]

        def step(loss_fn, plain):
            amp = torch.autocast(DEV, dtype=torch.bfloat16) if CUDA else None
            return _loss_step(model, features, loss_fn, plain, autocast=amp)

        err = _max_rel_err

        mnrl = losses.MultipleNegativesRankingLoss(model)
        step(mnrl, True)
        ref_loss, ref = step(mnrl, True)
        _, again = step(mnrl, True)
        noise = err(again, ref)
        mbs = _n(32, 2)
        cm = losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=mbs)
        step(cm, False)  # first cached step: graphs captured for its buckets
        loss, grads = step(cm, False)
        graphed = fastst_plugin.api.get_state(model).encoder.graphed
        record = {"check": "cached_amp", "model": "bert-base", "weights": "fp32", "autocast": "bf16" if CUDA else "off",
                  "pairs": len(qs), "mini_batch_size": mbs, "loss_mnrl": ref_loss, "loss_cached": loss,
                  "grad_rel_err_max": err(grads, ref), "mnrl_vs_mnrl_grad_rel_err": noise,
                  "graphs_captured": len(graphed.graphs) if graphed else 0,
                  "graphs_disabled": graphed.disabled_reason if graphed else None}
        fastst_plugin.disable_fast(model)
        stock_loss, stock = step(losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=mbs), False)
        record.update({"loss_stock_cached": stock_loss, "fast_vs_stock_cached_grad_rel_err": err(grads, stock),
                       "stock_cached_vs_fast_mnrl_grad_rel_err": err(stock, ref)})
        record["ok"] = (abs(loss - ref_loss) <= 2e-2 * abs(ref_loss) and abs(loss - stock_loss) <= 2e-2 * abs(stock_loss)
                        and record["grad_rel_err_max"] <= max(4 * noise, 3e-2)
                        and record["fast_vs_stock_cached_grad_rel_err"] <= max(4 * noise, 3e-2))
        _emit(record)

    _guarded("cached_amp", body)


def qlora():
    import fastst_plugin

    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:
        _emit({"check": "qlora", "ok": False, "error": f"bitsandbytes not importable: {exc!r}"})
        return
    def body():
        qs, ds = _texts(_n(16, 4), long_len=_n(256, 64))
        ref_model = _build("embeddinggemma-300m", _n(256, 64), quantization="4bit", kernels="off")
        features = _to_dev(ref_model.preprocess(qs + ds))
        ref = _fwd_bwd(ref_model, features)
        ref_model = None
        _free()
        model = _build("embeddinggemma-300m", _n(256, 64), quantization="4bit")
        for mode in MODES:
            fastst_plugin.enable_fast(model, gradient_checkpointing=mode)
            _fwd_bwd(model, features)
            got = _fwd_bwd(model, features)
            cos, err, worst, missing = _errs(ref, got)
            _emit({"check": "qlora", "model": "embeddinggemma-300m", "mode": mode, "ok": cos >= 0.999 and err <= 5e-2 and not missing,
                   "cos_min_vs_peft": cos, "grad_rel_err_max_vs_peft": err, "worst": worst, "missing": missing,
                   "peak_gb_above_model": round(got[2], 3), "ms": round(got[4] * 1000, 1), "ms_peft": round(ref[4] * 1000, 1)})

    _guarded("qlora", body)


if __name__ == "__main__":
    todo = sys.argv[1:] or ["modes", "graph_modes", "yardstick", "peaks", "cached", "qlora"]
    for name in todo:
        t0 = time.time()
        globals()[name]()
        print(f"[memory_checks] {name}: {time.time() - t0:.1f}s", file=sys.stderr, flush=True)
