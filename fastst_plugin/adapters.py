"""LoRA and QLoRA through peft, applied by fastst; merged saving and uploading.

What ``enable_fast(model, lora=...)`` does with the ``lora`` argument lives here. The adapters are
plain peft LoRA layers injected into the model's Hugging Face backbone (``model[0].model``) with
``peft.inject_adapter_in_model``, under the adapter name ``"default"``, with the same bookkeeping
transformers' own ``add_adapter`` sets (``_hf_peft_config_loaded``, ``peft_config``,
``base_model_name_or_path``). So everything that works on a hand-wired peft model works here:
``model.save_pretrained(path)`` writes a standard adapter folder (``adapter_config.json`` +
``adapter_model.safetensors`` + the Sentence Transformers files) that stock
``SentenceTransformer(path)`` reloads, with or without this package.

**Why not ``model.add_adapter``.** transformers 5.24 gates its peft integration on peft >= 0.22
(unreleased): ``add_adapter``, ``active_adapters``, ``set_adapter``, ``get_adapter_state_dict``…
raise ``ValueError`` with peft 0.21. Its ``load_adapter`` is not gated, so stock *reloading* works.
On such versions every adapted backbone gets instance-level stand-ins for the gated methods
(:func:`ensure_save_compat`) that call transformers' own code with the version check skipped. They
are part of the adapters, not of the fast forward: they stay after ``disable_fast`` (the adapters
stay too, and must still save). transformers 5.17 (gate at peft 0.19.1) needs none of this.

**Defaults.** ``lora=True`` is rank 16; an ``int`` is that rank; ``lora_alpha`` defaults to the rank
(scale 1.0), dropout to 0.0, targets to the family's ``spec.lora_targets`` (BERT
``query/key/value/dense``, ModernBERT ``Wqkv/Wo/Wi``, Gemma3/Qwen3 ``q/k/v/o/gate/up/down_proj``),
or every ``nn.Linear`` of the backbone for an unknown family. A ``peft.LoraConfig`` is honoured
field by field (rank, alpha, dropout, rsLoRA, DoRA, ``target_modules``, ``exclude_modules``,
``modules_to_save``, ``layers_to_transform``, ``init_lora_weights``, bias, …); one without
``target_modules`` gets peft's own per-architecture default when peft has one (what hand-wiring
would give, e.g. ``query/value`` for BERT), else the family defaults.

Model-dependent defaults, applied only where the user left the field unset:

* Embedding models (``SentenceTransformer``, ``SparseEncoder``): a BERT pooler (``pooler.dense``) is
  excluded from the default targets: sentence embeddings never read it.
* ``CrossEncoder``: the task head (every top-level module of ``*ForSequenceClassification`` besides
  the backbone: ``classifier``, ModernBERT's ``head``, Qwen3's ``score``) goes into
  ``modules_to_save``, i.e. is fully trained and saved with the adapter. A fresh reranker's head is
  randomly initialised, so LoRA alone could never train it. Pass ``modules_to_save=[]`` to opt out.

Only the backbone is touched: other Sentence Transformers modules (``Dense``, …) keep their
``requires_grad`` as stock (trainable), exactly as with hand-wired peft.

**QLoRA** (``quantization="4bit"`` / ``"8bit"``): before the adapters are injected, every frozen
``nn.Linear`` of the backbone (not the task head, not ``modules_to_save``, not the output embeddings)
is replaced in place by a bitsandbytes ``Linear4bit`` (nf4, double quantization, compute dtype = the
model's dtype) or ``Linear8bitLt`` under the same module name, so targets resolve and the state-dict
keys keep their names. Then the ``prepare_model_for_kbit_training`` steps that matter: norm weights
in fp32 when the model is in half precision, input embeddings' outputs require grad (checkpointing),
adapter weights in fp32. Load the model in bf16 for the usual QLoRA setup. A saved adapter reloads
on an un-quantized base (pass ``quantization_config`` to reload quantized).

**Merged saving.** :func:`save_pretrained_merged` (also ``model.save_pretrained_merged``) writes a
plain model folder: each adapted layer is merged in fp32 on a copy (the base de-quantized first), then
cast to the model's original dtype, so small updates survive; the live model is not modified and
training can continue. :func:`push_to_hub_merged` uploads that folder with huggingface_hub.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import tempfile
import threading
import types
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .log import logger

ADAPTER_NAME = "default"
DEFAULT_RANK = 16

# LoraConfig fields that are bookkeeping, not the adapter's shape: ignored when comparing configs.
_BOOKKEEPING_FIELDS = {
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "peft_version",
    "task_type",
    "auto_mapping",
    "runtime_config",
    "peft_type",
}
# Fields fastst fills in from the model when the user leaves them unset.
_MODEL_DEFAULT_FIELDS = ("target_modules", "modules_to_save", "exclude_modules")

# transformers' PeftAdapterMixin methods that call ``check_peft_version``.
_GATED_METHODS = (
    "add_adapter",
    "set_adapter",
    "disable_adapters",
    "enable_adapters",
    "active_adapters",
    "get_adapter_state_dict",
    "delete_adapter",
)


# --------------------------------------------------------------------------------------------------
# finding things


def _find_transformer(model):
    from .api import _find_transformer as find

    return find(model)


def _hf_model(model) -> nn.Module:
    """The Hugging Face model behind a Sentence Transformers model (or the HF model itself)."""
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):
        return model
    transformer = _find_transformer(model)
    hf = getattr(transformer, "model", None) if transformer is not None else None
    if hf is None:
        try:
            hf = model[0].model
        except Exception:
            hf = None
    if not isinstance(hf, nn.Module):
        raise TypeError(
            f"{type(model).__name__} has no Transformer module with a Hugging Face model: LoRA needs one "
            "(model[0].model)"
        )
    return hf


def _is_cross_encoder(model, hf) -> bool:
    try:
        from sentence_transformers import CrossEncoder

        if isinstance(model, CrossEncoder):
            return True
    except ImportError:  # pragma: no cover
        pass
    return type(hf).__name__.endswith("ForSequenceClassification")


def _backbone(hf: nn.Module) -> nn.Module:
    base = getattr(hf, "base_model", None)
    return base if isinstance(base, nn.Module) else hf


def _head_module_names(hf: nn.Module) -> list[str]:
    """Top-level modules of a task model besides its backbone that hold parameters (``classifier``…)."""
    prefix = getattr(hf, "base_model_prefix", None)
    backbone = _backbone(hf)
    if backbone is hf:
        return []
    names = []
    for name, child in hf.named_children():
        if name == prefix or child is backbone:
            continue
        if any(True for _ in child.parameters()):
            names.append(name)
    return names


def _linear_leaf_names(module: nn.Module) -> list[str]:
    return sorted({name.rsplit(".", 1)[-1] for name, m in module.named_modules() if isinstance(m, nn.Linear) and name})


def _uses_pooler_output(model) -> bool:
    transformer = _find_transformer(model) if model is not None else None
    return "pooler_output" in repr(getattr(transformer, "modality_config", ""))


def _lora_config_fields() -> list[str]:
    from peft import LoraConfig

    return [f.name for f in dataclasses.fields(LoraConfig) if f.init]


def _norm_value(value: Any) -> Any:
    if isinstance(value, (list, tuple, set, frozenset)):
        try:
            return frozenset(value)
        except TypeError:
            return tuple(value)
    return value


# --------------------------------------------------------------------------------------------------
# resolving the user's ``lora`` argument


_ACCEPTED = (
    "lora= accepts: True (rank 16 on the family's default targets), an int rank (e.g. 32), a "
    "peft.LoraConfig, or a dict of LoraConfig fields (e.g. {'r': 32, 'lora_alpha': 64, 'target_modules': [...]}); "
    "None means no LoRA"
)


def _requested(lora: Any) -> tuple[str, dict[str, Any]]:
    """(kind, explicitly requested fields) for a ``lora`` argument; raises TypeError/ValueError."""
    from peft import LoraConfig, PeftConfig

    if isinstance(lora, LoraConfig):
        return "config", {}
    if isinstance(lora, PeftConfig):
        raise TypeError(f"enable_fast() applies LoRA only; got a {type(lora).__name__}. {_ACCEPTED}")
    if lora is True:
        return "int", {"r": DEFAULT_RANK}
    if isinstance(lora, bool):
        raise TypeError(f"lora={lora!r}: {_ACCEPTED}")
    if isinstance(lora, int):
        if lora <= 0:
            raise ValueError(f"lora={lora}: the LoRA rank must be a positive integer")
        return "int", {"r": int(lora)}
    if isinstance(lora, Mapping):
        fields = _lora_config_fields()
        unknown = sorted(set(lora) - set(fields))
        if unknown:
            raise TypeError(
                f"lora dict has unknown LoraConfig field(s) {unknown}; valid fields are: {', '.join(sorted(fields))}"
            )
        return "dict", dict(lora)
    raise TypeError(f"lora={lora!r} (type {type(lora).__name__}) is not understood. {_ACCEPTED}")


def _default_targets(spec, model=None, hf=None):
    if spec is not None and getattr(spec, "lora_targets", None):
        return list(spec.lora_targets)
    if hf is None and model is not None:
        try:
            hf = _hf_model(model)
        except TypeError:
            hf = None
    if hf is not None:
        names = _linear_leaf_names(_backbone(hf))
        if names:
            return names
    return "all-linear"


def resolve_lora_config(lora: Any, spec=None, model=None):
    """Turn ``enable_fast``'s ``lora`` argument into a fresh ``peft.LoraConfig``.

    Accepted forms: ``True`` (rank 16), an ``int`` rank, a ``peft.LoraConfig`` (copied, never
    mutated) or a ``dict`` of ``LoraConfig`` fields. For ``True``/``int``/``dict`` the defaults are
    ``lora_alpha = r`` (scale 1), ``lora_dropout = 0.0`` and ``target_modules`` = ``spec.lora_targets``
    (every ``nn.Linear`` leaf name of the backbone when ``spec`` is None and ``model`` is given,
    peft's ``"all-linear"`` when neither is). With ``model`` (a Sentence Transformers model), the
    model-dependent defaults of the module docstring are filled in too (pooler excluded for
    embedding models, the head in ``modules_to_save`` for a ``CrossEncoder``).

    Raises ``TypeError`` for any other type (the message lists the accepted forms) or an unknown
    dict key (the message lists the valid fields), ``ValueError`` for a non-positive rank.
    """
    from peft import LoraConfig

    kind, fields = _requested(lora)
    hf = None
    if model is not None:
        try:
            hf = _hf_model(model)
        except TypeError:
            hf = None
    if kind == "config":
        cfg = copy.deepcopy(lora)
        if cfg.target_modules is None and getattr(cfg, "target_parameters", None) is None:
            if not _peft_has_default_targets(hf):
                cfg.target_modules = _default_targets(spec, model, hf)
        targets_defaulted = lora.target_modules is None
        mts_defaulted = lora.modules_to_save is None
        exclude_defaulted = getattr(lora, "exclude_modules", None) is None
    else:
        kwargs = dict(fields)
        r = kwargs.setdefault("r", DEFAULT_RANK)
        kwargs.setdefault("lora_alpha", r)
        kwargs.setdefault("lora_dropout", 0.0)
        targets_defaulted = "target_modules" not in kwargs and "target_parameters" not in kwargs
        if targets_defaulted:
            kwargs["target_modules"] = _default_targets(spec, model, hf)
        mts_defaulted = "modules_to_save" not in kwargs
        exclude_defaulted = "exclude_modules" not in kwargs
        try:
            cfg = LoraConfig(**kwargs)
        except TypeError as exc:  # pragma: no cover - unknown keys are caught above
            raise TypeError(f"could not build a peft.LoraConfig from {kwargs}: {exc}") from exc
    if hf is not None:
        _complete_for_model(cfg, model, hf, targets_defaulted, mts_defaulted, exclude_defaulted)
    return cfg


def _peft_has_default_targets(hf) -> bool:
    if hf is None:
        return False
    try:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as mapping
    except ImportError:  # pragma: no cover
        return False
    return getattr(getattr(hf, "config", None), "model_type", None) in mapping


def _complete_for_model(cfg, model, hf, targets_defaulted, mts_defaulted, exclude_defaulted) -> None:
    cross = _is_cross_encoder(model, hf)
    if cross and mts_defaulted:
        heads = _head_module_names(hf)
        if heads:
            cfg.modules_to_save = heads
    if not cross and exclude_defaulted and not _uses_pooler_output(model):
        pooler = [name for name, m in hf.named_modules() if isinstance(m, nn.Linear) and ".pooler." in f".{name}"]
        if pooler and targets_defaulted:
            cfg.exclude_modules = pooler
        elif pooler:
            _warn_unused_pooler_targets(cfg, pooler)


def _warn_unused_pooler_targets(cfg, pooler: list[str]) -> None:
    """The user's own ``target_modules`` (e.g. ``"dense"``) also match a BERT pooler, which an embedding
    model never runs: say so (their adapters stay at their initial values and are saved as such,
    in stock as here), and how to leave them out; the config is the user's, so it is kept."""
    try:
        from peft.tuners.tuners_utils import check_target_module_exists
    except ImportError:  # pragma: no cover
        return
    hit = [name for name in pooler if check_target_module_exists(cfg, name) is True]
    if hit:
        logger.warning(
            f"LoRA target_modules also match {hit}: Sentence Transformers embedding models never use BERT's "
            f"pooler, so these adapters get no gradient (saved untrained, in stock too). "
            f"Add exclude_modules={hit!r} to the LoraConfig to leave them out."
        )


def same_lora(existing_config, lora: Any, spec=None) -> bool:
    """True when ``lora`` asks for nothing different from ``existing_config`` (idempotent re-enable).

    Only what the user asks for is compared: ``True``/an int compares the rank; a dict compares its
    keys; a ``LoraConfig`` compares every field but bookkeeping ones (``base_model_name_or_path``,
    ``inference_mode``, …) and the fields fastst fills from the model when they are left ``None``
    (targets, ``modules_to_save``, ``exclude_modules``). False when ``existing_config`` is None or
    ``lora`` is not a valid argument.
    """
    if existing_config is None:
        return False
    try:
        kind, fields = _requested(lora)
    except (TypeError, ValueError):
        return False
    if kind == "config":
        fields = {}
        for name in _lora_config_fields():
            if name in _BOOKKEEPING_FIELDS:
                continue
            value = getattr(lora, name, None)
            if name in _MODEL_DEFAULT_FIELDS and value is None:
                continue
            fields[name] = value
    for name, value in fields.items():
        if name in _BOOKKEEPING_FIELDS:
            continue
        if _norm_value(getattr(existing_config, name, None)) != _norm_value(value):
            return False
    return True


def get_lora_config(model):
    """The active ``LoraConfig`` of a model's backbone (also for adapters loaded from a folder), or None."""
    try:
        hf = _hf_model(model)
    except TypeError:
        return None
    configs = getattr(hf, "peft_config", None) or {}
    if not isinstance(configs, Mapping) or not configs:
        return None
    return configs.get(ADAPTER_NAME) or next(iter(configs.values()))


def has_adapters(model) -> bool:
    """Whether the model's backbone carries peft adapters (injected by fastst or loaded from a folder)."""
    try:
        hf = _hf_model(model)
    except TypeError:
        return False
    if getattr(hf, "_hf_peft_config_loaded", False):
        return True
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover
        return False
    return any(isinstance(m, BaseTunerLayer) for m in hf.modules())


# --------------------------------------------------------------------------------------------------
# transformers' peft version gate


@functools.lru_cache(maxsize=None)
def _gate_blocks() -> bool:
    """True when the installed transformers refuses the installed peft in its integration methods."""
    try:
        from transformers.integrations import peft as tpeft

        tpeft.check_peft_version(min_version=tpeft.MIN_PEFT_VERSION)
    except ValueError:
        return True
    except Exception:  # pragma: no cover - unexpected layouts: assume no gate
        return False
    return False


_gate_lock = threading.RLock()
_gate_depth = 0
_gate_saved: Any = None


def _no_version_check(min_version: str) -> None:
    return None


@contextlib.contextmanager
def _peft_gate_open():
    """Within the block, transformers' integration does not check the peft version."""
    global _gate_depth, _gate_saved
    from transformers.integrations import peft as tpeft

    with _gate_lock:
        if _gate_depth == 0:
            _gate_saved = tpeft.check_peft_version
            tpeft.check_peft_version = _no_version_check
        _gate_depth += 1
    try:
        yield
    finally:
        with _gate_lock:
            _gate_depth -= 1
            if _gate_depth == 0:
                tpeft.check_peft_version = _gate_saved
                _gate_saved = None


class _UngatedMethod:
    """Instance-level stand-in for a gated ``PeftAdapterMixin`` method: the class's own code, ungated.

    A module-level class (not a closure) so that models stay picklable and ``deepcopy`` rebinds it.
    """

    def __init__(self, owner: nn.Module, name: str):
        self.owner = owner
        self.name = name

    def __call__(self, *args, **kwargs):
        func = getattr(type(self.owner), self.name)
        with _peft_gate_open():
            return func(self.owner, *args, **kwargs)

    def __repr__(self) -> str:
        return f"<fastst ungated {type(self.owner).__name__}.{self.name}>"


def ensure_save_compat(model) -> bool:
    """Make the adapter methods of a backbone usable on transformers versions that gate peft.

    Installs :class:`_UngatedMethod` instance attributes for transformers' gated
    ``PeftAdapterMixin`` methods (``active_adapters``, ``get_adapter_state_dict``, ``set_adapter``, …)
    when — and only when — the installed transformers refuses the installed peft. Idempotent; returns
    whether stand-ins are (now) installed. Deliberately not recorded in a PatchSet: the stand-ins
    belong to the adapters and must keep ``save_pretrained`` working after ``disable_fast``.
    """
    try:
        hf = _hf_model(model)
    except TypeError:
        return False
    if not _gate_blocks():
        return False
    for name in _GATED_METHODS:
        current = hf.__dict__.get(name)
        if isinstance(current, _UngatedMethod):
            continue
        if current is not None or not callable(getattr(type(hf), name, None)):
            continue
        object.__setattr__(hf, name, _UngatedMethod(hf, name))
    return True


# --------------------------------------------------------------------------------------------------
# quantization


def _import_bnb(mode: str):
    try:
        import bitsandbytes as bnb  # noqa: F401
        import bitsandbytes.nn  # noqa: F401
    except Exception as exc:
        raise RuntimeError(
            f"enable_fast(quantization={mode!r}) needs bitsandbytes, which could not be imported ({exc!r}). "
            "Install it with `pip install bitsandbytes` (0.45+ also runs on the CPU), or drop quantization= "
            "to train plain LoRA."
        ) from exc
    return bnb


def _model_dtype(hf: nn.Module) -> torch.dtype:
    counts: dict[torch.dtype, int] = {}
    for p in hf.parameters():
        if p.dtype.is_floating_point:
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    return max(counts, key=counts.get) if counts else torch.float32


def _is_bnb_linear(module: nn.Module) -> bool:
    w = getattr(module, "weight", None)
    return type(w).__name__ in ("Params4bit", "Int8Params")


def _matches(name: str, keys) -> bool:
    return any(name == k or name.endswith("." + k) or name.startswith(k + ".") or f".{k}." in f".{name}." for k in keys)


def _quantize_linear(linear: nn.Linear, mode: str, compute_dtype: torch.dtype, bnb) -> nn.Module:
    device = linear.weight.device
    weight = linear.weight.detach()
    bias = linear.bias.detach() if linear.bias is not None else None
    if mode == "4bit":
        new = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=bias is not None,
            compute_dtype=compute_dtype,
            compress_statistics=True,
            quant_type="nf4",
            quant_storage=torch.uint8,
            device="meta",
        )
        param = bnb.nn.Params4bit(
            weight.to("cpu") if device.type == "meta" else weight,
            requires_grad=False,
            compress_statistics=True,
            quant_type="nf4",
            quant_storage=torch.uint8,
            module=new,
        )
        param = param._quantize(device) if hasattr(param, "_quantize") else param.to(device)
        new.weight = param
    else:
        new = bnb.nn.Linear8bitLt(
            linear.in_features,
            linear.out_features,
            bias=bias is not None,
            has_fp16_weights=False,
            threshold=6.0,
            device="meta",
        )
        param = bnb.nn.Int8Params(weight.to("cpu").contiguous(), requires_grad=False, has_fp16_weights=False)
        new.weight = param.to(device)
    if bias is not None:
        new.bias = nn.Parameter(bias.clone(), requires_grad=False)
    new.requires_grad_(False)
    new.train(linear.training)
    return new


