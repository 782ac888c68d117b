"""Micro-benchmark: the Triton varlen attention kernel vs the current 'auto' backend (run on the GPU machine).

    python tests/gpu/attention_bench.py            # the table below, ~30 s on an H200 (mostly Triton compiles)
    python tests/gpu/attention_bench.py --sweep    # also alternative launch configs for the short-text shapes
    python tests/gpu/attention_bench.py --kernel-only --sweep   # GPU time of the Triton kernels alone
                                                   # (10 calls per CUDA graph, replayed: no launch/autograd cost)

For each shape: forward and forward+backward time (CUDA events, median of ``--iters`` = 50 after warm-up)
of ``attention='triton'`` and of ``attention='auto'`` as it resolves today (FASTST_TRITON_ATTENTION unset:
torch's varlen FlashAttention-2 where it applies, else padded SDPA), plus the max abs error of each
(output and dq/dk/dv, bf16 inputs) against the fp32 per-sequence reference. Prints a table and writes
it to ``$OUT/attention_bench.txt``.

Shapes: texts as in a training step of 64 query/document pairs at max_seq_length 256 (128 texts:
short queries, longer documents, mean ~48 tokens, longest 256), for bert-base (12 x 64), MiniLM
(12 x 32), Qwen3-0.6B (16/8 x 128, causal), ModernBERT local layers (12 x 64, window ±64), and long
documents (16 texts up to 1024 tokens) for bert-base and Qwen3 shapes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
os.environ.pop("FASTST_TRITON_ATTENTION", None)  # 'auto' = today's default
CPU_SMOKE = "--cpu-smoke" in sys.argv  # a seconds-long check of this script itself, in the interpreter
if CPU_SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"
else:
    os.environ.pop("TRITON_INTERPRET", None)
DEVICE = "cpu" if CPU_SMOKE else "cuda"

from fastst_plugin import attention as A  # noqa: E402
from fastst_plugin.kernels import varlen_attention as VA  # noqa: E402


def short_lengths(n=128, seed=0, max_len=256):
    """Half queries (~12 tokens), half documents (~85 tokens, long tail clipped at max_len): mean ~48."""
    g = torch.Generator().manual_seed(seed)
    queries = torch.exp(torch.randn(n // 2, generator=g) * 0.4 + 2.4).round().clamp(3, 64)
    docs = torch.exp(torch.randn(n - n // 2, generator=g) * 0.6 + 4.2).round().clamp(8, max_len)
    lengths = torch.cat([queries, docs]).long()
    lengths[-1] = max_len  # one text hits the cap, as in a real step
    return lengths[torch.randperm(n, generator=g)].tolist()


def long_lengths(n=16, seed=1, max_len=1024):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max_len // 2, max_len + 1, (n,), generator=g)
    lengths[0] = max_len
    return lengths.tolist()


SHAPES = [
    # name, lengths, Hq, Hkv, D, causal, window
    ("bert-base 128x~48", short_lengths(), 12, 12, 64, False, None),
    ("MiniLM 128x~48", short_lengths(), 12, 12, 32, False, None),
    ("Qwen3-0.6B 128x~48 causal", short_lengths(), 16, 8, 128, True, None),
    ("ModernBERT local ±64", short_lengths(), 12, 12, 64, False, (64, 64)),
    ("bert-base 16x~768 (1024)", long_lengths(), 12, 12, 64, False, None),
    ("Qwen3-0.6B 16x~768 causal", long_lengths(), 16, 8, 128, True, None),
    ("ModernBERT local 16x~768", long_lengths(), 12, 12, 64, False, (64, 64)),
]

# Extra launch configs for --sweep: (bm, bn, fwd_warps, fwd_stages, bwd_block, bwd_warps, bwd_stages).
SWEEP = {
    32: [(64, 64, 4, 2, 64, 8, 1), (128, 64, 4, 2, 64, 4, 1), (64, 64, 4, 1, 32, 4, 1), (32, 32, 4, 1, 32, 4, 1),
         (64, 64, 4, 2, 64, 4, 2), (64, 64, 4, 2, 64, 2, 1), (64, 64, 4, 2, 32, 2, 1)],
    64: [(64, 64, 4, 2, 64, 4, 1), (128, 64, 8, 2, 64, 8, 1), (64, 32, 4, 2, 32, 4, 1), (32, 32, 4, 1, 32, 4, 1),
         (64, 64, 4, 1, 128, 8, 1), (64, 64, 4, 2, 64, 4, 2), (64, 64, 4, 2, 64, 8, 2), (64, 64, 4, 2, 32, 2, 1),
         (64, 64, 4, 3, 32, 4, 2), (128, 128, 8, 2, 64, 4, 1)],
    128: [(64, 64, 4, 2, 64, 8, 1), (64, 64, 8, 2, 32, 8, 1), (64, 32, 4, 2, 32, 4, 1), (128, 64, 8, 2, 64, 8, 1),
          (64, 64, 8, 2, 32, 4, 1), (64, 64, 8, 2, 64, 8, 2), (64, 64, 8, 2, 32, 4, 2)],
}


def make_inputs(lengths, hq, hk, d, dtype=torch.bfloat16, seed=0):
    if CPU_SMOKE:
        dtype = torch.float32  # the interpreter has no bf16
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    t = sum(lengths)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    q = torch.randn(t, hq, d, device=DEVICE, dtype=dtype, generator=g)
    k = torch.randn(t, hk, d, device=DEVICE, dtype=dtype, generator=g)
    v = torch.randn(t, hk, d, device=DEVICE, dtype=dtype, generator=g)
    do = torch.randn(t, hq, d, device=DEVICE, dtype=dtype, generator=g)
    return q, k, v, do, cu


def time_ms(fn, iters, warmup=5):
    if CPU_SMOKE:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1000
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)


def fwd_bwd(call, q, k, v, do):
    q, k, v = (x.detach().requires_grad_(True) for x in (q, k, v))
    o = call(q, k, v)
    return (o, *torch.autograd.grad(o, (q, k, v), do))


def max_err(got, ref):
    return max((a.float() - b.float()).abs().max().item() for a, b in zip(got, ref))


def run_shape(name, lengths, hq, hk, d, causal, window, iters, sweep, lines):
    q, k, v, do, cu = make_inputs(lengths, hq, hk, d)
    ms = max(lengths)
    scale = d ** -0.5
    auto_name = A.choose_backend("auto", q, window, 0.0, k, cu, ms)

    def via(backend, blocks=None):
        if backend == "triton" and blocks is not None:
            return lambda q_, k_, v_: VA.VarlenAttentionFn.apply(q_, k_, v_, cu, ms, scale, causal, window, blocks)
        return lambda q_, k_, v_: A.varlen_attention(q_, k_, v_, cu, ms, causal=causal, window=window, scale=scale,
                                                    backend=backend)

    ref = fwd_bwd(lambda q_, k_, v_: VA.varlen_attention_reference(q_.float(), k_.float(), v_.float(), cu, scale=scale,
                                                                   causal=causal, window=window),
                  q, k, v, do.float())
    rows = []
    candidates = [("triton", None), (auto_name, None)]
    if sweep:
        candidates += [("triton", cfg) for cfg in SWEEP.get(d, [])]
    for backend, blocks in candidates:
        call = via(backend, blocks)
        try:
            err = max_err(fwd_bwd(call, q, k, v, do), ref)
            with torch.no_grad():
                t_f = time_ms(lambda: call(q, k, v), iters)
            t_fb = time_ms(lambda: fwd_bwd(call, q, k, v, do), iters)
        except Exception as exc:  # keep going: one failing config must not hide the rest
            rows.append(f"| {name} | {backend}{'' if blocks is None else ' ' + str(blocks)} | error: "
                        f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]} | | |")
            continue
        label = backend if blocks is None else f"triton {blocks}"
        if backend == "triton" and blocks is None:
            label = f"triton {VA._config(d, False, ms > VA.LONG_SEQLEN)}"
        rows.append(f"| {name} | {label} | {t_f * 1000:.1f} | {t_fb * 1000:.1f} | {err:.2e} |")
    lines.extend(rows)
    for r in rows:
        print(r, flush=True)


def kernel_only(name, lengths, hq, hk, d, causal, window, configs, lines, reps=20, calls=10):
    """Triton forward and backward kernels without autograd or launch overhead: ``calls`` launches
    captured in one CUDA graph, replayed ``reps`` times; µs per call (what a graphed training step pays)."""
    q, k, v, do, cu = make_inputs(lengths, hq, hk, d)
    ms, scale = max(lengths), d ** -0.5
    left, right, masked = VA._window_bounds(causal, window)
    for cfg in configs:
        try:
            o, lse = VA._fwd(q, k, v, cu, ms, scale, left, right, masked, True, blocks=cfg)
            VA._bwd(do, q, k, v, o, lse, cu, ms, scale, left, right, masked, blocks=cfg)
            torch.cuda.synchronize()
            res = []
            for fn in (lambda: VA._fwd(q, k, v, cu, ms, scale, left, right, masked, True, blocks=cfg),
                       lambda: VA._bwd(do, q, k, v, o, lse, cu, ms, scale, left, right, masked, blocks=cfg)):
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    for _ in range(calls):
                        fn()
                g.replay()
                torch.cuda.synchronize()
                times = []
                for _ in range(reps):
                    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    s.record()
                    g.replay()
                    e.record()
                    torch.cuda.synchronize()
                    times.append(s.elapsed_time(e) * 1000 / calls)
                res.append(statistics.median(times))
            row = f"| {name} | kernels {cfg} | {res[0]:.1f} | {res[0] + res[1]:.1f} (bwd {res[1]:.1f}) | graphed |"
        except Exception as exc:
            row = f"| {name} | kernels {cfg} | error: {type(exc).__name__}: {str(exc).splitlines()[0][:120]} | | |"
        print(row, flush=True)
        lines.append(row)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--sweep", action="store_true", help="also time alternative Triton launch configs")
    ap.add_argument("--only", default="", help="comma-separated substrings of shape names to run")
    ap.add_argument("--kernel-only", action="store_true", help="GPU time of the Triton kernels alone (CUDA-graph replay)")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes in the Triton interpreter (checks the script)")
    args = ap.parse_args()
    shapes = SHAPES
    if CPU_SMOKE:
        shapes = [(n, [3, 20, 1], min(hq, 2), min(hk, 2) // (2 if hk < hq else 1) or 1, min(d, 32), c,
                   None if w is None else (4, 4)) for n, _, hq, hk, d, c, w in SHAPES[:4]]
        shapes = [(n, ls, hq, max(1, hk), d, c, w) for n, ls, hq, hk, d, c, w in shapes]
    else:
        assert torch.cuda.is_available(), "needs a CUDA GPU"
    t0 = time.time()
    device_name = "CPU interpreter smoke test" if CPU_SMOKE else torch.cuda.get_device_name()
    lines = [
        f"# varlen attention, {device_name}, torch {torch.__version__}, bf16, median of {args.iters}",
        "",
        "| shape | backend (config) | fwd µs | fwd+bwd µs | max abs err (o, dq, dk, dv) |",
        "|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for name, lengths, hq, hk, d, causal, window in shapes:
        if args.only and not any(s.strip() and s.strip() in name for s in args.only.split(",")):
            continue
        if args.kernel_only:
            configs = [VA._config(d, False, max(lengths) > VA.LONG_SEQLEN)] + (SWEEP.get(d, []) if args.sweep else [])
            kernel_only(name, lengths, hq, hk, d, causal, window, configs, lines)
        else:
            run_shape(name, lengths, hq, hk, d, causal, window, args.iters, args.sweep, lines)
    sl, ll = short_lengths(), long_lengths()
    lines += ["", f"short texts: {len(sl)}, mean {sum(sl) / len(sl):.1f}, max {max(sl)}, tokens {sum(sl)}; "
              f"long: {len(ll)}, mean {sum(ll) / len(ll):.0f}, max {max(ll)}, tokens {sum(ll)}",
              f"wall {time.time() - t0:.1f} s (including Triton compiles)"]
    print("\n".join(lines[-3:]))
    out = os.environ.get("OUT") or "."
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "attention_bench.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
