"""Where a training step's time goes, for one bench cell and one contender (run on the GPU machine).

    python tests/gpu/profile_step.py MODEL [--mode lora|full] [--contender fastst] [--steps 20]

Prints (and writes to $OUT/profile-MODEL-MODE-CONTENDER.txt): the median step time, the host-side
cProfile of the steps (top functions by own time and cumulative time), and torch.profiler's CUDA
kernel table (top kernels by GPU time) with the GPU-busy fraction. Same cell construction as
``fastst bench train`` (64 Debian pairs, max_seq_length 256, bf16, no dropout).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import sys
import time

import torch

_sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--mode", default="lora")
    ap.add_argument("--contender", default="fastst")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--max-seq-length", default="256")
    ap.add_argument("--batch-size", default="64")
    ap.add_argument("--extra", default="", help="more `fastst bench train` arguments, e.g. '--loss cached-mnrl --mini-batch-size 64'")
    ap.add_argument("--stacks", action="store_true", help="also a kernel table grouped by Python stack (run with FASTST_CUDA_GRAPHS=0: graph replays hide the stacks)")
    ap.add_argument("--tag", default="", help="suffix of the output file name")
    args = ap.parse_args()

    from fastst_plugin.bench import _finalize, _quiet_libraries, build_parser
    from fastst_plugin.bench.contenders import build_contender, train_step
    from fastst_plugin.bench.runner import load_data, make_cell

    opts = build_parser().parse_args(
        ["train", "--models", args.model, "--mode", args.mode, "--contenders", args.contender, "--no-dropout",
         "--max-seq-length", args.max_seq_length, "--batch-size", args.batch_size, "--steps", "10", *args.extra.split()]
    )
    opts.argv = []
    _finalize(opts)
    _quiet_libraries()
    cell = make_cell(opts, args.model, opts.max_seq_length[0], opts.batch_size[0], load_data(opts))
    run = build_contender(args.contender, cell)
    if run.error:
        raise SystemExit(f"build failed: {run.error}")
    for _ in range(5):
        train_step(run)
    _sync()

    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        train_step(run)
        _sync()
        times.append((time.perf_counter() - t0) * 1e3)

    # host side by phase of the bench's step (no sync inside: the GPU runs behind), and the GPU's own
    # span of the same steps from CUDA events: a host-bound step shows phase sums near the span.
    phases_text = _phase_breakdown(run, args.steps)
    print(phases_text, file=sys.stderr)

    # host side: what Python spends per step (no sync inside: the GPU runs behind)
    prof = cProfile.Profile()
    _sync()
    t0 = time.perf_counter()
    prof.enable()
    for _ in range(args.steps):
        train_step(run)
    prof.disable()
    host_ms = (time.perf_counter() - t0) * 1e3 / args.steps
    _sync()

    out = io.StringIO()
    print(f"{args.model} {args.mode} {args.contender}: step median {statistics.median(times):.2f} ms "
          f"(min {min(times):.2f}); host time per step under cProfile {host_ms:.2f} ms", file=out)
    print(phases_text, file=out)
    st = pstats.Stats(prof, stream=out)
    st.sort_stats("tottime").print_stats(25)
    st.sort_stats("cumulative").print_stats(35)

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        for _ in range(5):
            train_step(run)
        _sync()
    print(p.key_averages().table(sort_by="cuda_time_total", row_limit=30), file=out)
    # Every row (kernels and ops) per step, for diffing two cells: {name: [calls, self GPU us]}.
    per_step = {}
    for e in p.key_averages():
        gpu = getattr(e, "self_device_time_total", None)
        if gpu is None:
            gpu = getattr(e, "self_cuda_time_total", 0.0)
        if gpu > 0:
            per_step[e.key] = [e.count / 5, round(gpu / 5, 1)]
    import json

    with open(os.path.join(os.environ.get("OUT", "."), f"kernels-{args.model}-{args.mode}-{args.contender}{args.tag}.json"), "w") as f:
        json.dump(per_step, f, indent=0, sort_keys=True)
    if args.stacks:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True, with_stack=True) as p:
            for _ in range(3):
                train_step(run)
            _sync()
        print(p.key_averages(group_by_stack_n=6).table(sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=60), file=out)
        print(p.key_averages(group_by_input_shape=True).table(sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=50), file=out)
    text = out.getvalue()
    print(text)
    d = os.environ.get("OUT", ".")
    with open(os.path.join(d, f"profile-{args.model}-{args.mode}-{args.contender}{args.tag}.txt"), "w") as f:
        f.write(text)


def _phase_breakdown(run, steps: int) -> str:
    """Host milliseconds per step spent in each phase of ``contenders.train_step`` (its ``stamp``
    hook, perf_counter at each phase end), and the GPU span per step from CUDA events."""
    from fastst_plugin.bench.contenders import train_step

    spent: dict[str, float] = {}
    last = [0.0]

    def stamp(phase: str) -> None:
        now = time.perf_counter()
        spent[phase] = spent.get(phase, 0.0) + (now - last[0]) * 1e3
        last[0] = now

    _sync()
    start = torch.cuda.Event(enable_timing=True) if torch.cuda.is_available() else None
    end = torch.cuda.Event(enable_timing=True) if start is not None else None
    if start is not None:
        start.record()
    t_wall = time.perf_counter()
    for _ in range(steps):
        last[0] = time.perf_counter()
        train_step(run, stamp)
    host = (time.perf_counter() - t_wall) * 1e3 / steps
    gpu = None
    if start is not None:
        end.record()
        _sync()
        gpu = start.elapsed_time(end) / steps
    parts = ", ".join(f"{k} {v / steps:.2f}" for k, v in spent.items())
    span = f"; GPU span per step {gpu:.2f} ms" if gpu is not None else ""
    return f"host ms per step by phase (no sync): {parts}; total {host:.2f}{span}"


if __name__ == "__main__":
    sys.path.insert(0, os.getcwd())
    main()
