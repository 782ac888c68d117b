"""The contenders and what one step / one pass of each is.

- ``stock``: sentence-transformers as a user runs it: SDPA attention, padded batches.
- ``flat``: stock ST with its own flattening (padding-free) through a varlen FlashAttention kernel
  (flash-attn when installed, else PyTorch's ``varlen_attn``; see :mod:`.flat`).
- ``fastst``: the same stock model after ``enable_fast(model, lora=...)``; the loss call runs inside
  ``fastst_plugin.packed_loss.packed_columns(model, features)`` when that module exists (what the fast
  trainer does for its users).
- ``unsloth``: ``FastSentenceTransformer``, in its own process (:mod:`.unsloth_worker`).

Every contender gets a fresh model built from the same seed (same weights), the same LoRA
configuration, the same batches, the same optimizer (AdamW) and learning rate. A train step is
``loss(features, labels)`` + ``backward`` + ``optimizer.step`` + ``zero_grad`` on batches tokenized
beforehand (by the contender's own ``model.preprocess``) and already on the device; CrossEncoder
losses tokenize inside the loss call, as in ST, so their steps include tokenization for everyone.
fastst's step is the one its patched trainer runs: the loss call inside ``packed_columns`` and
``backward`` on the calling thread (``fastst_plugin.training.backward_on_calling_thread``).
"""

from __future__ import annotations

import contextlib
import gc
import os
import re
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from . import flat as flat_mod
from .models import BuiltModel, apply_lora_stock, build_model, cleanup_folder, layer_linear_names, lora_config, quantize_4bit_stock

CONTENDERS = ("stock", "flat", "unsloth", "fastst")
_ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]*")


def parse_contender(spec: str) -> tuple[str, dict[str, str]]:
    """``"fastst+FASTST_FUSED_SIMILARITY=0"`` -> ``("fastst", {"FASTST_FUSED_SIMILARITY": "0"})``.

    A contender may carry environment settings after ``+`` (several: ``+A=1+B=2``); they are set
    only while that contender builds and steps, so one process can A/B-interleave a switch of the
    package against its default on the same card. Raises ``ValueError`` on anything malformed."""
    kind, *pairs = spec.split("+")
    if kind not in CONTENDERS:
        raise ValueError(f"unknown contender {kind!r}; choose from {', '.join(CONTENDERS)}")
    env: dict[str, str] = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not _ENV_NAME.fullmatch(key):
            raise ValueError(f"contender {spec!r}: expected NAME=value after '+', got {pair!r}")
        env[key] = value
    if env and kind == "unsloth":
        raise ValueError("environment settings are not passed to the unsloth subprocess")
    return kind, env


SPLADE_CALIBRATION_TEXTS = 8  # corpus texts the SPLADE bias shift is computed on (models.shift_splade_bias)


@dataclass
class CellSpec:
    """One (model, max_seq_length, batch size) cell and the options every contender shares."""

    workload: str  # train | encode
    model_key: str
    model_spec: Any  # ModelDef or local path
    max_seq_length: int
    batch_size: int
    mode: str  # lora | full | qlora (train); "inference" for encode
    loss: str  # mnrl | cached-mnrl | cosent | ce  (train)
    api: str  # encode | encode_query | encode_document | predict | sparse-encode  (encode)
    lora_r: int
    lr: float
    dtype_name: str
    device: str
    smoke: bool
    seed: int
    dropout: bool
    mini_batch_size: int
    fastst_options: dict
    batches_text: list  # train: [(queries, docs, labels)]
    corpus: list  # encode: texts, or (query, doc) pairs for predict
    sparse_active_dims: int = 0  # sparse-encode on a built model: decoder bias shifted for ~this many active dims (0: off)

    @property
    def cross_encoder(self) -> bool:
        return self.loss == "ce" if self.workload == "train" else self.api == "predict"

    @property
    def sparse(self) -> bool:
        """A SparseEncoder (SPLADE) cell: ``encode --api sparse-encode``."""
        return self.workload == "encode" and self.api == "sparse-encode"


