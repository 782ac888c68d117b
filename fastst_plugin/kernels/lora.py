"""Fused LoRA linear: ``y = x Wᵀ + b + s · (drop(x) Aᵀ) Bᵀ`` as one autograd node.

Forward (x: [T, K], W: [N, K], A: [r, K], B: [N, r], s: scale, m: dropout keep-mask / (1 - p)):

    u = (x ⊙ m) Aᵀ                    [T, r]
    y = x Wᵀ + b + s · u Bᵀ            [T, N]   (the rank-r GEMM + bias, then the base GEMM adding onto it)

Backward (g = dL/dy):

    dB = s · gᵀ u                      [N, r]
    du = s · g B                       [T, r]
    dA = duᵀ (x ⊙ m)                   [r, K]
    dx = g W + (du A) ⊙ m              [T, K]
    dW = gᵀ x, db = Σ_t g              only when W / b require grad (full fine-tuning)

Why a custom node: peft's LoRA layer runs base linear, dropout, A, B, scale and add as separate
autograd nodes (six kernels forward, more backward, and it keeps the dropped-out copy of x alive).
Here autograd saves only ``x``, ``u`` and the 1-bit mask, never computes a gradient for a frozen
base weight, and a quantized base weight is de-quantized again in backward instead of being kept
(``weight_fn``), so QLoRA holds no full-precision weight between forward and backward.

The GEMMs are cuBLAS (they are compute-bound and cuBLAS is at the roofline for these shapes); the
fusion is in the bookkeeping, not in a Triton matmul. Two more forms: ``weight`` given as frozen row
blocks (a fused projection's separate Q/K/V or gate/up weights, multiplied block by block into their
output columns rather than concatenated into a kept copy), and, without gradients and with enough
tokens, under ``torch.inference_mode`` (encode), the adapter merged into a temporary weight
(``merge_pays``, ``_merged_forward``; not in training's no-gradient passes, see there). Opt-in
(``FASTST_LORA_MERGE_GRAD``, off by default: its bf16 rounding of the adapter's update changes the
training trajectory), the node itself runs over that merged weight with gradients too
(``merge_pays_with_grad``: forward ``x (W + sBA)ᵀ + b``, backward ``dx = g (W + sBA)``).
``lora_linear_reference`` is the plain composition used as the test oracle.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F

from ..checkpointing import recompute_hint, selective_active
from ..config import env_mode


def lora_linear_reference(x, weight, bias, lora_a, lora_b, scaling, dropout_p=0.0, training=False):
    xd = F.dropout(x, dropout_p, training) if dropout_p and training else x
    return F.linear(x, weight, bias) + F.linear(F.linear(xd, lora_a), lora_b) * scaling


class _LoRALinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling, mask, weight_fn, blocks=None, merged=False):
        ctx.merged = merged
        if merged:
            # y = x (W + s B A)ᵀ + b: one GEMM (bias in its epilogue) over a temporary merged weight,
            # rebuilt in backward for dx = g (W + s B A); u is still needed for dB.
            u = x @ lora_a.t()
            with recompute_hint():  # under the selective policy: a weight-sized product, redone, not stored
                merged_weight = _merged_weight(weight, blocks, weight_fn, lora_a, lora_b, scaling)
            y = F.linear(x, merged_weight, bias)
            ctx.blocks, ctx.scaling, ctx.weight_fn = blocks, scaling, weight_fn
            ctx.w_needs_grad = False  # merged only over a frozen base weight
            ctx.b_needs_grad = bias is not None and bias.requires_grad
            ctx.save_for_backward(x, weight if weight_fn is None else None, lora_a, lora_b, u, None)
            return y
        if blocks is not None and selective_active():
            weight, blocks = torch.cat(blocks, 0), None  # one out-of-place product (see below)
        w = weight_fn() if weight_fn is not None else weight
        xd = x * mask if mask is not None else x
        u = xd @ lora_a.t()
        x2, u2 = x.reshape(-1, x.shape[-1]), u.reshape(-1, u.shape[-1])
        # The rank-r term (+ bias) first, then the base product accumulated onto it *in place*:
        # an out-of-place ``addmm(delta, x, Wᵀ)`` first copies ``delta`` into a new output (a
        # device-to-device memcpy of the whole [T, N] activation per call; ~1 ms of a 12 ms
        # bert-base LoRA step), while ``addmm_`` hands cuBLAS ``delta`` as C with beta = 1, read in
        # the GEMM's epilogue. Under selective checkpointing the output must come from one
        # out-of-place op, which the policy stores (it cannot store an in-place op's output), and
        # the delta is marked for recomputation: there the copy is paid.
        with recompute_hint():
            if bias is not None:
                delta = torch.addmm(bias, u2, lora_b.t(), alpha=scaling)
            else:
                delta = torch.mm(u2, (lora_b * scaling if scaling != 1.0 else lora_b).t())
        if blocks is not None:
            # Frozen row blocks of W (a fused projection's Q/K/V or gate/up weights, not concatenated:
            # no copy of them is kept): each block's product lands in its columns of the output,
            # accumulated in place like the single product below (cuBLAS writes a column slice with
            # the full row stride; no copies).
            y = delta
            col = 0
            for wb in blocks:
                y[:, col : col + wb.shape[0]].addmm_(x2, wb.t())
                col += wb.shape[0]
        elif selective_active():
            y = torch.addmm(delta, x2, w.t())
        else:
            y = delta.addmm_(x2, w.t())
        y = y.view(*x.shape[:-1], lora_b.shape[0])
        ctx.blocks = blocks  # frozen parameters: kept on ctx, not saved (nothing to recompute or offload)
        ctx.scaling = scaling
        ctx.weight_fn = weight_fn
        ctx.w_needs_grad = weight is not None and weight.requires_grad
        ctx.b_needs_grad = bias is not None and bias.requires_grad
        ctx.save_for_backward(x, weight if weight_fn is None else None, lora_a, lora_b, u, mask)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, lora_a, lora_b, u, mask = ctx.saved_tensors
        s = ctx.scaling
        w = ctx.weight_fn() if ctx.weight_fn is not None else weight
        g = grad_out.reshape(-1, grad_out.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        u2 = u.reshape(-1, u.shape[-1])
        grad_x = grad_w = grad_b = grad_a = grad_bm = None
        # (a scale of 1, a fused projection's block-diagonal B carrying its scales: no multiply kernels)
        du = None
        if ctx.needs_input_grad[3] or (ctx.needs_input_grad[0] and not ctx.merged):
            du = g @ lora_b if s == 1.0 else (g @ lora_b) * s
        if ctx.needs_input_grad[4]:
            grad_bm = g.t() @ u2 if s == 1.0 else (g.t() @ u2).mul_(s)
            grad_bm = grad_bm.to(lora_b.dtype)
        if ctx.needs_input_grad[3]:
            xd = x2 * mask.reshape(x2.shape) if mask is not None else x2
            grad_a = (du.t() @ xd).to(lora_a.dtype)
        if ctx.needs_input_grad[0] and ctx.merged:
            merged = _merged_weight(weight, ctx.blocks, ctx.weight_fn, lora_a, lora_b, s)
            grad_x = (g @ merged.to(g.dtype)).view(x.shape)
        elif ctx.needs_input_grad[0]:
            # Low-rank term first, base product accumulated onto it in place (no [T, K] copy; see forward).
            lora_dx = du @ lora_a
            if mask is not None:
                lora_dx.mul_(mask.reshape(lora_dx.shape))
            if ctx.blocks is not None:
                col = 0
                for wb in ctx.blocks:
                    lora_dx.addmm_(g[:, col : col + wb.shape[0]], wb.to(g.dtype))
                    col += wb.shape[0]
                grad_x = lora_dx.view(x.shape)
            else:
                grad_x = lora_dx.addmm_(g, w.to(g.dtype)).view(x.shape)
        if ctx.w_needs_grad and ctx.needs_input_grad[1]:
            grad_w = (g.t() @ x2).to(weight.dtype)
        if ctx.b_needs_grad and ctx.needs_input_grad[2]:
            grad_b = g.sum(0).to(grad_out.dtype)
        return grad_x, grad_w, grad_b, grad_a, grad_bm, None, None, None, None, None


# A forward that needs no gradient folds the adapter into the weight when its tokens outweigh the
# weight: merging writes one [N, K] weight (reading W and the adapter), while the unmerged forward
# moves, per token, x once more for the rank-r product plus the [T, N] low-rank term written and read
# back by the base GEMM's epilogue (K + 2N values). Merge when T (K + 2N) >= MERGE_TRAFFIC_RATIO x N K.
#
# Only under torch.inference_mode by default (encode(), predict(): one rounding of W + sBA to the
# compute dtype, as peft's merge_and_unload in bf16 gives). Not in the no-gradient passes of training
# (a cached loss's first pass): there the merged weight's bf16 rounding drops every adapter update
# under half a step of W's grid, so the first pass embeds with a model that lags the one the replay
# differentiates, and the loss and its gradients drift. H200, bert-base LoRA r=32, CachedMNRL 1,024
# pairs, 25 steps (thirteenth session): final loss stock 3.9378, unmerged 3.9376, merged 3.9430
# (eleventh session, 8 steps: 4.823 / 4.831 / 4.849); the merge saved 7.4 ms of a 198 ms step.
# FASTST_LORA_MERGE_NO_GRAD: "inference" (default), "1" every no-gradient forward (the old default),
# "0" never.
MERGE_TRAFFIC_RATIO = 4


def _merge_setting() -> str:
    value = env_mode("FASTST_LORA_MERGE_NO_GRAD", "inference")
    return value if value == "off" else "always" if value in ("on", "always") else "inference"


def _call_shape(x, lora_a, lora_b) -> tuple[int, int, int]:
    """(tokens, N, K) of a LoRA linear call: what the merge rules weigh against each other."""
    return x.numel() // max(x.shape[-1], 1), lora_b.shape[0], lora_a.shape[1]


def merge_pays(x, weight, weight_fn, lora_a, lora_b) -> bool:
    """Whether this call needs no gradient, may merge (see above) and has enough tokens for the
    merged forward to pay."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, lora_a, lora_b)):
        return False
    setting = _merge_setting()
    if setting == "off" or (setting == "inference" and not torch.is_inference_mode_enabled()):
        return False
    tokens, n, k = _call_shape(x, lora_a, lora_b)
    return tokens * (k + 2 * n) >= MERGE_TRAFFIC_RATIO * n * k


