"""GPU check for the activation / RoPE kernels: Triton vs torch reference at realistic shapes.

Run on a CUDA machine (H100/H200):  python tests/kernels/gpu_check_activations.py

For each op and shape, in fp32 and bf16, forward and backward (all input grads): max relative
error ``max|a - b| / max|b|`` of the Triton result vs a fp32 "gold" reference on the same inputs
(the bf16 torch reference's own error is printed alongside), and do_bench median times (ms) of
Triton vs the torch reference for forward and forward+backward, plus the GPU-only kernel time of
forward+backward from torch.profiler (do_bench wall times include host launch overhead, which
dominates at these sizes for some ops). Exit 1 on a mismatch (rel err > 2e-2 in bf16, > 1e-4 in
fp32).
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import torch  # noqa: E402

from fastst_plugin.kernels.gelu import bias_gelu, bias_gelu_reference  # noqa: E402
from fastst_plugin.kernels.glu import gated_activation, gated_activation_reference  # noqa: E402
from fastst_plugin.kernels.qk_norm_rope import qk_norm_rope, qk_norm_rope_reference  # noqa: E402
from fastst_plugin.kernels.rope import apply_rope, apply_rope_reference  # noqa: E402

T = 8192
TOL = {torch.bfloat16: 2e-2, torch.float32: 1e-4}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def packed_positions(t: int, seq_len: int = 300) -> torch.Tensor:
    return (torch.arange(t, device="cuda") % seq_len).contiguous()  # restarts every seq_len tokens


def rope_tables(d: int, max_pos: int = 2048, theta: float = 1e6):
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, device="cuda", dtype=torch.float32) / d))
    f = torch.arange(max_pos, device="cuda", dtype=torch.float32)[:, None] * inv
    emb = torch.cat((f, f), dim=-1)
    return emb.cos(), emb.sin()


def cases():
    """(name, make(dtype) -> (grad_inputs, call(fn, *grad_inputs)), fast fn, reference fn)."""
    out = []
    for f, approx in ((1536, "none"), (3072, "none"), (3072, "tanh")):
        def make(dtype, f=f, approx=approx):
            x = torch.randn(T, f, device="cuda", dtype=dtype) * 2
            b = torch.randn(f, device="cuda", dtype=dtype)
            return [x, b], (lambda fn, x, b: fn(x, b, approx))
        out.append((f"bias_gelu F={f} {approx}", make, bias_gelu, bias_gelu_reference))
    for two_f, act in ((2304, "gelu"), (2304, "gelu_tanh"), (6144, "silu")):
        def make(dtype, two_f=two_f, act=act):
            x = torch.randn(T, two_f, device="cuda", dtype=dtype) * 2
            return [x], (lambda fn, x: fn(x, act))
        out.append((f"glu 2F={two_f} {act}", make, gated_activation, gated_activation_reference))
    for hq, hk, d in ((16, 8, 128), (3, 1, 256)):
        def make_rope(dtype, hq=hq, hk=hk, d=d):
            qkv = torch.randn(T, (hq + 2 * hk) * d, device="cuda", dtype=dtype)
            q = qkv[:, : hq * d].view(T, hq, d)  # strided views of a fused QKV output
            k = qkv[:, hq * d : (hq + hk) * d].view(T, hk, d)
            cos, sin = rope_tables(d)
            pos = packed_positions(T)
            return [q, k], (lambda fn, q, k: fn(q, k, cos, sin, pos))
        out.append((f"rope q[{T},{hq},{d}] k[{T},{hk},{d}]", make_rope, apply_rope, apply_rope_reference))

        def make_qkn(dtype, hq=hq, hk=hk, d=d):
            qkv = torch.randn(T, (hq + 2 * hk) * d, device="cuda", dtype=dtype) * 3
            q = qkv[:, : hq * d].view(T, hq, d)
            k = qkv[:, hq * d : (hq + hk) * d].view(T, hk, d)
            offset = 1.0 if d == 256 else 0.0  # Gemma3 shape uses (1 + w), Qwen3 w
            qw = (torch.randn(d, device="cuda") * 0.3 + 1 - offset).to(dtype)
            kw = (torch.randn(d, device="cuda") * 0.3 + 1 - offset).to(dtype)
            cos, sin = rope_tables(d)
            pos = packed_positions(T)
            return [q, k, qw, kw], (lambda fn, q, k, qw, kw: fn(q, k, qw, kw, 1e-6, offset, cos, sin, pos))
        out.append((f"qk_norm_rope q[{T},{hq},{d}] k[{T},{hk},{d}]", make_qkn, qk_norm_rope, qk_norm_rope_reference))
    return out


def fwd_bwd(call, fn, inputs, grads_out):
    ins = [x.detach().requires_grad_(True) for x in inputs]
    outs = call(fn, *ins)
    outs = outs if isinstance(outs, tuple) else (outs,)
    gin = torch.autograd.grad(outs, ins, grads_out)
    return [o.detach() for o in outs], list(gin)


def bench(call, fn, inputs, grads_out, backward: bool) -> float:
    from triton.testing import do_bench

    ins = [x.detach().requires_grad_(backward) for x in inputs]

    def run():
        outs = call(fn, *ins)
        if backward:
            outs = outs if isinstance(outs, tuple) else (outs,)
            torch.autograd.grad(outs, ins, grads_out)

    return do_bench(run, warmup=5, rep=25, return_mode="median")


def gpu_time(call, fn, inputs, grads_out, iters: int = 5) -> float:
    """Summed device time (ms) of all GPU kernels of one forward+backward (torch.profiler): the
    launch-overhead-free cost, which do_bench cannot show when the host is the bottleneck."""
    from torch.profiler import ProfilerActivity, profile

    fwd_bwd(call, fn, inputs, grads_out)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fwd_bwd(call, fn, inputs, grads_out)
        torch.cuda.synchronize()
    total_us = sum(getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0)
                   for e in prof.key_averages())
    return total_us / iters / 1000


def main() -> int:
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    t0 = time.time()
    torch.manual_seed(0)
    failed = []
    print(f"{'op':44s} {'dtype':9s} {'fwd err':>9s} {'bwd err':>9s} {'(ref bf16 fwd/bwd err)':>23s}"
          f" {'fwd ms tri/ref':>16s} {'fwd+bwd ms tri/ref':>20s} {'gpu-only f+b ms tri/ref':>24s}")
    for name, make, fast, ref in cases():
        for dtype in (torch.float32, torch.bfloat16):
            inputs, call = make(dtype)
            probe = call(ref, *inputs)
            probe = probe if isinstance(probe, tuple) else (probe,)
            grads_out = tuple(torch.randn_like(p) for p in probe)
            outs, gins = fwd_bwd(call, fast, inputs, grads_out)
            gold_o, gold_g = fwd_bwd(call, ref, [x.float() for x in inputs], tuple(g.float() for g in grads_out))
            fe = max(rel_err(a, b) for a, b in zip(outs, gold_o))
            be = max(rel_err(a, b) for a, b in zip(gins, gold_g))
            extra = ""
            if dtype == torch.bfloat16:
                ro, rg = fwd_bwd(call, ref, inputs, grads_out)
                extra = (f"{max(rel_err(a, b) for a, b in zip(ro, gold_o)):.2e}/"
                         f"{max(rel_err(a, b) for a, b in zip(rg, gold_g)):.2e}")
            ok = fe <= TOL[dtype] and be <= TOL[dtype] and all(o.dtype == dtype for o in outs + gins)
            if not ok:
                failed.append(f"{name} {dtype}")
            timing = ""
            if dtype == torch.bfloat16:  # the dtype that matters for speed
                tf = bench(call, fast, inputs, grads_out, False)
                rf = bench(call, ref, inputs, grads_out, False)
                tb = bench(call, fast, inputs, grads_out, True)
                rb = bench(call, ref, inputs, grads_out, True)
                tg = gpu_time(call, fast, inputs, grads_out)
                rg_ = gpu_time(call, ref, inputs, grads_out)
                timing = f"{tf:7.3f}/{rf:7.3f}  {tb:9.3f}/{rb:8.3f}  {tg:11.3f}/{rg_:8.3f}"
            print(f"{name:44s} {str(dtype)[6:]:9s} {fe:9.2e} {be:9.2e} {extra:>23s} {timing}"
                  f"{'' if ok else '  <-- MISMATCH'}", flush=True)
    print(f"total {time.time() - t0:.1f}s")
    if failed:
        print("FAILED:", *failed, sep="\n  ")
        return 1
    print("all ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
