"""The Unsloth contender, in a process of its own.

``import unsloth`` must come before transformers (it patches them on import), and it patches them
for everyone in the process, so it cannot share a process with the stock contenders. The parent
writes the cell (texts, options) to a JSON file and runs::

    python -c "import unsloth; ...; worker_main([spec.json, out.json])"

The worker builds the same random-weight model (same seed), saves it to a temporary folder, loads it
with ``FastSentenceTransformer.from_pretrained`` (and ``get_peft_model`` for LoRA), and runs the same
warm-up, timing and instrumented step as the in-process contenders, driven by the same loop (so
without the ``torch.compile`` Unsloth's trainer adds when ``max_steps`` is large). Its repetitions
are not interleaved with the others (another process): its ratio to stock carries more noise.
"""

from __future__ import annotations

import dataclasses
import gc
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time

_FIELDS_OUT = (
    "status",
    "error",
    "notes",
    "step_ms",
    "rep_median_ms",
    "loss_first",
    "loss_final",
    "peak_alloc_gb",
    "peak_reserved_gb",
    "busy_ms",
    "kernels",
    "processed_tokens",
    "real_tokens_seen",
    "extra",
)


def unsloth_available() -> tuple[bool, str | None]:
    try:
        if importlib.util.find_spec("unsloth") is None:
            return False, "unsloth is not installed"
    except (ImportError, ValueError) as exc:
        return False, f"unsloth cannot be found ({exc})"
    return True, None


def run_unsloth_subprocess(cell, opts):
    from .contenders import Run

    run = Run("unsloth")
    ok, why = unsloth_available()
    if not ok:
        return run.fail(f"{why}", status="unavailable")
    if cell.cross_encoder:
        return run.fail("Unsloth's FastSentenceTransformer has no CrossEncoder", status="unavailable")
    if getattr(cell, "sparse", False):
        return run.fail("not wired for SparseEncoder cells (the harness runs Unsloth's FastSentenceTransformer only)", status="unavailable")
    if not cell.device.startswith("cuda") and not os.environ.get("FASTST_BENCH_UNSLOTH_ON_CPU"):  # (the env var: plumbing tests)
        return run.fail("Unsloth needs a CUDA GPU", status="unavailable")
    spec = {
        "cell": {k: v for k, v in dataclasses.asdict(cell).items() if k != "model_spec"},
        "model": cell.model_spec if isinstance(cell.model_spec, str) else cell.model_spec.key,
        "steps": opts.steps,
        "warmup": opts.warmup,
        "repeats": opts.repeats,
        "profile": opts.profile,
    }
    d = tempfile.mkdtemp(prefix="fastst-bench-unsloth-")
    spec_path, out_path = os.path.join(d, "spec.json"), os.path.join(d, "out.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", UNSLOTH_DISABLE_STATISTICS="1")
    code = (
        "import unsloth, sys; from fastst_plugin.bench.unsloth_worker import worker_main; "
        "sys.exit(worker_main(sys.argv[1:]))"
    )
    try:
        import torch

        torch.cuda.empty_cache()
    except Exception:
        pass
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-c", code, spec_path, out_path], env=env, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        return run.fail("unsloth worker timed out (900 s)")
    run.extra["process_s"] = round(time.perf_counter() - t0, 1)
    if not os.path.exists(out_path):
        tail = (proc.stderr or proc.stdout or "")[-1500:]
        return run.fail(f"unsloth worker exited {proc.returncode} without results: {tail.strip()}")
    with open(out_path) as f:
        res = json.load(f)
    for k in _FIELDS_OUT:
        if k in res:
            setattr(run, k, res[k] if k != "extra" else {**run.extra, **res[k]})
    if res.get("sample_output") is not None:
        import torch

        run.sample_output = torch.tensor(res["sample_output"])
    run.interleave_group = None
    run.notes.append("separate process (import order): not interleaved with the others")
    return run