def _merged_weight(weight, blocks, weight_fn, lora_a, lora_b, scaling: float):
    """``W + s B A`` as a temporary (one rounding to the compute dtype). ``W`` from ``weight``, its
    frozen row ``blocks`` or ``weight_fn`` (a de-quantized temporary: merged into in place)."""
    fresh = weight_fn() if weight_fn is not None else torch.cat(blocks, 0) if blocks is not None else None
    if fresh is None or selective_active():  # (the selective policy cannot record in-place ops)
        return torch.addmm(weight if fresh is None else fresh, lora_b, lora_a, alpha=scaling)
    return fresh.addmm_(lora_b, lora_a, alpha=scaling)


def _merged_forward(x, weight, bias, lora_a, lora_b, scaling: float, weight_fn):
    """``x (W + s B A)ᵀ + b``: the same function as the unmerged forward up to the rounding of the
    merged weight (one rounding of W + sBA to the compute dtype, against the unmerged path's
    rounding of its low-rank term). The merged weight is a temporary of this call."""
    return F.linear(x, _merged_weight(weight, None, weight_fn, lora_a, lora_b, scaling), bias)


# With gradients the merge would pay too: the unmerged node writes the [T, N] low-rank term and reads
# it back in the base GEMM's epilogue (forward), and likewise the [T, K] low-rank part of dx
# (backward): 2 T (N + K) values per call. The merged node instead builds W + sBA twice (forward and
# backward: reading W and writing the merged copy, ~4 N K values) and still needs u = x Aᵀ for dB;
# "auto" merges when T (N + K) >= MERGE_GRAD_TRAFFIC_RATIO x N K. Never with dropout (the adapter
# sees dropout(x), not x) or a trainable base weight; under selective checkpointing the merged
# weight is recomputed, never stored.
#
# OFF by default (FASTST_LORA_MERGE_GRAD=auto|1 opt in): in bf16 the merged weight rounds the adapter's
# update to the grid of W's own values, so updates smaller than half a bf16 step of W vanish from the
# forward; the training trajectory drifts from stock's. H200, LoRA r=32, 64 pairs x 256, a dozen
# steps: final loss bert-base 1.9234 merged vs 1.8878 unmerged (stock 1.8878), Qwen3-0.6B 1.7693 vs
# 1.6248 (stock 1.5911), for -2.5 to -7 % step time on the decoders and ModernBERT (bert-base 0 %)
# and -10 % on a plain 1,024-pair bert-base step (docs/benchmarks.md, twelfth session).
MERGE_GRAD_TRAFFIC_RATIO = 2


