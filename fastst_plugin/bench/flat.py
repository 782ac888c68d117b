"""The "flattened stock" contender: sentence-transformers' own padding-free path, made to run without
the flash-attn package.

ST (6.x) flattens text batches (``DataCollatorWithFlattening``: ``input_ids``/``position_ids`` of shape
``[1, T]``, ``cu_seq_lens_q/k``, ``max_length_q/k``, no ``attention_mask``) only when
``config._attn_implementation`` names a flash implementation whose varlen function imports. When
``flash-attn`` is installed we use ``attn_implementation="flash_attention_2"`` and ST does everything
itself. Otherwise we register PyTorch's built-in FlashAttention-2 varlen kernel
(``torch.nn.attention.varlen.varlen_attn``) as a transformers attention function under a name without
"flash" (a "flash" name that is no real flash package fails at load), and set the four per-instance
attributes that ``Transformer._can_flatten_inputs`` would have set (``data_collator``,
``model_forward_params``, ``_flatten_position_offset``, ``can_flatten_inputs``). Everything else
(MNRL's per-column forwards of flattened features, Pooling on ``cu_seq_lens_q``) is stock ST.

No mask function is registered for that name, so transformers builds no mask (none is needed: the
sequences are separated by ``cu_seq_lens``). Sliding windows follow transformers' flash convention
(``window = (sliding_window - 1, sliding_window - 1)``, right side 0 when causal).

On the CPU (tests) the same function runs a reference implementation (per-sequence SDPA), so the
plumbing is checked without a GPU.
"""

from __future__ import annotations

import inspect
from typing import Any

ATTN_NAME = "fastst_bench_varlen"
_registered = False
NOTES: set[str] = set()  # what the contender could not reproduce exactly (reported in the results)


def _varlen_impl():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except Exception:
        return None
    return varlen_attn


def flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
        from transformers.utils import is_flash_attn_2_available

        return bool(is_flash_attn_2_available())
    except Exception:
        return False


