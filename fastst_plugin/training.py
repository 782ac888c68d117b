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

``BaseTrainer.train`` / ``training_step`` / ``get_train_dataloader`` (fast models on CUDA)
    Steps without host round trips: batches collated ahead on a thread, non-blocking batch copies,
    the NaN/Inf loss filter on the device (section (e) below).

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
    (un-quantized). When LoRA weights are all that trains, they are read from the checkpoint's
    ``adapter_model.safetensors`` into the live model (no base reload: also works when the base
    folder is gone, and under DDP on every rank). Otherwise the reload happens on the CPU and only
    the tensors that can change are copied (adapters, ``modules_to_save``, the other Sentence
    Transformers modules); bitsandbytes-quantized base weights (frozen) are kept. Every trainable
    parameter must be found in the checkpoint, else ``RuntimeError``.

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

from .config import env_switch
from .log import logger
from .patching import _MISSING, PatchSet

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


def _load_adapter_file(model, checkpoint_path: str) -> bool:
    """The adapters straight from the checkpoint's ``adapter_model.safetensors`` into the live model,
    when LoRA weights are all that trains. False (nothing changed) when that does not cover the model.

    The general path below reloads the checkpoint as a model, and with it the base named in
    ``adapter_config.json``: a full model load per resume, and impossible when the base was a folder
    that is gone (a model built from a config in a temporary folder, as the benchmarks do)."""
    import json

    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from . import adapters

    transformer = adapters._find_transformer(model)
    hf = adapters._hf_model(model) if transformer is not None else None
    if hf is None:
        return False
    key = next((k for k, m in model._modules.items() if m is transformer), None)
    try:
        with open(os.path.join(checkpoint_path, "modules.json"), encoding="utf-8") as f:
            entries = {str(e.get("idx")): e for e in json.load(f)}
    except (OSError, ValueError):
        return False
    entry = entries.get(str(key))
    if entry is None:
        return False
    path = os.path.join(checkpoint_path, entry.get("path", ""), "adapter_model.safetensors")
    if not os.path.isfile(path):
        return False
    hf_ids = {id(p) for p in hf.parameters()}
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable or any(id(p) not in hf_ids or "lora_" not in n for n, p in trainable):
        return False  # other trainable tensors (modules_to_save, Dense layers...): the general path
    result = set_peft_model_state_dict(hf, load_file(path), adapter_name=adapters.ADAPTER_NAME)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"adapter checkpoint {checkpoint_path} does not match the model's adapters "
            f"(missing {missing[:4]}, unexpected {list(result.unexpected_keys)[:4]})"
        )
    logger.debug(f"loaded {len(trainable)} adapter tensors from {path}")
    adapters.ensure_save_compat(model)
    return True


def load_adapter_checkpoint(trainer, checkpoint_path: str) -> None:
    """Load an adapter checkpoint into ``trainer.model`` without touching its (quantized) frozen base."""
    import torch

    from . import adapters

    model = getattr(trainer.model, "_orig_mod", trainer.model)
    if _load_adapter_file(model, checkpoint_path):
        return
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
# (e) training steps without host round trips


# Collated batches made ahead of the training step on a background thread (0: off).
PREFETCH_BATCHES = 2


def _fast_on_cuda(trainer) -> bool:
    """Whether ``trainer`` trains a model whose fast forward is installed, on a CUDA device."""
    model = getattr(trainer, "model", None)
    if model is None or not _fast_forward_active(_state(model)):
        return False
    device = getattr(_unwrap(model), "device", None)
    return getattr(device, "type", None) == "cuda"


def _overlap_wanted(trainer) -> bool:
    """The overlapped step is on for fast models on CUDA unless ``FASTST_TRAINER_OVERLAP=0``."""
    if not env_switch("FASTST_TRAINER_OVERLAP"):
        return False
    return _fast_on_cuda(trainer)


