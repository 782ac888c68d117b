"""The benchmark loop: cells (model x max_seq_length x batch size), contenders A/B-interleaved within a
cell, one JSON line per contender written as soon as its cell is done."""

from __future__ import annotations

import gc
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any

from . import measure
from .contenders import CellSpec, Run, build_contender, count_backbone_tokens, encode_pass, train_step
from .data import batch_texts, corpus as make_corpus, load_pairs
from .models import ModelDef, model_config, resolve_model

AGREEMENT_SAMPLE = 64


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass
class CellInfo:
    """What every contender of a cell shares: real tokens and FLOPs."""

    real_tokens_per_rep: int  # train: all batches once; encode: the corpus once
    texts_per_rep: int  # pairs (train) or texts (encode)
    seq_lens: list[int]
    flops_per_rep: float | None
    n_lin: int | None
    lora_rank_sum: int | None
    max_position_embeddings: int | None


# ---------------------------------------------------------------------------------------- cell setup


def _reference_tokenizer(spec, max_len: int):
    from transformers import AutoTokenizer

    if isinstance(spec, ModelDef):
        from .models import _tokenizer_source_dir

        src, _ = _tokenizer_source_dir()
        tok = AutoTokenizer.from_pretrained(src)
    else:
        tok = AutoTokenizer.from_pretrained(spec)
    tok.model_max_length = max_len
    return tok


def _config_for(spec, cross_encoder: bool, smoke: bool):
    if isinstance(spec, ModelDef):
        return model_config(spec, smoke=smoke)
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(spec)


def _linear_counts(config, lora_r: int | None, cross_encoder: bool, sparse: bool = False) -> tuple[int, int]:
    """(N, R) of :mod:`.measure` from a model built on the meta device (no memory, no time).
    ``sparse`` (SPLADE): N also counts the masked-LM head's linear layers (transform and vocabulary
    projection), which run on every token and are a large share of the work (bert-base: 24M of 109M
    multiply-adds per token); LoRA ranks stay those of the transformer layers."""
    import torch
    import transformers

    from .models import layer_linear_names

    if sparse:
        cls = transformers.AutoModelForMaskedLM
    else:
        cls = transformers.AutoModelForSequenceClassification if cross_encoder else transformers.AutoModel
    with torch.device("meta"):
        m = cls.from_config(config)
    names = layer_linear_names(m)
    if sparse:
        layer_names = set(names)
        head = [n for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear) and n not in layer_names]
        n_head = sum(i * o for i, o in measure.linear_sizes(m, head))
    else:
        n_head = 0
    sizes = measure.linear_sizes(m, names)
    del m
    n_lin = sum(i * o for i, o in sizes) + n_head
    r_sum = sum(lora_r * (i + o) for i, o in sizes) if lora_r else 0
    return n_lin, r_sum


def cell_info(cell: CellSpec) -> CellInfo:
    tok = _reference_tokenizer(cell.model_spec, cell.max_seq_length)
    L = cell.max_seq_length
    seq_lens: list[int] = []
    if cell.workload == "train":
        for q, d, _ in cell.batches_text:
            if cell.cross_encoder:
                enc = tok(list(q), list(d), truncation=True, max_length=L)
                seq_lens += [len(x) for x in enc["input_ids"]]
            else:
                for col in (q, d):
                    enc = tok(list(col), truncation=True, max_length=L)
                    seq_lens += [len(x) for x in enc["input_ids"]]
        texts = sum(len(b[0]) for b in cell.batches_text)
    else:
        if cell.api == "predict":
            enc = tok([p[0] for p in cell.corpus], [p[1] for p in cell.corpus], truncation=True, max_length=L)
        else:
            enc = tok(list(cell.corpus), truncation=True, max_length=L)
        seq_lens = [len(x) for x in enc["input_ids"]]
        texts = len(cell.corpus)
    config = _config_for(cell.model_spec, cell.cross_encoder, cell.smoke)
    flops = n_lin = r_sum = None
    try:
        n_lin, r_sum = _linear_counts(config, cell.lora_r if cell.mode in ("lora", "qlora") else None, cell.cross_encoder, cell.sparse)
        attn = measure.attention_flops_fwd(config, seq_lens)
        flops = measure.step_flops(
            workload=cell.workload, mode=cell.mode, n_lin=n_lin, lora_rank_sum=r_sum, tokens=sum(seq_lens), attn_fwd=attn
        )
    except Exception as exc:  # FLOPs are a nicety: never fail the cell for them
        log(f"FLOP count unavailable: {type(exc).__name__}: {exc}")
    return CellInfo(
        real_tokens_per_rep=sum(seq_lens),
        texts_per_rep=texts,
        seq_lens=seq_lens,
        flops_per_rep=flops,
        n_lin=n_lin,
        lora_rank_sum=r_sum,
        max_position_embeddings=getattr(config, "max_position_embeddings", None),
    )


