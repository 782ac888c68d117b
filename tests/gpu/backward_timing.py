"""Where the host time of a replayed step's ``loss.backward()`` goes (run on the GPU machine).

    python tests/gpu/backward_timing.py [MODEL] [--steps 60]

MiniLM's 64-pair LoRA step is host-bound (issue #5: GPU busy ~61 %): ~1.8 ms of its ~4.8 ms host time
is ``loss.backward()``, of which the graphed step's own backward (replay + ``.grad`` writes) is
~0.3 ms. This times, per step, the stretch from ``backward()`` to the entry of the graphed step's
backward, the backward itself, and the stretch from its exit back to the caller, under three
settings: default; ``torch.autograd.set_multithreading_enabled(False)`` (the engine runs CUDA
backward on the calling thread instead of handing it to its device thread); a 10 us GIL switch
interval. Each setting also gets its steady-state step time (no sync inside the loop) and the GPU
span from CUDA events. JSON lines on stdout and in $OUT/backward_timing.jsonl.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default="minilm")
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args()

    from fastst_plugin import graphs
    from fastst_plugin.bench import _finalize, _quiet_libraries, build_parser
    from fastst_plugin.bench.contenders import build_contender, train_step
    from fastst_plugin.bench.runner import load_data, make_cell

    opts = build_parser().parse_args(["train", "--models", args.model, "--contenders", "fastst", "--no-dropout", "--steps", "10"])
    opts.argv = []
    _finalize(opts)
    _quiet_libraries()
    cell = make_cell(opts, args.model, opts.max_seq_length[0], opts.batch_size[0], load_data(opts))
    run = build_contender("fastst", cell)
    if run.error:
        raise SystemExit(run.error)

    marks: dict[str, float] = {}
    orig = graphs._GraphedStepDirect.backward

    def timed_backward(ctx, *grads):
        marks["enter"] = time.perf_counter()
        try:
            return orig(ctx, *grads)
        finally:
            marks["exit"] = time.perf_counter()

    graphs._GraphedStepDirect.backward = staticmethod(timed_backward)

    @contextlib.contextmanager
    def switch(interval):
        old = sys.getswitchinterval()
        sys.setswitchinterval(interval)
        try:
            yield
        finally:
            sys.setswitchinterval(old)

    settings = {
        "default": contextlib.nullcontext,
        "engine-on-calling-thread": lambda: torch.autograd.set_multithreading_enabled(False),
        "gil-switch-10us": lambda: switch(1e-5),
    }
    for _ in range(10):
        train_step(run)
    torch.cuda.synchronize()
    out_path = os.path.join(os.environ.get("OUT", "."), "backward_timing.jsonl")
    for rnd in range(2):  # two rounds, settings interleaved
        for name, ctx in settings.items():
            with ctx():
                for _ in range(5):
                    train_step(run)
                torch.cuda.synchronize()
                # phases: stamp before/after backward inside the bench's step
                pre, inside, post, total = [], [], [], []

                def stamp(phase, _last=[0.0]):
                    now = time.perf_counter()
                    if phase == "forward+loss":
                        marks.clear()
                        marks["start"] = now
                    elif phase == "backward" and "enter" in marks:
                        pre.append((marks["enter"] - marks["start"]) * 1e3)
                        inside.append((marks["exit"] - marks["enter"]) * 1e3)
                        post.append((now - marks["exit"]) * 1e3)
                        total.append((now - marks["start"]) * 1e3)

                for _ in range(args.steps):
                    train_step(run, stamp)
                torch.cuda.synchronize()
                # steady state: no sync inside, GPU span from events
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                t0 = time.perf_counter()
                a.record()
                for _ in range(args.steps):
                    train_step(run)
                b.record()
                host_ms = (time.perf_counter() - t0) * 1e3 / args.steps
                torch.cuda.synchronize()
                wall_ms = (time.perf_counter() - t0) * 1e3 / args.steps
                span_ms = a.elapsed_time(b) / args.steps
            med = lambda xs: round(statistics.median(xs), 3) if xs else None  # noqa: E731
            rec = {"model": args.model, "setting": name, "round": rnd, "backward_ms": med(total),
                   "to_graph_backward_ms": med(pre), "graph_backward_ms": med(inside), "after_graph_backward_ms": med(post),
                   "host_ms_per_step": round(host_ms, 3), "wall_ms_per_step": round(wall_ms, 3),
                   "gpu_span_ms_per_step": round(span_ms, 3)}
            print(json.dumps(rec), flush=True)
            with open(out_path, "a") as f:
                f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
