"""Pooling on packed rows: the same modes and prompt handling as stock ``Pooling``, without re-padding
and without host synchronisation (segment ids and lengths come with the PackedBatch); and the L2
normalisation (``Normalize``) that usually follows it, as one autograd node."""

from __future__ import annotations

import torch

SUPPORTED_MODES = ("cls", "lasttoken", "mean", "mean_sqrt_len_tokens", "max", "weightedmean")


def pooling_modes(pooling) -> tuple[str, ...]:
    mode = getattr(pooling, "pooling_mode", None)
    if mode is None:
        return ()
    return (mode,) if isinstance(mode, str) else tuple(mode)


def packed_pool(hidden: torch.Tensor, p, modes, prompt_length: int | None) -> torch.Tensor:
    """``hidden [T, H]`` → ``[N, H * len(modes)]``; ``prompt_length`` tokens at the start of every text
    are excluded (stock semantics: mean/max/weighted skip them, CLS moves past them)."""
    n = p.num_seqs
    width = hidden.shape[-1]
    acc_dtype = torch.float32 if hidden.dtype in (torch.float16, torch.bfloat16) else hidden.dtype
    lengths = p.lengths
    positions = p.position_ids
    seg = p.seq_idx
    valid = None
    if prompt_length:
        valid = positions >= prompt_length
        lengths = lengths - prompt_length
    outs = []
    for mode in modes:
        if mode == "cls":
            first = p.cu_seqlens[:-1].long()
            if prompt_length:
                full = p.lengths
                first = first + torch.where(full > prompt_length, prompt_length, 0)
            outs.append(hidden.index_select(0, first))
        elif mode == "lasttoken":
            last = hidden.index_select(0, p.cu_seqlens[1:].long() - 1)
            if prompt_length:  # a text that is all prompt pools to zeros in stock (its mask is empty)
                last = last * (p.lengths > prompt_length)[:, None].to(last.dtype)
            outs.append(last)
        elif mode in ("mean", "mean_sqrt_len_tokens"):
            denom = lengths.clamp(min=1).to(acc_dtype)
            if mode == "mean_sqrt_len_tokens":
                denom = denom.sqrt()
            outs.append(segment_mean(hidden, seg, denom, valid, n))
        elif mode == "max":
            x = hidden
            if valid is not None:
                x = x.masked_fill(~valid[:, None], float("-inf"))
            out = torch.full((n, width), float("-inf"), device=hidden.device, dtype=hidden.dtype)
            outs.append(out.scatter_reduce(0, seg[:, None].expand(-1, width), x, reduce="amax", include_self=True))
        elif mode == "weightedmean":
            w = (positions + 1).to(acc_dtype)
            if valid is not None:
                w = w * valid.to(acc_dtype)
            wsum = torch.zeros(n, width, device=hidden.device, dtype=acc_dtype).index_add_(0, seg, hidden.to(acc_dtype) * w[:, None])
            wtot = torch.zeros(n, device=hidden.device, dtype=acc_dtype).index_add_(0, seg, w)
            outs.append((wsum / wtot.clamp(min=1e-9)[:, None]).to(hidden.dtype))
        else:
            raise ValueError(f"pooling mode {mode!r} has no packed implementation")
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


def segment_mean(hidden: torch.Tensor, seg: torch.Tensor, denom: torch.Tensor, valid, n: int) -> torch.Tensor:
    """``out[i] = sum(hidden[t] for t of text i, valid[t]) / denom[i]``: ``[T, H]`` → ``[N, H]``.

    Summed in float32 for half inputs, returned in ``hidden``'s dtype: the same numbers as stock's
    mean pooling (masked sum / token count), as one autograd node. Why one node: on small models
    the training step is bound by host time, and the composed version (cast, mask, index_add,
    divide, cast back) put five nodes into every backward pass (MiniLM, issue #5)."""
    if not (hidden.requires_grad and torch.is_grad_enabled()):
        return _segment_mean_forward(hidden, seg, denom, valid, n)
    return _SegmentMean.apply(hidden, seg, denom, valid, n)


def _accumulation_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype


def _segment_mean_forward(hidden, seg, denom, valid, n):
    acc = _accumulation_dtype(hidden)
    x = hidden.to(acc)
    if valid is not None:
        x = x * valid[:, None].to(acc)
    sums = torch.zeros(n, hidden.shape[-1], device=hidden.device, dtype=acc).index_add_(0, seg, x)
    return (sums / denom.to(acc)[:, None]).to(hidden.dtype)


class _SegmentMean(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, seg, denom, valid, n):
        ctx.save_for_backward(seg, denom, valid)
        ctx.hidden_dtype = hidden.dtype
        ctx.has_valid = valid is not None
        return _segment_mean_forward(hidden, seg, denom, valid, n)

    @staticmethod
    def backward(ctx, grad_out):
        seg, denom, valid = ctx.saved_tensors
        acc = torch.float32 if ctx.hidden_dtype in (torch.float16, torch.bfloat16) else ctx.hidden_dtype
        g = (grad_out.to(acc) / denom.to(acc)[:, None]).index_select(0, seg)
        if ctx.has_valid:
            g = g * valid[:, None].to(acc)
        return g.to(ctx.hidden_dtype), None, None, None, None


def l2_normalize(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``F.normalize(x, p=2, dim=-1)`` as one autograd node (stock's is four: norm, clamp, expand,
    divide). The forward runs stock's own ops, so values and dtype are stock's bit for bit, autocast
    included (where the norm comes out in float32, so does the result); the backward is the
    analytic one, computed in float32."""
    if not (x.requires_grad and torch.is_grad_enabled()):
        return _l2_normalize_forward(x, eps)[0]
    return _L2Normalize.apply(x, eps)


def _l2_normalize_forward(x, eps):
    norm = x.norm(2, -1, keepdim=True)
    denom = norm.clamp_min(eps)
    return x / denom, norm, denom


class _L2Normalize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, eps):
        y, norm, _denom = _l2_normalize_forward(x, eps)
        ctx.save_for_backward(y, norm)
        ctx.eps, ctx.x_dtype = eps, x.dtype
        return y

    @staticmethod
    def backward(ctx, grad_out):
        y, norm = ctx.saved_tensors
        acc = torch.float64 if y.dtype == torch.float64 else torch.float32
        return l2_normalize_backward(grad_out.to(acc), y.to(acc), norm.to(acc), ctx.eps).to(ctx.x_dtype), None


def l2_normalize_backward(grad_y: torch.Tensor, y: torch.Tensor, norm: torch.Tensor, eps: float) -> torch.Tensor:
    """Gradient through ``y = x / max(|x|, eps)`` (rows), given ``y`` and ``|x|`` (``[N, 1]``):
    ``(g - y <g, y>) / |x|``; where the norm was clamped to ``eps``, ``x / eps`` is linear in ``x``."""
    dot = (grad_y * y).sum(dim=-1, keepdim=True) * (norm > eps).to(y.dtype)
    return (grad_y - y * dot) / norm.clamp_min(eps)
