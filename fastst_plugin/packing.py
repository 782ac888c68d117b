"""Padding-free batches: texts packed into one ``[T]`` token stream with ``cu_seqlens``.

A :class:`PackedBatch` holds everything the fast forward needs: token ids, positions restarting at
every text, token types, the segment id of every token (for pooling), ``cu_seqlens`` for varlen
attention, and the index maps back to the padded layouts (the caller's, and a right-padded
``[N, max_len]`` one for attention backends that need padding).

Packing is computed on the host from the tokenizer's padded CPU output (``HostPack``, attached to
the features by the patched ``preprocess``), so the device never has to be asked for lengths:
no host synchronisation in the step. Features that arrive already on the GPU without a host pack
(a user calling ``model(features)`` directly) are packed after one small copy of the mask.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

HOST_PACK_KEY = "fastst_host_pack"
PACKED_KEY = "fastst_packed"


@dataclass
class HostPack:
    """CPU side of a packed batch; travels inside the features dict (not a tensor: collators and
    ``Trainer._prepare_inputs`` leave it alone)."""

    input_ids: torch.Tensor  # [T] int64
    position_ids: torch.Tensor  # [T] int64, 0-based within each text
    token_type_ids: torch.Tensor | None  # [T]
    cu_seqlens: torch.Tensor  # [N+1] int32
    seq_idx: torch.Tensor  # [T] int64
    orig_index: torch.Tensor  # [T] int64: flat index into the caller's padded [N, L]
    pad_index: torch.Tensor  # [T] int64: flat index into a right-padded [N, max_seqlen]
    lengths: torch.Tensor  # [N] int64
    max_seqlen: int
    orig_shape: tuple[int, int]

    @property
    def num_seqs(self) -> int:
        return self.orig_shape[0]

    def matches(self, input_ids: torch.Tensor) -> bool:
        """True when these features are the ones this pack was built from (not a row slice of them)."""
        return tuple(input_ids.shape) == self.orig_shape

    # Deliberately not called ``to``: accelerate's ``send_to_device`` (the trainer's dataloader) calls
    # ``.to(device)`` on any object that has one, which turned the host pack into device tensors with
    # per-tensor blocking copies (and CUDA graphs then refused them). Without ``to`` it is left alone.
    def to_device(self, device) -> "PackedBatch":
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        tensors = {k: v for k, v in values.items() if isinstance(v, torch.Tensor)}
        if torch.device(device).type == "cuda" and all(
            v.device.type == "cpu" and v.dtype in (torch.int64, torch.int32) for v in tensors.values()
        ):
            values.update(_to_cuda_at_once(tensors, device))
        else:
            values.update({k: host_to_device(v, device) for k, v in tensors.items()})
        return PackedBatch(**values)


def _to_cuda_at_once(tensors: dict, device) -> dict:
    """Integer host tensors to the GPU through one pinned staging buffer and one queued copy.

    Per tensor, a pinned copy is a pin (an allocation) plus a copy, each a torch call that releases
    and re-takes the GIL; with the tokenizer threads busy, each re-take can wait (measured on an H200
    host: ~0.3 ms per call during encode). Here: numpy writes, then a single copy."""
    sizes = [v.numel() for v in tensors.values()]
    staged = torch.empty(sum(sizes), dtype=torch.long, pin_memory=torch.device(device).type == "cuda")
    buf, offset = staged.numpy(), 0
    for v, n in zip(tensors.values(), sizes):
        buf[offset : offset + n] = v.reshape(-1).numpy()
        offset += n
    parts = staged.to(device, non_blocking=True).split(sizes)
    return {
        k: (part if v.dtype == torch.long else part.to(v.dtype)).view(v.shape)
        for (k, v), part in zip(tensors.items(), parts)
    }


def host_to_device(t: torch.Tensor, device) -> torch.Tensor:
    """``t.to(device)`` that never makes the host wait for the GPU.

    A copy from pageable host memory is synchronous: CUDA first waits for all work queued on the
    stream, so the host could not prepare batch k+1 while the GPU ran batch k (measured on an H200,
    bert-base encode: every batch's launch took as long as the previous batch's GPU time, ~8 ms).
    From pinned memory the copy is queued and the host runs ahead. Pinning a small tensor is a host
    memcpy into a block of torch's caching pinned allocator, which also keeps that block from being
    reused until the queued copy has run."""
    if torch.device(device).type == "cuda" and t.device.type == "cpu" and not t.is_pinned():
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


@dataclass
class PackedBatch(HostPack):
    """Device side of a packed batch."""

    def repad(self, x: torch.Tensor, like_caller: bool = True) -> torch.Tensor:
        """``[T, ...]`` → ``[N, L, ...]`` zero-padded, in the caller's layout (or right-padded)."""
        n, length = self.orig_shape if like_caller else (self.num_seqs, self.max_seqlen)
        index = self.orig_index if like_caller else self.pad_index
        out = x.new_zeros((n * length,) + tuple(x.shape[1:]))
        out = out.index_copy(0, index, x)
        return out.view((n, length) + tuple(x.shape[1:]))


