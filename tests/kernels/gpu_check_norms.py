"""GPU check for the Triton LayerNorm / RMSNorm kernels (run by hand on an H100/H200).

    python tests/kernels/gpu_check_norms.py

For realistic shapes, in bf16 and fp32, compares forward outputs and all gradients of the Triton
path with the torch reference and prints normwise relative errors (max|a - b| / max|b|), then
times forward and forward+backward against torch (F.layer_norm, F.rms_norm): "gpu" columns replay
a CUDA graph (triton.testing.do_bench_cudagraph), so they are kernel time; "eager" columns are
plain calls (triton.testing.do_bench, median), which at these sizes is mostly CPU launch overhead.
Graph replay does not flush L2, so the GB/s column (activation bytes moved by the Triton forward
over its time) can exceed HBM bandwidth for the smaller shapes. Exits 1 when any bf16 error exceeds
2e-2 or any fp32 error exceeds 1e-3. Takes about 30 s on an H200, compilation included.
"""

from __future__ import annotations

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)  # must run the compiled kernels

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from fastst_plugin.kernels.layernorm import layer_norm, layer_norm_reference  # noqa: E402
from fastst_plugin.kernels.rmsnorm import rms_norm, rms_norm_reference  # noqa: E402

TOL = {torch.bfloat16: 2e-2, torch.float32: 1e-3}
ROWS = 8192
HIDDEN = (384, 768, 1024, 2560)
failures: list[str] = []


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")


def run_case(name, fn, ref, shape, dtype, has_bias, residual, return_residual, extra):
    """One correctness comparison (forward + backward) of fn against ref."""
    g = torch.Generator(device="cuda").manual_seed(0)
    h = shape[-1]

    def rnd(*s, scale=1.0, shift=0.0):
        return (torch.randn(*s, generator=g, device="cuda") * scale + shift).to(dtype)

    x = rnd(*shape, scale=2.0, shift=0.3).requires_grad_()
    w = rnd(h, scale=0.5, shift=1.0).requires_grad_()
    b = rnd(h, scale=0.3).requires_grad_() if has_bias else None
    r = rnd(*shape).requires_grad_() if residual else None
    gy, gh = rnd(*shape), rnd(*shape)
    leaves = [("x", x), ("w", w), ("b", b), ("res", r)]

    def go(f):
        for _, t in leaves:
            if t is not None:
                t.grad = None
        args = (x, w, b) if has_bias is not None else (x, w)
        out = f(*args, *extra, residual=r, return_residual=return_residual)
        y, hh = out if return_residual else (out, None)
        (y.float() * gy.float()).sum().add((hh.float() * gh.float()).sum() if hh is not None else 0).backward()
        grads = {k: t.grad.clone() for k, t in leaves if t is not None}
        return y.detach(), hh, grads

    y, hh, grads = go(fn)
    y_ref, hh_ref, grads_ref = go(ref)
    errs = {"y": rel_err(y, y_ref)}
    if return_residual:
        errs["h"] = rel_err(hh, hh_ref)
    for k in grads_ref:
        errs["d" + k] = rel_err(grads[k], grads_ref[k])
    worst = max(errs.values())
    ok = worst <= TOL[dtype]
    tag = f"{name} {tuple(shape)} {str(dtype).split('.')[-1]}"
    print(f"  {'ok  ' if ok else 'FAIL'} {tag:55s} " + " ".join(f"{k}={v:.1e}" for k, v in errs.items()))
    if not ok:
        failures.append(tag)


