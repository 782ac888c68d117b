"""Rotary position embedding (RoPE) on packed tokens, HF ``rotate_half`` convention.

Shapes: ``q`` ``[T, Hq, D]``, ``k`` ``[T, Hk, D]`` (packed tokens of several sequences; any strides
for the token and head dims, e.g. views of one fused QKV projection; the last dim must be
contiguous, else it is copied). ``position_ids`` ``[T]`` int32/int64 (restarting at 0 for each packed
sequence). Outputs are new contiguous ``[T, H, D]`` tensors in ``q``/``k``'s dtype (not in place).

cos/sin tables (``cos``, ``sin``; fp32 recommended, any float dtype accepted, last dim contiguous):

* ``[max_pos, D]``: exactly what HF rotary modules return (``emb = cat(freqs, freqs)``), e.g.
  ``cos, sin = rotary_emb(x, torch.arange(max_pos)[None])``; ``cos[0], sin[0]``. Both halves are
  read, so any ``attention_scaling`` baked in by HF is honoured.
* ``[max_pos, D/2]``: the non-duplicated half (``freqs = pos * inv_freq``); it is used for both
  halves.
* With ``position_ids=None`` the tables are per token instead: row ``t`` is used for token ``t``
  (``[T, D]`` or ``[T, D/2]``, e.g. HF's ``rotary_emb(x, position_ids)`` output squeezed).

Positions outside ``[0, max_pos)`` are not checked on the GPU (that would sync); their cos/sin
read as 0.

Math, per head, ``x = [x1 | x2]`` halves of size ``D/2``, ``c = [c1 | c2]``, ``s = [s1 | s2]``
the table rows at ``position_ids[t]`` (``c1 == c2 = cos(pos * inv_freq)``,
``inv_freq[i] = theta^(-2i/D)``, for HF tables):

Forward  ``out = x * c + rotate_half(x) * s``, ``rotate_half(x) = [-x2 | x1]``:
    ``o1 = x1 c1 - x2 s1``,   ``o2 = x2 c2 + x1 s2``

Backward (transpose of the forward, i.e. rotation by ``-angle``), ``g = dL/dout``:
    ``dx1 = g1 c1 + g2 s2``,  ``dx2 = g2 c2 - g1 s1``

Compute is fp32 in registers (HF computes in the model dtype; results match within rounding).
No gradient flows to ``cos``/``sin``/``position_ids``.
"""

from __future__ import annotations

import torch

