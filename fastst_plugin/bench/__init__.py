"""``fastst bench``: the one harness every speed and memory figure of fastst comes from.

Workloads::

    fastst bench train   [options]   # loss forward + backward + AdamW step, per contender
    fastst bench encode  [options]   # encode / encode_query / encode_document / CrossEncoder.predict /
                                     # SparseEncoder (SPLADE) encode (--api sparse-encode)
    fastst bench report  --out DIR   # re-render table.md and chart.png from DIR/results.jsonl
    fastst bench ddp     [options]   # the real trainer under DDP, 1 vs N GPUs (fastst_plugin.bench.ddp;
                                     # torchrun --nproc_per_node N --no-python fastst bench ddp ...)

Contenders, measured in one process on the same batches, A/B-interleaved over ``--repeats``
repetitions (medians reported): ``stock`` (SDPA, padded), ``flat`` (ST's own flattening through a
varlen FlashAttention kernel), ``unsloth`` (``FastSentenceTransformer``, its own process, when
``import unsloth`` works), ``fastst`` (``enable_fast``). Output: a table on the terminal,
``DIR/results.jsonl`` (one line per contender and cell, flushed as each cell finishes),
``DIR/table.md`` and ``DIR/chart.png``. See docs/benchmarks.md for the columns and the method.

Entry point: :func:`main` (``fastst bench ...`` calls ``main(argv)``; also ``python -m
fastst_plugin.bench ...``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import shlex
import sys
import time

__all__ = ["main", "build_parser"]

DEFAULT_MODELS = "minilm,bert-base,modernbert-base,embeddinggemma-300m,qwen3-0.6b,qwen3-4b"
SMOKE_MODELS = "minilm,qwen3-0.6b"


def _int_list(s: str) -> list[int]:
    return [int(x) for x in str(s).split(",") if x.strip()]


def _kv(s: str) -> tuple[str, object]:
    if "=" not in s:
        raise argparse.ArgumentTypeError(f"--fastst-opt expects KEY=VALUE, got {s!r}")
    k, v = s.split("=", 1)
    low = v.lower()
    val: object = v
    if low in ("true", "false"):
        val = low == "true"
    elif low in ("none", "null"):
        val = None
    else:
        try:
            val = int(v)
        except ValueError:
            pass
    return k.strip(), val


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastst bench",
        description="Benchmark stock sentence-transformers, its flattened path, Unsloth and fastst on the same data.",
    )
    sub = p.add_subparsers(dest="workload", required=True)

    def common(sp):
        g = sp.add_argument_group("what to run")
        g.add_argument("--models", default=None, help=f"comma list of {DEFAULT_MODELS} or local model folders (default: all six)")
        g.add_argument("--max-seq-length", default=None, help="comma list, e.g. 128,256,512,1024,2048 (default 256 train, 512 encode)")
        g.add_argument("--batch-size", default=None, help="comma list; pairs per step (train, default 64) or encode batch (default 128)")
        g.add_argument("--contenders", default="stock,flat,unsloth,fastst", help="comma list of stock,flat,unsloth,fastst; a contender may carry environment settings, 'fastst+FASTST_FUSED_SIMILARITY=0', set only while it builds and steps (A/B of a switch in one process)")
        g.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32", "amp-bf16"], help="weights dtype (default bf16; fp32 for --smoke on the CPU); amp-bf16 = fp32 weights + bf16 autocast")
        g.add_argument("--data", default=None, help="JSONL (.jsonl[.gz]) of {query, document}, or a datasets folder (default: bundled Debian pairs)")
        g.add_argument("--long-docs", action="store_true", help="documents of concatenated descriptions, U[L/2, L] tokens each (for 1024-2048)")
        g.add_argument("--no-dropout", action="store_true", help="set the configs' dropout to 0 (exactly comparable losses)")
        g.add_argument("--seed", type=int, default=0)
        g.add_argument("--fastst-opt", action="append", type=_kv, default=[], metavar="KEY=VALUE", help="extra enable_fast option (repeatable)")
        t = sp.add_argument_group("timing")
        t.add_argument("--steps", type=int, default=None, help="timed steps per repetition (train; default 10)")
        t.add_argument("--warmup", type=int, default=None, help="untimed warm-up steps / passes (default 3 train, 2 encode)")
        t.add_argument("--repeats", type=int, default=None, help="interleaved repetitions (default 3)")
        t.add_argument("--sequential", action="store_true", help="never keep two contenders' models alive at once")
        t.add_argument("--no-profile", dest="profile", action="store_false", help="skip the profiled step (GPU busy %%, kernel count)")
        t.add_argument("--time-budget", type=float, default=None, metavar="SECONDS", help="skip the remaining cells once this much time has passed")
        t.add_argument("--device", default=None, help="cuda (default when available) or cpu")
        o = sp.add_argument_group("output")
        o.add_argument("--out", default="bench-results", help="folder for results.jsonl, table.md, chart.png")
        o.add_argument("--append", action="store_true", help="add to DIR/results.jsonl instead of starting it afresh (table and chart cover all)")
        o.add_argument("--smoke", action="store_true", help="tiny configs, CPU is fine, 2 steps: checks the harness, measures nothing")

    tr = sub.add_parser("train", help="training steps of a real loss")
    common(tr)
    tr.add_argument("--mode", default="lora", choices=["lora", "full", "qlora"])
    tr.add_argument("--lora-r", type=int, default=32)
    tr.add_argument("--loss", default="mnrl", choices=["mnrl", "cached-mnrl", "cosent", "ce"])
    tr.add_argument("--mini-batch-size", type=int, default=32, help="CachedMNRL mini-batch")
    tr.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default 1e-4 LoRA, 2e-5 full)")

    en = sub.add_parser("encode", help="encode a corpus")
    common(en)
    en.add_argument("--api", default="encode", choices=["encode", "encode_query", "encode_document", "predict", "sparse-encode"],
                    help="sparse-encode: a SparseEncoder (the model's *ForMaskedLM + SpladePooling('max')), SparseEncoder.encode")
    en.add_argument("--sparse-active-dims", type=int, default=200, metavar="N",
                    help="sparse-encode on a built model: shift the MLM decoder bias so that about N vocabulary dimensions per "
                    "document are active, as in a trained SPLADE model (default 200; 0 keeps the random weights, which "
                    "activate nearly the whole vocabulary)")
    en.add_argument("--corpus-size", type=int, default=None, help="texts per pass (default 2048)")

    sub.add_parser("ddp", add_help=False, help="the real trainer under DDP, 1 vs N GPUs (options: fastst bench ddp --help)")
    rp = sub.add_parser("report", help="re-render table.md and chart.png from DIR/results.jsonl (or merge several runs)")
    rp.add_argument("--out", default="bench-results", help="folder to write table.md / chart.png (and the merged results.jsonl)")
    rp.add_argument("--inputs", nargs="*", default=None, help="results folders or .jsonl files to merge (default: OUT/results.jsonl)")
    return p


def _finalize(opts) -> None:
    import torch

    w = opts.workload
    if opts.device is None:
        opts.device = "cuda" if torch.cuda.is_available() else "cpu"
    if opts.dtype is None:
        opts.dtype = "fp32" if (opts.smoke and not opts.device.startswith("cuda")) else "bf16"
    if opts.smoke:
        opts.models = opts.models or SMOKE_MODELS
        opts.max_seq_length = opts.max_seq_length or "32"
        opts.batch_size = opts.batch_size or "4"
        opts.steps = opts.steps or 2
        opts.warmup = 1 if opts.warmup is None else opts.warmup
        opts.repeats = opts.repeats or 2
        if w == "encode":
            opts.corpus_size = opts.corpus_size or 16
    opts.models = opts.models or DEFAULT_MODELS
    opts.max_seq_length = _int_list(opts.max_seq_length or ("256" if w == "train" else "512"))
    opts.batch_size = _int_list(opts.batch_size or ("64" if w == "train" else "128"))
    opts.steps = opts.steps or 10
    # encode: two whole-corpus passes. fastst captures an inference graph bucket on its second
    # sighting, so a bucket met once per call (a call's first or last batch) is captured in the
    # second call: with one warm-up pass that capture landed in the first timed repetition
    # (measured on an H200: bert-base 410 vs 318 ms, Qwen3-0.6B 1,884 vs 1,374 ms).
    opts.warmup = (3 if w == "train" else 2) if opts.warmup is None else opts.warmup
    opts.repeats = opts.repeats or 3
    if w == "train":
        opts.api = "-"
        opts.corpus_size = 0
        opts.sparse_active_dims = 0
        if opts.lr is None:
            opts.lr = 2e-5 if opts.mode == "full" else 1e-4
    else:
        opts.mode, opts.loss, opts.lora_r, opts.lr, opts.mini_batch_size = "inference", "-", 0, 0.0, 0
        opts.corpus_size = opts.corpus_size or 2048
    opts.fastst_options = dict(opts.fastst_opt)
    contenders = [c.strip() for c in opts.contenders.split(",") if c.strip()]
    from .contenders import parse_contender

    for c in contenders:
        try:
            parse_contender(c)
        except ValueError as exc:
            raise SystemExit(f"fastst bench: {exc}") from None
    opts.contender_list = contenders


def environment(opts) -> dict:
    import platform

    from .measure import measure_peak_tflops
    from .versions_info import versions

    gpu = None
    if opts.device.startswith("cuda"):
        import torch

        gpu = torch.cuda.get_device_name()
    peak = None
    if opts.device.startswith("cuda"):
        peak = measure_peak_tflops(opts.device)
    return {
        "record": "env",
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "command": "fastst bench " + " ".join(shlex.quote(a) for a in opts.argv),
        "device": opts.device,
        "gpu": gpu,
        "peak_tflops": peak,
        "python": platform.python_version(),
        "versions": versions(),
        "smoke": bool(opts.smoke),
    }


def main(argv: list[str] | None = None) -> int:
    """Run ``fastst bench``; returns the exit status (0 even when some contenders failed: their rows
    say why)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "ddp":
        # The multi-GPU runner (its own options; one process per GPU under torchrun):
        # `torchrun --nproc_per_node 2 --no-python fastst bench ddp ...`, `fastst bench ddp compare DIR`.
        from .ddp import main as ddp_main

        return ddp_main(argv[1:])
    opts = build_parser().parse_args(argv)
    opts.argv = argv
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from . import report
    from .runner import read_jsonl

    if opts.workload == "report":
        from .runner import add_speedups, write_jsonl

        records: list[dict] = []
        for src in opts.inputs or [opts.out]:
            records += read_jsonl(os.path.join(src, "results.jsonl") if os.path.isdir(src) else src)
        if not any(r.get("record") == "result" for r in records):
            print(f"fastst bench report: no results in {opts.inputs or [opts.out]}", file=sys.stderr)
            return 1
        os.makedirs(opts.out, exist_ok=True)
        if opts.inputs:
            merged = os.path.join(opts.out, "results.jsonl")
            if os.path.exists(merged):
                os.remove(merged)
            write_jsonl(merged, records)
        add_speedups(records)
        print(report.render(opts.out, records))
        return 0

    _finalize(opts)
    return _run(opts)


