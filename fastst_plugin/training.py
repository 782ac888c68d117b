"""What fastst changes in the Sentence Transformers trainers (class level, reversible, idempotent).

:func:`install_trainer_integration` (called by ``enable_fast`` and ``patch()``) patches, through one
:class:`~fastst_plugin.patching.PatchSet`, the classes below; :func:`uninstall_trainer_integration`
restores every attribute exactly. Models that are not fast keep their stock behaviour everywhere
except where stock is broken (checkpointing kwargs on ST 6.0.x).

``BaseTrainer.compute_loss`` (and the ``compute_loss`` of every ST trainer that overrides it, e.g.
``CrossEncoderTrainer``)
    For a fast model, the loss call runs inside :func:`fastst_plugin.packed_loss.packed_columns`:
    all tokenized columns of the batch go through one padding-free forward and the loss's own
    per-column ``model(features)`` calls get those results. The columns are picked up where the
    trainer builds them (``collect_features``, wrapped too), so the loss, labels, prompts and
    ``dataset_name`` routing stay stock. Columns that are not tokenized feature dicts (the
    ``CrossEncoderTrainer`` hands raw texts to its loss) are left alone, and ``packed_columns`` itself
    declines what it cannot combine (cached losses, wrappers other than DDP…). Nothing depends on
    ``max_steps``: epoch-based runs get the same path.

``BaseModel.gradient_checkpointing_enable`` / ``activation_checkpointing_enable`` (+ ``*_disable``)
    Accept every keyword any transformers version passes (``gradient_checkpointing_kwargs``,
    ``activation_checkpointing_kwargs``, ``every_n_layers``, ``offload``, and unknown future ones,
    which are ignored with a debug log). ST 6.0.x's own method lacks ``**kwargs`` and raises
    ``TypeError`` under transformers 5.17's Trainer; 5.24's Trainer prefers
    ``activation_checkpointing_enable``, which ST does not define (FutureWarning). For a model whose
    fast forward is installed, checkpointing is the fast encoder's: the call sets
    ``get_state(model).options.gradient_checkpointing`` (``"offload"`` when ``offload=True``, else the
    mode already chosen, else ``"layer"``), read at every forward; HF's own checkpointing stays off so
    nothing is recomputed twice. Otherwise (not fast, ``kernels="off"``, unsupported family) every
    Hugging Face model inside gets transformers' checkpointing, non-reentrant unless the caller
    passed its own ``use_reentrant``.

``BaseTrainer._load_from_checkpoint`` (``resume_from_checkpoint`` and ``load_best_model_at_end``)
    Stock reloads the checkpoint as a new model and copies its whole state dict. A checkpoint of an
    adapted model is an adapter folder whose base is reloaded from ``base_model_name_or_path``
    (un-quantized): for such models the reload happens on the CPU and only the tensors that can
    change are copied (adapters, ``modules_to_save``, the other Sentence Transformers modules);
    bitsandbytes-quantized base weights (frozen) are kept. Every trainable parameter must be found
    in the checkpoint, else ``RuntimeError``.

Evaluators need no user-written autocast: a fast model keeps its parameters' dtype (bf16/fp16 models
evaluate as stock does), and within a trainer with ``bf16``/``fp16`` set the evaluator of a fast model
on CUDA runs under the trainer's autocast (its own ``autocast_smart_context_manager``) — what users
otherwise wrap by hand. Non-fast models and CPU runs evaluate exactly as stock.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import os
import threading
from collections.abc import Mapping

from .log import logger
from .patching import PatchSet

_lock = threading.RLock()
_patches: PatchSet | None = None

_TRAINER_MODULES = (
    "sentence_transformers.base.trainer",
    "sentence_transformers.sentence_transformer.trainer",
    "sentence_transformers.cross_encoder.trainer",
    "sentence_transformers.sparse_encoder.trainer",
    "sentence_transformers.multi_vector_encoder.trainer",
)
_CTX_ATTR = "_fastst_loss_ctx"


# --------------------------------------------------------------------------------------------------
# helpers


def _unwrap(model):
    """The Sentence Transformers model behind DDP / torch.compile wrappers."""
    seen = 0
    while seen < 4:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if inner is None or inner is model:
            break
        model = inner
        seen += 1
    return model


def _state(model):
    from .api import get_state

    return get_state(_unwrap(model))


def _fast_forward_active(state) -> bool:
    """Whether the padding-free forward (and with it, fastst's own checkpointing) is installed."""
    if state is None or getattr(state.options, "kernels", "off") == "off":
        return False
    return state.encoder is not None or state.family is not None


def _packed_columns():
    try:
        from .packed_loss import packed_columns
    except ImportError:  # the lead's packed forward is optional
        return None
    return packed_columns


def _call_filtered(fn, **kwargs):
    """Call ``fn`` with the keyword arguments its signature accepts."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return fn(**kwargs)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return fn(**kwargs)
    dropped = sorted(k for k in kwargs if k not in params)
    if dropped:
        logger.debug(f"{getattr(fn, '__qualname__', fn)} does not take {dropped}; not passed")
    return fn(**{k: v for k, v in kwargs.items() if k in params})


# --------------------------------------------------------------------------------------------------
# (a) one packed forward per loss call


def _current_loss(trainer, inputs):
    loss = getattr(trainer, "loss", None)
    if isinstance(loss, Mapping):
        name = inputs.get("dataset_name") if isinstance(inputs, Mapping) else None
        loss = loss.get(name) if name is not None else None
    return loss


def _wrap_compute_loss(orig):
    @functools.wraps(orig)
    def compute_loss(self, model, inputs, *args, **kwargs):
        if _state(model) is None or _packed_columns() is None:
            return orig(self, model, inputs, *args, **kwargs)
        previous = self.__dict__.get(_CTX_ATTR)
        with contextlib.ExitStack() as stack:
            self.__dict__[_CTX_ATTR] = (model, stack, _current_loss(self, inputs))
            try:
                return orig(self, model, inputs, *args, **kwargs)
            finally:
                self.__dict__[_CTX_ATTR] = previous

    compute_loss._fastst_wrapped = orig
    return compute_loss


def _wrap_collect_features(orig):
    @functools.wraps(orig)
    def collect_features(self, inputs, *args, **kwargs):
        result = orig(self, inputs, *args, **kwargs)
        ctx = self.__dict__.get(_CTX_ATTR)
        if ctx is None:
            return result
        self.__dict__[_CTX_ATTR] = None  # once per compute_loss
        model, stack, loss = ctx
        try:
            features = result[0]
        except (TypeError, IndexError, KeyError):
            return result
        if not features or not all(isinstance(f, Mapping) for f in features):
            return result  # e.g. CrossEncoderTrainer: raw texts, tokenized by the loss
        packed_columns = _packed_columns()
        if packed_columns is not None:
            stack.enter_context(packed_columns(model, features, loss=loss))
        return result

    collect_features._fastst_wrapped = orig
    return collect_features


# --------------------------------------------------------------------------------------------------
# (b) gradient / activation checkpointing


def _hf_checkpointing(model, enable: bool, ckpt_kwargs=None, every_n_layers: int = 1, offload: bool = False) -> int:
    """Enable/disable transformers' checkpointing on the outermost HF models inside ``model``."""
    done: list[str] = []
    count = 0
    for name, module in model.named_modules():
        if module is model or any(name.startswith(d + ".") for d in done):
            continue
        if not (hasattr(module, "gradient_checkpointing_enable") or hasattr(module, "activation_checkpointing_enable")):
            continue
        if enable and getattr(module, "supports_gradient_checkpointing", True) is False:
            logger.debug(f"{type(module).__name__} does not support gradient checkpointing; skipped")
            continue
        done.append(name)
        count += 1
        if enable:
            kwargs = dict(ckpt_kwargs) if ckpt_kwargs else {"use_reentrant": False}
            extra = {"every_n_layers": every_n_layers, "offload": offload}
            if hasattr(module, "activation_checkpointing_enable"):
                _call_filtered(module.activation_checkpointing_enable, activation_checkpointing_kwargs=kwargs, **extra)
            else:
                try:
                    _call_filtered(module.gradient_checkpointing_enable, gradient_checkpointing_kwargs=kwargs, **extra)
                except TypeError:  # very old signatures without keywords
                    module.gradient_checkpointing_enable()
        else:
            fn = getattr(module, "activation_checkpointing_disable", None) or getattr(
                module, "gradient_checkpointing_disable", None
            )
            if fn is not None:
                fn()
    return count


def _enable_checkpointing(model, ckpt_kwargs=None, every_n_layers: int = 1, offload: bool = False, **unknown):
    if unknown:
        logger.debug(f"gradient checkpointing: ignoring unknown keyword(s) {sorted(unknown)}")
    state = _state(model)
    if state is not None:
        current = state.options.gradient_checkpointing
        state.options.gradient_checkpointing = "offload" if offload else (current if current != "off" else "layer")
        if _fast_forward_active(state):
            if every_n_layers != 1:
                logger.debug("gradient checkpointing: every_n_layers is not used by the fast encoder (every layer)")
            return
    _hf_checkpointing(model, True, ckpt_kwargs, every_n_layers, offload)


def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs) -> None:
    """Enable gradient checkpointing (fastst: any transformers version's keywords are accepted).

    Fast models: the fast encoder checkpoints (``options.gradient_checkpointing``). Others: transformers'
    checkpointing on every Hugging Face model inside, non-reentrant by default.
    """
    if gradient_checkpointing_kwargs is None:
        gradient_checkpointing_kwargs = kwargs.pop("activation_checkpointing_kwargs", None)
    _enable_checkpointing(self, gradient_checkpointing_kwargs, **kwargs)