def backward_on_calling_thread():
    """Context in which ``backward()`` runs on the calling thread (``FASTST_BACKWARD_THREAD=device``: torch's default).

    For CUDA tensors, autograd's engine hands a backward pass to its per-device worker thread and the
    caller waits for it; every Python node on the way (the graphed step's backward, the loss's
    custom functions) then has to take the GIL on that thread. For a replayed step that is a few
    dozen small nodes, and the hand-off was a visible part of the host time: H200, MiniLM LoRA
    64 pairs, ``tests/gpu/backward_timing.py``: backward 2.2-2.6 ms → 1.5-2.3 ms, step host time
    4.98 → 3.98 ms and 6.33 → 5.78 ms in two rounds (host-bound step; bert-base, GPU-bound: no
    change; bench A/B on a noisy host mixed, see docs/benchmarks.md). The flag is thread-local
    (``torch.autograd.set_multithreading_enabled``, set when the object is built: call this at the
    ``with``): nothing outside the block is affected."""
    if os.environ.get("FASTST_BACKWARD_THREAD", "caller").strip().lower() == "device":
        return contextlib.nullcontext()
    import torch

    return torch.autograd.set_multithreading_enabled(False)


def _wrap_train(orig):
    @functools.wraps(orig)
    def train(self, *args, **kwargs):
        args_ = getattr(self, "args", None)
        _ignore_unread_params_in_ddp(self)
        model = getattr(self, "model", None)
        fast = model is not None and _fast_forward_active(_state(model))
        # torch's flag is set when the context object is built: build it at the `with`.
        caller_backward = backward_on_calling_thread if fast else contextlib.nullcontext
        if args_ is None or not _overlap_wanted(self):
            try:
                with caller_backward():
                    return orig(self, *args, **kwargs)
            finally:
                _undo_ddp_patches(self)
        from .gil import prompt_gil_handoff

        # The stock NaN/Inf loss filter reads the step's loss on the host (`bool(torch.isnan(loss))`):
        # a synchronisation per step that makes the host wait for the GPU, so that the next batch's
        # collation and launches cannot overlap this step's kernels. The same replacement is done on
        # the device in `training_step` below; the trainer's own check is off meanwhile.
        device_filter = bool(getattr(args_, "logging_nan_inf_filter", False))
        previous = self.__dict__.get("_fastst_device_nan_filter", _MISSING)
        if device_filter:
            args_.logging_nan_inf_filter = False
            self.__dict__["_fastst_device_nan_filter"] = True
        try:
            with prompt_gil_handoff() if PREFETCH_BATCHES else contextlib.nullcontext(), caller_backward():
                return orig(self, *args, **kwargs)
        finally:
            _undo_ddp_patches(self)
            if device_filter:
                args_.logging_nan_inf_filter = True
                if previous is _MISSING:
                    self.__dict__.pop("_fastst_device_nan_filter", None)
                else:
                    self.__dict__["_fastst_device_nan_filter"] = previous

    train._fastst_wrapped = orig
    return train


_DDP_IGNORE = "_ddp_params_and_buffers_to_ignore"  # read by DistributedDataParallel.__init__
_OUR_DDP_IGNORE = "_fastst_ddp_ignored"


def _params_the_fast_path_never_reads(model) -> list[tuple[str, torch.nn.Parameter]]:
    """Trainable parameters of an embedding model's backbone that its padding-free forward never
    reads (a BERT pooler: Sentence Transformers pools the token embeddings), as (name in ``model``,
    parameter). Empty when in doubt: a CrossEncoder (its head reads the pooler), a model whose
    pipeline asks for ``pooler_output``, no fast encoder."""
    from sentence_transformers import CrossEncoder

    from .adapters import _uses_pooler_output

    state = _state(model)
    encoder = getattr(state, "encoder", None)
    if not _fast_forward_active(state) or encoder is None or isinstance(model, CrossEncoder) or _uses_pooler_output(model):
        return []
    base = encoder.base
    prefix = next((name for name, m in model.named_modules() if m is base), None)
    if prefix is None:
        return []
    read = {id(p) for m in encoder.used_modules() for p in m.parameters()}
    return [(f"{prefix}.{n}" if prefix else n, p) for n, p in base.named_parameters() if p.requires_grad and id(p) not in read]