def _quantize_base(model, hf: nn.Module, mode: str, skip: list[str]) -> int:
    """Replace the frozen ``nn.Linear`` layers of ``hf`` by bitsandbytes layers, in place."""
    bnb = _import_bnb(mode)
    compute_dtype = _model_dtype(hf)
    out_emb = None
    try:
        out_emb = hf.get_output_embeddings()
    except Exception:
        out_emb = None
    count = 0
    # Names, not modules: a list of the modules would keep every replaced layer's full-precision
    # weight alive until the loop ends (peak = whole model + its quantized copy: 8 + 2 GB for
    # Qwen3-4B); looked up one at a time, each weight is freed as soon as its layer is replaced.
    names = [n for n, m in hf.named_modules() if type(m) is nn.Linear and m is not out_emb and not _matches(n, skip)]
    for name in names:
        module = hf.get_submodule(name)
        parent_name, _, child = name.rpartition(".")
        parent = hf.get_submodule(parent_name) if parent_name else hf
        try:
            new = _quantize_linear(module, mode, compute_dtype, bnb)
        except Exception as exc:
            raise RuntimeError(
                f"bitsandbytes could not quantize {name} ({mode}) on {module.weight.device}: {exc!r}. "
                "bitsandbytes 0.45+ runs nf4 on the CPU and both modes on CUDA."
            ) from exc
        setattr(parent, child, new)
        del module
        count += 1
    if count == 0:
        raise RuntimeError(f"quantization={mode!r}: the backbone has no nn.Linear layer to quantize")
    flag = "is_loaded_in_4bit" if mode == "4bit" else "is_loaded_in_8bit"
    object.__setattr__(hf, flag, True)
    object.__setattr__(hf, "_fastst_quantization", mode)
    return count


