"""Installs the padding-free forward on a model's ``Transformer`` and ``Pooling`` modules.

Instance patches only (recorded in the model's PatchSet, reverted by ``disable_fast``):

* ``Transformer.preprocess``: after stock tokenization, attach a :class:`~fastst_plugin.packing.HostPack`
  computed on the CPU, so the forward never asks the GPU for lengths.
* ``Transformer.forward``: text features go through the :class:`PackedEncoder`; the packed hidden
  states ``[T, H]`` and the PackedBatch are stored in the features. Anything the fast path does not
  cover (other modalities, ``inputs_embeds``, hidden-state outputs, extra kwargs) runs stock code.
* ``Pooling.forward``: pools packed rows directly. If a module that reads token embeddings and is
  not known to us follows the Transformer, the token embeddings are re-padded for it instead.
* CrossEncoders (``scores`` output of a ``*ForSequenceClassification`` model): the packed encoder plus
  the head described in :mod:`fastst_plugin.heads`; heads not described there run stock.
* ``encode`` / ``predict`` and the model's ``preprocess`` / ``forward``: the fast inference pipeline
  of :mod:`fastst_plugin.inference` (whole-input tokenization off the main thread, token-budget
  batches, no per-batch sync), with stock's own method handling every argument.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
from typing import Any

import torch

from .heads import first_token_is_position_zero
from .packing import HOST_PACK_KEY, PACKED_KEY, HostPack, host_pack, pack_features
from .pooling import SUPPORTED_MODES, l2_normalize, packed_pool, pooling_modes

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


def _fused_normalize_forward(module):
    """``Normalize.forward`` with :func:`~fastst_plugin.pooling.l2_normalize` (one autograd node)."""
    stock = module.forward

    def forward(features: dict[str, Any], **kwargs):
        name_in = getattr(module, "module_input_name", "sentence_embedding")
        name_out = getattr(module, "module_output_name", None) or name_in
        x = features.get(name_in)
        if kwargs or not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point():
            return stock(features, **kwargs)
        features[name_out] = l2_normalize(x)
        return features

    return forward


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
    head = None
    sparse_head = None
    if output_name != "token_embeddings" or _text_method_output(transformer) != "last_hidden_state":
        # Not the backbone's hidden states: a task head's output (CrossEncoder logits, or a
        # SparseEncoder's MLM logits that it names "token_embeddings").
        why_not_sparse = ""
        if _is_mlm(transformer, output_name):
            from .sparse import find_sparse_head

            sparse_head, why_not_sparse = find_sparse_head(transformer, followers)
        else:
            head = _task_head(transformer, output_name)
        if head is None and sparse_head is None:
            # Other task heads (decoder rerankers, MLM heads not described in sparse.py, ...) read
            # the model's own task outputs: keep them stock.
            from .log import warn_once

            if why_not_sparse:
                from .sparse import MLM_HEADS

                covered = ", ".join(a for s in MLM_HEADS for a in s.architectures)
                warn_once(
                    f"{type(model).__name__}: the padding-free SPLADE forward covers an MLM head ({covered}) followed "
                    f"by SpladePooling only; here {why_not_sparse}, so it runs stock (LoRA and checkpointing still apply)"
                )
            else:
                warn_once(
                    f"{type(model).__name__}: the padding-free forward covers embedding models and the "
                    f"sequence-classification heads of {', '.join(_head_families())}; this model's "
                    f"'{output_name}' head ({type(transformer.model).__name__}) runs stock (LoRA and checkpointing still apply)"
                )
            state.encoder = None  # nothing runs packed here (packed_loss and the graphs look at it)
            install_stock_extras(model, transformer, state)
            state.backend = "stock forward (task head)"
            return

    stock_forward_fn = transformer.forward
    stock_preprocess = transformer.preprocess

    direct_memo: dict = {}

    def preprocess(inputs, *args, **kwargs):
        features = None
        if not args and state.options.packing and not _STOCK_ONLY.get() and isinstance(inputs, list):
            from .inference import direct_preprocess

            features = direct_preprocess(transformer, stock_preprocess, inputs, kwargs, direct_memo)
        if features is None:
            features = stock_preprocess(inputs, *args, **kwargs)
        ids, mask = features.get("input_ids"), features.get("attention_mask")
        if (
            isinstance(ids, torch.Tensor) and isinstance(mask, torch.Tensor)
            and ids.device.type == "cpu" and ids.dim() == 2 and state.options.packing
            and not _STOCK_ONLY.get()  # stock-layout calls (encode(output_value=None)) return stock's keys only
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
        if head is not None:
            return head_forward(features)
        hp = features.get(HOST_PACK_KEY)
        ids = features["input_ids"]
        if isinstance(hp, HostPack) and hp.matches(ids):
            hidden, packed = encoder.run_host(hp, ids.device)
        else:
            packed = pack_features(features)
            hidden = encoder(packed)
        features[PACKED_KEY] = packed
        if packed_pooling or sparse_head is not None:
            # Packed hidden states [T, H]: the patched pooling (or SpladePooling) reads them directly.
            features["token_embeddings"] = hidden
        else:
            features["token_embeddings"] = packed.repad(hidden)
        return features

    def head_forward(features: dict[str, Any]):
        ids = features["input_ids"]
        hp = _host_pack_of(features)
        if head.spec.pooling(head.hf_model.config) == "first" and not first_token_is_position_zero(hp):
            # Left padding: stock's hidden[:, 0] reads a pad position; reproduce it with stock code.
            return stock_forward_fn(features)
        hidden, packed = encoder.run_host(hp, ids.device)
        features[PACKED_KEY] = packed
        features[output_name] = head(hidden, packed)
        return features

    patches.set(transformer, "preprocess", preprocess)
    patches.set(transformer, "forward", forward)

    if head is not None:
        _install_inference(model, transformer, state, head=head, followers=[], packed_pooling=False)
        _install_mode_switch(model, state)
        state.backend = (
            f"padding-free {spec.family} encoder + packed {head.spec.name}, {_ops_label(model, encoder)}, "
            f"attention {state.options.attention}"
        )
        return

    if sparse_head is not None:
        _install_splade_pooling(sparse_head, hidden_size=encoder.config.hidden_size, patches=patches)
        _install_inference(model, transformer, state, head=None, followers=followers, packed_pooling=False, sparse=True)
        _install_mode_switch(model, state)
        state.backend = (
            f"padding-free {spec.family} encoder + packed {sparse_head.spec.name} and SPLADE pooling, "
            f"{_ops_label(model, encoder)}, attention {state.options.attention}"
        )
        return

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
        for module in followers[1:]:
            if type(module).__name__ == "Normalize":
                patches.set(module, "forward", _fused_normalize_forward(module))

    _install_inference(model, transformer, state, head=None, followers=followers, packed_pooling=packed_pooling)
    _install_mode_switch(model, state)

    attn = state.options.attention
    state.backend = (
        f"padding-free {spec.family} encoder, {_ops_label(model, encoder)}, "
        f"attention {attn}{', packed pooling' if packed_pooling else ''}"
    )


def _is_mlm(transformer, output_name: str) -> bool:
    """A SparseEncoder-style MLM Transformer module: the HF model's ``logits`` named ``token_embeddings``."""
    return output_name == "token_embeddings" and _text_method_output(transformer) == "logits"


