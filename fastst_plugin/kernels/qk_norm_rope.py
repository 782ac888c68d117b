"""Fused per-head RMSNorm + RoPE for q and k (Qwen3 / Gemma3 ``q_norm``/``k_norm`` then rotary).

Shapes and tables as in ``rope.py``: ``q`` ``[T, Hq, D]``, ``k`` ``[T, Hk, D]`` (any token/head
strides, contiguous last dim), ``q_weight``/``k_weight`` ``[D]``, ``cos``/``sin`` ``[max_pos, D]``
(HF layout) or ``[max_pos, D/2]`` indexed by ``position_ids`` ``[T]`` (or per-token tables with
``position_ids=None``). Outputs are new contiguous ``[T, H, D]`` tensors in the input dtype.

Forward, per (token, head) row ``x`` of length ``D``, all in fp32:

    rstd = 1 / sqrt(mean(x^2) + eps)
    xh   = x * rstd
    n    = xh * (offset + w)                  (offset = 1.0 for Gemma3, 0.0 for Qwen3)
    out  = n * c + rotate_half(n) * s         (o1 = n1 c1 - n2 s1, o2 = n2 c2 + n1 s2)

(HF rounds ``n`` to the model dtype before RoPE; here it stays fp32: equal within rounding.)

Backward, ``g = dL/dout``:

    dn1 = g1 c1 + g2 s2,   dn2 = g2 c2 - g1 s1          (RoPE transpose: rotation by -angle)
    dw  = sum over tokens and heads of dn * xh     (fp32; backward programs are persistent over
                                                    token blocks, one partial row each, summed by torch)
    dxh = dn * (offset + w)
    dx  = rstd * (dxh - xh * mean(dxh * xh))

``rstd`` is recomputed in backward (only ``q``, ``k``, weights and tables are saved). No gradient
flows to ``cos``/``sin``/``position_ids``; weights may have ``requires_grad=False``.
"""

from __future__ import annotations

import functools

import torch

from ._backend import next_power_of_2, triton_available, use_triton
from .rope import _check_tables, _last_contig, gather_cos_sin, rotate_half

