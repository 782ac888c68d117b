"""Gradient checkpointing for the packed encoder: what each mode stores, and the CPU offloader.

Modes (``enable_fast(gradient_checkpointing=...)``; the encoder applies them per transformer layer
when the model is in training mode and gradients are enabled):

``"off"``
    Every layer keeps the activations its backward needs, except the MLP activation's output (the
    down projection's input), recomputed in backward from the activation's own saved input by one
    elementwise kernel (``recomputed_when_saved``; ``FASTST_RECOMPUTE_ACTIVATION=0`` stores it). Memory
    grows with tokens x layers (EmbeddingGemma at 64 pairs of ~1k-token documents: ~28 KB per token
    per layer before that recompute). H200, 64 pairs, LoRA r=32: peaks -5 % (MiniLM) to -18 %
    (bert-base) for +0-3.5 % step time. The norm outputs the Q/K/V and MLP-in projections save are
    recomputed the same way from the norms' own saved input (2 x hidden values per token per layer;
    ``FASTST_RECOMPUTE_NORM=0`` stores them): H200, 64 pairs, LoRA r=32, on top of the activation's
    recompute: peaks -7 % (Qwen3-0.6B) to -21 % (MiniLM at 128 tokens) for +1-3.6 % step time.
``"layer"`` (``True``)
    Non-reentrant ``torch.utils.checkpoint`` around each layer: only the layer's input (one
    ``[T, hidden]`` tensor in the model's dtype) is stored; the layer is recomputed in backward.
    Memory: ``layers x T x hidden`` + one layer's activations. Cost: one extra forward.
``"selective"``
    Each layer is checkpointed with a selective policy: the outputs of matrix products (costly to
    recompute: ``2 x in_features`` FLOPs per stored element) and of attention kernels (quadratic
    in length) are stored; norms, activations, RoPE, dropout and the LoRA up-projection (a rank-r
    product) are recomputed. Roughly halves activation memory for a few percent of step time.
    Attention outputs are not stored while attention-probability dropout is active (a stored
    kernel would not advance the RNG on recompute and every later dropout mask would shift).
``"offload"``
    Checkpointing at half-layer granularity (attention block, MLP block), the block inputs kept in
    pinned host memory: copied device-to-host on a side stream while the forward goes on, copied
    back one block ahead of the backward. GPU memory holds the weights, the block being recomputed
    and two or three block inputs, independent of the number of layers. On the CPU it is per-block
    checkpointing without the copies.

On the GPU, "layer" and "selective" steps replay from CUDA graphs like unchecked ones (the
recompute is captured into the backward graph) when the forward draws no random numbers; with
dropout active, and always for "offload", they run eagerly (see :mod:`fastst_plugin.graphs`).
Without random numbers no RNG state is saved for the recompute (nothing to replay).

Whatever the mode, forward values and gradients equal the "off" run: recomputation replays the
RNG state (dropout), and every kernel is deterministic. ``suspended()`` turns checkpointing off
for a block of code: the cached (GradCache) losses use it for their with-gradient replay, where
only one mini-batch's activations exist at a time and checkpointing would recompute a third time.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
import weakref
from collections import deque

import torch

from .config import env_switch

_SUSPENDED: contextvars.ContextVar[bool] = contextvars.ContextVar("fastst_checkpointing_suspended", default=False)


@contextlib.contextmanager
def suspended():
    """Within the block the packed encoder does not checkpoint, whatever the model's option."""
    token = _SUSPENDED.set(True)
    try:
        yield
    finally:
        _SUSPENDED.reset(token)


def is_suspended() -> bool:
    return _SUSPENDED.get()


# -------------------------------------------------------------------------------------------------
# "off": the MLP activation is recomputed instead of stored

_RECOMPUTED = object()


def recompute_activation_enabled() -> bool:
    """``FASTST_RECOMPUTE_ACTIVATION=0`` stores the MLP activation's output as stock does."""
    return env_switch("FASTST_RECOMPUTE_ACTIVATION")


def recompute_norm_enabled() -> bool:
    """``FASTST_RECOMPUTE_NORM=0`` stores the norm outputs the next projection saves (default: they are
    recomputed in backward, ~2 x hidden values per token per layer for one norm kernel each)."""
    return env_switch("FASTST_RECOMPUTE_NORM")


def recompute_rope_enabled() -> bool:
    """``FASTST_RECOMPUTE_ROPE=0`` stores the rotated (and q/k-normed) queries and keys the attention
    saves (default: recomputed in backward from the projection's output, which stays alive anyway)."""
    return env_switch("FASTST_RECOMPUTE_ROPE")


