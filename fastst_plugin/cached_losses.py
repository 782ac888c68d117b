"""GradCache ("Cached…") losses on the fast path.

Sentence Transformers' cached losses (``CachedMultipleNegativesRankingLoss``, ``CachedGISTEmbedLoss``,
``CachedMultipleNegativesSymmetricRankingLoss``, ``CachedSpladeLoss``, ``MegaBatchMarginLoss``…) embed
their columns themselves, mini-batch by mini-batch, twice: without gradients, then again inside
``loss.backward()`` with the RNG state of the first pass replayed (see
``sentence_transformers.base.losses.gradcache``). :func:`install` (called with the trainer
integration, reverted with it) patches the shared helpers they use so that, for features that
carry a host pack (they come from a fast model's ``preprocess``):

* mini-batches are cut by **token budget** over the packed texts: ``mini_batch_num_tokens`` when the
  loss sets it, else ``mini_batch_size`` × the padded width of the call's widest column — the token
  positions stock's largest padded mini-batch computes, so no packed mini-batch holds more
  activations than stock's largest one, and short texts (a query column) share a few large
  mini-batches instead of each group of ``mini_batch_size`` being run on its own. Cuts fall at
  equal shares of a column's tokens. Boundaries come from the host pack: no device synchronisation (stock
  reads the attention mask back from the GPU for every mini-batch);
* each mini-batch gets its own host pack (rows sliced on the host), so it runs through the
  encoder's ``run_host`` like any training forward — CUDA graphs included, for the no-gradient pass
  and the replay alike — instead of being re-packed from its mask with a device round trip;
* the with-gradient replay re-enters the first pass's autocast state along with its RNG state.
  Stock replays the RNG only; the replay runs inside ``backward()``, normally outside the trainer's
  autocast, so a bf16 first pass was replayed in fp32: slower, and not the function whose
  embeddings the cached gradients belong to;
* the packed encoder does not checkpoint inside the replay (it runs inside a backward pass with one
  mini-batch's activations alive at a time; checkpointing would compute each mini-batch a third
  time): see ``PackedEncoder.checkpoint_mode``;
* with CUDA graphs, the first pass also captures each mini-batch's with-gradient bucket
  (``GraphedEncoder.prepare``): the replay runs inside ``backward()``, where nothing may be captured,
  and replays those graphs instead of launching every kernel again (eagerly, a bert-base mini-batch
  is host-bound at ~50 us per kernel);
* the loss stage (step 2: scores, softmax, backward to the embeddings) of
  ``CachedMultipleNegativesRankingLoss`` (and its symmetric variant) and ``CachedGISTEmbedLoss``
  over a fast model runs in row chunks of up to
  ``LOSS_CHUNK_ELEMENTS`` scores instead of ``mini_batch_size`` rows. Stock chunks it by the
  embedding mini-batch size, which bounds nothing that matters here (the score rows of 64 anchors
  against 2,048 candidates are 0.5 MB) and costs ~40 small kernels plus one autograd backward per
  chunk on the host while the GPU waits: 16 chunks per step at 1,024 pairs. The loss is the same sum
  of per-row terms; only the floating-point grouping of the chunks changes;
* when nothing draws random numbers (no dropout anywhere in the model), the first pass embeds
  ``first_pass_budget_factor`` (layers / 2) mini-batches' tokens per forward and hands each
  mini-batch its slice: fewer, larger launches, and a no-gradient forward holds one layer's working
  set, so its peak stays below one replayed mini-batch's. With dropout every mini-batch runs on its
  own, as the replay must redraw its masks from its own RNG state;
* the first mini-batch of a step is embedded with gradients in the first pass and its autograd
  graph kept: the replay reaches it first and only runs its backward (one forward fewer per step).
  Without CUDA graphs (CPU, option off, autocast with FASTST_AUTOCAST_GRAPHS=0, a failed capture)
  always: its activations live through the rest of the first pass, where the other mini-batches run
  without gradients (a small transient each), so the peak stays that of one with-gradient
  mini-batch, as in the replay. With graphs, when the rest of the first pass runs eagerly anyway
  (large no-gradient forwards): the kept forward is its bucket's graph replayed, its activations
  left in the graph pool until the replay's first backward (``_keep_first_mode``). Not under
  torch.distributed, where DDP expects the replay's forward/backward pairs.

Token budgets and host packs apply to every loss that uses the shared helpers (``CachedGISTEmbedLoss``
and the multi-vector cached loss included), skipping checkpointing to every forward run inside a
backward pass; the autocast replay and the kept first mini-batch to the losses built on
``CachedLossMixin`` (``CachedMultipleNegativesRankingLoss``, its symmetric variant,
``CachedSpladeLoss``, ``MegaBatchMarginLoss``). Anything else (features without a host pack, image
inputs, flattened features) goes to the stock helpers unchanged.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import sys
from collections.abc import Mapping

import torch

from .config import env_mode
from .graphs import bucket_tokens
from .log import logger
from .packing import HOST_PACK_KEY, HostPack

# Feature keys the fast text path knows how to slice (others: stock helpers).
_TEXT_KEYS = {"input_ids", "attention_mask", "token_type_ids", HOST_PACK_KEY, "modality", "prompt_length"}


def fast_host_pack(features) -> HostPack | None:
    """The host pack of text features a fast ``preprocess`` produced, else None."""
    if not isinstance(features, Mapping) or set(features) - _TEXT_KEYS:
        return None
    if features.get("modality", "text") != "text":
        return None
    hp = features.get(HOST_PACK_KEY)
    ids = features.get("input_ids")
    if isinstance(hp, HostPack) and isinstance(ids, torch.Tensor) and ids.dim() == 2 and hp.matches(ids):
        return hp
    return None


def token_budget(hp: HostPack, mini_batch_size: int, mini_batch_num_tokens: int | None = None, width: int | None = None) -> int:
    """Real tokens per mini-batch: ``mini_batch_num_tokens`` when set, else ``mini_batch_size`` x the
    padded width (``width``, by default the features' own)."""
    if mini_batch_num_tokens is not None:
        return max(int(mini_batch_num_tokens), 1)
    return max(int(mini_batch_size) * max(int(width or hp.orig_shape[1]), 1), 1)


def token_budget_ranges(
    hp: HostPack, mini_batch_size: int, mini_batch_num_tokens: int | None = None, width: int | None = None
) -> list[tuple[int, int]]:
    """``(begin, end)`` row ranges of consecutive texts whose real tokens fit the budget
    (``mini_batch_num_tokens``, else ``mini_batch_size`` × ``width``, by default the features'
    padded width); a text longer than the budget is a mini-batch of its own. Host data only.

    As few mini-batches as a greedy cut needs (or one more), cut where the fewest token positions
    are computed: a graphed mini-batch runs at its CUDA-graph bucket's size (a cached mini-batch's
    ``graphs.bucket_tokens(fine=True)``), so the padding up to the bucket is real work. Candidates:
    cuts at equal shares of the tokens (sizes recur from step to step, so they land in one or two
    buckets; a plain greedy cut leaves an odd remainder whose size, hence bucket, changes every
    step) and cuts that fill each mini-batch up to a bucket boundary, leaving the remainder to the
    last one (H200, bert-base, 1,024 pairs: six equal shares of ~14.0k tokens padded to 14,336 each
    wasted 2–5 % of the documents' work; filled to a boundary the waste is the last one's). Falls
    back to the greedy cut when nothing else fits the budget (very long texts).
    ``FASTST_CACHED_CUTS=balanced`` keeps to equal shares."""
    n = hp.orig_shape[0]
    if n == 0:
        return []
    budget = token_budget(hp, mini_batch_size, mini_batch_num_tokens, width)
    fill = os.environ.get("FASTST_CACHED_CUTS", "bucket").strip().lower() != "balanced"  # A/B switch
    # Kept on the host pack: a step asks for its columns' ranges several times (keep-first planning,
    # first-pass groups, stock's loops), and the candidates cost a few dozen small host ops each.
    cache = hp.__dict__.setdefault("_fastst_ranges", {})
    if (budget, fill) not in cache:
        cache[(budget, fill)] = _best_cut(hp, budget, fill)
    return list(cache[(budget, fill)])


def _best_cut(hp: HostPack, budget: int, fill: bool) -> list[tuple[int, int]]:
    """The cut ``token_budget_ranges`` describes (``fill``: bucket-filling candidates too)."""
    n = hp.orig_shape[0]
    cumulative = hp.cu_seqlens[1:].to(torch.int64)
    greedy = _fill_cut(hp, cumulative, budget)
    total = int(cumulative[-1])
    candidates = []
    for k in (len(greedy), len(greedy) + 1):
        if k <= 1 or k > n:
            break
        shares = torch.tensor([total * i / k for i in range(1, k)], dtype=torch.float64)
        cuts = torch.searchsorted(cumulative.to(torch.float64), shares, right=True).tolist()
        bounds = [0, *cuts, n]
        if all(b > a for a, b in zip(bounds, bounds[1:])):
            candidates.append(list(zip(bounds, bounds[1:])))
        if not fill:
            continue
        # The first boundary at or above an equal share: a higher one would leave a small last
        # mini-batch, whose matmuls fill a fraction of the card's SMs.
        filled = _fill_cut(hp, cumulative, min(bucket_tokens(-(-total // k), fine=True), budget))
        if len(filled) == k:
            candidates.append(filled)
    fits = [r for r in candidates if all(e - b == 1 or int(hp.cu_seqlens[e]) - int(hp.cu_seqlens[b]) <= budget for b, e in r)]
    if not fits:
        return greedy
    if not fill:
        return fits[0]
    # Fewest padded token positions; on a tie the earlier candidate (fewer mini-batches, equal shares).
    return min(fits, key=lambda r: sum(bucket_tokens(int(hp.cu_seqlens[e]) - int(hp.cu_seqlens[b]), fine=True) for b, e in r))


def _fill_cut(hp: HostPack, cumulative: torch.Tensor, limit: int) -> list[tuple[int, int]]:
    """Greedy ranges of consecutive texts of at most ``limit`` real tokens each (a longer text alone)."""
    n = hp.orig_shape[0]
    ranges = []
    begin = 0
    while begin < n:
        start = int(hp.cu_seqlens[begin])
        end = int(torch.searchsorted(cumulative, torch.tensor(start + limit), right=True))
        end = min(max(end, begin + 1), n)
        ranges.append((begin, end))
        begin = end
    return ranges


def slice_host_pack(hp: HostPack, begin: int, end: int) -> tuple[HostPack, int]:
    """Rows ``begin:end`` of a host pack as the pack of the sliced features, and the padded width of
    those features (stock's mini-batch drops the trailing padding columns none of its rows uses).
    Kept on ``hp``: a mini-batch is sliced once per step, not again for its graph, its first pass
    and its replay."""
    n, width = hp.orig_shape
    end = min(end, n)
    cache = hp.__dict__.setdefault("_fastst_slices", {})
    if (begin, end) not in cache:
        cache[(begin, end)] = _slice_host_pack(hp, begin, end)
    return cache[(begin, end)]


def _slice_host_pack(hp: HostPack, begin: int, end: int) -> tuple[HostPack, int]:
    n, width = hp.orig_shape
    t0, t1 = int(hp.cu_seqlens[begin]), int(hp.cu_seqlens[end])
    cols = hp.orig_index[t0:t1] % max(width, 1)
    new_width = int(cols.max()) + 1 if t1 > t0 else width
    seq_idx = hp.seq_idx[t0:t1] - begin
    lengths = hp.lengths[begin:end]
    max_seqlen = int(lengths.max()) if end > begin else 0
    positions = hp.position_ids[t0:t1]
    sub = HostPack(
        input_ids=hp.input_ids[t0:t1],
        position_ids=positions,
        token_type_ids=hp.token_type_ids[t0:t1] if hp.token_type_ids is not None else None,
        cu_seqlens=hp.cu_seqlens[begin : end + 1] - hp.cu_seqlens[begin],
        seq_idx=seq_idx,
        orig_index=seq_idx * new_width + cols,
        pad_index=seq_idx * max_seqlen + positions,
        lengths=lengths,
        max_seqlen=max_seqlen,
        orig_shape=(end - begin, new_width),
    )
    # A cached loss's mini-batch: CUDA graphs bucket its text count by powers of two (its size
    # varies from step to step within one token budget; see graphs.GraphedEncoder._key).
    sub.coarse_seq_buckets = True
    return sub, new_width


def create_minibatch(features: dict, begin: int, end: int, hp: HostPack) -> dict:
    """Stock ``_create_minibatch`` for fast text features, reading nothing back from the device:
    tensors are row-sliced (trailing padding columns trimmed, as stock does) and the host pack is
    sliced on the host."""
    n, width = hp.orig_shape
    end = min(end, n)
    sub, new_width = slice_host_pack(hp, begin, end)
    out = {}
    for key, value in features.items():
        if key == HOST_PACK_KEY:
            out[key] = sub
        elif not isinstance(value, torch.Tensor) or value.dim() == 0:
            out[key] = value
        elif value.dim() >= 2 and value.shape[1] == width:
            out[key] = value[begin:end, :new_width]
        else:
            out[key] = value[begin:end]
    return out


def _wrap_create_minibatch(orig):
    def _create_minibatch(sentence_feature, begin, end):
        hp = fast_host_pack(sentence_feature)
        if hp is None:
            return orig(sentence_feature, begin, end)
        return create_minibatch(sentence_feature, begin, end, hp)

    _create_minibatch._fastst_wrapped = orig
    return _create_minibatch


# The widest padded width among the columns of the cached loss call in progress (see forward_cached).
_STEP_WIDTH: contextvars.ContextVar[int | None] = contextvars.ContextVar("fastst_cached_step_width", default=None)

# Scores (rows x candidates) per chunk of a cached loss's loss stage on the fast path: 8M fp32 scores
# are 32 MB per intermediate (scores, scaled scores, their gradients: a few copies alive at once),
# computed between the two embedding passes, when no mini-batch's activations are alive.
LOSS_CHUNK_ELEMENTS = 1 << 23


def _loss_chunk_rows(loss, reps) -> int | None:
    """Rows per chunk of the loss stage for ``reps`` (a list of columns, each a list of mini-batch
    embeddings): as many as keep a chunk's scores within ``LOSS_CHUNK_ELEMENTS``, never fewer than
    the loss's own ``mini_batch_size``; None when the loss has no integer ``mini_batch_size``."""
    rows = getattr(loss, "mini_batch_size", None)
    if not isinstance(rows, int) or isinstance(rows, bool) or rows <= 0:
        return None
    try:
        candidates = sum(int(t.shape[0]) for column in reps for t in column)
    except (AttributeError, IndexError, TypeError):
        return None
    if getattr(loss, "gather_across_devices", False) and torch.distributed.is_available() and torch.distributed.is_initialized():
        candidates *= torch.distributed.get_world_size()
    return max(rows, LOSS_CHUNK_ELEMENTS // max(candidates, 1))


def _loss_chunking_on() -> bool:
    """``FASTST_CACHED_LOSS_CHUNKS=stock`` keeps stock's chunks (rows = ``mini_batch_size``)."""
    return os.environ.get("FASTST_CACHED_LOSS_CHUNKS", "").strip().lower() != "stock"


def _wrap_calculate_loss(orig):
    def calculate_loss(self, reps, *args, **kwargs):
        fast = _loss_chunking_on() and _model_state(self) is not None
        rows = _loss_chunk_rows(self, reps) if fast else None
        if rows is None or rows == self.mini_batch_size:
            return orig(self, reps, *args, **kwargs)
        own = self.mini_batch_size
        self.mini_batch_size = rows  # read by the chunk loop only; the embedding ranges are already cut
        try:
            return orig(self, reps, *args, **kwargs)
        finally:
            self.mini_batch_size = own

    calculate_loss._fastst_wrapped = orig
    return calculate_loss


def _wrap_minibatch_ranges(orig):
    def _minibatch_ranges(sentence_feature, mini_batch_size, mini_batch_num_tokens=None):
        hp = fast_host_pack(sentence_feature)
        if hp is None:
            return orig(sentence_feature, mini_batch_size, mini_batch_num_tokens)
        width = max(hp.orig_shape[1], _STEP_WIDTH.get() or 0)
        return token_budget_ranges(hp, mini_batch_size, mini_batch_num_tokens, width=width)

    _minibatch_ranges._fastst_wrapped = orig
    return _minibatch_ranges


def _autocast_state(device_type: str):
    try:
        return device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
    except (TypeError, RuntimeError):  # pragma: no cover - a device type without autocast
        return None


def _model_state(loss):
    from .api import get_state

    model = getattr(loss, "model", None)
    return get_state(getattr(model, "_orig_mod", model))


@contextlib.contextmanager
def _graphs_off(state):
    """The packed encoder runs eagerly inside the block (options are read at every call)."""
    if state is None or not state.options.cuda_graphs:
        yield
        return
    state.options.cuda_graphs = False
    try:
        yield
    finally:
        state.options.cuda_graphs = True


def first_pass_budget_factor(encoder) -> int:
    """How many mini-batches' tokens the first (no-gradient) pass embeds per forward: half the
    encoder's layer count. A with-gradient mini-batch holds every layer's saved activations until its
    backward; a no-gradient forward holds one layer's working set at a time (about 1.5 layers' worth
    of saved activations: Q/K/V, the MLP's intermediate), so a forward over layers/2 mini-batches
    peaks below one replayed mini-batch."""
    return max(1, len(getattr(encoder, "layers", ())) // 2)


def _first_pass_chunks_on() -> bool:
    """``FASTST_CACHED_FIRST_PASS=mini-batch`` embeds the first pass mini-batch by mini-batch, as stock."""
    return os.environ.get("FASTST_CACHED_FIRST_PASS", "").strip().lower() != "mini-batch"


def _draws_random_numbers(loss, state) -> bool:
    """Whether embedding with ``loss.model`` draws random numbers (dropout in the backbone, its
    adapters, or a module after it). Then every mini-batch of the first pass must be run on its own:
    the replay restores its RNG state to redraw the same masks."""
    if state.encoder.draws_random_numbers():
        return True
    model = getattr(loss.model, "_orig_mod", loss.model)
    if not model.training:
        return False
    return any(isinstance(m, torch.nn.Dropout) and m.p > 0 for top in list(model.children())[1:] for m in top.modules())


def _first_pass_from_chunk(loss, orig, feature, begin: int, end: int, args, kwargs):
    """The first-pass embeddings of rows ``begin:end`` (one mini-batch), computed with the mini-batches
    after it in one no-gradient forward of up to ``first_pass_budget_factor`` token budgets, when the
    model draws no random numbers (nothing for the replay to reproduce but the function itself).
    Fewer, larger forwards: at 1,024 pairs a bert-base first pass is two forwards instead of seven.
    The replay still embeds each mini-batch on its own; its embeddings equal these up to the
    rounding of differently sized matmuls. None when there is nothing to merge."""
    hp = fast_host_pack(feature)
    cache = hp.__dict__.setdefault("_fastst_first_pass", {})
    if (begin, end) not in cache:
        state = _model_state(loss)
        if state is None or state.encoder is None or not _first_pass_chunks_on() or _draws_random_numbers(loss, state):
            return None
        factor = first_pass_budget_factor(state.encoder)
        if factor <= 1:
            return None
        from sentence_transformers.base.losses import gradcache

        ranges = gradcache._minibatch_ranges(feature, loss.mini_batch_size, loss.mini_batch_num_tokens)
        if (begin, end) not in ranges:
            return None
        i = ranges.index((begin, end))
        group = _first_pass_groups(hp, ranges[i:], _first_pass_budget(loss, hp, factor))[0]
        if len(group) == 1:
            return None
        chunk_end = group[-1][1]
        reps, *_ = orig(loss, feature, begin, chunk_end, False, False, None, *args, **kwargs)
        for b, e in group:
            cache[(b, e)] = reps[b - begin : e - begin]
    return cache.pop((begin, end))


def _first_pass_budget(loss, hp: HostPack, factor: int) -> int:
    """Tokens per first-pass forward: ``factor`` mini-batch token budgets (the step's widest column)."""
    width = max(hp.orig_shape[1], _STEP_WIDTH.get() or 0)
    return factor * token_budget(hp, loss.mini_batch_size, loss.mini_batch_num_tokens, width)


def _first_pass_groups(hp: HostPack, ranges, budget: int) -> list[list[tuple[int, int]]]:
    """Consecutive mini-batch ranges grouped greedily into first-pass forwards of at most ``budget``
    tokens (a mini-batch over it is a group of its own)."""
    cu = hp.cu_seqlens
    groups = []
    i = 0
    while i < len(ranges):
        j = i
        while j + 1 < len(ranges) and int(cu[ranges[j + 1][1]]) - int(cu[ranges[i][0]]) <= budget:
            j += 1
        groups.append(list(ranges[i : j + 1]))
        i = j + 1
    return groups


def _wrap_embed_minibatch(orig):
    def embed_minibatch(self, sentence_feature, begin, end, with_grad, copy_random_state, random_state=None, *args, **kwargs):
        def call(with_grad=with_grad):
            return orig(self, sentence_feature, begin, end, with_grad, copy_random_state, random_state, *args, **kwargs)

        if fast_host_pack(sentence_feature) is None:
            return call()
        if random_state is not None:  # the replay
            kept = random_state.__dict__.pop("_fastst_kept", None)
            if kept is not None and with_grad:
                return kept, random_state
            amp = random_state.__dict__.get("_fastst_autocast")
            if amp is not None:
                device_type, enabled, dtype = amp
                with torch.autocast(device_type, dtype=dtype, enabled=enabled):
                    return call()
            return call()
        keep = self.__dict__.get("_fastst_keep_first", False) if not with_grad and copy_random_state else False
        if keep:
            # The first mini-batch of the step is embedded with its autograd graph, kept for the
            # replay, which reaches it first: one forward fewer per step. "graph": replayed from its
            # CUDA graph, its activations in the graph pool, where the replay would put them anyway
            # (see _keep_first_mode); "eager": outside the pool.
            self.__dict__["_fastst_keep_first"] = False
            if keep == "graph":
                out = call(with_grad=True)
            else:
                with _graphs_off(_model_state(self)):
                    out = call(with_grad=True)
        else:
            if copy_random_state and not with_grad:
                _prepare_replay_graph(self, sentence_feature, begin, end)
            reps = None if with_grad else _first_pass_from_chunk(self, orig, sentence_feature, begin, end, args, kwargs)
            if reps is None:
                out = call()
            else:
                from sentence_transformers.base.losses.gradcache import RandContext

                out = (reps, RandContext(sentence_feature["input_ids"]) if copy_random_state else None)
        state = out[-1] if isinstance(out, tuple) and out else None
        if copy_random_state and state is not None and hasattr(state, "__dict__"):
            state.__dict__["_fastst_autocast"] = _autocast_state(sentence_feature["input_ids"].device.type)
            if keep:
                state.__dict__["_fastst_kept"] = out[0]
        return out

    embed_minibatch._fastst_wrapped = orig
    return embed_minibatch


def _graphs_possible(state) -> bool:
    """Whether the packed encoder may replay CUDA graphs for this loss's model (then every mini-batch
    of the replay is a cheap graph replay, and keeping the first one's eager graph saves nothing)."""
    from .graphs import replays_possible

    encoder = getattr(state, "encoder", None)
    if encoder is None:
        return False
    try:
        device = next(encoder.base.parameters()).device
    except StopIteration:  # pragma: no cover - a model without parameters
        return False
    return replays_possible(encoder, device)


def _prepare_replay_graph(loss, sentence_feature, begin: int, end: int) -> bool:
    """Capture, during the first pass, the with-gradient graph the replay of rows ``begin:end`` will
    want: the replay runs inside ``backward()``, where nothing may be captured (see
    ``GraphedEncoder.prepare``). Checkpointing is suspended as it is in the replay. Whether the graph
    is ready."""
    state = _model_state(loss)
    if not _graphs_possible(state):
        return False
    from . import checkpointing

    encoder = state.encoder
    hp = fast_host_pack(sentence_feature)
    device = sentence_feature["input_ids"].device
    if encoder.graphed is None:
        encoder.ensure_graphed()
    sub, _ = slice_host_pack(hp, begin, end)
    with checkpointing.suspended():
        return encoder.graphed.prepare(sub, device)


def _keep_first_setting() -> str:
    """``FASTST_CACHED_KEEP_FIRST``: ``auto`` (default), ``graph``, ``eager`` (also ``1``), ``0`` (off
    when CUDA graphs replay; without them the eager keep is always on). See ``_keep_first_mode``."""
    value = env_mode("FASTST_CACHED_KEEP_FIRST")
    if value in ("on", "eager"):
        return "eager"
    return value if value in ("off", "graph") else "auto"


def _keep_first_mode(loss, columns) -> str | bool:
    """How the first pass keeps the step's first mini-batch for the replay: False, "eager" or "graph".

    Without CUDA graphs: "eager" (one forward fewer; its activations are the one with-gradient
    mini-batch the replay would hold anyway). With graphs, "graph": the mini-batch's with-gradient
    graph replayed in the first pass, its activations left in the graph pool until the replay's
    first backward replays the backward graph — no memory beside the pool. Only when every
    mini-batch's bucket is captured beforehand (here: while the kept forward waits for its backward
    nothing may replay or capture in the pool, so the rest of the first pass runs eagerly), and,
    under ``auto``, only when the rest of the first pass runs eagerly anyway: it embeds in forwards
    over ``GRAPH_MAX_TOKENS`` tokens (no dropout; H200, bert-base, 1,024 pairs: one 82k-token forward
    for the six document mini-batches). Otherwise a small configuration would trade graphed
    no-gradient forwards for eager ones, which costs more than the forward saved. "eager" under
    graphs (opt-in) keeps the activations beside the pool: 5 % faster there, peak 4.8 -> 7.3 GB."""
    if not torch.is_grad_enabled() or (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False  # under torch.distributed, DDP expects the replay's forward/backward pairs
    state = _model_state(loss)
    if not _graphs_possible(state):
        return "eager"
    setting = _keep_first_setting()
    if setting in ("eager", "off"):
        return setting if setting == "eager" else False
    packs = [fast_host_pack(feature) for feature in columns]
    if not packs or any(hp is None for hp in packs):
        return False
    from sentence_transformers.base.losses import gradcache

    ranges = [gradcache._minibatch_ranges(f, loss.mini_batch_size, loss.mini_batch_num_tokens) for f in columns]
    if not ranges[0]:
        return False
    if setting == "auto" and not _rest_of_first_pass_is_eager(loss, state, packs, ranges):
        return False
    ready = all(_prepare_replay_graph(loss, f, b, e) for f, rs in zip(columns, ranges) for b, e in rs)
    return "graph" if ready else False


def _rest_of_first_pass_is_eager(loss, state, packs, ranges) -> bool:
    """Whether every first-pass forward after the first mini-batch is over ``GRAPH_MAX_TOKENS``
    tokens (no-gradient forwards that large never replay a graph)."""
    from .graphs import GRAPH_MAX_TOKENS, bucket_tokens

    if not _first_pass_chunks_on() or _draws_random_numbers(loss, state):
        return False
    factor = first_pass_budget_factor(state.encoder)
    if factor <= 1:
        return False
    for index, (hp, column) in enumerate(zip(packs, ranges)):
        rest = column[1:] if index == 0 else column
        for group in _first_pass_groups(hp, rest, _first_pass_budget(loss, hp, factor)):
            tokens = int(hp.cu_seqlens[group[-1][1]]) - int(hp.cu_seqlens[group[0][0]])
            if bucket_tokens(tokens) <= GRAPH_MAX_TOKENS:
                return False
    return True


def _wrap_forward_cached(orig):
    def forward_cached(self, *args, **kwargs):
        # Every column's mini-batches get the token budget of the widest column (mini_batch_size x
        # its padded width): stock's largest mini-batch, so the peak stays within stock's, while a
        # column of short queries runs as one or two large packed batches instead of many small
        # ones (H200, bert-base, 1,024 pairs: six query mini-batches of ~2k tokens each, whose
        # narrow matmuls ran at a fraction of the documents' rate).
        if args:
            args = (list(args[0]), *args[1:])
            columns = args[0]
        elif "sentence_features" in kwargs:
            kwargs["sentence_features"] = columns = list(kwargs["sentence_features"])
        else:
            columns = []
        widths = [hp.orig_shape[1] for hp in map(fast_host_pack, columns) if hp is not None]
        token = _STEP_WIDTH.set(max(widths) if widths else None)
        try:
            self.__dict__["_fastst_keep_first"] = _keep_first_mode(self, columns)
            return orig(self, *args, **kwargs)
        finally:
            _STEP_WIDTH.reset(token)
            self.__dict__.pop("_fastst_keep_first", None)

    forward_cached._fastst_wrapped = orig
    return forward_cached


def install(patches) -> None:
    """Patch Sentence Transformers' GradCache helpers (recorded in ``patches``, a PatchSet)."""
    try:
        from sentence_transformers.base.losses import gradcache
    except ImportError:  # pragma: no cover - sentence-transformers without the shared GradCache module
        logger.debug("sentence_transformers.base.losses.gradcache not found: cached losses run stock")
        return
    # Import the loss modules that copy the helpers by name, so that every copy is patched below.
    for name in (
        "sentence_transformers.base.losses.merged_forward",
        "sentence_transformers.sentence_transformer.losses.cached_multiple_negatives_ranking",
        "sentence_transformers.sentence_transformer.losses.cached_gist_embed",
        "sentence_transformers.multi_vector_encoder.losses.cached_multiple_negatives_ranking",
    ):
        try:
            __import__(name)
        except Exception as exc:  # noqa: BLE001 - optional modules of some ST versions
            logger.debug(f"{name} not importable ({exc!r}); not patched")
    originals = {
        "_create_minibatch": (getattr(gradcache, "_create_minibatch", None), _wrap_create_minibatch),
        "_minibatch_ranges": (getattr(gradcache, "_minibatch_ranges", None), _wrap_minibatch_ranges),
    }
    for attr, (orig, wrap) in originals.items():
        if orig is None:
            continue
        wrapped = wrap(orig)
        for name, module in list(sys.modules.items()):
            if module is not None and name.startswith("sentence_transformers") and module.__dict__.get(attr) is orig:
                patches.set(module, attr, wrapped)
    # The loss stage's chunking (see LOSS_CHUNK_ELEMENTS): the losses whose calculate_loss loops over
    # ``mini_batch_size`` rows of the score matrix.
    for module_name, class_name in (
        ("sentence_transformers.sentence_transformer.losses.cached_multiple_negatives_ranking", "CachedMultipleNegativesRankingLoss"),
        ("sentence_transformers.sentence_transformer.losses.cached_gist_embed", "CachedGISTEmbedLoss"),
    ):
        cls = getattr(sys.modules.get(module_name), class_name, None)
        if cls is not None and "calculate_loss" in cls.__dict__:
            patches.set(cls, "calculate_loss", _wrap_calculate_loss(cls.__dict__["calculate_loss"]))
    mixin = getattr(gradcache, "CachedLossMixin", None)
    if mixin is not None and "embed_minibatch" in mixin.__dict__:
        patches.set(mixin, "embed_minibatch", _wrap_embed_minibatch(mixin.__dict__["embed_minibatch"]))
        if "forward_cached" in mixin.__dict__:
            patches.set(mixin, "forward_cached", _wrap_forward_cached(mixin.__dict__["forward_cached"]))
