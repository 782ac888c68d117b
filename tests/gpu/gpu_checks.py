"""GPU checks for the fast path (run through the device tool; writes JSON lines to $OUT or ./gpu-out).

    python tests/gpu/gpu_checks.py parity [models...]      bf16 embeddings + gradients vs stock
    python tests/gpu/gpu_checks.py lora [models...]        LoRA (adapters moved) bf16 embeddings + gradients vs stock peft,
                                                           graphed and eager, and after a frozen weight is written in place
    python tests/gpu/gpu_checks.py amp [models...]         fp32 weights under bf16 autocast, graphs and eager vs stock
    python tests/gpu/gpu_checks.py loss [models...]        bf16 and fp32 MNRL loss + gradients through packed_columns (one
                                                           packed forward, one-node pooling / Normalize / cos_sim) vs stock

Speed and memory come from `fastst bench`, not from here.
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


def _probe_step(model, texts, zero=True):
    """One forward + backward of a fixed linear read-out of the embeddings: (embeddings, grads)."""
    if zero:
        model.zero_grad(set_to_none=True)
    feats = model.preprocess(texts)
    feats = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in feats.items()}
    out = model(feats)["sentence_embedding"]
    w = torch.linspace(-1, 1, out.shape[-1], device=DEVICE, dtype=out.dtype)
    (out.float() * w).sum().backward()
    return out.detach().float(), _grads(model)


def parity(key, dtype=torch.bfloat16):
    import fastst_plugin
    from fastst_plugin.bench.models import MODELS, build_model

    built = build_model(MODELS[key], max_seq_length=256, device=DEVICE, dtype=dtype, dropout=False)
    m = built.model
    m.train()
    qs, ds = _texts(32)
    texts = qs + ds

    def run(model=m, zero=True):
        return _probe_step(model, texts, zero)

    ref, gref = run()
    # An fp32 copy of the same weights, run stock: the yardstick for how far bf16 itself moves the
    # gradients (stock bf16 vs fp32), so that a bf16-vs-bf16 gap can be told from a real error.
    import copy

    m32 = copy.deepcopy(m).float()
    ref32, gref32 = run(m32)
    del m32
    stock_vs_fp32 = _rel_errs(gref, gref32)
    fastst_plugin.enable_fast(m)
    # graphs: captured steps write .grad directly (default); graphs-accumulate: a second backward
    # without zero_grad (its .grad halved must equal one step's); graphs-edges: one autograd edge per
    # parameter (FASTST_GRAPH_GRADS=edges, the DDP path).
    for variant in ("graphs", "graphs-replay", "graphs-accumulate", "graphs-edges", "eager"):
        if variant == "eager":
            fastst_plugin.enable_fast(m, cuda_graphs=False)
        os.environ["FASTST_GRAPH_GRADS"] = "edges" if variant == "graphs-edges" else "direct"
        out, g = run()
        if variant == "graphs-accumulate":
            out, g = run(zero=False)
            g = {n: v / 2 for n, v in g.items()}
        _compare(key, dtype, variant, m, ref, gref, out, g, gref32=gref32, stock_vs_fp32=stock_vs_fp32)
    os.environ.pop("FASTST_GRAPH_GRADS", None)
    del m, built
    _empty()


def parity_lora(key, dtype=torch.bfloat16):
    """LoRA r=16 (adapters moved: B random) bf16 embeddings + LoRA gradients vs stock peft (the same model
    after ``disable_fast``), graphed (capture, replay) and eager, with stock on an fp32 copy as the
    yardstick for how far bf16 moves the gradients; then a frozen base weight written in
    place between steps: the graphs (which read a cached concatenation of the frozen Q/K/V weights) must
    follow it, as stock does."""
    import fastst_plugin
    from fastst_plugin.bench.models import MODELS, build_model, lora_config

    built = build_model(MODELS[key], max_seq_length=256, device=DEVICE, dtype=dtype, dropout=False)
    m = built.model
    m.train()
    qs, ds = _texts(32)
    texts = qs + ds
    fastst_plugin.enable_fast(m, lora=lora_config(built.hf_model, 16))
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)

    def run():
        return _probe_step(m, texts)

    def stock_then_fast(variants, yardstick=False):
        fastst_plugin.disable_fast(m)
        ref, gref = run()
        gref32 = stock_vs_fp32 = None
        if yardstick:  # stock on an fp32 copy: how far bf16 itself moves the LoRA gradients
            import copy

            m32 = copy.deepcopy(m).float()
            _, gref32 = _probe_step(m32, texts)
            del m32
            stock_vs_fp32 = _rel_errs(gref, gref32)
        for variant in variants:
            fastst_plugin.enable_fast(m, cuda_graphs=variant != "eager")
            out, g = run()
            if variant == "graphs-capture":
                out, g = run()  # the replay
            _compare(key, dtype, variant, m, ref, gref, out, g, gref32=gref32, stock_vs_fp32=stock_vs_fp32)

    stock_then_fast(("graphs-capture", "eager"), yardstick=True)
    frozen = next(p for n, p in m.named_parameters() if not p.requires_grad and n.endswith("base_layer.weight"))
    fastst_plugin.enable_fast(m)
    run()
    run()  # graphs captured and replayed with the old weight
    with torch.no_grad():
        frozen.mul_(1.5)
    stock_then_fast(("graphs-after-frozen-write",))
    del m, built
    _empty()


def parity_loss(key, dtype=torch.bfloat16):
    """The training loss as the trainer computes it: MultipleNegativesRankingLoss on 32 pairs, stock
    vs fastst inside ``packed_columns`` (both columns in one packed forward; pooling, ``Normalize`` and
    the loss's cos_sim one autograd node each), full fine-tuning gradients, an fp32 stock copy as the
    yardstick. Variants: graph capture, replay, eager, and the loss's own cos_sim (FASTST_FUSED_SIMILARITY=0)."""
    import copy

    import fastst_plugin
    from fastst_plugin.bench.models import MODELS, build_model
    from fastst_plugin.packed_loss import packed_columns
    from sentence_transformers import losses

    built = build_model(MODELS[key], max_seq_length=256, device=DEVICE, dtype=dtype, dropout=False)
    m = built.model
    m.train()
    for p in m.parameters():
        p.requires_grad_(True)
    qs, ds = _texts(32)

    def run(model, fast=False, zero=True):
        if zero:
            model.zero_grad(set_to_none=True)
        loss_fn = losses.MultipleNegativesRankingLoss(model)
        feats = []
        for texts in (qs, ds):
            f = model.preprocess(texts)
            feats.append({k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in f.items()})
        if fast:
            with packed_columns(model, feats, loss=loss_fn):
                loss = loss_fn(feats, None)
        else:
            loss = loss_fn(feats, None)
        loss.backward()
        return loss.detach().float().reshape(1), _grads(model)

    ref, gref = run(m)
    m32 = copy.deepcopy(m).float()
    ref32, gref32 = run(m32)
    del m32
    stock_vs_fp32 = _rel_errs(gref, gref32)
    fastst_plugin.enable_fast(m)
    for variant in ("graphs", "graphs-replay", "no-fused-similarity", "eager"):
        if variant == "eager":
            fastst_plugin.enable_fast(m, cuda_graphs=False)
        if variant == "no-fused-similarity":
            os.environ["FASTST_FUSED_SIMILARITY"] = "0"
        out, g = run(m, fast=True)
        os.environ.pop("FASTST_FUSED_SIMILARITY", None)
        named = _rel_errs(g, gref)
        fast_vs_fp32 = _rel_errs(g, gref32)
        enc = fastst_plugin.api.get_state(m).encoder
        _emit({"check": "loss", "variant": variant, "model": key, "dtype": str(dtype),
               "loss_stock": ref.item(), "loss_fast": out.item(), "loss_fp32": ref32.item(),
               "loss_abs_diff": abs(out.item() - ref.item()), "stock_loss_abs_diff_vs_fp32": abs(ref.item() - ref32.item()),
               "grad_rel_err_max": named[-1][0], "grad_rel_err_median": named[len(named) // 2][0], "worst": named[-2:],
               "grad_rel_err_vs_fp32_max": fast_vs_fp32[-1][0], "stock_bf16_grad_rel_err_vs_fp32_max": stock_vs_fp32[-1][0],
               "graphs_captured": len(enc.graphed.graphs) if enc.graphed else 0})
    del m, built
    _empty()


def parity_amp(key):
    """fp32 weights under bf16 autocast (a trainer with ``bf16=True``): fastst with CUDA graphs (captured
    under autocast, weight cache off) and eagerly, against stock under the same autocast."""
    import fastst_plugin
    from fastst_plugin.bench.models import MODELS, build_model

    built = build_model(MODELS[key], max_seq_length=256, device=DEVICE, dtype=torch.float32, dropout=False)
    m = built.model
    m.train()
    qs, ds = _texts(32)
    texts = qs + ds

    def run(model=m):
        model.zero_grad(set_to_none=True)
        feats = model.preprocess(texts)
        feats = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in feats.items()}
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(feats)["sentence_embedding"]
        w = torch.linspace(-1, 1, out.shape[-1], device=DEVICE, dtype=torch.float32)
        (out.float() * w).sum().backward()
        return out.detach().float(), _grads(model)

    ref, gref = run()
    fastst_plugin.enable_fast(m)
    for variant in ("amp-graphs", "amp-graphs-replay", "amp-eager"):
        if variant == "amp-eager":
            fastst_plugin.enable_fast(m, cuda_graphs=False)
        out, g = run()
        _compare(key, "amp-bf16", variant, m, ref, gref, out, g)
    del m, built
    _empty()


def _rel_errs(g, gref):
    """Sorted (relative error, name) per parameter gradient. Attention key biases get a mathematically
    zero gradient (softmax is shift-invariant): skipped."""
    return sorted((((g[n] - gref[n]).norm() / (gref[n].norm() + 1e-20)).item(), n) for n in gref
                  if not (n.endswith("key.bias") or n.endswith("k_proj.bias")))


def _compare(key, dtype, variant, m, ref, gref, out, g, gref32=None, stock_vs_fp32=None):
    import fastst_plugin

    cos = torch.nn.functional.cosine_similarity(ref, out).min().item()
    named = _rel_errs(g, gref)
    errs = [e for e, _ in named]
    extra = {}
    if gref32 is not None:
        fast_vs_fp32 = _rel_errs(g, gref32)
        extra = {"grad_rel_err_vs_fp32_max": fast_vs_fp32[-1][0], "stock_bf16_grad_rel_err_vs_fp32_max": stock_vs_fp32[-1][0],
                 "worst_vs_fp32": fast_vs_fp32[-2:], "stock_worst_vs_fp32": stock_vs_fp32[-2:]}
    enc = fastst_plugin.api.get_state(m).encoder
    graphed = enc.graphed
    _emit({"check": "parity", "variant": variant, "model": key, "dtype": str(dtype), "cos_min": cos, "grad_rel_err_max": errs[-1],
           "grad_rel_err_median": errs[len(errs) // 2], "n_grads": len(errs), "worst": named[-3:],
           "graphs_captured": len(graphed.graphs) if graphed else 0,
           "graphs_disabled": graphed.disabled_reason if graphed else None,
           "backend": fastst_plugin.api.get_state(m).backend, **extra})


if __name__ == "__main__":
    what = sys.argv[1]
    models = sys.argv[2:] or ["minilm", "bert-base", "modernbert-base", "embeddinggemma-300m", "qwen3-0.6b"]
    for key in models:
        try:
            if what == "parity":
                parity(key)
            elif what == "lora":
                parity_lora(key)
            elif what == "amp":
                parity_amp(key)
            elif what == "loss":  # bf16 (the yardstick says how far bf16 moves things) and fp32 (tight)
                parity_loss(key)
                parity_loss(key, torch.float32)
        except Exception as e:  # keep going: one model's failure must not hide the others
            import traceback

            traceback.print_exc()
            _emit({"check": what, "model": key, "error": f"{type(e).__name__}: {e}"})
