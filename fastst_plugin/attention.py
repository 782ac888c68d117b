"""Varlen attention over packed sequences, with the backend chosen per device, dtype and shape.

All backends take ``q: [T, Hq, D]``, ``k, v: [T, Hkv, D]`` (several packed sequences, boundaries in
``cu_seqlens``) and return ``[T, Hq, D]``. Masks: bidirectional or causal, plus an optional sliding
window ``(left, right)`` meaning a query at position i sees keys j with ``i - left <= j <= i + right``
inside its own sequence (stock's bidirectional window ``|i - j| <= w`` is ``(w, w)``).

Backends:
  ``torch_varlen``  PyTorch's built-in FlashAttention-2 varlen kernel: CUDA, fp16/bf16, windows, GQA/MQA
                    without repeating K/V (ATen's ``_flash_attention_forward``/``_backward`` called
                    directly; ``torch.nn.attention.varlen.varlen_attn`` if that fails, or with
                    ``FASTST_ATEN_FLASH=0``: windows and GQA when its signature has them).
  ``flash_attn``    the flash-attn package's ``flash_attn_varlen_func`` when installed.
  ``sdpa``          ``scaled_dot_product_attention``: on the CPU (its default there) per sequence,
                    unpadded; elsewhere re-padded to ``[N, L]`` with a mask. Any device and dtype,
                    supports everything (also attention-probability dropout); the fallback for what
                    the flash kernels refuse.
  ``triton``        this package's Triton varlen kernel (``kernels/varlen_attention.py``), built for many
                    short sequences: CUDA fp16/bf16/fp32 (and the interpreter), head dim <= 128, GQA,
                    causal, windows; no dropout (falls back when p > 0). ``auto`` picks it on CUDA for
                    fp16/bf16 when ``max_seqlen <= TRITON_AUTO_MAX_SEQLEN`` (256);
                    ``FASTST_TRITON_ATTENTION=0`` turns that off. Measured on an H200
                    (tests/gpu/attention_bench.py, 128 texts of ~48 tokens): fwd+bwd 532 vs 936 µs
                    (bert-base shape), 640 vs 807 (MiniLM), 810 vs 1114 (Qwen3, causal), 452 vs 602
                    (ModernBERT window); but slower than torch's flash kernel on 16 texts of ~800
                    tokens (1468 vs 952 µs), hence the length cut-off.
  ``reference``     block-diagonal masked attention written out in plain torch: the test oracle.
"""

from __future__ import annotations

import functools
import inspect
import math
import os

import torch
import torch.nn.functional as F

from .log import warn_once

# 'auto' picks the Triton kernel only up to this max_seqlen: it wins on many short texts and loses to
# torch's FlashAttention-2 on long documents (measured, see the module docstring).
TRITON_AUTO_MAX_SEQLEN = 256


def _triton_attention_enabled() -> bool:
    """On by default (measured faster for short texts); ``FASTST_TRITON_ATTENTION=0`` opts out."""
    return os.environ.get("FASTST_TRITON_ATTENTION", "1") != "0"


def _triton_supported(q, k, cu_seqlens, dropout_p) -> bool:
    from .kernels import varlen_attention as va

    return va.supported(q, k, cu_seqlens, dropout_p)


@functools.lru_cache(maxsize=None)
def _torch_varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except Exception:
        return None
    params = inspect.signature(varlen_attn).parameters
    return varlen_attn, "window_size" in params, "enable_gqa" in params, "is_causal" in params


@functools.lru_cache(maxsize=None)
def _flash_attn():
    try:
        from flash_attn import flash_attn_varlen_func
    except Exception:
        return None
    return flash_attn_varlen_func


def available_backends() -> dict[str, str]:
    """Backend name -> availability note, for ``fastst info``."""
    out = {}
    tv = _torch_varlen()
    if tv is None:
        out["torch_varlen"] = "unavailable (torch has no torch.nn.attention.varlen)"
    else:
        cuda = torch.cuda.is_available()
        out["torch_varlen"] = (
            f"{'available' if cuda else 'needs CUDA'} ("
            + ("ATen flash kernels called directly: windows, GQA without repeating K/V"
               if _aten_flash_ops() is not None and not _ATEN_FLASH_BROKEN
               else f"varlen_attn: windows: {'yes' if tv[1] else 'no'}, GQA: {'yes' if tv[2] else 'repeat kv'}")
            + ")"
        )
    out["flash_attn"] = "available" if _flash_attn() is not None else "not installed"
    from .kernels._backend import triton_available

    out["triton"] = (
        ("available" if torch.cuda.is_available() else "needs CUDA (or TRITON_INTERPRET=1)")
        + f" (auto: {'on' if _triton_attention_enabled() else 'off, FASTST_TRITON_ATTENTION=0'})"
        if triton_available() else "unavailable (triton does not import)"
    )
    out["sdpa"] = "available (padded, masked)"
    out["reference"] = "available (test oracle)"
    return out


