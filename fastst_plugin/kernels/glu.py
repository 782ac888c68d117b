"""Gated activation (GeGLU / SwiGLU): ``y = act(x[..., :F]) * x[..., F:]``.

``x`` is ``[..., 2F]``, laid out as ``[gate_input | up]`` along the last dim (the output of one fused
``Linear(d, 2F)``); both halves are read in place, no chunk copies. ``y`` is ``[..., F]``.
``activation``:

* ``"gelu"``      exact erf GELU (ModernBERT GeGLU):  ``act(a) = 0.5 a (1 + erf(a / sqrt 2))``
* ``"gelu_tanh"`` tanh GELU (Gemma3):  ``act(a) = 0.5 a (1 + tanh(sqrt(2/pi) (a + 0.044715 a^3)))``
* ``"silu"``      SiLU (SwiGLU, Qwen3):  ``act(a) = a * sigmoid(a)``

Forward (fp32 in registers, stored in ``x.dtype``), with ``a = x[..., :F]``, ``u = x[..., F:]``:
``y = act(a) * u``.

Backward, with ``g = dL/dy``:

* ``dx[..., :F] = g * u * act'(a)``
* ``dx[..., F:] = g * act(a)``

with ``act'`` for gelu/gelu_tanh as documented in ``gelu.py`` and, for silu,
``act'(a) = s * (1 + a * (1 - s))``, ``s = sigmoid(a)``. Only ``x`` is saved for backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._backend import next_power_of_2, triton_available, use_triton

_ACTS = {"gelu": 0, "gelu_tanh": 1, "silu": 2}

if triton_available():
    import triton
    import triton.language as tl

    from .gelu import _gelu_fwd_math, _gelu_grad_math

    @triton.jit
    def _act_fwd(a, ACT: tl.constexpr):
        if ACT == 2:
            out = a * tl.sigmoid(a)
        else:
            out = _gelu_fwd_math(a, ACT == 1)
        return out

    @triton.jit
    def _act_fwd_and_grad(a, ACT: tl.constexpr):
        if ACT == 2:
            s = tl.sigmoid(a)
            val = a * s
            d = s * (1.0 + a * (1.0 - s))
        else:
            val = _gelu_fwd_math(a, ACT == 1)
            d = _gelu_grad_math(a, ACT == 1)
        return val, d

    @triton.jit
    def _glu_fwd_kernel(
        x_ptr, y_ptr, n_rows, n_cols, stride_xr,
        ACT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr,
    ):
        pid_r = tl.program_id(0)
        pid_f = tl.program_id(1)
        rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
        mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        x_offs = rows64 * stride_xr + cols[None, :]
        a = tl.load(x_ptr + x_offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(x_ptr + x_offs + n_cols, mask=mask, other=0.0).to(tl.float32)
        y = _act_fwd(a, ACT) * u
        tl.store(y_ptr + rows64 * n_cols + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _glu_bwd_kernel(
        g_ptr, x_ptr, dx_ptr, n_rows, n_cols, stride_xr,
        ACT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr,
    ):
        pid_r = tl.program_id(0)
        pid_f = tl.program_id(1)
        rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
        mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        x_offs = rows64 * stride_xr + cols[None, :]
        a = tl.load(x_ptr + x_offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(x_ptr + x_offs + n_cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + rows64 * n_cols + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        act, dact = _act_fwd_and_grad(a, ACT)
        dx_offs = rows64 * (2 * n_cols) + cols[None, :]
        tl.store(dx_ptr + dx_offs, (g * u * dact).to(dx_ptr.dtype.element_ty), mask=mask)
        tl.store(dx_ptr + dx_offs + n_cols, (g * act).to(dx_ptr.dtype.element_ty), mask=mask)


def _blocks(n_rows: int, n_cols: int) -> tuple[int, int, int]:
    block_f = min(next_power_of_2(n_cols), 256)
    block_r = max(1, min(4096 // block_f, next_power_of_2(n_rows)))
    num_warps = 8 if block_r * block_f >= 4096 else 4
    return block_r, block_f, num_warps


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return x2


class _GatedActFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, act_id):
        two_f = x.shape[-1]
        n_cols = two_f // 2
        x2 = _as_rows(x)
        n_rows = x2.shape[0]
        y = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
        if y.numel() > 0:
            br, bf, nw = _blocks(n_rows, n_cols)
            _glu_fwd_kernel[(triton.cdiv(n_rows, br), triton.cdiv(n_cols, bf))](
                x2, y, n_rows, n_cols, x2.stride(0),
                ACT=act_id, BLOCK_R=br, BLOCK_F=bf, num_warps=nw,
            )
        ctx.save_for_backward(x2)
        ctx.act_id = act_id
        ctx.x_shape = x.shape
        return y.view(*x.shape[:-1], n_cols)

    @staticmethod
    def backward(ctx, grad_out):
        (x2,) = ctx.saved_tensors
        n_rows, two_f = x2.shape
        n_cols = two_f // 2
        g = grad_out.reshape(n_rows, n_cols).contiguous()
        dx = torch.empty((n_rows, two_f), dtype=x2.dtype, device=x2.device)
        if dx.numel() > 0:
            br, bf, nw = _blocks(n_rows, n_cols)
            _glu_bwd_kernel[(triton.cdiv(n_rows, br), triton.cdiv(n_cols, bf))](
                g, x2, dx, n_rows, n_cols, x2.stride(0),
                ACT=ctx.act_id, BLOCK_R=br, BLOCK_F=bf, num_warps=nw,
            )
        return dx.view(ctx.x_shape), None


def gated_activation_reference(x: torch.Tensor, activation: str) -> torch.Tensor:
    """Plain torch: ``act(x[..., :F]) * x[..., F:]`` (in ``x.dtype``, like HF)."""
    gate, up = x.chunk(2, dim=-1)
    if activation == "gelu":
        a = F.gelu(gate)
    elif activation == "gelu_tanh":
        a = F.gelu(gate, approximate="tanh")
    elif activation == "silu":
        a = F.silu(gate)
    else:
        raise ValueError(f"activation must be one of {tuple(_ACTS)}, got {activation!r}")
    return a * up


def gated_activation(x: torch.Tensor, activation: str) -> torch.Tensor:
    """``act(x[..., :F]) * x[..., F:]`` for ``x`` ``[..., 2F]``; returns ``[..., F]``.

    ``activation`` in ``{"gelu", "gelu_tanh", "silu"}``. Differentiable in ``x``. Triton on CUDA
    (and on CPU under ``TRITON_INTERPRET=1``), else the torch reference.
    """
    if activation not in _ACTS:
        raise ValueError(f"activation must be one of {tuple(_ACTS)}, got {activation!r}")
    if x.dim() == 0 or x.shape[-1] % 2 != 0:
        raise ValueError(f"last dim of x must be even (2F), got shape {tuple(x.shape)}")
    if not use_triton(x):
        return gated_activation_reference(x, activation)
    return _GatedActFn.apply(x, _ACTS[activation])


__all__ = ["gated_activation", "gated_activation_reference"]
