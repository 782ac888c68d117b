"""Full fine-tuning on AllNLI triplets with MultipleNegativesRankingLoss, evaluated on STS-B (stock).

Plain sentence-transformers, as in its NLI example (``examples/sentence_transformer/training/nli/
training_nli_v2.py`` upstream). Its fast twin is ``examples/nli_mnrl.py``. To run *this* file
unmodified with fastst::

    FASTST=1 python examples/stock/nli_mnrl.py
    fastst run examples/stock/nli_mnrl.py

    python examples/stock/nli_mnrl.py [model_name]
"""

import logging
import sys
from datetime import datetime

from datasets import load_dataset

from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
from sentence_transformers.sentence_transformer.evaluation import EmbeddingSimilarityEvaluator, SimilarityFunction
from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
from sentence_transformers.sentence_transformer.training_args import BatchSamplers

logging.basicConfig(format="%(asctime)s - %(message)s", datefmt="%Y-%m-%d %H:%M:%S", level=logging.INFO)

model_name = sys.argv[1] if len(sys.argv) > 1 else "bert-base-uncased"
batch_size = 128  # MNRL: larger batches give more in-batch negatives
output_dir = f"models/nli-mnrl-{model_name.replace('/', '-')}-{datetime.now():%Y-%m-%d_%H-%M-%S}"

# 1. A plain transformer becomes a sentence embedding model (mean pooling)
model = SentenceTransformer(model_name)
model.max_seq_length = 75

# 2. (anchor, positive, negative) triplets from SNLI + MultiNLI; STS-B for evaluation
train_dataset = load_dataset("sentence-transformers/all-nli", "triplet", split="train")
eval_dataset = load_dataset("sentence-transformers/all-nli", "triplet", split="dev")
stsb_dev = load_dataset("sentence-transformers/stsb", split="validation")
stsb_test = load_dataset("sentence-transformers/stsb", split="test")

# 3. Loss
loss = MultipleNegativesRankingLoss(model)

# 4. Evaluator: Spearman correlation of cosine similarities with the STS-B gold scores
dev_evaluator = EmbeddingSimilarityEvaluator(
    sentences1=stsb_dev["sentence1"],
    sentences2=stsb_dev["sentence2"],
    scores=stsb_dev["score"],
    main_similarity=SimilarityFunction.COSINE,
    name="sts-dev",
)

# 5. Train
args = SentenceTransformerTrainingArguments(
    output_dir=output_dir,
    num_train_epochs=1,
    per_device_train_batch_size=batch_size,
    per_device_eval_batch_size=batch_size,
    warmup_ratio=0.1,
    bf16=True,
    batch_sampler=BatchSamplers.NO_DUPLICATES,
    eval_strategy="steps",
    eval_steps=100,
    save_strategy="steps",
    save_steps=100,
    save_total_limit=2,
    logging_steps=100,
    run_name="nli-mnrl",
)
trainer = SentenceTransformerTrainer(
    model=model,
    args=args,
    train_dataset=train_dataset,
    eval_dataset=eval_dataset,
    loss=loss,
    evaluator=dev_evaluator,
)
trainer.train()

# 6. Test on STS-B and save
test_evaluator = EmbeddingSimilarityEvaluator(
    sentences1=stsb_test["sentence1"],
    sentences2=stsb_test["sentence2"],
    scores=stsb_test["score"],
    main_similarity=SimilarityFunction.COSINE,
    name="sts-test",
)
test_evaluator(model)
model.save_pretrained(f"{output_dir}/final")