def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None, **kwargs) -> None:
    """transformers >= 5.2x name of :func:`gradient_checkpointing_enable`; same behaviour."""
    if activation_checkpointing_kwargs is None:
        activation_checkpointing_kwargs = kwargs.pop("gradient_checkpointing_kwargs", None)
    _enable_checkpointing(self, activation_checkpointing_kwargs, **kwargs)


def gradient_checkpointing_disable(self) -> None:
    """Turn checkpointing off (the fast encoder's and transformers')."""
    state = _state(self)
    if state is not None:
        state.options.gradient_checkpointing = "off"
    _hf_checkpointing(self, False)


activation_checkpointing_disable = gradient_checkpointing_disable


# --------------------------------------------------------------------------------------------------
# (c) evaluators under the trainer's precision


def _wrap_evaluation_loop(orig):
    @functools.wraps(orig)
    def evaluation_loop(self, *args, **kwargs):
        state = _state(self.model)
        args_ = getattr(self, "args", None)
        wants_amp = bool(getattr(args_, "bf16", False) or getattr(args_, "fp16", False))
        if state is None or not wants_amp or getattr(self.model, "device", None) is None or self.model.device.type != "cuda":
            return orig(self, *args, **kwargs)
        evaluator = getattr(self, "evaluator", None)
        if evaluator is None:
            return orig(self, *args, **kwargs)
        ctx_factory = getattr(self, "autocast_smart_context_manager", None)
        if ctx_factory is None:
            return orig(self, *args, **kwargs)

        def run(model, *a, **k):
            with ctx_factory():
                return evaluator(model, *a, **k)

        # The evaluator is called by the stock loop as ``self.evaluator(model, output_path=..., ...)``.
        self.__dict__["evaluator"] = _EvaluatorUnderAutocast(evaluator, run)
        try:
            return orig(self, *args, **kwargs)
        finally:
            self.__dict__["evaluator"] = evaluator

    evaluation_loop._fastst_wrapped = orig
    return evaluation_loop