@contextlib.contextmanager
def recomputed_when_saved(t: torch.Tensor, recompute):
    """Within the block, an op that saves ``t`` for its backward saves nothing: ``recompute()`` gives
    ``t`` back when the backward asks for it.

    What it is for: with checkpointing off, the MLP's down projection saves its input, the
    activation's output ([T, intermediate]: BERT's GELU output is a quarter of a layer's saved
    activations), while the activation itself saves its input; the output is one elementwise
    kernel away from that input. Recomputing it in the backward costs that kernel (bitwise the same
    values: the same deterministic kernel on the same input) and frees the tensor from forward to
    backward. Only used where nothing else hooks saved tensors (checkpointing off, no caller's
    hooks): inner hooks would shadow a checkpoint's or offloader's own. Other saved tensors pass
    through as themselves (create_graph keeps working) with torch's in-place check (hooks bypass
    the built-in one). Keep the block narrow, to ops that save their inputs (linear projections): a
    hook handing back an op's own *output* makes a reference cycle that only a backward breaks (a
    forward without backward would leak it)."""
    with _recomputed_when_saved((t,), lambda: (recompute(),), detach_others=False):
        yield


@contextlib.contextmanager
def recomputed_together_when_saved(tensors, recompute):
    """:func:`recomputed_when_saved` for tensors one kernel makes together (RoPE's rotated q and k):
    ``recompute()`` returns all of them, in order, and runs once per backward that asks for them.

    What it is for: the attention saves its rotated q and k ([T, (Hq + Hkv) D]; Qwen3-0.6B: 3,072
    values per token per layer, ~17 % of what a layer stores), while the RoPE (q/k-norm + RoPE) kernel
    keeps its own inputs, views of the Q/K/V projection's output that V keeps alive anyway. Recomputing
    them is one elementwise kernel per layer in the backward.

    The op inside may save its own output (attention saves ``o``): a hook holding an op's output would
    make a reference cycle through the output's grad_fn, so the other saved tensors are kept detached
    (same storage and version counter, no grad_fn). Hence only around first-order nodes (the
    attention's custom kernels; ``attention.varlen_attention`` applies it to those alone), never
    where a ``create_graph`` backward could pass."""
    with _recomputed_when_saved(tuple(tensors), recompute, detach_others=True):
        yield


def _identity(x: torch.Tensor):
    # Matched by memory and geometry: while the tensor is alive, a tensor with its data pointer, shape,
    # strides and dtype holds its values (an empty one matches only empty ones: nothing to differ).
    return (x.data_ptr(), x.shape, x.stride(), x.dtype, x.device)


@contextlib.contextmanager
def _recomputed_when_saved(tensors, recompute, detach_others: bool):
    if torch._C._autograd._top_saved_tensors_default_hooks(False) is not None:
        yield
        return
    index = {_identity(t): i for i, t in enumerate(tensors)}
    handed = {}  # recomputed tensors not yet handed to a backward (all come from one recompute())

    def pack(x):
        i = index.get(_identity(x))
        if i is not None:
            return _RECOMPUTED, i
        return (x.detach() if detach_others else x), x._version

    def unpack(packed):
        if packed[0] is _RECOMPUTED:
            # In the grad mode the backward runs in: off normally (nothing recorded), on under
            # create_graph=True, where the recomputed tensor must stay connected to its input.
            i = packed[1]
            if i not in handed:
                handed.update(enumerate(recompute()))
            return handed.pop(i)
        x, version = packed
        if x._version != version:
            raise RuntimeError(
                "one of the variables needed for gradient computation has been modified by an inplace "
                f"operation: [{x.dtype} {tuple(x.shape)}] is at version {x._version}; expected version {version}"
            )
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


# -------------------------------------------------------------------------------------------------
# selective policy

_hint = threading.local()


@contextlib.contextmanager
def recompute_hint():
    """Ops run inside are recomputed under the selective policy, whatever they are (the LoRA
    up-projection ``u Bᵀ``: a rank-r product, cheap to redo, as large as the layer output)."""
    depth = getattr(_hint, "depth", 0)
    _hint.depth = depth + 1
    try:
        yield
    finally:
        _hint.depth = depth


_policy_cache: dict = {}


def _op_kind(op) -> str:
    kind = _policy_cache.get(op)
    if kind is None:
        aten = torch.ops.aten
        matmuls = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default}
        name = op.name().lower() if hasattr(op, "name") else str(op).lower()
        if op in matmuls:
            kind = "matmul"
        elif ("attention" in name or "attn" in name) and "backward" not in name:
            # aten::_flash_attention_forward, _scaled_dot_product_*_attention*, torch's varlen_attn
            # custom op, flash_attn::_flash_attn_varlen_forward ...
            kind = "attention"
        else:
            kind = "other"
        _policy_cache[op] = kind
    return kind


