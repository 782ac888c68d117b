"""Apply a backbone's linear layers as they are: plain ``nn.Linear``, peft LoRA, or quantized.

The fast forward never swaps modules: it calls these helpers with the model's own modules, so
whatever peft or bitsandbytes put there is honoured. Plain LoRA (one active adapter, no DoRA or
other variant) goes through the fused LoRA node; anything else runs the module's own forward,
which is correct on packed ``[T, in]`` inputs too.
"""

from __future__ import annotations

import os
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .config import env_switch
from .kernels.lora import lora_linear

try:  # peft is a dependency, but keep the fast path importable without it
    from peft.tuners.lora import LoraLayer
except Exception:  # pragma: no cover
    LoraLayer = ()


def _plain_lora(mod):
    """(base, A, B, scaling, dropout_p) when ``mod`` is a peft LoRA layer we can fuse, else None."""
    if not isinstance(mod, LoraLayer) or getattr(mod, "disable_adapters", False) or getattr(mod, "merged", False):
        return None
    active = [a for a in mod.active_adapters if a in mod.lora_A]
    if len(active) != 1:
        return None
    name = active[0]
    if name in getattr(mod, "lora_variant", {}) or getattr(mod, "use_dora", {}).get(name, False):
        return None  # DoRA and other variants: peft's own forward
    if getattr(mod, "fan_in_fan_out", False):
        return None
    drop = mod.lora_dropout[name]
    p = drop.p if isinstance(drop, nn.Dropout) else 0.0
    return mod.base_layer, mod.lora_A[name].weight, mod.lora_B[name].weight, mod.scaling[name], p


def _base_weight(base):
    """``(weight, weight_fn)`` of a LoRA layer's base: a plain weight directly, a bitsandbytes one as
    a function that de-quantizes it on demand; ``(None, None)`` for anything else.

    The de-quantized weight is a temporary of the call that needs it (the fused LoRA node calls
    ``weight_fn`` in its forward and again in its backward, and saves neither): no full-precision
    copy of a quantized layer outlives one matmul, in or out of a checkpointed region, and the
    caching allocator hands the same block to the next layer's de-quantization.
    """
    w = base.weight
    if type(base) is nn.Linear or (isinstance(base, nn.Linear) and not hasattr(w, "quant_state") and w.dtype.is_floating_point):
        return w, None
    cls = type(w).__name__
    if cls == "Params4bit" and getattr(w, "quant_state", None) is not None:
        import bitsandbytes.functional as bnbf

        return None, lambda: bnbf.dequantize_4bit(w.data, w.quant_state)
    if cls == "Int8Params" and w.dtype == torch.int8:
        return None, partial(_dequantize_int8, base)
    return None, None  # unknown (not yet quantized, other formats): caller falls back to the module


def _dequantize_int8(base) -> torch.Tensor:
    """fp32 weight of a ``Linear8bitLt`` (row-wise absmax int8: ``W = CB * SCB / 127``).

    The fast path multiplies activations by this de-quantized weight in the compute dtype, where
    bitsandbytes' own forward quantizes the activations to int8 too (LLM.int8()): results differ
    from it by that activation quantization error, i.e. they are closer to the unquantized model.
    bitsandbytes moves ``SCB`` from the weight to ``base.state`` on its first forward."""
    w = base.weight
    scb = getattr(w, "SCB", None)
    if scb is None:
        scb = getattr(getattr(base, "state", None), "SCB", None)
    if scb is None:
        raise RuntimeError(f"{type(base).__name__}: int8 weight without its scales (SCB)")
    try:
        import bitsandbytes.functional as bnbf

        return bnbf.int8_vectorwise_dequant(w.data, scb)
    except (ImportError, AttributeError):  # pragma: no cover - bitsandbytes < 0.45
        return w.data.float() * (scb.float()[:, None] / 127.0)


def apply_linear(x: torch.Tensor, mod: nn.Module, training: bool) -> torch.Tensor:
    if type(mod) is nn.Linear:
        return F.linear(x, mod.weight, mod.bias)
    lora = _plain_lora(mod)
    if lora is not None:
        base, a, b, scaling, p = lora
        weight, weight_fn = _base_weight(base)
        if weight is not None or weight_fn is not None:
            return lora_linear(x, weight, base.bias, a, b, scaling, p, training, weight_fn=weight_fn)
    return mod(x)


def saves_its_input(mod: nn.Module) -> bool:
    """Whether ``apply_linear(x, mod)`` saves ``x`` itself for its backward (a plain linear, or the
    fused LoRA node over a plain or quantized base): an input the caller may recompute instead
    (``checkpointing.recomputed_when_saved``)."""
    if type(mod) is nn.Linear:
        return True
    lora = _plain_lora(mod)
    if lora is None:
        return False
    weight, weight_fn = _base_weight(lora[0])
    return weight is not None or weight_fn is not None