def _prepare_for_kbit_training(hf: nn.Module) -> None:
    """The parts of peft's ``prepare_model_for_kbit_training`` that apply to an injected model."""
    if _model_dtype(hf) in (torch.float16, torch.bfloat16):
        for module in hf.modules():
            name = type(module).__name__
            if isinstance(module, nn.LayerNorm) or name.endswith("Norm") or name.endswith("RMSNorm"):
                for p in module.parameters(recurse=False):
                    if p.dtype in (torch.float16, torch.bfloat16) and not p.requires_grad:
                        p.data = p.data.float()
    if hasattr(hf, "enable_input_require_grads"):
        try:
            hf.enable_input_require_grads()
        except Exception as exc:  # pragma: no cover - models without input embeddings
            logger.debug(f"enable_input_require_grads failed: {exc!r}")


# --------------------------------------------------------------------------------------------------
# applying LoRA


def apply_lora(model, lora: Any, spec=None, quantization: str | None = None):
    """Inject LoRA adapters into ``model``'s backbone, in place, and return the ``LoraConfig`` used.

    Args:
        model: a ``SentenceTransformer``, ``CrossEncoder`` or ``SparseEncoder`` (its HF model is
            ``model[0].model``).
        lora: see :func:`resolve_lora_config`.
        spec: the backbone family (``spec.lora_targets`` are the default targets), or None.
        quantization: ``None``, ``"4bit"`` (nf4) or ``"8bit"``: quantize the frozen base linear layers
            with bitsandbytes before injecting (QLoRA). ``RuntimeError`` if bitsandbytes is missing or
            cannot quantize on this device.

    Afterwards only the adapters (and ``modules_to_save`` / LoRA biases per the config) of the backbone
    are trainable; the backbone carries ``peft_config``/``_hf_peft_config_loaded`` like after
    ``add_adapter``, so Sentence Transformers' adapter methods and ``save_pretrained`` work.
    """
    from peft import inject_adapter_in_model

    hf = _hf_model(model)
    if has_adapters(hf):
        raise ValueError("this model already has peft adapters; load a fresh model to apply new ones")
    cfg = resolve_lora_config(lora, spec, model=model)
    cfg.base_model_name_or_path = hf.__dict__.get("name_or_path", None) or getattr(
        getattr(hf, "config", None), "_name_or_path", None
    )
    cfg.inference_mode = False
    base_dtype = _model_dtype(hf)
    if quantization:
        skip = list(cfg.modules_to_save or []) + _head_module_names(hf)
        n = _quantize_base(model, hf, quantization, skip)
        object.__setattr__(hf, "_fastst_base_dtype", base_dtype)
        logger.debug(f"quantized {n} linear layers to {quantization}")
    try:
        inject_adapter_in_model(cfg, hf, adapter_name=ADAPTER_NAME)
    except ValueError as exc:
        raise ValueError(f"peft could not apply {cfg.target_modules!r} to {type(hf).__name__}: {exc}") from exc
    object.__setattr__(hf, "_hf_peft_config_loaded", True)
    hf.peft_config = {ADAPTER_NAME: cfg}
    try:
        from peft.tuners.tuners_utils import cast_adapter_dtype

        cast_adapter_dtype(hf, adapter_name=ADAPTER_NAME, autocast_adapter_dtype=True)
    except ImportError:  # pragma: no cover
        pass
    if quantization:
        _prepare_for_kbit_training(hf)
    ensure_save_compat(hf)
    trainable = sum(p.numel() for p in hf.parameters() if p.requires_grad)
    total = sum(p.numel() for p in hf.parameters())
    logger.debug(f"LoRA applied: {trainable:,} trainable of {total:,} backbone parameters")
    return cfg