from ._backend import next_power_of_2, triton_available, use_triton

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _load_cos_sin(
        cos_ptr, sin_ptr, pos_ptr, tok64, tmask, n_pos, stride_cos, stride_sin, half, second_off,
        HAS_POS: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """Returns c1, s1, c2, s2 as fp32 [BLOCK_T, 1, BLOCK_D]."""
        if HAS_POS:
            pos = tl.load(pos_ptr + tok64, mask=tmask, other=0).to(tl.int64)
        else:
            pos = tok64
        pmask = tmask & (pos >= 0) & (pos < n_pos)
        d = tl.arange(0, BLOCK_D)
        m = pmask[:, None] & (d < half)[None, :]
        co = pos[:, None] * stride_cos + d[None, :]
        so = pos[:, None] * stride_sin + d[None, :]
        c1 = tl.load(cos_ptr + co, mask=m, other=0.0).to(tl.float32)
        s1 = tl.load(sin_ptr + so, mask=m, other=0.0).to(tl.float32)
        c2 = tl.load(cos_ptr + co + second_off, mask=m, other=0.0).to(tl.float32)
        s2 = tl.load(sin_ptr + so + second_off, mask=m, other=0.0).to(tl.float32)
        return c1[:, None, :], s1[:, None, :], c2[:, None, :], s2[:, None, :]

    @triton.jit
    def _rope_tile(
        x_ptr, o_ptr, tok64, tmask, n_heads, sxt, sxh, sot, soh, half, c1, s1, c2, s2,
        BACKWARD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        d = tl.arange(0, BLOCK_D)
        dmask = d < half
        for h0 in range(0, n_heads, BLOCK_H):
            heads = h0 + tl.arange(0, BLOCK_H)
            mask = tmask[:, None, None] & (heads < n_heads)[None, :, None] & dmask[None, None, :]
            xo = tok64[:, None, None] * sxt + heads[None, :, None] * sxh + d[None, None, :]
            oo = tok64[:, None, None] * sot + heads[None, :, None] * soh + d[None, None, :]
            x1 = tl.load(x_ptr + xo, mask=mask, other=0.0).to(tl.float32)
            x2 = tl.load(x_ptr + xo + half, mask=mask, other=0.0).to(tl.float32)
            if BACKWARD:
                o1 = x1 * c1 + x2 * s2
                o2 = x2 * c2 - x1 * s1
            else:
                o1 = x1 * c1 - x2 * s1
                o2 = x2 * c2 + x1 * s2
            tl.store(o_ptr + oo, o1.to(o_ptr.dtype.element_ty), mask=mask)
            tl.store(o_ptr + oo + half, o2.to(o_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope_kernel(
        q_ptr, k_ptr, qo_ptr, ko_ptr, cos_ptr, sin_ptr, pos_ptr,
        n_tok, n_hq, n_hk, n_pos, half, second_off,
        sqt, sqh, skt, skh, sqot, sqoh, skot, skoh, stride_cos, stride_sin,
        HAS_POS: tl.constexpr, BACKWARD: tl.constexpr,
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
        _rope_tile(q_ptr, qo_ptr, tok64, tmask, n_hq, sqt, sqh, sqot, sqoh, half, c1, s1, c2, s2,
                   BACKWARD, BLOCK_HQ, BLOCK_D)
        _rope_tile(k_ptr, ko_ptr, tok64, tmask, n_hk, skt, skh, skot, skoh, half, c1, s1, c2, s2,
                   BACKWARD, BLOCK_HK, BLOCK_D)


def _check_tables(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  position_ids: torch.Tensor | None) -> None:
    if q.dim() != 3 or k.dim() != 3:
        raise ValueError(f"q and k must be [T, H, D], got {tuple(q.shape)} and {tuple(k.shape)}")
    t, _, d = q.shape
    if k.shape[0] != t or k.shape[2] != d:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on T or D")
    if d % 2 != 0:
        raise ValueError(f"head dim must be even, got {d}")
    if cos.dim() != 2 or cos.shape != sin.shape or cos.shape[1] not in (d, d // 2):
        raise ValueError(f"cos/sin must both be [max_pos, {d}] or [max_pos, {d // 2}], got "
                         f"{tuple(cos.shape)} and {tuple(sin.shape)}")
    if position_ids is None:
        if cos.shape[0] != t:
            raise ValueError(f"without position_ids, cos/sin must have one row per token ({t}), got {cos.shape[0]}")
    elif position_ids.shape != (t,):
        raise ValueError(f"position_ids must be [{t}], got {tuple(position_ids.shape)}")


def _last_contig(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _rope_blocks(hq: int, hk: int, d: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_T, BLOCK_HQ, BLOCK_HK, BLOCK_D, num_warps): about 1024 elements per half-tile, one
    warp (tuned on H200: [8192, 16|8, 128] and [8192, 3|1, 256] bf16 run at ~3.6 TB/s)."""
    block_d = next_power_of_2(d // 2)
    cap = max(1, 1024 // block_d)
    bhq = min(next_power_of_2(hq), cap)
    bhk = min(next_power_of_2(hk), cap)
    block_t = max(1, 1024 // (max(bhq, bhk) * block_d))
    return block_t, bhq, bhk, block_d, 1


def _launch_rope(q, k, qo, ko, cos, sin, position_ids, backward: bool) -> None:
    t, hq, d = q.shape
    hk = k.shape[1]
    if t == 0:
        return
    half = d // 2
    second_off = half if cos.shape[1] == d else 0
    bt, bhq, bhk, bd, nw = _rope_blocks(hq, hk, d)
    pos = position_ids if position_ids is not None else cos  # dummy pointer when HAS_POS=False
    _rope_kernel[(triton.cdiv(t, bt),)](
        q, k, qo, ko, cos, sin, pos,
        t, hq, hk, cos.shape[0], half, second_off,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        qo.stride(0), qo.stride(1), ko.stride(0), ko.stride(1), cos.stride(0), sin.stride(0),
        HAS_POS=position_ids is not None, BACKWARD=backward,
        BLOCK_T=bt, BLOCK_HQ=bhq, BLOCK_HK=bhk, BLOCK_D=bd, num_warps=nw,
    )


class _RopeFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin, position_ids):
        q = _last_contig(q)
        k = _last_contig(k)
        qo = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        ko = torch.empty(k.shape, dtype=k.dtype, device=k.device)
        _launch_rope(q, k, qo, ko, cos, sin, position_ids, backward=False)
        ctx.save_for_backward(cos, sin, position_ids)
        ctx.q_dtype, ctx.k_dtype = q.dtype, k.dtype
        return qo, ko

    @staticmethod
    def backward(ctx, dqo, dko):
        cos, sin, position_ids = ctx.saved_tensors
        dqo = _last_contig(dqo)
        dko = _last_contig(dko)
        dq = torch.empty(dqo.shape, dtype=ctx.q_dtype, device=dqo.device)
        dk = torch.empty(dko.shape, dtype=ctx.k_dtype, device=dko.device)
        _launch_rope(dqo, dko, dq, dk, cos, sin, position_ids, backward=True)
        return dq, dk, None, None, None


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """HF's ``rotate_half``: ``cat(-x[..., D/2:], x[..., :D/2])``."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def gather_cos_sin(cos: torch.Tensor, sin: torch.Tensor, position_ids: torch.Tensor | None, head_dim: int):
    """Per-token fp32 ``[T, 1, D]`` cos/sin from a table (either convention), for the references."""
    if position_ids is not None:
        cos = cos[position_ids.long()]
        sin = sin[position_ids.long()]
    if cos.shape[-1] == head_dim // 2:
        cos = torch.cat((cos, cos), dim=-1)
        sin = torch.cat((sin, sin), dim=-1)
    return cos.float()[:, None, :], sin.float()[:, None, :]


def apply_rope_reference(q, k, cos, sin, position_ids):
    """Plain torch (fp32 compute, cast back): ``x * cos + rotate_half(x) * sin`` for q and k."""
    _check_tables(q, k, cos, sin, position_ids)
    c, s = gather_cos_sin(cos, sin, position_ids, q.shape[-1])
    q32, k32 = q.float(), k.float()
    qo = q32 * c + rotate_half(q32) * s
    ko = k32 * c + rotate_half(k32) * s
    return qo.to(q.dtype), ko.to(k.dtype)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               position_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE for packed ``q`` ``[T, Hq, D]`` and ``k`` ``[T, Hk, D]``; returns new ``(q, k)``.

    ``cos``/``sin``: ``[max_pos, D]`` (HF layout) or ``[max_pos, D/2]`` tables indexed by
    ``position_ids`` ``[T]``; or per-token ``[T, D]``/``[T, D/2]`` with ``position_ids=None``.
    Differentiable in ``q`` and ``k``. Triton on CUDA (and on CPU under ``TRITON_INTERPRET=1``),
    else the torch reference.
    """
    _check_tables(q, k, cos, sin, position_ids)
    if not use_triton(q):
        return apply_rope_reference(q, k, cos, sin, position_ids)
    cos = _last_contig(cos)
    sin = _last_contig(sin)
    if position_ids is not None:
        position_ids = position_ids.contiguous()
    return _RopeFn.apply(q, k, cos, sin, position_ids)


__all__ = ["apply_rope", "apply_rope_reference", "rotate_half", "gather_cos_sin"]
