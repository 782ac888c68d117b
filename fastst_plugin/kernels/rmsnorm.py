"""RMSNorm with an optional weight offset and fused residual add (Triton fwd/bwd, torch reference).

Forward, per row of ``D`` features, all arithmetic in fp32::

    h     = x + residual                    (rounded to x.dtype, as the unfused model would)
    rstd  = 1 / sqrt(sum(h^2) / D + eps)
    xhat  = h * rstd
    y     = xhat * (w + offset)             (w + offset = 1 when weight is None)

``offset = 0`` is the usual (Llama/Qwen3) RMSNorm, ``offset = 1`` is Gemma's ``(1 + w)`` form;
the offset is ignored when there is no weight.
``y`` is returned in ``x.dtype``. Qwen3's module rounds ``xhat`` to the activation dtype before
multiplying by ``w``; here the product is formed in fp32 and rounded once, which differs from it by
at most one rounding step. With ``return_residual=True`` the pre-norm sum ``h`` is returned too.

Backward, given ``dy`` (and ``dh_out``, the gradient flowing into the returned ``h``)::

    g     = (w + offset) * dy
    c     = sum(g * xhat) / D
    dh    = rstd * (g - xhat * c) + dh_out
    dx    = dresidual = dh
    dw    = sum over rows of dy * xhat      (the offset is a constant, so it drops out)

``dw`` is reduced in two stages without atomics: each backward program writes an fp32 partial
row into a ``[n_programs, D]`` buffer and torch sums it (as flash-attention's ``layer_norm.py``).

Callers: the last dimension is normalised and everything before it is rows, so q/k-norm on
``[T, heads, head_dim]`` works as is. Inputs whose rows cannot be viewed as [rows, D] with unit
column stride are copied. Outputs take ``x.dtype``.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from ._backend import next_power_of_2, triton_available, use_triton
from .layernorm import MAX_TRITON_H, _as_rows, _bwd_config, _bwd_grid, _fwd_config

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _rms_norm_fwd_kernel(
        X, R, W, Y, HOUT, RSTD,
        stride_x, stride_r, stride_y, stride_h,
        M, N, eps, offset,
        HAS_RESIDUAL: tl.constexpr, STORE_H: tl.constexpr,
        HAS_WEIGHT: tl.constexpr, STORE_STATS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr,
    ):
        # BLOCK_M rows per program so that head_dim-wide rows (q/k-norm) still fill the lanes.
        pid = tl.program_id(0)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_H)
        mask_m = rows < M
        mask_h = cols < N
        mask = mask_m[:, None] & mask_h[None, :]
        rows64 = rows.to(tl.int64)  # rows * stride can pass 2**31 for long batches

        h = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            r = tl.load(R + rows64[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            # Round to the activation dtype first so the statistics match the unfused model and
            # the h we hand back.
            h = (h + r).to(HOUT.dtype.element_ty)
            if STORE_H:
                tl.store(HOUT + rows64[:, None] * stride_h + cols[None, :], h, mask=mask)
            h = h.to(tl.float32)

        ms = tl.sum(h * h, axis=1) / N
        rstd = 1.0 / tl.sqrt(ms + eps)
        if STORE_STATS:
            tl.store(RSTD + rows, rstd, mask=mask_m)

        y = h * rstd[:, None]
        if HAS_WEIGHT:
            w = tl.load(W + cols, mask=mask_h, other=0.0).to(tl.float32) + offset
            y = y * w[None, :]
        tl.store(Y + rows64[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _rms_norm_bwd_kernel(
        H, W, DY, DHOUT, RSTD, DX, DRES, DW,
        stride_h, stride_dy, stride_dho, stride_dx, stride_dr,
        M, N, offset, rows_per_program,
        HAS_WEIGHT: tl.constexpr, HAS_DHOUT: tl.constexpr,
        STORE_DX: tl.constexpr, STORE_DRES: tl.constexpr, COMPUTE_DW: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr,
    ):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_H)
        mask_h = cols < N
        if HAS_WEIGHT:
            w = tl.load(W + cols, mask=mask_h, other=0.0).to(tl.float32) + offset
        # Keep the dw partial as a full tile and reduce over rows once, after the loop.
        if COMPUTE_DW:
            dw_acc = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)

        row_start = pid * rows_per_program
        for i in range(0, rows_per_program, BLOCK_M):
            rows = row_start + i + tl.arange(0, BLOCK_M)
            mask_m = rows < M
            mask = mask_m[:, None] & mask_h[None, :]
            rows64 = rows.to(tl.int64)

            h = tl.load(H + rows64[:, None] * stride_h + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + rows64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + rows, mask=mask_m, other=0.0)
            xhat = h * rstd[:, None]  # masked lanes loaded h = 0, so xhat is already 0 there

            if HAS_WEIGHT:
                g = dy * w[None, :]
            else:
                g = dy
            c = tl.sum(g * xhat, axis=1) / N
            dh = (g - xhat * c[:, None]) * rstd[:, None]
            if HAS_DHOUT:
                dh += tl.load(DHOUT + rows64[:, None] * stride_dho + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            if STORE_DX:
                tl.store(DX + rows64[:, None] * stride_dx + cols[None, :], dh.to(DX.dtype.element_ty), mask=mask)
            if STORE_DRES:
                # Separate store, not one tensor for both inputs: aliased leaf grads are unsafe
                # under later in-place accumulation.
                tl.store(DRES + rows64[:, None] * stride_dr + cols[None, :], dh.to(DRES.dtype.element_ty), mask=mask)
            if COMPUTE_DW:
                dw_acc += dy * xhat

        if COMPUTE_DW:
            tl.store(DW + pid * N + cols, tl.sum(dw_acc, axis=0), mask=mask_h)


def _rms_norm_fwd(x, weight, residual, eps, offset, store_stats):
    """Launch the forward kernel. Returns [rows, D] ``y`` and ``h`` (``x`` itself when there is
    no residual) and the fp32 per-row ``rstd`` (None unless ``store_stats``)."""
    n = x.shape[-1]
    x2 = _as_rows(x, n)
    m = x2.shape[0]
    has_res = residual is not None
    r2 = _as_rows(residual, n) if has_res else x2
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    h = torch.empty((m, n), dtype=x.dtype, device=x.device) if has_res else x2
    rstd = torch.empty((m,), dtype=torch.float32, device=x.device) if store_stats else None
    if m > 0:
        block_m, block_h, num_warps = _fwd_config(n)
        _rms_norm_fwd_kernel[(triton.cdiv(m, block_m),)](
            x2, r2, weight if weight is not None else x2, y, h, rstd if store_stats else y,
            x2.stride(0), r2.stride(0), y.stride(0), h.stride(0),
            m, n, eps, offset,
            HAS_RESIDUAL=has_res, STORE_H=has_res, HAS_WEIGHT=weight is not None,
            STORE_STATS=store_stats,
            BLOCK_M=block_m, BLOCK_H=block_h, num_warps=num_warps,
        )
    return y, h, rstd


class RMSNormFn(torch.autograd.Function):
    """Triton RMSNorm. ``residual`` and ``weight`` may be None. Returns ``y`` or, with
    ``return_residual``, ``(y, h)`` (``h`` is ``x`` itself without a residual)."""

    @staticmethod
    def forward(ctx, x, weight, residual, eps, offset, return_residual):
        has_res = residual is not None
        # h must be materialised for the backward whenever there is a residual, returned or not.
        y, h, rstd = _rms_norm_fwd(x, weight, residual, eps, offset, store_stats=True)
        ctx.save_for_backward(h, weight, rstd)
        ctx.offset = offset
        ctx.has_res = has_res
        ctx.out_shape = x.shape
        ctx.x_dtype = x.dtype
        ctx.res_dtype = residual.dtype if has_res else None
        if return_residual:
            # Without a residual h is x: handed back as a view, so that a later use of it sends its
            # gradient here and the backward adds it to the norm's own in fp32 (one rounding), where
            # autograd would add two bf16 gradients.
            return y.view(x.shape), h.view(x.shape)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy, dh_out=None):
        h, weight, rstd = ctx.saved_tensors
        m, n = h.shape
        need_dx, need_dw, need_dres = ctx.needs_input_grad[:3]
        need_dw = need_dw and weight is not None
        need_dres = need_dres and ctx.has_res
        dx = dres = dw = None
        if not (need_dx or need_dw or need_dres):
            return None, None, None, None, None, None

        dy2 = _as_rows(dy, n)
        dho2 = _as_rows(dh_out, n) if dh_out is not None else dy2
        dx2 = torch.empty((m, n), dtype=ctx.x_dtype, device=dy.device) if need_dx else dy2
        dr2 = torch.empty((m, n), dtype=ctx.res_dtype, device=dy.device) if need_dres else dy2
        block_m, block_h, num_warps, waves = _bwd_config(n)
        n_prog, rows_per_program = _bwd_grid(m, block_m, waves, h.device)
        dw_part = torch.empty((n_prog, n), dtype=torch.float32, device=h.device) if need_dw else rstd
        if m > 0:
            _rms_norm_bwd_kernel[(n_prog,)](
                h, weight if weight is not None else h, dy2, dho2, rstd, dx2, dr2, dw_part,
                h.stride(0), dy2.stride(0), dho2.stride(0), dx2.stride(0), dr2.stride(0),
                m, n, ctx.offset, rows_per_program,
                HAS_WEIGHT=weight is not None, HAS_DHOUT=dh_out is not None,
                STORE_DX=need_dx, STORE_DRES=need_dres, COMPUTE_DW=need_dw,
                BLOCK_M=block_m, BLOCK_H=block_h, num_warps=num_warps,
            )
        if need_dx:
            dx = dx2.view(ctx.out_shape)
        if need_dres:
            dres = dr2.view(ctx.out_shape)
        if need_dw:
            dw = dw_part.sum(0).to(weight.dtype)
        return dx, dw, dres, None, None, None


def rms_norm_reference(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    eps: float,
    offset: float = 0.0,
    residual: Optional[torch.Tensor] = None,
    return_residual: bool = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Plain-torch RMSNorm with the same contract as :func:`rms_norm` (CPU path, test oracle)."""
    h = (x + residual).to(x.dtype) if residual is not None else x
    hf = h.float()
    y = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * (weight.float() + offset)
    y = y.to(x.dtype)
    return (y, h) if return_residual else y


