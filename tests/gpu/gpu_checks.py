"""GPU checks for the fast path (run through the device tool; writes JSON lines to $OUT or ./gpu-out).

    python tests/gpu/gpu_checks.py parity [models...]      bf16 embeddings + gradients vs stock
    python tests/gpu/gpu_checks.py speed  [models...]      quick LoRA MNRL step A/B (the real numbers come from `fastst bench`)
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import torch

OUT = os.environ.get("OUT", "gpu-out")
DEVICE = os.environ.get("FASTST_CHECK_DEVICE", "cuda")
os.makedirs(OUT, exist_ok=True)


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _reset_peak():
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()


def _peak():
    return torch.cuda.max_memory_allocated() if DEVICE == "cuda" else 0


def _empty():
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def _emit(record):
    print(json.dumps(record), flush=True)
    with open(os.path.join(OUT, "gpu_checks.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


def _texts(n, offset=0):
    from fastst_plugin.bench.data import load_pairs

    pairs = load_pairs(limit=offset + n)
    qs = list(pairs.queries[offset : offset + n])
    ds = list(pairs.documents[offset : offset + n])
    return qs, ds


def _grads(model):
    return {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}


def parity(key, dtype=torch.bfloat16):
    import fastst_plugin
    from fastst_plugin.bench.models import MODELS, build_model

    built = build_model(MODELS[key], max_seq_length=256, device=DEVICE, dtype=dtype, dropout=False)
    m = built.model
    m.train()
    qs, ds = _texts(32)
    texts = qs + ds

    def run():
        m.zero_grad(set_to_none=True)
        feats = m.preprocess(texts)
        feats = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in feats.items()}
        out = m(feats)["sentence_embedding"]
        w = torch.linspace(-1, 1, out.shape[-1], device=DEVICE, dtype=out.dtype)
        (out.float() * w).sum().backward()
        return out.detach().float(), _grads(m)

    ref, gref = run()
    fastst_plugin.enable_fast(m)
    out, g = run()
    cos = torch.nn.functional.cosine_similarity(ref, out).min().item()
    # Attention key biases get a mathematically zero gradient (softmax is shift-invariant): skip them.
    named = sorted((((g[n] - gref[n]).norm() / (gref[n].norm() + 1e-20)).item(), n) for n in gref
                   if not (n.endswith("key.bias") or n.endswith("k_proj.bias")))
    errs = [e for e, _ in named]
    _emit({"check": "parity", "model": key, "dtype": str(dtype), "cos_min": cos, "grad_rel_err_max": errs[-1],
           "grad_rel_err_median": errs[len(errs) // 2], "n_grads": len(errs), "worst": named[-3:],
           "backend": fastst_plugin.api.get_state(m).backend})
    del m, built
    _empty()


def speed(key, mode="lora", max_len=256, pairs=64, steps=10, reps=3):
    import fastst_plugin
    from fastst_plugin.bench.models import MODELS, apply_lora_stock, build_model, lora_config
    from fastst_plugin.packed_loss import packed_columns
    from sentence_transformers import losses

    contenders = {}
    for name in ("stock", "fastst"):
        built = build_model(MODELS[key], max_seq_length=max_len, device=DEVICE, dtype=torch.bfloat16, seed=0)
        m = built.model
        cfg = lora_config(built.hf_model, 32)
        if name == "stock":
            if mode == "lora":
                apply_lora_stock(built.hf_model, cfg)
        else:
            fastst_plugin.enable_fast(m, lora=cfg if mode == "lora" else None)
        m.train()
        loss = losses.MultipleNegativesRankingLoss(m)
        params = [p for p in m.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-5)
        batches = []
        for i in range(4):
            qs, ds = _texts(pairs, offset=i * pairs)
            fq, fd = m.preprocess(qs), m.preprocess(ds)
            batches.append([{k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in f.items()} for f in (fq, fd)])
        real = [sum(int(f["attention_mask"].sum()) for f in b) for b in batches]
        padded = [sum(f["attention_mask"].numel() for f in b) for b in batches]
        contenders[name] = dict(model=m, loss=loss, opt=opt, batches=batches, real=real, padded=padded, times=[], peak=0, losses=[])

    def step(c, i):
        feats = c["batches"][i % len(c["batches"])]
        if c is contenders["fastst"]:
            with packed_columns(c["model"], feats, c["loss"]):
                l = c["loss"](feats, None)
        else:
            l = c["loss"](feats, None)
        l.backward()
        c["opt"].step()
        c["opt"].zero_grad(set_to_none=True)
        return l

    for c in contenders.values():
        for i in range(3):
            step(c, i)
    _sync()
    for r in range(reps):
        for name, c in contenders.items():
            _reset_peak()
            _sync()
            t0 = time.perf_counter()
            for i in range(steps):
                l = step(c, i)
            _sync()
            c["times"].append((time.perf_counter() - t0) / steps)
            c["peak"] = max(c["peak"], _peak())
            c["losses"].append(float(l))
    base = None
    for name, c in contenders.items():
        ms = statistics.median(c["times"]) * 1e3
        real_tok = statistics.mean(c["real"])
        rec = {"check": "speed", "model": key, "mode": mode, "max_len": max_len, "pairs": pairs, "contender": name,
               "step_ms": ms, "real_tok_per_s": real_tok / (ms / 1e3), "pad_frac": 1 - sum(c["real"]) / sum(c["padded"]),
               "peak_gb": c["peak"] / 2**30, "last_loss": c["losses"][-1]}
        if base is None:
            base = rec["real_tok_per_s"]
        rec["speedup"] = rec["real_tok_per_s"] / base
        _emit(rec)
    contenders.clear()
    _empty()


if __name__ == "__main__":
    what = sys.argv[1]
    models = sys.argv[2:] or ["minilm", "bert-base", "modernbert-base", "embeddinggemma-300m", "qwen3-0.6b"]
    for key in models:
        try:
            if what == "parity":
                parity(key)
            elif what.startswith("speed"):
                mode = "full" if what == "speed-full" else "lora"
                speed(key, mode=mode)
        except Exception as e:  # keep going: one model's failure must not hide the others
            import traceback

            traceback.print_exc()
            _emit({"check": what, "model": key, "error": f"{type(e).__name__}: {e}"})
