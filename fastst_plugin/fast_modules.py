"""Installs the padding-free forward on a model's ``Transformer`` and ``Pooling`` modules.

Instance patches only (recorded in the model's PatchSet, reverted by ``disable_fast``):

* ``Transformer.preprocess``: after stock tokenization, attach a :class:`~fastst_plugin.packing.HostPack`
  computed on the CPU, so the forward never asks the GPU for lengths.
* ``Transformer.forward``: text features go through the :class:`PackedEncoder`; the packed hidden
  states ``[T, H]`` and the PackedBatch are stored in the features. Anything the fast path does not
  cover (other modalities, ``inputs_embeds``, hidden-state outputs, extra kwargs) runs stock code.
* ``Pooling.forward``: pools packed rows directly. If a module that reads token embeddings and is
  not known to us follows the Transformer, the token embeddings are re-padded for it instead.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any

import torch

from .packing import HOST_PACK_KEY, PACKED_KEY, HostPack, host_pack, pack_features
from .pooling import SUPPORTED_MODES, packed_pool, pooling_modes

_STOCK_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar("fastst_stock_only", default=False)


@contextlib.contextmanager
def stock_forward():
    """Within this block fast models run their stock forward (used where stock output layouts are needed)."""
    token = _STOCK_ONLY.set(True)
    try:
        yield
    finally:
        _STOCK_ONLY.reset(token)


def _modules_after(model, transformer):
    mods = list(model.children())
    return mods[mods.index(transformer) + 1 :] if transformer in mods else []


def _pooling_class():
    try:
        from sentence_transformers.sentence_transformer.modules import Pooling
    except ImportError:  # pragma: no cover
        from sentence_transformers.models import Pooling
    return Pooling


def _safe_followers():
    """Modules that only read ``sentence_embedding`` (or nothing token-level) after pooling."""
    names = {"Dense", "Normalize", "Dropout", "LayerNorm"}
    return names


def install_stock_extras(model, transformer, state) -> None:
    """kernels='off' or unsupported family: nothing to patch in the forward (LoRA / checkpointing only)."""
    mode = state.options.gradient_checkpointing
    if mode != "off" and transformer is not None:
        # training._hf_checkpointing speaks both transformers' gradient_checkpointing_* and the newer
        # activation_checkpointing_* names.
        from .training import _hf_checkpointing

        hf = transformer.model
        was_on = bool(getattr(hf, "is_gradient_checkpointing", False) or getattr(hf, "is_activation_checkpointing", False))
        if _hf_checkpointing(transformer, True) and not was_on:
            state.patches.on_revert(lambda: _hf_checkpointing(transformer, False))


def install(model, transformer, spec, state) -> None:
    from .backbones.encoder import PackedEncoder

    encoder = PackedEncoder(transformer.model, spec, state)
    encoder.max_seq_length = transformer.max_seq_length
    state.encoder = encoder
    patches = state.patches
    Pooling = _pooling_class()
    followers = _modules_after(model, transformer)
    pooling = followers[0] if followers and isinstance(followers[0], Pooling) else None
    packed_pooling = (
        pooling is not None
        and all(m in SUPPORTED_MODES for m in pooling_modes(pooling))
        and all(type(m).__name__ in _safe_followers() for m in followers[1:])
    )
    output_name = getattr(transformer, "module_output_name", "token_embeddings")
    if output_name != "token_embeddings":
        # CrossEncoder / SparseEncoder heads read the model's own task outputs: keep them stock for now.
        from .log import warn_once

        warn_once(
            f"{type(model).__name__}: the padding-free forward covers embedding models; this model's "
            f"'{output_name}' head runs stock (LoRA and checkpointing still apply)"
        )
        install_stock_extras(model, transformer, state)
        state.backend = "stock forward (task head)"
        return

    stock_forward_fn = transformer.forward
    stock_preprocess = transformer.preprocess

    def preprocess(inputs, *args, **kwargs):
        features = stock_preprocess(inputs, *args, **kwargs)
        ids, mask = features.get("input_ids"), features.get("attention_mask")
        if (
            isinstance(ids, torch.Tensor) and isinstance(mask, torch.Tensor)
            and ids.device.type == "cpu" and ids.dim() == 2 and state.options.packing
        ):
            features[HOST_PACK_KEY] = host_pack(ids, mask, features.get("token_type_ids"))
        return features

    def forward(features: dict[str, Any], **kwargs):
        if (
            kwargs
            or _STOCK_ONLY.get()
            or not state.options.packing
            or features.get("modality", "text") != "text"
            or not isinstance(features.get("input_ids"), torch.Tensor)
            or features["input_ids"].dim() != 2
            or "inputs_embeds" in features
            or getattr(transformer.model.config, "output_hidden_states", False)
        ):
            return stock_forward_fn(features, **kwargs)
        hp = features.get(HOST_PACK_KEY)
        ids = features["input_ids"]
        if isinstance(hp, HostPack) and hp.matches(ids):
            hidden, packed = encoder.run_host(hp, ids.device)
        else:
            packed = pack_features(features)
            hidden = encoder(packed)
        features[PACKED_KEY] = packed
        if packed_pooling:
            features["token_embeddings"] = hidden
        else:
            features["token_embeddings"] = packed.repad(hidden)
        return features

    patches.set(transformer, "preprocess", preprocess)
    patches.set(transformer, "forward", forward)

    if packed_pooling:
        stock_pool = pooling.forward

        def pool_forward(features: dict[str, Any], **kwargs):
            packed = features.get(PACKED_KEY)
            if packed is None or kwargs or "token_weights_sum" in features or features["token_embeddings"].dim() != 2:
                return stock_pool(features, **kwargs)
            prompt_length = None
            if not pooling.include_prompt and "prompt_length" in features:
                pl = features["prompt_length"]
                prompt_length = int(pl.reshape(-1)[0].item()) if isinstance(pl, torch.Tensor) else int(pl)
            features["sentence_embedding"] = packed_pool(features["token_embeddings"], packed, pooling_modes(pooling), prompt_length)
            return features

        patches.set(pooling, "forward", pool_forward)

    # Loss columns embedded together by packed_loss.packed_columns come back from this forward.
    from .packed_loss import precomputed_output

    stock_model_forward = model.forward

    def model_forward(input, **kwargs):
        if not kwargs:
            out = precomputed_output(input)
            if out is not None:
                input.update(out)
                return input
        return stock_model_forward(input, **kwargs)

    patches.set(model, "forward", model_forward)

    # encode(output_value="token_embeddings" / None) reads padded token embeddings: run those stock.
    stock_encode = model.encode

    def encode(*args, **kwargs):
        if kwargs.get("output_value", "sentence_embedding") != "sentence_embedding":
            with stock_forward():
                return stock_encode(*args, **kwargs)
        return stock_encode(*args, **kwargs)

    patches.set(model, "encode", encode)

    attn = state.options.attention
    state.backend = (
        f"padding-free {spec.family} encoder, {_ops_label(model, encoder)}, "
        f"attention {attn}{', packed pooling' if packed_pooling else ''}"
    )


def _ops_label(model, encoder) -> str:
    """What the norms/activations will run as: Triton needs a CUDA device (or the interpreter)."""
    if not encoder.kernels:
        return "torch reference ops"
    from .kernels._backend import interpreter_on, kernels_forced_off, triton_available

    device = getattr(model, "device", None)
    on_cuda = device is not None and getattr(device, "type", "") == "cuda"
    if kernels_forced_off() or not triton_available():
        return "torch reference ops"
    if on_cuda:
        return "Triton kernels"
    if interpreter_on():
        return "Triton kernels (interpreter)"
    return "torch reference ops on CPU (Triton kernels once on CUDA)"
