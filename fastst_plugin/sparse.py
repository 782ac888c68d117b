"""SparseEncoder (SPLADE) on packed rows: the MLM head and ``SpladePooling`` without padding.

A SPLADE model is a ``Transformer`` module wrapping an HF ``*ForMaskedLM`` model (its output, the MLM
logits ``[B, L, vocab]``, is what sentence-transformers names ``token_embeddings``) followed by
``SpladePooling``: ``log1p(relu(logits))`` (``log1p`` twice for ``"log1p_relu"``), masked, then the max
(or sum) over each text's tokens. Stock computes the vocabulary projection for every padding position
and keeps several ``[B, L, vocab]`` tensors alive (30522 columns: 125 KB per token in fp32).

Here the backbone runs packed (:class:`~fastst_plugin.backbones.encoder.PackedEncoder`, ``[T, hidden]``
for the real tokens only) and :class:`PackedSpladeHead` replaces the logits + pooling with a
token-chunked computation that never holds more than one chunk of logits:

* an :class:`MLMHeadSpec` says, per architecture, which of the task model's own modules transform
  every token's hidden state and which module is the vocabulary projection (the decoder, whose
  weight is tied to the word embeddings). Nothing is copied: the modules are resolved at every call,
  so peft LoRA layers (``lora=True`` puts adapters on ``cls.predictions.transform.dense`` too),
  ``modules_to_save`` copies and state-dict keys stay what stock uses;
* max pooling uses that ``log1p(relu(.))`` is monotone: the pooled value is the activation of each
  text's largest logit, so only a running max ``[texts, vocab]`` is kept. Its gradient goes to the
  first token holding that max, as ``torch.max`` in stock (where the max is <= 0 the activation's
  gradient is zero anyway, and so is stock's);
* with gradients and a plain ``nn.Linear`` decoder, :class:`_LinearSegmentMax` /
  :class:`_LinearSegmentSum` do the projection, the reduction and their backward chunk by chunk
  (the sum recomputes a chunk's logits in the backward instead of storing them). Any other decoder
  (a LoRA or quantized layer) runs its own forward over all tokens with plain autograd:
  :func:`splade_pool_reference`, which is also the torch reference the tests compare against.

Pooling options the packed path does not know (a future ``SpladePooling`` strategy or activation)
fall back to stock's own ``SpladePooling.forward`` on re-padded logits, with one warning.

Inference (:meth:`SparseEncoder.encode`, so ``encode_query`` / ``encode_document``) goes through
:mod:`fastst_plugin.inference` like dense models; the rows are gathered in :class:`SparseRows` (their
non-zero entries only: a dense table of a large corpus at vocab width would not fit where stock's
sparse rows do). :func:`finish_sparse_encode` builds stock's result from them in whole-table
operations (``max_active_dims`` by stock's own function); for the arguments it leaves alone, stock's
``encode`` replays the rows at its own batch size.

Measured on an H200 (``tests/gpu/sparse_checks.py``, random bert-base-sized SPLADE, bf16, 2,000 Debian
documents at max_seq_length 256): ``encode`` 5.9x stock at batch_size 32, 4.1x at 128 (a bias-shifted
copy with ~200 active dimensions per document); a fp32 SpladeLoss step on 32 pairs 1.8x with a third
of stock's peak memory; a bf16 LoRA step on 64 pairs 1.4x in 1.8 GB instead of 13 GB.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .heads import _resolve_step, _unwrap_peft
from .log import warn_once
from .packing import host_to_device

# A step naming a function of the HF model's own modeling module rather than one of its modules
# (RoBERTa's LM head calls ``gelu(x)``): ``"fn:gelu"`` is ``modeling_roberta.gelu``, stock's own object.
FUNCTION_PREFIX = "fn:"

# Logit elements (tokens x vocab) per chunk: 2^26 is ~2,200 tokens at BERT's 30,522 columns, 256 MB
# in fp32; with gradients half that, as the arg-max bookkeeping adds about two more such tensors.
INFERENCE_CHUNK_ELEMENTS = 1 << 26
TRAINING_CHUNK_ELEMENTS = 1 << 25

STRATEGIES = ("max", "sum")
ACTIVATIONS = ("relu", "log1p_relu")


@dataclass(frozen=True)
class MLMHeadSpec:
    name: str
    architectures: tuple[str, ...]  # HF class names (type(model).__name__) this head describes
    transform: tuple[str, ...]  # applied to every token's hidden state, in order
    decoder: str  # the vocabulary projection


# BertForMaskedLM: cls.predictions.transform (dense -> act -> LayerNorm) -> cls.predictions.decoder
# (weight tied to the word embeddings, bias tied to cls.predictions.bias).
BERT_MLM_HEAD = MLMHeadSpec(
    name="bert-mlm-head",
    architectures=("BertForMaskedLM",),
    transform=("cls.predictions.transform",),
    decoder="cls.predictions.decoder",
)

# RobertaLMHead (RoBERTa, XLM-R, CamemBERT): dense -> gelu (the function) -> layer_norm -> decoder.
ROBERTA_MLM_HEAD = MLMHeadSpec(
    name="roberta-lm-head",
    architectures=("RobertaForMaskedLM", "XLMRobertaForMaskedLM", "CamembertForMaskedLM"),
    transform=("lm_head.dense", FUNCTION_PREFIX + "gelu", "lm_head.layer_norm"),
    decoder="lm_head.decoder",
)

# ModernBertForMaskedLM: head (dense -> act -> norm) -> decoder.
MODERNBERT_MLM_HEAD = MLMHeadSpec(
    name="modernbert-mlm-head",
    architectures=("ModernBertForMaskedLM",),
    transform=("head",),
    decoder="decoder",
)

MLM_HEADS: list[MLMHeadSpec] = [BERT_MLM_HEAD, ROBERTA_MLM_HEAD, MODERNBERT_MLM_HEAD]


def _resolve(model, step: str):
    if step.startswith(FUNCTION_PREFIX):
        return getattr(sys.modules[type(model).__module__], step[len(FUNCTION_PREFIX) :])
    return _resolve_step(model, step)


def find_mlm_head(hf_model) -> MLMHeadSpec | None:
    """The MLM head description for an HF ``*ForMaskedLM`` model, or None (then it runs stock)."""
    model = _unwrap_peft(hf_model)
    name = type(model).__name__
    for spec in MLM_HEADS:
        if name in spec.architectures:
            try:
                for step in (*spec.transform, spec.decoder):
                    _resolve(model, step)
                if not isinstance(_resolve(model, spec.decoder), nn.Module):
                    return None
            except (AttributeError, IndexError, KeyError):
                return None  # a variant of the class without the modules we expect: stay stock
            return spec
    return None


def splade_pooling_class():
    try:
        from sentence_transformers.sparse_encoder.modules import SpladePooling
    except ImportError:  # pragma: no cover - sentence-transformers without SparseEncoder
        return None
    return SpladePooling


def find_sparse_head(transformer, followers) -> tuple["PackedSpladeHead | None", str]:
    """``(head, "")`` when the Transformer module is an MLM model followed by ``SpladePooling`` only
    and its head is described here; else ``(None, why)``."""
    SpladePooling = splade_pooling_class()
    if SpladePooling is None or not followers or not isinstance(followers[0], SpladePooling):
        return None, "no SpladePooling after the Transformer module"
    if len(followers) > 1:
        others = ", ".join(type(m).__name__ for m in followers[1:])
        return None, f"modules after SpladePooling ({others}) are not covered"
    hf = transformer.model
    spec = find_mlm_head(hf)
    if spec is None:
        known = ", ".join(a for s in MLM_HEADS for a in s.architectures)
        return None, f"its MLM head ({type(_unwrap_peft(hf)).__name__}) is not one of {known}"
    return PackedSpladeHead(hf, spec, followers[0]), ""


# ----------------------------------------------------------------------------------- activation


def activate(x: torch.Tensor, activation: str, training: bool) -> torch.Tensor:
    """``log1p(relu(x))`` (twice ``log1p`` for ``"log1p_relu"``), with stock's in-place / out-of-place
    choice: under autocast an out-of-place ``log1p`` runs in fp32 and an in-place one keeps the
    input's dtype, so the output dtype follows stock's (fp32 in training, the logits' in eval)."""
    t = x.relu()
    t = t.log1p() if training else t.log1p_()
    if activation == "log1p_relu":
        t = t.log1p() if training else t.log1p_()
    return t


def _acc(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp32 for half types, else the dtype itself."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _activate_acc(z: torch.Tensor, activation: str) -> torch.Tensor:
    t = z.to(_acc(z.dtype)).relu_().log1p_()
    return t.log1p_() if activation == "log1p_relu" else t


def _activation_grad_acc(z: torch.Tensor, activation: str) -> torch.Tensor:
    """d activation / d z, in the accumulation dtype: ``1 / (1 + z)`` where ``z > 0`` (then times
    ``1 / (1 + log1p(z))`` for ``"log1p_relu"``), 0 elsewhere (relu's gradient at 0 is 0, as torch's)."""
    r = z.to(_acc(z.dtype)).relu()
    d = (1.0 + r).reciprocal_()
    if activation == "log1p_relu":
        d = d / (1.0 + r.log1p())
    return d.masked_fill_(r <= 0, 0.0)


# ----------------------------------------------------------------------------------- reductions


def _token_chunks(total: int, width: int, elements: int) -> list[tuple[int, int]]:
    step = max(1, elements // max(width, 1))
    return [(a, min(a + step, total)) for a in range(0, total, step)]


def splade_pool_reference(logits: torch.Tensor, seq_idx: torch.Tensor, num_seqs: int, strategy: str, activation: str, training: bool):
    """Pooled SPLADE embeddings ``[num_seqs, V]`` from packed logits ``[T, V]`` with plain torch ops
    and autograd (the oracle, and the path for decoders that are not a plain ``nn.Linear``)."""
    width = logits.shape[-1]
    index = seq_idx[:, None].expand(-1, width)
    if strategy == "max":
        m = logits.new_full((num_seqs, width), float("-inf")).scatter_reduce(0, index, logits, "amax", include_self=True)
        return activate(m, activation, training)
    acc = _acc(logits.dtype)
    act = activate(logits, activation, True)  # out of place: logits may be needed by autograd
    return torch.zeros(num_seqs, width, device=logits.device, dtype=acc).index_add(0, seq_idx, act.to(acc)).to(logits.dtype)


def _pool_chunked_no_grad(logits_of, total: int, width: int, seq_idx, num_seqs: int, strategy: str, activation: str, training: bool):
    """Inference: chunk by chunk, only the running max (or sum) ``[num_seqs, V]`` outlives a chunk."""
    out, dtype = None, None
    for a, b in _token_chunks(total, width, INFERENCE_CHUNK_ELEMENTS):
        z = logits_of(a, b)
        seg = seq_idx[a:b]
        if out is None:
            dtype = z.dtype
            out = z.new_full((num_seqs, width), float("-inf")) if strategy == "max" else z.new_zeros((num_seqs, width), dtype=_acc(z.dtype))
        if strategy == "max":
            out.scatter_reduce_(0, seg[:, None].expand_as(z), z, "amax", include_self=True)
        else:
            out.index_add_(0, seg, _activate_acc(z, activation))
    if out is None:
        raise ValueError("SPLADE pooling of a packed batch without tokens")
    if strategy == "max":
        return activate(out, activation, training)
    return out.to(dtype)


def _logits_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype ``F.linear(x, weight)`` computes in here (the autocast dtype under autocast)."""
    dt = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else None
    return dt if dt is not None else torch.result_type(x, weight)


class _LinearSegmentMax(torch.autograd.Function):
    """``m[n, v] = max over the tokens t of text n of (x @ W.T + b)[t, v]``, chunk by chunk.

    Forward: per token chunk the logits, their per-text max and the first token reaching it (the
    lowest token index, as ``torch.max`` picks); merged into the running max and arg-max (a later
    chunk wins only with a strictly larger value). Only ``arg [N, V]`` (int32) is kept for the backward.

    Backward, with ``g = dL/dm``: ``dlogits[t, v] = g[n, v]`` where ``t = arg[n, v]``, zero elsewhere;
    per chunk that sparse ``G`` is built densely ``[chunk, V]`` and ``dx = G @ W``, ``dW += G.T @ x``;
    ``db = sum_n g[n, v]`` (each ``(n, v)`` has exactly one arg-max token; empty texts none)."""

    @staticmethod
    def forward(ctx, x, weight, bias, seq_idx, num_seqs: int, elements: int):
        total, width = x.shape[0], weight.shape[0]
        m = arg = None
        big = torch.iinfo(torch.int32).max
        for a, b in _token_chunks(total, width, elements):
            z = F.linear(x[a:b], weight, bias)
            seg = seq_idx[a:b]
            index = seg[:, None].expand_as(z)
            if m is None:
                m = z.new_full((num_seqs, width), float("-inf"))
                arg = torch.full((num_seqs, width), -1, dtype=torch.int32, device=z.device)
            chunk_max = torch.full_like(m, float("-inf")).scatter_reduce_(0, index, z, "amax", include_self=True)
            hit = z == chunk_max.index_select(0, seg)
            position = torch.arange(a, b, device=z.device, dtype=torch.int32)[:, None].expand_as(z)
            chunk_arg = torch.full_like(arg, big).scatter_reduce_(0, index, torch.where(hit, position, big), "amin", include_self=True)
            better = chunk_max > m
            arg = torch.where(better, chunk_arg, arg)
            m = torch.maximum(m, chunk_max)
            del z, hit, chunk_max, chunk_arg
        ctx.save_for_backward(x, weight, arg)
        ctx.has_bias = bias is not None
        ctx.elements = elements
        ctx.dtype = m.dtype
        return m

    @staticmethod
    def backward(ctx, g):
        x, weight, arg = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dt = ctx.dtype
        total, width = x.shape[0], weight.shape[0]
        g = g.to(dt)
        acc = _acc(dt)
        dx = torch.empty_like(x) if need_x else None
        dw = torch.zeros(weight.shape, device=weight.device, dtype=acc) if need_w else None
        if need_x or need_w:
            w = weight.to(dt)
            arg_long = arg.long()
            for a, b in _token_chunks(total, width, ctx.elements):
                c = b - a
                local = arg_long - a
                # rows of texts whose arg-max is in another chunk (or that are empty) land in row c
                local = torch.where((local >= 0) & (local < c), local, c)
                grad_z = torch.zeros(c + 1, width, device=g.device, dtype=dt).scatter_(0, local, g)[:c]
                if need_x:
                    dx[a:b] = (grad_z @ w).to(x.dtype)
                if need_w:
                    dw += (grad_z.t() @ x[a:b].to(dt)).to(acc)
        db = None
        if need_b and ctx.has_bias:
            db = (g.to(acc) * (arg >= 0)).sum(0).to(weight.dtype)
        return dx, (dw.to(weight.dtype) if dw is not None else None), db, None, None, None


class _LinearSegmentSum(torch.autograd.Function):
    """``s[n, v] = sum over the tokens t of text n of act((x @ W.T + b)[t, v])``, chunk by chunk.

    Accumulated in fp32 (fp64 for fp64), returned in the logits' dtype (stock adds into a tensor of that dtype).
    Backward: per chunk the logits are recomputed (no ``[T, V]`` tensor is stored) and
    ``G = g[n(t)] * act'(z)``; ``dx = G @ W``, ``dW += G.T @ x``, ``db += sum_t G``."""

    @staticmethod
    def forward(ctx, x, weight, bias, seq_idx, num_seqs: int, activation: str, elements: int):
        total, width = x.shape[0], weight.shape[0]
        s, dtype = None, None
        for a, b in _token_chunks(total, width, elements):
            z = F.linear(x[a:b], weight, bias)
            if s is None:
                s = torch.zeros(num_seqs, width, device=z.device, dtype=_acc(z.dtype))
                dtype = z.dtype
            s.index_add_(0, seq_idx[a:b], _activate_acc(z, activation))
        ctx.save_for_backward(x, weight, bias, seq_idx)
        ctx.activation, ctx.elements, ctx.dtype = activation, elements, dtype
        return s.to(dtype)

    @staticmethod
    def backward(ctx, g):
        x, weight, bias, seq_idx = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dt = ctx.dtype
        total, width = x.shape[0], weight.shape[0]
        w = weight.to(dt)
        b_dt = bias.to(dt) if bias is not None else None
        acc = _acc(dt)
        g = g.to(acc)
        dx = torch.empty_like(x) if need_x else None
        dw = torch.zeros(weight.shape, device=weight.device, dtype=acc) if need_w else None
        db = torch.zeros(width, device=weight.device, dtype=acc) if need_b and bias is not None else None
        for a, b in _token_chunks(total, width, ctx.elements):
            x_c = x[a:b].to(dt)
            z = F.linear(x_c, w, b_dt)  # the forward's logits again (same dtype, same inputs)
            grad_z = (g.index_select(0, seq_idx[a:b]) * _activation_grad_acc(z, ctx.activation)).to(dt)
            del z
            if need_x:
                dx[a:b] = (grad_z @ w).to(x.dtype)
            if dw is not None:
                dw += (grad_z.t() @ x_c).to(acc)
            if db is not None:
                db += grad_z.to(acc).sum(0)
        return (
            dx,
            dw.to(weight.dtype) if dw is not None else None,
            db.to(bias.dtype) if db is not None else None,
            None, None, None, None,
        )


def _plain_linear(module) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(weight, bias)`` of a plain ``nn.Linear`` (the fused chunked path reads them directly);
    ``(None, None)`` for anything else (peft LoRA, quantized layers): their own forward runs."""
    if type(module) is nn.Linear and module.weight.dtype.is_floating_point:
        return module.weight, module.bias
    return None, None


def splade_pool(x, decoder, seq_idx, num_seqs: int, strategy: str, activation: str, training: bool) -> torch.Tensor:
    """``SpladePooling(decoder(x))`` on packed rows: ``x [T, H]`` (the head's transform output),
    ``seq_idx [T]`` the text of every token → ``[num_seqs, V]``."""
    total = x.shape[0]
    weight, bias = _plain_linear(decoder)
    params = (weight, bias) if weight is not None else tuple(decoder.parameters())
    grad = torch.is_grad_enabled() and (x.requires_grad or any(p is not None and p.requires_grad for p in params))
    if not grad:
        width = weight.shape[0] if weight is not None else getattr(decoder, "out_features", None)
        if width is None:
            width = decoder(x[:1]).shape[-1]
        if weight is not None:
            def logits_of(a, b):
                return F.linear(x[a:b], weight, bias)
        else:
            def logits_of(a, b):
                return decoder(x[a:b])
        return _pool_chunked_no_grad(logits_of, total, width, seq_idx, num_seqs, strategy, activation, training)
    if weight is None:
        # A wrapped decoder (e.g. LoRA on it): its own forward over all tokens, plain autograd.
        return splade_pool_reference(decoder(x), seq_idx, num_seqs, strategy, activation, training)
    if strategy == "max":
        m = _LinearSegmentMax.apply(x, weight, bias, seq_idx, num_seqs, TRAINING_CHUNK_ELEMENTS)
        return activate(m, activation, training)
    return _LinearSegmentSum.apply(x, weight, bias, seq_idx, num_seqs, activation, TRAINING_CHUNK_ELEMENTS)


# ----------------------------------------------------------------------------------- the head


class PackedSpladeHead:
    """``head(hidden [T, H], packed) -> [N, V]``: the MLM head and SpladePooling with the model's own
    modules and the pooling module's own options, read at every call."""

    def __init__(self, hf_model, spec: MLMHeadSpec, pooling):
        self.hf_model = hf_model
        self.spec = spec
        self.pooling = pooling

    def _model(self):
        return _unwrap_peft(self.hf_model)

    def transform(self, hidden: torch.Tensor) -> torch.Tensor:
        # Modules are resolved per call (a handful of getattr): peft may wrap them after install.
        model = self._model()
        for step in self.spec.transform:
            hidden = _resolve(model, step)(hidden)
        return hidden

    def decoder(self):
        return _resolve(self._model(), self.spec.decoder)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Stock's MLM logits of the packed tokens ``[T, V]`` (for the fallback and tests)."""
        return self.decoder()(self.transform(hidden))

    def supported(self) -> bool:
        pooling = self.pooling
        return (
            getattr(pooling, "pooling_strategy", None) in STRATEGIES
            and getattr(pooling, "activation_function", "relu") in ACTIVATIONS
        )

    def __call__(self, hidden: torch.Tensor, p) -> torch.Tensor:
        pooling = self.pooling
        if not self.supported():
            warn_once(
                f"SpladePooling(pooling_strategy={getattr(pooling, 'pooling_strategy', None)!r}, "
                f"activation_function={getattr(pooling, 'activation_function', None)!r}) has no packed "
                "implementation: stock's pooling runs on re-padded MLM logits"
            )
            return self.stock_pool(hidden, p)
        return splade_pool(
            self.transform(hidden), self.decoder(), p.seq_idx, p.num_seqs,
            pooling.pooling_strategy, getattr(pooling, "activation_function", "relu"), pooling.training,
        )

    def stock_pool(self, hidden: torch.Tensor, p) -> torch.Tensor:
        """Stock's ``SpladePooling.forward`` (the class's own code) on the logits re-padded to
        ``[N, max_len, V]`` with their attention mask."""
        logits = p.repad(self.logits(hidden), like_caller=False)
        mask = p.repad(torch.ones(hidden.shape[0], dtype=torch.long, device=hidden.device), like_caller=False)
        features = {"token_embeddings": logits, "attention_mask": mask}
        return type(self.pooling).forward(self.pooling, features)["sentence_embedding"]


# ----------------------------------------------------------------------------------- encode rows

# A call's rows are kept as their non-zero entries while at most this fraction of the first batch's
# entries is non-zero (an entry costs a value and an int64 column, 10-12 bytes, against 2-4 dense);
# denser outputs (an untrained model: most of the vocabulary active) are kept as a dense table.
SPARSE_MAX_DENSITY = 0.125
# Rows per densified piece in ``finish_sparse_encode``: ~2^26 entries (128 MB in bf16 at 30,522 columns).
FINISH_CHUNK_ELEMENTS = 1 << 26


class SparseRows:
    """The rows of one ``encode`` call, ``[n_rows, V]``, kept on the device as their non-zero entries.

    The fast pipeline gathers a call's rows before stock's ``encode`` (or :func:`finish_sparse_encode`)
    turns them into its result; at vocabulary width a dense table of a large corpus (100k texts x
    30,522 x 4 bytes = 12 GB) would not fit where stock, keeping its rows sparse per batch, does. Each
    batch is compressed once the next one has been queued (``nonzero`` waits for its batch while the
    GPU runs the next). :meth:`select_rows` gives dense rows again, bit for bit: SPLADE values are
    ``log1p(relu(.)) >= 0``, so the entries dropped are exact zeros. When the first batch is dense
    (an untrained model), the whole call is kept as one dense table instead (smaller then)."""

    def __init__(self, n_rows: int):
        self.n_rows = n_rows
        self.pending = None  # (rows, dense out) of the last batch, compressed on the next add
        self.parts: list = []  # (row ids, column ids, values) per batch, on the device
        self.dense: torch.Tensor | None = None  # dense mode: the [n_rows, V] table
        self.width = self.dtype = self.device = None
        self.crow = None  # host int64 [n_rows + 1] and the same on the device
        self.crow_device = self.cols = self.values = None

    def add(self, rows: torch.Tensor, out: torch.Tensor) -> None:
        if self.width is None:
            self.width, self.dtype, self.device = out.shape[-1], out.dtype, out.device
            if int(torch.count_nonzero(out)) > SPARSE_MAX_DENSITY * out.numel():
                self.dense = out.new_zeros((self.n_rows, self.width))
        if self.dense is not None:
            self.dense.index_copy_(0, host_to_device(rows, self.device), out)
            return
        if self.pending is not None:
            self._compress(*self.pending)
        self.pending = (rows, out)

    def _compress(self, rows: torch.Tensor, out: torch.Tensor) -> None:
        nz = out.nonzero()
        row_ids = host_to_device(rows, out.device).index_select(0, nz[:, 0])
        self.parts.append((row_ids, nz[:, 1], out[nz[:, 0], nz[:, 1]]))

    def finish(self) -> "SparseRows":
        if self.dense is not None:
            return self
        if self.pending is not None:
            self._compress(*self.pending)
            self.pending = None
        row_ids = torch.cat([p[0] for p in self.parts])
        cols = torch.cat([p[1] for p in self.parts])
        values = torch.cat([p[2] for p in self.parts])
        self.parts = []
        order = torch.argsort(row_ids, stable=True)  # nonzero() lists a row's columns in ascending order
        self.cols, self.values = cols.index_select(0, order), values.index_select(0, order)
        counts = torch.bincount(row_ids, minlength=self.n_rows)
        self.crow_device = torch.zeros(self.n_rows + 1, dtype=torch.long, device=self.device)
        torch.cumsum(counts, 0, out=self.crow_device[1:])
        self.crow = self.crow_device.cpu().numpy()
        return self

    def select_rows(self, rows) -> torch.Tensor:
        """Dense ``[len(rows), V]`` rows (a row may repeat)."""
        rows_host = torch.as_tensor(rows, dtype=torch.long)
        rows_device = host_to_device(rows_host, self.device)
        if self.dense is not None:
            return self.dense.index_select(0, rows_device)
        rows_np = rows_host.numpy()
        total = int((self.crow[rows_np + 1] - self.crow[rows_np]).sum())  # on the host: no sync
        out = torch.zeros(len(rows_np), self.width, dtype=self.dtype, device=self.device)
        if total == 0:
            return out
        starts = self.crow_device.index_select(0, rows_device)
        counts = self.crow_device.index_select(0, rows_device + 1) - starts
        local = torch.repeat_interleave(torch.arange(len(rows_np), device=self.device), counts, output_size=total)
        first = torch.cumsum(counts, 0) - counts  # each row's first position in the gathered entries
        src = starts.index_select(0, local) + torch.arange(total, device=self.device) - first.index_select(0, local)
        out[local, self.cols.index_select(0, src)] = self.values.index_select(0, src)
        return out


def finish_sparse_encode(model, bound, table, item_rows: list, singular: bool):
    """``SparseEncoder.encode``'s result from the rows directly, for the plain arguments.

    Stock's loop, replayed, still turns every batch into a sparse tensor, unbinds it into per-row
    sparse tensors and stacks them again, each a few device calls per row (measured on an H200: most
    of stock's own encode time on a random bert-base SPLADE model). Here: the rows in input order,
    ``max_active_dims`` by stock's own ``select_max_active_dims`` (per row, so any grouping of rows
    gives the same result), then one sparse COO tensor with stock's layout (rows in input order, a
    row's columns ascending, not marked coalesced), a dense stacked tensor, or (dense rows,
    ``convert_to_tensor=False``) the list of its rows; on the CPU with ``save_to_cpu``. Anything else
    (a single input, lists of sparse rows, a progress bar, a bad ``batch_size``, a subclass's own
    ``encode``) returns ``NotImplemented``: stock's method replays the rows."""
    import logging

    from sentence_transformers import SparseEncoder
    from sentence_transformers.util import select_max_active_dims

    if getattr(type(model), "encode", None) is not SparseEncoder.encode or not isinstance(table, SparseRows):
        return NotImplemented
    a = bound.arguments
    batch_size = a.get("batch_size", 32)
    if singular or not item_rows or not isinstance(batch_size, int) or batch_size <= 0:
        return NotImplemented
    show = a.get("show_progress_bar")
    if show is None:  # stock's rule: a bar when its module logs at INFO or DEBUG
        show = logging.getLogger(SparseEncoder.encode.__module__).getEffectiveLevel() in (logging.INFO, logging.DEBUG)
    convert_to_tensor = bool(a.get("convert_to_tensor", True))
    to_sparse = bool(a.get("convert_to_sparse_tensor", True))
    if show or (to_sparse and not convert_to_tensor):
        return NotImplemented
    model._resolve_prompt(a.get("prompt"), a.get("prompt_name"))  # stock's warning when both are given
    max_active_dims = a.get("max_active_dims")
    if max_active_dims is None:
        max_active_dims = getattr(model, "max_active_dims", None)
    n = len(item_rows)
    step = max(1, FINISH_CHUNK_ELEMENTS // max(table.width, 1))
    pieces = []
    with torch.inference_mode():
        for a0 in range(0, n, step):
            rows = table.select_rows(item_rows[a0 : a0 + step])
            if max_active_dims is not None:
                rows = select_max_active_dims(rows, max_active_dims=max_active_dims)
            if to_sparse:
                nz = rows.nonzero()
                pieces.append((nz[:, 0] + a0, nz[:, 1], rows[nz[:, 0], nz[:, 1]]))
            else:
                pieces.append(rows)
    # assembled outside inference mode: the result is an ordinary tensor, as stock's
    if to_sparse:
        indices = torch.stack([torch.cat([p[0] for p in pieces]), torch.cat([p[1] for p in pieces])])
        with torch.sparse.check_sparse_tensor_invariants(enable=False):  # valid by construction
            out = torch.sparse_coo_tensor(indices, torch.cat([p[2] for p in pieces]), (n, table.width), check_invariants=False)
    else:
        out = torch.cat(pieces) if len(pieces) > 1 else pieces[0].clone()
    if a.get("save_to_cpu", False):
        out = out.cpu()
    return out if convert_to_tensor else list(out)
