"""Triton LayerNorm (run in the Triton interpreter on CPU, or on CUDA) against its torch reference,
and the reference against torch.nn.functional.layer_norm and the written-out formula."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastst_plugin.kernels._backend import interpreter_on, triton_available
from fastst_plugin.kernels.layernorm import layer_norm, layer_norm_reference

DEVICE = "cuda" if (torch.cuda.is_available() and not interpreter_on()) else "cpu"
needs_triton = pytest.mark.skipif(
    not triton_available() or not (interpreter_on() or torch.cuda.is_available()),
    reason="Triton path needs CUDA or TRITON_INTERPRET=1",
)
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3)}
EPS = 1e-5


def _make(shape, dtype, residual, bias, w_grad=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = shape[-1]

    def rnd(*s, scale=1.0, shift=0.0):
        return (torch.randn(*s, generator=g) * scale + shift).to(device=DEVICE, dtype=dtype)

    # A non-zero mean and scale make the mean/variance terms matter.
    x = rnd(*shape, scale=2.0, shift=0.5).requires_grad_()
    w = rnd(h, scale=0.5, shift=1.0).requires_grad_(w_grad)
    b = rnd(h, scale=0.3).requires_grad_() if bias else None
    r = rnd(*shape).requires_grad_() if residual else None
    gy = rnd(*shape)
    gh = rnd(*shape)
    return x, w, b, r, gy, gh


def _run(fn, x, w, b, r, gy, gh, return_residual):
    leaves = [t for t in (x, w, b, r) if t is not None]
    for t in leaves:
        t.grad = None
    out = fn(x, w, b, EPS, residual=r, return_residual=return_residual)
    if return_residual:
        y, h = out
        loss = (y.float() * gy.float()).sum() + (h.float() * gh.float()).sum()
    else:
        y, h = out, None
        loss = (y.float() * gy.float()).sum()
    loss.backward()
    grads = [None if t is None or t.grad is None else t.grad.clone() for t in (x, w, b, r)]
    return y.detach(), (None if h is None else h.detach()), grads


def _close(a, b, dtype, what):
    assert a.dtype == b.dtype and a.shape == b.shape, what
    torch.testing.assert_close(a.float(), b.float(), **TOL[dtype], msg=lambda m: f"{what}: {m}")


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "shape,residual,bias,return_residual",
    [
        ((5, 7), False, True, False),
        ((5, 7), True, False, True),
        ((3, 4, 33), True, True, True),
        ((3, 4, 33), True, True, False),
        ((2, 3, 33), False, False, True),
        ((11, 200), True, False, True),
        ((43, 200), True, True, True),  # several row blocks per backward program, ragged tail
        ((6, 384), False, True, False),
    ],
)
def test_triton_matches_reference(dtype, shape, residual, bias, return_residual):
    x, w, b, r, gy, gh = _make(shape, dtype, residual, bias)
    y, h, grads = _run(layer_norm, x, w, b, r, gy, gh, return_residual)
    y_ref, h_ref, grads_ref = _run(layer_norm_reference, x, w, b, r, gy, gh, return_residual)
    _close(y, y_ref, dtype, "y")
    if return_residual:
        _close(h, h_ref, dtype, "h")
    for name, g, g_ref in zip(("dx", "dweight", "dbias", "dresidual"), grads, grads_ref):
        assert (g is None) == (g_ref is None), name
        if g is not None:
            # Weight/bias grads are sums over rows: scale the tolerance by the row count.
            scale = x.numel() // x.shape[-1] if name in ("dweight", "dbias") else 1
            torch.testing.assert_close(
                g.float(), g_ref.float(), atol=TOL[dtype]["atol"] * scale, rtol=TOL[dtype]["rtol"] * scale,
                msg=lambda m, name=name: f"{name}: {m}",
            )


@needs_triton
def test_triton_path_is_taken():
    x, w, b, r, *_ = _make((2, 8), torch.float32, True, True)
    y, h = layer_norm(x, w, b, EPS, residual=r, return_residual=True)
    assert "LayerNormFn" in type(y.grad_fn).__name__
    # Without a residual, h has x's values, as an output of the norm node (its gradient is added
    # to the norm's inside the backward; see test_returned_input_routes_its_gradient_through_the_norm).
    y2, h2 = layer_norm(x, w, b, EPS, return_residual=True)
    assert torch.equal(h2, x)


@needs_triton
def test_frozen_weight_and_bias():
    """LoRA-style: the norm's parameters are frozen, only the activations need grads."""
    x, w, b, r, gy, gh = _make((4, 33), torch.float32, True, True, w_grad=False)
    b.requires_grad_(False)
    y, h, grads = _run(layer_norm, x, w, b, r, gy, gh, True)
    y_ref, h_ref, grads_ref = _run(layer_norm_reference, x, w, b, r, gy, gh, True)
    assert w.grad is None and b.grad is None
    _close(grads[0], grads_ref[0], torch.float32, "dx")
    _close(grads[3], grads_ref[3], torch.float32, "dresidual")