def _reference_varlen(q, k, v, cu_q, cu_k, scale, causal, window):
    """Per-sequence SDPA: ``q``/``k``/``v`` are ``[T, H, D]`` packed rows."""
    import torch
    import torch.nn.functional as F

    hq, hk = q.shape[1], k.shape[1]
    if hk != hq:
        k = k.repeat_interleave(hq // hk, dim=1)
        v = v.repeat_interleave(hq // hk, dim=1)
    out = torch.empty(q.shape[0], hq, v.shape[-1], dtype=q.dtype, device=q.device)
    cq = cu_q.tolist()
    ck = cu_k.tolist()
    for i in range(len(cq) - 1):
        qs, ks = q[cq[i] : cq[i + 1]], k[ck[i] : ck[i + 1]]
        vs = v[ck[i] : ck[i + 1]]
        n, m = qs.shape[0], ks.shape[0]
        mask = None
        if causal or window is not None:
            qi = torch.arange(n, device=q.device)[:, None] + (m - n)
            kj = torch.arange(m, device=q.device)[None, :]
            allowed = torch.ones(n, m, dtype=torch.bool, device=q.device)
            if causal:
                allowed &= kj <= qi
            if window is not None:
                left, right = window
                if left >= 0:
                    allowed &= kj >= qi - left
                if right >= 0:
                    allowed &= kj <= qi + right
            mask = allowed
        o = F.scaled_dot_product_attention(
            qs.transpose(0, 1).unsqueeze(0), ks.transpose(0, 1).unsqueeze(0), vs.transpose(0, 1).unsqueeze(0), attn_mask=mask, scale=scale
        )
        out[cq[i] : cq[i + 1]] = o.squeeze(0).transpose(0, 1)
    return out


def _cuda_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, window):
    import torch

    fn = _varlen_impl()
    if fn is None:
        raise RuntimeError("torch.nn.attention.varlen.varlen_attn is not available in this torch")
    params = inspect.signature(fn).parameters
    kwargs: dict[str, Any] = {}
    hq, hk = q.shape[1], k.shape[1]
    if hk != hq:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            k = k.repeat_interleave(hq // hk, dim=1)
            v = v.repeat_interleave(hq // hk, dim=1)
    if "scale" in params:
        kwargs["scale"] = scale
    elif scale is not None:
        q = q * (scale * q.shape[-1] ** 0.5)  # the kernel applies 1/sqrt(D)
    if "window_size" in params:
        if window is None:
            kwargs["window_size"] = (-1, 0) if causal else (-1, -1)
        else:
            kwargs["window_size"] = (window[0], 0) if causal else tuple(window)
    else:
        if "is_causal" in params:
            kwargs["is_causal"] = causal
        if window is not None:
            NOTES.add("this torch's varlen_attn has no window_size: sliding-window layers attended globally")
    cu_q = cu_q.to(device=q.device, dtype=torch.int32)
    cu_k = cu_k.to(device=q.device, dtype=torch.int32)
    return fn(q, k, v, cu_q, cu_k, int(max_q), int(max_k), **kwargs)


def varlen_attention_forward(
    module,
    query,
    key,
    value,
    attention_mask,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
):
    """A transformers attention function (``AttentionInterface``) over flattened sequences.

    ``query``: ``[1, Hq, T, D]``, ``key``/``value``: ``[1, Hk, T, D]``; transformers passes
    ``cu_seq_lens_q/k`` and ``max_length_q/k`` from the flattened features. Returns ``[1, T, Hq, D]``.
    """
    import torch

    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    max_q, max_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")
    if cu_q is None or cu_k is None:
        raise RuntimeError(
            "the flattened-stock attention got padded inputs (no cu_seq_lens): sentence-transformers did not flatten this batch"
        )
    if softcap is not None:
        raise RuntimeError("attention logit softcapping is not supported by the varlen kernel")
    if dropout and module.training:
        NOTES.add("attention dropout not applied (torch varlen kernel has none)")
    b, hq, t, d = query.shape
    if b != 1:
        raise RuntimeError(f"flattened inputs must have batch size 1, got {b}")
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", False))
    window = None
    if sliding_window is not None:
        window = (sliding_window - 1, 0 if causal else sliding_window - 1)
    q = query[0].transpose(0, 1)
    k = key[0].transpose(0, 1)
    v = value[0].transpose(0, 1)
    if q.is_cuda:
        target = v.dtype if v.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
        if torch.is_autocast_enabled("cuda"):
            target = torch.get_autocast_dtype("cuda")
        q, k, v = (x.to(target).contiguous() for x in (q, k, v))
        out = _cuda_varlen(q, k, v, cu_q, cu_k, max_q if max_q is not None else t, max_k if max_k is not None else t, scaling, causal, window)
    else:
        out = _reference_varlen(q, k, v, cu_q, cu_k, scaling, causal, window)
    return out.to(value.dtype).unsqueeze(0), None


def register() -> str:
    """Register the attention function (once); returns its name."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(ATTN_NAME, varlen_attention_forward)
        _registered = True
    return ATTN_NAME


def availability(device: str, cross_encoder: bool) -> tuple[str | None, str | None]:
    """(attn_implementation to load with, None) or (None, reason it is unavailable)."""
    if cross_encoder:
        return None, "ST does not flatten CrossEncoder (sequence-classification) inputs"
    try:
        from transformers import DataCollatorWithFlattening  # noqa: F401
    except ImportError:
        return None, "transformers has no DataCollatorWithFlattening"
    if device.startswith("cuda"):
        if flash_attn_available():
            return "flash_attention_2", None
        if _varlen_impl() is None:
            return None, "neither flash-attn nor torch.nn.attention.varlen.varlen_attn is available"
    return register(), None


def enable_flattening(transformer) -> None:
    """Turn on ST's flattened path on a ``Transformer`` whose attention is our registered function:
    the same attributes ``Transformer._can_flatten_inputs`` sets when it finds flash attention."""
    if getattr(transformer, "can_flatten_inputs", False):
        return  # real flash attention: ST already did it
    from transformers import DataCollatorWithFlattening

    transformer.data_collator = DataCollatorWithFlattening(
        return_seq_idx=True, return_flash_attn_kwargs=True, return_position_ids=True
    )
    if getattr(transformer, "model_forward_params", None) is not None:
        transformer.model_forward_params |= {"cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx"}
    infer = getattr(transformer, "_infer_flatten_position_offset", None)
    transformer._flatten_position_offset = infer() if infer is not None else 0
    transformer.can_flatten_inputs = True