def _ignore_unread_params_in_ddp(trainer) -> None:
    """Full fine-tuning under DDP: a trainable parameter that gets no gradient on a rank (a BERT
    pooler, in stock and fast runs alike) makes DDP's reducer wait for the unused-parameter
    all-reduce and copy its result to the host inside every backward (``finalize_bucket_dense``):
    a host-GPU synchronisation per step (20-42 ms host waits per bert-base step in a 2-GPU H200
    trace, 2026-11-29). The parameters the fast forward never reads are left out of DDP (torch's
    ``_ddp_params_and_buffers_to_ignore``), for this ``train`` call only: they get no gradient on
    any rank, so nothing is lost by not reducing it; ``training_step`` checks that they stay
    without one."""
    import torch.distributed as dist

    model = getattr(trainer, "model", None)
    if model is None or not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    if hasattr(model, _DDP_IGNORE) or not env_switch("FASTST_DDP_IGNORE_UNREAD"):
        return  # the user's own list, or asked not to
    unread = _params_the_fast_path_never_reads(model)
    if unread:
        model.__dict__[_DDP_IGNORE] = [name for name, _ in unread]
        model.__dict__[_OUR_DDP_IGNORE] = tuple(p for _, p in unread)
        logger.info(f"DDP: {len(unread)} parameters the fast forward never reads left out of gradient reduction "
                    f"({', '.join(name for name, _ in unread[:4])}{', ...' if len(unread) > 4 else ''})")


def _unignore(trainer) -> None:
    model = getattr(trainer, "model", None)
    if model is not None and model.__dict__.pop(_OUR_DDP_IGNORE, None) is not None:
        model.__dict__.pop(_DDP_IGNORE, None)


def _check_ignored_params(model) -> None:
    ignored = getattr(_unwrap(model), "__dict__", {}).get(_OUR_DDP_IGNORE)  # per step: no Module.__getattr__ miss
    if ignored and any(p.grad is not None for p in ignored):
        raise RuntimeError(
            "fastst: a parameter left out of DDP's gradient reduction (one the fast forward never reads, e.g. a "
            "BERT pooler) received a gradient: the ranks would diverge. Something outside the fast forward uses "
            "it; run with FASTST_DDP_IGNORE_UNREAD=0."
        )


_REDUCER = "_fastst_reducer"


def _own_reducer(trainer, model):
    """fastst's gradient all-reduce for this ``train()`` call (see ``ddp_reduce``; off with
    ``FASTST_DDP_REDUCE=ddp``), created at the first step that runs the DDP wrapper of a fast model."""
    reducer = trainer.__dict__.get(_REDUCER, _MISSING)
    if reducer is not _MISSING:
        return reducer
    from . import ddp_reduce

    reducer = None
    if ddp_reduce.wanted() and ddp_reduce.is_ddp_wrapper(model) and _fast_forward_active(_state(model)):
        reason = ddp_reduce.why_not(model)
        if reason is None:
            reducer = ddp_reduce.FastReducer(model)
        else:
            logger.info(f"DDP reduces the gradients itself: {reason}")
    trainer.__dict__[_REDUCER] = reducer
    return reducer


def _close_reducer(trainer) -> None:
    reducer = trainer.__dict__.pop(_REDUCER, None)
    if reducer is not None and reducer is not _MISSING:
        reducer.close()


def _undo_ddp_patches(trainer) -> None:
    """What one ``train()`` call set up around DDP, undone when it returns."""
    _close_reducer(trainer)
    _unshare_zero_grad_of(trainer)
    _unignore(trainer)


_WRAPPER_ZERO_GRAD = "_fastst_wrapper_zero_grad"


