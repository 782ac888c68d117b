"""Fast inference behind the stock signatures: ``encode`` (so ``encode_query`` / ``encode_document``),
``CrossEncoder.predict`` (so ``rank``).

Why stock is slow here: per batch of ``batch_size`` texts it tokenizes (host), pads, launches a padded
forward and, for numpy output, copies the batch back (a host<->device sync), so the GPU idles while
the host tokenizes and the host idles while the GPU runs.

What runs instead (:func:`fast_call`):

1. the distinct inputs are sorted by length (shortest first, so the GPU starts at once) and
   tokenized in growing chunks on a worker thread, a few chunks ahead of the GPU: for plain text and
   text pairs straight through the fast tokenizer's Rust backend (parallel, releases the GIL, no
   padding), checked on every call against the model's own ``preprocess`` on a sample; otherwise by
   that ``preprocess`` itself (so prompts, truncation, ``processing_kwargs``, ``task`` lengths are
   always stock's);
2. on a second worker thread (so that flattening one chunk's ids in Python overlaps the Rust
   tokenization of the next) each chunk is cut into packed batches by a token budget
   (``batch_size * max_seq_length`` tokens, at most :data:`MAX_BATCH_TOKENS`: never more tokens than
   a stock batch can hold, so memory stays within stock's; short texts simply share a batch);
3. the main thread runs the packed encoder (replaying CUDA graphs per size bucket once a bucket
   recurs: budget batches and single queries alike; eagerly otherwise), pooling and the modules after
   it (or the CrossEncoder head, :mod:`fastst_plugin.heads`) and gathers the rows: on the device, or
   for CPU results copied back per chunk without blocking (the host waits for a chunk's copy only
   once the next chunk is queued): no host synchronisation per batch;
4. the stock method then runs with the results *replayed*: its ``preprocess`` returns row indices and
   its forward returns those rows of the table, so every argument (``normalize_embeddings``,
   ``truncate_dim``, ``precision``, ``convert_to_*``, ``activation_fn``, ``apply_softmax``, singular
   inputs, output order) is handled by stock's own code, whatever the sentence-transformers version.

Anything outside the fast path's cover (non-text inputs, ``output_value`` other than
``"sentence_embedding"``, multi-process pools, distributed inference, another device, model kwargs,
ColBERT-style query expansion, a left-padded CrossEncoder batch for a first-token head) runs the
stock method unchanged.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import itertools
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numpy as np
import torch

from .gil import prompt_gil_handoff
from .packing import HOST_PACK_KEY, PACKED_KEY, HostPack, host_pack, host_to_device

# A packed inference batch holds at most this many tokens: enough to keep an H100/H200 busy (larger
# batches gain little) while the activations of one batch stay small.
MAX_BATCH_TOKENS = 16384
# Texts per tokenization chunk: the first is small so the GPU starts at once, each next one four
# times larger up to CHUNK (a chunk's last, part-full batch is topped up by the next chunk). Large
# chunks because the Rust tokenizer's thread pool is far less efficient on small ones (measured on
# an H200 host, 16 cores: ~20k texts/s in calls of 512 texts vs ~60k/s in calls of 2,048 or more).
FIRST_CHUNK = 64
CHUNK = 2048
# Chunks in flight ahead of the GPU (tokenized or being tokenized / packed): bounds host memory
# (a chunk's encodings hold a few KB per text) while keeping both worker threads busy.
AHEAD = 3
# The sample check skips texts longer than this many characters per token of max_seq_length (see
# ``_sample_rows``): 16 characters per token is well past any tokenizer's truncation point (English
# runs at ~4-5 characters per token), while the check's stock preprocess stays a few milliseconds.
SAMPLE_CHARS_PER_TOKEN = 16
# Calls with at most this many distinct inputs are tokenized by stock preprocess in one piece (the
# sample checked below would be most of them anyway): no worker thread for a handful of queries.
SMALL_CALL = 64
# Direct tokenization of a chunk is split over up to this many threads, in pieces of at least
# MIN_PIECE texts (the Rust tokenizer runs them concurrently: it releases the GIL).
FANOUT_THREADS = 8
MIN_PIECE = 64
# Packed batches up to this many tokens go through the CUDA-graph path (see ``_encode_packed``)...
GRAPH_MAX_TOKENS = MAX_BATCH_TOKENS
# ... unless tokens x matrix parameters exceed this: ~8 TFLOP of matmuls, ~10-15 ms on an H100/H200,
# where the eager launches (a few ms of host time, queued ahead through pinned copies) hide behind
# the GPU and capturing would only add three warm-up forwards per bucket. Measured on an H200 with
# Qwen3-Embedding-4B (6e13 per 16k-token batch): graphed encode ran at 0.90x the flattened stock.
GRAPH_MAX_WORK = 4e12

# Inputs per batch when stock's method replays the precomputed rows (see ``fast_call``).
REPLAY_BATCH = 16384

REPLAY_KEY = "fastst_replay_rows"
_REPLAY: contextvars.ContextVar["_Replay | None"] = contextvars.ContextVar("fastst_replay", default=None)
_FEATURE_KEYS = {"input_ids", "attention_mask", "token_type_ids", HOST_PACK_KEY, "modality", "prompt_length"}


class _NotCovered(Exception):
    """Raised inside the fast path when the features are not ones it covers: stock runs instead."""


class _Replay:
    def __init__(self, index: dict, table: torch.Tensor, output_name: str):
        self.index = index
        self.table = table
        self.output_name = output_name


def input_key(x):
    """A hashable key for an input the fast path covers (a text, or a pair of texts), else None."""
    if isinstance(x, str):
        return x
    if isinstance(x, (list, tuple)) and len(x) == 2 and all(isinstance(t, str) for t in x):
        return tuple(x)
    return None


# ------------------------------------------------------------------------------ replay hooks


def replay_preprocess(inputs) -> dict | None:
    """Inside a replayed stock call: the rows of ``inputs`` in the precomputed table (else None)."""
    rep = _REPLAY.get()
    if rep is None:
        return None
    try:
        rows = [rep.index[input_key(x)] for x in inputs]
    except (KeyError, TypeError):
        return None
    return {REPLAY_KEY: rows, "modality": "text"}


def replay_forward(features) -> dict | None:
    rep = _REPLAY.get()
    rows = features.get(REPLAY_KEY) if isinstance(features, dict) else None
    if rep is None or rows is None:
        return None
    select_rows = getattr(rep.table, "select_rows", None)  # a sink's table (see fast_call)
    if select_rows is not None:
        features[rep.output_name] = select_rows(rows)
        return features
    idx = host_to_device(torch.tensor(rows, dtype=torch.long), rep.table.device)
    features[rep.output_name] = rep.table.index_select(0, idx)
    return features


@contextlib.contextmanager
def _replaying(rep: _Replay):
    token = _REPLAY.set(rep)
    try:
        yield
    finally:
        _REPLAY.reset(token)


def replay_active() -> bool:
    return _REPLAY.get() is not None


# ------------------------------------------------------------------------------ batching


def budget_batches(lengths: torch.Tensor, budget: int) -> list[tuple[int, int]]:
    """Consecutive ``[a, b)`` row ranges whose token counts sum to at most ``budget`` (a longer single
    row gets a batch of its own)."""
    out = []
    a, acc = 0, 0
    for i, n in enumerate(lengths.tolist()):
        if i > a and acc + n > budget:
            out.append((a, i))
            a, acc = i, 0
        acc += n
    if a < len(lengths):
        out.append((a, len(lengths)))
    return out


def token_budget(batch_size: int, max_len: int) -> int:
    return max(max_len, min(batch_size * max_len, MAX_BATCH_TOKENS))


def _check_features(features) -> HostPack:
    """The host pack of stock-preprocessed features the fast path covers (else ``_NotCovered``)."""
    ids, mask = features.get("input_ids"), features.get("attention_mask")
    if (
        set(features) - _FEATURE_KEYS
        or features.get("modality", "text") != "text"
        or not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.device.type != "cpu"
        or not isinstance(mask, torch.Tensor)
    ):
        raise _NotCovered("features")
    hp = features.get(HOST_PACK_KEY)
    if not (isinstance(hp, HostPack) and hp.matches(ids)):
        hp = host_pack(ids, mask, features.get("token_type_ids"))
    if hp.num_seqs and int(hp.lengths.min()) == 0:
        raise _NotCovered("a text without tokens")  # stock pools an all-padding row: leave it to stock
    return hp


def _pack_chunk(features, rows: np.ndarray, budget: int, check_hp):
    """Packing thread, stock tokenization: the model's own preprocess output cut into packed batches."""
    return _feature_batches(features, rows, budget, check_hp)


