"""LayerNorm with an optional fused residual add (Triton forward and backward, torch reference).

Forward, per row of ``H`` features, all arithmetic in fp32::

    h     = x + residual                    (rounded to x.dtype, as the unfused model would)
    mean  = sum(h) / H
    var   = sum((h - mean)^2) / H           (biased, as torch.nn.LayerNorm)
    rstd  = 1 / sqrt(var + eps)
    xhat  = (h - mean) * rstd
    y     = xhat * w + b                    (w = 1 when weight is None, b = 0 when bias is None)

``y`` is returned in ``x.dtype``; with ``return_residual=True`` the pre-norm sum ``h`` is returned
too, because pre-LN blocks carry it on as the next residual stream.

Backward, given ``dy`` (and ``dh_out``, the gradient flowing into the returned ``h``)::

    g     = w * dy
    c1    = sum(g * xhat) / H
    c2    = sum(g) / H
    dh    = rstd * (g - xhat * c1 - c2) + dh_out
    dx    = dresidual = dh                  (the add is an identity for both inputs)
    dw    = sum over rows of dy * xhat
    db    = sum over rows of dy

``dw``/``db`` are reduced in two stages, as in flash-attention's ``layer_norm.py``: each backward
program owns a contiguous chunk of rows and writes one fp32 partial row into a
``[n_programs, H]`` buffer, and torch sums that buffer over programs. That avoids atomics (so the
result is deterministic) and keeps the second stage tiny.

Callers: ``x`` may have any leading shape; the last dimension is normalised. Inputs whose last
dimension is not contiguous, or whose rows do not share one stride, are copied. Any float dtype
works for ``x``/``residual``/``weight``/``bias``; outputs take ``x.dtype``.
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

from ._backend import next_power_of_2, triton_available, use_triton

# Beyond this row width a whole row no longer fits comfortably in registers; such widths do not
# occur in sentence-transformer backbones, so they go to the torch path rather than a looped kernel.
MAX_TRITON_H = 16384

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _layer_norm_fwd_kernel(
        X, R, W, B, Y, HOUT, MEAN, RSTD,
        stride_x, stride_r, stride_y, stride_h,
        M, N, eps,
        HAS_RESIDUAL: tl.constexpr, STORE_H: tl.constexpr,
        HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_STATS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr,
    ):
        # A 2-D tile of BLOCK_M rows: narrow rows (q/k-norm over head_dim) would leave most lanes
        # idle with one row per program.
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
            # Round the sum to the activation dtype before normalising, so the statistics match
            # the unfused model (which adds in x.dtype) and the h we hand back.
            h = (h + r).to(HOUT.dtype.element_ty)
            if STORE_H:
                tl.store(HOUT + rows64[:, None] * stride_h + cols[None, :], h, mask=mask)
            h = h.to(tl.float32)

        mean = tl.sum(h, axis=1) / N
        diff = tl.where(mask, h - mean[:, None], 0.0)
        var = tl.sum(diff * diff, axis=1) / N
        rstd = 1.0 / tl.sqrt(var + eps)
        if STORE_STATS:
            tl.store(MEAN + rows, mean, mask=mask_m)
            tl.store(RSTD + rows, rstd, mask=mask_m)

        y = diff * rstd[:, None]
        if HAS_WEIGHT:
            w = tl.load(W + cols, mask=mask_h, other=0.0).to(tl.float32)
            y = y * w[None, :]
        if HAS_BIAS:
            b = tl.load(B + cols, mask=mask_h, other=0.0).to(tl.float32)
            y = y + b[None, :]
        tl.store(Y + rows64[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _layer_norm_bwd_kernel(
        H, W, DY, DHOUT, MEAN, RSTD, DX, DRES, DW, DB,
        stride_h, stride_dy, stride_dho, stride_dx, stride_dr,
        M, N, rows_per_program,
        HAS_WEIGHT: tl.constexpr, HAS_DHOUT: tl.constexpr,
        STORE_DX: tl.constexpr, STORE_DRES: tl.constexpr,
        COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr,
    ):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_H)
        mask_h = cols < N
        if HAS_WEIGHT:
            w = tl.load(W + cols, mask=mask_h, other=0.0).to(tl.float32)
        # Accumulate the weight/bias partials as full tiles and reduce over rows once at the end:
        # one cross-thread reduction per program instead of one per row block.
        if COMPUTE_DW:
            dw_acc = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
        if COMPUTE_DB:
            db_acc = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)

        row_start = pid * rows_per_program
        for i in range(0, rows_per_program, BLOCK_M):
            rows = row_start + i + tl.arange(0, BLOCK_M)
            mask_m = rows < M
            mask = mask_m[:, None] & mask_h[None, :]
            rows64 = rows.to(tl.int64)

            h = tl.load(H + rows64[:, None] * stride_h + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + rows64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            # Rows past M load rstd = 0, which zeroes their xhat and keeps the sums clean.
            mean = tl.load(MEAN + rows, mask=mask_m, other=0.0)
            rstd = tl.load(RSTD + rows, mask=mask_m, other=0.0)
            xhat = tl.where(mask, (h - mean[:, None]) * rstd[:, None], 0.0)

            if HAS_WEIGHT:
                g = dy * w[None, :]
            else:
                g = dy
            c1 = tl.sum(g * xhat, axis=1) / N
            c2 = tl.sum(g, axis=1) / N
            dh = (g - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
            if HAS_DHOUT:
                dh += tl.load(DHOUT + rows64[:, None] * stride_dho + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            if STORE_DX:
                tl.store(DX + rows64[:, None] * stride_dx + cols[None, :], dh.to(DX.dtype.element_ty), mask=mask)
            if STORE_DRES:
                # A second store rather than handing autograd one tensor for both inputs: aliased
                # leaf gradients can be corrupted by later in-place accumulation.
                tl.store(DRES + rows64[:, None] * stride_dr + cols[None, :], dh.to(DRES.dtype.element_ty), mask=mask)
            if COMPUTE_DW:
                dw_acc += dy * xhat
            if COMPUTE_DB:
                db_acc += dy

        if COMPUTE_DW:
            tl.store(DW + pid * N + cols, tl.sum(dw_acc, axis=0), mask=mask_h)
        if COMPUTE_DB:
            tl.store(DB + pid * N + cols, tl.sum(db_acc, axis=0), mask=mask_h)


# ----------------------------------------------------------------------------------------------
# Launch helpers, shared with rmsnorm.py.


def _as_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """``t`` as a [rows, n] view with unit column stride (copying only when no such view exists)."""
    if t.is_contiguous():  # the common case, kept cheap: these ops are launch-overhead bound
        return t.view(-1, n)
    t2 = t.reshape(-1, n)
    if t2.stride(-1) != 1 or (t2.shape[0] > 1 and t2.stride(0) < n):
        t2 = t2.contiguous()
    return t2


@functools.lru_cache(maxsize=None)
def _fwd_config(n: int) -> Tuple[int, int, int]:
    """(BLOCK_M, BLOCK_H, num_warps) for the forward kernels: ~4K elements per program, 16 per
    thread; an H200 sweep (bf16, H = 128..2560) put this within ~5% of the best tile everywhere."""
    block_h = next_power_of_2(n)
    block_m = max(1, min(64, 4096 // block_h))
    num_warps = min(max(block_m * block_h // 512, 1), 16)
    return block_m, block_h, num_warps


@functools.lru_cache(maxsize=None)
def _bwd_config(n: int) -> Tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_H, num_warps, programs per SM) for the backward kernels.

    Tiles of ~1K elements (several live fp32 tiles each: h, dy, xhat, the dw/db accumulators)
    and enough programs per SM to keep loads in flight; wide rows use fewer, fatter programs so
    the [n_programs, H] partial buffer stays small. Picked by a sweep on an H200 (bf16, 8192 rows,
    H = 384..2560, and 131072 rows of 128); neighbouring choices were within ~10%.
    """
    block_h = next_power_of_2(n)
    block_m = max(1, 1024 // block_h)
    num_warps = min(max(block_m * block_h // 256, 1), 16)
    waves = 8 if block_h <= 1024 else 2
    return block_m, block_h, num_warps, waves


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.lru_cache(maxsize=1024)
def _bwd_grid(m: int, block_m: int, waves: int, device: torch.device) -> Tuple[int, int]:
    """(n_programs, rows_per_program): ``waves`` programs per SM, each walking a contiguous chunk
    of rows, so the [n_programs, H] partial buffer stays small while the GPU stays full."""
    n_blocks = max(1, triton.cdiv(m, block_m))  # m == 0 still yields a valid (empty) grid
    if device.type == "cuda":
        target = waves * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    else:
        # Interpreter: few programs keep it quick and still exercise the multi-block loop.
        target = 4
    n_prog = max(1, min(n_blocks, target))
    rows_per_program = triton.cdiv(n_blocks, n_prog) * block_m
    n_prog = triton.cdiv(m, rows_per_program)
    return n_prog, rows_per_program


# ----------------------------------------------------------------------------------------------


def _layer_norm_fwd(x, weight, bias, residual, eps, store_stats):
    """Launch the forward kernel. Returns [rows, H] ``y`` and ``h`` (``x`` itself when there is
    no residual) and the fp32 per-row ``mean``/``rstd`` (None unless ``store_stats``)."""
    n = x.shape[-1]
    x2 = _as_rows(x, n)
    m = x2.shape[0]
    has_res = residual is not None
    r2 = _as_rows(residual, n) if has_res else x2
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    h = torch.empty((m, n), dtype=x.dtype, device=x.device) if has_res else x2
    mean = rstd = None
    if store_stats:
        mean, rstd = torch.empty((2, m), dtype=torch.float32, device=x.device).unbind(0)  # one allocation
    if m > 0:
        block_m, block_h, num_warps = _fwd_config(n)
        _layer_norm_fwd_kernel[(triton.cdiv(m, block_m),)](
            x2, r2, weight if weight is not None else x2, bias if bias is not None else x2,
            y, h, mean if store_stats else y, rstd if store_stats else y,
            x2.stride(0), r2.stride(0), y.stride(0), h.stride(0),
            m, n, eps,
            HAS_RESIDUAL=has_res, STORE_H=has_res, HAS_WEIGHT=weight is not None,
            HAS_BIAS=bias is not None, STORE_STATS=store_stats,
            BLOCK_M=block_m, BLOCK_H=block_h, num_warps=num_warps,
        )
    return y, h, mean, rstd


class LayerNormFn(torch.autograd.Function):
    """Triton LayerNorm. ``residual``, ``weight``, ``bias`` may be None. Returns ``y`` or, with
    ``return_residual``, ``(y, h)`` (``h`` is ``x`` itself without a residual)."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, eps, return_residual):
        has_res = residual is not None
        # h must be materialised for the backward whenever there is a residual, returned or not.
        y, h, mean, rstd = _layer_norm_fwd(x, weight, bias, residual, eps, store_stats=True)
        ctx.save_for_backward(h, weight, mean, rstd)
        ctx.has_bias = bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
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
        h, weight, mean, rstd = ctx.saved_tensors
        m, n = h.shape
        need_dx, need_dw, need_db, need_dres = ctx.needs_input_grad[:4]
        need_dw = need_dw and weight is not None
        need_db = need_db and ctx.has_bias
        need_dres = need_dres and ctx.has_res
        dx = dres = dw = db = None
        if not (need_dx or need_dw or need_db or need_dres):
            return None, None, None, None, None, None

        dy2 = _as_rows(dy, n)
        dho2 = _as_rows(dh_out, n) if dh_out is not None else dy2
        dx2 = torch.empty((m, n), dtype=ctx.x_dtype, device=dy.device) if need_dx else dy2
        dr2 = torch.empty((m, n), dtype=ctx.res_dtype, device=dy.device) if need_dres else dy2
        block_m, block_h, num_warps, waves = _bwd_config(n)
        n_prog, rows_per_program = _bwd_grid(m, block_m, waves, h.device)
        # dw and db partials share one buffer so that one reduction finishes both.
        parts = torch.empty((int(need_dw) + int(need_db), n_prog, n), dtype=torch.float32, device=h.device)
        dw_part = parts[0] if need_dw else mean
        db_part = parts[-1] if need_db else mean
        if m > 0:
            _layer_norm_bwd_kernel[(n_prog,)](
                h, weight if weight is not None else h, dy2, dho2, mean, rstd, dx2, dr2, dw_part, db_part,
                h.stride(0), dy2.stride(0), dho2.stride(0), dx2.stride(0), dr2.stride(0),
                m, n, rows_per_program,
                HAS_WEIGHT=weight is not None, HAS_DHOUT=dh_out is not None,
                STORE_DX=need_dx, STORE_DRES=need_dres, COMPUTE_DW=need_dw, COMPUTE_DB=need_db,
                BLOCK_M=block_m, BLOCK_H=block_h, num_warps=num_warps,
            )
        if need_dx:
            dx = dx2.view(ctx.out_shape)
        if need_dres:
            dres = dr2.view(ctx.out_shape)
        if need_dw or need_db:
            sums = parts.sum(1)
            if need_dw:
                dw = sums[0].to(weight.dtype)
            if need_db:
                db = sums[-1].to(ctx.bias_dtype)
        return dx, dw, db, dres, None, None


def layer_norm_reference(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float,
    residual: Optional[torch.Tensor] = None,
    return_residual: bool = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Plain-torch LayerNorm with the same contract as :func:`layer_norm` (CPU path, test oracle)."""
    h = (x + residual).to(x.dtype) if residual is not None else x
    y = F.layer_norm(
        h.float(),
        (h.shape[-1],),
        weight.float() if weight is not None else None,
        bias.float() if bias is not None else None,
        eps,
    ).to(x.dtype)
    return (y, h) if return_residual else y


def layer_norm(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float,
    residual: Optional[torch.Tensor] = None,
    return_residual: bool = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """LayerNorm over the last dim of ``x`` (+ ``residual``), fp32 math, output in ``x.dtype``.

    Returns ``y``, or ``(y, h)`` with ``h = x + residual`` (``x`` itself when there is no
    residual) when ``return_residual`` is set. Triton on CUDA (and under ``TRITON_INTERPRET=1``),
    :func:`layer_norm_reference` otherwise.
    """
    if not use_triton(x) or next_power_of_2(x.shape[-1]) > MAX_TRITON_H:
        return layer_norm_reference(x, weight, bias, eps, residual, return_residual)
    # The kernels index weight/bias with unit stride.
    if weight is not None and not weight.is_contiguous():
        weight = weight.contiguous()
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    tensors = (x, weight, bias, residual)
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)):
        # Inference (the common sentence-transformers case): no autograd node, no saved stats.
        y, h, _, _ = _layer_norm_fwd(x, weight, bias, residual, float(eps), store_stats=False)
        y = y.view(x.shape)
        if not return_residual:
            return y
        return y, (h.view(x.shape) if residual is not None else x)
    return LayerNormFn.apply(x, weight, bias, residual, float(eps), bool(return_residual))