class FusedProjection:
    """Several linear layers reading the same input (Q/K/V, gate/up), run as one matmul.

    Parameters stay where they are (``query.weight`` etc.): the concatenated weight is built per call
    when it is trained, and cached while it is frozen (LoRA), keyed by the tensors' identity and
    version so an optimizer step, ``.to()`` or a load invalidates it — except, under LoRA, frozen
    groups over ``FROZEN_CAT_MAX_BYTES``, which the LoRA node multiplies block by block (a kept
    concatenation would be a second copy of most of a decoder's weights). LoRA adapters of the group are
    fused too: A matrices stacked, B matrices block-diagonal, so the whole group is one LoRA node.
    Quantized (QLoRA) bases are de-quantized and stacked per call. Mixed or unusual groups (DoRA,
    dropout, different adapter sets, a mix of quantized and plain bases) fall back to one call per
    module; the result is the same concatenation.
    """

    def __init__(self, modules: list[nn.Module]):
        self.modules = modules
        # One cached concatenation per set of tensors (the weights, the biases): (key, tensor).
        self._cache: dict[tuple, tuple] = {}

    def _frozen_cat(self, tensors):
        try:
            key = tuple((id(t), t._version, t.data_ptr(), t.dtype) for t in tensors)
        except RuntimeError:  # inference tensors (no version counter): concatenated per call
            return torch.cat([t.detach() for t in tensors], 0)
        slot = tuple(id(t) for t in tensors)
        cached = self._cache.get(slot)
        capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
        if cached is not None and cached[0] == key and not (capturing and not _graphs_read_cached_cat()):
            # Inside a CUDA graph capture too: the graph then reads this cached concatenation (made
            # by the warm-up before the capture), instead of concatenating the weights again at every
            # replay (bert-base: twelve 3.5 MB copies per forward, 0.4 ms per replayed mini-batch of a
            # cached loss). It cannot go stale behind a graph's back: a frozen parameter written in
            # place, replaced or retyped changes the graphs' parameter signature
            # (graphs.GraphedEncoder._param_signature), which drops them before their next replay.
            # (One slot per tensor set: a single slot shared by the weights and the biases was
            # replaced by the other's concatenation at every eager call, freeing the tensor a graph
            # had captured; on an H200 that gave garbage losses and an illegal memory access.)
            return cached[1]
        if capturing:
            return torch.cat([t.detach() for t in tensors], 0)  # never a graph pool's block as the cache
        # Made outside inference mode even under encode()'s torch.inference_mode: an inference tensor
        # kept here could not be saved for backward by a later training step.
        with torch.inference_mode(False):
            cat = torch.cat([t.detach() for t in tensors], 0)
        self._cache[slot] = (key, cat)
        return cat

    def _cat(self, tensors):
        if any(t is None for t in tensors):
            return None if all(t is None for t in tensors) else "mixed"
        if any(t.requires_grad for t in tensors):
            return torch.cat(tensors, 0)
        return self._frozen_cat(tensors)

    def __call__(self, x: torch.Tensor, training: bool) -> torch.Tensor:
        mods = self.modules
        if all(type(m) is nn.Linear for m in mods):
            w = self._cat([m.weight for m in mods])
            b = self._cat([m.bias for m in mods])
            if not isinstance(b, str):
                return F.linear(x, w, b)
        loras = [_plain_lora(m) for m in mods]
        if all(l is not None and l[4] == 0.0 for l in loras):
            b = self._cat([l[0].bias for l in loras])
            if not isinstance(b, str):
                fusable = True
                if all(type(l[0]) is nn.Linear for l in loras):
                    weights = [l[0].weight for l in loras]
                    if not any(t.requires_grad for t in weights) and _frozen_as_blocks(weights):
                        w, weight_fn = tuple(weights), None  # row blocks: the LoRA node multiplies each in place
                    else:
                        w, weight_fn = self._cat(weights), None
                else:
                    # QLoRA: the quantized bases de-quantized into one stacked temporary per call
                    # (one GEMM instead of one per projection); never cached, never saved.
                    fns = [_base_weight(l[0]) for l in loras]
                    fusable = all(wt is None and fn is not None for wt, fn in fns)
                    w, weight_fn = None, partial(_stacked, [fn for _, fn in fns])
                if fusable:
                    a_cat = torch.cat([l[1] for l in loras], 0)
                    scales = {l[3] for l in loras}
                    if len(scales) == 1:  # the usual case: one scale, applied by the LoRA node (no multiply kernels)
                        b_block, scale = torch.block_diag(*[l[2] for l in loras]), scales.pop()
                    else:
                        b_block, scale = torch.block_diag(*[l[2] * l[3] for l in loras]), 1.0
                    return lora_linear(x, w, b, a_cat, b_block, scale, 0.0, training, weight_fn=weight_fn)
        return torch.cat([apply_linear(x, m, training) for m in mods], -1)


# Frozen weights of a fused LoRA projection larger than this (bytes, all blocks) are multiplied block by
# block instead of concatenated once and kept: the kept copy duplicates them (Qwen3-0.6B's Q/K/V and
# gate/up: 0.58 GB on a 1.2 GB model; Qwen3-4B: ~5.6 GB), while small groups (BERT's Q/K/V: 3.5 MB per
# layer) keep one wider GEMM. FASTST_FROZEN_PROJECTIONS=cat / blocks forces either.
FROZEN_CAT_MAX_BYTES = 4 << 20


def _frozen_as_blocks(weights) -> bool:
    setting = os.environ.get("FASTST_FROZEN_PROJECTIONS", "auto").strip().lower()
    if setting in ("cat", "blocks"):
        return setting == "blocks"
    return sum(t.numel() * t.element_size() for t in weights) > FROZEN_CAT_MAX_BYTES


def _graphs_read_cached_cat() -> bool:
    """``FASTST_GRAPH_CACHED_CAT=0``: graphs concatenate frozen weights at every replay (as before
    2026-11-29's eleventh session; for A/B runs). Read at capture time."""
    return env_switch("FASTST_GRAPH_CACHED_CAT")


def _stacked(fns) -> torch.Tensor:
    return torch.cat([fn() for fn in fns], 0)