def worker_main(argv: list[str]) -> int:
    spec_path, out_path = argv[0], argv[1]
    with open(spec_path) as f:
        spec = json.load(f)
    from .contenders import CellSpec, Run
    from .measure import MemoryWatch
    from .models import resolve_model
    from .runner import finish_run, time_group, warmup_run

    cdict = dict(spec["cell"])
    cdict["batches_text"] = [tuple(b) for b in cdict["batches_text"]]
    cdict["corpus"] = [tuple(c) if isinstance(c, list) else c for c in cdict["corpus"]]
    cell = CellSpec(model_spec=resolve_model(spec["model"]), **cdict)
    run = Run("unsloth")
    try:
        mem = MemoryWatch(cell.device)
        mem.start()
        _build_unsloth(run, cell)
        if run.status == "ok":
            warmup_run(run, cell, spec["warmup"], mem)
        if run.status == "ok":
            time_group([run], cell, spec["steps"], spec["repeats"], -1)
            finish_run(run, cell, spec["profile"])
    except BaseException as exc:  # noqa: BLE001
        run.fail(exc)
    out = {k: getattr(run, k) for k in _FIELDS_OUT}
    out["extra"] = {k: v for k, v in run.extra.items()}
    if run.sample_output is not None:
        out["sample_output"] = run.sample_output.tolist()
    with open(out_path, "w") as f:
        json.dump(out, f, default=str)
    return 0


def _build_unsloth(run, cell) -> None:
    import torch
    from unsloth import FastSentenceTransformer

    from .contenders import _preprocess, autocast_ctx, make_loss, to_device, torch_dtype
    from .models import BuiltModel, build_model, layer_linear_names

    dtype = torch_dtype(cell.dtype_name)
    built = build_model(
        cell.model_spec, max_seq_length=cell.max_seq_length, device=cell.device, dtype=dtype, smoke=cell.smoke, seed=cell.seed, dropout=cell.dropout
    )
    short_targets = sorted({n.rsplit(".", 1)[-1] for n in layer_linear_names(built.hf_model)})
    folder = tempfile.mkdtemp(prefix="fastst-bench-unsloth-model-")
    built.model.save(folder)
    del built
    gc.collect()
    torch.cuda.empty_cache()

    kwargs = dict(max_seq_length=cell.max_seq_length, dtype=torch.bfloat16 if cell.dtype_name in ("bf16", "amp-bf16") else dtype)
    if cell.workload == "train":
        kwargs["full_finetuning"] = cell.mode == "full"
        kwargs["load_in_4bit"] = cell.mode == "qlora"
    else:
        kwargs["for_inference"] = True
    model = FastSentenceTransformer.from_pretrained(folder, **kwargs)
    if cell.workload == "train" and cell.mode in ("lora", "qlora"):
        torch.manual_seed(cell.seed + 1)
        model = FastSentenceTransformer.get_peft_model(
            model,
            r=cell.lora_r,
            lora_alpha=cell.lora_r,
            lora_dropout=0,
            bias="none",
            target_modules=short_targets,
            use_gradient_checkpointing=False,
            random_state=cell.seed,
            task_type="FEATURE_EXTRACTION",
        )
    if cell.dtype_name == "bf16":
        model.bfloat16()
    model.to(cell.device)
    transformer = model[0]
    hf = getattr(transformer, "model", None) or getattr(transformer, "auto_model", None)
    run.built = BuiltModel(model, transformer, hf, getattr(hf, "config", None), "saved BERT tokenizer", folder)
    run.autocast = autocast_ctx(cell)
    if cell.workload == "encode":
        model.eval()
        return
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    run.extra["trainable_params"] = sum(p.numel() for p in params)
    try:
        run.optimizer = torch.optim.AdamW(params, lr=cell.lr, fused=True)
    except (TypeError, RuntimeError):
        run.optimizer = torch.optim.AdamW(params, lr=cell.lr)
    run.loss_fn = make_loss(cell, model)
    for queries, docs, labels in cell.batches_text:
        lab = None if labels is None else torch.tensor(labels, dtype=torch.float32, device=cell.device)
        feats = [to_device(_preprocess(model, list(queries)), cell.device), to_device(_preprocess(model, list(docs)), cell.device)]
        run.batches.append((feats, lab))