def unsupported_reason(cell: CellSpec) -> str | None:
    """Why a cell cannot run at all (every contender is recorded as skipped with this), or None."""
    if cell.sparse:
        from .models import sparse_unsupported

        return sparse_unsupported(cell.model_spec)
    return None


def make_cell(opts, model_name: str, L: int, B: int, pairs) -> CellSpec:
    spec = resolve_model(model_name)
    key = spec.key if isinstance(spec, ModelDef) else os.path.basename(os.path.normpath(model_name))
    batches: list = []
    corpus: list = []
    if opts.workload == "train":
        n_batches = max(1, opts.steps)  # one repetition of `steps` steps sees every batch exactly once
        raw = batch_texts(pairs, B, n_batches, long_docs=opts.long_docs, max_seq_length=L)
        for q, d in raw:
            labels = None
            if opts.loss in ("cosent", "ce"):
                # every other pair gets the next pair's document and label 0: a graded mix, not all positives
                d = [d[(i + 1) % len(d)] if i % 2 else d[i] for i in range(len(d))]
                labels = [0.0 if i % 2 else 1.0 for i in range(len(d))]
            batches.append((q, d, labels))
        # the heaviest batch first: the warm-up steps (which measure memory) meet the largest shapes
        batches.sort(key=lambda b: -(max(len(t) for t in b[1]) * len(b[1]) + sum(len(t) for t in b[1])))
    else:
        if opts.api == "predict":
            docs = make_corpus(pairs, opts.corpus_size, long_docs=opts.long_docs, max_seq_length=L)
            corpus = [(pairs.queries[i % len(pairs)], docs[i]) for i in range(len(docs))]
        else:
            corpus = make_corpus(pairs, opts.corpus_size, long_docs=opts.long_docs, max_seq_length=L, queries=opts.api == "encode_query")
    return CellSpec(
        workload=opts.workload,
        model_key=key,
        model_spec=spec,
        max_seq_length=L,
        batch_size=B,
        mode=opts.mode if opts.workload == "train" else "inference",
        loss=opts.loss if opts.workload == "train" else "-",
        api=opts.api if opts.workload == "encode" else "-",
        lora_r=opts.lora_r,
        lr=opts.lr,
        dtype_name=opts.dtype,
        device=opts.device,
        smoke=opts.smoke,
        seed=opts.seed,
        dropout=not opts.no_dropout,
        mini_batch_size=opts.mini_batch_size,
        fastst_options=dict(opts.fastst_options),
        batches_text=batches,
        corpus=corpus,
        sparse_active_dims=int(getattr(opts, "sparse_active_dims", 0) or 0) if opts.workload == "encode" else 0,
    )


# ---------------------------------------------------------------------------------------- phases


def warmup_run(run: Run, cell: CellSpec, warmup: int, mem: measure.MemoryWatch) -> None:
    """Warm-up (untimed); the memory watch started before the build stops after it."""
    try:
        if cell.workload == "train":
            for i in range(max(1, warmup)):
                loss = train_step(run)
                if i == 0:
                    run.loss_first = float(loss.float().item())
        else:
            # Whole-corpus passes: what a timed pass runs, so one-time costs (CUDA-graph capture per
            # size bucket, cuBLAS heuristics, allocator growth) stay out of the timed passes. The
            # first pass is timed on its own and reported as ``first_pass_ms``: a one-off call's cost.
            texts = cell.corpus
            for i in range(max(1, warmup)):
                t0 = time.perf_counter()
                encode_pass(run, cell)
                measure.sync(cell.device)
                if i == 0:
                    run.extra["first_pass_ms"] = round((time.perf_counter() - t0) * 1e3, 1)
            out = encode_pass(run, cell, list(texts[:AGREEMENT_SAMPLE]), convert_to_tensor=True)
            if getattr(out, "is_sparse", False):  # SparseEncoder: compare the dense rows
                out = out.to_dense()
            run.sample_output = out.detach().float().cpu()
            if cell.sparse:
                active = float((run.sample_output != 0).sum(-1).float().mean())
                run.extra["active_dims_mean"] = round(active, 1)
                run.notes.append(f"SPLADE: {active:,.0f} active dims per document (mean over the {len(run.sample_output)}-text agreement sample)")
        measure.sync(cell.device)
        run.peak_alloc_gb, run.peak_reserved_gb = mem.stop()
    except BaseException as exc:  # noqa: BLE001
        if isinstance(exc, KeyboardInterrupt):
            raise
        run.fail(exc)
        run.free()


