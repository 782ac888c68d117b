"""Options of :func:`fastst_plugin.enable_fast` and the environment variables that set their defaults.

Environment variables (all optional; read when ``enable_fast`` runs without an explicit value):

``FASTST``                  ``1`` turns on import-time patching (see :mod:`fastst_plugin.autopatch`).
``FASTST_LORA``             default ``lora`` for auto-patched models: a rank (``16``), ``true`` or unset.
``FASTST_GRADIENT_CHECKPOINTING``  default for ``gradient_checkpointing``.
``FASTST_KERNELS``          ``triton`` (default on CUDA), ``torch`` (reference ops only) or ``off``.
``FASTST_ATTENTION``        default attention backend.
``FASTST_LOG_LEVEL``        level of the ``fastst`` logger (default ``INFO``).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from typing import Any

GRADIENT_CHECKPOINTING_MODES = ("off", "layer", "selective", "offload")
QUANTIZATION_MODES = (None, "4bit", "8bit")
ATTENTION_BACKENDS = ("auto", "triton", "torch_varlen", "flash_attn", "sdpa", "reference")
KERNEL_MODES = ("triton", "torch", "off")


@dataclass
class FastOptions:
    """Everything ``enable_fast`` can be told besides ``lora``.

    gradient_checkpointing: ``False``/``"off"`` (default), ``True``/``"layer"`` (per layer,
        non-reentrant: only each layer's input is stored, one extra forward), ``"selective"``
        (per layer, storing matmul and attention outputs and recomputing norms, activations and
        RoPE: about half the activation memory for a few percent of time) or ``"offload"`` (per
        attention / MLP block, the block inputs in pinned host memory, copied asynchronously:
        device memory independent of depth). Details and numbers: :mod:`fastst_plugin.checkpointing`.
        Off by default because it costs step time that short texts do not need to pay; turn it on
        for long documents (EmbeddingGemma LoRA at 64 pairs of ~1k tokens: 34 GB without it).
        Checkpointed steps run eagerly (no CUDA graphs).
    quantization: ``None``, ``"4bit"`` (bitsandbytes nf4, double quant) or ``"8bit"``: the frozen base
        weights are quantized, LoRA stays in the compute dtype (QLoRA). Requires ``lora``.
    attention: ``"auto"`` picks per device and shape; or force one of ``ATTENTION_BACKENDS``.
    kernels: ``"triton"`` (fused kernels, padding-free path), ``"torch"`` (padding-free path on torch
        reference ops) or ``"off"`` / ``False`` (leave the forward stock: LoRA and checkpointing only).
    packing: pack every text of a call into one padding-free token stream (default on).
    cuda_graphs: replay the packed forward/backward from CUDA graphs captured per token-count bucket
        (default on; CUDA only, see :mod:`fastst_plugin.graphs` for when it falls back to eager).
    """

    gradient_checkpointing: str = "off"
    quantization: str | None = None
    attention: str = "auto"
    kernels: str = "triton"
    packing: bool = True
    cuda_graphs: bool = True
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def valid_names(cls) -> list[str]:
        return sorted(f.name for f in fields(cls) if f.name != "extra")

    def replace(self, **changes: Any) -> "FastOptions":
        return dataclasses.replace(self, **changes)


def _normalize_checkpointing(value: Any) -> str:
    if value is None or value is False:
        return "off"
    if value is True:
        return "layer"
    if isinstance(value, str) and value.lower() in GRADIENT_CHECKPOINTING_MODES:
        return value.lower()
    if isinstance(value, str) and value.lower() in ("true", "1", "on", "yes"):
        return "layer"
    if isinstance(value, str) and value.lower() in ("false", "0", "no", ""):
        return "off"
    raise ValueError(
        f"gradient_checkpointing={value!r} is not one of {GRADIENT_CHECKPOINTING_MODES} (or True/False)"
    )


def _normalize_quantization(value: Any) -> str | None:
    if value in (None, False, "none", "", 16, "16bit"):
        return None
    aliases = {4: "4bit", "4bit": "4bit", "nf4": "4bit", "4-bit": "4bit", 8: "8bit", "8bit": "8bit", "int8": "8bit", "8-bit": "8bit"}
    key = value.lower() if isinstance(value, str) else value
    if key in aliases:
        return aliases[key]
    raise ValueError(f"quantization={value!r} is not one of None, '4bit' (nf4), '8bit'")


def _normalize_kernels(value: Any) -> str:
    if value is True:
        return "triton"
    if value is False or value is None:
        return "off"
    if isinstance(value, str) and value.lower() in KERNEL_MODES:
        return value.lower()
    raise ValueError(f"kernels={value!r} is not one of {KERNEL_MODES} (or True/False)")


def _normalize_attention(value: Any) -> str:
    if value is None:
        return "auto"
    if isinstance(value, str) and value.lower() in ATTENTION_BACKENDS:
        return value.lower()
    raise ValueError(f"attention={value!r} is not one of {ATTENTION_BACKENDS}")


_NORMALIZERS = {
    "gradient_checkpointing": _normalize_checkpointing,
    "quantization": _normalize_quantization,
    "kernels": _normalize_kernels,
    "attention": _normalize_attention,
    "packing": bool,
    "cuda_graphs": lambda v: v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes", "on"),
}



_OFF = ("0", "false", "off", "no")
_ON = ("1", "true", "on", "yes")


def env_switch(name: str) -> bool:
    """A ``FASTST_*`` on/off switch that is on unless set to ``0``, ``false``, ``off`` or ``no``
    (read at each call, so a process can A/B it)."""
    return os.environ.get(name, "1").strip().lower() not in _OFF


def env_mode(name: str, default: str = "auto") -> str:
    """A multi-valued ``FASTST_*`` setting: ``"off"`` for 0/false/off/no, ``"on"`` for 1/true/on/yes,
    else the value in lower case (``default`` when unset or empty). Read at each call."""
    value = os.environ.get(name, "").strip().lower() or default
    return "off" if value in _OFF else "on" if value in _ON else value

def env_defaults() -> dict[str, Any]:
    """Option defaults taken from ``FASTST_*`` environment variables."""
    out: dict[str, Any] = {}
    for name, var in (
        ("gradient_checkpointing", "FASTST_GRADIENT_CHECKPOINTING"),
        ("kernels", "FASTST_KERNELS"),
        ("attention", "FASTST_ATTENTION"),
        ("quantization", "FASTST_QUANTIZATION"),
        ("cuda_graphs", "FASTST_CUDA_GRAPHS"),
    ):
        if os.environ.get(var):
            out[name] = os.environ[var]
    return out


def env_lora() -> Any:
    """``FASTST_LORA``: unset → no LoRA; ``true`` → family defaults; an int → that rank."""
    raw = os.environ.get("FASTST_LORA", "").strip()
    if not raw or raw.lower() in ("0", "false", "no", "off"):
        return None
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"FASTST_LORA={raw!r}: expected a rank (e.g. 16), 'true' or nothing") from None


def resolve_options(base: FastOptions | None = None, **options: Any) -> FastOptions:
    """Validate user options and merge them over ``base`` (or the environment defaults).

    Unknown names raise ``TypeError`` naming the valid ones; bad values raise ``ValueError``.
    """
    valid = FastOptions.valid_names()
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise TypeError(
            f"enable_fast() got unknown option(s) {unknown}; valid options are: lora, {', '.join(valid)}"
        )
    merged: dict[str, Any] = {}
    if base is None:
        merged.update(env_defaults())
    merged.update(options)
    normalized = {name: _NORMALIZERS[name](value) for name, value in merged.items()}
    return (base or FastOptions()).replace(**normalized)