def _feature_batches(features, rows: np.ndarray, budget: int, check_hp):
    """Stock-preprocessed features (rows sorted by length) cut into packed batches by the token budget."""
    _check_features(features)
    ids, mask, tt = features["input_ids"], features["attention_mask"], features.get("token_type_ids")
    lengths = mask.sum(1)
    batches = []
    for a, b in budget_batches(lengths, budget):
        width = int(lengths[a:b].max()) if b > a else 0
        # rows of a length-sorted chunk: trim the chunk's padding columns that this batch does not use
        cols = slice(None) if mask[a:b, width:].any() else slice(0, max(width, 1))
        hp = host_pack(ids[a:b, cols], mask[a:b, cols], tt[a:b, cols] if tt is not None else None)
        if check_hp is not None and not check_hp(hp):
            raise _NotCovered("batch layout")
        batches.append((torch.from_numpy(np.asarray(rows[a:b], dtype=np.int64)), hp))
    return batches


# ------------------------------------------------------------------------------ direct tokenization
#
# Stock ``preprocess`` spends most of its time in Python: input parsing, padding every batch and
# converting lists of lists to tensors (measured on 2,048 Debian documents, one core: 1.05 s, of which
# the Rust tokenizer itself is 0.43 s, which parallelizes; the direct path below costs 0.46 s in all). For plain text and text pairs we
# call the fast tokenizer's Rust backend the way ``PreTrainedTokenizerFast`` does (same truncation,
# special tokens, no padding) and pack its ids directly. Every call checks this against stock
# ``preprocess`` on a sample (the longest inputs, which truncate, and the shortest) and uses stock's
# tokenization when anything differs.