def _selective_policy(save_attention: bool, ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    if getattr(_hint, "depth", 0):
        return CheckpointPolicy.PREFER_RECOMPUTE
    kind = _op_kind(op)
    if kind == "matmul" or (kind == "attention" and save_attention):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def selective_active() -> bool:
    """True inside a region run under the selective policy (its forward or its recompute).

    Selective checkpointing cannot store the output of an in-place op (the op's version bump lands
    after the caching dispatch mode has recorded the tensor, so the cache entry always reads as
    mutated): code that would accumulate in place asks this and stays out of place here."""
    return getattr(_hint, "selective", 0) > 0


@contextlib.contextmanager
def _selective_region(ctx):
    _hint.selective = getattr(_hint, "selective", 0) + 1
    try:
        with ctx:
            yield
    finally:
        _hint.selective -= 1


def selective_context_fn(save_attention: bool):
    """``context_fn`` for ``torch.utils.checkpoint.checkpoint`` implementing the "selective" mode."""
    from functools import partial

    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    policy = partial(_selective_policy, save_attention)

    def contexts():
        forward_ctx, recompute_ctx = create_selective_checkpoint_contexts(policy)
        return _selective_region(forward_ctx), _selective_region(recompute_ctx)

    return contexts


# -------------------------------------------------------------------------------------------------
# offload


class _Stored:
    """One checkpointed block's input: live during the block's forward, then a host copy."""

    __slots__ = ("owner", "index", "live", "host", "kept", "requires_grad", "prefetched", "ready", "__weakref__")

    def __init__(self, owner: "ActivationOffloader", index: int, t: torch.Tensor):
        self.owner = owner
        self.index = index
        self.live = t
        self.host = None  # pinned host copy (CUDA)
        self.kept = None  # the tensor itself, where there is nothing to offload to (CPU)
        self.requires_grad = t.requires_grad
        self.prefetched = None
        self.ready = None

    def get(self) -> torch.Tensor:
        """The tensor itself in the forward (keeping its autograd history); in a recompute, a copy
        brought back from the host that requires grad exactly as the original did (so the
        recompute saves the same tensors)."""
        live = self.live
        if live is not None:
            self.live = None
            return live
        return self.owner.fetch(self)


class ActivationOffloader:
    """Keeps checkpointed block inputs of one forward in pinned host memory.

    Forward: ``save(h)`` starts an asynchronous device-to-host copy on a side stream. The device
    tensor stays referenced until its copy has finished, and at most ``MAX_IN_FLIGHT`` copies are
    outstanding (the host then waits for the oldest): the device memory of a block input is reused
    only once its copy is done, and it is not held longer than that. Backward: ``fetch`` returns a
    block's input (waiting for its prefetch if one was started) and starts the host-to-device copy
    of the block that backward reaches next, so the copy overlaps the recompute.
    """

    MAX_IN_FLIGHT = 2

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        # Weak references: each _Stored holds its offloader (it fetches through it), so strong
        # references both ways would make a cycle that keeps pinned buffers alive until a GC pass.
        self.stored: list = []
        self._in_flight: deque = deque()
        self._stream = _side_stream(device) if self.cuda else None

    def save(self, t: torch.Tensor) -> _Stored:
        s = _Stored(self, len(self.stored), t)
        self.stored.append(weakref.ref(s))
        if not self.cuda or t.device.type != "cuda":
            s.kept = t  # nothing to offload to: keep the tensor (per-block checkpointing only)
            return s
        main = torch.cuda.current_stream(t.device)
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        self._stream.wait_stream(main)  # the copy reads t once the forward has produced it
        with torch.cuda.stream(self._stream):
            host.copy_(t, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self._stream)
        s.host = host
        self._in_flight.append((done, t))
        self._drain(self.MAX_IN_FLIGHT)
        return s

    def _drain(self, keep: int) -> None:
        """Release the device tensors whose copies have finished; block on the oldest while more
        than ``keep`` are outstanding."""
        while self._in_flight:
            done, _t = self._in_flight[0]
            if len(self._in_flight) > keep:
                done.synchronize()
            elif not done.query():
                break
            self._in_flight.popleft()

    def fetch(self, s: _Stored) -> torch.Tensor:
        if s.kept is not None:
            return s.kept.detach().requires_grad_(s.requires_grad)
        self._drain(0)  # the forward's copies finished long ago; drop their device tensors
        main = torch.cuda.current_stream(self.device)
        t = s.prefetched
        if t is not None:
            main.wait_event(s.ready)
            s.prefetched = s.ready = None
        else:
            t = s.host.to(self.device, non_blocking=True)
        if s.index > 0:
            previous = self.stored[s.index - 1]()
            if previous is not None:
                self._prefetch(previous)
        return t.detach().requires_grad_(s.requires_grad)

    def _prefetch(self, s: _Stored) -> None:
        if s.prefetched is not None or s.live is not None or s.host is None:
            return
        main = torch.cuda.current_stream(self.device)
        buf = torch.empty(s.host.shape, dtype=s.host.dtype, device=self.device)
        self._stream.wait_stream(main)  # the block buf reuses may still be read by queued work
        with torch.cuda.stream(self._stream):
            buf.copy_(s.host, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self._stream)
        # If the prefetch is never consumed (a backward that stops early), the allocator must not
        # hand buf's memory to the main stream before the copy into it has landed.
        buf.record_stream(self._stream)
        s.prefetched, s.ready = buf, ready


_streams: dict = {}


def _side_stream(device: torch.device):
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = _streams.get(index)
    if stream is None:
        stream = _streams[index] = torch.cuda.Stream(device=index)
    return stream