def time_group(runs: list[Run], cell: CellSpec, steps: int, repeats: int, group_id: int) -> None:
    """A/B-interleaved timing: repetition r runs every live contender in turn (order reversed on odd r)."""
    for run in runs:
        run.interleave_group = group_id
    for rep in range(repeats):
        order = runs if rep % 2 == 0 else list(reversed(runs))
        for run in order:
            if run.status != "ok":
                continue
            try:
                timer = measure.StepTimer(cell.device)
                measure.sync(cell.device)
                t0 = time.perf_counter()
                if cell.workload == "train":
                    timer.mark()
                    for _ in range(steps):
                        train_step(run)
                        timer.mark()
                    ivals = timer.intervals_ms()
                    run.step_ms.extend(ivals)
                    total = sum(ivals)
                else:
                    timer.mark()
                    encode_pass(run, cell)
                    timer.mark()
                    total = timer.intervals_ms()[0]
                    run.step_ms.append(total)
                wall = (time.perf_counter() - t0) * 1000.0
                run.rep_median_ms.append(total / (steps if cell.workload == "train" else 1))
                run.extra.setdefault("rep_wall_ms", []).append(round(wall, 2))
                log(f"  {cell.model_key} L={cell.max_seq_length} {run.name:7s} rep {rep + 1}/{repeats}: {run.rep_median_ms[-1]:.1f} ms")
            except BaseException as exc:  # noqa: BLE001
                if isinstance(exc, KeyboardInterrupt):
                    raise
                run.fail(exc)
                run.free()


def finish_run(run: Run, cell: CellSpec, profile: bool) -> None:
    """Final loss, then one extra instrumented step (or encode slice): GPU busy time, kernel count,
    the tokens the backbone processed (padding)."""
    if run.status != "ok":
        return
    try:
        if cell.workload == "train":
            if run._last_loss is not None:
                run.loss_final = float(run._last_loss.float().item())
            fn = lambda: train_step(run)  # noqa: E731
            scale = 1.0
        else:
            n = min(len(cell.corpus), 4 * cell.batch_size)
            sl = list(cell.corpus[:n])
            fn = lambda: encode_pass(run, cell, sl)  # noqa: E731
            scale = len(cell.corpus) / max(1, n)
        with count_backbone_tokens(run) as counts:
            if profile and measure.is_cuda(cell.device):
                busy, kernels = measure.gpu_kernel_time(fn, cell.device)
            else:
                fn()
                busy, kernels = None, None
        if counts["calls"]:
            run.processed_tokens = int(counts["processed"] * scale)
            run.real_tokens_seen = int(counts["real"] * scale)
        elif run.kind == "fastst" and run.loss_ctx is not None:
            run.extra["packed_no_pad"] = True  # one packed forward (packed_columns) for all columns
        if busy is not None:
            run.busy_ms = busy * scale
            run.kernels = int(kernels * scale) if kernels is not None else None
    except BaseException as exc:  # noqa: BLE001
        if isinstance(exc, KeyboardInterrupt):
            raise
        run.notes.append(f"instrumented step failed: {type(exc).__name__}: {exc}")
    if run.kind == "flat":
        from .flat import NOTES

        run.notes += sorted(NOTES)


def _is_oom_run(run: Run) -> bool:
    return run.status == "failed" and ("out of memory" in (run.error or "").lower() or bool(run.extra.get("oom")))


