"""Quality check: the same MNRL fine-tune of the real all-MiniLM-L6-v2, stock vs fastst, same seed;
retrieval NDCG@10 on the bundled Debian test subset must agree (issue: within 0.01).

    python -m fastst_plugin.bench.quality [--steps 300] [--batch-size 32] [--max-seq-length 128]

Runs on the CPU (fastst then uses its packed path on torch reference ops) or a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import time


def train_and_score(fast: bool, steps: int, batch_size: int, max_seq_length: int, device: str, seed: int = 12):
    import torch
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer import losses

    import fastst_plugin
    from fastst_plugin.demo import _ndcg, minilm_path, read_pairs, retrieval_evaluator

    here = os.path.join(os.path.dirname(fastst_plugin.__file__), "data")
    train = read_pairs(os.path.join(here, "debian-train-8000.jsonl.gz"), limit=steps * batch_size)
    test = read_pairs(os.path.join(here, "debian-test-500.jsonl.gz"))
    torch.manual_seed(seed)
    model = SentenceTransformer(minilm_path(), device=device)
    model.max_seq_length = max_seq_length
    if fast:
        fastst_plugin.enable_fast(model)
    evaluator = retrieval_evaluator(test)
    before = _ndcg(evaluator(model))
    args = SentenceTransformerTrainingArguments(
        output_dir=f"/tmp/fastst-quality-{'fast' if fast else 'stock'}", max_steps=steps,
        per_device_train_batch_size=batch_size, learning_rate=2e-5, warmup_steps=steps // 10, seed=seed,
        data_seed=seed, logging_steps=max(1, steps // 10), save_strategy="no", report_to=[], use_cpu=device == "cpu",
        dataloader_drop_last=True,
    )
    ds = Dataset.from_dict({"query": [q for q, _ in train], "document": [d for _, d in train]})
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=ds,
                                         loss=losses.MultipleNegativesRankingLoss(model))
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    after = _ndcg(evaluator(model))
    return {"contender": "fastst" if fast else "stock", "ndcg@10_before": before, "ndcg@10_after": after,
            "train_seconds": round(seconds, 1), "steps": steps, "batch_size": batch_size,
            "max_seq_length": max_seq_length, "device": device}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastst_plugin.bench.quality")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-seq-length", type=int, default=128)
    p.add_argument("--device", default="cuda" if __import__("torch").cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="write the two result lines to this JSONL file")
    a = p.parse_args(argv)
    rows = [train_and_score(fast, a.steps, a.batch_size, a.max_seq_length, a.device) for fast in (False, True)]
    for r in rows:
        print(json.dumps(r), flush=True)
    diff = abs(rows[0]["ndcg@10_after"] - rows[1]["ndcg@10_after"])
    print(f"NDCG@10 after {a.steps} steps: stock {rows[0]['ndcg@10_after']:.4f}, fastst {rows[1]['ndcg@10_after']:.4f}, "
          f"difference {diff:.4f} ({'within' if diff <= 0.01 else 'OUTSIDE'} 0.01)")
    if a.out:
        with open(a.out, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return 0 if diff <= 0.01 else 1


if __name__ == "__main__":
    raise SystemExit(main())
