"""Sequence-classification heads (CrossEncoder ``scores``) on packed rows, described as data.

A CrossEncoder's ``Transformer`` module wraps an HF ``*ForSequenceClassification`` model: the backbone
(run padding-free by :class:`~fastst_plugin.backbones.encoder.PackedEncoder`) plus a small head that
reads one vector per sequence. A :class:`HeadSpec` says, per architecture, how that vector is pooled
from the packed hidden states (the first token, or the mean over the sequence) and which of the task
model's own modules follow (linear layers, activations, norms, dropout), in order. Like the backbone
specs, nothing is copied: the head calls the model's own modules at every step (so peft LoRA layers,
``modules_to_save`` wrappers and quantized layers keep working and state-dict keys stay the same).

Pooling mirrors stock exactly: stock reads ``hidden[:, 0]`` of the padded batch, which is the first
real token only with right padding; :func:`first_token_is_position_zero` lets the caller keep
left-padded batches on the stock forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

# A head is a sequence of steps: a dotted path calls the task model's module there (linear layers,
# norms, activation modules, dropout modules: stock's own objects, so their flags and probabilities
# are stock's too); "tanh" applies torch.tanh where stock calls the function rather than a module.
TANH = "tanh"


@dataclass(frozen=True)
class HeadSpec:
    name: str
    architectures: tuple[str, ...]  # HF class names (type(model).__name__) this head describes
    pooling: Callable  # config -> "first" | "mean"
    steps: tuple[str, ...]
    output: str = "logits"  # the HF output the head replaces (ST's method_output_name)


# BertForSequenceClassification: pooler (dense + tanh on the first token) -> dropout -> classifier.
BERT_HEAD = HeadSpec(
    name="bert-pooler",
    architectures=("BertForSequenceClassification",),
    pooling=lambda config: "first",
    steps=("bert.pooler.dense", "bert.pooler.activation", "dropout", "classifier"),
)

# RobertaClassificationHead (RoBERTa, XLM-R, CamemBERT): first token -> dropout -> dense -> tanh ->
# dropout -> out_proj. peft may wrap ``classifier`` (modules_to_save): see ``_resolve_step``.
ROBERTA_HEAD = HeadSpec(
    name="roberta-classification-head",
    architectures=(
        "RobertaForSequenceClassification",
        "XLMRobertaForSequenceClassification",
        "CamembertForSequenceClassification",
    ),
    pooling=lambda config: "first",
    steps=("classifier.dropout", "classifier.dense", TANH, "classifier.dropout", "classifier.out_proj"),
)


def _modernbert_pooling(config) -> str:
    mode = getattr(config, "classifier_pooling", "cls")
    if mode == "cls":
        return "first"
    if mode == "mean":
        return "mean"
    raise ValueError(f"ModernBERT classifier_pooling={mode!r} has no packed implementation")


# ModernBertForSequenceClassification: cls or mean pooling -> head (dense -> act -> LayerNorm) ->
# dropout -> classifier.
MODERNBERT_HEAD = HeadSpec(
    name="modernbert-prediction-head",
    architectures=("ModernBertForSequenceClassification",),
    pooling=_modernbert_pooling,
    steps=("head.dense", "head.act", "head.norm", "drop", "classifier"),
)

HEADS: list[HeadSpec] = [BERT_HEAD, ROBERTA_HEAD, MODERNBERT_HEAD]


def find_head(hf_model) -> HeadSpec | None:
    """The head description for an HF task model, or None (that model's head then runs stock)."""
    model = _unwrap_peft(hf_model)
    name = type(model).__name__
    for spec in HEADS:
        if name in spec.architectures:
            try:
                spec.pooling(model.config)
                for step in spec.steps:
                    if step != TANH:
                        _resolve_step(model, step)
            except (AttributeError, ValueError, IndexError, KeyError):
                return None  # a variant of the class without the modules we expect: stay stock
            return spec
    return None


def _unwrap_peft(hf_model):
    """The transformers model under a peft ``PeftModel`` wrapper (fastst applies LoRA in place, but a
    user may hand us a PeftModel)."""
    get_base = getattr(hf_model, "get_base_model", None)
    return get_base() if callable(get_base) else hf_model


def _resolve_step(root, path: str):
    """``resolve`` that looks through peft's ``ModulesToSaveWrapper``: ``classifier.dense`` under a
    wrapped ``classifier`` is the active copy's ``dense`` (the one that trains)."""
    obj = root
    parts = path.split(".")
    for i, part in enumerate(parts):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
        if i < len(parts) - 1 and type(obj).__name__ == "ModulesToSaveWrapper":
            active = getattr(obj, "active_adapters", None) or getattr(obj, "active_adapter", None)
            if isinstance(active, (list, tuple)):
                active = active[0] if active else None
            copies = getattr(obj, "modules_to_save", {})
            use_copy = active in copies and not getattr(obj, "disable_adapters", False)
            obj = copies[active] if use_copy else obj.original_module
    return obj


def first_token_is_position_zero(hp) -> bool:
    """True when every sequence's first real token sits at column 0 of the caller's padded batch
    (right padding): then stock's ``hidden[:, 0]`` is that token and the packed head is exact."""
    n, length = hp.orig_shape
    if n == 0:
        return True
    starts = hp.orig_index.index_select(0, hp.cu_seqlens[:-1].long().clamp(max=max(hp.orig_index.numel() - 1, 0)))
    return bool(torch.equal(starts, torch.arange(n, dtype=starts.dtype) * length)) and bool((hp.lengths > 0).all())


class PackedHead:
    """``head(hidden [T, H], packed) -> logits [N, num_labels]`` with the task model's own modules."""

    def __init__(self, hf_model, spec: HeadSpec):
        self.hf_model = hf_model
        self.spec = spec

    def pool(self, hidden: torch.Tensor, p) -> torch.Tensor:
        mode = self.spec.pooling(self.hf_model.config)
        if mode == "first":
            return hidden.index_select(0, p.cu_seqlens[:-1].long())
        # mean over the real tokens, as stock's masked sum / mask count (accumulated in fp32 for half types)
        acc = torch.float32 if hidden.dtype in (torch.float16, torch.bfloat16) else hidden.dtype
        sums = torch.zeros(p.num_seqs, hidden.shape[-1], device=hidden.device, dtype=acc).index_add_(0, p.seq_idx, hidden.to(acc))
        return (sums / p.lengths.to(device=hidden.device, dtype=acc).clamp(min=1)[:, None]).to(hidden.dtype)

    def __call__(self, hidden: torch.Tensor, p) -> torch.Tensor:
        # Modules are resolved per call (a handful of getattr): peft may wrap them after install.
        model = _unwrap_peft(self.hf_model)
        x = self.pool(hidden, p)
        for step in self.spec.steps:
            x = torch.tanh(x) if step == TANH else _resolve_step(model, step)(x)
        return x