# --------------------------------------------------------------------------------------------------
# methods on the model


# Sentence Transformers' own adapter methods that replace modules of the backbone.
_STRUCTURAL_ADAPTER_METHODS = ("add_adapter", "load_adapter", "delete_adapter")


def attach_methods(model, patches) -> None:
    """Instance methods of a fast model (all recorded in ``patches``, so ``disable_fast`` reverts them).

    * ``save_pretrained_merged`` / ``push_to_hub_merged``: bound :func:`save_pretrained_merged` /
      :func:`push_to_hub_merged`.
    * ``add_adapter`` / ``load_adapter`` / ``delete_adapter`` (Sentence Transformers' peft methods, what
      stock LoRA scripts call, e.g. under ``FASTST=1``): run the stock method — with transformers' peft
      version gate open where it refuses the installed peft — then rebuild the fast forward, which
      holds references to the backbone's linear modules that peft has just replaced.

    Also makes the backbone's adapter methods usable on transformers versions that gate peft
    (:func:`ensure_save_compat`; not reverted, see there), whether or not it has adapters yet.
    """
    try:
        ensure_save_compat(model)
    except Exception as exc:  # pragma: no cover
        logger.debug(f"ensure_save_compat failed: {exc!r}")
    patches.set(model, "save_pretrained_merged", types.MethodType(save_pretrained_merged, model))
    patches.set(model, "push_to_hub_merged", types.MethodType(push_to_hub_merged, model))
    for name in _STRUCTURAL_ADAPTER_METHODS:
        if callable(getattr(type(model), name, None)):
            patches.set(model, name, types.MethodType(_StructuralAdapterMethod(name), model))


