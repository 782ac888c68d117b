"""``enable_fast`` and friends: the orchestration behind the public API.

``enable_fast`` works on the model instance it is given:

1. checks the model type and the library versions;
2. applies LoRA / QLoRA through peft (:mod:`fastst_plugin.adapters`), when asked;
3. finds the backbone family in the registry (:mod:`fastst_plugin.backbones`) and installs the
   padding-free forward on the model's ``Transformer`` and ``Pooling`` modules
   (:mod:`fastst_plugin.fast_modules`), reading the model's own parameters, so state-dict keys are
   unchanged; an unknown architecture stays stock with one warning;
4. installs the trainer integration (:mod:`fastst_plugin.training`);
5. logs one line saying what was patched and with which backend.

Every instance patch is recorded in a :class:`~fastst_plugin.patching.PatchSet` kept on the model,
and ``disable_fast`` reverts it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .config import FastOptions, resolve_options
from .log import logger, warn_once
from .patching import PatchSet

_STATE_ATTR = "_fastst_state"


@dataclass
class FastState:
    options: FastOptions
    patches: PatchSet = field(default_factory=PatchSet)
    family: str | None = None
    lora_config: Any = None
    backend: str = "stock"
    encoder: Any = None  # the PackedEncoder, when the fast forward is installed
    summary: str = ""


def _sentence_transformers_model_types() -> tuple[type, ...]:
    from sentence_transformers import CrossEncoder, SentenceTransformer, SparseEncoder

    return (SentenceTransformer, CrossEncoder, SparseEncoder)


def is_fast(model: Any) -> bool:
    """True when ``enable_fast`` has patched this model (and ``disable_fast`` has not undone it)."""
    return getattr(model, _STATE_ATTR, None) is not None


def get_state(model: Any) -> FastState | None:
    return getattr(model, _STATE_ATTR, None)


def _find_transformer(model):
    from sentence_transformers.base.modules.transformer import Transformer

    for module in model.children() if hasattr(model, "children") else []:
        if isinstance(module, Transformer):
            return module
    return None


def enable_fast(model, lora: Any = None, **options: Any):
    """Make ``model`` fast, in place, and return it.

    Args:
        model: a ``SentenceTransformer``, ``CrossEncoder`` or ``SparseEncoder``.
        lora: ``None`` (no adapters), ``True`` (rank 16 on every linear layer of the backbone), an
            ``int`` rank, a ``peft.LoraConfig`` or a dict of its fields. Applied through peft, so
            ``model.save_pretrained`` writes a standard adapter folder.
        **options: see :class:`fastst_plugin.config.FastOptions`: ``gradient_checkpointing``,
            ``quantization`` (``"4bit"`` / ``"8bit"`` base for QLoRA), ``attention``, ``kernels``
            (``"off"`` leaves the forward stock: LoRA and checkpointing only), ``packing``.
            Unknown names raise ``TypeError``.

    A second call is idempotent: it changes nothing, or applies only the options it is given
    (LoRA is applied once; a different ``lora`` on an adapted model raises ``ValueError``).
    """
    model_types = _sentence_transformers_model_types()
    if not isinstance(model, model_types):
        raise TypeError(
            f"enable_fast() expects a SentenceTransformer, CrossEncoder or SparseEncoder, got {type(model).__name__}"
        )
    from .versions import check_versions

    check_versions()

    state = get_state(model)
    opts = resolve_options(state.options if state else None, **options)
    first_time = state is None
    if first_time:
        state = FastState(options=opts)
    elif opts == state.options and lora is None:
        return model  # idempotent: nothing new asked for

    from . import adapters, fast_modules, training
    from .backbones import find_spec

    transformer = _find_transformer(model)
    hf_model = transformer.model if transformer is not None else None
    spec = find_spec(hf_model) if hf_model is not None else None

    if spec is not None and opts.kernels != "off":
        _check_dtype(model, spec)

    # LoRA / QLoRA first: the fast forward reads whatever linear modules are there (plain or peft).
    if state.lora_config is None and adapters.has_adapters(model):
        # Adapters loaded from a saved folder (or added by hand): adopt their config so that a later
        # enable_fast(lora=same) is idempotent and the summary says "with LoRA".
        state.lora_config = adapters.get_lora_config(model)
    if lora is not None:
        if state.lora_config is None and not adapters.has_adapters(model):
            state.lora_config = adapters.apply_lora(model, lora, spec=spec, quantization=opts.quantization)
        elif not adapters.same_lora(state.lora_config, lora, spec):
            raise ValueError(
                "enable_fast(): this model already has LoRA adapters; call disable_fast() and load a fresh "
                "model to apply a different LoRA configuration"
            )
    elif opts.quantization and not adapters.has_adapters(model):
        raise ValueError(
            f"enable_fast(quantization={opts.quantization!r}) quantizes the frozen base for QLoRA and needs lora= "
            "(e.g. lora=16): a quantized base alone cannot be trained"
        )

    # Re-install the forward from scratch on every call: options may have changed.
    _release_graphs(state)
    state.patches.revert()
    state.options = opts
    setattr(model, _STATE_ATTR, state)
    adapters.attach_methods(model, state.patches)
    training.install_trainer_integration()

    if transformer is None:
        state.backend = "stock"
        warn_once(f"{type(model).__name__} has no Transformer module; fastst leaves it stock")
    elif spec is None:
        state.backend = "stock"
        warn_once(
            f"{type(hf_model).__name__} (model_type={getattr(hf_model.config, 'model_type', '?')!r}) is not a "
            f"supported backbone (supported: {', '.join(_supported())}); it runs stock"
            + (", with LoRA" if state.lora_config is not None else "")
        )
        fast_modules.install_stock_extras(model, transformer, state)
    elif opts.kernels == "off":
        state.backend = "stock forward (kernels='off')"
        fast_modules.install_stock_extras(model, transformer, state)
    else:
        state.family = spec.family
        fast_modules.install(model, transformer, spec, state)

    state.summary = _summary(model, state)
    logger.info(state.summary)
    return model


def _check_dtype(model, spec) -> None:
    import torch

    if spec.half_precision_ok:
        return
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if torch.float16 in dtypes:
        raise ValueError(
            f"{spec.family} activations overflow float16 (stock produces NaN); load the model in bfloat16 "
            "(model_kwargs={'torch_dtype': torch.bfloat16}) or float32"
        )


def _release_graphs(state: FastState) -> None:
    graphed = getattr(state.encoder, "graphed", None)
    if graphed is not None:
        graphed.release()
    state.encoder = None


def _supported() -> list[str]:
    from .backbones import REGISTRY

    return [spec.family for spec in REGISTRY]


def _summary(model, state: FastState) -> str:
    parts = [f"{type(model).__name__}"]
    if state.family:
        parts.append(f"{state.family} backbone")
    parts.append(f"backend: {state.backend}")
    if state.lora_config is not None:
        cfg = state.lora_config
        parts.append(f"LoRA r={cfg.r} on {sorted(cfg.target_modules) if cfg.target_modules else 'custom targets'}")
    if state.options.quantization:
        parts.append(f"base quantized {state.options.quantization}")
    if state.options.gradient_checkpointing != "off":
        parts.append(f"gradient checkpointing: {state.options.gradient_checkpointing}")
    return "patched " + "; ".join(parts)


def disable_fast(model):
    """Restore the stock forward code of ``model`` exactly; adapters (weights) stay where they are."""
    state = get_state(model)
    if state is None:
        return model
    _release_graphs(state)
    state.patches.revert()
    try:
        delattr(model, _STATE_ATTR)
    except AttributeError:
        pass
    logger.info(f"restored stock forward of {type(model).__name__}")
    return model


def patch(**defaults: Any) -> None:
    """Process-wide: every ``SentenceTransformer`` / ``CrossEncoder`` / ``SparseEncoder`` constructed from
    now on ends its ``__init__`` with ``enable_fast(self, **defaults)``, and the trainers get the fast
    training integration. ``unpatch()`` undoes it."""
    from . import autopatch

    autopatch.patch_classes(**defaults)


def unpatch() -> None:
    """Undo :func:`patch`: constructors and trainers are stock again (already-built models stay fast)."""
    from . import autopatch

    autopatch.unpatch_classes()
