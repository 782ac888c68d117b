"""Varlen (packed, ``cu_seqlens``) attention tuned for many short sequences: Triton forward and
backward, torch reference.

Inputs ``q: [T, Hq, D]``, ``k, v: [T, Hkv, D]`` (``Hq`` a multiple of ``Hkv``: GQA), sequence
boundaries ``cu_seqlens`` (int32 ``[N + 1]``, on the device), ``max_seqlen`` (host int, an upper
bound on every length; as with the flash kernels, an understated one gives wrong results), and
``cu_seqlens[-1] == T`` (rows past it are left unwritten). Output ``[T, Hq, D]`` in ``q.dtype``.
Masks, as in ``fastst_plugin.attention``: bidirectional or causal, plus an optional window
``(left, right)`` meaning the query at position i sees keys j with ``i - left <= j <= i + right``
inside its own sequence (-1 = unbounded; stock's bidirectional ``|i - j| <= w`` is ``(w, w)``).
No dropout.

Math (per sequence and head, fp32 accumulation, base-2 softmax as in FlashAttention-2)::

    s     = scale * q k^T            masked entries -inf
    lse   = logsumexp(s, axis=keys)  (saved for the backward, stored as log2: m2 + log2(l))
    p     = exp(s - lse),   o = p v
    delta = rowsum(do * o)
    dv    = p^T do,   dp = do v^T,   ds = p * (dp - delta)
    dq    = scale * ds k,   dk = scale * ds^T q

Why not the flash kernels: their grids are sized ``ceil(max_seqlen / block) * N * H``; with ~48-token
texts and ``max_seqlen`` 256 most programs idle, and their backward accumulates dq with fp32 atomics
plus a convert pass. Here:

* The grid enumerates only real (sequence, block) pairs: ``cdiv(T, BLOCK) + N`` programs at most
  (``N * cdiv(max_seqlen, BLOCK)`` if smaller). Each program reads its sequence and block from a
  program -> sequence map (``_block_map``: a cumulative sum of per-sequence block counts and a
  ``searchsorted`` over program ids, on the device), built once per encoder forward and shared by
  its layers (``shared_block_maps``); with ``FASTST_ATTN_BLOCK_MAP=0`` each program scans
  ``cu_seqlens`` itself instead (an ``N``-wide cumulative sum per program). Either way no host sync,
  and it works inside CUDA-graph capture (zero-length sequences are fine). Programs past the last
  block exit at once.
* Backward kernel 1 (``_bwd_dkdv``): one program per (key block, kv head) loops over the q heads of
  its GQA group and over the query blocks that can see its keys, accumulating dK and dV in registers
  (no atomics). When the whole sequence fits one block (the common case for short texts), that same
  program also sees every key of its queries, so it writes dQ too: the whole backward of such a
  (sequence, head) is one program.
* Backward kernel 2 (``_bwd_dq``), launched only when ``max_seqlen > BLOCK``: one program per
  (query block, q head) of the sequences longer than one block loops over key blocks and writes dQ
  (FA2's separate-dQ structure, recomputing p and dp; no atomics). Short sequences exit at once.
* ``delta`` is recomputed from ``o`` and ``do`` where it is needed instead of by a separate pass.

Everything is deterministic (no atomics). Runs under ``TRITON_INTERPRET=1`` with fp32/fp16 (no bf16
there). Head dims up to 128 (any, padded to a power of two); longer sequences work but were not the
design target, so ``attention='auto'`` only picks this kernel up to a ``max_seqlen`` threshold.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import os
from typing import Optional, Tuple

import torch

from ..config import env_switch
from ._backend import interpreter_on, next_power_of_2, triton_available, use_triton

MAX_HEAD_DIM = 128
# Without the block map (FASTST_ATTN_BLOCK_MAP=0) each program scans an N-wide vector of sequence
# boundaries; past this, another backend is used.
MAX_SEQS = 4096
_BIG = 1 << 30  # "unbounded" window side (lengths stay far below it)

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _locate(CU, N, pid, BLOCK: tl.constexpr, BLOCK_SEQS: tl.constexpr):
        """(sequence start, sequence length, block index within the sequence, valid) for program
        ``pid`` of a grid enumerating the ``cdiv(len, BLOCK)`` blocks of every sequence in order."""
        idx = tl.arange(0, BLOCK_SEQS)
        nmask = idx < N
        starts = tl.load(CU + idx, mask=nmask, other=0)
        ends = tl.load(CU + idx + 1, mask=nmask, other=0)
        lens = ends - starts
        nb = (lens + BLOCK - 1) // BLOCK
        cum = tl.cumsum(nb, 0)  # inclusive; entries past N repeat the total
        seq = tl.sum((cum <= pid).to(tl.int32), 0)  # sequences wholly before this block
        sel = idx == seq
        start = tl.sum(tl.where(sel, starts, 0), 0)
        length = tl.sum(tl.where(sel, lens, 0), 0)
        blk = pid - tl.sum(tl.where(sel, cum - nb, 0), 0)
        return start, length, blk, seq < N

    @triton.jit
    def _locate_mapped(CU, SEQ, FIRST, N, pid):
        """``_locate`` from a precomputed program -> sequence map (``_block_map``): two loads instead
        of a scan over all ``N`` boundaries."""
        seq = tl.load(SEQ + pid)
        valid = seq < N
        s = tl.where(valid, seq, 0)
        start = tl.load(CU + s)
        length = tl.load(CU + s + 1) - start
        blk = pid - tl.load(FIRST + s)
        return start, length, blk, valid

    @triton.jit
    def _load_rows(P, base, head, stride_t, stride_h, offs, offs_d, mask):
        """A [rows, BLOCK_D] tile of one head. ``base`` (int64) is the sequence's first token; the
        per-element offsets inside a sequence stay int32."""
        return tl.load(P + base * stride_t + head * stride_h + offs[:, None] * stride_t + offs_d[None, :],
                       mask=mask, other=0.0)

    @triton.jit
    def _store_rows(P, base, head, stride_t, stride_h, offs, offs_d, val, mask):
        tl.store(P + base * stride_t + head * stride_h + offs[:, None] * stride_t + offs_d[None, :],
                 val.to(P.dtype.element_ty), mask=mask)

    @triton.jit
    def _fwd_kernel(
        Q, K, V, O, LSE, CU, SEQ, FIRST,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
        stride_lh, N, scale_log2, win_left, win_right,
        GROUP: tl.constexpr, MASKED: tl.constexpr, STORE_LSE: tl.constexpr,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_SEQS: tl.constexpr, PRECISION: tl.constexpr, MAPPED: tl.constexpr,
    ):
        pid = tl.program_id(0)
        h = tl.program_id(1)
        if MAPPED:
            start, length, blk, valid = _locate_mapped(CU, SEQ, FIRST, N, pid)
        else:
            start, length, blk, valid = _locate(CU, N, pid, BLOCK_M, BLOCK_SEQS)
        if valid:
            base = start.to(tl.int64)
            hk = h // GROUP
            q0 = blk * BLOCK_M
            offs_m = q0 + tl.arange(0, BLOCK_M)
            offs_d = tl.arange(0, BLOCK_D)
            mask_m = offs_m < length
            mask_d = offs_d < HEAD_DIM
            q_mask = mask_m[:, None] & mask_d[None, :]
            q = _load_rows(Q, base, h, stride_qt, stride_qh, offs_m, offs_d, q_mask)

            # Keys any query of this block may see.
            lo = tl.maximum(q0 - win_left, 0)
            hi = tl.minimum(q0 + BLOCK_M + win_right, length)

            m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
            l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
            acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
            for k0 in range(lo, hi, BLOCK_N):
                offs_n = k0 + tl.arange(0, BLOCK_N)
                mask_n = offs_n < hi
                kv_mask = mask_n[:, None] & mask_d[None, :]
                k = _load_rows(K, base, hk, stride_kt, stride_kh, offs_n, offs_d, kv_mask)
                v = _load_rows(V, base, hk, stride_vt, stride_vh, offs_n, offs_d, kv_mask)
                s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
                allowed = mask_n[None, :]
                if MASKED:
                    diff = offs_m[:, None] - offs_n[None, :]
                    allowed = allowed & (diff <= win_left) & (-diff <= win_right)
                s = tl.where(allowed, s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                # Rows that have seen no key yet keep m = -inf: subtract 0 instead (no NaN).
                m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
                p = tl.math.exp2(s - m_sub[:, None])
                alpha = tl.math.exp2(m_i - m_sub)
                l_i = l_i * alpha + tl.sum(p, 1)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
                m_i = m_new

            l_safe = tl.where(l_i == 0.0, 1.0, l_i)
            out = acc / l_safe[:, None]
            _store_rows(O, base, h, stride_ot, stride_oh, offs_m, offs_d, out, q_mask)
            if STORE_LSE:
                lse = tl.where(l_i == 0.0, float("inf"), m_i + tl.math.log2(l_safe))
                tl.store(LSE + h * stride_lh + base + offs_m, lse, mask=mask_m)

    @triton.jit
    def _bwd_dkdv_kernel(
        Q, K, V, O, DO, LSE, DQ, DK, DV, CU, SEQ, FIRST,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
        stride_dot, stride_doh, stride_dqt, stride_dqh, stride_dkt, stride_dkh, stride_dvt, stride_dvh,
        stride_lh, N, scale, scale_log2, win_left, win_right,
        GROUP: tl.constexpr, MASKED: tl.constexpr,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr,
        BLOCK_SEQS: tl.constexpr, PRECISION: tl.constexpr, MAPPED: tl.constexpr,
    ):
        pid = tl.program_id(0)
        hk = tl.program_id(1)
        if MAPPED:
            start, length, blk, valid = _locate_mapped(CU, SEQ, FIRST, N, pid)
        else:
            start, length, blk, valid = _locate(CU, N, pid, BLOCK, BLOCK_SEQS)
        if valid:
            base = start.to(tl.int64)
            k0 = blk * BLOCK
            offs_n = k0 + tl.arange(0, BLOCK)
            offs_d = tl.arange(0, BLOCK_D)
            mask_n = offs_n < length
            mask_d = offs_d < HEAD_DIM
            kv_mask = mask_n[:, None] & mask_d[None, :]
            k = _load_rows(K, base, hk, stride_kt, stride_kh, offs_n, offs_d, kv_mask)
            v = _load_rows(V, base, hk, stride_vt, stride_vh, offs_n, offs_d, kv_mask)
            # The whole sequence is this one block: this program sees every key of its queries and
            # can finish dQ too.
            single = length <= BLOCK
            # Queries that may see any key of this block.
            lo = tl.maximum(k0 - win_right, 0)
            hi = tl.minimum(k0 + BLOCK + win_left, length)

            dk = tl.zeros((BLOCK, BLOCK_D), dtype=tl.float32)
            dv = tl.zeros((BLOCK, BLOCK_D), dtype=tl.float32)
            for g in range(GROUP):
                h = hk * GROUP + g
                for q0 in range(lo, hi, BLOCK):
                    offs_m = q0 + tl.arange(0, BLOCK)
                    mask_m = offs_m < hi
                    q_mask = mask_m[:, None] & mask_d[None, :]
                    q = _load_rows(Q, base, h, stride_qt, stride_qh, offs_m, offs_d, q_mask)
                    do = _load_rows(DO, base, h, stride_dot, stride_doh, offs_m, offs_d, q_mask)
                    o = _load_rows(O, base, h, stride_ot, stride_oh, offs_m, offs_d, q_mask)
                    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
                    lse = tl.load(LSE + h * stride_lh + base + offs_m, mask=mask_m, other=0.0)

                    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
                    allowed = mask_m[:, None] & mask_n[None, :]
                    if MASKED:
                        diff = offs_m[:, None] - offs_n[None, :]
                        allowed = allowed & (diff <= win_left) & (-diff <= win_right)
                    p = tl.where(allowed, tl.math.exp2(s - lse[:, None]), 0.0)
                    dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
                    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
                    ds = p * (dp - delta[:, None])
                    ds_lo = ds.to(q.dtype)
                    dk += tl.dot(tl.trans(ds_lo), q, input_precision=PRECISION)
                    if single:
                        dq = tl.dot(ds_lo, k, input_precision=PRECISION) * scale
                        _store_rows(DQ, base, h, stride_dqt, stride_dqh, offs_m, offs_d, dq, q_mask)
            _store_rows(DK, base, hk, stride_dkt, stride_dkh, offs_n, offs_d, dk * scale, kv_mask)
            _store_rows(DV, base, hk, stride_dvt, stride_dvh, offs_n, offs_d, dv, kv_mask)

    @triton.jit
    def _bwd_dq_kernel(
        Q, K, V, O, DO, LSE, DQ, CU, SEQ, FIRST,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
        stride_dot, stride_doh, stride_dqt, stride_dqh,
        stride_lh, N, scale, scale_log2, win_left, win_right,
        GROUP: tl.constexpr, MASKED: tl.constexpr,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr,
        BLOCK_SEQS: tl.constexpr, PRECISION: tl.constexpr, MAPPED: tl.constexpr,
    ):
        pid = tl.program_id(0)
        h = tl.program_id(1)
        if MAPPED:
            start, length, blk, valid = _locate_mapped(CU, SEQ, FIRST, N, pid)
        else:
            start, length, blk, valid = _locate(CU, N, pid, BLOCK, BLOCK_SEQS)
        # Sequences of one block got their dQ from _bwd_dkdv_kernel.
        if valid and length > BLOCK:
            base = start.to(tl.int64)
            hk = h // GROUP
            q0 = blk * BLOCK
            offs_m = q0 + tl.arange(0, BLOCK)
            offs_d = tl.arange(0, BLOCK_D)
            mask_m = offs_m < length
            mask_d = offs_d < HEAD_DIM
            q_mask = mask_m[:, None] & mask_d[None, :]
            q = _load_rows(Q, base, h, stride_qt, stride_qh, offs_m, offs_d, q_mask)
            do = _load_rows(DO, base, h, stride_dot, stride_doh, offs_m, offs_d, q_mask)
            o = _load_rows(O, base, h, stride_ot, stride_oh, offs_m, offs_d, q_mask)
            delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
            lse = tl.load(LSE + h * stride_lh + base + offs_m, mask=mask_m, other=0.0)

            lo = tl.maximum(q0 - win_left, 0)
            hi = tl.minimum(q0 + BLOCK + win_right, length)
            dq = tl.zeros((BLOCK, BLOCK_D), dtype=tl.float32)
            for k0 in range(lo, hi, BLOCK):
                offs_n = k0 + tl.arange(0, BLOCK)
                mask_n = offs_n < hi
                kv_mask = mask_n[:, None] & mask_d[None, :]
                k = _load_rows(K, base, hk, stride_kt, stride_kh, offs_n, offs_d, kv_mask)
                v = _load_rows(V, base, hk, stride_vt, stride_vh, offs_n, offs_d, kv_mask)
                s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
                allowed = mask_m[:, None] & mask_n[None, :]
                if MASKED:
                    diff = offs_m[:, None] - offs_n[None, :]
                    allowed = allowed & (diff <= win_left) & (-diff <= win_right)
                p = tl.where(allowed, tl.math.exp2(s - lse[:, None]), 0.0)
                dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
                ds = p * (dp - delta[:, None])
                dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
            _store_rows(DQ, base, h, stride_dqt, stride_dqh, offs_m, offs_d, dq * scale, q_mask)


# ----------------------------------------------------------------------------------------------
# Configuration and launch.

_LOG2E = 1.4426950408889634


# Longest text above which the "long" launch configurations apply (see _config).
LONG_SEQLEN = 256


@functools.lru_cache(maxsize=None)
def _config(head_dim: int, interpret: bool, long: bool = False) -> Tuple[int, int, int, int, int, int, int]:
    """(fwd BLOCK_M, fwd BLOCK_N, fwd warps, fwd stages, bwd BLOCK, bwd warps, bwd stages).

    Blocks of 64 tokens: a ~48-token text is one block, so its whole backward is one program per
    head. Chosen from GPU time of the kernels alone on an H200 (bf16, CUDA-graph replay,
    ``tests/gpu/attention_bench.py --kernel-only --sweep``, docs/results/h200-2026-11-28-c/attention.md):
    128 texts of ~48 tokens (max 256) and 16 documents of ~800 tokens (max 1024). The backward wants
    4 warps up to head dim 64 (8 warps ran 1.7-2x slower: 148 -> 86 µs per bert-base layer); at head
    dim 128 short texts want 32-token backward blocks and a 32-key forward loop (Qwen3: 257 -> 195 µs
    backward, 76 -> 52 µs forward), long ones 64-token blocks with 8 warps. ``long``: the batch's
    longest text exceeds ``LONG_SEQLEN``.
    ``FASTST_ATTN_CONFIG="bm,bn,fw,fs,b,bw,bs"`` overrides (blocks: powers of two >= 16).
    The interpreter uses 16-token blocks: quick, and tiny test sequences still cross block boundaries.
    """
    env = os.environ.get("FASTST_ATTN_CONFIG")
    if env:
        cfg = tuple(int(x) for x in env.split(","))
        if len(cfg) != 7:
            raise ValueError("FASTST_ATTN_CONFIG needs 7 integers: bm,bn,fwd_warps,fwd_stages,block,bwd_warps,bwd_stages")
        return cfg
    if interpret:
        return 16, 16, 1, 1, 16, 1, 1
    if head_dim <= 64:
        return 64, 64, 4, 2, 64, 4, 1
    if long:
        return 64, 64, 4, 2, 64, 8, 1
    return 64, 32, 4, 2, 32, 4, 1


def _window_bounds(causal: bool, window) -> Tuple[int, int, bool]:
    left, right = (window if window is not None else (-1, -1))
    left = _BIG if left is None or left < 0 else int(left)
    right = _BIG if right is None or right < 0 else int(right)
    if causal:
        right = 0
    return left, right, (left < _BIG or right < _BIG)


def _n_programs(t: int, n: int, max_seqlen: int, block: int) -> int:
    """Upper bound on the number of (sequence, block) pairs: every sequence adds at most one
    partial block beyond ``T / block``; none has more than ``cdiv(max_seqlen, block)``."""
    return max(1, min(triton.cdiv(t, block) + n, n * triton.cdiv(max(max_seqlen, 1), block)))


def _block_seqs(n: int) -> int:
    # At least 128 wide: batches of up to 128 texts share one compiled kernel per shape.
    return max(128, next_power_of_2(n))


def _block_map_on() -> bool:
    """Each program reads its (sequence, block) from a map (``_block_map``) instead of scanning all N
    sequence boundaries (``_locate``: a ``BLOCK_SEQS``-wide cumsum per program, 4,096 wide for a
    1,024-pair MNRL step). ``FASTST_ATTN_BLOCK_MAP=0`` restores the scan (and its ``MAX_SEQS`` limit)."""
    return env_switch("FASTST_ATTN_BLOCK_MAP")


# One map per (cu_seqlens, grid, block) for the duration of one encoder forward: every layer of a
# forward sees the same boundaries, so building the map per call (fwd and bwd: ~8 small kernels
# each) cost more than it saved at 128 texts (H200: MiniLM 7.5 -> 7.7 ms). Scoped to a forward on
# purpose: a map cached on a long-lived object could be built outside a CUDA-graph capture and then
# read, stale, by the captured kernels.
_SHARED_MAPS: contextvars.ContextVar[Optional[dict]] = contextvars.ContextVar("fastst_attn_maps", default=None)


@contextlib.contextmanager
def shared_block_maps():
    """Within the block, attention calls over the same ``cu_seqlens`` tensor share their block maps
    (the backward's map is built in the forward and saved with the call's other tensors)."""
    token = _SHARED_MAPS.set({})
    try:
        yield
    finally:
        _SHARED_MAPS.reset(token)


def _maps_for(cu: torch.Tensor, n_prog: int, block: int):
    """``_block_map``, shared inside :func:`shared_block_maps`."""
    cache = _SHARED_MAPS.get()
    if cache is None:
        return _block_map(cu, n_prog, block)
    key = (id(cu), cu._version, n_prog, block)
    hit = cache.get(key)
    if hit is None or hit[0] is not cu:
        hit = cache[key] = (cu, *_block_map(cu, n_prog, block))  # holding ``cu`` keeps its id unique
    return hit[1], hit[2]


def _block_map(cu: torch.Tensor, n_prog: int, block: int):
    """(seq [n_prog] int32, first [N] int32): program ``pid`` works on block ``pid - first[seq]`` of
    sequence ``seq`` (``seq == N``: past the last block). The grid enumerates the ``cdiv(len, block)``
    blocks of every sequence in order, as ``_locate`` reads it. Device ops only (no host sync; fine
    inside CUDA-graph capture)."""
    lens = (cu[1:] - cu[:-1]).to(torch.int64)
    nb = torch.div(lens + (block - 1), block, rounding_mode="floor")
    cum = torch.cumsum(nb, 0)
    seq = torch.searchsorted(cum, torch.arange(n_prog, device=cu.device), right=True).to(torch.int32)
    return seq, (cum - nb).to(torch.int32)


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs (the interpreter, or a GPU caller outside autocast) get exact fp32 products.
    return "ieee" if dtype == torch.float32 else "tf32"


def _fwd(q, k, v, cu, max_seqlen, scale, left, right, masked, store_lse, blocks=None):
    t, hq, d = q.shape
    hk = k.shape[1]
    n = cu.numel() - 1
    o = torch.empty_like(q)
    lse = torch.empty((hq, t), dtype=torch.float32, device=q.device) if store_lse else o
    if t == 0 or n == 0:
        return o, lse
    bm, bn, warps, stages, *_ = blocks or _config(d, interpreter_on(), max_seqlen > LONG_SEQLEN)
    grid = (_n_programs(t, n, max_seqlen, bm), hq)
    mapped = _block_map_on()
    seq_map, first = _maps_for(cu, grid[0], bm) if mapped else (cu, cu)
    _fwd_kernel[grid](
        q, k, v, o, lse, cu, seq_map, first,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), o.stride(0), o.stride(1),
        lse.stride(0) if store_lse else 0, n, scale * _LOG2E, left, right,
        GROUP=hq // hk, MASKED=masked, STORE_LSE=store_lse,
        HEAD_DIM=d, BLOCK_D=max(16, next_power_of_2(d)), BLOCK_M=bm, BLOCK_N=bn,
        BLOCK_SEQS=_block_seqs(n), PRECISION=_precision(q.dtype), MAPPED=mapped,
        num_warps=warps, num_stages=stages,
    )
    return o, lse


def _bwd_map(q, cu, max_seqlen, blocks=None):
    """The backward's block map (its block differs from the forward's), or None without the map."""
    if not _block_map_on() or q.shape[0] == 0 or cu.numel() < 2:
        return None
    block = (blocks or _config(q.shape[-1], interpreter_on(), max_seqlen > LONG_SEQLEN))[-3]
    return _maps_for(cu, _n_programs(q.shape[0], cu.numel() - 1, max_seqlen, block), block)


def _bwd(do, q, k, v, o, lse, cu, max_seqlen, scale, left, right, masked, blocks=None, block_map=None):
    t, hq, d = q.shape
    hk = k.shape[1]
    n = cu.numel() - 1
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    if t == 0 or n == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    *_, block, warps, stages = blocks or _config(d, interpreter_on(), max_seqlen > LONG_SEQLEN)
    mapped = block_map is not None or _block_map_on()
    common = dict(
        GROUP=hq // hk, MASKED=masked, HEAD_DIM=d, BLOCK_D=max(16, next_power_of_2(d)), BLOCK=block,
        BLOCK_SEQS=_block_seqs(n), PRECISION=_precision(q.dtype), MAPPED=mapped, num_warps=warps, num_stages=stages,
    )
    n_prog = _n_programs(t, n, max_seqlen, block)
    if mapped:
        seq_map, first = block_map if block_map is not None else _block_map(cu, n_prog, block)
    else:
        seq_map, first = cu, cu
    _bwd_dkdv_kernel[(n_prog, hk)](
        q, k, v, o, do, lse, dq, dk, dv, cu, seq_map, first,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), o.stride(0), o.stride(1),
        do.stride(0), do.stride(1), dq.stride(0), dq.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        lse.stride(0), n, scale, scale * _LOG2E, left, right, **common,
    )
    if max_seqlen > block:
        _bwd_dq_kernel[(n_prog, hq)](
            q, k, v, o, do, lse, dq, cu, seq_map, first,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), o.stride(0), o.stride(1),
            do.stride(0), do.stride(1), dq.stride(0), dq.stride(1),
            lse.stride(0), n, scale, scale * _LOG2E, left, right, **common,
        )
    return dq, dk, dv


def _rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    """[T, H, D] with unit stride on D (the kernels take row and head strides)."""
    return t if t.stride(-1) == 1 else t.contiguous()


class VarlenAttentionFn(torch.autograd.Function):
    """Triton varlen attention; see the module docstring. Use :func:`varlen_attention`."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, scale, causal, window, blocks):
        q, k, v = _rows_contiguous(q), _rows_contiguous(k), _rows_contiguous(v)
        cu = cu_seqlens if cu_seqlens.dtype == torch.int32 else cu_seqlens.to(torch.int32)
        left, right, masked = _window_bounds(causal, window)
        need_grad = any(ctx.needs_input_grad[:3])
        o, lse = _fwd(q, k, v, cu, max_seqlen, scale, left, right, masked, store_lse=need_grad, blocks=blocks)
        if need_grad:
            block_map = _bwd_map(q, cu, max_seqlen, blocks)
            ctx.save_for_backward(q, k, v, o, lse, cu, *(block_map or ()))
        ctx.args = (max_seqlen, scale, left, right, masked, blocks)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, cu, *block_map = ctx.saved_tensors
        max_seqlen, scale, left, right, masked, blocks = ctx.args
        dq, dk, dv = _bwd(_rows_contiguous(do), q, k, v, o, lse, cu, max_seqlen, scale, left, right, masked, blocks,
                          block_map=tuple(block_map) or None)
        return dq, dk, dv, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------