def choose_backend(requested: str, q: torch.Tensor, window, dropout_p: float, k=None, cu_seqlens=None,
                   max_seqlen=None) -> str:
    if requested == "triton":
        if k is None or _triton_supported(q, k, cu_seqlens, dropout_p):
            return "triton"
        warn_once("attention='triton' cannot run this call (dropout, head dim, dtype or device): using 'auto'")
        requested = "auto"
    if requested not in ("auto", None):
        return requested
    if (
        q.is_cuda and k is not None and _triton_attention_enabled() and max_seqlen is not None
        and max_seqlen <= TRITON_AUTO_MAX_SEQLEN and q.dtype in (torch.float16, torch.bfloat16)
        and _triton_supported(q, k, cu_seqlens, dropout_p)
    ):
        return "triton"
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256:
        if _flash_attn() is not None:
            return "flash_attn"
        tv = _torch_varlen()
        if tv is not None and (window is None or tv[1]):
            return "torch_varlen"
    return "sdpa"


# Backends whose autograd node saves the q and k it is given as they are (first-order nodes: no
# double backward through them anyway); SDPA saves padded copies, the reference its own products.
_SAVES_QK_AS_GIVEN = ("triton", "torch_varlen", "flash_attn")


def varlen_attention(
    q, k, v, cu_seqlens, max_seqlen: int, *, causal: bool = False, window=None, scale: float | None = None,
    dropout_p: float = 0.0, backend: str = "auto", seq_info=None, qk_recompute=None,
):
    """Attention within each packed sequence. ``seq_info`` (a PackedBatch) lets ``sdpa`` re-pad cheaply.
    ``qk_recompute``: a function giving ``(q, k)`` back (the RoPE kernel on its own saved inputs); when
    the chosen backend's node would save ``q`` and ``k`` as they are, they are recomputed with it in
    backward instead of stored (``checkpointing.recomputed_together_when_saved``)."""
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    name = choose_backend(backend, q, window, dropout_p, k, cu_seqlens, max_seqlen)
    if qk_recompute is not None and name in _SAVES_QK_AS_GIVEN:
        from .checkpointing import recomputed_together_when_saved

        with recomputed_together_when_saved((q, k), qk_recompute):
            return _run(name, q, k, v, cu_seqlens, max_seqlen, causal, window, scale, dropout_p, seq_info)
    return _run(name, q, k, v, cu_seqlens, max_seqlen, causal, window, scale, dropout_p, seq_info)


def _run(name, q, k, v, cu_seqlens, max_seqlen, causal, window, scale, dropout_p, seq_info):
    if name in ("torch_varlen", "flash_attn"):
        # FlashAttention reads rows and heads by stride: the views of the fused QKV projection need
        # only a unit stride on the head dimension (copying them cost ~14 % of an inference batch's
        # GPU time, measured on an H200: three copies per layer).
        q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    elif name != "triton":
        # The Triton kernel reads q/k/v as strided views too; the others get dense copies (a no-op
        # for tensors that already are).
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if dropout_p and name != "sdpa" and name != "reference":
        warn_once(f"attention-probability dropout (p={dropout_p}) is not applied by the {name} kernel; hidden dropout is")
    if name == "triton":
        from .kernels.varlen_attention import VarlenAttentionFn

        return VarlenAttentionFn.apply(q, k, v, cu_seqlens, int(max_seqlen), float(scale), bool(causal),
                                       None if window is None else tuple(window), None)
    if name == "torch_varlen":
        return _run_torch_varlen(q, k, v, cu_seqlens, max_seqlen, causal, window, scale)
    if name == "flash_attn":
        fn = _flash_attn()
        ws = (-1, -1) if window is None else window
        return fn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p=0.0, softmax_scale=scale,
                  causal=causal, window_size=ws)
    if name == "reference":
        return attention_reference(q, k, v, cu_seqlens, causal=causal, window=window, scale=scale)
    return _run_sdpa(q, k, v, cu_seqlens, max_seqlen, causal, window, scale, dropout_p, seq_info)