@needs_triton
def test_only_weight_needs_grad():
    x, w, b, _, gy, gh = _make((9, 7), torch.float32, False, True)
    x = x.detach()
    b.requires_grad_(False)
    y, _, grads = _run(layer_norm, x, w, b, None, gy, gh, False)
    y_ref, _, grads_ref = _run(layer_norm_reference, x, w, b, None, gy, gh, False)
    assert grads[0] is None and grads[2] is None
    torch.testing.assert_close(grads[1], grads_ref[1], atol=1e-4, rtol=1e-4)


@needs_triton
@pytest.mark.parametrize("return_residual", [False, True])
def test_inference_path(return_residual):
    x, w, b, r, *_ = _make((3, 5, 33), torch.float16, True, True)
    with torch.no_grad():
        out = layer_norm(x, w, b, EPS, residual=r, return_residual=return_residual)
        ref = layer_norm_reference(x, w, b, EPS, residual=r, return_residual=return_residual)
    if return_residual:
        _close(out[0], ref[0], torch.float16, "y")
        _close(out[1], ref[1], torch.float16, "h")
    else:
        assert out.grad_fn is None
        _close(out, ref, torch.float16, "y")


@needs_triton
def test_non_contiguous_and_empty():
    base = torch.randn(6, 2, 40, device=DEVICE)
    x = base[:, 1, 3:36]  # rows with stride 80, a column offset, H = 33
    w = torch.randn(33, device=DEVICE)
    _close(layer_norm(x, w, None, EPS), layer_norm_reference(x, w, None, EPS), torch.float32, "strided")
    xt = torch.randn(33, 6, device=DEVICE).t()  # [6, 33], last dim not contiguous
    _close(layer_norm(xt, w, None, EPS), layer_norm_reference(xt, w, None, EPS), torch.float32, "transposed")
    ws = torch.randn(66, device=DEVICE)[::2]  # strided weight and bias
    _close(layer_norm(x, ws, ws, EPS), layer_norm_reference(x, ws, ws, EPS), torch.float32, "strided weight")
    empty = torch.empty(0, 33, device=DEVICE, requires_grad=True)
    w2 = w.clone().requires_grad_()
    y = layer_norm(empty, w2, None, EPS)
    assert y.shape == (0, 33)
    y.sum().backward()
    assert torch.equal(w2.grad, torch.zeros_like(w2))


# -------------------------------------------------------------------------------------------
# The reference itself.


@pytest.mark.parametrize("bias", [False, True])
def test_reference_matches_torch_layer_norm(bias):
    torch.manual_seed(0)
    x = torch.randn(4, 6, 48) * 3 + 1
    w = torch.randn(48)
    b = torch.randn(48) if bias else None
    torch.testing.assert_close(layer_norm_reference(x, w, b, 1e-6), F.layer_norm(x, (48,), w, b, 1e-6))
    ln = torch.nn.LayerNorm(48, eps=1e-6, bias=bias)
    with torch.no_grad():
        ln.weight.copy_(w)
        if bias:
            ln.bias.copy_(b)
    torch.testing.assert_close(layer_norm_reference(x, ln.weight, ln.bias, 1e-6), ln(x), atol=1e-6, rtol=1e-6)


def test_reference_formula_and_residual():
    torch.manual_seed(1)
    x, r = torch.randn(5, 20, dtype=torch.float64), torch.randn(5, 20, dtype=torch.float64)
    w, b = torch.randn(20, dtype=torch.float64), torch.randn(20, dtype=torch.float64)
    hh = x + r
    mean = hh.mean(-1, keepdim=True)
    var = ((hh - mean) ** 2).mean(-1, keepdim=True)
    expected = (hh - mean) / torch.sqrt(var + 1e-5) * w + b
    y, h = layer_norm_reference(x, w, b, 1e-5, residual=r, return_residual=True)
    assert y.dtype == torch.float64
    torch.testing.assert_close(h, hh)
    torch.testing.assert_close(y, expected.to(torch.float64), atol=1e-6, rtol=1e-6)


@needs_triton
def test_returned_input_routes_its_gradient_through_the_norm():
    # See the RMSNorm test of the same name: x comes back as an output of the norm node.
    x = torch.randn(4, 16, device=DEVICE, requires_grad=True)
    w = torch.randn(16, device=DEVICE, requires_grad=True)
    y, h = layer_norm(x, w, None, 1e-5, return_residual=True)
    assert torch.equal(h, x) and "LayerNormFn" in type(h.grad_fn).__name__
    (y.sum() + (h * 2).sum()).backward()
    x2 = x.detach().clone().requires_grad_()
    ref = torch.nn.functional.layer_norm(x2, (16,), w.detach(), None, 1e-5).sum() + (x2 * 2).sum()
    ref.backward()
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-5, rtol=1e-5)
