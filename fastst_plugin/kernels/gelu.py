"""Fused bias + GELU: ``y = gelu(x + bias)``.

Shapes: ``x`` is ``[..., F]`` (any leading dims, flattened to ``rows``), ``bias`` is ``[F]`` or
``None``. Compute is fp32 in registers; the output has ``x``'s dtype promoted with ``bias``'s.

Forward, with ``h = x + bias``:

* exact (``approximate="none"``, BERT):  ``y = 0.5 * h * (1 + erf(h / sqrt(2)))``
* tanh  (``approximate="tanh"``):        ``y = 0.5 * h * (1 + tanh(u))``,
  ``u = sqrt(2/pi) * (h + 0.044715 * h^3)``

Backward, with ``g = dL/dy``:

* exact: ``dy/dh = Phi(h) + h * phi(h)`` where ``Phi(h) = 0.5 * (1 + erf(h / sqrt(2)))`` and
  ``phi(h) = exp(-h^2 / 2) / sqrt(2 pi)``
* tanh:  ``dy/dh = 0.5 * (1 + t) + 0.5 * h * (1 - t^2) * sqrt(2/pi) * (1 + 3 * 0.044715 * h^2)``,
  ``t = tanh(u)``
* ``dx = g * dy/dh`` (shape of ``x``), ``dbias = sum over rows of dx`` (each program walks a
  split of the rows for one column block, accumulating in fp32 registers; the few hundred
  per-split partials are summed by torch; deterministic).

Kernels: forward, and backward without a bias grad, are flat elementwise over ``rows * F``;
backward with a bias grad is a (column block, row split) grid.

Only ``x`` and ``bias`` are saved for backward (``h`` is recomputed). ``tanh`` is written as
``2 * sigmoid(2u) - 1`` (no libdevice), so the kernels compile on Triton 3.6 to 3.9 and run under
``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ._backend import next_power_of_2, triton_available, use_triton

_APPROX = ("none", "tanh")

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _tanh(u):
        # tanh(u) = 2 sigmoid(2u) - 1; |u| <= 20 keeps exp finite (tanh(20) == 1 in fp32)
        u = tl.minimum(tl.maximum(u, -20.0), 20.0)
        return 2.0 * tl.sigmoid(2.0 * u) - 1.0

    @triton.jit
    def _gelu_fwd_math(h, TANH: tl.constexpr):
        """fp32 in, fp32 out."""
        if TANH:
            u = 0.7978845608028654 * (h + 0.044715 * h * h * h)
            y = 0.5 * h * (1.0 + _tanh(u))
        else:
            y = 0.5 * h * (1.0 + tl.erf(h * 0.7071067811865476))
        return y

    @triton.jit
    def _gelu_grad_math(h, TANH: tl.constexpr):
        """d gelu(h) / dh, fp32 in, fp32 out."""
        if TANH:
            u = 0.7978845608028654 * (h + 0.044715 * h * h * h)
            t = _tanh(u)
            du = 0.7978845608028654 * (1.0 + 0.134145 * h * h)
            d = 0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * du
        else:
            cdf = 0.5 * (1.0 + tl.erf(h * 0.7071067811865476))
            pdf = tl.exp(-0.5 * h * h) * 0.3989422804014327
            d = cdf + h * pdf
        return d

    @triton.jit
    def _bias_gelu_flat_kernel(
        x_ptr, b_ptr, g_ptr, o_ptr, n_elem, n_cols,
        HAS_BIAS: tl.constexpr, BACKWARD: tl.constexpr, TANH: tl.constexpr,
        INT64: tl.constexpr, BLOCK: tl.constexpr,
    ):
        """Elementwise over the flat [rows * F] buffer: o = gelu(x + b) or o = g * gelu'(x + b)."""
        pid = tl.program_id(0)
        if INT64:
            offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        else:
            offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_elem
        h = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            h = h + tl.load(b_ptr + offs % n_cols, mask=mask, other=0.0).to(tl.float32)
        if BACKWARD:
            g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            o = g * _gelu_grad_math(h, TANH)
        else:
            o = _gelu_fwd_math(h, TANH)
        tl.store(o_ptr + offs, o.to(o_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _bias_gelu_bwd_dbias_kernel(
        g_ptr, x_ptr, b_ptr, dx_ptr, dbp_ptr, n_rows, n_cols, rows_per_split,
        TANH: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr,
    ):
        """dx and per-split fp32 partial dbias: program (col block, row split) walks its rows,
        accumulating dx elementwise in registers; one cross-row reduction at the end."""
        pid_f = tl.program_id(0)
        pid_s = tl.program_id(1)
        cols = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
        cmask = cols < n_cols
        b = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        acc = tl.zeros([BLOCK_R, BLOCK_F], dtype=tl.float32)
        r_start = pid_s * rows_per_split
        for r0 in range(r_start, r_start + rows_per_split, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            mask = (rows < n_rows)[:, None] & cmask[None, :]
            offs = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
            h = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) + b[None, :]
            g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            dh = g * _gelu_grad_math(h, TANH)
            dh = tl.where(mask, dh, 0.0)
            tl.store(dx_ptr + offs, dh.to(dx_ptr.dtype.element_ty), mask=mask)
            acc += dh
        tl.store(dbp_ptr + pid_s.to(tl.int64) * n_cols + cols, tl.sum(acc, axis=0), mask=cmask)


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _sm_count(t: torch.Tensor) -> int:
    # on CPU (interpreter) a small number, so tests walk several row blocks per program
    return _num_sms(t.device.index if t.device.index is not None else torch.cuda.current_device()) if t.is_cuda else 2


# launch configs (tuned on an H200 for T = 8192 tokens, F = 1536..3072, bf16)
_FLAT_BLOCK, _FLAT_WARPS = 2048, 4
_DB_BLOCK_R, _DB_BLOCK_F, _DB_WARPS, _DB_PROGS_PER_SM = 8, 512, 4, 4


def _launch_flat(x2, b, g, out, tanh: bool, backward: bool) -> None:
    n = x2.numel()
    block = _FLAT_BLOCK
    _bias_gelu_flat_kernel[(triton.cdiv(n, block),)](
        x2, b if b is not None else x2, g if g is not None else x2, out, n, x2.shape[1],
        HAS_BIAS=b is not None, BACKWARD=backward, TANH=tanh, INT64=n + block >= 2**31,
        BLOCK=block, num_warps=_FLAT_WARPS,
    )


class _BiasGeluFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, approximate):
        n_cols = x.shape[-1]
        out_dtype = x.dtype if bias is None else torch.promote_types(x.dtype, bias.dtype)
        x2 = x.reshape(-1, n_cols).contiguous()
        b = None if bias is None else bias.contiguous()
        y = torch.empty(x2.shape, dtype=out_dtype, device=x.device)
        if y.numel() > 0:
            _launch_flat(x2, b, None, y, approximate == "tanh", backward=False)
        ctx.save_for_backward(x2, b)
        ctx.approximate = approximate
        ctx.x_shape = x.shape
        ctx.x_dtype = x.dtype
        return y.view(*x.shape[:-1], n_cols)

    @staticmethod
    def backward(ctx, grad_out):
        x2, b = ctx.saved_tensors
        n_rows, n_cols = x2.shape
        need_dx = ctx.needs_input_grad[0]
        need_db = b is not None and ctx.needs_input_grad[1]
        if not (need_dx or need_db):
            return None, None, None
        tanh = ctx.approximate == "tanh"
        g = grad_out.reshape(n_rows, n_cols).contiguous()
        dx = torch.empty((n_rows, n_cols), dtype=ctx.x_dtype, device=x2.device)
        dbias = None
        if not need_db:
            if dx.numel() > 0:
                _launch_flat(x2, b, g, dx, tanh, backward=True)
        elif dx.numel() == 0:
            dbias = torch.zeros_like(b)
        else:
            br, bf = _DB_BLOCK_R, min(_DB_BLOCK_F, next_power_of_2(n_cols))
            n_fb = triton.cdiv(n_cols, bf)
            n_rb = triton.cdiv(n_rows, br)
            n_split = max(1, min(n_rb, (_sm_count(x2) * _DB_PROGS_PER_SM) // n_fb))
            rows_per_split = triton.cdiv(n_rb, n_split) * br
            n_split = triton.cdiv(n_rows, rows_per_split)
            dbp = torch.empty((n_split, n_cols), dtype=torch.float32, device=x2.device)
            _bias_gelu_bwd_dbias_kernel[(n_fb, n_split)](
                g, x2, b, dx, dbp, n_rows, n_cols, rows_per_split,
                TANH=tanh, BLOCK_R=br, BLOCK_F=bf, num_warps=_DB_WARPS,
            )
            dbias = dbp.sum(0).to(b.dtype)
        dx_out = dx.view(ctx.x_shape) if need_dx else None
        return dx_out, dbias, None


def bias_gelu_reference(x: torch.Tensor, bias: torch.Tensor | None = None, approximate: str = "none") -> torch.Tensor:
    """Plain torch: ``F.gelu(x + bias, approximate=approximate)``."""
    h = x if bias is None else x + bias
    return F.gelu(h, approximate=approximate)


def bias_gelu(x: torch.Tensor, bias: torch.Tensor | None = None, approximate: str = "none") -> torch.Tensor:
    """``gelu(x + bias)`` over the last dim of ``x``; ``bias`` is ``[F]`` or ``None``.

    ``approximate`` is ``"none"`` (exact erf GELU, BERT) or ``"tanh"``. Differentiable in ``x`` and
    ``bias``. Triton on CUDA (and on CPU under ``TRITON_INTERPRET=1``), else the torch reference.
    """
    if approximate not in _APPROX:
        raise ValueError(f"approximate must be one of {_APPROX}, got {approximate!r}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != x.shape[-1]):
        raise ValueError(f"bias must be [{x.shape[-1]}], got {tuple(bias.shape)}")
    if not use_triton(x) or x.dim() == 0:
        return bias_gelu_reference(x, bias, approximate)
    return _BiasGeluFn.apply(x, bias, approximate)


__all__ = ["bias_gelu", "bias_gelu_reference"]