def _install_splade_pooling(sparse_head, *, hidden_size: int, patches) -> None:
    """``SpladePooling.forward`` on the packed hidden states the fast Transformer forward left in
    ``token_embeddings`` (:class:`~fastst_plugin.sparse.PackedSpladeHead`); anything else (the stock
    forward's padded logits) goes to stock's own pooling."""
    splade = sparse_head.pooling
    stock_pool = splade.forward

    def splade_forward(features: dict[str, Any], **kwargs):
        packed = features.get(PACKED_KEY)
        hidden = features.get("token_embeddings")
        if (
            packed is None or kwargs or not isinstance(hidden, torch.Tensor) or hidden.dim() != 2
            or hidden.shape[-1] != hidden_size or hidden.shape[0] != packed.seq_idx.shape[0]
        ):
            return stock_pool(features, **kwargs)
        embeddings = sparse_head(hidden, packed)
        if splade.embedding_dimension is None:  # as stock: learnt from the first forward
            splade.embedding_dimension = embeddings.shape[1]
        features["sentence_embedding"] = embeddings
        return features

    patches.set(splade, "forward", splade_forward)


def _idempotent_train_methods() -> set:
    """``train`` implementations that do nothing beyond setting ``training`` when the mode does not
    change (torch's, and transformers' ``PreTrainedModel.train``, whose extra work runs only on a
    change)."""
    methods = {torch.nn.Module.train}
    try:
        from transformers import PreTrainedModel

        methods.add(PreTrainedModel.train)
    except ImportError:  # pragma: no cover
        pass
    return methods