@dataclass
class Run:
    name: str
    status: str = "ok"  # ok | failed | unavailable | skipped
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    built: BuiltModel | None = None
    loss_fn: Any = None
    optimizer: Any = None
    batches: list = field(default_factory=list)
    loss_ctx: Any = None
    autocast: Any = None
    # fastst: backward on the calling thread, as the patched trainer runs it (training.backward_on_calling_thread)
    backward_ctx: Any = contextlib.nullcontext
    step_index: int = 0
    step_ms: list[float] = field(default_factory=list)
    rep_median_ms: list[float] = field(default_factory=list)
    loss_first: float | None = None
    loss_final: float | None = None
    _last_loss: Any = None
    peak_alloc_gb: float | None = None
    peak_reserved_gb: float | None = None
    busy_ms: float | None = None
    kernels: int | None = None
    processed_tokens: int | None = None
    real_tokens_seen: int | None = None
    agreement: float | None = None
    sample_output: Any = None
    interleave_group: int | None = None
    extra: dict = field(default_factory=dict)
    extra_ctx_kwargs: dict = field(default_factory=dict)

    @property
    def kind(self) -> str:
        """stock | flat | unsloth | fastst: the contender without its environment settings."""
        return parse_contender(self.name)[0]

    @contextlib.contextmanager
    def env_ctx(self):
        """This contender's environment settings (``fastst+NAME=value``) set, the previous values back after."""
        env = parse_contender(self.name)[1]
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def fail(self, exc: BaseException | str, status: str = "failed") -> "Run":
        self.status = status
        if isinstance(exc, BaseException):
            self.error = f"{type(exc).__name__}: {exc}".strip()
            self.extra["traceback"] = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-4000:]
        else:
            self.error = exc
        return self

    def free(self) -> None:
        built = self.built
        self.built = None
        self.loss_fn = None
        self.optimizer = None
        self.batches = []
        self.loss_ctx = None
        self.extra_ctx_kwargs = {}  # holds the loss, and through it the model
        self._last_loss = None
        cleanup_folder(built)
        del built
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:
            pass


def torch_dtype(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "amp-bf16": torch.float32}[name]


def autocast_ctx(cell: CellSpec):
    import torch

    if cell.dtype_name == "amp-bf16":
        dev = "cuda" if cell.device.startswith("cuda") else "cpu"
        return lambda: torch.autocast(dev, dtype=torch.bfloat16)
    return contextlib.nullcontext


def packed_columns_ctx():
    """``fastst_plugin.packed_loss.packed_columns`` if the module exists, else None."""
    import importlib
    import importlib.util

    try:
        if importlib.util.find_spec("fastst_plugin.packed_loss") is None:
            return None
    except (ImportError, ValueError):
        return None
    mod = importlib.import_module("fastst_plugin.packed_loss")
    return getattr(mod, "packed_columns", None)


def to_device(features: dict, device: str) -> dict:
    import torch

    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in features.items()}


def make_loss(cell: CellSpec, model):
    if cell.loss == "ce":
        from sentence_transformers.cross_encoder import losses as ce_losses

        return ce_losses.BinaryCrossEntropyLoss(model)
    from sentence_transformers.sentence_transformer import losses

    if cell.loss == "mnrl":
        return losses.MultipleNegativesRankingLoss(model)
    if cell.loss == "cached-mnrl":
        return losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=cell.mini_batch_size)
    if cell.loss == "cosent":
        return losses.CoSENTLoss(model)
    raise ValueError(f"unknown loss {cell.loss!r}")


def _preprocess(model, texts):
    fn = getattr(model, "preprocess", None) or model.tokenize
    return fn(texts)


# ------------------------------------------------------------------------------------------ building


def build_contender(name: str, cell: CellSpec) -> Run:
    """Build, LoRA, patch, tokenize. Never raises: a failure is recorded on the run."""
    run = Run(name)
    try:
        with run.env_ctx():
            _build(run, cell)
    except BaseException as exc:  # noqa: BLE001 - a contender failing must not end the benchmark
        if isinstance(exc, KeyboardInterrupt):
            raise
        if _is_oom(exc):
            run.extra["oom"] = True
        run.fail(exc)
        run.free()
    return run


def _is_oom(exc: BaseException) -> bool:
    return "out of memory" in str(exc).lower() or type(exc).__name__ == "OutOfMemoryError"


