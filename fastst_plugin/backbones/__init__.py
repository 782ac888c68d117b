"""Registry of supported backbone families: a description per family, one generic walker for all."""

from __future__ import annotations

from .bert import BERT
from .modernbert import MODERNBERT
from .spec import BackboneSpec

from .gemma3 import GEMMA3
from .qwen3 import QWEN3

REGISTRY: list[BackboneSpec] = [BERT, MODERNBERT, GEMMA3, QWEN3]


def base_model_of(hf_model):
    """The bare backbone (e.g. ``BertModel``) inside a task model (``BertForSequenceClassification``)."""
    base = getattr(hf_model, "base_model", None)
    return base if base is not None else hf_model


def find_spec(hf_model) -> BackboneSpec | None:
    """The family description for an HF model, or None when the architecture is not supported."""
    config = getattr(hf_model, "config", None)
    model_type = getattr(config, "model_type", None)
    for spec in REGISTRY:
        if model_type in spec.model_types:
            return spec
    return None