class _StructuralAdapterMethod:
    """``model.add_adapter`` & co. on a fast model: the stock method, then a rebuilt fast forward."""

    def __init__(self, name: str):
        self.name = name

    def __get__(self, obj, objtype=None):  # pragma: no cover - only used through MethodType
        return types.MethodType(self, obj)

    def __call__(self, model, *args, **kwargs):
        func = getattr(type(model), self.name)
        gate = _peft_gate_open() if _gate_blocks() else contextlib.nullcontext()
        with gate:
            result = func(model, *args, **kwargs)
        if self.name == "add_adapter":
            _upcast_half_adapters(model)
        _after_adapter_change(model)
        return result


def _upcast_half_adapters(model) -> None:
    """Float32 LoRA weights after ``add_adapter`` on a half-precision backbone, as ``enable_fast(lora=...)``.

    transformers' ``add_adapter`` creates the adapters in the base weights' dtype: on a float16 model
    (e.g. a checkpoint stored in float16, which transformers 5 loads as float16) the trainable LoRA
    weights are float16 and the first AdamW step turns every one whose gradient is zero (all ``lora_A``
    at step one) into NaN: 0 / (0 + eps) with eps = 1e-8 below float16's range. peft's own
    ``get_peft_model`` and fastst's ``enable_fast(lora=...)`` keep adapters in float32; the stock
    script run under fastst gets the same."""
    hf = _hf_model(model)
    if hf is None:
        return
    half = {p.dtype for n, p in hf.named_parameters() if "lora_" in n and p.dtype in (torch.float16, torch.bfloat16)}
    if not half:
        return
    try:
        from peft.tuners.tuners_utils import cast_adapter_dtype
    except ImportError:  # pragma: no cover
        return
    for name in list(getattr(hf, "peft_config", {}) or {}):
        cast_adapter_dtype(hf, adapter_name=name, autocast_adapter_dtype=True)
    kinds = "/".join(sorted(str(d).replace("torch.", "") for d in half))
    logger.warning(
        f"add_adapter made {kinds} LoRA weights; fastst keeps them in float32 as peft's get_peft_model and "
        "enable_fast(lora=...) do (float16 trainable weights turn NaN at the first AdamW step)"
    )