def rms_norm(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    eps: float,
    offset: float = 0.0,
    residual: Optional[torch.Tensor] = None,
    return_residual: bool = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """RMSNorm over the last dim of ``x`` (+ ``residual``): ``y = x * rstd * (weight + offset)``,
    fp32 math, output in ``x.dtype``. ``offset=1.0`` gives Gemma's ``(1 + w)`` form.

    Returns ``y``, or ``(y, h)`` with ``h = x + residual`` (``x`` itself when there is no
    residual) when ``return_residual`` is set. Triton on CUDA (and under ``TRITON_INTERPRET=1``),
    :func:`rms_norm_reference` otherwise.
    """
    if not use_triton(x) or next_power_of_2(x.shape[-1]) > MAX_TRITON_H:
        return rms_norm_reference(x, weight, eps, offset, residual, return_residual)
    # The kernels index the weight with unit stride.
    if weight is not None and not weight.is_contiguous():
        weight = weight.contiguous()
    tensors = (x, weight, residual)
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)):
        # Inference: no autograd node, no saved statistics.
        y, h, _ = _rms_norm_fwd(x, weight, residual, float(eps), float(offset), store_stats=False)
        y = y.view(x.shape)
        if not return_residual:
            return y
        return y, (h.view(x.shape) if residual is not None else x)
    return RMSNormFn.apply(x, weight, residual, float(eps), float(offset), bool(return_residual))