if triton_available():
    import triton
    import triton.language as tl

    from .rope import _load_cos_sin

    @triton.jit
    def _norm_rope_fwd_tile(
        x_ptr, o_ptr, w_ptr, tok64, tmask, n_heads, sxt, sxh, sot, soh, half, inv_d, eps, offset,
        c1, s1, c2, s2, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        d = tl.arange(0, BLOCK_D)
        dmask = d < half
        w1 = (tl.load(w_ptr + d, mask=dmask, other=0.0).to(tl.float32) + offset)[None, None, :]
        w2 = (tl.load(w_ptr + half + d, mask=dmask, other=0.0).to(tl.float32) + offset)[None, None, :]
        for h0 in range(0, n_heads, BLOCK_H):
            heads = h0 + tl.arange(0, BLOCK_H)
            mask = tmask[:, None, None] & (heads < n_heads)[None, :, None] & dmask[None, None, :]
            xo = tok64[:, None, None] * sxt + heads[None, :, None] * sxh + d[None, None, :]
            oo = tok64[:, None, None] * sot + heads[None, :, None] * soh + d[None, None, :]
            x1 = tl.load(x_ptr + xo, mask=mask, other=0.0).to(tl.float32)
            x2 = tl.load(x_ptr + xo + half, mask=mask, other=0.0).to(tl.float32)
            ms = (tl.sum(x1 * x1, axis=2) + tl.sum(x2 * x2, axis=2)) * inv_d
            rstd = (1.0 / tl.sqrt(ms + eps))[:, :, None]
            n1 = x1 * rstd * w1
            n2 = x2 * rstd * w2
            o1 = n1 * c1 - n2 * s1
            o2 = n2 * c2 + n1 * s2
            tl.store(o_ptr + oo, o1.to(o_ptr.dtype.element_ty), mask=mask)
            tl.store(o_ptr + oo + half, o2.to(o_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _norm_rope_bwd_tile(
        g_ptr, x_ptr, dx_ptr, w_ptr, acc1, acc2, tok64, tmask, n_heads,
        sgt, sgh, sxt, sxh, sdt, sdh, half, inv_d, eps, offset,
        c1, s1, c2, s2, W_GRAD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """dx for one token block; returns the dw accumulators ([BLOCK_T, BLOCK_H, BLOCK_D] fp32,
        elementwise sums of dn * xh, reduced once at the end of the program)."""
        d = tl.arange(0, BLOCK_D)
        dmask = d < half
        w1 = (tl.load(w_ptr + d, mask=dmask, other=0.0).to(tl.float32) + offset)[None, None, :]
        w2 = (tl.load(w_ptr + half + d, mask=dmask, other=0.0).to(tl.float32) + offset)[None, None, :]
        for h0 in range(0, n_heads, BLOCK_H):
            heads = h0 + tl.arange(0, BLOCK_H)
            mask = tmask[:, None, None] & (heads < n_heads)[None, :, None] & dmask[None, None, :]
            t3 = tok64[:, None, None]
            h3 = heads[None, :, None]
            d3 = d[None, None, :]
            xo = t3 * sxt + h3 * sxh + d3
            go = t3 * sgt + h3 * sgh + d3
            do = t3 * sdt + h3 * sdh + d3
            x1 = tl.load(x_ptr + xo, mask=mask, other=0.0).to(tl.float32)
            x2 = tl.load(x_ptr + xo + half, mask=mask, other=0.0).to(tl.float32)
            g1 = tl.load(g_ptr + go, mask=mask, other=0.0).to(tl.float32)
            g2 = tl.load(g_ptr + go + half, mask=mask, other=0.0).to(tl.float32)
            dn1 = g1 * c1 + g2 * s2
            dn2 = g2 * c2 - g1 * s1
            ms = (tl.sum(x1 * x1, axis=2) + tl.sum(x2 * x2, axis=2)) * inv_d
            rstd = (1.0 / tl.sqrt(ms + eps))[:, :, None]
            xh1 = x1 * rstd
            xh2 = x2 * rstd
            if W_GRAD:
                acc1 += dn1 * xh1
                acc2 += dn2 * xh2
            dxh1 = dn1 * w1
            dxh2 = dn2 * w2
            m = ((tl.sum(dxh1 * xh1, axis=2) + tl.sum(dxh2 * xh2, axis=2)) * inv_d)[:, :, None]
            dx1 = rstd * (dxh1 - xh1 * m)
            dx2 = rstd * (dxh2 - xh2 * m)
            tl.store(dx_ptr + do, dx1.to(dx_ptr.dtype.element_ty), mask=mask)
            tl.store(dx_ptr + do + half, dx2.to(dx_ptr.dtype.element_ty), mask=mask)
        return acc1, acc2

    @triton.jit
    def _store_dw_partial(dwp_ptr, pid, acc1, acc2, half, dw_stride, BLOCK_D: tl.constexpr):
        d = tl.arange(0, BLOCK_D)
        dmask = d < half
        row = dwp_ptr + pid.to(tl.int64) * dw_stride
        tl.store(row + d, tl.sum(tl.sum(acc1, axis=0), axis=0), mask=dmask)
        tl.store(row + half + d, tl.sum(tl.sum(acc2, axis=0), axis=0), mask=dmask)

    @triton.jit
    def _qk_norm_rope_fwd_kernel(
        q_ptr, k_ptr, qo_ptr, ko_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, pos_ptr,
        n_tok, n_hq, n_hk, n_pos, half, second_off, inv_d, eps, offset,
        sqt, sqh, skt, skh, sqot, sqoh, skot, skoh, stride_cos, stride_sin,
        HAS_POS: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        pid = tl.program_id(0)
        tok = pid * BLOCK_T + tl.arange(0, BLOCK_T)
        tmask = tok < n_tok
        tok64 = tok.to(tl.int64)
        c1, s1, c2, s2 = _load_cos_sin(
            cos_ptr, sin_ptr, pos_ptr, tok64, tmask, n_pos, stride_cos, stride_sin, half, second_off,
            HAS_POS, BLOCK_D,
        )
        _norm_rope_fwd_tile(q_ptr, qo_ptr, qw_ptr, tok64, tmask, n_hq, sqt, sqh, sqot, sqoh, half,
                            inv_d, eps, offset, c1, s1, c2, s2, BLOCK_HQ, BLOCK_D)
        _norm_rope_fwd_tile(k_ptr, ko_ptr, kw_ptr, tok64, tmask, n_hk, skt, skh, skot, skoh, half,
                            inv_d, eps, offset, c1, s1, c2, s2, BLOCK_HK, BLOCK_D)

    @triton.jit
    def _qk_norm_rope_bwd_kernel(
        gq_ptr, gk_ptr, q_ptr, k_ptr, dq_ptr, dk_ptr, qw_ptr, kw_ptr, dqwp_ptr, dkwp_ptr,
        cos_ptr, sin_ptr, pos_ptr,
        n_tok, n_hq, n_hk, n_pos, half, dw_stride, second_off, inv_d, eps, offset,
        sgqt, sgqh, sgkt, sgkh, sqt, sqh, skt, skh, sdqt, sdqh, sdkt, sdkh, stride_cos, stride_sin,
        HAS_POS: tl.constexpr, QW_GRAD: tl.constexpr, KW_GRAD: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """Persistent over token blocks (pid, pid + nprog, ...), so each program writes one dw
        partial row per weight."""
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        n_tb = tl.cdiv(n_tok, BLOCK_T)
        aq1 = tl.zeros([BLOCK_T, BLOCK_HQ, BLOCK_D], dtype=tl.float32)
        aq2 = tl.zeros([BLOCK_T, BLOCK_HQ, BLOCK_D], dtype=tl.float32)
        ak1 = tl.zeros([BLOCK_T, BLOCK_HK, BLOCK_D], dtype=tl.float32)
        ak2 = tl.zeros([BLOCK_T, BLOCK_HK, BLOCK_D], dtype=tl.float32)
        for tb in range(pid, n_tb, nprog):
            tok = tb * BLOCK_T + tl.arange(0, BLOCK_T)
            tmask = tok < n_tok
            tok64 = tok.to(tl.int64)
            c1, s1, c2, s2 = _load_cos_sin(
                cos_ptr, sin_ptr, pos_ptr, tok64, tmask, n_pos, stride_cos, stride_sin, half, second_off,
                HAS_POS, BLOCK_D,
            )
            aq1, aq2 = _norm_rope_bwd_tile(gq_ptr, q_ptr, dq_ptr, qw_ptr, aq1, aq2, tok64, tmask, n_hq,
                                           sgqt, sgqh, sqt, sqh, sdqt, sdqh, half, inv_d, eps, offset,
                                           c1, s1, c2, s2, QW_GRAD, BLOCK_HQ, BLOCK_D)
            ak1, ak2 = _norm_rope_bwd_tile(gk_ptr, k_ptr, dk_ptr, kw_ptr, ak1, ak2, tok64, tmask, n_hk,
                                           sgkt, sgkh, skt, skh, sdkt, sdkh, half, inv_d, eps, offset,
                                           c1, s1, c2, s2, KW_GRAD, BLOCK_HK, BLOCK_D)
        if QW_GRAD:
            _store_dw_partial(dqwp_ptr, pid, aq1, aq2, half, dw_stride, BLOCK_D)
        if KW_GRAD:
            _store_dw_partial(dkwp_ptr, pid, ak1, ak2, half, dw_stride, BLOCK_D)


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _sm_count(t: torch.Tensor) -> int:
    # on CPU (interpreter) a small number, so tests walk several token blocks per program
    return _num_sms(t.device.index if t.device.index is not None else torch.cuda.current_device()) if t.is_cuda else 1


def _blocks(hq: int, hk: int, d: int, backward: bool) -> tuple[int, int, int, int, int]:
    """(BLOCK_T, BLOCK_HQ, BLOCK_HK, BLOCK_D, num_warps): about 1024 elements per half-tile, one
    warp; two in backward when one token fills the tile (tuned on H200 for [8192, 16|8, 128] and
    [8192, 3|1, 256] bf16: forward ~3.5 TB/s, backward ~2.5-3 TB/s)."""
    block_d = next_power_of_2(d // 2)
    cap = max(1, 1024 // block_d)
    bhq = min(next_power_of_2(hq), cap)
    bhk = min(next_power_of_2(hk), cap)
    per_tok = max(bhq, bhk) * block_d
    block_t = max(1, 1024 // per_tok)
    num_warps = 2 if backward and per_tok >= 1024 else 1
    return block_t, bhq, bhk, block_d, num_warps


def _bwd_programs(n_tblocks: int, num_warps: int, t: torch.Tensor) -> int:
    """Persistent backward grid when weight grads are needed: ~8 warps per SM in flight."""
    return max(1, min(n_tblocks, _sm_count(t) * max(1, 8 // num_warps)))


class _QKNormRopeFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, q_weight, k_weight, eps, offset, cos, sin, position_ids):
        q = _last_contig(q)
        k = _last_contig(k)
        qw = q_weight.contiguous()
        kw = k_weight.contiguous()
        t, hq, d = q.shape
        hk = k.shape[1]
        qo = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        ko = torch.empty(k.shape, dtype=k.dtype, device=k.device)
        bt, bhq, bhk, bd, nw = _blocks(hq, hk, d, backward=False)
        if t > 0:
            _qk_norm_rope_fwd_kernel[(triton.cdiv(t, bt),)](
                q, k, qo, ko, qw, kw, cos, sin, position_ids if position_ids is not None else cos,
                t, hq, hk, cos.shape[0], d // 2, d // 2 if cos.shape[1] == d else 0,
                1.0 / d, float(eps), float(offset),
                q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                qo.stride(0), qo.stride(1), ko.stride(0), ko.stride(1), cos.stride(0), sin.stride(0),
                HAS_POS=position_ids is not None,
                BLOCK_T=bt, BLOCK_HQ=bhq, BLOCK_HK=bhk, BLOCK_D=bd, num_warps=nw,
            )
        ctx.save_for_backward(q, k, qw, kw, cos, sin, position_ids)
        ctx.eps, ctx.offset = float(eps), float(offset)
        return qo, ko

    @staticmethod
    def backward(ctx, gq, gk):
        q, k, qw, kw, cos, sin, position_ids = ctx.saved_tensors
        need_qw = ctx.needs_input_grad[2]
        need_kw = ctx.needs_input_grad[3]
        gq = _last_contig(gq)
        gk = _last_contig(gk)
        t, hq, d = q.shape
        hk = k.shape[1]
        dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
        bt, bhq, bhk, bd, nw = _blocks(hq, hk, d, backward=True)
        n_prog = triton.cdiv(t, bt)
        if need_qw or need_kw:
            n_prog = _bwd_programs(n_prog, nw, q) if n_prog > 0 else 0
        # one fp32 partial buffer [n_prog, 2, D] for both weights: row pid holds that program's sums
        dwp = torch.empty((max(n_prog, 1), 2, d), dtype=torch.float32, device=q.device) if need_qw or need_kw else dq
        if n_prog > 0:
            _qk_norm_rope_bwd_kernel[(n_prog,)](
                gq, gk, q, k, dq, dk, qw, kw, dwp, dwp[:, 1] if (need_qw or need_kw) else dq,
                cos, sin, position_ids if position_ids is not None else cos,
                t, hq, hk, cos.shape[0], d // 2, 2 * d, d // 2 if cos.shape[1] == d else 0,
                1.0 / d, ctx.eps, ctx.offset,
                gq.stride(0), gq.stride(1), gk.stride(0), gk.stride(1),
                q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                dq.stride(0), dq.stride(1), dk.stride(0), dk.stride(1), cos.stride(0), sin.stride(0),
                HAS_POS=position_ids is not None, QW_GRAD=need_qw, KW_GRAD=need_kw,
                BLOCK_T=bt, BLOCK_HQ=bhq, BLOCK_HK=bhk, BLOCK_D=bd, num_warps=nw,
            )
        elif need_qw or need_kw:
            dwp.zero_()
        dqw = dkw = None
        if need_qw and need_kw:
            dw = dwp.sum(0)  # [2, D] fp32: one reduction for both weights
            if qw.dtype == kw.dtype:
                dw = dw.to(qw.dtype)
            dqw, dkw = dw[0].to(qw.dtype), dw[1].to(kw.dtype)
        elif need_qw:
            dqw = dwp[:, 0].sum(0).to(qw.dtype)
        elif need_kw:
            dkw = dwp[:, 1].sum(0).to(kw.dtype)
        return dq, dk, dqw, dkw, None, None, None, None, None


def _check_weights(q, q_weight, k_weight):
    d = q.shape[-1]
    if q_weight.shape != (d,) or k_weight.shape != (d,):
        raise ValueError(f"q_weight/k_weight must be [{d}], got {tuple(q_weight.shape)} and {tuple(k_weight.shape)}")


def rms_norm_heads_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float) -> torch.Tensor:
    """fp32 ``x * rsqrt(mean(x^2) + eps) * (offset + w)`` over the last dim (returned in fp32)."""
    x32 = x.float()
    return x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * (offset + weight.float())


def qk_norm_rope_reference(q, k, q_weight, k_weight, eps, offset, cos, sin, position_ids):
    """Plain torch, fp32 compute, cast back: RMSNorm per head, then RoPE."""
    _check_tables(q, k, cos, sin, position_ids)
    _check_weights(q, q_weight, k_weight)
    c, s = gather_cos_sin(cos, sin, position_ids, q.shape[-1])
    qn = rms_norm_heads_reference(q, q_weight, eps, offset)
    kn = rms_norm_heads_reference(k, k_weight, eps, offset)
    qo = qn * c + rotate_half(qn) * s
    ko = kn * c + rotate_half(kn) * s
    return qo.to(q.dtype), ko.to(k.dtype)


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                 eps: float, offset: float, cos: torch.Tensor, sin: torch.Tensor,
                 position_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head RMSNorm (weight ``offset + w``) then RoPE, for packed ``q`` ``[T, Hq, D]`` and ``k``
    ``[T, Hk, D]``; returns new ``(q, k)``. ``offset=1.0`` for Gemma3, ``0.0`` for Qwen3. Tables as in
    :func:`fastst_plugin.kernels.rope.apply_rope`. Differentiable in ``q``, ``k``, ``q_weight``,
    ``k_weight``. Triton on CUDA (and on CPU under ``TRITON_INTERPRET=1``), else the torch reference.
    """
    _check_tables(q, k, cos, sin, position_ids)
    _check_weights(q, q_weight, k_weight)
    if not use_triton(q):
        return qk_norm_rope_reference(q, k, q_weight, k_weight, eps, offset, cos, sin, position_ids)
    cos = _last_contig(cos)
    sin = _last_contig(sin)
    if position_ids is not None:
        position_ids = position_ids.contiguous()
    return _QKNormRopeFn.apply(q, k, q_weight, k_weight, eps, offset, cos, sin, position_ids)


__all__ = ["qk_norm_rope", "qk_norm_rope_reference", "rms_norm_heads_reference"]
