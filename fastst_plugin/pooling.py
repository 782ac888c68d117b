"""Pooling on packed rows: the same modes and prompt handling as stock ``Pooling``, without re-padding
and without host synchronisation (segment ids and lengths come with the PackedBatch)."""

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
    mean_sum = None
    for mode in modes:
        if mode == "cls":
            first = p.cu_seqlens[:-1].long()
            if prompt_length:
                full = p.lengths
                first = first + torch.where(full > prompt_length, prompt_length, 0)
            outs.append(hidden.index_select(0, first))
        elif mode == "lasttoken":
            outs.append(hidden.index_select(0, p.cu_seqlens[1:].long() - 1))
        elif mode in ("mean", "mean_sqrt_len_tokens"):
            if mean_sum is None:
                x = hidden.to(acc_dtype)
                if valid is not None:
                    x = x * valid[:, None].to(acc_dtype)
                mean_sum = torch.zeros(n, width, device=hidden.device, dtype=acc_dtype).index_add_(0, seg, x)
            denom = lengths.clamp(min=1).to(acc_dtype)[:, None]
            if mode == "mean_sqrt_len_tokens":
                denom = denom.sqrt()
            outs.append((mean_sum / denom).to(hidden.dtype))
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
    return torch.cat(outs, dim=-1)
