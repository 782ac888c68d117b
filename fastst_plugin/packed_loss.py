"""One padding-free forward for every column of a loss call.

Stock losses embed their columns with one forward per column (MNRL merges the candidate columns
into one *padded* forward). ``packed_columns`` runs a single packed forward over all columns'
texts (anchor, positive, negatives…), then lets the loss's own ``model(features)`` calls return
those results, in the order it asks for them. Losses keep their code; gradients flow through the
shared forward exactly as through separate ones (tests compare them).

Not used for GradCache ("Cached…") losses, which embed mini-batches themselves, for columns
that do not come from the fast ``preprocess`` (no host pack), for prompts excluded from pooling
that differ between columns, or when the model is wrapped (DDP) — there each column runs its own
(still padding-free) forward.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any

import torch

from .packing import HOST_PACK_KEY, PACKED_KEY, HostPack, combine_host_packs

_PRECOMPUTED: contextvars.ContextVar[dict | None] = contextvars.ContextVar("fastst_precomputed", default=None)
_SIMPLE_KEYS = {"input_ids", "attention_mask", "token_type_ids", HOST_PACK_KEY, "modality", "prompt_length"}


def precomputed_output(features: dict) -> dict | None:
    table = _PRECOMPUTED.get()
    if table is None:
        return None
    return table.get(id(features))


def _can_combine(model, features_list, loss) -> bool:
    from .api import get_state

    state = get_state(model)
    if state is None or state.encoder is None or len(features_list) < 2:
        return False
    if loss is not None:
        if type(loss).__name__.startswith("Cached") or getattr(loss, "model", model) is not model:
            return False
    packs = [f.get(HOST_PACK_KEY) for f in features_list]
    if not all(isinstance(p, HostPack) and p.matches(f["input_ids"]) for p, f in zip(packs, features_list)):
        return False
    if any(set(f) - _SIMPLE_KEYS for f in features_list):
        return False
    if any(f.get("modality", "text") != "text" for f in features_list):
        return False
    prompt_lengths = {int(torch.as_tensor(f["prompt_length"]).reshape(-1)[0]) if "prompt_length" in f else 0 for f in features_list}
    if len(prompt_lengths) > 1:
        return False
    return True


def _run_combined(model, features_list):
    from .api import _find_transformer, get_state

    state = get_state(model)
    transformer = _find_transformer(model)
    device = features_list[0]["input_ids"].device
    packs = [f[HOST_PACK_KEY] for f in features_list]
    hidden, packed = state.encoder.run_host(combine_host_packs(packs), device)
    feats: dict[str, Any] = {"token_embeddings": hidden, PACKED_KEY: packed}
    if "prompt_length" in features_list[0]:
        feats["prompt_length"] = features_list[0]["prompt_length"]
    mods = list(model.children())
    for module in mods[mods.index(transformer) + 1 :]:
        feats = module(feats)
    embeddings = feats["sentence_embedding"].split([p.num_seqs for p in packs])
    token_counts = [int(p.cu_seqlens[-1]) for p in packs]
    tokens = hidden.split(token_counts)
    outputs = {}
    for f, emb, tok in zip(features_list, embeddings, tokens):
        out = dict(f)
        out["sentence_embedding"] = emb
        out["token_embeddings"] = tok
        outputs[id(f)] = out
    return outputs


@contextlib.contextmanager
def packed_columns(model, features_list: list[dict], loss=None):
    """Within the block, ``model(features_list[i])`` returns the i-th column of one shared packed forward."""
    if not _can_combine(model, features_list, loss):
        yield
        return
    table = _run_combined(model, features_list)
    token = _PRECOMPUTED.set(table)
    try:
        try:
            from sentence_transformers.base.losses.merged_forward import column_merging_disabled
        except ImportError:  # pragma: no cover - older ST without column merging
            column_merging_disabled = contextlib.nullcontext
        with column_merging_disabled():
            yield
    finally:
        _PRECOMPUTED.reset(token)
