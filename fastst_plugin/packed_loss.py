"""One padding-free forward for every column of a loss call.

Stock losses embed their columns with one forward per column (MNRL merges the candidate columns
into one *padded* forward). ``packed_columns`` runs a single packed forward over all columns'
texts (anchor, positive, negatives…), then lets the loss's own ``model(features)`` calls return
those results, in the order it asks for them. Losses keep their code; gradients flow through the
shared forward exactly as through separate ones (tests compare them).

Not used for GradCache ("Cached…") losses, which embed mini-batches themselves, for columns
that do not come from the fast ``preprocess`` (no host pack), for prompts excluded from pooling
that differ between columns, or for wrappers other than DistributedDataParallel — there each column
runs its own (still padding-free) forward.

Under DDP (the trainer hands the loss a ``DistributedDataParallel`` wrapper) the shared forward is
called *through* the wrapper, so that DDP does its per-forward bookkeeping for it (buffer broadcast,
``prepare_for_backward``, the unused-parameter search from its outputs); the loss's own per-column
calls then pass through DDP too, as in stock, and get the shared results. DDP copies the features
dict it is given (moving inputs to the device), so the results are looked up by the column's host
pack, which DDP passes through untouched, not by the dict's identity.
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
    # Keyed by the host pack (DDP hands the model a copy of the features dict, with the same host
    # pack and input_ids objects in it); the input_ids check refuses a dict that only carries the
    # pack along with other rows (a loss slicing a column).
    entry = table.get(id(features.get(HOST_PACK_KEY)))
    if entry is None or features.get("input_ids") is not entry[0]:
        return None
    return entry[1]


def _ddp_inner(model):
    """The module inside a ``DistributedDataParallel`` wrapper, else ``model`` itself."""
    ddp = getattr(torch.nn.parallel, "DistributedDataParallel", None)
    if ddp is not None and isinstance(model, ddp):
        return model.module
    return model


def _can_combine(model, features_list, loss) -> bool:
    from .api import _find_transformer, get_state

    inner = _ddp_inner(model)
    state = get_state(inner)
    if state is None or state.encoder is None or len(features_list) < 2:
        return False
    if _find_transformer(inner) is None:
        return False  # another wrapper (torch.compile...) around the model: its modules are not ours to run
    if loss is not None:
        # The trainer puts its DDP wrapper into the loss only after collecting the features of the
        # first step: compare what is inside the wrappers.
        if type(loss).__name__.startswith("Cached") or _ddp_inner(getattr(loss, "model", model)) is not inner:
            return False
    packs = [f.get(HOST_PACK_KEY) for f in features_list]
    if not all(isinstance(p, HostPack) and p.matches(f["input_ids"]) for p, f in zip(packs, features_list)):
        return False
    if len({id(p) for p in packs}) != len(packs):
        return False  # one column twice: results are looked up by host pack
    if any(set(f) - _SIMPLE_KEYS for f in features_list):
        return False
    if any(f.get("modality", "text") != "text" for f in features_list):
        return False
    prompt_lengths = {int(torch.as_tensor(f["prompt_length"]).reshape(-1)[0]) if "prompt_length" in f else 0 for f in features_list}
    if len(prompt_lengths) > 1:
        return False
    return True


def _forward_combined(model, features_list) -> dict[str, Any]:
    """One packed forward over all columns: ``token_embeddings`` [T, H] and ``sentence_embedding``."""
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
    return feats


_MISSING = object()


def _forward_through(wrapper, inner, fn):
    """Call ``wrapper`` (DDP) with ``fn()`` standing in for ``inner``'s forward for this one call.

    DDP's pre/post-forward work is what a backward through its module needs (without it the
    reducer ignores the gradients: no all-reduce). The stand-in is an instance attribute, restored
    exactly afterwards (the model's own forward may itself be an instance patch).
    """
    previous = inner.__dict__.get("forward", _MISSING)
    inner.__dict__["forward"] = lambda *_args, **_kwargs: fn()
    try:
        # One positional input: DDP moves and rebuilds its inputs, and refuses an empty call.
        return wrapper({"fastst_packed_columns": 1})
    finally:
        if previous is _MISSING:
            inner.__dict__.pop("forward", None)
        else:
            inner.__dict__["forward"] = previous


def _run_combined(model, features_list):
    inner = _ddp_inner(model)
    if inner is model:
        feats = _forward_combined(model, features_list)
    else:
        feats = _forward_through(model, inner, lambda: _forward_combined(inner, features_list))
    packs = [f[HOST_PACK_KEY] for f in features_list]
    embeddings = feats["sentence_embedding"].split([p.num_seqs for p in packs])
    token_counts = [int(p.cu_seqlens[-1]) for p in packs]
    tokens = feats["token_embeddings"].split(token_counts)
    outputs = {}
    for f, emb, tok in zip(features_list, embeddings, tokens):
        out = dict(f)
        out["sentence_embedding"] = emb
        out["token_embeddings"] = tok
        outputs[id(f[HOST_PACK_KEY])] = (f["input_ids"], out)
    return outputs


@contextlib.contextmanager
def packed_columns(model, features_list: list[dict], loss=None):
    """Within the block, ``model(features_list[i])`` returns the i-th column of one shared packed
    forward, and the loss's cosine similarity is one autograd node
    (:func:`fastst_plugin.similarity.fused_similarity`, for every loss call of a fast model)."""
    from .similarity import fused_similarity

    with fused_similarity(loss), _shared_forward(model, features_list, loss):
        yield


@contextlib.contextmanager
def _shared_forward(model, features_list: list[dict], loss):
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