@functools.lru_cache(maxsize=None)
def _aten_flash_ops():
    """``(forward, backward)`` of ATen's FlashAttention-2 (the kernels behind ``varlen_attn``), or None."""
    fwd = getattr(torch.ops.aten, "_flash_attention_forward", None)
    bwd = getattr(torch.ops.aten, "_flash_attention_backward", None)
    if fwd is None or bwd is None or os.environ.get("FASTST_ATEN_FLASH", "1") == "0":
        return None
    return fwd, bwd


class _FlashVarlenFn(torch.autograd.Function):
    """ATen's FlashAttention-2 varlen kernels called directly, with K/V of fewer heads (GQA/MQA) as they are.

    Why not ``torch.nn.attention.varlen.varlen_attn``: before torch 2.13 it has no ``enable_gqa``, so
    K/V had to be repeated to the query's head count first: a [T, Hq, D] copy of each in the forward
    and a reduction of their gradients in the backward (H200, 64 pairs of 1,024-token documents:
    ~24 ms of a ~320 ms Qwen3-0.6B step). FlashAttention-2 reads shared K/V heads itself; its
    backward still expands dK/dV internally and sums them, so the saving is mostly the forward copy:
    0.15-0.32 ms per Gemma3/Qwen3 layer at ~40k tokens (tests/gpu/flash_direct_check.py). The
    kernels are the ones ``varlen_attn`` calls; without its custom-op wrapper each call also costs
    less host time in eager steps.
    """

    @staticmethod
    def forward(ctx, q, k, v, cu, max_seqlen, causal, left, right, scale):
        fwd, _ = _aten_flash_ops()
        out, lse, philox_seed, philox_offset, _ = fwd(
            q, k, v, cu, cu, max_seqlen, max_seqlen, 0.0, causal, False,
            scale=scale, window_size_left=left, window_size_right=right,
        )
        ctx.save_for_backward(q, k, v, out, lse, cu, philox_seed, philox_offset)
        ctx.args = (max_seqlen, causal, left, right, scale)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        _, bwd = _aten_flash_ops()
        q, k, v, out, lse, cu, philox_seed, philox_offset = ctx.saved_tensors
        max_seqlen, causal, left, right, scale = ctx.args
        if grad_out.stride(-1) != 1:
            grad_out = grad_out.contiguous()
        dq, dk, dv = bwd(
            grad_out, q, k, v, out, lse, cu, cu, max_seqlen, max_seqlen, 0.0, causal, philox_seed, philox_offset,
            scale=scale, window_size_left=left, window_size_right=right,
        )
        return dq, dk, dv, None, None, None, None, None, None


# Set once the direct call failed on this torch (an ATen signature it does not have): varlen_attn then.
_ATEN_FLASH_BROKEN: list[str] = []


def _run_torch_varlen(q, k, v, cu, max_seqlen, causal, window, scale):
    fn, has_window, has_gqa, has_is_causal = _torch_varlen()
    if _aten_flash_ops() is not None and not _ATEN_FLASH_BROKEN and (has_window or window is None):
        left, right = window if window is not None else (-1, -1)
        if causal:
            right = 0 if window is not None else -1
        try:
            return _FlashVarlenFn.apply(q, k, v, cu, int(max_seqlen), bool(causal), int(left), int(right), float(scale))
        except (TypeError, RuntimeError) as exc:
            if isinstance(exc, torch.OutOfMemoryError) or (
                torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
            ):
                raise  # out of memory, or a failure inside a CUDA-graph capture: not a signature problem
            _ATEN_FLASH_BROKEN.append(repr(exc))
            warn_once(f"direct FlashAttention call failed ({exc!r}); using torch.nn.attention.varlen")
    if k.shape[1] != q.shape[1] and not has_gqa:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    kwargs = {"scale": scale}
    if has_window:
        left, right = window if window is not None else (-1, -1)
        if causal:
            right = 0
        kwargs["window_size"] = (left, right)
    elif has_is_causal:
        kwargs["is_causal"] = causal
    if has_gqa and k.shape[1] != q.shape[1]:
        kwargs["enable_gqa"] = True
    return fn(q, k, v, cu, cu, max_seqlen, max_seqlen, **kwargs)