class _EvaluatorUnderAutocast:
    """Calls the evaluator under the trainer's autocast; everything else is the evaluator's."""

    def __init__(self, evaluator, run):
        self._evaluator = evaluator
        self._run = run

    def __call__(self, *args, **kwargs):
        return self._run(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._evaluator, name)


# --------------------------------------------------------------------------------------------------
# (d) checkpoints of adapted models


def _is_adapter_checkpoint(path: str) -> bool:
    if not path or not os.path.isdir(path):
        return False
    for root, _dirs, files in os.walk(path):
        if "adapter_config.json" in files:
            return True
        if root.count(os.sep) - path.count(os.sep) >= 1:
            break
    return False


def load_adapter_checkpoint(trainer, checkpoint_path: str) -> None:
    """Load an adapter checkpoint into ``trainer.model`` without touching its (quantized) frozen base."""
    import torch

    from . import adapters

    model = getattr(trainer.model, "_orig_mod", trainer.model)
    from sentence_transformers.base.modules import Module
    from sentence_transformers.util import fullname

    module_classes = {fullname(m): type(m) for m in model.modules() if isinstance(m, Module)}
    loaded = type(model)._load_with_module_classes(
        checkpoint_path, module_classes, trust_remote_code=getattr(model, "trust_remote_code", False), device="cpu"
    )
    own = model.state_dict(keep_vars=True)
    incoming = loaded.state_dict()
    to_load = {}
    for key, value in incoming.items():
        target = own.get(key)
        if target is None:
            continue
        if type(target).__name__ in ("Params4bit", "Int8Params") or target.dtype in (torch.uint8, torch.int8):
            continue  # quantized frozen base: unchanged since it was quantized
        if tuple(target.shape) != tuple(value.shape):
            continue
        to_load[key] = value
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    missing = [name for name in trainable if name not in to_load]
    if missing:
        raise RuntimeError(
            f"checkpoint {checkpoint_path} does not hold trainable parameter(s) {missing[:6]}"
            + (f" (+{len(missing) - 6} more)" if len(missing) > 6 else "")
        )
    result = model.load_state_dict(to_load, strict=False)
    if result.unexpected_keys:  # pragma: no cover - filtered above
        raise RuntimeError(f"unexpected keys loading {checkpoint_path}: {result.unexpected_keys[:6]}")
    del loaded
    logger.debug(f"loaded {len(to_load)} tensors from adapter checkpoint {checkpoint_path}")
    adapters.ensure_save_compat(model)


