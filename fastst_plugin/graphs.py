"""CUDA graphs over token-count buckets: the packed encoder's forward and backward replayed, not re-launched.

Why: a packed bert-base LoRA step is a few milliseconds of GPU work spread over ~1,000 kernel
launches; in eager mode the host spends longer launching them (Python, autograd, Triton's launcher)
than the GPU spends running them. A captured graph replays all of them with one call.

How: a packed batch (``T`` tokens, ``N`` texts) is padded up to a bucket (``T_b`` tokens in steps of
about 1/8 of T, ``N_b`` sequences in steps of 64): the extra tokens form short dummy sequences
(spread over the spare sequence slots) whose outputs are dropped; slots left over have length
zero. Per bucket, one forward graph and one backward graph are captured (after warm-up on a side
stream), sharing one memory pool; the static inputs are filled straight from the host pack (no
host sync). The pattern follows
``torch.cuda.make_graphed_callables``, with two differences: parameter gradients are returned as
copies (autograd would otherwise keep a view of the static gradient buffer as ``param.grad``, and
the next replay would overwrite it, e.g. under gradient accumulation), and a replay is refused —
the eager path runs instead — while an earlier graphed forward still waits for its backward (its
saved activations live in the shared pool).

Under autocast (``FASTST_AUTOCAST_GRAPHS=0`` to run such steps eagerly), a bucket is captured per
autocast dtype, with autocast's weight cache off inside the capture (``_capture_autocast``).

Not graphed (eager fallback, same results): CPU, the "offload" checkpointing mode, checkpointing
while the forward draws random numbers (dropout: the recompute inside the backward graph would draw
new ones), inputs without a host pack, texts longer than the capture's length cap, inference
batches over ``GRAPH_MAX_TOKENS`` tokens, training steps over it that do not recur, do not fit the
card twice over, or come after ``MAX_LARGE_GRAPHS`` such buckets (each holds a whole step's
activations; 2026-11-28, before these limits, 64 pairs of 1024-token documents captured a new
bucket almost every step and held ~100 GB of graph pools; ``FASTST_LARGE_GRAPHS=0`` keeps all of
them eager), sizes beyond the first ``MAX_GRAPHS`` buckets, and anything that fails to capture (one
warning, then eager for this model). "layer" and "selective" checkpointing without dropout are
captured like any step (the recompute becomes part of the backward graph; the checkpointing mode
is part of the bucket key).

Nothing is captured inside a backward pass: the cached (GradCache) losses re-embed each mini-batch
inside ``loss.backward()``, and a capture there was invalidated on the GPU (2026-11-29: the whole
model then ran eagerly, CachedMNRL at 1,024 pairs 7x slower than plain MNRL). Their first, no-grad
pass captures each mini-batch's with-gradient bucket ahead (``prepare``); the replay only replays.

Under torch.distributed (DDP) graphs are replayed too: they hold no collective. In the trainer
fastst reduces the gradients itself after the step (``ddp_reduce``), so the replayed step writes
``.grad`` directly as on one GPU; otherwise (``FASTST_DDP_REDUCE=ddp``, a loop of one's own) DDP's
all-reduce hooks fire on the real parameters' AccumulateGrad after ``_GraphedStep``'s backward. Captures
differentiate against stand-in leaves (``_stand_ins``): against the parameters themselves the
backward capture was invalidated, because DDP keeps the parameters' AccumulateGrad nodes alive from
its construction on the default stream (2026-11-28 on 2 x H200; reproduced and fixed 2026-11-29
inside DDP on one H200). With dropout they stay off under DDP unless asked (``_ddp_graphs``).
"""

from __future__ import annotations

import contextlib
import math
import os
import weakref

import numpy as np
import torch

from .config import env_mode, env_switch
from .log import logger, warn_once
from .packing import HostPack, PackedBatch


# An inference bucket is captured on its second sighting: encode's budget batches fall into a few
# buckets that recur within one call, while one-off sizes (a call's last, short batch) stay eager.
NO_GRAD_CAPTURE_AFTER = 2
# Up to this many tokens a training bucket is captured on first sight (short texts: host-bound steps
# whose few buckets recur from the first step on).
GRAPH_MAX_TOKENS = 32768
# Larger training steps (long documents) are captured too, but warily: their graph pool keeps a whole
# step's activations reserved (EmbeddingGemma, 64 pairs of 1,024-token documents: ~30 GB), so at most
# MAX_LARGE_GRAPHS such buckets, each on its second sighting, and only when the card keeps room for an
# eager step of the same size beside the pool (LARGE_GRAPH_HEADROOM x the activations the warm-up
# held, plus a margin). Why bother: eagerly such a step was still host-bound (2026-11-28, H200:
# EmbeddingGemma LoRA at 1,024 tokens, GPU busy 50 % of a 258 ms step). Past LARGE_GRAPH_MAX_TOKENS
# nothing is captured. Inference batches over GRAPH_MAX_TOKENS stay eager (no backward to amortise).
LARGE_GRAPH_MAX_TOKENS = 262144
MAX_LARGE_GRAPHS = 4  # all buckets share one graph pool; _check_room refuses a capture the card cannot hold
LARGE_GRAPH_HEADROOM = 2.2  # the first large capture: the pool (~1.2x) plus an eager step beside it (1x)
LARGE_GRAPH_POOL_GROWTH = LARGE_GRAPH_HEADROOM - 1.0
LARGE_GRAPH_POOL_REUSE = 0.9  # of the pool's idle bytes, what a later capture is counted to reuse
LARGE_GRAPH_MARGIN_BYTES = 2 << 30
# Buckets captured per model; further sizes run eagerly (memory stays bounded when lengths vary).
# Training (with gradients) and inference (without) count separately: an evaluator's encode calls
# between training steps must not take the training buckets' places.
MAX_GRAPHS = 8
MAX_NO_GRAD_GRAPHS = 8
# A step whose bucket has no graph (and may not get one now) replays the smallest captured larger
# bucket it fits, up to this many times its own bucket's tokens (``GraphedEncoder._larger_captured``).
FALLBACK_PADDING = 1.5