def _merge_grad_mode() -> str:
    value = env_mode("FASTST_LORA_MERGE_GRAD", "off")
    return value if value in ("on", "auto") else "off"


def merge_pays_with_grad(x, weight, lora_a, lora_b) -> bool:
    """Whether a call that needs gradients (for the adapters and/or x) should run merged."""
    mode = _merge_grad_mode()
    if mode == "off" or (weight is not None and weight.requires_grad):
        return False
    if mode == "on":
        return True
    tokens, n, k = _call_shape(x, lora_a, lora_b)
    return tokens * (n + k) >= MERGE_GRAD_TRAFFIC_RATIO * n * k


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = False,
    weight_fn: Callable[[], torch.Tensor] | None = None,
) -> torch.Tensor:
    """LoRA linear over the last dim of ``x``. ``weight_fn`` replaces ``weight`` for quantized bases;
    ``weight`` may also be a tuple of frozen row blocks of W (a fused projection's weights, never
    concatenated into a kept copy)."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        # Autocast does not reach inside a custom Function: cast once here, differentiably.
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = x.dtype
    blocks = None
    if isinstance(weight, (tuple, list)):
        blocks, weight = weight, None
    with torch.autocast(device_type, enabled=False):
        x = x.to(dtype)
        if blocks is not None:
            blocks = tuple(wb.to(dtype) for wb in blocks)
            if len(blocks) == 1:
                weight, blocks = blocks[0], None
        if weight is not None and weight_fn is None:
            weight = weight.to(dtype)
        if weight_fn is not None:
            raw_fn = weight_fn
            weight_fn = lambda: raw_fn().to(dtype)  # noqa: E731
        bias = bias.to(dtype) if bias is not None else None
        lora_a, lora_b = lora_a.to(dtype), lora_b.to(dtype)
        if not (dropout_p and training) and merge_pays(x, weight, weight_fn, lora_a, lora_b):
            if blocks is not None:
                weight_fn = partial(torch.cat, blocks, 0)  # the merged weight is a fresh temporary anyway
            return _merged_forward(x, weight, bias, lora_a, lora_b, float(scaling), weight_fn)
        mask = None
        if dropout_p and training:
            # A scaled keep-mask in x's dtype: dropout(x) == x * mask, and backward reuses it.
            mask = torch.empty_like(x).bernoulli_(1.0 - dropout_p).div_(1.0 - dropout_p)
        merged = mask is None and merge_pays_with_grad(x, weight, lora_a, lora_b)
        return _LoRALinearFn.apply(x, weight, bias, lora_a, lora_b, float(scaling), mask, weight_fn, blocks, merged)