def _share_zero_grad_with_wrapper(wrapper) -> None:
    """Under DDP the trainer calls ``zero_grad()`` on the DistributedDataParallel wrapper, whose stock
    method walks every module of the model to find the parameters at each step (~3-8 ms of host
    time per bert-base LoRA step on an H200 host, 2026-11-29 cProfile) although the fast model
    keeps that list (``fast_modules``' ``zero_grad``). The wrapper has no parameters of its own, so
    its ``zero_grad`` can be the model's: set on the wrapper instance only, removed when ``train``
    returns (:func:`_unshare_zero_grad_of`)."""
    inner = getattr(wrapper, "module", None)
    shared = (
        inner is not None
        and "zero_grad" not in wrapper.__dict__
        and "zero_grad" in getattr(inner, "__dict__", {})
        and _fast_forward_active(_state(inner))
        and not any(True for _ in wrapper.named_parameters(recurse=False))
    )
    wrapper.__dict__[_WRAPPER_ZERO_GRAD] = shared  # False: looked at, left stock (not asked again)
    if shared:
        wrapper.__dict__["zero_grad"] = inner.zero_grad


def _unshare_zero_grad_of(trainer) -> None:
    wrapper = getattr(trainer, "model_wrapped", None)
    if wrapper is not None and wrapper is not getattr(trainer, "model", None):
        if wrapper.__dict__.pop(_WRAPPER_ZERO_GRAD, None):
            wrapper.__dict__.pop("zero_grad", None)


def _wrap_training_step(orig):
    @functools.wraps(orig)
    def training_step(self, model, inputs, *args, **kwargs):
        if model is not getattr(self, "model", model) and _WRAPPER_ZERO_GRAD not in getattr(model, "__dict__", {_WRAPPER_ZERO_GRAD: 0}):
            _share_zero_grad_with_wrapper(model)  # the DDP wrapper, at its first step
        reducer = _own_reducer(self, model)
        if reducer is not None:
            reducer.arm()
        loss = orig(self, model, inputs, *args, **kwargs)
        _check_ignored_params(model)
        if reducer is not None and getattr(getattr(self, "accelerator", None), "sync_gradients", True):
            reducer.reduce()
        if not self.__dict__.get("_fastst_device_nan_filter"):
            return loss
        import torch

        running = getattr(self, "_tr_loss", None)
        if not (torch.is_tensor(loss) and torch.is_tensor(running) and loss.device == running.device and loss.numel() == 1):
            # Not the trainer loop this replacement mirrors: give the check back to the trainer.
            self.args.logging_nan_inf_filter = True
            self.__dict__["_fastst_device_nan_filter"] = False
            return loss
        # transformers: a NaN/Inf step loss is replaced by the mean of the losses since the last log.
        state = self.state
        mean_so_far = running / (1 + state.global_step - getattr(self, "_globalstep_last_logged", state.global_step))
        return torch.where(torch.isfinite(loss), loss, mean_so_far.to(loss.dtype))

    training_step._fastst_wrapped = orig
    return training_step


class _KnownParameters:
    """``model`` for gradient clipping, whose ``parameters()`` is a list kept between steps (clipping
    walked every module of the model at each step: ~13 ms of a bert-base LoRA step under an H200
    host profile). Everything else is the model's."""

    def __init__(self, model, params: tuple):
        self._model = model
        self._params = params

    def parameters(self, recurse: bool = True):
        return iter(self._params) if recurse else self._model.parameters(recurse)

    def __getattr__(self, name):
        return getattr(self._model, name)


def _wrap_clip_grad_norm(orig):
    @functools.wraps(orig)
    def _clip_grad_norm(self, model, *args, **kwargs):
        if not _overlap_wanted(self):
            return orig(self, model, *args, **kwargs)
        from .graphs import registrations

        seen = registrations()
        cached = self.__dict__.get("_fastst_clip_params")
        if cached is None or cached[0] != seen or cached[1] is not model:
            cached = (seen, model, tuple(model.parameters()))
            self.__dict__["_fastst_clip_params"] = cached
        return orig(self, _KnownParameters(model, cached[2]), *args, **kwargs)

    _clip_grad_norm._fastst_wrapped = orig
    return _clip_grad_norm