def _install_mode_switch(model, state) -> None:
    """``model.train(mode)`` returns at once when every submodule is already in ``mode``; ``zero_grad``
    keeps its parameter list between calls.

    The trainer calls ``model.train()`` at every step: a walk over every module (952 for bert-base
    with LoRA), which was the largest single piece of a graphed step's host time (H200 host profile,
    2026-11-29). The module list is re-read whenever a module or parameter is registered anywhere;
    any module whose class overrides ``train`` with something else keeps the full walk."""
    from .graphs import registrations

    full_train = model.train  # the class's method, bound (stock behaviour)
    full_zero_grad = model.zero_grad
    known = _idempotent_train_methods()
    kept: dict = {"seen": None}

    def structure() -> dict:
        """The model's modules and parameters, re-read whenever a module or parameter is registered."""
        seen = registrations()
        if kept["seen"] != seen:
            modules = tuple(model.modules())
            kept.update(
                seen=seen, modules=modules, params=tuple(model.parameters()),
                plain=all(type(m).train in known for m in modules),
            )
        return kept

    def train(mode: bool = True):
        if isinstance(mode, bool):
            known_now = structure()
            if known_now["plain"] and all(m.training is mode for m in known_now["modules"]):
                return model
        return full_train(mode)

    # zero_grad (the trainer's, a user's loop) walks every module to find the parameters.
    def zero_grad(set_to_none: bool = True) -> None:
        if set_to_none is not True or getattr(model, "_is_replica", False):
            return full_zero_grad(set_to_none)
        for p in structure()["params"]:
            if p.grad is not None:
                p.grad = None

    state.patches.set(model, "train", train)
    state.patches.set(model, "zero_grad", zero_grad)


def _install_inference(model, transformer, state, *, head, followers, packed_pooling, sparse: bool = False) -> None:
    """Model-level patches: results of packed loss columns / of the fast inference pipeline come back
    from ``model.forward``; ``encode`` / ``predict`` run that pipeline when their arguments allow."""
    from . import inference
    from .packed_loss import precomputed_output

    patches = state.patches
    encoder = state.encoder
    stock_model_forward = model.forward
    stock_model_preprocess = model.preprocess

    def model_forward(input, **kwargs):
        if not kwargs:
            out = precomputed_output(input)
            if out is not None:
                input.update(out)
                return input
        if inference.replay_active():
            out = inference.replay_forward(input)
            if out is not None:
                return out
        return stock_model_forward(input, **kwargs)

    def model_preprocess(inputs, *args, **kwargs):
        if inference.replay_active():
            out = inference.replay_preprocess(inputs)
            if out is not None:
                return out
        return stock_model_preprocess(inputs, *args, **kwargs)

    patches.set(model, "forward", model_forward)
    patches.set(model, "preprocess", model_preprocess)

    def fast_forward_usable() -> bool:
        return (
            not _STOCK_ONLY.get()
            and state.options.packing
            and not getattr(transformer.model.config, "output_hidden_states", False)
            and getattr(model, "_distributed_inference", None) is None
            # modules that take forward kwargs (e.g. a task-routed module) see them only in stock's loop
            and not any((getattr(model, "module_kwargs", None) or {}).values())
        )

    def plain_kwargs(a) -> bool:
        extra = a.get("kwargs") or {}
        if set(extra) - {"task", "processing_kwargs"}:
            return False
        # ColBERT-style query expansion rewrites padding positions: not a packed layout.
        return not (extra.get("task") == "query" and getattr(transformer, "query_expansion", None) is not None)

    if sparse:
        _install_sparse_encode(model, transformer, state, followers, fast_forward_usable, plain_kwargs)
        return

    if head is None:
        from sentence_transformers import SentenceTransformer

        stock_encode = model.encode
        try:
            encode_sig = inspect.signature(stock_encode)
        except (TypeError, ValueError):  # pragma: no cover
            encode_sig = None
        fast_ok = packed_pooling and isinstance(model, SentenceTransformer)
        run_batch = inference.embedding_runner(encoder, followers)

        def covered(bound) -> bool:
            a = bound.arguments
            return (
                fast_ok
                and fast_forward_usable()
                and a.get("output_value", "sentence_embedding") == "sentence_embedding"
                and a.get("pool") is None
                and inference.same_device(model, a.get("device"))
                and plain_kwargs(a)
            )

        def to_cpu(bound) -> bool:
            a = bound.arguments
            return bool(a.get("convert_to_numpy", True)) and not a.get("convert_to_tensor", False)

        def encode(*args, **kwargs):
            output_value = kwargs.get("output_value", "sentence_embedding")
            if encode_sig is not None and "output_value" not in kwargs:
                try:
                    output_value = encode_sig.bind(*args, **kwargs).arguments.get("output_value", "sentence_embedding")
                except TypeError:
                    pass
            if output_value != "sentence_embedding":
                # token embeddings / all outputs are read in stock's padded layout: run those stock.
                with stock_forward():
                    return stock_encode(*args, **kwargs)
            return inference.fast_call(
                model, stock_encode, args, kwargs, state=state, transformer=transformer, run_batch=run_batch,
                output_name="sentence_embedding", to_cpu=to_cpu, covered=covered, finish=inference.finish_encode,
            )

        patches.set(model, "encode", encode)
        return

    # CrossEncoder.predict (and rank, which calls it)
    stock_predict = getattr(model, "predict", None)
    if stock_predict is None:
        return
    run_batch = inference.head_runner(encoder, head)
    check_hp = first_token_is_position_zero if head.spec.pooling(head.hf_model.config) == "first" else None

    covered_predict = _plain_call_check(model, fast_forward_usable, plain_kwargs)

    def to_cpu_predict(bound) -> bool:
        a = bound.arguments
        act = a.get("activation_fn") or getattr(model, "activation_fn", None)
        if isinstance(act, torch.nn.Module) and any(True for _ in act.parameters()):
            return False  # an activation with weights on the device: keep the scores there
        return bool(a.get("convert_to_numpy", True)) and not a.get("convert_to_tensor", False)

    def predict(*args, **kwargs):
        return inference.fast_call(
            model, stock_predict, args, kwargs, state=state, transformer=transformer, run_batch=run_batch,
            output_name=transformer.module_output_name, to_cpu=to_cpu_predict, covered=covered_predict,
            check_hp=check_hp,
        )

    patches.set(model, "predict", predict)


