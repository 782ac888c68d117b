"""Where fastst's ``encode`` time goes (run on the GPU machine): issue #7's cell, host side first.

    python tests/gpu/profile_encode.py [--models minilm,bert-base] [--corpus-size 6000]

Per model (same construction as ``fastst bench encode``: bf16, max_seq_length 512, batch_size 128,
Debian documents): the direct tokenization alone (1, 4, 8, 16 fan-out threads), stock and fastst
wall times (synchronized, 3 repetitions each), then one fastst call under cProfile (main thread: the
time it waits for the tokenizer thread shows as lock ``acquire`` / ``_prefetched``) and under
torch.profiler (GPU busy time, kernel count). Writes $OUT/profile-encode-MODEL.txt.
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
from concurrent.futures import ThreadPoolExecutor

import torch


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn, reps=3):
    out = []
    for _ in range(reps):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        out.append(time.perf_counter() - t0)
    return statistics.median(out) * 1e3


def _timeline(model, docs, kw) -> str:
    """One fastst encode call as a timeline (ms from the call's start): the tokenizer worker's
    chunks, the main thread's batches (host launch span) and when the GPU finished each batch
    (CUDA events), and where stock's replay begins. Tells host-bound from GPU-bound per phase."""
    from fastst_plugin import inference

    t0 = [0.0]
    rows = []
    now = lambda: (time.perf_counter() - t0[0]) * 1e3  # noqa: E731
    orig_chunk, orig_runner, orig_replay = inference._direct_chunk, inference._encode_packed, inference._replaying
    orig_run_batches, orig_finish = inference._run_batches, inference.finish_encode
    events = []

    def run_batches(*a, **k):
        rows.append(("batches begin (sample check done)", now(), now(), ""))
        return orig_run_batches(*a, **k)

    def finish(*a, **k):
        s = now()
        r = orig_finish(*a, **k)
        rows.append(("finish_encode", s, now(), "replay by stock" if r is NotImplemented else "direct"))
        return r

    def chunk(*a, **k):
        s = now()
        r = orig_chunk(*a, **k)
        rows.append(("pack chunk", s, now(), f"{len(a[1])} texts, {len(r[0])} batches, {len(r[1][1])} texts held"))
        return r

    def runner(encoder, hp):
        s = now()
        r = orig_runner(encoder, hp)
        ev = torch.cuda.Event(enable_timing=True) if torch.cuda.is_available() else None
        if ev is not None:
            ev.record()
        events.append(ev)
        rows.append(("batch launch", s, now(), f"{int(hp.cu_seqlens[-1])} tok, {hp.num_seqs} seqs"))
        return r

    def replaying(rep):
        rows.append(("stock replay starts", now(), now(), ""))
        return orig_replay(rep)

    inference._direct_chunk, inference._encode_packed, inference._replaying = chunk, runner, replaying
    inference._run_batches, inference.finish_encode = run_batches, finish
    try:
        _sync()
        start = torch.cuda.Event(enable_timing=True) if torch.cuda.is_available() else None
        t0[0] = time.perf_counter()
        if start is not None:
            start.record()
        model.encode(docs, **kw)
        _sync()
        total = now()
    finally:
        inference._direct_chunk, inference._encode_packed, inference._replaying = orig_chunk, orig_runner, orig_replay
        inference._run_batches, inference.finish_encode = orig_run_batches, orig_finish
    lines = [f"timeline of one fastst encode call: {total:.0f} ms"]
    gpu_done = iter([start.elapsed_time(e) if (start is not None and e is not None) else float("nan") for e in events])
    for name, a, b, what in sorted(rows, key=lambda r: r[1]):
        extra = f", GPU done at {next(gpu_done):.1f}" if name == "batch launch" else ""
        lines.append(f"  {a:8.1f} -> {b:8.1f}  {name}: {what}{extra}")
    return "\n".join(lines)


def _kernel_table(model, transformer, docs, out) -> None:
    """One full token-budget batch (16k tokens) through the packed encoder, eagerly, under
    torch.profiler: where the GPU time of a batch goes, kernel by kernel; plus the graph replay's
    time per batch for comparison."""
    from torch.profiler import ProfilerActivity, profile

    from fastst_plugin import inference
    from fastst_plugin.api import get_state

    encoder = get_state(model).encoder
    tok = inference._DirectTokenizer.for_call(transformer, {})
    flat = inference._Flat(tok(docs[:400], None), False, True)
    a, b = inference.budget_batches(torch.from_numpy(flat.lengths), inference.MAX_BATCH_TOKENS)[0]
    hp = flat.pack(a, b)
    device = next(encoder.base.parameters()).device
    p = hp.to_device(device)
    with torch.inference_mode():
        for _ in range(3):
            encoder.forward_eager(p)
        eager = _timed(lambda: encoder.forward_eager(p), reps=5)
        for _ in range(4):
            inference._encode_packed(encoder, hp)
        graphed = _timed(lambda: inference._encode_packed(encoder, hp), reps=5)
        with profile(activities=[ProfilerActivity.CUDA if torch.cuda.is_available() else ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                encoder.forward_eager(p)
            _sync()
    evs = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.self_device_time_total for e in evs) / 5e3
    print(f"one batch of {int(hp.cu_seqlens[-1])} tokens / {hp.num_seqs} texts: eager {eager:.2f} ms, graphed {graphed:.2f} ms, "
          f"kernels {busy:.2f} ms ({sum(e.count for e in evs) // 5} launches)", file=out)
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=22, max_name_column_width=90), file=out)