class _DirectTokenizer:
    def __init__(self, tokenizer, max_length: int | None):
        self.tok = tokenizer
        self.backend = tokenizer._tokenizer
        self.max_length = max_length
        self.encode = getattr(self.backend, "encode_batch_fast", None) or self.backend.encode_batch

    @classmethod
    def for_call(cls, transformer, kwargs: dict):
        """None when this call's tokenization is not plain (chat templates, processor overrides, ...)."""
        tok = getattr(transformer, "tokenizer", None)
        backend = getattr(tok, "_tokenizer", None)
        if tok is None or backend is None or type(backend).__name__ != "Tokenizer" or tok is not getattr(transformer, "processor", tok):
            return None
        if "message" in (getattr(transformer, "modality_config", None) or {}) or kwargs.get("processing_kwargs"):
            return None
        if getattr(transformer, "do_lower_case", False):
            return None  # stock lowercases through the tokenizer wrapper's settings
        module_kwargs = getattr(transformer, "processing_kwargs", None) or {}
        if any(module_kwargs.get(k) for k in ("text", "common", "chat_template")):
            return None
        if kwargs.get("max_length") is not None:
            max_length = kwargs["max_length"]
        elif kwargs.get("task") == "query" and getattr(transformer, "query_length", None):
            max_length = transformer.query_length
        elif kwargs.get("task") == "document" and getattr(transformer, "document_length", None):
            max_length = transformer.document_length
        else:
            max_length = tok.model_max_length
        if max_length is not None and max_length > 10**8:  # "no limit" sentinel: stock does not truncate
            max_length = None
        return cls(tok, max_length)

    def __call__(self, items: list, prompt, pool: ThreadPoolExecutor | None = None) -> list:
        if prompt:  # as stock's prepend_prompt_to_texts: before the text, or the first text of a pair
            items = [prompt + x if isinstance(x, str) else (prompt + x[0], x[1]) for x in items]
        else:
            items = [x if isinstance(x, str) else tuple(x) for x in items]
        backend = self.backend
        old_trunc, old_pad, old_special = backend.truncation, backend.padding, backend.encode_special_tokens
        try:
            if self.max_length is None:
                backend.no_truncation()
            else:
                backend.enable_truncation(self.max_length, stride=0, strategy="longest_first", direction=self.tok.truncation_side)
            backend.no_padding()
            backend.encode_special_tokens = bool(getattr(self.tok, "split_special_tokens", False))
            pieces = _pieces(len(items), pool)
            if len(pieces) == 1:
                return self.encode(items, add_special_tokens=True)
            # The Rust call releases the GIL: pieces encode concurrently even where the tokenizer's own
            # thread pool is off (TOKENIZERS_PARALLELISM=false, or after a fork); with it on they share it.
            parts = pool.map(lambda ab: self.encode(items[ab[0] : ab[1]], add_special_tokens=True), pieces)
            return [e for part in parts for e in part]
        finally:  # leave the backend as the HF wrapper left it (it re-applies its settings per call anyway)
            if old_trunc is None:
                backend.no_truncation()
            else:
                backend.enable_truncation(**{k: old_trunc[k] for k in ("max_length", "stride", "strategy", "direction") if k in old_trunc})
            if old_pad is not None:
                backend.enable_padding(**old_pad)
            backend.encode_special_tokens = old_special