def _quiet_libraries() -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    for name in ("transformers", "sentence_transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except Exception:
        pass


def _run(opts) -> int:
    from . import report
    from .runner import add_speedups, cell_info, load_data, log, make_cell, read_jsonl, run_cell, run_record, unsupported_reason, write_jsonl

    _quiet_libraries()
    os.makedirs(opts.out, exist_ok=True)
    path = os.path.join(opts.out, "results.jsonl")
    if not opts.append and os.path.exists(path):
        os.remove(path)
    t_start = time.monotonic()
    env = environment(opts)
    write_jsonl(path, [env])
    log(
        f"{opts.workload}: device {env['gpu'] or opts.device}"
        + (f", bf16 matmul peak {env['peak_tflops']:.0f} TFLOP/s" if env["peak_tflops"] else "")
        + f"; contenders {','.join(opts.contender_list)}"
    )
    pairs = load_data(opts)
    models = [m.strip() for m in opts.models.split(",") if m.strip()]
    cells = [(m, L, B) for m in models for L in opts.max_seq_length for B in opts.batch_size]
    for i, (m, L, B) in enumerate(cells):
        elapsed = time.monotonic() - t_start
        cell = make_cell(opts, m, L, B, pairs)
        if opts.time_budget is not None and elapsed > opts.time_budget:
            log(f"time budget {opts.time_budget:.0f}s spent ({elapsed:.0f}s): skipping {m} L={L} B={B}")
            write_jsonl(path, [_skip_record(cell, c, f"time budget of {opts.time_budget:.0f}s spent") for c in opts.contender_list])
            continue
        unsupported = unsupported_reason(cell)
        if unsupported:
            log(f"skip {m} L={L}: {unsupported}")
            write_jsonl(path, [_skip_record(cell, c, unsupported) for c in opts.contender_list])
            continue
        info = cell_info(cell)
        if info.max_position_embeddings and L > info.max_position_embeddings:
            log(f"skip {m} L={L}: the model has {info.max_position_embeddings} positions")
            write_jsonl(path, [_skip_record(cell, c, f"max_seq_length {L} > max_position_embeddings {info.max_position_embeddings}") for c in opts.contender_list])
            continue
        log(f"cell {i + 1}/{len(cells)}: {m} L={L} B={B} ({info.real_tokens_per_rep / max(1, (opts.steps if opts.workload == 'train' else 1)):.0f} real tokens per step)")
        runs = run_cell(cell, info, opts, opts.contender_list)
        recs = [run_record(r, cell, info, env, opts) for r in runs]
        add_speedups(recs)
        write_jsonl(path, recs)
        for r in recs:
            if r["status"] == "ok":
                log(
                    f"  {r['contender']:7s} {r['step_ms']:9.1f} ms  {r['tokens_per_s']:>12,.0f} tok/s  "
                    + (f"x{r['speedup_vs_stock']:.2f} vs stock" if r.get("speedup_vs_stock") else "")
                )
            else:
                log(f"  {r['contender']:7s} {r['status']}: {r['error']}")
        # table and chart after every cell: a run killed at its time limit still leaves both
        try:
            so_far = read_jsonl(path)
            add_speedups(so_far)
            report.render(opts.out, so_far, env["command"])
        except Exception as exc:  # pragma: no cover - drawing must never cost the measurements
            log(f"  could not draw the table/chart yet: {type(exc).__name__}: {exc}")
    records = read_jsonl(path)
    add_speedups(records)
    text = report.render(opts.out, records, env["command"])
    print(text)
    log(f"done in {time.monotonic() - t_start:.0f}s: {path}, {os.path.join(opts.out, 'table.md')}, {os.path.join(opts.out, 'chart.png')}")
    return 0


def _skip_record(cell, contender: str, why: str) -> dict:
    return {
        "record": "result",
        "workload": cell.workload,
        "model": cell.model_key,
        "max_seq_len": cell.max_seq_length,
        "batch_size": cell.batch_size,
        "mode": cell.mode,
        "loss": cell.loss,
        "api": cell.api,
        "contender": contender,
        "status": "skipped",
        "error": why,
    }