# Every module or parameter registered anywhere (peft injecting adapters, a weight reassigned) bumps
# this counter through torch's global registration hooks, so a graphed encoder re-reads its parameter
# list only when something may have changed instead of walking every module on every step.
_REGISTRATIONS = [0]
_REGISTRATION_HOOKS: list = []


def _count_registration(*_args):
    _REGISTRATIONS[0] += 1


def registrations() -> int:
    """A counter that moves whenever a module or parameter is registered anywhere (cheap change test)."""
    _watch_registrations()
    return _REGISTRATIONS[0]


def _watch_registrations() -> None:
    if not _REGISTRATION_HOOKS:
        from torch.nn.modules import module as _module

        _REGISTRATION_HOOKS.append(_module.register_module_module_registration_hook(_count_registration))
        _REGISTRATION_HOOKS.append(_module.register_module_parameter_registration_hook(_count_registration))


def _ddp_graphs(encoder) -> bool:
    """Whether graphs are used under a process group (DDP): ``FASTST_DDP_GRAPHS`` = ``1`` always,
    ``0`` never, unset (auto) when the training forward draws no random numbers. Captures inside DDP
    work since the stand-in leaves (see ``_stand_ins``; checked on one H200 with DDP and NCCL: 50
    steps with the same losses as without DDP). Auto stays eager with dropout because a capture that
    fails anyway would leave the CUDA generator in capture state, and the next dropout would stop the
    run ("Offset increment outside graph capture", seen 2026-11-28); without dropout a failed capture
    only costs the eager fallback."""
    setting = env_mode("FASTST_DDP_GRAPHS")
    if setting in ("on", "off"):
        return setting == "on"
    return not encoder.draws_random_numbers()


def _capture_mode() -> str:
    """``thread_local`` under torch.distributed, else torch's default ``global``
    (``FASTST_GRAPH_CAPTURE_MODE`` overrides: global, thread_local, relaxed).

    With a process group, NCCL's watchdog thread queries the events of earlier collectives (e.g.
    the last step's gradient all-reduce, DDP's buffer broadcast at this forward) at any moment; in
    ``global`` mode that call, made from another thread while we capture, invalidates the capture.
    ``thread_local`` still rejects every unsafe call made by the capturing thread itself.
    """
    forced = os.environ.get("FASTST_GRAPH_CAPTURE_MODE", "").strip().lower()
    if forced in ("global", "thread_local", "relaxed"):
        return forced
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return "thread_local"
    return "global"