def _write(name: str, out) -> None:
    text = out.getvalue()
    print(text, flush=True)
    with open(os.path.join(os.environ.get("OUT", "."), f"profile-encode-{name}.txt"), "w") as f:
        f.write(text)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="minilm,bert-base")
    ap.add_argument("--corpus-size", type=int, default=6000)
    ap.add_argument("--max-seq-length", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--kernels-only", action="store_true", help="only the per-kernel table of one 16k-token batch")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"

    from fastst_plugin import enable_fast, inference
    from fastst_plugin.bench import data, models

    if os.environ.get("FASTST_PROFILE_CHUNK"):  # A/B of the tokenization chunk size on one machine
        inference.CHUNK = int(os.environ["FASTST_PROFILE_CHUNK"])

    docs = data.corpus(data.load_pairs(), args.corpus_size, long_docs=False, max_seq_length=args.max_seq_length)
    print(f"cpus {len(os.sched_getaffinity(0))}, TOKENIZERS_PARALLELISM={os.environ.get('TOKENIZERS_PARALLELISM')}", flush=True)
    for key in args.models.split(","):
        out = io.StringIO()
        spec = models.resolve_model(key)
        built = models.build_model(spec, max_seq_length=args.max_seq_length, device=device,
                                   dtype=torch.bfloat16 if device == "cuda" else torch.float32)
        model = built.model.eval()
        if args.kernels_only:
            enable_fast(model)
            _kernel_table(model, built.transformer, docs, out)
            _write(f"kernels-{key}", out)
            del model, built
            continue
        tok = inference._DirectTokenizer.for_call(built.transformer, {})
        for threads in (1, 4, 8, 16):
            pool = ThreadPoolExecutor(threads) if threads > 1 else None
            t0 = time.perf_counter()
            enc = tok(docs, None, pool)
            t1 = time.perf_counter()
            flat = inference._Flat(enc, True)
            t2 = time.perf_counter()
            print(f"{key}: direct tokenization, {threads} threads: {1e3 * (t1 - t0):.0f} ms, flatten {1e3 * (t2 - t1):.0f} ms, "
                  f"{int(flat.cu[-1])} tokens", file=out)
            if pool is not None:
                pool.shutdown()
        t0 = time.perf_counter()
        model.preprocess(docs[:2048])
        print(f"{key}: stock preprocess of 2048 docs: {1e3 * (time.perf_counter() - t0):.0f} ms", file=out)
        kw = dict(batch_size=args.batch_size, show_progress_bar=False)
        model.encode(docs[:1000], **kw)
        stock_ms = _timed(lambda: model.encode(docs, **kw), reps=2) if os.environ.get("PROFILE_STOCK", "1") == "1" else float("nan")
        enable_fast(model)
        model.encode(docs, **kw)
        fast_ms = _timed(lambda: model.encode(docs, **kw))
        fast_t_ms = _timed(lambda: model.encode(docs, convert_to_tensor=True, **kw))
        print(f"{key}: stock {stock_ms:.0f} ms, fastst {fast_ms:.0f} ms (numpy out), {fast_t_ms:.0f} ms (tensor out): "
              f"{stock_ms / fast_ms:.2f}x", file=out)
        print(_timeline(model, docs, kw), file=out)
        if os.environ.get("PROFILE_QUICK") == "1":  # timings and the timeline only
            _write(key, out)
            del model, built
            continue
        prof = cProfile.Profile()
        _sync()
        prof.enable()
        model.encode(docs, **kw)
        _sync()
        prof.disable()
        st = pstats.Stats(prof, stream=out)
        st.sort_stats("tottime").print_stats(25)
        st.sort_stats("cumulative").print_stats(40)
        if device == "cuda":
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
                model.encode(docs, **kw)
                _sync()
            evs = [e for e in p.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
            busy = sum(e.self_device_time_total for e in evs) / 1e3
            print(f"{key}: GPU kernel time {busy:.0f} ms, {sum(e.count for e in evs)} kernels", file=out)
            print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), file=out)
            _kernel_table(model, built.transformer, docs, out)
        _write(key, out)
        del model, built
        torch.cuda.empty_cache() if device == "cuda" else None


if __name__ == "__main__":
    sys.path.insert(0, os.getcwd())
    main()
