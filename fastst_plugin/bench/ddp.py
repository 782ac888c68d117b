"""Multi-GPU (DDP) training with the real ``SentenceTransformerTrainer``: loss curve and throughput.

One process per GPU, launched by torchrun (or one plain process for the 1-GPU reference)::

    python -m fastst_plugin.bench.ddp --model bert-base --lora-r 32 --global-batch 128 --bf16 --no-dropout --out DIR
    torchrun --nproc_per_node 2 -m fastst_plugin.bench.ddp --model bert-base --lora-r 32 --global-batch 128 \
        --bf16 --no-dropout --out DIR
    python -m fastst_plugin.bench.ddp compare DIR      # 1 GPU vs N GPUs: max |loss diff|, throughput ratio

What is trained: a stock ``SentenceTransformer`` of the real architecture with random weights (built
from its config by :mod:`.models`, nothing downloaded), ``MultipleNegativesRankingLoss`` on the
bundled Debian pairs, ``SentenceTransformerTrainer`` with ``max_steps``; ``--contender fastst`` adds
``enable_fast(model, lora=...)``, ``stock`` applies LoRA through peft the way stock users get it.

Why the 1-GPU and N-GPU runs see the same batches and compute the same loss:

* Data order. The trainer's default batch sampler draws one permutation from ``--seed`` (the same
  on every rank and for every world size) and cuts it into per-device batches; accelerate then hands
  rank ``r`` batches ``r, r+N, r+2N…``. So with a per-device batch of ``global/N``, the N ranks of
  step ``k`` hold exactly the rows of the 1-GPU run's step ``k`` (batch ``global``), in order.
* In-batch negatives. MNRL's negatives are per device unless ``gather_across_devices=True``: then each
  rank scores its own anchors against the documents of all ranks (gathered with gradients), i.e.
  against the same ``global`` documents, in the same order, as on one GPU. The loss of rank ``r`` is
  the mean over its anchors, so the mean over ranks is the 1-GPU loss. The gather's backward hands
  each rank the gradients that every rank's loss sends to its embeddings, and DDP averages the
  ranks' parameter gradients: together, the gradient of the mean loss.
* ``--no-dropout`` removes the only randomness in the step (per-rank RNG streams differ).

What is recorded, per run, in ``DIR/ddp-<model>-<mode>-<N>gpu-<ckpt>[-stock].jsonl`` (rank 0 writes):
one ``step`` line per optimizer step (the loss averaged over ranks = the 1-GPU loss, rank 0's own
loss, real tokens of all ranks, step time) and one ``summary`` line: real (non-padding) tokens per
second across all ranks (the median over the steps after ``--warmup`` of tokens/step-time; step time
= the slowest rank's, from CUDA events at each step end), peak memory, and what the fast path did
(CUDA graphs captured / forwards replayed vs eager per rank, packed loss forwards).

Several configurations can share one process (``--lora-r 32,0``, ``--gradient-checkpointing off,on``),
which saves the start-up and kernel compilation of a process per run; each gets its own file.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import glob
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

from .data import load_pairs
from .models import apply_lora_stock, build_model, cleanup_folder, lora_config, resolve_model


def _log(msg: str) -> None:
    rank = os.environ.get("RANK", "0")
    print(f"[ddp r{rank} {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------- options


def _csv(kind):
    def parse(s: str):
        return [kind(x) for x in str(s).split(",") if x.strip()]

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastst_plugin.bench.ddp", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="bert-base", help="a fastst bench model name (bert-base, embeddinggemma-300m, ...) or a local folder")
    p.add_argument("--smoke", action="store_true", help="the model's tiny test config (2 layers, width 64): CPU tests")
    p.add_argument("--contender", default="fastst", choices=["fastst", "stock"])
    p.add_argument("--lora-r", type=_csv(int), default=[32], help="LoRA rank on every linear layer; 0 = full fine-tuning; comma list = one run each")
    p.add_argument(
        "--gradient-checkpointing", nargs="?", const=["on"], default=["off"], type=_csv(str),
        help="off | on | off,on (one run each); the flag alone means on",
    )
    p.add_argument("--global-batch", type=int, default=128, help="pairs per optimizer step over all ranks (per device: global / world size)")
    p.add_argument(
        "--per-device-batch", type=int, default=None,
        help="pairs per device instead (global = this x world size): the fixed-per-GPU-work scaling runs",
    )
    p.add_argument("--grad-accum", type=int, default=1,
                   help="gradient_accumulation_steps (per device and micro-batch: global / (world size x this))")
    p.add_argument("--max-seq-length", type=int, default=256)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the throughput median (graph capture, autotuning)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--bf16", action="store_true", help="bf16 weights (as fastst bench; no autocast, so CUDA graphs stay eligible); else fp32")
    p.add_argument("--no-dropout", action="store_true", help="dropout 0: the only per-rank randomness gone (comparable loss curves)")
    p.add_argument("--no-gather", action="store_true", help="per-device in-batch negatives (MNRL gather_across_devices=False)")
    p.add_argument("--loss", default="mnrl", choices=["mnrl", "cached-mnrl"], help="MultipleNegativesRankingLoss or its cached (GradCache) form")
    p.add_argument("--mini-batch-size", type=int, default=16, help="cached-mnrl's mini-batch size")
    p.add_argument("--no-cuda-graphs", action="store_true", help="fastst without CUDA graphs (A/B of the graphs under DDP)")
    p.add_argument("--find-unused", default="auto", choices=["auto", "true", "false"], help="ddp_find_unused_parameters (auto: the trainer's default)")
    p.add_argument("--static-graph", action="store_true", help="ddp_static_graph=True")
    p.add_argument(
        "--force-ddp", action="store_true",
        help="wrap the model in DistributedDataParallel even with one process (torchrun --nproc_per_node 1: "
        "DDP's hooks and NCCL on a single GPU, for experiments)",
    )
    p.add_argument("--data", default=None, help="pairs file (default: the bundled Debian pairs)")
    p.add_argument("--output-dir", default=None, help="the trainer's output_dir, kept (default: a temporary folder, removed)")
    p.add_argument("--save-steps", type=int, default=0, help="save a checkpoint every N steps (default: none)")
    p.add_argument("--resume-from", default=None, help="resume_from_checkpoint: steps before it are not run again")
    p.add_argument("--out", default="ddp-results", help="folder for the jsonl files")
    p.add_argument("--tag", default="", help="appended to the file names")
    return p


def run_name(model_key: str, lora_r: int, world: int, ckpt: str, contender: str, tag: str = "") -> str:
    mode = f"lora{lora_r}" if lora_r else "full"
    name = f"ddp-{model_key}-{mode}-{world}gpu-{'ckpt' if ckpt == 'on' else 'nockpt'}"
    if contender != "fastst":
        name += f"-{contender}"
    if tag:
        name += f"-{tag}"
    return name + ".jsonl"


# ------------------------------------------------------------------------------------- instrumentation


class _Counters:
    """What the fast path did, counted by wrapping two functions for the duration of a run."""

    def __init__(self):
        self.graphed = 0
        self.eager = 0
        self.packed = 0

    @contextlib.contextmanager
    def installed(self):
        from fastst_plugin import graphs, packed_loss

        orig_run = graphs.GraphedEncoder.run
        orig_combined = packed_loss._forward_combined
        counters = self

        def run(self, hp, device):
            out = orig_run(self, hp, device)
            if out is None:
                counters.eager += 1
            else:
                counters.graphed += 1
            return out

        def forward_combined(*args, **kwargs):
            counters.packed += 1
            return orig_combined(*args, **kwargs)

        graphs.GraphedEncoder.run = run
        packed_loss._forward_combined = forward_combined
        try:
            yield self
        finally:
            graphs.GraphedEncoder.run = orig_run
            packed_loss._forward_combined = orig_combined


def _make_trainer_class():
    from sentence_transformers import SentenceTransformerTrainer
    from transformers import TrainerCallback

    class RecordingTrainer(SentenceTransformerTrainer):
        """Records each training step's loss and real tokens as device tensors (no host sync)."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.step_losses: list = []
            self.step_tokens: list = []
            self.ddp_synced_calls = 0
            # Host wall time per step: waiting for the next batch (collation, when not prefetched) and
            # in training_step (forward + backward launches, and any wait for the GPU inside).
            self.host_ms: dict[str, list[float]] = {"batch_wait": [], "training_step": []}

        def _timed(self, key: str, call, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return call(*args, **kwargs)
            finally:
                self.host_ms[key].append((time.perf_counter() - t0) * 1000.0)

        def get_batch_samples(self, *args, **kwargs):
            return self._timed("batch_wait", super().get_batch_samples, *args, **kwargs)

        def training_step(self, *args, **kwargs):
            return self._timed("training_step", super().training_step, *args, **kwargs)

        def compute_loss(self, model, inputs, *args, **kwargs):
            if model.training and getattr(model, "require_backward_grad_sync", False):
                self.ddp_synced_calls += 1  # DDP's own reducer runs in this micro-step's backward
            tokens = None
            if model.training:
                masks = [v for k, v in inputs.items() if k.endswith("attention_mask") and hasattr(v, "sum")]
                if masks:
                    tokens = sum(m.sum() for m in masks)
            result = super().compute_loss(model, inputs, *args, **kwargs)
            if model.training:
                loss = result[0] if isinstance(result, tuple) else result
                self.step_losses.append(loss.detach().float().reshape(()))
                self.step_tokens.append(tokens)
            return result

    class StepClock(TrainerCallback):
        """A CUDA event (GPU timeline) and a host timestamp at every step end."""

        def __init__(self, cuda: bool):
            self.cuda = cuda
            self.events: list = []
            self.host: list[float] = []

        def _mark(self):
            import torch

            if self.cuda:
                ev = torch.cuda.Event(enable_timing=True)
                ev.record()
                self.events.append(ev)
            self.host.append(time.perf_counter())

        def on_train_begin(self, args, state, control, **kwargs):
            self._mark()

        def on_step_end(self, args, state, control, **kwargs):
            self._mark()
            start = getattr(self, "profile_from", None)
            if start is not None and state.global_step == start[0]:
                start[1].enable()
            trace = getattr(self, "trace", None)
            if trace is not None:
                trace.on_step_end(state.global_step)

        def intervals_ms(self) -> list[float]:
            import torch

            if self.cuda:
                torch.cuda.synchronize()
                return [a.elapsed_time(b) for a, b in zip(self.events, self.events[1:])]
            return [(b - a) * 1000.0 for a, b in zip(self.host, self.host[1:])]

    return RecordingTrainer, StepClock


# ----------------------------------------------------------------------------------------------- one run


def _ddp_reduce_count() -> int:
    """Training steps whose gradients fastst reduced itself (``FASTST_DDP_REDUCE=fastst``), this process."""
    from fastst_plugin import ddp_reduce

    return ddp_reduce.stats["reductions"]


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _reduce(values: list[float], device, op: str) -> list[float]:
    """Element-wise sum / max over ranks (identity on one process)."""
    import torch

    if not values:
        return []
    dist = _dist()
    t = torch.tensor(values, dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
    if dist is not None and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return [float(x) for x in t.cpu().tolist()]


def _gather_obj(obj) -> list:
    dist = _dist()
    if dist is None or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def train_once(opts, lora_r: int, ckpt: str, pairs) -> dict[str, Any] | None:
    import torch
    from sentence_transformers import SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if opts.per_device_batch:
        opts.global_batch = opts.per_device_batch * world * max(1, opts.grad_accum)
    if opts.global_batch % world:
        raise SystemExit(f"--global-batch {opts.global_batch} is not divisible by the world size {world}")
    accum = max(1, opts.grad_accum)
    if opts.global_batch % (world * accum):
        raise SystemExit(f"--global-batch {opts.global_batch} is not divisible by world size x --grad-accum ({world} x {accum})")
    per_device = opts.global_batch // (world * accum)
    cuda = torch.cuda.is_available()
    spec = resolve_model(opts.model)
    model_key = getattr(spec, "key", os.path.basename(os.path.normpath(str(opts.model))))
    tag = opts.tag or (f"pd{opts.per_device_batch}" if opts.per_device_batch else "")
    if opts.loss != "mnrl":
        tag = f"{opts.loss}-{tag}" if tag else opts.loss
    if accum > 1:
        tag = f"{tag}-accum{accum}" if tag else f"accum{accum}"
    name = run_name(model_key, lora_r, world, ckpt, opts.contender, tag)
    fast = opts.contender == "fastst"

    find_unused = {"auto": None, "true": True, "false": False}[opts.find_unused]
    # fastst: the trainer's own switch (what users set); the trainer's checkpointing call lands in
    # the fast encoder. stock: transformers' checkpointing is enabled on the HF model below instead,
    # because ST 6.0.x's gradient_checkpointing_enable rejects the trainer's keywords.
    # transformers >= 5.2x renamed the field (the old name warns).
    ckpt_kwargs = {}
    if ckpt == "on" and fast:
        names = {f.name for f in dataclasses.fields(SentenceTransformerTrainingArguments)}
        ckpt_kwargs["activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"] = True
    workdir = opts.output_dir or tempfile.mkdtemp(prefix="fastst-ddp-")
    args = SentenceTransformerTrainingArguments(
        output_dir=workdir,
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accum,
        max_steps=opts.steps,
        learning_rate=opts.lr,
        warmup_steps=0,
        logging_steps=opts.steps,  # the trainer's logging syncs the host: once, at the end
        save_strategy="steps" if opts.save_steps else "no",
        save_steps=opts.save_steps or 500,
        eval_strategy="no",
        report_to="none",
        seed=opts.seed,
        data_seed=opts.seed,
        disable_tqdm=True,
        dataloader_drop_last=True,
        use_cpu=not cuda,
        ddp_backend="gloo" if (not cuda and "LOCAL_RANK" in os.environ) else None,
        ddp_find_unused_parameters=find_unused,
        ddp_static_graph=True if opts.static_graph else None,
        **ckpt_kwargs,
    )
    device = args.device  # TrainingArguments set up the process group and this rank's device
    rank = int(os.environ.get("RANK", "0"))
    _log(f"{name}: world {world}, {per_device} pairs per device, device {device}")

    import datasets

    n_rows = min(len(pairs), opts.steps * opts.global_batch)
    train_ds = datasets.Dataset.from_dict({"anchor": pairs.queries[:n_rows], "positive": pairs.documents[:n_rows]})

    dtype = torch.bfloat16 if opts.bf16 else torch.float32
    t_build = time.perf_counter()
    built = build_model(
        spec, max_seq_length=opts.max_seq_length, device=str(device), dtype=dtype, smoke=opts.smoke,
        seed=opts.seed, dropout=not opts.no_dropout,
    )
    model, hf = built.model, built.hf_model
    cfg = lora_config(hf, lora_r) if lora_r else None
    torch.manual_seed(opts.seed + 1)  # the same adapter init on every rank and for every world size
    summary_fast = None
    if fast:
        from fastst_plugin import enable_fast
        from fastst_plugin.api import get_state

        fast_opts = {"cuda_graphs": False} if opts.no_cuda_graphs else {}
        enable_fast(model, lora=cfg, **fast_opts)
        summary_fast = get_state(model).summary
    else:
        if cfg is not None:
            apply_lora_stock(hf, cfg)
        if ckpt == "on":
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not lora_r:
        for p in model.parameters():
            if p.is_floating_point():
                p.requires_grad_(True)
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    try:
        # One process: nothing to gather (ST would warn); the option is recorded as asked, so that
        # the 1-GPU run pairs with the N-GPU runs in `compare`.
        gather = not opts.no_gather and world > 1
        if opts.loss == "cached-mnrl":
            from sentence_transformers.sentence_transformer.losses import CachedMultipleNegativesRankingLoss

            loss = CachedMultipleNegativesRankingLoss(model, mini_batch_size=opts.mini_batch_size, gather_across_devices=gather)
        else:
            loss = MultipleNegativesRankingLoss(model, gather_across_devices=gather)
    except TypeError as exc:  # pragma: no cover - ST before gather_across_devices
        raise SystemExit(f"this sentence-transformers has no MNRL gather_across_devices ({exc})") from exc

    if opts.force_ddp and world == 1 and _dist() is not None and cuda:
        # accelerate wraps the model in DDP only for more than one process; one process is enough
        # to put DDP's reducer and NCCL's threads around the fast path.
        import accelerate

        accelerate.Accelerator.multi_device = property(lambda self: True)
    RecordingTrainer, StepClock = _make_trainer_class()
    clock = StepClock(cuda)
    trainer = RecordingTrainer(model=model, args=args, train_dataset=train_ds, loss=loss, callbacks=[clock])
    build_s = time.perf_counter() - t_build
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    counters = _Counters()
    reductions_before = _ddp_reduce_count()
    t0 = time.perf_counter()
    # FASTST_DDP_TRACE=PREFIX: torch.profiler over 3 steps after the warm-up: GPU busy share, top
    # kernels and every host wait on the GPU (with its Python stack), PREFIX.<run>.rank<r>.txt.
    # FASTST_DDP_PROFILE=PREFIX: cProfile of this rank's training thread from the end of the warm-up
    # steps on (compilation and captures left out), written to PREFIX.<run>.rank<r>.prof.
    profile_to = os.environ.get("FASTST_DDP_PROFILE")
    profiler = None
    if profile_to:
        import cProfile

        profiler = cProfile.Profile()
        clock.profile_from = (max(1, opts.warmup), profiler)
    trace_to = os.environ.get("FASTST_DDP_TRACE")
    if trace_to and cuda:
        from .trace import StepTrace

        clock.trace = StepTrace(first_step=max(1, opts.warmup) + 2, steps=3,
                                out=f"{trace_to}.{name[: -len('.jsonl')]}.rank{os.environ.get('RANK', '0')}")
    with counters.installed() if fast else contextlib.nullcontext():
        try:
            trainer.train(resume_from_checkpoint=opts.resume_from)
        finally:
            if profiler is not None:
                profiler.disable()
                profiler.dump_stats(f"{profile_to}.{name[: -len('.jsonl')]}.rank{os.environ.get('RANK', '0')}.prof")
    if cuda:
        torch.cuda.synchronize()
    train_s = time.perf_counter() - t0

    # ---- per-step values, reduced over ranks
    steps_done = len(trainer.step_losses) // accum
    local_losses = [float(x) for x in torch.stack(trainer.step_losses).cpu().tolist()] if steps_done else []
    zero = torch.zeros((), device=device)
    local_tokens = (
        [float(x) for x in torch.stack([(t if t is not None else zero).float().reshape(()) for t in trainer.step_tokens]).cpu().tolist()]
        if steps_done else []
    )
    if accum > 1:  # one value per optimizer step: the micro-batches' mean loss, their summed tokens
        local_losses = [sum(local_losses[i * accum:(i + 1) * accum]) / accum for i in range(steps_done)]
        local_tokens = [sum(local_tokens[i * accum:(i + 1) * accum]) for i in range(steps_done)]
    intervals = clock.intervals_ms()[:steps_done]
    losses_sum = _reduce(local_losses, device, "sum")
    tokens_sum = _reduce(local_tokens, device, "sum")
    step_ms = _reduce(intervals, device, "max")
    peak_gb = _reduce([torch.cuda.max_memory_allocated() / 1e9 if cuda else 0.0], device, "max")[0]
    peak_reserved_gb = _reduce([torch.cuda.max_memory_reserved() / 1e9 if cuda else 0.0], device, "max")[0]

    graphed_state = {}
    if fast:
        from fastst_plugin.api import get_state

        st = get_state(model)
        enc = getattr(st, "encoder", None) if st is not None else None
        g = getattr(enc, "graphed", None)
        graphed_state = {
            "graphs": len(g.graphs) if g is not None else 0,
            "graph_disabled": getattr(g, "disabled_reason", None),
            "graphed_forwards": counters.graphed,
            "eager_forwards": counters.eager,
            "packed_forwards": counters.packed,
            "ckpt_option": st.options.gradient_checkpointing if st is not None else None,
        }
    host_wait, host_step = trainer.host_ms["batch_wait"], trainer.host_ms["training_step"]
    per_rank = _gather_obj(graphed_state)
    wrapped = trainer.model_wrapped
    find_unused_used = getattr(wrapped, "find_unused_parameters", None)

    result = None
    if rank == 0:
        world_losses = [x / world for x in losses_sum]
        measured = list(range(max(1, opts.warmup), steps_done))  # interval i ends at step i (0-based)
        rates = [tokens_sum[i] / (step_ms[i] / 1000.0) for i in measured if tokens_sum and step_ms[i] > 0]
        tot_tokens = sum(tokens_sum[i] for i in measured) if tokens_sum else 0.0
        tot_ms = sum(step_ms[i] for i in measured)
        records = []
        for i in range(steps_done):
            records.append({
                "record": "step", "run": name[: -len(".jsonl")], "step": i, "loss": world_losses[i], "loss_rank0": local_losses[i],
                "tokens": tokens_sum[i] if tokens_sum else None, "step_ms": step_ms[i] if i < len(step_ms) else None,
            })
        import sentence_transformers
        import transformers

        result = {
            "record": "summary",
            "run": name[: -len(".jsonl")],
            "model": model_key,
            "model_source": getattr(spec, "display", str(spec)),
            "smoke": opts.smoke,
            "contender": opts.contender,
            "mode": f"lora{lora_r}" if lora_r else "full",
            "lora_r": lora_r,
            "gradient_checkpointing": ckpt,
            "world_size": world,
            "global_batch": opts.global_batch,
            "grad_accum": accum,
            "per_device_batch": per_device,
            "max_seq_length": opts.max_seq_length,
            "steps": steps_done,
            "warmup": opts.warmup,
            "seed": opts.seed,
            "lr": opts.lr,
            "dtype": "bf16" if opts.bf16 else "fp32",
            "dropout": not opts.no_dropout,
            "gather_across_devices": not opts.no_gather,
            "loss": opts.loss,
            "cuda_graphs": fast and not opts.no_cuda_graphs,
            "ddp_graphs": os.environ.get("FASTST_DDP_GRAPHS", "auto"),
            "capture_mode": os.environ.get("FASTST_GRAPH_CAPTURE_MODE", "default"),
            "trainer_overlap": os.environ.get("FASTST_TRAINER_OVERLAP", "1"),
            "find_unused_parameters": find_unused_used,
            "ddp_ignored_params": sorted(getattr(wrapped, "parameters_to_ignore", None) or []),
            "fastst_reductions": _ddp_reduce_count() - reductions_before,
            "ddp_reducer_calls": trainer.ddp_synced_calls,
            "ddp_wrapped": type(wrapped).__name__ == "DistributedDataParallel",
            "static_graph": bool(getattr(wrapped, "static_graph", False)),
            "trainable_params": trainable,
            "loss_first": world_losses[0] if world_losses else None,
            "loss_final": world_losses[-1] if world_losses else None,
            "tokens_per_s": round(statistics.median(rates), 1) if rates else None,
            "tokens_per_s_total": round(tot_tokens / (tot_ms / 1000.0), 1) if tot_ms else None,
            "step_ms_median": round(statistics.median(step_ms[i] for i in measured), 3) if measured else None,
            "pairs_per_s": round(opts.global_batch / (statistics.median(step_ms[i] for i in measured) / 1000.0), 1) if measured else None,
            "host_batch_wait_ms": round(statistics.median(host_wait[max(1, opts.warmup):] or [0.0]), 3),
            "host_training_step_ms": round(statistics.median(host_step[max(1, opts.warmup):] or [0.0]), 3),
            "peak_alloc_gb": round(peak_gb, 3),
            "peak_reserved_gb": round(peak_reserved_gb, 3),
            "build_s": round(build_s, 2),
            "train_s": round(train_s, 2),
            "fastst": summary_fast,
            "fast_path_per_rank": per_rank if fast else None,
            "device": torch.cuda.get_device_name(device) if cuda else "cpu",
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "sentence_transformers": sentence_transformers.__version__},
        }
        os.makedirs(opts.out, exist_ok=True)
        path = os.path.join(opts.out, name)
        with open(path, "w", encoding="utf-8") as f:
            for r in records + [result]:
                f.write(json.dumps(r) + "\n")
        _log(
            f"{name}: loss {result['loss_first']:.4f} -> {result['loss_final']:.4f}, "
            f"{result['tokens_per_s']} real tok/s, step {result['step_ms_median']} ms (host: batch wait "
            f"{result['host_batch_wait_ms']} ms, training_step {result['host_training_step_ms']} ms), peak {result['peak_alloc_gb']} GB, "
            f"fast path {per_rank if fast else '-'} -> {path}"
        )

    # ---- free everything before the next run of this process (graph pools included)
    trainer.model_wrapped = trainer.model = None
    del trainer, loss, model, hf, wrapped
    cleanup_folder(built)
    if not opts.output_dir:
        shutil.rmtree(workdir, ignore_errors=True)
    del built
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    dist = _dist()
    if dist is not None:
        dist.barrier()
    return result


def train_main(opts) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import datasets  # noqa: F401
        import accelerate  # noqa: F401
    except ImportError as exc:
        raise SystemExit(f"SentenceTransformerTrainer needs `datasets` and `accelerate`: {exc}") from exc
    pairs = load_pairs(opts.data)
    for lora_r in opts.lora_r:
        for ckpt in opts.gradient_checkpointing:
            if ckpt not in ("on", "off"):
                raise SystemExit(f"--gradient-checkpointing takes on/off values, got {ckpt!r}")
            train_once(opts, lora_r, ckpt, pairs)
    dist = _dist()
    if dist is not None:
        dist.destroy_process_group()
    return 0


# ------------------------------------------------------------------------------------------- compare


def read_runs(paths: list[str]) -> list[tuple[str, list[dict], dict | None]]:
    """(run name, step records, summary) for every run in the files: one run per file as written,
    or several runs concatenated into one file (records carry their run's name)."""
    runs: dict[str, tuple[list, list]] = {}
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a killed run
                name = r.get("run") or os.path.basename(path)[: -len(".jsonl")]
                steps, summaries = runs.setdefault(name, ([], []))
                if r.get("record") == "step":
                    steps.append(r)
                elif r.get("record") == "summary":
                    summaries.append(r)
    return [(name, sorted(steps, key=lambda r: r["step"]), summaries[-1] if summaries else None) for name, (steps, summaries) in runs.items()]


def compare(paths: list[str], max_loss_diff: float | None = None, min_speedup: float | None = None) -> tuple[str, bool]:
    """Pair every 1-process run with the N-process runs of the same configuration."""
    runs = sorted(read_runs(paths), key=lambda r: r[0])
    key_fields = ("model", "contender", "mode", "global_batch", "seed", "max_seq_length", "dtype", "smoke", "gather_across_devices", "loss", "gradient_checkpointing")
    ones = {tuple(s.get(k) for k in key_fields): (p, st, s) for p, st, s in runs if s and s["world_size"] == 1}
    # Checkpointing does not change what is computed: without a 1-GPU run of the same setting, the
    # loss curve is compared with the other one (the throughput ratio is then marked as mixed).
    ones_any_ckpt = {k[:-1]: v for k, v in ones.items()}
    lines = [
        "| model | contender | mode | ckpt | GPUs | steps | max abs loss diff | final loss 1 / N | tok/s 1 GPU | tok/s N GPUs | ratio | graphs (per rank) | verdict |",
        "|---|---|---|---|---:|---:|---:|---|---:|---:|---:|---|---|",
    ]
    ok = True
    for p, st, s in runs:
        if s is None:
            lines.append(f"| {p}: no summary line (run failed or was cut short) |||||||||||||")
            ok = False
            continue
        if s["world_size"] == 1:
            continue
        key = tuple(s.get(k) for k in key_fields)
        ref = ones.get(key)
        mixed = False
        if ref is None and key[:-1] in ones_any_ckpt:
            ref, mixed = ones_any_ckpt[key[:-1]], True
        if ref is None:
            lines.append(f"| {s['model']} | {s['contender']} | {s['mode']} | {s['gradient_checkpointing']} | {s['world_size']} | {s['steps']} | no 1-GPU run to compare |||||||")
            ok = False
            continue
        _, st1, s1 = ref
        n = min(len(st), len(st1))
        diffs = [abs(st[i]["loss"] - st1[i]["loss"]) for i in range(n)]
        max_diff = max(diffs) if diffs else float("nan")
        t1, tn = s1.get("tokens_per_s"), s.get("tokens_per_s")
        ratio = (tn / t1) if (t1 and tn) else None
        graphs = ",".join(str(r.get("graphs", "-")) for r in (s.get("fast_path_per_rank") or [])) or "-"
        verdict = []
        if max_loss_diff is not None and not (max_diff <= max_loss_diff):
            verdict.append(f"loss diff > {max_loss_diff:g}")
        if min_speedup is not None and not mixed and (ratio is None or ratio < min_speedup):
            verdict.append(f"ratio < {min_speedup:g}")
        if n < max(s["steps"], s1["steps"]):
            verdict.append("step counts differ")
        ok = ok and not verdict
        lines.append(
            f"| {s['model']} | {s['contender']} | {s['mode']} | {s['gradient_checkpointing']} | {s['world_size']} | {n} | "
            f"{max_diff:.3g} | {s1['loss_final']:.4f} / {s['loss_final']:.4f} | {t1 or '-'} | {tn or '-'} | "
            f"{f'{ratio:.2f}×' if ratio else '-'}{' (vs 1 GPU ckpt ' + s1['gradient_checkpointing'] + ')' if mixed else ''} | "
            f"{graphs} | {'; '.join(verdict) if verdict else 'ok'} |"
        )
    # Fixed work per GPU (the usual data-parallel scaling): N GPUs with the 1-GPU run's batch each.
    scale_fields = ("model", "contender", "mode", "per_device_batch", "seed", "max_seq_length", "dtype", "smoke", "loss", "gradient_checkpointing")
    singles = {tuple(s.get(k) for k in scale_fields): s for _, _, s in runs if s and s["world_size"] == 1}
    scaling = []
    for _, _, s in runs:
        if not s or s["world_size"] == 1:
            continue
        s1 = singles.get(tuple(s.get(k) for k in scale_fields))
        if s1 is None or not s1.get("tokens_per_s") or not s.get("tokens_per_s"):
            continue
        ratio = s["tokens_per_s"] / s1["tokens_per_s"]
        verdict = "ok" if min_speedup is None or ratio >= min_speedup else f"ratio < {min_speedup:g}"
        scaling.append(
            f"| {s['model']} | {s['contender']} | {s['mode']} | {s['gradient_checkpointing']} | {s['per_device_batch']} | "
            f"{s1['global_batch']} → {s['global_batch']} | {s1['tokens_per_s']} | {s['tokens_per_s']} | {ratio:.2f}× | "
            f"{s1['step_ms_median']} / {s['step_ms_median']} | {verdict} |"
        )
    if scaling:
        lines += [
            "",
            "Same pairs per GPU (N GPUs do N times the 1-GPU step's work):",
            "",
            "| model | contender | mode | ckpt | pairs per GPU | global batch 1 → N | tok/s 1 GPU | tok/s N GPUs | ratio | step ms 1 / N | verdict |",
            "|---|---|---|---|---:|---|---:|---:|---:|---|---|",
            *scaling,
        ]
    lines += [
        "",
        "| run | loss first → final | real tok/s (median) | tok/s (total) | step ms | host ms: batch wait / training_step | peak alloc GB | fast path per rank: graphs / graphed fwd / eager fwd / packed fwd |",
        "|---|---|---:|---:|---:|---|---:|---|",
    ]
    for name, st, s in runs:
        if s is None:
            continue
        fast = "; ".join(
            f"{r.get('graphs')}/{r.get('graphed_forwards')}/{r.get('eager_forwards')}/{r.get('packed_forwards')}"
            + (f" ({r['graph_disabled']})" if r.get("graph_disabled") else "")
            for r in (s.get("fast_path_per_rank") or [])
        ) or "-"
        first, final = s.get("loss_first"), s.get("loss_final")
        lines.append(
            f"| {name} | {first:.4f} → {final:.4f} | {s.get('tokens_per_s')} | {s.get('tokens_per_s_total')} | "
            f"{s.get('step_ms_median')} | {s.get('host_batch_wait_ms', '-')} / {s.get('host_training_step_ms', '-')} | "
            f"{s.get('peak_alloc_gb')} | {fast} |"
        )
    return "\n".join(lines), ok


def compare_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m fastst_plugin.bench.ddp compare", description="1 GPU vs N GPUs, from the runs' jsonl files")
    p.add_argument("inputs", nargs="+", help="jsonl files (one run each, or concatenated runs) or folders holding ddp-*.jsonl")
    p.add_argument("--max-loss-diff", type=float, default=None, help="fail (exit 1) when a pair's max |loss diff| is larger")
    p.add_argument("--min-speedup", type=float, default=None, help="fail (exit 1) when N-GPU / 1-GPU throughput is lower")
    p.add_argument("--same-world", action="store_true", help="two runs of any world sizes: their max |loss diff| only")
    a = p.parse_args(argv)
    if a.same_world:
        runs = read_runs(a.inputs)
        if len(runs) != 2 or not all(st for _, st, _ in runs):
            print(f"--same-world needs two runs with steps, got {[name for name, _, _ in runs]}")
            return 1
        (n1, st1, _), (n2, st2, s2) = runs
        n = min(len(st1), len(st2))
        diff = max(abs(st1[i]["loss"] - st2[i]["loss"]) for i in range(n))
        ranks = [(r.get("graphs"), r.get("graph_disabled")) for r in ((s2 or {}).get("fast_path_per_rank") or [])]
        print(f"{n1} vs {n2}: {n} steps, max |loss diff| {diff:.3g}; graphs per rank of the second: {ranks}")
        return 0
    paths: list[str] = []
    for x in a.inputs:
        paths += sorted(glob.glob(os.path.join(x, "ddp-*.jsonl"))) if os.path.isdir(x) else [x]
    table, ok = compare(paths, a.max_loss_diff, a.min_speedup)
    print(table)
    return 0 if ok or (a.max_loss_diff is None and a.min_speedup is None) else 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "compare":
        return compare_main(argv[1:])
    return train_main(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