def bucket_tokens(t: int, fine: bool = False) -> int:
    """``t`` rounded up to its bucket: steps of 1/8 of the power of two below ``t``, and 1/16 past
    ``GRAPH_MAX_TOKENS`` (a large step's padding is real compute: 64 pairs of 1,024-token documents
    padded 4.45 % at 4,096-token steps, 1.3 % at 2,048; more buckets, hence ``MAX_LARGE_GRAPHS``).
    ``fine``: 1/16 steps throughout, for a cached loss's with-gradient mini-batches (many large
    mini-batches per step, each padded to its bucket; a step that finds no graph of its own replays
    a larger captured one, see ``GraphedEncoder._larger_captured``)."""
    step = max(256, (1 << (max(t, 1).bit_length() - 1)) // 8)
    if t > GRAPH_MAX_TOKENS or fine:
        step //= 2
    return int(math.ceil(t / step) * step)


def bucket_seqs(n: int) -> int:
    return int(math.ceil(max(n, 1) / 64) * 64)


def bucket_seqs_no_grad(n: int) -> int:
    """Coarser sequence buckets for inference: encode packs batches to a token budget, so their token
    counts land in one or two buckets while their text counts spread over 30-1,000 (long texts
    first, short ones last); powers of two keep that to a handful of graphs. The extra, empty
    sequences cost a few idle attention programs."""
    return max(64, 1 << (max(n, 1) - 1).bit_length())


_CAPTURE_STREAMS: dict = {}


def _capture_stream(device) -> "torch.cuda.Stream":
    """One side stream per device for every warm-up and capture.

    cuBLAS keeps a 32 MiB workspace per (thread, stream) pair it has run on, for the life of the
    process: a new stream per capture (and torch's own default capture stream beside the warm-up
    stream) added two workspaces per captured bucket (the forward's thread and autograd's), which was
    most of the fixed memory MiniLM's fast path had over stock (measured on an H200: six extra
    workspaces, 0.2 GB of a 0.87 GB peak)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = _CAPTURE_STREAMS.get(index)
    if stream is None:
        stream = _CAPTURE_STREAMS[index] = torch.cuda.Stream(device=index)
    return stream


def _autocast_dtype():
    """The CUDA autocast dtype in force (part of a bucket's key), or None outside autocast."""
    return torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None


def _capture_autocast(dtype):
    """Autocast for a warm-up or capture under ``dtype`` (None: none), with autocast's weight cache off.

    Why off: the cache keeps each weight's low-precision copy until the outermost autocast region
    exits; captured with it, a graph would read a copy made outside the capture, freed after this
    step and stale after the optimizer's update. Without it the casts are kernels inside the graph,
    re-run at every replay (eagerly they run once per step too: a training step enters autocast
    afresh). This is what lets a trainer with ``bf16=True`` over fp32 weights (the common setup)
    replay graphs instead of running eagerly (``_autocast_graphs``)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=dtype, cache_enabled=False)


def _is_large(key: tuple) -> bool:
    return key[0] > GRAPH_MAX_TOKENS


def _large_graphs_allowed() -> bool:
    """``FASTST_LARGE_GRAPHS=0`` keeps training steps over GRAPH_MAX_TOKENS eager (read per capture)."""
    return env_switch("FASTST_LARGE_GRAPHS")


class _NoRoom(RuntimeError):
    """A large bucket's graph would leave too little memory: that bucket runs eagerly."""


def _check_room(device, held: int, pool=None) -> None:
    """Raise _NoRoom unless the card can hold a large bucket's graph (about ``held`` bytes, what its
    warm-up forward kept for the backward) and still an eager step of the same size beside it.

    All buckets share one graph pool. After a capture, its activations go back to the pool as idle
    blocks (the graph's replays write there; only one bucket's graphs run at a time), so a later
    capture reuses them and grows the pool only by what they lack: the rule counts the pool's idle
    bytes (``_pool_idle_bytes``) against the growth. On the first capture the pool is empty and
    this is LARGE_GRAPH_HEADROOM x held (+ margin). Without the reuse term the rule, on an 80 GB card,
    refuses every capture after the first of a 1024-token EmbeddingGemma step (~30 GB of activations;
    computed from the rule, not measured on such a card).

    The warm-up's blocks sit in the caching allocator's general cache, which a graph's private pool
    cannot use: give them back to the driver first, so the pool (and whoever else shares the card)
    can have them."""
    torch.cuda.empty_cache()
    free, _total = torch.cuda.mem_get_info(device)
    idle = _pool_idle_bytes(pool) if pool is not None else 0
    growth = max(0, int(LARGE_GRAPH_POOL_GROWTH * held) - int(LARGE_GRAPH_POOL_REUSE * idle))
    need = growth + held + LARGE_GRAPH_MARGIN_BYTES
    if free < need:
        raise _NoRoom(f"{free / 2**30:.1f} GiB free, {need / 2**30:.1f} GiB wanted "
                      f"({held / 2**30:.1f} GiB of activations for an eager step beside the graphs, "
                      f"{growth / 2**30:.1f} GiB more graph pool ({idle / 2**30:.1f} GiB of it idle), margin)")


def _pool_idle_bytes(pool) -> int:
    """Bytes the graph pool ``pool`` has reserved that no tensor uses (0 when it cannot be read)."""
    try:
        segments = torch.cuda.memory_snapshot()
    except Exception:  # pragma: no cover - allocator without snapshots: count nothing as reusable
        return 0
    return sum(max(0, seg["total_size"] - seg["active_size"]) for seg in segments
               if tuple(seg.get("segment_pool_id", ())) == tuple(pool))


class _StaticBatch:
    """The static input tensors of one bucket, in the PackedBatch shape the encoder reads."""

    def __init__(self, t_b: int, n_b: int, cap: int, device, with_token_types: bool):
        self.input_ids = torch.zeros(t_b, dtype=torch.long, device=device)
        self.position_ids = torch.zeros(t_b, dtype=torch.long, device=device)
        self.token_type_ids = torch.zeros(t_b, dtype=torch.long, device=device) if with_token_types else None
        self.cu_seqlens = torch.zeros(n_b + 1, dtype=torch.int32, device=device)
        self.pad_index = torch.zeros(t_b, dtype=torch.long, device=device)
        self.max_seqlen = cap
        self.t_b, self.n_b = t_b, n_b

    def tensors(self):
        return [t for t in (self.input_ids, self.position_ids, self.token_type_ids, self.cu_seqlens, self.pad_index) if t is not None]

    def as_packed(self) -> PackedBatch:
        return PackedBatch(
            input_ids=self.input_ids, position_ids=self.position_ids, token_type_ids=self.token_type_ids,
            cu_seqlens=self.cu_seqlens, seq_idx=None, orig_index=None, pad_index=self.pad_index, lengths=None,
            max_seqlen=self.max_seqlen, orig_shape=(self.n_b, self.max_seqlen),
        )

    def fill(self, hp: HostPack, pad_token_id: int) -> None:
        """Copy a host pack into the static inputs, padding with dummy sequences.

        The host side is numpy writes into one staging tensor (pinned on CUDA: the copy is queued,
        the host never waits for the GPU, see packing.host_to_device), then one host-to-device copy
        and device-side copies into the static inputs. Few torch calls on purpose: each one releases
        and re-takes the GIL, and while the tokenizer threads hold it every re-take can wait."""
        t, n, cap, t_b, n_b = int(hp.cu_seqlens[-1]), hp.num_seqs, self.max_seqlen, self.t_b, self.n_b
        extra = t_b - t
        # The padding tokens form dummy sequences spread over every spare sequence slot of the bucket
        # (at least ceil(extra / cap) of them: the bucket key counts that many), as short as the slots
        # allow: attention over a dummy costs its length squared, and full-length dummies made the
        # padding of a 1,024-token bucket as expensive as several real documents.
        n_dummy = min(extra, n_b - n)
        dlen = -(-extra // n_dummy) if n_dummy else 0
        assert dlen <= cap, (extra, n_b, n, cap)
        with_tt = self.token_type_ids is not None
        device = self.input_ids.device
        staged = torch.empty((3 + with_tt) * t_b + n_b + 1, dtype=torch.long, pin_memory=device.type == "cuda")
        buf = staged.numpy()
        ids, pos, pad_index = buf[:t_b], buf[t_b : 2 * t_b], buf[2 * t_b : 3 * t_b]
        ids[:t] = hp.input_ids.numpy()
        ids[t:] = pad_token_id
        pos[:t] = hp.position_ids.numpy()
        tail = np.arange(extra, dtype=np.int64)
        pos[t:] = tail % dlen if dlen else tail
        # flat index into a right-padded [n_b, cap] layout; dummy sequence j is segment n + j
        pad_index[:t] = hp.seq_idx.numpy() * cap + pos[:t]
        pad_index[t:] = (n + tail // max(dlen, 1)) * cap + pos[t:]
        cu = buf[3 * t_b : 3 * t_b + n_b + 1]
        cu[: n + 1] = hp.cu_seqlens.numpy()
        cu[n + 1 : n + 1 + n_dummy] = t + np.minimum(np.arange(1, n_dummy + 1, dtype=np.int64) * dlen, extra)
        cu[n + 1 + n_dummy :] = t_b
        if with_tt:
            tt = buf[3 * t_b + n_b + 1 :]
            tt[:t] = hp.token_type_ids.numpy() if hp.token_type_ids is not None else 0
            tt[t:] = 0
        staged = staged.to(device, non_blocking=True)
        self.input_ids.copy_(staged[:t_b])
        self.position_ids.copy_(staged[t_b : 2 * t_b])
        self.pad_index.copy_(staged[2 * t_b : 3 * t_b])
        self.cu_seqlens.copy_(staged[3 * t_b : 3 * t_b + n_b + 1])
        if with_tt:
            self.token_type_ids.copy_(staged[3 * t_b + n_b + 1 :])

    def fits(self, hp: HostPack) -> bool:
        t = int(hp.cu_seqlens[-1])
        n_dummy = math.ceil((self.t_b - t) / self.max_seqlen)
        return t <= self.t_b and hp.num_seqs + n_dummy <= self.n_b and hp.max_seqlen <= self.max_seqlen


class _Captured:
    """One bucket's graphs. Its parameter gradients come back either in ``grad_params`` (static
    buffers of its own, overwritten by each replay) or, with a ``sink``, added by the backward graph
    itself into the sink's slots for the parameters listed in ``used`` (indices into ``params``)."""

    def __init__(self, fwd, bwd, static: _StaticBatch, out, grad_out, params, grad_params, sink=None, used=()):
        self.fwd, self.bwd, self.static = fwd, bwd, static
        self.out, self.grad_out = out, grad_out
        self.params, self.grad_params = params, grad_params
        self.sink, self.used = sink, tuple(used)


class _GradSink:
    """One gradient buffer per trainable parameter, shared by every bucket's backward graph, which
    adds its gradients into it (the add is part of the graph).

    Why: with its own static gradient outputs, each captured bucket kept a full set of gradients
    alive in the graph pool (bert-base full fine-tuning: 220 MB in bf16, 440 MB in fp32, per bucket;
    CachedMNRL's mini-batches use five to eight buckets, which put fastst's peak above stock's: H200,
    1,024 pairs, 6.94 GB vs stock 6.16, with the sink 5.61-5.81), and the replay
    then copied or added them into ``.grad`` outside the graph. With the sink the graph's gradient
    temporaries go back to the pool after the capture (shared by all buckets like their
    activations), and a slot becomes the parameter's ``.grad`` when that is None
    (``_GraphedStepDirect``): later replays of the step accumulate into it in place, as
    AccumulateGrad would. Like ``zero_grad(set_to_none=False)``, the same tensor serves as ``.grad``
    from step to step: a reference kept to last step's ``.grad`` sees it zeroed at the next
    backward. Used for large gradient sets only (``_grad_sink_wanted``)."""

    def __init__(self, params: tuple):
        self.params = params
        self.slots = [torch.zeros_like(p, memory_format=torch.contiguous_format) for p in params]

    def matches(self, params: tuple) -> bool:
        return len(params) == len(self.params) and all(a is b for a, b in zip(params, self.params))


# The sink saves (buckets - 1) x the trainable gradients' bytes of graph pool. LoRA's gradients are
# megabytes: nothing to save, so LoRA keeps the per-bucket copies (and plain .grad semantics). On one
# H200, MiniLM LoRA 64 pairs, sink vs none: the same peaks and step times once the A/B's build order
# is accounted for (the first fastst contender built in a process was 0.07 GB higher and slower
# whichever variant it was; calls 4 and 5 of 2026-11-30).
GRAD_SINK_MIN_BYTES = 64 << 20


def _grad_sink_wanted(params) -> bool:
    """``FASTST_GRAPH_GRAD_SINK``: ``auto`` (default: when the trainable gradients take at least
    GRAD_SINK_MIN_BYTES, i.e. full fine-tuning of anything but the smallest models), ``1`` always,
    ``0`` never (static gradients per bucket, as before)."""
    value = env_mode("FASTST_GRAPH_GRAD_SINK")
    if value in ("on", "off"):
        return value == "on"
    return sum(p.numel() * p.element_size() for p in params) >= GRAD_SINK_MIN_BYTES


def replays_possible(encoder, device) -> bool:
    """Whether ``encoder``'s calls on ``device`` may replay graphs at all right now (bucket, length
    and pending-backward checks come on top, per call)."""
    if not encoder.state.options.cuda_graphs or device.type != "cuda":
        return False
    if encoder.graphed is not None and encoder.graphed.disabled_reason is not None:
        return False  # a capture failed: this model runs eagerly
    if torch.is_autocast_enabled("cuda") and not _autocast_graphs():
        return False  # see _autocast_graphs
    if torch.distributed.is_available() and torch.distributed.is_initialized() and not _ddp_graphs(encoder):
        return False  # see _ddp_graphs
    return True


def _autocast_graphs() -> bool:
    """Whether steps under CUDA autocast replay graphs (default on; ``FASTST_AUTOCAST_GRAPHS=0``: eager).
    Checked on an H200 (2026-11-29, ``tests/gpu/gpu_checks.py amp``: fp32 weights, bf16 autocast,
    bert-base and the real MiniLM): graphed, replayed and eager steps give the same embeddings
    (cosine ≥ 0.999995 vs stock) and the same gradients (max relative error vs stock 0.0037 /
    0.0021 in all three); bert-base LoRA 64 pairs 13.3 ms graphed vs 61.0 ms eager (9.41× stock)."""
    return env_switch("FASTST_AUTOCAST_GRAPHS")


@contextlib.contextmanager
def _stand_ins(module: torch.nn.Module, params: tuple):
    """For a capture, each trainable parameter of ``module`` is replaced (in every submodule that
    holds it) by a fresh leaf tensor sharing its storage; yields those leaves, in ``params`` order.

    Why: the captured backward computes ``autograd.grad(out, leaves)``. Taken against the parameters
    themselves, the gradient ends at their AccumulateGrad nodes, and DDP keeps those nodes alive from
    its construction, when they recorded the default stream: the engine then makes the legacy
    default stream wait on the capture stream, which invalidates the capture
    (``cudaErrorStreamCaptureImplicit``; seen on an H200 inside DDP, 2026-11-29). Fresh leaves get
    their nodes on the capture stream. The graphs read the same storage, so a replay sees the
    parameters' current values, and ``_GraphedStep`` hands the gradients to the real parameters.
    """
    leaves = {id(p): p.detach().requires_grad_(True) for p in params}
    swapped = []
    try:
        for sub in module.modules():
            for name, p in list(sub._parameters.items()):
                if p is not None and id(p) in leaves:
                    sub._parameters[name] = leaves[id(p)]
                    swapped.append((sub, name, p))
        yield tuple(leaves[id(p)] for p in params)
    finally:
        for sub, name, p in reversed(swapped):
            sub._parameters[name] = p


class GraphedEncoder:
    """Replays a PackedEncoder's forward/backward per bucket; ``None`` from ``run`` means "use eager"."""

    def __init__(self, encoder, cap: int):
        self.encoder = encoder
        self.cap = cap
        self.graphs: dict[tuple, _Captured] = {}
        self.pool = None
        self.disabled_reason: str | None = None
        self._pending = None  # weakref to the autograd node of a graphed forward awaiting its backward
        self._signature = None  # parameter storage addresses the graphs were captured with
        self._param_list: list | None = None  # base.parameters(), re-read when registrations change
        self._registrations_seen = -1
        _watch_registrations()
        self._seen: dict[tuple, int] = {}
        self._no_room: set[tuple] = set()  # large buckets refused for memory (see LARGE_GRAPH_HEADROOM)
        self._sink: _GradSink | None = None  # gradient slots shared by the buckets' backward graphs

    def release(self) -> None:
        """Drop every captured graph (their pool memory goes back once nothing else holds it)."""
        self.graphs.clear()
        self.pool = None
        self._pending = None
        self._sink = None

    # -- eligibility ----------------------------------------------------------------------------
    def _eligible(self, hp: HostPack, device) -> bool:
        if not replays_possible(self.encoder, device):
            return False
        if hp.cu_seqlens.device.type != "cpu":
            return False  # device tensors in a host pack's place: the static buffers are filled from the host
        if hp.max_seqlen > self.cap or int(hp.cu_seqlens[-1]) > LARGE_GRAPH_MAX_TOKENS:
            return False
        if self._pending is not None and self._pending() is not None:
            return False  # an earlier graphed forward still waits for its backward: its activations are in the pool
        signature = self._param_signature()
        if signature != self._signature:
            # Parameters were replaced (.to(), a new state dict assigned, adapters added): the graphs
            # read the old storage, so drop them and capture again.
            self.graphs.clear()
            self._sink = None
            self._signature = signature
        return True

    def _checkpoint_mode(self, grad: bool) -> str | None:
        """The checkpointing mode a graph with (``grad``) or without gradients would be captured
        under, or None when it cannot be captured: offloading (side-stream copies, host events) and
        any checkpointing while the forward draws random numbers (the recompute inside the
        backward graph would draw new ones; eagerly, checkpoint replays the RNG state)."""
        if not grad:
            return "off"
        mode = self.encoder.checkpoint_mode()
        if mode == "offload" or (mode != "off" and self.encoder.draws_random_numbers()):
            return None
        return mode

    def _key(self, hp: HostPack, grad: bool, mode: str) -> tuple:
        t = int(hp.cu_seqlens[-1])
        cached = getattr(hp, "coarse_seq_buckets", False)  # a cached loss's mini-batch
        t_b = bucket_tokens(t, fine=grad and cached)
        n = hp.num_seqs + math.ceil((t_b - t) / self.cap)
        coarse = not grad or cached
        return (t_b, bucket_seqs_no_grad(n) if coarse else bucket_seqs(n),
                self.encoder.base.training, self.encoder.uses_token_types, _autocast_dtype(), mode, grad)

    def _get_or_capture(self, key, hp: HostPack, device) -> "_Captured | None":
        cap = self.graphs.get(key)
        if cap is not None:
            return cap
        cap = self._capture_if_allowed(key, hp, device)
        return cap if cap is not None else self._larger_captured(key, hp)

    def _larger_captured(self, key, hp: HostPack) -> "_Captured | None":
        """The smallest captured graph of a larger bucket that ``hp`` fits, with everything else of
        ``key`` equal, when ``key`` itself may not be captured (bucket slots used up, inside a backward
        pass, not seen often enough yet), or None. Up to ``FALLBACK_PADDING`` x the bucket's tokens:
        below GRAPH_MAX_TOKENS an eager step is host-bound (a bert-base mini-batch of ~14k tokens:
        ~3x its graph's time), so a graph with extra padding is still far cheaper; larger steps are
        GPU-bound eagerly and stay eager."""
        if _is_large(key):
            return None
        best = None
        for other, cap in self.graphs.items():
            if (other[2:] == key[2:] and other[0] <= FALLBACK_PADDING * key[0] and cap.static.fits(hp)
                    and (best is None or other[:2] < best[0][:2])):
                best = (other, cap)
        return None if best is None else best[1]

    def _capture_if_allowed(self, key, hp: HostPack, device) -> "_Captured | None":
        grad = key[-1]
        if torch._C._current_graph_task_id() != -1:
            # Never capture inside a backward pass (a cached loss's replay): the engine's stream
            # bookkeeping around the capture invalidated it on the GPU. Those buckets are captured
            # ahead, in the loss's first pass (see ``prepare``), and only replayed here.
            return None
        # Training steps repeat their few buckets from the first step on; inference (no grad) walks
        # through many sizes once (encode sorts by length), so capture those only for buckets that
        # keep coming back.
        large = _is_large(key)
        if large and (not grad or key in self._no_room or not _large_graphs_allowed()):
            return None
        self._seen[key] = self._seen.get(key, 0) + 1
        if (not grad or large) and self._seen[key] < NO_GRAD_CAPTURE_AFTER:
            return None
        if large:
            if sum(1 for k in self.graphs if _is_large(k)) >= MAX_LARGE_GRAPHS:
                return None
        elif sum(1 for k in self.graphs if k[-1] == grad and not _is_large(k)) >= (MAX_GRAPHS if grad else MAX_NO_GRAD_GRAPHS):
            return None
        try:
            # Captured outside inference mode even when called from encode (which runs under
            # torch.inference_mode): static buffers made there would be inference tensors, and a
            # later replay outside it (a no_grad eval step) could not refill them in place.
            with torch.inference_mode(False):
                cap = self._capture(key, hp, device)
        except _NoRoom as exc:  # this bucket stays eager; the others keep their graphs
            self._no_room.add(key)
            logger.info(f"fastst: a {key[0]}-token step runs without CUDA graphs: {exc}")
            return None
        except Exception as exc:  # capture is an optimisation: never let it break training
            self.disabled_reason = f"{type(exc).__name__}: {exc}"
            logger.debug("CUDA graph capture failed", exc_info=True)
            warn_once(f"CUDA graph capture failed ({self.disabled_reason}); this model runs eagerly")
            return None
        self.graphs[key] = cap
        return cap

    def prepare(self, hp: HostPack, device) -> bool:
        """Capture the with-gradient graph of ``hp``'s bucket now, if it will be wanted and is missing;
        whether that graph is ready (a with-gradient call of ``hp`` would replay it).

        For the cached losses: their with-gradient forwards run inside ``loss.backward()``, where
        nothing may be captured, so the first (no-gradient) pass prepares each mini-batch's bucket."""
        if not self._eligible(hp, device) or not any(p.requires_grad for p in self._all_params()):
            return False
        with torch.enable_grad():
            mode = self._checkpoint_mode(True)
            if mode is None:
                return False
            cap = self._get_or_capture(self._key(hp, True, mode), hp, device)
        return cap is not None and cap.static.fits(hp)

    def _all_params(self) -> list:
        if self._param_list is None or self._registrations_seen != _REGISTRATIONS[0]:
            self._param_list = list(self.encoder.base.parameters())
            self._registrations_seen = _REGISTRATIONS[0]
        return self._param_list

    def _param_signature(self) -> tuple:
        # Storage addresses catch .to()/load_state_dict(assign=True); requires_grad catches freezing
        # and unfreezing (the captured backward computes gradients for a fixed parameter set); the
        # version of a frozen parameter catches in-place writes (load_state_dict, peft's merge), which
        # the graphs' cached concatenations of frozen weights (linear.FusedProjection) must not
        # outlive. Trained parameters' versions move at every optimizer step: not part of it.
        params = self._all_params()
        try:
            return tuple((p.data_ptr(), p.requires_grad, 0 if p.requires_grad else p._version) for p in params)
        except RuntimeError:  # inference tensors (made under torch.inference_mode) have no version counter
            return tuple((p.data_ptr(), p.requires_grad, 0 if p.requires_grad else _version_or_none(p)) for p in params)

    def _params(self):
        return tuple(p for p in self._all_params() if p.requires_grad)

    # -- capture ----------------------------------------------------------------------------------
    def _capture(self, key, hp: HostPack, device) -> _Captured:
        t_b, n_b, training, with_tt, amp, _mode, grad = key
        static = _StaticBatch(t_b, n_b, self.cap, device, with_tt)
        static.fill(hp, self.encoder.pad_token_id)
        params = self._params() if grad else ()
        packed = static.as_packed()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        torch.cuda.synchronize()
        side = _capture_stream(device)
        side.wait_stream(torch.cuda.current_stream())
        large = _is_large(key)
        held = 0  # bytes the warm-up forward left allocated (its activations): the pool will hold as much
        with _stand_ins(self.encoder.base, params) as leaves:
            with torch.cuda.stream(side):
                for _ in range(2):  # warm-up: lazy inits, autotuning and caches stay out of the capture
                    with torch.set_grad_enabled(grad), _capture_autocast(amp):
                        before = torch.cuda.memory_allocated(device)
                        out = self.encoder.forward_eager(packed)
                        held = max(held, torch.cuda.memory_allocated(device) - before)
                        if grad and leaves:
                            torch.autograd.grad(out, leaves, torch.ones_like(out), allow_unused=True)
                    del out
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.synchronize()
            if large:
                _check_room(device, held, self.pool)
            mode = _capture_mode()
            fwd = torch.cuda.CUDAGraph()
            with torch.set_grad_enabled(grad), _capture_autocast(amp):
                with torch.cuda.graph(fwd, pool=self.pool, stream=side, capture_error_mode=mode):
                    out = self.encoder.forward_eager(packed)
            bwd = grad_out = grad_params = sink = None
            used = ()
            if grad and leaves and out.requires_grad:
                grad_out = torch.empty_like(out)
                sink = self._grad_sink(params) if _grad_sink_wanted(params) else None
                bwd = torch.cuda.CUDAGraph()
                with torch.cuda.graph(bwd, pool=self.pool, stream=side, capture_error_mode=mode):
                    grad_params = torch.autograd.grad(out, leaves, grad_out, allow_unused=True)
                    if sink is not None:
                        # Added into the shared sink inside the graph; the temporaries are not kept
                        # (their blocks go back to the pool when the capture ends; see _GradSink).
                        # Dense addends keep the add one multi-tensor kernel (see below).
                        used = tuple(i for i, g in enumerate(grad_params) if g is not None)
                        torch._foreach_add_([sink.slots[i] for i in used], [grad_params[i].contiguous() for i in used])
                        grad_params = None
                    else:
                        # Dense static gradients: a fused projection's block-diagonal LoRA B hands
                        # each module's B a strided slice of one gradient, and one non-dense tensor
                        # sends the replay's multi-tensor copy / add (``_GraphedStepDirect.backward``)
                        # down the per-tensor slow path (MiniLM LoRA: ~80 ``mul`` launches, ~0.7 ms of
                        # host time per step). Copied here, inside the graph, only where strided.
                        grad_params = tuple(None if g is None else g.contiguous() for g in grad_params)
        return _Captured(fwd, bwd, static, out.detach() if bwd is None else out, grad_out, params, grad_params, sink, used)

    def _grad_sink(self, params: tuple) -> _GradSink:
        """The sink shared by this encoder's buckets for ``params`` (a new one when they changed)."""
        if self._sink is None or not self._sink.matches(params):
            self._sink = _GradSink(params)
        return self._sink

    # -- replay -----------------------------------------------------------------------------------
    def run(self, hp: HostPack, device) -> torch.Tensor | None:
        if not self._eligible(hp, device):
            return None
        grad = torch.is_grad_enabled() and any(p.requires_grad for p in self._all_params())
        mode = self._checkpoint_mode(grad)
        if mode is None:
            return None
        cap = self._get_or_capture(self._key(hp, grad, mode), hp, device)
        if cap is None or not cap.static.fits(hp):
            return None
        t = int(hp.cu_seqlens[-1])
        cap.static.fill(hp, self.encoder.pad_token_id)
        if cap.bwd is None:
            cap.fwd.replay()
            return cap.out[:t].clone()
        if _direct_grads_possible(cap.params):
            full = _GraphedStepDirect.apply(cap, self._anchor_for(device))
        else:
            full = _GraphedStep.apply(cap, *cap.params)
        try:
            self._pending = weakref.ref(full.grad_fn)
        except TypeError:  # pragma: no cover - node without weakref support: rely on backward's flag
            self._pending = None
        cap.owner = self
        return full[:t]

    def _anchor_for(self, device) -> torch.Tensor:
        """A scalar leaf that makes a direct-gradient step's output require grad (see
        ``_GraphedStepDirect``); it never receives a gradient. One per device as passed (kept: a
        fresh leaf per step would be an allocation and a fill kernel per step)."""
        anchors = self.__dict__.setdefault("_anchors", {})
        anchor = anchors.get(device)
        if anchor is None:
            anchor = anchors[device] = torch.zeros((), device=device, requires_grad=True)
        return anchor


def _version_or_none(t: torch.Tensor):
    try:
        return t._version
    except RuntimeError:
        return None


def _direct_grads_possible(params) -> bool:
    """Whether a graphed step may write its parameter gradients into ``.grad`` itself.

    Not under torch.distributed (DDP's reducer hooks the parameters' AccumulateGrad nodes) unless
    fastst reduces the gradients itself (``ddp_reduce``, ``FASTST_DDP_REDUCE=fastst``), not when a
    parameter carries hooks (``register_hook`` / ``register_post_accumulate_grad_hook``: they run in
    AccumulateGrad), and not when ``FASTST_GRAPH_GRADS=edges``. Everything else (the trainer's and
    the bench's ``loss.backward()``, gradient accumulation, zero_grad with or without set_to_none)
    gets the same ``.grad`` either way."""
    if os.environ.get("FASTST_GRAPH_GRADS", "direct").strip().lower() == "edges":
        return False
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        from .ddp_reduce import taken_over

        if not taken_over():
            return False
    for p in params:
        if p._backward_hooks or getattr(p, "_post_accumulate_grad_hooks", None):
            return False
    return True


class _GraphedStepDirect(torch.autograd.Function):
    """The graphed step without one autograd edge per parameter.

    ``_GraphedStep`` hands the engine one gradient per trainable parameter; with 72 (MiniLM LoRA) to
    400 parameters, the per-edge work of ``Function.apply`` and of the engine (validating each
    output, one AccumulateGrad node each) was most of the host time of a replayed step (H200,
    MiniLM LoRA 64 pairs: ~3 ms backward host time for ~2 ms of GPU work). Here the output hangs
    off one scalar anchor leaf, and the backward adds the static gradients into ``.grad`` itself,
    as AccumulateGrad would: a copy where ``.grad`` is None, an in-place add where it exists
    (gradient accumulation). What this cannot serve: ``torch.autograd.grad`` (or
    ``backward(inputs=...)``) asking for the encoder's parameters, which are not in the autograd
    graph: torch raises "appears to not have been used in the graph", or with ``allow_unused=True``
    returns None for them. Nothing in sentence-transformers, transformers' Trainer or peft does
    that; ``FASTST_GRAPH_GRADS=edges`` (or ``cuda_graphs=False``) serves it."""

    @staticmethod
    def forward(ctx, cap: _Captured, anchor):
        return _replay_forward(ctx, cap)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        if ctx.cap.sink is not None:
            _replay_into_sink(ctx, grad)
            return None, None
        cap = _replay_backward(ctx, grad)
        fresh_p, fresh_g, acc_p, acc_g = [], [], [], []
        for p, g in zip(cap.params, cap.grad_params):
            if g is None:
                continue
            if p.grad is None:
                fresh_p.append(p)
                fresh_g.append(g)
            else:
                acc_p.append(p.grad)
                acc_g.append(g)
        if acc_p:
            torch._foreach_add_(acc_p, acc_g)
        if fresh_p:
            # Copies: the static buffers are overwritten by the next replay (x * 1.0 is exact).
            for p, copy in zip(fresh_p, torch._foreach_mul(fresh_g, 1.0)):
                p.grad = copy
        return None, None


def _replay_forward(ctx, cap: _Captured) -> torch.Tensor:
    ctx.cap = cap
    cap.fwd.replay()
    return cap.out.detach()


def _replay_into_sink(ctx, grad) -> None:
    """The backward graph replayed into the sink, which serves as ``.grad``: where a parameter's
    ``.grad`` is None its slot is zeroed and becomes its ``.grad`` (the replay adds into it, and
    later replays of the step accumulate there); where ``.grad`` already is its slot the replay
    accumulates; where it is some other tensor (set by the user, or by an edges-mode step) the slot
    is zeroed, and added into that tensor after the replay."""
    cap = ctx.cap
    slots = cap.sink.slots
    zero, foreign, foreign_slots = [], [], []
    for i in cap.used:
        p, slot = cap.params[i], slots[i]
        g = p.grad
        if g is slot:
            continue
        zero.append(slot)
        if g is None:
            p.grad = slot
        else:
            foreign.append(g)
            foreign_slots.append(slot)
    if zero:
        torch._foreach_zero_(zero)
    _replay_backward(ctx, grad)
    if foreign:
        torch._foreach_add_(foreign, foreign_slots)


def _replay_backward(ctx, grad) -> _Captured:
    """The backward graph replayed for the output gradient ``grad``; its owner no longer waits."""
    cap = ctx.cap
    owner = getattr(cap, "owner", None)
    if owner is not None:
        owner._pending = None
    if grad.data_ptr() != cap.grad_out.data_ptr():
        cap.grad_out.copy_(grad)
    cap.bwd.replay()
    return cap


class _GraphedStep(torch.autograd.Function):
    """The graphed step with one autograd edge per trainable parameter (DDP, hooks, autograd.grad)."""

    @staticmethod
    def forward(ctx, cap: _Captured, *params):
        return _replay_forward(ctx, cap)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        cap = ctx.cap
        if cap.sink is not None:
            # The graph adds into the sink: start its slots from zero, and first give a parameter
            # whose .grad is its slot (from a direct-gradient step) a .grad of its own.
            for i in cap.used:
                if cap.params[i].grad is cap.sink.slots[i]:
                    cap.params[i].grad = cap.sink.slots[i].clone()
            slots = [cap.sink.slots[i] for i in cap.used]
            if slots:
                torch._foreach_zero_(slots)
            _replay_backward(ctx, grad)
            copies = dict(zip(cap.used, torch._foreach_mul(slots, 1.0) if slots else ()))
            return (None, *(copies.get(i) for i in range(len(cap.params))))
        cap = _replay_backward(ctx, grad)
        # Copies: the static buffers are overwritten by the next replay. One multi-tensor kernel
        # (x * 1.0 is exact) instead of a clone launch per parameter.
        present = [g for g in cap.grad_params if g is not None]
        copies = iter(torch._foreach_mul(present, 1.0)) if present else iter(())
        return (None, *(next(copies) if g is not None else None for g in cap.grad_params))