def _plain_call_check(model, fast_forward_usable, plain_kwargs):
    """``covered(bound)`` for predict / sparse encode: the fast forward is usable, no multi-process
    pool, the model's own device, and only arguments the fast pipeline serves."""
    from . import inference

    def covered(bound) -> bool:
        a = bound.arguments
        return (
            fast_forward_usable()
            and a.get("pool") is None
            and inference.same_device(model, a.get("device"))
            and plain_kwargs(a)
        )

    return covered


def _install_sparse_encode(model, transformer, state, followers, fast_forward_usable, plain_kwargs) -> None:
    """``SparseEncoder.encode`` (so ``encode_query`` / ``encode_document``) through the fast pipeline.

    The rows are gathered as their non-zero entries (:class:`~fastst_plugin.sparse.SparseRows`);
    :func:`~fastst_plugin.sparse.finish_sparse_encode` builds the result for the plain arguments,
    otherwise stock's ``encode`` replays them at its own ``batch_size`` (its per-batch
    ``max_active_dims``, ``to_sparse`` and row-wise stacking then see what they would have computed,
    and a sparse batch stays as small as stock's own: unbinding one huge sparse batch into rows costs
    quadratic time)."""
    from . import inference
    from .sparse import SparseRows, finish_sparse_encode

    stock_encode = model.encode
    run_batch = inference.embedding_runner(state.encoder, followers)

    covered = _plain_call_check(model, fast_forward_usable, plain_kwargs)

    def encode(*args, **kwargs):
        return inference.fast_call(
            model, stock_encode, args, kwargs, state=state, transformer=transformer, run_batch=run_batch,
            output_name="sentence_embedding", to_cpu=lambda bound: False, covered=covered,
            finish=finish_sparse_encode, sink=SparseRows, replay_batch=None,
        )

    state.patches.set(model, "encode", encode)


def _text_method_output(transformer) -> str | None:
    """Which output of the HF model the module returns for text (``last_hidden_state`` for embedding
    models; ``logits`` for classification and MLM heads); None when it calls another method."""
    text = (getattr(transformer, "modality_config", None) or {}).get("text")
    if text is None:
        return "last_hidden_state"  # sentence-transformers without modality configs: the backbone output
    if text.get("method", "forward") != "forward":
        return None
    name = text.get("method_output_name")
    if isinstance(name, (list, tuple)):
        name = name[0] if len(name) == 1 else None
    return name


def _task_head(transformer, output_name):
    """A PackedHead for a sequence-classification Transformer module whose head is described, else None."""
    if output_name != "scores" or getattr(transformer, "transformer_task", None) != "sequence-classification":
        return None
    if _text_method_output(transformer) != "logits":
        return None
    from .heads import PackedHead, find_head

    spec = find_head(transformer.model)
    return PackedHead(transformer.model, spec) if spec is not None else None


def _head_families() -> list[str]:
    from .heads import HEADS

    return [name for spec in HEADS for name in spec.architectures]


def _host_pack_of(features) -> HostPack:
    """The features' host pack, or one built from a CPU copy of the mask (one sync; features that did
    not come through ``preprocess``)."""
    ids = features["input_ids"]
    hp = features.get(HOST_PACK_KEY)
    if isinstance(hp, HostPack) and hp.matches(ids):
        return hp
    mask = features.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask
    tt = features.get("token_type_ids")
    return host_pack(ids.cpu(), mask.cpu(), tt.cpu() if tt is not None else None)


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