def _build(run: Run, cell: CellSpec) -> None:
    import torch

    dtype = torch_dtype(cell.dtype_name)
    attn = "sdpa"
    if run.kind == "flat" and cell.sparse:
        run.fail("not wired for SparseEncoder cells (sparse-encode compares stock and fastst)", status="unavailable")
        return
    if run.kind == "flat":
        attn, why = flat_mod.availability(cell.device, cell.cross_encoder)
        if attn is None:
            run.fail(f"{why}", status="unavailable")
            return
        run.extra["flat_backend"] = (
            "flash-attn varlen" if attn == "flash_attention_2" else ("torch varlen_attn" if cell.device.startswith("cuda") else "CPU reference varlen (per-sequence SDPA)")
        )
    if run.kind == "fastst":
        try:
            from fastst_plugin import enable_fast  # noqa: F401  (imports the whole fast path)
        except Exception as exc:
            run.fail(f"fastst_plugin.enable_fast does not import ({type(exc).__name__}: {exc})", status="unavailable")
            return
    if cell.mode == "qlora" and cell.workload == "train" and run.kind in ("stock", "flat"):
        try:
            import bitsandbytes  # noqa: F401
        except Exception as exc:
            run.fail(f"QLoRA needs bitsandbytes ({type(exc).__name__})", status="unavailable")
            return

    built = build_model(
        cell.model_spec,
        max_seq_length=cell.max_seq_length,
        device=cell.device,
        dtype=dtype,
        attn_implementation=attn,
        cross_encoder=cell.cross_encoder,
        smoke=cell.smoke,
        seed=cell.seed,
        dropout=cell.dropout,
        sparse=cell.sparse,
        sparse_active_dims=cell.sparse_active_dims,
        calibration_texts=list(cell.corpus[:SPLADE_CALIBRATION_TEXTS]) if cell.sparse else None,
    )
    run.built = built
    run.notes += built.notes
    model, hf = built.model, built.hf_model
    if run.kind == "flat":
        flat_mod.enable_flattening(built.transformer)
        flat_mod.NOTES.clear()  # what the kernel could not reproduce, collected for this cell's record
    run.autocast = autocast_ctx(cell)
    if run.kind == "fastst":
        from fastst_plugin.training import backward_on_calling_thread

        run.backward_ctx = backward_on_calling_thread

    if cell.workload == "encode":
        model.eval()
        if run.kind == "fastst":
            from fastst_plugin import enable_fast

            enable_fast(model, **cell.fastst_options)
            _note_fastst(run, model)
        return

    # ---- training
    names = layer_linear_names(hf)
    cfg = lora_config(hf, cell.lora_r) if cell.mode in ("lora", "qlora") else None
    run.extra["lora_targets"] = len(names) if cfg is not None else 0
    torch.manual_seed(cell.seed + 1)  # the same adapter init for every contender
    if run.kind == "fastst":
        from fastst_plugin import enable_fast  # noqa: F811

        opts = dict(cell.fastst_options)
        if cell.mode == "qlora":
            opts.setdefault("quantization", "4bit")
        enable_fast(model, lora=cfg, **opts)
        _note_fastst(run, model)
    else:
        if cell.mode == "qlora":
            quantize_4bit_stock(hf, names)
        if cfg is not None:
            apply_lora_stock(hf, cfg)
    if cell.mode == "full":
        for p in model.parameters():
            if p.is_floating_point():
                p.requires_grad_(True)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    run.extra["trainable_params"] = sum(p.numel() for p in params)
    fused = cell.device.startswith("cuda") and all(p.is_cuda and p.is_floating_point() for p in params)
    try:
        run.optimizer = torch.optim.AdamW(params, lr=cell.lr, fused=fused or None)
    except (TypeError, RuntimeError):
        run.optimizer = torch.optim.AdamW(params, lr=cell.lr)
    run.loss_fn = make_loss(cell, model)
    if hasattr(run.loss_fn, "to"):
        run.loss_fn.to(cell.device)

    run.loss_ctx = None
    if run.kind == "fastst" and not cell.cross_encoder:
        pc = packed_columns_ctx()
        if pc is not None:
            run.loss_ctx = pc
            import inspect

            if "loss" in inspect.signature(pc).parameters:
                run.extra_ctx_kwargs = {"loss": run.loss_fn}
            run.notes.append("loss call wrapped in packed_columns")
        else:
            run.notes.append("fastst_plugin.packed_loss not found: columns run as the loss calls them")

    # ---- batches on the device, tokenized by this contender's own preprocess
    for queries, docs, labels in cell.batches_text:
        lab = None if labels is None else torch.tensor(labels, dtype=torch.float32, device=cell.device)
        if cell.cross_encoder:
            run.batches.append(([list(queries), list(docs)], lab))
        else:
            feats = [to_device(_preprocess(model, list(queries)), cell.device), to_device(_preprocess(model, list(docs)), cell.device)]
            run.batches.append((feats, lab))


