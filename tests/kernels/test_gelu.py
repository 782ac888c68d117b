"""bias_gelu: Triton kernel (interpreter on CPU) vs torch reference, and reference vs formulas."""

import math

import pytest
import torch
import torch.nn.functional as F

from fastst_plugin.kernels import gelu as gelu_mod
from fastst_plugin.kernels._backend import use_triton
from fastst_plugin.kernels.gelu import bias_gelu, bias_gelu_reference

needs_triton = pytest.mark.skipif(
    not use_triton(torch.empty(0)), reason="Triton path needs CUDA or TRITON_INTERPRET=1"
)

SHAPES = [(3, 5), (2, 3, 37), (600, 5), (40, 300)]  # odd F, leading dims, >1 row block, >1 col block


def _run(fn, x, b, approximate, g):
    x = x.detach().clone().requires_grad_(True)
    b = None if b is None else b.detach().clone().requires_grad_(True)
    y = fn(x, b, approximate)
    y.backward(g)
    return y.detach(), x.grad, None if b is None else b.grad


@needs_triton
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("has_bias", [True, False])
def test_fp32_matches_reference(shape, approximate, has_bias):
    torch.manual_seed(0)
    x = torch.randn(shape) * 3
    b = torch.randn(shape[-1]) if has_bias else None
    g = torch.randn(shape)
    y, dx, db = _run(bias_gelu, x, b, approximate, g)
    yr, dxr, dbr = _run(bias_gelu_reference, x, b, approximate, g)
    torch.testing.assert_close(y, yr, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dx, dxr, atol=1e-5, rtol=1e-5)
    if has_bias:
        torch.testing.assert_close(db, dbr, atol=1e-4, rtol=1e-5)


@needs_triton
def test_uses_triton_function():
    x = torch.randn(4, 6, requires_grad=True)
    y = bias_gelu(x, torch.randn(6))
    assert "BiasGelu" in type(y.grad_fn).__name__


@needs_triton
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_fp16(approximate):
    torch.manual_seed(1)
    x = (torch.randn(33, 37) * 2).half()
    b = torch.randn(37).half()
    g = torch.randn(33, 37).half()
    y, dx, db = _run(bias_gelu, x, b, approximate, g)
    assert y.dtype == dx.dtype == db.dtype == torch.float16
    yr, dxr, dbr = _run(bias_gelu_reference, x.float(), b.float(), approximate, g.float())
    torch.testing.assert_close(y.float(), yr, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(dx.float(), dxr, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(db.float(), dbr, atol=2e-2, rtol=2e-3)


@needs_triton
def test_bias_without_grad_and_x_without_grad():
    torch.manual_seed(2)
    x = torch.randn(9, 37)
    b = torch.randn(37)
    g = torch.randn(9, 37)
    # bias frozen
    xg = x.clone().requires_grad_(True)
    bias_gelu(xg, b).backward(g)
    xr = x.clone().requires_grad_(True)
    bias_gelu_reference(xr, b).backward(g)
    torch.testing.assert_close(xg.grad, xr.grad, atol=1e-5, rtol=1e-5)
    # x frozen, bias trainable
    bg = b.clone().requires_grad_(True)
    bias_gelu(x, bg).backward(g)
    br = b.clone().requires_grad_(True)
    bias_gelu_reference(x, br).backward(g)
    torch.testing.assert_close(bg.grad, br.grad, atol=1e-4, rtol=1e-5)


@needs_triton
def test_non_contiguous_input_and_empty():
    torch.manual_seed(3)
    x = torch.randn(37, 6).t()  # [6, 37] non-contiguous
    b = torch.randn(37)
    torch.testing.assert_close(bias_gelu(x, b), bias_gelu_reference(x, b), atol=1e-5, rtol=1e-5)
    e = torch.randn(0, 37, requires_grad=True)
    y = bias_gelu(e, b)
    assert y.shape == (0, 37)
    y.sum().backward()
    assert e.grad.shape == (0, 37)


def test_reference_matches_formulas():
    torch.manual_seed(4)
    x = torch.randn(8, 37, dtype=torch.float64) * 3
    b = torch.randn(37, dtype=torch.float64)
    h = x + b
    exact = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    tanh = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))
    torch.testing.assert_close(bias_gelu_reference(x, b), exact)
    torch.testing.assert_close(bias_gelu_reference(x, b, "tanh"), tanh)
    torch.testing.assert_close(bias_gelu_reference(x, None), F.gelu(x))


def test_cpu_fallback_without_triton(monkeypatch):
    monkeypatch.setattr(gelu_mod, "use_triton", lambda t: False)
    x = torch.randn(3, 5, requires_grad=True)
    y = bias_gelu(x, None, "tanh")
    assert "BiasGelu" not in type(y.grad_fn).__name__
    torch.testing.assert_close(y, F.gelu(x, approximate="tanh"))


def test_bad_args():
    with pytest.raises(ValueError):
        bias_gelu(torch.randn(2, 3), approximate="erf")
    with pytest.raises(ValueError):
        bias_gelu(torch.randn(2, 3), torch.randn(4))