def _after_adapter_change(model) -> None:
    """Re-enable fastst on ``model`` with the same options, so the fast forward sees the new modules."""
    from . import api
    from .config import FastOptions

    ensure_save_compat(model)
    state = api.get_state(model)
    if state is None:
        return
    options = {f.name: getattr(state.options, f.name) for f in dataclasses.fields(FastOptions) if f.name != "extra"}
    config = get_lora_config(model)
    api.disable_fast(model)
    api.enable_fast(model, **options)
    new_state = api.get_state(model)
    if new_state is not None and config is not None and has_adapters(model):
        new_state.lora_config = config
        try:
            new_state.summary = api._summary(model, new_state)
        except Exception:  # pragma: no cover - cosmetic
            pass


# --------------------------------------------------------------------------------------------------
# merging


def _dequantized_weight(module: nn.Module) -> torch.Tensor:
    """float32 weight of a bitsandbytes linear layer, computed without touching the layer."""
    weight = module.weight
    kind = type(weight).__name__
    if kind == "Params4bit":
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(weight.data, weight.quant_state).to(torch.float32)
    if kind == "Int8Params":
        scb = getattr(weight, "SCB", None)
        if scb is None:
            scb = getattr(getattr(module, "state", None), "SCB", None)
        if weight.data.dtype != torch.int8 or scb is None:
            return weight.data.to(torch.float32)  # not quantized (yet)
        return weight.data.to(torch.float32) * (scb.to(weight.device, torch.float32).view(-1, 1) / 127.0)
    return weight.detach().to(torch.float32)


