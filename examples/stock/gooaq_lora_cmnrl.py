"""LoRA fine-tuning of bert-base-uncased on GooAQ with CachedMultipleNegativesRankingLoss and NanoBEIR (stock).

Plain sentence-transformers + peft, as in sentence-transformers' PEFT example
(``examples/sentence_transformer/training/peft/training_gooaq_lora.py`` upstream). Its fast twin is
``examples/gooaq_lora_cmnrl.py``. To run *this* file unmodified with fastst::

    FASTST=1 python examples/stock/gooaq_lora_cmnrl.py
    fastst run examples/stock/gooaq_lora_cmnrl.py

Note: with transformers >= 5.2x and peft 0.21, ``model.add_adapter`` raises "The version of PEFT you
are using is not compatible" when this runs stock; under fastst it goes through.

    python examples/stock/gooaq_lora_cmnrl.py [model_name]
"""

import logging
import sys
import traceback

from datasets import Dataset, load_dataset
from peft import LoraConfig, TaskType

from sentence_transformers import (
    SentenceTransformer,
    SentenceTransformerModelCardData,
    SentenceTransformerTrainer,
    SentenceTransformerTrainingArguments,
)
from sentence_transformers.sentence_transformer.evaluation import NanoBEIREvaluator
from sentence_transformers.sentence_transformer.losses import CachedMultipleNegativesRankingLoss
from sentence_transformers.sentence_transformer.training_args import BatchSamplers

logging.basicConfig(format="%(asctime)s - %(message)s", datefmt="%Y-%m-%d %H:%M:%S", level=logging.INFO)

model_name = sys.argv[1] if len(sys.argv) > 1 else "bert-base-uncased"
short_name = model_name.split("/")[-1]
run_name = f"{short_name}-gooaq-lora"

# 1. The model, with a LoRA adapter
model = SentenceTransformer(
    model_name,
    model_card_data=SentenceTransformerModelCardData(
        language="en",
        license="apache-2.0",
        model_name=f"{short_name} LoRA adapter fine-tuned on GooAQ pairs",
    ),
)
peft_config = LoraConfig(task_type=TaskType.FEATURE_EXTRACTION, inference_mode=False, r=64, lora_alpha=128, lora_dropout=0.1)
model.add_adapter(peft_config)

# 2. GooAQ (question, answer) pairs
dataset = load_dataset("sentence-transformers/gooaq", split="train")
splits = dataset.train_test_split(test_size=10_000, seed=12)
train_dataset: Dataset = splits["train"].select(range(1_000_000))
eval_dataset: Dataset = splits["test"]

# 3. In-batch negatives over a large batch, computed in mini-batches (GradCache)
loss = CachedMultipleNegativesRankingLoss(model, mini_batch_size=32)

# 4. Training arguments
args = SentenceTransformerTrainingArguments(
    output_dir=f"models/{run_name}",
    num_train_epochs=1,
    per_device_train_batch_size=1024,
    per_device_eval_batch_size=1024,
    learning_rate=2e-5,
    warmup_ratio=0.1,
    bf16=True,
    batch_sampler=BatchSamplers.NO_DUPLICATES,
    eval_strategy="steps",
    eval_steps=100,
    save_strategy="steps",
    save_steps=100,
    save_total_limit=2,
    logging_steps=25,
    logging_first_step=True,
    run_name=run_name,
)

# 5. NanoBEIR before training
evaluator = NanoBEIREvaluator()
evaluator(model)

# 6. Train
trainer = SentenceTransformerTrainer(
    model=model,
    args=args,
    train_dataset=train_dataset,
    eval_dataset=eval_dataset,
    loss=loss,
    evaluator=evaluator,
)
trainer.train()

# 7. NanoBEIR after training, then save the adapter folder (reloads with SentenceTransformer(path))
evaluator(model)
final_dir = f"models/{run_name}/final"
model.save_pretrained(final_dir)

try:
    model.push_to_hub(run_name)
except Exception:
    logging.error(f"Could not push to the Hub:\n{traceback.format_exc()}The model is saved in {final_dir!r}.")