def _pieces(n: int, pool) -> list[tuple[int, int]]:
    """Contiguous ranges of at least ``MIN_PIECE`` items, one per fan-out thread."""
    k = 1 if pool is None else max(1, min(getattr(pool, "_max_workers", 1), n // MIN_PIECE))
    bounds = [round(i * n / k) for i in range(k + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def _tokenizer_parallel() -> bool:
    """Whether the Rust tokenizer spreads one batch call over its own thread pool: on unless
    ``TOKENIZERS_PARALLELISM`` says otherwise (the library itself sets it to false in a process
    forked after it had used the pool, e.g. a DataLoader worker)."""
    value = os.environ.get("TOKENIZERS_PARALLELISM")
    return value is None or value.strip().lower() not in ("0", "false", "no", "off", "")


def _fanout_threads() -> int:
    """Threads to split a chunk's direct tokenization over: one when the tokenizer's own pool is on
    (measured on an H200 host, 6,000 documents: 96 ms in one call; 8 threads on top of the pool
    added nothing and once took 445 ms), else up to ``FANOUT_THREADS``."""
    if _tokenizer_parallel():
        return 1
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(FANOUT_THREADS, cpus))


class _Flat:
    """Token ids of many texts, concatenated (numpy), with the per-text lengths and offsets."""

    def __init__(self, encodings, with_token_types: bool, single_texts: bool = False):
        # Lengths from the Rust side (``len(encoding)``), then every id list converted and consumed
        # one at a time: ~45 % faster than materializing all the lists first (6,000 Debian documents:
        # 43 vs 78 ms), the Python conversion being the cost.
        self.lengths = np.fromiter(map(len, encodings), dtype=np.int64, count=len(encodings))
        self.cu = np.zeros(len(encodings) + 1, dtype=np.int64)
        np.cumsum(self.lengths, out=self.cu[1:])
        total = int(self.cu[-1])
        self.ids = np.fromiter(itertools.chain.from_iterable(e.ids for e in encodings), dtype=np.int64, count=total)
        self.tt = None
        if with_token_types and single_texts:
            # A single text's segment ids are all 0 in every tokenizer we know (BERT's template:
            # "[CLS]:0 $A:0 [SEP]:0"); reading them back from Rust is ~40 % of this conversion. The
            # per-call sample check compares them with stock's, so a tokenizer that differs gets
            # stock's tokenization instead.
            self.tt = np.zeros(total, dtype=np.int64)
        elif with_token_types:
            self.tt = np.fromiter(itertools.chain.from_iterable(e.type_ids for e in encodings), dtype=np.int64, count=total)

    def pack(self, a: int, b: int) -> HostPack:
        """The texts ``[a, b)`` as a HostPack (a right-padded ``[n, max_len]`` virtual layout)."""
        lengths = self.lengths[a:b]
        s, e = int(self.cu[a]), int(self.cu[b])
        cu = self.cu[a : b + 1] - s
        n = b - a
        seq = np.repeat(np.arange(n, dtype=np.int64), lengths)
        pos = np.arange(e - s, dtype=np.int64) - cu[:-1][seq]
        max_len = int(lengths.max()) if n else 0
        index = torch.from_numpy(seq * max_len + pos)
        return HostPack(
            input_ids=torch.from_numpy(self.ids[s:e].copy()),
            position_ids=torch.from_numpy(pos),
            token_type_ids=torch.from_numpy(self.tt[s:e].copy()) if self.tt is not None else None,
            cu_seqlens=torch.from_numpy(cu.astype(np.int32)),
            seq_idx=torch.from_numpy(seq),
            orig_index=index,
            pad_index=index,
            lengths=torch.from_numpy(lengths.copy()),
            max_seqlen=max_len,
            orig_shape=(n, max_len),
        )


def _direct_chunk(encodings: list, rows: np.ndarray, with_tt: bool, single_texts: bool, budget: int, hold_last: bool = False):
    """Packing thread, direct tokenization: the Rust backend's encodings -> flat ids -> packed batches.

    Returns ``(batches, held)``. With ``hold_last`` the last batch (usually part-full) is not packed
    but handed back as ``held = (encodings, rows)``, to be topped up with the next chunk's texts:
    chunk boundaries then cost no part-full batches (each one a launch and often a graph bucket of
    its own)."""
    flat = _Flat(encodings, with_tt, single_texts)
    if len(encodings) and int(flat.lengths.min()) == 0:
        raise _NotCovered("a text without tokens")
    ranges = budget_batches(torch.from_numpy(flat.lengths), budget)
    held = ([], rows[:0])
    if hold_last and ranges:
        a, b = ranges.pop()
        held = (list(encodings[a:b]), rows[a:b])
    return [(torch.from_numpy(rows[a:b].astype(np.int64)), flat.pack(a, b)) for a, b in ranges], held


# Training batches (the trainer's collator calling preprocess) of at least this many texts are
# tokenized directly; smaller calls cost about as much as the check below.
DIRECT_PREPROCESS_MIN = 16
_ROW_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def direct_preprocess(transformer, stock_preprocess, inputs, kwargs: dict, memo: dict) -> dict | None:
    """The Transformer module's ``preprocess`` features for a list of texts, from the Rust backend's
    encodings instead of the Hugging Face wrapper (whose Python padding and tensor conversion was
    ~3/4 of a training batch's collation: 128 Debian pairs at 256 tokens, ~35 of ~45 ms). ``None``
    when the call is not covered: stock's preprocess then runs as usual.

    Checked on every call: stock's preprocess runs on the longest, the shortest, the first and the
    last text, and its features must equal those rows here exactly (ids, mask, token types, padding
    side and length, dtypes); every other key is taken from stock's output. A mismatch turns the
    direct path off for this module (``memo``) and the call returns stock's features."""
    if memo.get("off") or len(inputs) < DIRECT_PREPROCESS_MIN or not all(isinstance(x, str) for x in inputs):
        return None
    if set(kwargs) - {"prompt", "task", "max_length"}:
        return None
    prompt = kwargs.get("prompt")
    tokenize = _DirectTokenizer.for_call(transformer, kwargs)
    pad_id = getattr(getattr(tokenize, "tok", None), "pad_token_id", None)
    if tokenize is None or pad_id is None:
        return None
    try:
        flat = _Flat(tokenize(list(inputs), prompt), with_token_types=False)
    except Exception:  # any surprise in the backend call: stock tokenization
        return None
    lengths = flat.lengths
    n = len(inputs)
    if int(lengths.min()) == 0:
        return None
    width = int(lengths.max())
    seq = np.repeat(np.arange(n, dtype=np.int64), lengths)
    col = np.arange(int(flat.cu[-1]), dtype=np.int64) - flat.cu[:-1][seq]
    if tokenize.tok.padding_side == "left":
        col += (width - lengths)[seq]
    ids = np.full((n, width), pad_id, dtype=np.int64)
    ids[seq, col] = flat.ids
    mask = np.zeros((n, width), dtype=np.int64)
    mask[seq, col] = 1
    mine = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
    mine["token_type_ids"] = torch.zeros_like(mine["input_ids"])  # one text per row: segment 0 (checked)

    rows = list(dict.fromkeys([int(lengths.argmax()), int(lengths.argmin()), 0, n - 1]))
    ref = stock_preprocess([inputs[i] for i in rows], **kwargs)
    out = {}
    for key, value in ref.items():
        if key in _ROW_KEYS:
            got = mine[key]
            if not (isinstance(value, torch.Tensor) and value.dtype == got.dtype and torch.equal(value, got[rows])):
                memo["off"] = True
                from .log import logger

                logger.debug(f"direct tokenization differs from stock preprocess in {key!r}: stock's from now on")
                return None
            out[key] = got
        elif isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == len(rows) and len(rows) > 1:
            return None  # a per-row feature this path does not make
        else:
            out[key] = value  # per-call values (modality, prompt_length)
    return out


def _all_single(items: list) -> bool:
    return all(isinstance(x, str) for x in items)


def _same_tokens(a: HostPack, b: HostPack, with_tt: bool) -> bool:
    if not (torch.equal(a.lengths, b.lengths) and torch.equal(a.input_ids, b.input_ids)):
        return False
    if with_tt:
        return a.token_type_ids is not None and b.token_type_ids is not None and torch.equal(a.token_type_ids, b.token_type_ids)
    return True


def fast_call(
    model,
    stock: Callable,
    args: tuple,
    kwargs: dict,
    *,
    state,
    transformer,
    run_batch: Callable,
    output_name: str,
    to_cpu: Callable[[inspect.BoundArguments], bool],
    covered: Callable[[inspect.BoundArguments], bool],
    check_hp=None,
    finish: Callable | None = None,
    sink: Callable | None = None,
    replay_batch: int | None = REPLAY_BATCH,
):
    """Run ``stock(*args, **kwargs)`` with its model outputs computed by the packed pipeline.

    ``run_batch(hp, prompt_length) -> [n, ...]`` computes one packed batch's rows; ``covered(bound)``
    says whether these arguments are within the fast path; ``to_cpu(bound)`` whether stock copies
    the results to the CPU anyway (then they come back chunk by chunk, see ``_run_batches``).
    ``finish(model, bound, table, item_rows, singular)`` may return the call's result from the rows
    directly (:func:`finish_encode`), or ``NotImplemented`` to let stock's method replay them.
    ``sink(n_rows)``, when given, gathers the rows instead of a dense table (``add(rows, out)`` per
    batch, ``finish()``, then ``select_rows(rows)`` for the replay: see
    :class:`fastst_plugin.sparse.SparseRows`). The replay runs in batches of ``replay_batch`` inputs
    (at least stock's ``batch_size``), or of stock's ``batch_size`` when None.
    """
    if _REPLAY.get() is not None:
        return stock(*args, **kwargs)
    try:
        bound = inspect.signature(stock).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return stock(*args, **kwargs)  # stock raises its own error (or maps a deprecated name)
    bound.apply_defaults()
    params = bound.arguments
    inputs = params.get("inputs", params.get("sentences"))
    if inputs is None:
        return stock(*args, **kwargs)
    if isinstance(inputs, np.ndarray):
        inputs = inputs.tolist()
    if not isinstance(inputs, (list, str, tuple)) and not hasattr(inputs, "__len__"):
        return stock(*args, **kwargs)  # an iterator: stock materializes it; we would consume it
    singular = getattr(model, "is_singular_input", None) is not None and model.is_singular_input(inputs)
    if singular:
        items = [inputs]
    else:
        items = list(inputs)
        # stock gets the materialized list (e.g. a datasets Column would otherwise be re-read)
        name = "inputs" if "inputs" in params else "sentences"
        bound.arguments[name] = items
    if not items or not covered(bound):
        return stock(*bound.args, **bound.kwargs)
    index: dict = {}
    unique: list = []
    item_rows: list[int] = []  # each input's row in the table
    for x in items:
        key = input_key(x)
        if key is None:
            return stock(*bound.args, **bound.kwargs)
        row = index.get(key)
        if row is None:
            row = index[key] = len(unique)
            unique.append(x)
        item_rows.append(row)
    extra = dict(params.get("kwargs", {}))
    prompt = params.get("prompt")
    if prompt is None:  # (stock warns when both are given; resolving only the name keeps that single)
        prompt = model._resolve_prompt(None, params.get("prompt_name"))
    batch_size = int(params.get("batch_size", 32) or 32)
    max_len = _max_len(transformer, state)
    budget = token_budget(max(batch_size, 1), max_len)
    try:
        table = _compute(
            model, transformer, unique, prompt, extra, budget, max_len, run_batch, check_hp, to_cpu(bound),
            sink=sink(len(unique)) if sink is not None else None,
        )
    except _NotCovered:
        return stock(*bound.args, **bound.kwargs)
    if finish is not None:
        result = finish(model, bound, table, item_rows, singular)
        if result is not NotImplemented:
            return result
    if "batch_size" in bound.arguments and replay_batch is not None:
        # The replay only looks rows up, so its batches may be large: stock's per-batch Python
        # (preprocess, forward, normalize, the copy to the CPU) then runs a few times instead of
        # once per ``batch_size`` inputs (measured: ~50 ms of a 475 ms bert-base call of 6,000
        # documents). Results do not depend on it: each row is computed on its own either way.
        bound.arguments["batch_size"] = max(batch_size, min(len(items), replay_batch))
    with _replaying(_Replay(index, table, output_name)):
        return stock(*bound.args, **bound.kwargs)


def finish_encode(model, bound: inspect.BoundArguments, table: torch.Tensor, item_rows: list, singular: bool):
    """``SentenceTransformer.encode``'s own post-processing of the rows, without its per-row Python.

    Stock's loop, replayed over precomputed rows, still unbinds, reorders and converts every row on
    its own (measured on an H200 host: ~50 ms of a 475 ms call of 6,000 documents). For the arguments
    whose handling is plain this does the same in whole-table operations, as sentence-transformers
    6.x does it: truncate to ``truncate_dim`` (argument, else the model's), L2-normalize when asked,
    then a tensor on the model's device (``convert_to_tensor``), a numpy array (bf16 upcast to
    float32, other dtypes kept), or a list of row tensors; a singular input gives its row. Anything
    else (a ``precision`` other than float32, a progress bar, a non-positive ``batch_size``) returns
    ``NotImplemented``: stock's method replays the rows and handles it."""
    import logging

    from sentence_transformers import SentenceTransformer

    if getattr(type(model), "encode", None) is not SentenceTransformer.encode:
        return NotImplemented  # a subclass with its own encode: its code handles the rows
    a = bound.arguments
    if a.get("output_value", "sentence_embedding") != "sentence_embedding" or a.get("precision", "float32") not in (None, "float32"):
        return NotImplemented
    batch_size = a.get("batch_size", 32)
    if not isinstance(batch_size, int) or batch_size <= 0:
        return NotImplemented  # stock raises its own error
    show = a.get("show_progress_bar")
    if show is None:  # stock's rule: a bar when its module logs at INFO or DEBUG
        module = getattr(type(model).encode, "__module__", "sentence_transformers")
        show = logging.getLogger(module).getEffectiveLevel() in (logging.INFO, logging.DEBUG)
    if show:
        return NotImplemented
    from sentence_transformers.util import truncate_embeddings

    model._resolve_prompt(a.get("prompt"), a.get("prompt_name"))  # stock's warning when both are given
    truncate_dim = a.get("truncate_dim")
    if truncate_dim is None:
        truncate_dim = getattr(model, "truncate_dim", None)
    convert_to_tensor = bool(a.get("convert_to_tensor", False))
    convert_to_numpy = bool(a.get("convert_to_numpy", True)) and not convert_to_tensor
    with torch.inference_mode():
        rows = torch.as_tensor(item_rows, dtype=torch.long)
        emb = table.index_select(0, host_to_device(rows, table.device))
        if truncate_dim is not None:
            emb = truncate_embeddings(emb, truncate_dim)
        if a.get("normalize_embeddings", False):
            emb = torch.nn.functional.normalize(emb, p=2, dim=1)
        if convert_to_tensor:
            out = emb.contiguous()
        elif convert_to_numpy:
            emb = emb.cpu()
            out = (emb.float() if emb.dtype == torch.bfloat16 else emb).contiguous().numpy()
        else:
            out = list(emb)
    return out[0] if singular else out


def _max_len(transformer, state) -> int:
    """The longest tokenized text: ``max_seq_length``, or the model's positions when that is unset or
    the tokenizer's "no limit" sentinel."""
    limit = getattr(transformer, "max_seq_length", None)
    if not limit or limit > 10**6:
        limit = getattr(state.encoder.config, "max_position_embeddings", None) or 512
    return int(limit)


def _input_length(model) -> Callable:
    """Stock's own length estimate of an input (characters), or the same computed here."""
    length = getattr(model, "_input_length", None)
    if length is None:  # pragma: no cover - an ST without it
        length = lambda x: len(x) if isinstance(x, str) else sum(map(len, x))  # noqa: E731
    return length


def _length_order(model, unique: list) -> np.ndarray:
    """Longest first, by stock's own length estimate."""
    length = _input_length(model)
    return np.argsort(np.array([-length(x) for x in unique], dtype=np.int64), kind="stable")


def _sample_rows(model, unique: list, order: np.ndarray, max_len: int) -> list:
    """The inputs the direct tokenization is checked on: the four longest (they truncate) and the
    four shortest. "Longest" skips texts over ``SAMPLE_CHARS_PER_TOKEN * max_len`` characters: they
    truncate like any text over the limit, but tokenizing one costs its full length (the Debian
    corpus has an 80,000-character description: ~45 ms of stock preprocess on an H200 host, paid
    before the first batch can start)."""
    length = _input_length(model)
    cap = SAMPLE_CHARS_PER_TOKEN * max_len
    long_rows = []
    for i in order.tolist():
        if length(unique[i]) <= cap:
            long_rows.append(i)
            if len(long_rows) == 4:
                break
    return list(dict.fromkeys([*long_rows, *order[-4:].tolist()]))


def _compute(model, transformer, unique: list, prompt, kwargs: dict, budget: int, max_len: int, run_batch, check_hp, to_cpu: bool, sink=None) -> torch.Tensor:
    stock_preprocess = type(model).preprocess.__get__(model)
    order = _length_order(model, unique)

    # Stock preprocess on a sample: the feature layout this call produces (token types, prompt length,
    # padding side), and the reference the direct tokenization must reproduce. A small call is all
    # sample: its stock features are the whole tokenization (no thread, no second pass).
    small = len(order) <= SMALL_CALL
    sample_rows = order.tolist() if small else _sample_rows(model, unique, order, max_len)
    sample = [unique[i] for i in sample_rows]
    features = stock_preprocess(sample, prompt=prompt, **kwargs)
    sample_hp = _check_features(features)
    if check_hp is not None and not check_hp(sample_hp):
        raise _NotCovered("batch layout")
    prompt_length = features.get("prompt_length")
    if small:
        return _run_batches(model, len(unique), [_feature_batches(features, order, budget, check_hp)], run_batch, prompt_length, to_cpu, sink)
    with_tt = "token_type_ids" in features
    tokenize = _DirectTokenizer.for_call(transformer, kwargs)
    if tokenize is not None:
        try:
            direct = _Flat(tokenize(sample, prompt), with_tt, _all_single(sample)).pack(0, len(sample))
            if not _same_tokens(direct, sample_hp, with_tt):
                tokenize = None
        except Exception:  # any surprise in the backend call: stock tokenization
            tokenize = None
        if tokenize is None:
            from .log import logger

            logger.debug("fast inference: direct tokenization differs from stock preprocess here; using stock's")

    # Shortest texts first: the first chunk tokenizes in well under a millisecond, so the GPU starts
    # almost at once; the long texts (whose tokenization costs their whole length, truncated or not)
    # are tokenized while the GPU works on the short ones. (Batches are cut by tokens either way.)
    chunks = _chunks(order[::-1].copy())
    threads = _fanout_threads() if tokenize is not None and len(order) >= 2 * MIN_PIECE else 1
    with prompt_gil_handoff(), _ChunkPipeline(chunks, threads) as pipe:
        if tokenize is not None:
            single = _all_single(unique)
            held: tuple = ([], order[:0])  # texts of the previous chunk's last, part-full batch

            def encode(chunk):
                return tokenize([unique[i] for i in chunk], prompt, pipe.fanout)

            def pack(chunk, encodings, last):
                nonlocal held
                if len(held[1]):
                    encodings, chunk = held[0] + list(encodings), np.concatenate([held[1], chunk])
                batches, held = _direct_chunk(encodings, chunk, with_tt, single, budget, hold_last=not last)
                return batches
        else:

            def encode(chunk):
                return stock_preprocess([unique[i] for i in chunk], prompt=prompt, **kwargs)

            def pack(chunk, features, last):
                return _pack_chunk(features, chunk, budget, check_hp)

        return _run_batches(model, len(unique), pipe.results(encode, pack), run_batch, prompt_length, to_cpu, sink)


def _chunks(rows: np.ndarray) -> list[np.ndarray]:
    """``rows`` cut into tokenization chunks of FIRST_CHUNK texts, then four times more each, up to CHUNK."""
    chunks, a, size = [], 0, max(1, FIRST_CHUNK)
    while a < len(rows):
        chunks.append(rows[a : a + size])
        a += size
        size = min(size * 4, max(1, CHUNK))
    return chunks


class _ChunkPipeline:
    """Tokenization and packing of consecutive chunks on two worker threads, ahead of the GPU.

    Stage 1 tokenizes a chunk (the Rust backend releases the GIL, so it overlaps everything else),
    stage 2 turns the previous chunk's encodings into packed batches (Python, holds the GIL), and the
    calling thread launches the batches before that. At most ``AHEAD`` chunks are in flight.
    Leaving the ``with`` block cancels what has not started and waits for what has (an exception
    or an early stop must not leave a thread tokenizing behind the caller's back)."""

    def __init__(self, chunks: list, fanout_threads: int = 1):
        self.chunks = chunks
        self.tokenizing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastst-tokenize")
        self.packing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastst-pack")
        # Direct tokenization split over several calls (see _fanout_threads), else None.
        self.fanout = ThreadPoolExecutor(max_workers=fanout_threads, thread_name_prefix="fastst-tokenize-piece") if fanout_threads > 1 else None

    def results(self, encode: Callable, pack: Callable):
        """``pack(chunk, encode(chunk), is_last_chunk)`` for every chunk, in order."""
        pending: list = []

        def submit(k: int):
            chunk, last = self.chunks[k], k == len(self.chunks) - 1
            encoded = self.tokenizing.submit(encode, chunk)
            pending.append(self.packing.submit(lambda: pack(chunk, encoded.result(), last)))

        for k in range(min(AHEAD, len(self.chunks))):
            submit(k)
        for k in range(len(self.chunks)):
            batches = pending[k].result()
            pending[k] = None
            if k + AHEAD < len(self.chunks):
                submit(k + AHEAD)
            yield batches

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        # Not-started tokenization first (a packing task waiting on it then fails at once), then
        # the packing thread, then whatever tokenization was running.
        self.tokenizing.shutdown(wait=False, cancel_futures=True)
        self.packing.shutdown(wait=True, cancel_futures=True)
        self.tokenizing.shutdown(wait=True)
        if self.fanout is not None:
            self.fanout.shutdown(wait=True)
        return False


def _run_batches(model, n_rows: int, batch_lists, run_batch, prompt_length, to_cpu: bool, sink=None) -> torch.Tensor:
    """Runs every packed batch and gathers the rows into one ``[n_rows, ...]`` table, asynchronously.

    On the device's side nothing waits for the GPU. Results wanted on the CPU travel back one chunk
    at a time (non-blocking copies into pinned buffers, checked one chunk later, when the GPU is
    busy with the next chunk), so device memory holds one chunk's rows, not the whole corpus'.
    A ``sink`` (see ``fast_call``) gathers the rows itself and is returned in the table's place.
    """
    device = model.device
    model.eval()
    if sink is not None:
        with torch.inference_mode():
            for batches in batch_lists:
                for rows, hp in batches:
                    sink.add(rows, run_batch(hp, prompt_length))
            return sink.finish()
    # (other accelerators: the table stays on the device and stock copies each batch back)
    on_device = not (to_cpu and _copies_back_async(device))
    table = None
    in_flight = None  # (rows, pinned buffer, event) of the previous chunk's copy back

    def land(item):
        nonlocal table
        rows, buf, event = item
        event.synchronize()
        if table is None:
            table = torch.empty((n_rows,) + tuple(buf.shape[1:]), dtype=buf.dtype)
        table.index_copy_(0, rows, buf)

    with torch.inference_mode():
        for batches in batch_lists:
            outs, row_parts = [], []
            for rows, hp in batches:
                out = run_batch(hp, prompt_length)
                if on_device:
                    if table is None:
                        table = out.new_empty((n_rows,) + tuple(out.shape[1:]))
                    table.index_copy_(0, host_to_device(rows, device), out)
                else:
                    outs.append(out)
                    row_parts.append(rows)
            if on_device or not outs:
                continue
            chunk = torch.cat(outs) if len(outs) > 1 else outs[0]
            buf = _pinned_empty(chunk.shape, chunk.dtype)
            buf.copy_(chunk, non_blocking=True)
            event = _record_event()
            if in_flight is not None:
                land(in_flight)
            in_flight = (torch.cat(row_parts), buf, event)
        if in_flight is not None:
            land(in_flight)
    return table


def _copies_back_async(device) -> bool:
    return device.type == "cuda"


def _pinned_empty(shape, dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, pin_memory=True)


def _record_event():
    event = torch.cuda.Event()
    event.record()
    return event


# ------------------------------------------------------------------------------ per-model runners


def _encode_packed(encoder, hp: HostPack):
    """Hidden states of one packed batch, replayed from a CUDA graph once its size bucket keeps
    coming back (:mod:`fastst_plugin.graphs`), else eagerly.

    Even full token-budget batches are launch-bound in eager mode: measured on an H200 (bert-base,
    6,000 Debian documents at 512 tokens), the eager pass launched ~7,300 kernels for 241 ms of GPU
    work and took 566 ms. Budget batches fall into one or two token buckets (the budget less at most
    one text), and a no-gradient graph keeps only its output and one layer's transients in its
    pool, so the capture (three forwards per bucket, once per model) pays back within a call."""
    device = next(iter(encoder.base.parameters())).device
    tokens = int(hp.cu_seqlens[-1])
    if tokens <= GRAPH_MAX_TOKENS and tokens * _matmul_params(encoder) <= GRAPH_MAX_WORK:
        return encoder.run_host(hp, device)
    p = hp.to_device(device)
    return encoder.forward_eager(p), p


def _matmul_params(encoder) -> int:
    """Parameters the encoder multiplies each token by (matrices, less the embedding tables)."""
    n = getattr(encoder, "_fastst_matmul_params", None)
    if n is None:
        tables = {id(m.weight) for m in encoder.base.modules() if isinstance(m, torch.nn.Embedding)}
        n = sum(p.numel() for p in encoder.base.parameters() if p.dim() == 2 and id(p) not in tables)
        encoder._fastst_matmul_params = n
    return n


def embedding_runner(encoder, followers: list) -> Callable:
    """``run_batch`` for a SentenceTransformer: packed encoder -> Pooling (packed) -> Dense/Normalize..."""

    def run(hp: HostPack, prompt_length):
        hidden, packed = _encode_packed(encoder, hp)
        feats: dict[str, Any] = {"token_embeddings": hidden, PACKED_KEY: packed}
        if prompt_length is not None:
            feats["prompt_length"] = prompt_length
        for module in followers:
            feats = module(feats)
        return feats["sentence_embedding"]

    return run


def head_runner(encoder, head) -> Callable:
    """``run_batch`` for a CrossEncoder: packed encoder -> sequence-classification head -> logits."""

    def run(hp: HostPack, prompt_length):
        hidden, packed = _encode_packed(encoder, hp)
        return head(hidden, packed)

    return run


def same_device(model, device) -> bool:
    if device is None:
        return True
    if isinstance(device, (list, tuple)):
        return False
    try:
        want = torch.device(device)
    except (TypeError, RuntimeError):
        return False
    have = model.device
    if want.type != have.type:
        return False
    if want.type == "cuda":
        want_index = want.index if want.index is not None else torch.cuda.current_device()
        return want_index == (have.index if have.index is not None else torch.cuda.current_device())
    return True
