"""Triton RMSNorm (run in the Triton interpreter on CPU, or on CUDA) against its torch reference,
and the reference against the Hugging Face Qwen3 / Gemma3 RMSNorm formulas."""

from __future__ import annotations

import pytest
import torch

from fastst_plugin.kernels._backend import interpreter_on, triton_available
from fastst_plugin.kernels.rmsnorm import rms_norm, rms_norm_reference

DEVICE = "cuda" if (torch.cuda.is_available() and not interpreter_on()) else "cpu"
needs_triton = pytest.mark.skipif(
    not triton_available() or not (interpreter_on() or torch.cuda.is_available()),
    reason="Triton path needs CUDA or TRITON_INTERPRET=1",
)
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3)}
EPS = 1e-6


def _make(shape, dtype, residual, w_grad=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = shape[-1]

    def rnd(*s, scale=1.0, shift=0.0):
        return (torch.randn(*s, generator=g) * scale + shift).to(device=DEVICE, dtype=dtype)

    x = rnd(*shape, scale=2.0, shift=0.3).requires_grad_()
    w = rnd(d, scale=0.5, shift=0.2).requires_grad_(w_grad)
    r = rnd(*shape).requires_grad_() if residual else None
    return x, w, r, rnd(*shape), rnd(*shape)


def _run(fn, x, w, r, gy, gh, offset, return_residual):
    for t in (x, w, r):
        if t is not None:
            t.grad = None
    out = fn(x, w, EPS, offset=offset, residual=r, return_residual=return_residual)
    if return_residual:
        y, h = out
        loss = (y.float() * gy.float()).sum() + (h.float() * gh.float()).sum()
    else:
        y, h = out, None
        loss = (y.float() * gy.float()).sum()
    loss.backward()
    grads = [None if t is None or t.grad is None else t.grad.clone() for t in (x, w, r)]
    return y.detach(), (None if h is None else h.detach()), grads


def _close(a, b, dtype, what, scale=1):
    assert a.dtype == b.dtype and a.shape == b.shape, what
    tol = {k: v * scale for k, v in TOL[dtype].items()}
    torch.testing.assert_close(a.float(), b.float(), **tol, msg=lambda m: f"{what}: {m}")


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "shape,offset,residual,return_residual",
    [
        ((5, 7), 0.0, False, False),
        ((5, 7), 1.0, True, True),
        ((3, 4, 33), 0.0, True, True),
        ((3, 4, 33), 1.0, True, False),
        ((2, 3, 33), 1.0, False, True),
        ((43, 200), 0.0, True, True),  # several row blocks per backward program, ragged tail
        ((6, 384), 1.0, False, False),
        ((5, 6, 24), 0.0, False, False),  # q/k-norm layout [T, heads, head_dim]
    ],
)
def test_triton_matches_reference(dtype, shape, offset, residual, return_residual):
    x, w, r, gy, gh = _make(shape, dtype, residual)
    y, h, grads = _run(rms_norm, x, w, r, gy, gh, offset, return_residual)
    y_ref, h_ref, grads_ref = _run(rms_norm_reference, x, w, r, gy, gh, offset, return_residual)
    _close(y, y_ref, dtype, "y")
    if return_residual:
        _close(h, h_ref, dtype, "h")
    rows = x.numel() // x.shape[-1]
    for name, g, g_ref in zip(("dx", "dweight", "dresidual"), grads, grads_ref):
        assert (g is None) == (g_ref is None), name
        if g is not None:
            # The weight grad is a sum over rows: scale its tolerance by the row count.
            _close(g, g_ref, dtype, name, scale=rows if name == "dweight" else 1)


@needs_triton
def test_triton_path_is_taken():
    x, w, r, *_ = _make((2, 8), torch.float32, True)
    y, h = rms_norm(x, w, EPS, residual=r, return_residual=True)
    assert "RMSNormFn" in type(y.grad_fn).__name__
    y2, h2 = rms_norm(x, w, EPS, return_residual=True)
    assert torch.equal(h2, x)  # x's values, as an output of the norm node (see the test below)


@needs_triton
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_frozen_weight(offset):
    """LoRA-style: the norm weight is frozen, only the activations need grads."""
    x, w, r, gy, gh = _make((4, 3, 20), torch.float32, True, w_grad=False)
    y, h, grads = _run(rms_norm, x, w, r, gy, gh, offset, True)
    y_ref, h_ref, grads_ref = _run(rms_norm_reference, x, w, r, gy, gh, offset, True)
    assert w.grad is None
    _close(grads[0], grads_ref[0], torch.float32, "dx")
    _close(grads[2], grads_ref[2], torch.float32, "dresidual")