def _fp32_plain_copy(base: nn.Module) -> nn.Module:
    """A float32 copy of a LoRA layer's base layer, de-quantized, sharing nothing with it."""
    if _is_bnb_linear(base) or isinstance(base, nn.Linear):
        weight = _dequantized_weight(base) if _is_bnb_linear(base) else base.weight
        weight = weight.detach().to(torch.float32, copy=True)
        out = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        out.weight = nn.Parameter(weight.reshape(base.out_features, base.in_features), requires_grad=False)
        if base.bias is not None:
            out.bias = nn.Parameter(base.bias.detach().to(torch.float32, copy=True), requires_grad=False)
        return out
    copied = copy.deepcopy(base)
    for p in copied.parameters():
        p.data = p.data.to(torch.float32, copy=True)
        p.requires_grad_(False)
    return copied


def _merged_base_tensors(layer) -> dict[str, torch.Tensor]:
    """The base layer's tensors with the active adapters merged, computed in float32 on a copy."""
    from peft.tuners.lora import layer as lora_layer

    base = layer.get_base_layer()
    plain = _fp32_plain_copy(base)
    adapters: list[str] = []
    if not getattr(layer, "disable_adapters", False) and not getattr(layer, "merged", False):
        known = set(getattr(layer, "lora_A", {}) or {}) | set(getattr(layer, "lora_embedding_A", {}) or {})
        adapters = [a for a in layer.active_adapters if a in known]
    if adapters:
        twin = copy.copy(layer)
        object.__setattr__(twin, "_modules", dict(layer._modules))
        object.__setattr__(twin, "_parameters", dict(layer._parameters))
        object.__setattr__(twin, "_buffers", dict(layer._buffers))
        twin._modules["base_layer"] = plain
        for key in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"):
            sub = layer._modules.get(key)
            if sub is not None:
                sub_copy = copy.deepcopy(sub)
                for p in sub_copy.parameters():
                    p.data = p.data.to(torch.float32)
                twin._modules[key] = sub_copy
        twin.merged_adapters = []
        twin._caches = {}
        if _is_bnb_linear(base):
            twin.__class__ = lora_layer.Linear
        twin.merge(safe_merge=False, adapter_names=adapters)
    return dict(plain.state_dict(keep_vars=True))


def _module_own_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    out = {name: p for name, p in module._parameters.items() if p is not None}
    skip = getattr(module, "_non_persistent_buffers_set", set())
    out.update({name: b for name, b in module._buffers.items() if b is not None and name not in skip})
    return out


