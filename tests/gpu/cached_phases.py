"""Where a cached (GradCache) loss step's time goes, next to plain MNRL's (run on the GPU machine).

    python tests/gpu/cached_phases.py [--model bert-base] [--batch-size 1024] [--mini-batch-size 64]
                                      [--contenders fastst,fastst+FASTST_CACHED_LOSS_CHUNKS=stock] [--steps 6]

For each contender, a CachedMultipleNegativesRankingLoss cell and then, for the first contender, the
plain MultipleNegativesRankingLoss cell of the same batches (``fastst bench train`` cells: Debian
pairs, bf16, LoRA r=32, no dropout). Per step, synchronised at each boundary:

* cached: pass 1 (every mini-batch embedded without gradients), the loss stage (scores, softmax,
  backward to the embeddings), the replay (``loss.backward()``: every mini-batch embedded again with
  gradients and back-propagated), the optimizer;
* plain: forward + loss, backward, optimizer;

plus unsynchronised step times (the bench's number) and, for the cached cell, the mini-batches of
each pass (texts, tokens). Medians over ``--steps`` steps; one JSON line per contender and cell on
stdout and in $OUT/cached-phases.jsonl. The ratio issue #8 asks about is unsynchronised cached step
vs plain step; the phases say what an idealised GradCache would cost: pass 1 + plain step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _cell(model: str, batch_size: int, loss: str, mini_batch_size: int, contenders: str):
    from fastst_plugin.bench import _finalize, _quiet_libraries, build_parser
    from fastst_plugin.bench.runner import load_data, make_cell

    opts = build_parser().parse_args(
        ["train", "--models", model, "--contenders", contenders, "--no-dropout", "--batch-size", str(batch_size),
         "--steps", "4", "--loss", loss, "--mini-batch-size", str(mini_batch_size)]
    )
    opts.argv = []
    _finalize(opts)
    _quiet_libraries()
    return make_cell(opts, model, opts.max_seq_length[0], opts.batch_size[0], load_data(opts))


def _timed_steps(run, steps: int, cached: bool) -> dict:
    from fastst_plugin.api import get_state
    from fastst_plugin.bench.contenders import train_step

    phases: dict[str, list[float]] = {}
    marks: list[tuple[str, float]] = []
    minibatches: list[tuple[bool, int, int]] = []

    def mark(name: str) -> None:
        _sync()
        marks.append((name, time.perf_counter()))

    if cached:
        loss_fn = run.loss_fn
        own = type(loss_fn).calculate_loss

        def calculate_loss(*args, **kwargs):
            mark("pass 1")
            out = own(loss_fn, *args, **kwargs)
            mark("loss stage")
            return out

        loss_fn.calculate_loss = calculate_loss
        encoder = get_state(run.built.model).encoder
        run_host = encoder.run_host

        def spy(hp, device):
            minibatches.append((torch.is_grad_enabled(), int(hp.num_seqs), int(hp.cu_seqlens[-1])))
            return run_host(hp, device)

        encoder.run_host = spy

    def stamp(phase: str) -> None:
        if phase == "forward+loss" and not cached:
            mark("forward+loss")
        elif phase == "backward":
            mark("replay" if cached else "backward")
        elif phase == "optimizer.step":
            mark("optimizer")

    try:
        for _ in range(steps):
            minibatches.clear()
            marks.clear()
            _sync()
            marks.append(("start", time.perf_counter()))
            train_step(run, stamp)
            mark("rest")
            for (_, a), (name, b) in zip(marks, marks[1:]):
                phases.setdefault(name, []).append((b - a) * 1e3)
        seen = list(minibatches)
        unsynced = []
        for _ in range(steps):
            _sync()
            t0 = time.perf_counter()
            train_step(run)
            _sync()
            unsynced.append((time.perf_counter() - t0) * 1e3)
    finally:
        if cached:
            del loss_fn.calculate_loss
            del encoder.run_host
    out = {name: round(statistics.median(v), 2) for name, v in phases.items()}
    out["synced total"] = round(sum(out.values()), 2)
    out["step (unsynced)"] = round(statistics.median(unsynced), 2)
    if cached:
        out["pass 1 mini-batches (texts, tokens)"] = [(n, t) for g, n, t in seen if not g]
        out["replay mini-batches (texts, tokens)"] = [(n, t) for g, n, t in seen if g]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="bert-base")
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--mini-batch-size", type=int, default=64)
    ap.add_argument("--contenders", default="fastst,fastst+FASTST_CACHED_LOSS_CHUNKS=stock")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=5)
    args = ap.parse_args()

    from fastst_plugin.bench.contenders import build_contender, train_step

    records = []
    names = args.contenders.split(",")
    cells = [("cached-mnrl", name) for name in names] + [("mnrl", names[0])]
    for loss, name in cells:
        cell = _cell(args.model, args.batch_size, loss, args.mini_batch_size, name)
        run = build_contender(name, cell)
        if run.error:
            records.append({"loss": loss, "contender": name, "error": str(run.error)})
            continue
        for _ in range(args.warmup):
            train_step(run)
        _sync()
        torch.cuda.reset_peak_memory_stats() if torch.cuda.is_available() else None
        rec = {"model": args.model, "pairs": args.batch_size, "loss": loss, "contender": name,
               "mini_batch_size": args.mini_batch_size if loss == "cached-mnrl" else None}
        rec.update(_timed_steps(run, args.steps, cached=loss == "cached-mnrl"))
        if torch.cuda.is_available():
            rec["peak alloc GB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        records.append(rec)
        print(json.dumps(rec), flush=True)
        run.free()
        del run
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    with open(os.path.join(os.environ.get("OUT", "."), "cached-phases.jsonl"), "w") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    sys.path.insert(0, os.getcwd())
    main()