def _mask_from(pos_q, pos_k, causal, window):
    """Boolean "may attend" for query positions ``pos_q[..., :, None]`` and key positions ``pos_k[..., None, :]``."""
    diff = pos_q[..., :, None] - pos_k[..., None, :]  # i - j
    allowed = torch.ones_like(diff, dtype=torch.bool)
    if causal:
        allowed &= diff >= 0
    if window is not None:
        left, right = window
        if left >= 0:
            allowed &= diff <= left
        if right >= 0:
            allowed &= -diff <= right
    return allowed


def _run_sdpa(q, k, v, cu, max_seqlen, causal, window, scale, dropout_p, seq_info):
    if cu.device.type == "cpu" and q.device.type == "cpu":
        return _run_sdpa_per_sequence(q, k, v, cu, causal, window, scale, dropout_p)
    from .packing import pad_packed, unpad_to_packed

    n = cu.numel() - 1
    qp = pad_packed(q, seq_info, cu, max_seqlen)  # [N, L, H, D]
    kp = pad_packed(k, seq_info, cu, max_seqlen)
    vp = pad_packed(v, seq_info, cu, max_seqlen)
    lengths = (cu[1:] - cu[:-1]).to(q.device)
    pos = torch.arange(max_seqlen, device=q.device)
    valid_k = pos[None, :] < lengths[:, None]  # [N, L]
    allowed = valid_k[:, None, :].expand(n, max_seqlen, max_seqlen)
    if causal or window is not None:
        allowed = allowed & _mask_from(pos, pos, causal, window)[None]
    # Padded query rows would see no key under a window/causal mask only if they had none: give
    # them key 0 so softmax stays finite (their outputs are dropped).
    allowed = allowed | (~valid_k)[:, :, None] & (pos[None, None, :] == 0)
    hq, hk = q.shape[1], k.shape[1]
    out = F.scaled_dot_product_attention(
        qp.transpose(1, 2), kp.transpose(1, 2), vp.transpose(1, 2), attn_mask=allowed[:, None],
        dropout_p=dropout_p, scale=scale, enable_gqa=hq != hk,
    ).transpose(1, 2)
    return unpad_to_packed(out, seq_info, cu, max_seqlen)


def _run_sdpa_per_sequence(q, k, v, cu, causal, window, scale, dropout_p):
    """SDPA on each packed sequence's own rows (CPU): no padding, and no mask unless a window asks
    for one, so torch's CPU flash kernel runs. Measured on 2 cores (fp32, 12 heads x 64): 2-2.5x
    faster than re-padding with a mask for 128-256 texts, as fast for 1,000 very short ones; the
    boundaries are read from host memory (on a GPU the loop would synchronise: padded there)."""
    bounds = cu.tolist()
    gqa = q.shape[1] != k.shape[1]
    outs = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        if e <= s:
            continue
        mask = None
        if window is not None:
            pos = torch.arange(e - s, device=q.device)
            mask = _mask_from(pos, pos, causal, window)
        out = F.scaled_dot_product_attention(
            q[s:e].transpose(0, 1), k[s:e].transpose(0, 1), v[s:e].transpose(0, 1), attn_mask=mask,
            dropout_p=dropout_p, is_causal=causal and window is None, scale=scale, enable_gqa=gqa,
        )
        outs.append(out.transpose(0, 1))
    if not outs:
        return q.new_zeros(q.shape)
    return torch.cat(outs)


def attention_reference(q, k, v, cu_seqlens, *, causal=False, window=None, scale=None):
    """Plain-torch varlen attention: one dense block-diagonal mask over all packed tokens (small T only)."""
    t = q.shape[0]
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    seq = torch.repeat_interleave(torch.arange(lengths.numel(), device=q.device), lengths.long())
    pos = torch.arange(t, device=q.device) - cu_seqlens[:-1].long()[seq]
    allowed = (seq[:, None] == seq[None, :]) & _mask_from(pos, pos, causal, window)
    if k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * scale
    scores = scores.masked_fill(~allowed[None], float("-inf"))
    probs = scores.softmax(-1)
    return torch.einsum("hqk,khd->qhd", probs, v.float()).to(q.dtype)