def _wrap_get_train_dataloader(orig):
    @functools.wraps(orig)
    def get_train_dataloader(self, *args, **kwargs):
        loader = orig(self, *args, **kwargs)
        if _overlap_wanted(self):
            _overlap_loader(loader)
        return loader

    get_train_dataloader._fastst_wrapped = orig
    return get_train_dataloader


def _overlap_loader(loader) -> None:
    """Let the training loader's host work overlap the GPU (this loader object only).

    * accelerate moves each batch to the device with a blocking copy, which waits for every kernel
      queued before it (the whole previous step): the copy is made non-blocking (the batch is in
      pinned memory when ``dataloader_pin_memory`` is on, as by default; else the copy stays
      synchronous but correct).
    * Without dataloader workers the collator (tokenization, the fast preprocess's host pack) runs
      on the training thread between steps: the next ``PREFETCH_BATCHES`` batches are collated on a
      background thread instead (same batches, same order; the tokenizer releases the GIL).
    """
    import torch

    if getattr(loader, "device", None) is not None and hasattr(loader, "_non_blocking"):
        loader._non_blocking = True
    base = getattr(loader, "base_dataloader", loader)
    if not PREFETCH_BATCHES or not isinstance(base, torch.utils.data.DataLoader) or base.num_workers != 0:
        return
    if "_get_iterator" in base.__dict__:
        return  # already done
    make_iterator = base._get_iterator
    device = torch.cuda.current_device() if torch.cuda.is_available() else None
    base._get_iterator = lambda: prefetching(make_iterator(), PREFETCH_BATCHES, device)


def prefetching(iterator, depth: int, device=None):
    """``iterator`` (a single-process DataLoader iterator) with its next ``depth`` batches fetched
    and collated on a daemon thread. Exceptions reach the training thread with their traceback; the
    thread ends at the end of the data or soon after ``iterator`` is dropped (a run stopping at
    ``max_steps`` mid-epoch)."""
    import queue
    import weakref

    slots: queue.Queue = queue.Queue(maxsize=max(1, depth))
    owner = weakref.ref(iterator)
    fetch = type(iterator)._next_data

    def work():
        if device is not None:
            import torch

            torch.cuda.set_device(device)  # pinning the batch needs this thread on the loader's device
        while True:
            target = owner()
            if target is None:
                return
            try:
                item = ("batch", fetch(target))
            except StopIteration:
                item = ("end", None)
            except BaseException as exc:  # handed to the training thread
                item = ("error", exc)
            del target
            while True:
                try:
                    slots.put(item, timeout=0.5)
                    break
                except queue.Full:
                    if owner() is None:
                        return
            if item[0] != "batch":
                return

    finished: list = []  # the end or the error, once seen: every later call repeats it

    def next_data():
        kind, value = finished[0] if finished else slots.get()
        if kind == "batch":
            return value
        finished[:] = [(kind, value)]
        if kind == "end":
            raise StopIteration
        raise value

    iterator._next_data = next_data  # instance attribute: the iterator's __next__ calls it
    threading.Thread(target=work, name="fastst-batch-prefetch", daemon=True).start()
    return iterator


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


def _base_trainer_class():
    try:
        from sentence_transformers.base.trainer import BaseTrainer
    except ImportError:  # pragma: no cover - trainer extras missing
        return None
    return BaseTrainer


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
            base_trainer = _base_trainer_class()
            if base_trainer is not None:
                for name, wrap in (("train", _wrap_train), ("training_step", _wrap_training_step),
                                   ("_clip_grad_norm", _wrap_clip_grad_norm)):
                    current = getattr(base_trainer, name, None)
                    if current is not None and not hasattr(current, "_fastst_wrapped"):
                        patches.set(base_trainer, name, wrap(current))
            for cls in _trainer_classes():
                own = cls.__dict__
                if "get_train_dataloader" in own and not hasattr(own["get_train_dataloader"], "_fastst_wrapped"):
                    patches.set(cls, "get_train_dataloader", _wrap_get_train_dataloader(own["get_train_dataloader"]))
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