# Public entry points.


def supported(q: torch.Tensor, k: torch.Tensor, cu_seqlens: torch.Tensor, dropout_p: float = 0.0) -> bool:
    """Whether the Triton kernel can run this call (device/interpreter, dtype, head dim, GQA, no dropout)."""
    if dropout_p or not use_triton(q):
        return False
    if q.dim() != 3 or k.dim() != 3 or q.shape[-1] != k.shape[-1] or q.shape[1] % k.shape[1]:
        return False
    if q.shape[-1] > MAX_HEAD_DIM or (cu_seqlens.numel() - 1 > MAX_SEQS and not _block_map_on()):
        return False
    if q.is_cuda:
        return q.dtype in (torch.float16, torch.bfloat16, torch.float32)
    return q.dtype in (torch.float32, torch.float16)  # the interpreter has no bf16 arithmetic


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    scale: Optional[float] = None,
    causal: bool = False,
    window=None,
    blocks=None,
) -> torch.Tensor:
    """Attention within each packed sequence: the Triton kernel where :func:`supported`, else the
    torch reference. ``blocks`` overrides the launch configuration (tests, sweeps; see ``_config``)."""
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if supported(q, k, cu_seqlens):
        return VarlenAttentionFn.apply(q, k, v, cu_seqlens, int(max_seqlen), scale, bool(causal),
                                       None if window is None else tuple(window), blocks)
    return varlen_attention_reference(q, k, v, cu_seqlens, scale=scale, causal=causal, window=window)