def _note_fastst(run: Run, model) -> None:
    try:
        from fastst_plugin.api import get_state

        state = get_state(model)
        if state is not None:
            run.extra["fastst_backend"] = state.backend
            run.extra["fastst_summary"] = state.summary
    except Exception:
        pass


# ------------------------------------------------------------------------------------------ stepping


def _no_stamp(phase: str) -> None:
    pass


def train_step(run: Run, stamp=_no_stamp):
    """One optimizer step; returns the (detached) loss tensor. No host synchronization.
    ``stamp(phase)`` is called as each phase ends (``tests/gpu/profile_step.py`` times them)."""
    with run.env_ctx():
        return _train_step(run, stamp)


def _train_step(run: Run, stamp):
    feats, labels = run.batches[run.step_index % len(run.batches)]
    run.step_index += 1
    if isinstance(feats[0], Mapping):
        feats = [dict(f) for f in feats]  # modules write outputs into the dicts: fresh ones per step
    stamp("features")
    with run.autocast():
        if run.loss_ctx is not None:
            with run.loss_ctx(run.built.model, feats, **run.extra_ctx_kwargs):
                loss = run.loss_fn(feats, labels)
        else:
            loss = run.loss_fn(feats, labels)
    stamp("forward+loss")
    with run.backward_ctx():
        loss.backward()
    stamp("backward")
    run.optimizer.step()
    stamp("optimizer.step")
    run.optimizer.zero_grad(set_to_none=True)
    stamp("zero_grad")
    run._last_loss = loss.detach()
    return run._last_loss


def encode_pass(run: Run, cell: CellSpec, texts=None, convert_to_tensor: bool = False):
    model = run.built.model
    texts = cell.corpus if texts is None else texts
    kw = dict(batch_size=cell.batch_size, show_progress_bar=False)
    with run.env_ctx(), run.autocast():
        if cell.api == "predict":
            return model.predict(texts, convert_to_tensor=convert_to_tensor, **kw)
        if cell.sparse:
            # SparseEncoder.encode with its defaults (one sparse COO tensor, left on the device); the
            # agreement sample is densified by the caller
            return model.encode(texts, **kw)
        fn = getattr(model, cell.api)
        return fn(texts, convert_to_tensor=convert_to_tensor, **kw)


@contextlib.contextmanager
def count_backbone_tokens(run: Run):
    """Counts, over the block, the token positions the ``Transformer`` module computes (padding
    included) and the real tokens among them. ST calls the module through ``__call__``, so hooks see
    every column and mini-batch. Padded features carry an ``attention_mask``; flattened ones
    (``cu_seq_lens_q``) and fastst's packed ones (its ``PACKED_KEY`` in the output) compute real
    tokens only. A forward that bypasses the module (fastst's ``packed_columns``) is not seen: then
    ``counts["calls"]`` stays 0."""
    counts = {"processed": 0, "real": 0, "calls": 0}
    pending: list = []
    try:
        from fastst_plugin.packing import PACKED_KEY
    except Exception:
        PACKED_KEY = "__fastst_packed__"

    def pre(module, args, kwargs):
        feats = args[0] if args else kwargs.get("features")
        ids = feats.get("input_ids") if isinstance(feats, Mapping) else None  # dict or BatchEncoding
        if ids is None or not hasattr(ids, "shape"):
            pending.append(None)
            return
        numel = int(ids.numel())
        am = feats.get("attention_mask")
        real = int(am.sum().item()) if am is not None and hasattr(am, "sum") and tuple(am.shape) == tuple(ids.shape) else numel
        pending.append((numel, real))

    def post(module, args, kwargs, output):
        item = pending.pop() if pending else None
        if item is None:
            return
        numel, real = item
        packed = isinstance(output, Mapping) and (PACKED_KEY in output or "cu_seq_lens_q" in output)
        counts["processed"] += real if packed else numel
        counts["real"] += real
        counts["calls"] += 1

    module = run.built.transformer
    h1 = module.register_forward_pre_hook(pre, with_kwargs=True)
    h2 = module.register_forward_hook(post, with_kwargs=True)
    try:
        yield counts
    finally:
        h1.remove()
        h2.remove()
