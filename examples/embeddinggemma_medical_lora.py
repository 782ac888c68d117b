"""LoRA fine-tuning of EmbeddingGemma-300m for medical retrieval, with GPU memory tracking (fast twin).

The fast twin of ``examples/stock/embeddinggemma_medical_lora.py`` (the EmbeddingGemma fine-tuning
recipe people copy: medical question -> passage pairs, CachedMultipleNegativesRankingLoss, an
InformationRetrievalEvaluator over held-out passages, peak GPU memory printed at the end). The code is
the same except the lines marked ``# fastst``: ``enable_fast(model, lora=peft_config)`` where the stock
script calls ``model.add_adapter(peft_config)``. To make the stock script fast without editing it::

    FASTST=1 python examples/stock/embeddinggemma_medical_lora.py
    fastst run examples/stock/embeddinggemma_medical_lora.py

QLoRA: ``enable_fast(model, lora=peft_config, quantization="4bit")`` (bitsandbytes). EmbeddingGemma
overflows in fp16: keep bf16. The dataset defaults to the MIRIAD medical QA split used in the
EmbeddingGemma announcement; any dataset with (question, passage) columns works (--dataset, --columns).

    python examples/embeddinggemma_medical_lora.py --max-steps 500
"""

import argparse
import logging
import time

import torch
from datasets import load_dataset
from peft import LoraConfig

from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator
from sentence_transformers.sentence_transformer.losses import CachedMultipleNegativesRankingLoss
from sentence_transformers.sentence_transformer.training_args import BatchSamplers

from fastst_plugin import enable_fast  # fastst

logging.basicConfig(format="%(asctime)s - %(message)s", datefmt="%Y-%m-%d %H:%M:%S", level=logging.INFO)

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default="google/embeddinggemma-300m")
parser.add_argument("--dataset", default="tomaarsen/miriad-4.4M-split")
parser.add_argument("--columns", nargs=2, default=["question", "passage_text"], metavar=("QUERY", "PASSAGE"))
parser.add_argument("--train-rows", type=int, default=100_000)
parser.add_argument("--eval-rows", type=int, default=1_000)
parser.add_argument("--max-steps", type=int, default=-1, help="default: one epoch")
parser.add_argument("--batch-size", type=int, default=128)
parser.add_argument("--max-seq-length", type=int, default=512)
parser.add_argument("--output", default="models/embeddinggemma-300m-medical-lora")
args = parser.parse_args()
query_column, passage_column = args.columns

# 1. EmbeddingGemma in bf16, with a LoRA adapter on every attention and MLP projection
model = SentenceTransformer(args.model, model_kwargs={"dtype": torch.bfloat16})
model.max_seq_length = args.max_seq_length
peft_config = LoraConfig(
    r=32,
    lora_alpha=32,
    lora_dropout=0.0,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
)
enable_fast(model, lora=peft_config)  # fastst

# 2. (question, passage) pairs
train_dataset = load_dataset(args.dataset, split="train").select(range(args.train_rows))
train_dataset = train_dataset.select_columns([query_column, passage_column])
eval_rows = load_dataset(args.dataset, split="eval").select(range(args.eval_rows))

# 3. Retrieval evaluation: each held-out question must find its own passage among all held-out passages
evaluator = InformationRetrievalEvaluator(
    queries={str(i): q for i, q in enumerate(eval_rows[query_column])},
    corpus={str(i): p for i, p in enumerate(eval_rows[passage_column])},
    relevant_docs={str(i): {str(i)} for i in range(len(eval_rows))},
    name="medical",
    query_prompt_name="query",
    corpus_prompt_name="document",
    batch_size=64,
)
print("before:", {k: round(v, 4) for k, v in evaluator(model).items() if k.endswith("ndcg@10")})

# 4. Train: GradCache over a large batch; EmbeddingGemma's query/document prompts per column
loss = CachedMultipleNegativesRankingLoss(model, mini_batch_size=32)
training_args = SentenceTransformerTrainingArguments(
    output_dir=args.output,
    num_train_epochs=1,
    max_steps=args.max_steps,
    per_device_train_batch_size=args.batch_size,
    learning_rate=2e-4,
    warmup_ratio=0.05,
    bf16=True,
    batch_sampler=BatchSamplers.NO_DUPLICATES,
    prompts={query_column: model.prompts["query"], passage_column: model.prompts["document"]},
    eval_strategy="steps",
    eval_steps=250,
    logging_steps=25,
    save_strategy="steps",
    save_steps=250,
    save_total_limit=2,
    report_to="none",
)
trainer = SentenceTransformerTrainer(
    model=model, args=training_args, train_dataset=train_dataset, loss=loss, evaluator=evaluator
)
if torch.cuda.is_available():
    torch.cuda.reset_peak_memory_stats()
    start_reserved = torch.cuda.memory_reserved() / 2**30
start = time.perf_counter()
trainer.train()
seconds = time.perf_counter() - start

# 5. Results and memory
print("after:", {k: round(v, 4) for k, v in evaluator(model).items() if k.endswith("ndcg@10")})
print(f"training took {seconds / 60:.1f} min")
if torch.cuda.is_available():
    peak_allocated = torch.cuda.max_memory_allocated() / 2**30
    peak_reserved = torch.cuda.max_memory_reserved() / 2**30
    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    print(f"GPU memory: {start_reserved:.2f} GiB reserved before training, peak {peak_allocated:.2f} GiB allocated / "
          f"{peak_reserved:.2f} GiB reserved for training ({peak_reserved / total:.0%} of {total:.0f} GiB)")
model.save_pretrained(f"{args.output}/final")