def varlen_attention_reference(q, k, v, cu_seqlens, *, scale=None, causal=False, window=None) -> torch.Tensor:
    """Plain torch, one sequence at a time, fp32 math: the CPU fallback and the test oracle.
    (Host loop over sequences: for tests and small batches.)"""
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    left, right, _ = _window_bounds(causal, window)
    group = q.shape[1] // k.shape[1]
    bounds = cu_seqlens.tolist()
    outs = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b == a:
            continue
        qs = q[a:b].float().transpose(0, 1)  # [Hq, L, D]
        ks = k[a:b].float().transpose(0, 1).repeat_interleave(group, 0)
        vs = v[a:b].float().transpose(0, 1).repeat_interleave(group, 0)
        pos = torch.arange(b - a, device=q.device)
        diff = pos[:, None] - pos[None, :]
        allowed = (diff <= left) & (-diff <= right)
        s = (qs @ ks.transpose(1, 2)) * scale
        s = s.masked_fill(~allowed, float("-inf"))
        outs.append((s.softmax(-1) @ vs).transpose(0, 1))
    if not outs:
        return q.new_zeros(q.shape)
    out = torch.cat(outs, 0)
    if out.shape[0] != q.shape[0]:  # tokens past cu_seqlens[-1] belong to no sequence
        out = torch.cat([out, out.new_zeros((q.shape[0] - out.shape[0],) + out.shape[1:])], 0)
    return out.to(q.dtype)