@torch.no_grad()
def merged_state_dict(model, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The backbone's state dict as a plain (adapter-free, de-quantized) model would have it.

    Adapters are merged in float32 on copies, then every floating tensor is cast to ``dtype``
    (default: the backbone's dtype before quantization, else its current dtype) and moved to the CPU.
    The live model is not modified.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    try:
        from peft.utils import ModulesToSaveWrapper
    except ImportError:  # pragma: no cover
        ModulesToSaveWrapper = ()
    try:
        from peft.utils.other import AuxiliaryTrainingWrapper
    except ImportError:  # pragma: no cover
        AuxiliaryTrainingWrapper = ()

    hf = _hf_model(model)
    target = dtype or getattr(hf, "_fastst_base_dtype", None) or _model_dtype(hf)
    out: dict[str, torch.Tensor] = {}
    done: list[str] = []

    def finish(tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.detach()
        if tensor.dtype.is_floating_point:
            return tensor.to(device="cpu", dtype=target)
        return tensor.to("cpu")

    for name, module in hf.named_modules():
        if any(name.startswith(d + ".") for d in done):
            continue
        if isinstance(module, BaseTunerLayer):
            tensors = _merged_base_tensors(module)
            done.append(name)
        elif ModulesToSaveWrapper and isinstance(module, ModulesToSaveWrapper):
            active = module.active_adapters if hasattr(module, "active_adapters") else [module.active_adapter]
            active = [active] if isinstance(active, str) else list(active)
            chosen = module.original_module
            if not getattr(module, "disable_adapters", False):
                for a in active:
                    if a in module.modules_to_save:
                        chosen = module.modules_to_save[a]
                        break
            tensors = dict(chosen.state_dict(keep_vars=True))
            done.append(name)
        elif AuxiliaryTrainingWrapper and isinstance(module, AuxiliaryTrainingWrapper):
            raise NotImplementedError(
                f"save_pretrained_merged: {type(module).__name__} at {name!r} (e.g. trainable tokens) cannot be "
                "merged by fastst yet; save the adapters with model.save_pretrained instead"
            )
        elif _is_bnb_linear(module):
            plain = _fp32_plain_copy(module)
            tensors = dict(plain.named_parameters())
            done.append(name)
        else:
            tensors = _module_own_tensors(module)
        for key, tensor in tensors.items():
            out[f"{name}.{key}" if name else key] = finish(tensor)
    return out


def _plain_twin(model, dtype: torch.dtype | None = None) -> nn.Module:
    """A plain HF model of the backbone's class holding the merged weights (built on meta, then assigned)."""
    hf = _hf_model(model)
    state = merged_state_dict(model, dtype)
    config = copy.deepcopy(hf.config)
    for attr in ("quantization_config",):
        if hasattr(config, attr):
            try:
                delattr(config, attr)
            except AttributeError:
                pass
    with torch.device("meta"):
        plain = type(hf)(config)
    missing, unexpected = plain.load_state_dict(state, strict=False, assign=True)
    # Tied weights (e.g. an MLM decoder tied to the word embeddings) are re-tied below.
    tied = set()
    try:
        tied = set(getattr(plain, "all_tied_weights_keys", {}) or {})
    except Exception:
        tied = set()
    real_missing = [k for k in missing if k not in tied]
    if unexpected or real_missing:
        raise RuntimeError(
            "save_pretrained_merged: the merged weights do not match a plain "
            f"{type(hf).__name__}: missing {real_missing[:8]}, unexpected {list(unexpected)[:8]}"
        )
    # Non-persistent buffers (position ids, rotary frequencies) are not in a state dict: copy them.
    live_buffers = dict(hf.named_buffers())
    for name, buf in list(plain.named_buffers()):
        if buf.device.type == "meta":
            source = live_buffers.get(name)
            if source is None:
                continue
            owner_name, _, leaf = name.rpartition(".")
            owner = plain.get_submodule(owner_name) if owner_name else plain
            owner._buffers[leaf] = source.detach().to("cpu", copy=True)
    try:
        plain.tie_weights()
    except Exception:  # pragma: no cover
        pass
    for name, p in plain.named_parameters():
        if p.device.type == "meta":
            raise RuntimeError(f"save_pretrained_merged: {name} was left without a value")
    plain.requires_grad_(False)
    plain.eval()
    return plain


@contextlib.contextmanager
def _backbone_swapped(model, plain: nn.Module):
    transformer = _find_transformer(model)
    if transformer is None:
        raise TypeError(f"{type(model).__name__} has no Transformer module")
    original = transformer.model
    transformer.model = plain
    try:
        yield
    finally:
        transformer.model = original


def save_pretrained_merged(model, path: str, dtype: torch.dtype | str | None = None, **save_kwargs) -> str:
    """Save ``model`` as a plain model folder with its LoRA adapters merged into the weights.

    The folder is what ``model.save_pretrained`` writes for an un-adapted model (``config.json``,
    ``model.safetensors``, tokenizer, modules, README): stock sentence-transformers loads it without
    fastst or peft. Each adapted layer is merged in float32 (a quantized base is de-quantized
    first), then cast to ``dtype`` (default: the model's dtype before quantization). The model
    itself is left as it was (adapters, quantization and all), so training can go on.

    Args:
        model: the Sentence Transformers model (adapters optional: without any, this is a plain save).
        path: output folder.
        dtype: ``torch.float32`` / ``"bfloat16"`` / … to save in another precision.
        **save_kwargs: passed to ``model.save_pretrained`` (``model_name``, ``create_model_card``,
            ``safe_serialization``, …).

    Returns the path.
    """
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.replace("torch.", ""))
    hf = _hf_model(model)
    if not has_adapters(hf) and not getattr(hf, "_fastst_quantization", None) and dtype is None:
        model.save_pretrained(path, **save_kwargs)
        return path
    plain = _plain_twin(model, dtype)
    with _backbone_swapped(model, plain):
        model.save_pretrained(path, **save_kwargs)
    logger.info(f"saved merged model to {path}")
    return path


def push_to_hub_merged(
    model,
    repo_id: str,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    exist_ok: bool = True,
    dtype: torch.dtype | str | None = None,
    **save_kwargs,
) -> str:
    """Upload the merged model folder of :func:`save_pretrained_merged` to the Hugging Face Hub.

    Creates the repository if needed (``HfApi.create_repo(..., exist_ok=True)``), writes the merged
    folder to a temporary directory and uploads it with ``HfApi.upload_folder``. Returns the commit
    URL (or the pull-request URL with ``create_pr=True``).
    """
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    repo_url = api.create_repo(repo_id=repo_id, private=private, repo_type=None, exist_ok=exist_ok or create_pr)
    repo_id = getattr(repo_url, "repo_id", None) or repo_id
    card_data = getattr(model, "model_card_data", None)
    if card_data is not None and hasattr(card_data, "set_model_id"):
        card_data.set_model_id(repo_id)
    if revision is not None:
        api.create_branch(repo_id=repo_id, branch=revision, exist_ok=True)
    if commit_message is None:
        commit_message = f"Add new {type(model).__name__} model (LoRA merged)"
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained_merged(model, tmp, dtype=dtype, **save_kwargs)
        folder_url = api.upload_folder(
            repo_id=repo_id,
            folder_path=tmp,
            commit_message=commit_message,
            revision=revision,
            create_pr=create_pr,
        )
    if create_pr:
        return getattr(folder_url, "pr_url", None) or str(folder_url)
    return getattr(folder_url, "commit_url", None) or str(folder_url)


def is_quantized(model) -> str | None:
    """``"4bit"`` / ``"8bit"`` when fastst quantized the backbone, else None."""
    try:
        return getattr(_hf_model(model), "_fastst_quantization", None)
    except TypeError:
        return None


__all__ = [
    "resolve_lora_config",
    "apply_lora",
    "has_adapters",
    "same_lora",
    "get_lora_config",
    "attach_methods",
    "ensure_save_compat",
    "merged_state_dict",
    "save_pretrained_merged",
    "push_to_hub_merged",
    "is_quantized",
]