def _wrap_load_from_checkpoint(orig):
    @functools.wraps(orig)
    def _load_from_checkpoint(self, checkpoint_path, *args, **kwargs):
        from . import adapters

        model = getattr(self.model, "_orig_mod", self.model)
        if args or kwargs or not adapters.has_adapters(model) or not _is_adapter_checkpoint(checkpoint_path):
            return orig(self, checkpoint_path, *args, **kwargs)
        return load_adapter_checkpoint(self, checkpoint_path)

    _load_from_checkpoint._fastst_wrapped = orig
    return _load_from_checkpoint


# --------------------------------------------------------------------------------------------------
# install / uninstall


def _trainer_classes() -> list[type]:
    classes = []
    for name in _TRAINER_MODULES:
        try:
            module = importlib.import_module(name)
        except Exception as exc:  # pragma: no cover - optional trainers (missing extras)
            logger.debug(f"{name} not importable: {exc!r}")
            continue
        for value in vars(module).values():
            if isinstance(value, type) and value.__module__ == name and value.__name__.endswith("Trainer"):
                classes.append(value)
    return classes


def _base_model_class():
    from sentence_transformers.base.model import BaseModel

    return BaseModel


def install_trainer_integration() -> None:
    """Patch the Sentence Transformers trainers and ``BaseModel`` (see the module docstring). Idempotent."""
    global _patches
    with _lock:
        if _patches is not None:
            return
        patches = PatchSet()
        try:
            base_model = _base_model_class()
            patches.set(base_model, "gradient_checkpointing_enable", gradient_checkpointing_enable)
            patches.set(base_model, "activation_checkpointing_enable", activation_checkpointing_enable)
            patches.set(base_model, "gradient_checkpointing_disable", gradient_checkpointing_disable)
            patches.set(base_model, "activation_checkpointing_disable", activation_checkpointing_disable)
            for cls in _trainer_classes():
                own = cls.__dict__
                if "compute_loss" in own and not hasattr(own["compute_loss"], "_fastst_wrapped"):
                    patches.set(cls, "compute_loss", _wrap_compute_loss(own["compute_loss"]))
                if "collect_features" in own and not hasattr(own["collect_features"], "_fastst_wrapped"):
                    patches.set(cls, "collect_features", _wrap_collect_features(own["collect_features"]))
                if "_load_from_checkpoint" in own and not hasattr(own["_load_from_checkpoint"], "_fastst_wrapped"):
                    patches.set(cls, "_load_from_checkpoint", _wrap_load_from_checkpoint(own["_load_from_checkpoint"]))
                if "evaluation_loop" in own and not hasattr(own["evaluation_loop"], "_fastst_wrapped"):
                    patches.set(cls, "evaluation_loop", _wrap_evaluation_loop(own["evaluation_loop"]))
            # GradCache losses: token-budget mini-batches over host packs, autocast replay.
            from .cached_losses import install as install_cached_losses

            install_cached_losses(patches)
        except Exception:
            patches.revert()
            raise
        _patches = patches
        logger.debug(f"trainer integration installed ({len(patches)} class attributes)")


def uninstall_trainer_integration() -> None:
    """Restore every class attribute :func:`install_trainer_integration` changed. Idempotent."""
    global _patches
    with _lock:
        if _patches is None:
            return
        _patches.revert()
        _patches = None


def is_installed() -> bool:
    return _patches is not None