def main() -> int:
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")

    print("correctness: LayerNorm (errors are max|triton - ref| / max|ref|)")
    for dtype in (torch.bfloat16, torch.float32):
        for hdim in HIDDEN:
            # ModernBERT-style (no bias, fused residual, h returned) and BERT-style (bias, plain).
            run_case("ln+res nobias", layer_norm, layer_norm_reference, (ROWS, hdim), dtype, False, True, True, (1e-5,))
            run_case("ln bias", layer_norm, layer_norm_reference, (ROWS, hdim), dtype, True, False, False, (1e-12,))

    print("correctness: RMSNorm")
    for dtype in (torch.bfloat16, torch.float32):
        for hdim in HIDDEN:
            run_case("rms+res", rms_norm, rms_norm_reference, (ROWS, hdim), dtype, None, True, True, (1e-6, 0.0))
            run_case("rms gemma", rms_norm, rms_norm_reference, (ROWS, hdim), dtype, None, False, False, (1e-6, 1.0))
        run_case("rms qk-norm", rms_norm, rms_norm_reference, (ROWS, 16, 128), dtype, None, False, False, (1e-6, 0.0))

    print("timings, bf16, median us. gpu = CUDA-graph replay (kernel time); eager = plain calls, which at")
    print("these sizes mostly measures the CPU launch overhead of each path")
    dt = torch.bfloat16

    def torch_rms(x, w, r=None):
        hh = x + r if r is not None else x
        if hasattr(F, "rms_norm"):
            return F.rms_norm(hh, (x.shape[-1],), w, 1e-6)
        return rms_norm_reference(hh, w, 1e-6)

    cases = []
    for hdim in HIDDEN:
        cases.append((f"layer_norm {ROWS}x{hdim} +bias", (ROWS, hdim), 2,
                      lambda x, r, w, b: layer_norm(x, w, b, 1e-5),
                      lambda x, r, w, b: F.layer_norm(x, (x.shape[-1],), w, b, 1e-5)))
        cases.append((f"layer_norm {ROWS}x{hdim} +resid", (ROWS, hdim), 4,
                      lambda x, r, w, b: layer_norm(x, w, None, 1e-5, residual=r, return_residual=True)[0],
                      lambda x, r, w, b: F.layer_norm(x + r, (x.shape[-1],), w, None, 1e-5)))
    for shape in [(ROWS, h) for h in HIDDEN] + [(ROWS, 16, 128)]:
        cases.append((f"rms_norm {'x'.join(map(str, shape))}", shape, 2,
                      lambda x, r, w, b: rms_norm(x, w, 1e-6),
                      lambda x, r, w, b: torch_rms(x, w)))
    cases.append((f"rms_norm {ROWS}x1024 +resid", (ROWS, 1024), 4,
                  lambda x, r, w, b: rms_norm(x, w, 1e-6, residual=r, return_residual=True)[0],
                  lambda x, r, w, b: torch_rms(x, w, r)))

    def gpu_time(fn):
        try:
            return triton.testing.do_bench_cudagraph(fn, rep=20)
        except Exception:  # a path that cannot be graph-captured shows as nan rather than aborting
            return float("nan")

    print(
        f"  {'case':34s} {'fwd gpu tri/torch':>19s} {'GB/s':>6s}"
        f" {'fwd+bwd gpu tri/torch':>23s} {'fwd+bwd eager tri/torch':>25s}"
    )
    for label, shape, n_act, tri, ref in cases:
        d = shape[-1]
        x = torch.randn(*shape, device="cuda", dtype=dt, requires_grad=True)
        r = torch.randn(*shape, device="cuda", dtype=dt, requires_grad=True)
        w = torch.randn(d, device="cuda", dtype=dt, requires_grad=True)
        b = torch.randn(d, device="cuda", dtype=dt, requires_grad=True)
        dy = torch.randn(*shape, device="cuda", dtype=dt)

        def fwd(f):
            def run():
                with torch.no_grad():
                    f(x, r, w, b)
            return run

        def fb(f):
            def run():
                x.grad = r.grad = w.grad = b.grad = None
                f(x, r, w, b).backward(dy)
            return run

        t_f = [gpu_time(fwd(f)) for f in (tri, ref)]
        t_fb = [gpu_time(fb(f)) for f in (tri, ref)]
        t_e = [bench(fb(f)) for f in (tri, ref)]
        gbs = n_act * x.numel() * 2 / t_f[0] / 1e6
        print(
            f"  {label:34s} {t_f[0] * 1e3:8.1f} /{t_f[1] * 1e3:8.1f} {gbs:6.0f}"
            f" {t_fb[0] * 1e3:10.1f} /{t_fb[1] * 1e3:10.1f} {t_e[0] * 1e3:11.1f} /{t_e[1] * 1e3:11.1f}"
        )

    if failures:
        print(f"FAILED: {len(failures)} case(s): " + "; ".join(failures))
        return 1
    print("all norm checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
