"""A CrossEncoder reranker trained on GooAQ with mined hard negatives and BinaryCrossEntropyLoss (stock).

Plain sentence-transformers, as in its reranker example (``examples/cross_encoder/training/rerankers/
training_gooaq_bce.py`` upstream). Its fast twin is ``examples/reranker_gooaq_bce.py``. To run *this*
file unmodified with fastst::

    FASTST=1 python examples/stock/reranker_gooaq_bce.py
    fastst run examples/stock/reranker_gooaq_bce.py

    python examples/stock/reranker_gooaq_bce.py [model_name]
"""

import logging
import sys
import traceback

import torch
from datasets import load_dataset

from sentence_transformers import SentenceTransformer
from sentence_transformers.cross_encoder import (
    CrossEncoder,
    CrossEncoderModelCardData,
    CrossEncoderTrainer,
    CrossEncoderTrainingArguments,
)
from sentence_transformers.cross_encoder.evaluation import CrossEncoderNanoBEIREvaluator
from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss
from sentence_transformers.util import mine_hard_negatives

logging.basicConfig(format="%(asctime)s - %(message)s", datefmt="%Y-%m-%d %H:%M:%S", level=logging.INFO)

model_name = sys.argv[1] if len(sys.argv) > 1 else "answerdotai/ModernBERT-base"
short_name = model_name.split("/")[-1]
run_name = f"reranker-{short_name}-gooaq-bce"
num_hard_negatives = 5

# 1. A fresh reranker: the backbone plus a one-logit classification head
model = CrossEncoder(
    model_name,
    num_labels=1,
    model_card_data=CrossEncoderModelCardData(language="en", license="apache-2.0", model_name=f"{short_name} GooAQ reranker"),
)

# 2. GooAQ (question, answer) pairs; hard negatives mined with a fast static embedding model
dataset = load_dataset("sentence-transformers/gooaq", split="train").select(range(100_000))
splits = dataset.train_test_split(test_size=1_000, seed=12)
train_dataset, eval_dataset = splits["train"], splits["test"]
embedding_model = SentenceTransformer("sentence-transformers/static-retrieval-mrl-en-v1", device="cpu")
train_dataset = mine_hard_negatives(
    train_dataset,
    embedding_model,
    num_negatives=num_hard_negatives,
    margin=0,
    range_min=0,
    range_max=100,
    sampling_strategy="top",
    batch_size=4096,
    output_format="labeled-pair",
    use_faiss=False,
)

# 3. Loss: positives are outnumbered num_hard_negatives to 1
loss = BinaryCrossEntropyLoss(model=model, pos_weight=torch.tensor(num_hard_negatives))

# 4. Evaluator: reranking NanoBEIR's BM25 candidates
evaluator = CrossEncoderNanoBEIREvaluator(dataset_names=["msmarco", "nfcorpus", "nq"], batch_size=64)
evaluator(model)

# 5. Train
args = CrossEncoderTrainingArguments(
    output_dir=f"models/{run_name}",
    num_train_epochs=1,
    per_device_train_batch_size=64,
    per_device_eval_batch_size=64,
    learning_rate=2e-5,
    warmup_ratio=0.1,
    bf16=True,
    dataloader_num_workers=4,
    load_best_model_at_end=True,
    metric_for_best_model="eval_NanoBEIR_R100_mean_ndcg@10",
    eval_strategy="steps",
    eval_steps=500,
    save_strategy="steps",
    save_steps=500,
    save_total_limit=2,
    logging_steps=100,
    logging_first_step=True,
    run_name=run_name,
    seed=12,
)
trainer = CrossEncoderTrainer(model=model, args=args, train_dataset=train_dataset, loss=loss, evaluator=evaluator)
trainer.train()

# 6. Evaluate the best checkpoint and save
evaluator(model)
final_dir = f"models/{run_name}/final"
model.save_pretrained(final_dir)
try:
    model.push_to_hub(run_name)
except Exception:
    logging.error(f"Could not push to the Hub:\n{traceback.format_exc()}The model is saved in {final_dir!r}.")