def _fits_another(device: str, peaks_gb: list[float]) -> bool:
    if not measure.is_cuda(device) or not peaks_gb:
        return True
    import torch

    free, _total = torch.cuda.mem_get_info()
    cached = torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
    need = 1.25 * max(peaks_gb) * 1e9 + 2e9
    return free + cached > need


# ---------------------------------------------------------------------------------------- one cell


def run_cell(cell: CellSpec, info: CellInfo, opts, contenders: list[str]) -> list[Run]:
    """All contenders of one cell; returns their runs (freed)."""
    runs: list[Run] = []
    alive: list[Run] = []
    peaks: list[float] = []
    group = 0

    def build(name: str) -> Run:
        log(f"  build {name} ({cell.model_key}, L={cell.max_seq_length}, B={cell.batch_size})")
        mem = measure.MemoryWatch(cell.device)
        mem.start()
        t0 = time.perf_counter()
        run = build_contender(name, cell)
        if run.status == "ok":
            warmup_run(run, cell, opts.warmup, mem)
        run.extra["build_warmup_s"] = round(time.perf_counter() - t0, 2)
        return run

    def flush():
        nonlocal alive, group
        if alive:
            time_group(alive, cell, opts.steps, opts.repeats, group)
            # A contender that ran out of memory while timed beside others (a neighbour's CUDA-graph
            # pool can take what its own cache held at build time) is rebuilt and timed alone.
            again = [r for r in alive if _is_oom_run(r)] if len(alive) > 1 else []
            for r in alive:
                finish_run(r, cell, opts.profile)
                r.free()
            group += 1
            for old in again:
                log(f"  {old.name}: out of memory while timed beside others; rebuilding it and timing it alone")
                run = build(old.name)
                if run.status == "ok":
                    time_group([run], cell, opts.steps, opts.repeats, group)
                    finish_run(run, cell, opts.profile)
                    run.notes.append("timed alone: out of memory while timed beside the other contenders")
                    run.free()
                    group += 1
                runs[runs.index(old)] = run
        alive = []

    for name in contenders:
        if name == "unsloth":
            continue
        if opts.sequential or not _fits_another(cell.device, peaks):
            if alive and not opts.sequential:
                log(f"  not enough free memory to keep another {cell.model_key} alive: timing the group so far first")
            flush()
        for attempt in range(2):
            run = build(name)
            if _is_oom_run(run) and alive and attempt == 0:
                log(f"  {name}: out of memory beside {len(alive)} live contender(s); timing those first and retrying alone")
                flush()
                continue
            break
        if run.status == "ok":
            if run.peak_reserved_gb is not None:
                peaks.append(run.peak_reserved_gb)
            alive.append(run)
        else:
            log(f"  {name}: {run.status}: {run.error}")
        runs.append(run)
    flush()
    if "unsloth" in contenders:
        from .unsloth_worker import run_unsloth_subprocess

        runs.append(run_unsloth_subprocess(cell, opts))
        runs.sort(key=lambda r: contenders.index(r.name))  # records in the order asked for
    # contenders' outputs agree? (encode: cosine of embeddings / score difference vs stock)
    ref = next((r for r in runs if r.kind == "stock" and r.sample_output is not None), None)
    if ref is not None:
        for r in runs:
            if r.sample_output is not None and r is not ref:
                r.agreement = _agreement(ref.sample_output, r.sample_output, cell.api)
            elif r is ref:
                r.agreement = 0.0 if cell.api == "predict" else 1.0
    gc.collect()
    return runs


def _agreement(a, b, api: str) -> float | None:
    import torch

    try:
        if a.shape != b.shape:
            return None
        if api == "predict":
            return float((a - b).abs().max())
        return float(torch.nn.functional.cosine_similarity(a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1), dim=-1).mean())
    except Exception:
        return None


# ---------------------------------------------------------------------------------------- records