def host_pack(input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> HostPack:
    """Pack a padded CPU batch (left or right padding)."""
    mask = attention_mask.bool()
    n, length = mask.shape
    lengths = mask.sum(1)
    orig_index = mask.reshape(-1).nonzero().squeeze(1)
    cu = torch.zeros(n + 1, dtype=torch.int64)
    torch.cumsum(lengths, 0, out=cu[1:])
    total = int(cu[-1])
    seq_idx = torch.repeat_interleave(torch.arange(n), lengths, output_size=total)
    positions = torch.arange(total) - cu[:-1][seq_idx]
    max_seqlen = int(lengths.max()) if n else 0
    return HostPack(
        input_ids=input_ids.reshape(-1)[orig_index],
        position_ids=positions,
        token_type_ids=token_type_ids.reshape(-1)[orig_index] if token_type_ids is not None else None,
        cu_seqlens=cu.to(torch.int32),
        seq_idx=seq_idx,
        orig_index=orig_index,
        pad_index=seq_idx * max_seqlen + positions,
        lengths=lengths,
        max_seqlen=max_seqlen,
        orig_shape=(n, length),
    )


def pack_features(features: dict) -> PackedBatch:
    """The PackedBatch for ST features: from the host pack when it belongs to them, else from the mask."""
    input_ids = features["input_ids"]
    device = input_ids.device
    hp = features.get(HOST_PACK_KEY)
    if isinstance(hp, HostPack) and hp.matches(input_ids):
        return hp.to_device(device)
    mask = features.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(input_ids)
    # One small device->host copy of the mask (a sync) when features did not come through preprocess.
    hp = host_pack(input_ids.cpu(), mask.cpu(), features.get("token_type_ids").cpu() if features.get("token_type_ids") is not None else None)
    return hp.to_device(device)


def pad_packed(x: torch.Tensor, seq_info: PackedBatch | None, cu: torch.Tensor, max_seqlen: int) -> torch.Tensor:
    """``[T, ...]`` → right-padded ``[N, max_seqlen, ...]`` (used by the padded SDPA attention path)."""
    if seq_info is None:
        seq_info = _info_from_cu(cu, max_seqlen)
    n = cu.numel() - 1
    out = x.new_zeros((n * max_seqlen,) + tuple(x.shape[1:]))
    out = out.index_copy(0, seq_info.pad_index, x)
    return out.view((n, max_seqlen) + tuple(x.shape[1:]))


def unpad_to_packed(x: torch.Tensor, seq_info: PackedBatch | None, cu: torch.Tensor, max_seqlen: int) -> torch.Tensor:
    if seq_info is None:
        seq_info = _info_from_cu(cu, max_seqlen)
    return x.reshape((-1,) + tuple(x.shape[2:])).index_select(0, seq_info.pad_index)


def _info_from_cu(cu: torch.Tensor, max_seqlen: int):
    lengths = (cu[1:] - cu[:-1]).long()
    n = lengths.numel()
    seq_idx = torch.repeat_interleave(torch.arange(n, device=cu.device), lengths)
    positions = torch.arange(seq_idx.numel(), device=cu.device) - cu[:-1].long()[seq_idx]

    class _I:
        pad_index = seq_idx * max_seqlen + positions

    return _I


def combine_host_packs(packs: list[HostPack]) -> HostPack:
    """One HostPack for several batches (the columns of a loss call), in order."""
    counts = [p.num_seqs for p in packs]
    totals = [int(p.cu_seqlens[-1]) for p in packs]
    max_seqlen = max(p.max_seqlen for p in packs)
    tok_off = torch.tensor([0] + totals[:-1]).cumsum(0)
    seq_off = torch.tensor([0] + counts[:-1]).cumsum(0)
    cu = torch.cat([packs[0].cu_seqlens[:1]] + [p.cu_seqlens[1:] + int(o) for p, o in zip(packs, tok_off)])
    seq_idx = torch.cat([p.seq_idx + int(o) for p, o in zip(packs, seq_off)])
    positions = torch.cat([p.position_ids for p in packs])
    has_tt = [p.token_type_ids is not None for p in packs]
    if any(has_tt) and not all(has_tt):
        raise ValueError("cannot combine batches with and without token_type_ids")
    pad_index = seq_idx * max_seqlen + positions
    return HostPack(
        input_ids=torch.cat([p.input_ids for p in packs]),
        position_ids=positions,
        token_type_ids=torch.cat([p.token_type_ids for p in packs]) if all(has_tt) else None,
        cu_seqlens=cu,
        seq_idx=seq_idx,
        orig_index=pad_index,
        pad_index=pad_index,
        lengths=torch.cat([p.lengths for p in packs]),
        max_seqlen=max_seqlen,
        orig_shape=(sum(counts), max_seqlen),
    )