@needs_triton
def test_only_weight_needs_grad_and_no_weight():
    x, w, _, gy, gh = _make((9, 7), torch.float32, False)
    x = x.detach()
    _, _, grads = _run(rms_norm, x, w, None, gy, gh, 1.0, False)
    _, _, grads_ref = _run(rms_norm_reference, x, w, None, gy, gh, 1.0, False)
    assert grads[0] is None
    _close(grads[1], grads_ref[1], torch.float32, "dweight", scale=9)
    # weight=None: plain normalisation.
    x.requires_grad_()
    _, _, grads = _run(rms_norm, x, None, None, gy, gh, 0.0, False)
    _, _, grads_ref = _run(rms_norm_reference, x, None, None, gy, gh, 0.0, False)
    _close(grads[0], grads_ref[0], torch.float32, "dx")


@needs_triton
@pytest.mark.parametrize("return_residual", [False, True])
def test_inference_path(return_residual):
    x, w, r, *_ = _make((3, 5, 33), torch.float16, True)
    with torch.no_grad():
        out = rms_norm(x, w, EPS, offset=1.0, residual=r, return_residual=return_residual)
        ref = rms_norm_reference(x, w, EPS, offset=1.0, residual=r, return_residual=return_residual)
    if return_residual:
        _close(out[0], ref[0], torch.float16, "y")
        _close(out[1], ref[1], torch.float16, "h")
    else:
        assert out.grad_fn is None
        _close(out, ref, torch.float16, "y")


@needs_triton
def test_strided_qk_view():
    """q/k-norm on a head view sliced out of a fused qkv projection (rows not uniformly strided)."""
    t, heads, d = 5, 2, 16
    qkv = torch.randn(t, 3 * heads * d, device=DEVICE)
    q = qkv[:, : heads * d].view(t, heads, d)
    w = torch.randn(d, device=DEVICE)
    _close(rms_norm(q, w, EPS), rms_norm_reference(q, w, EPS), torch.float32, "q")
    ws = torch.randn(2 * d, device=DEVICE)[::2]  # strided weight
    _close(rms_norm(q, ws, EPS, offset=1.0), rms_norm_reference(q, ws, EPS, offset=1.0), torch.float32, "strided w")
    empty = torch.empty(0, heads, d, device=DEVICE)
    assert rms_norm(empty, w, EPS).shape == (0, heads, d)


# -------------------------------------------------------------------------------------------
# The reference itself, against the Hugging Face module formulas.


def _hf_qwen3_rmsnorm(x, weight, eps):
    # transformers' Qwen3RMSNorm.forward
    input_dtype = x.dtype
    hs = x.to(torch.float32)
    variance = hs.pow(2).mean(-1, keepdim=True)
    hs = hs * torch.rsqrt(variance + eps)
    return weight * hs.to(input_dtype)


def _hf_gemma3_rmsnorm(x, weight, eps):
    # transformers' Gemma3RMSNorm.forward
    xf = x.float()
    out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    out = out * (1.0 + weight.float())
    return out.type_as(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_matches_hf_formulas(dtype):
    torch.manual_seed(0)
    x = (torch.randn(4, 3, 64) * 3).to(dtype)
    w = torch.randn(64).to(dtype)
    # Qwen3 rounds before the weight multiply; allow that one rounding step in bf16.
    tol = dict(atol=1e-6, rtol=1e-6) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(rms_norm_reference(x, w, 1e-6), _hf_qwen3_rmsnorm(x, w, 1e-6), **tol)
    torch.testing.assert_close(
        rms_norm_reference(x, w, 1e-6, offset=1.0), _hf_gemma3_rmsnorm(x, w, 1e-6), atol=0, rtol=0
    )
    if dtype == torch.float32 and hasattr(torch.nn.functional, "rms_norm"):
        torch.testing.assert_close(
            rms_norm_reference(x, w, 1e-6), torch.nn.functional.rms_norm(x, (64,), w, 1e-6), atol=1e-6, rtol=1e-6
        )


def test_reference_residual():
    torch.manual_seed(1)
    x, r, w = torch.randn(5, 20), torch.randn(5, 20), torch.randn(20)
    y, h = rms_norm_reference(x, w, 1e-6, residual=r, return_residual=True)
    torch.testing.assert_close(h, x + r)
    torch.testing.assert_close(y, _hf_qwen3_rmsnorm(x + r, w, 1e-6))


@needs_triton
def test_returned_input_routes_its_gradient_through_the_norm():
    # Without a residual, return_residual hands x back as an output of the norm node, so a later
    # use's gradient is added to the norm's in fp32 inside the backward (one rounding in bf16).
    x, w, _, gy, gh = _make((4, 16), torch.float32, False)
    y, h = rms_norm(x, w, EPS, return_residual=True)
    assert torch.equal(h, x) and "RMSNormFn" in type(h.grad_fn).__name__