def run_record(run: Run, cell: CellSpec, info: CellInfo, env: dict, opts) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "record": "result",
        "workload": cell.workload,
        "model": cell.model_key,
        "model_source": getattr(cell.model_spec, "display", str(cell.model_spec)),
        "max_seq_len": cell.max_seq_length,
        "batch_size": cell.batch_size,
        "mode": cell.mode,
        "loss": cell.loss,
        "api": cell.api,
        "lora_r": cell.lora_r if cell.mode in ("lora", "qlora") else None,
        "dtype": cell.dtype_name,
        "contender": run.name,
        "status": run.status,
        "error": run.error,
        "notes": sorted(set(run.notes)),
        "steps": opts.steps if cell.workload == "train" else 1,
        "warmup": opts.warmup,
        "repeats": opts.repeats,
        "interleave_group": run.interleave_group,
        "long_docs": bool(opts.long_docs),
        "device": env.get("gpu") or cell.device,
    }
    rec.update({k: v for k, v in run.extra.items() if k not in ("traceback",)})
    if run.status != "ok" and "traceback" in run.extra:
        rec["traceback"] = run.extra["traceback"]
    n_batches = max(1, len(cell.batches_text)) if cell.workload == "train" else 1
    if run.status == "ok" and run.rep_median_ms:
        step_ms = statistics.median(run.rep_median_ms)
        # real tokens per step: the batches cycle; one repetition of `steps` steps covers steps/n_batches rounds
        tokens_per_step = info.real_tokens_per_rep / n_batches if cell.workload == "train" else info.real_tokens_per_rep
        texts_per_step = info.texts_per_rep / n_batches if cell.workload == "train" else info.texts_per_rep
        flops_per_step = info.flops_per_rep / n_batches if (info.flops_per_rep and cell.workload == "train") else info.flops_per_rep
        s = step_ms / 1000.0
        rec.update(
            step_ms=round(step_ms, 3),
            step_ms_per_step_median=round(measure.median(run.step_ms), 3) if cell.workload == "train" else None,
            rep_ms=[round(x, 3) for x in run.rep_median_ms],
            spread_pct=round(100.0 * (max(run.rep_median_ms) - min(run.rep_median_ms)) / step_ms, 1) if step_ms else None,
            real_tokens_per_step=round(tokens_per_step, 1),
            tokens_per_s=round(tokens_per_step / s, 1),
            pairs_per_s=round(texts_per_step / s, 2),
            flops_per_step=flops_per_step,
            tflops=round(flops_per_step / s / 1e12, 2) if flops_per_step else None,
            mfu=(flops_per_step / s / 1e12 / env["peak_tflops"]) if (flops_per_step and env.get("peak_tflops")) else None,
            peak_alloc_gb=_r(run.peak_alloc_gb),
            peak_reserved_gb=_r(run.peak_reserved_gb),
            gpu_busy=min(1.0, run.busy_ms / step_ms) if run.busy_ms is not None and step_ms else None,
            gpu_busy_ms=_r(run.busy_ms),
            kernels_per_step=run.kernels,
            loss_first=run.loss_first,
            loss_final=run.loss_final,
            agreement=run.agreement,
        )
        if run.processed_tokens:
            rec["pad_fraction"] = round(1.0 - (run.real_tokens_seen or 0) / run.processed_tokens, 4)
            rec["backbone_tokens_per_step"] = run.processed_tokens
        elif run.extra.get("packed_no_pad"):
            rec["pad_fraction"] = 0.0
    return rec


def _r(x, nd: int = 3):
    return None if x is None else round(float(x), nd)


def add_speedups(records: list[dict]) -> None:
    """speedup_vs_stock / speedup_vs_flat within each cell (same model, length, batch, mode, loss/api)."""
    def key(r):
        return (r["workload"], r["model"], r["max_seq_len"], r["batch_size"], r["mode"], r["loss"], r["api"], r.get("long_docs"))

    by: dict = {}
    for r in records:
        if r.get("record") == "result":
            by.setdefault(key(r), []).append(r)
    for group in by.values():
        base = {r["contender"]: r.get("tokens_per_s") for r in group if r.get("status") == "ok"}
        for r in group:
            tps = r.get("tokens_per_s")
            r["speedup_vs_stock"] = round(tps / base["stock"], 3) if tps and base.get("stock") else None
            r["speedup_vs_flat"] = round(tps / base["flat"], 3) if tps and base.get("flat") else None


def write_jsonl(path: str, records: list[dict]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, default=_json_default) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _json_default(o):
    try:
        return float(o)
    except Exception:
        return str(o)


def read_jsonl(path: str) -> list[dict]:
    out = []
    if not os.path.exists(path):
        return out
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    pass  # a line cut short by a killed run
    return out


def load_data(opts):
    return load_pairs(opts.data)
