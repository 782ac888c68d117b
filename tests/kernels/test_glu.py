"""gated_activation: Triton kernel (interpreter on CPU) vs torch reference, and reference vs HF formulas."""

import pytest
import torch
import torch.nn.functional as F

from fastst_plugin.kernels import glu as glu_mod
from fastst_plugin.kernels._backend import use_triton
from fastst_plugin.kernels.glu import gated_activation, gated_activation_reference

needs_triton = pytest.mark.skipif(
    not use_triton(torch.empty(0)), reason="Triton path needs CUDA or TRITON_INTERPRET=1"
)

ACTS = ["gelu", "gelu_tanh", "silu"]
SHAPES = [(3, 10), (2, 3, 74), (600, 10), (40, 600)]  # F = 5, 37, >1 row block, F=300 >1 col block


def _run(fn, x, act, g):
    x = x.detach().clone().requires_grad_(True)
    y = fn(x, act)
    y.backward(g)
    return y.detach(), x.grad


@needs_triton
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("act", ACTS)
def test_fp32_matches_reference(shape, act):
    torch.manual_seed(0)
    x = torch.randn(shape) * 3
    g = torch.randn(*shape[:-1], shape[-1] // 2)
    y, dx = _run(gated_activation, x, act, g)
    yr, dxr = _run(gated_activation_reference, x, act, g)
    assert y.shape == yr.shape and dx.shape == x.shape
    torch.testing.assert_close(y, yr, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dx, dxr, atol=1e-5, rtol=1e-5)


@needs_triton
def test_uses_triton_function():
    y = gated_activation(torch.randn(4, 6, requires_grad=True), "silu")
    assert "GatedAct" in type(y.grad_fn).__name__


@needs_triton
@pytest.mark.parametrize("act", ACTS)
def test_fp16(act):
    torch.manual_seed(1)
    x = (torch.randn(17, 74) * 2).half()
    g = torch.randn(17, 37).half()
    y, dx = _run(gated_activation, x, act, g)
    assert y.dtype == dx.dtype == torch.float16
    yr, dxr = _run(gated_activation_reference, x.float(), act, g.float())
    torch.testing.assert_close(y.float(), yr, atol=1e-2, rtol=2e-3)
    torch.testing.assert_close(dx.float(), dxr, atol=1e-2, rtol=2e-3)


@needs_triton
@pytest.mark.parametrize("act", ACTS)
def test_strided_view_input(act):
    """x is a column slice of a wider buffer (row stride != 2F): read in place, grads land right."""
    torch.manual_seed(2)
    base = torch.randn(2, 5, 90)
    g = torch.randn(2, 5, 37)
    b1 = base.clone().requires_grad_(True)
    x1 = b1[..., 7:81]
    y1 = gated_activation(x1, act)
    y1.backward(g)
    b2 = base.clone().requires_grad_(True)
    y2 = gated_activation_reference(b2[..., 7:81], act)
    y2.backward(g)
    torch.testing.assert_close(y1, y2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b1.grad, b2.grad, atol=1e-5, rtol=1e-5)


@needs_triton
def test_empty():
    x = torch.randn(0, 10, requires_grad=True)
    y = gated_activation(x, "gelu")
    assert y.shape == (0, 5)
    y.sum().backward()
    assert x.grad.shape == (0, 10)


def test_reference_matches_hf_formulas():
    """ModernBERT GeGLU: input, gate = wi(x).chunk(2); act(input) * gate (act = GELU exact).
    Gemma3 / Qwen3 MLP: act(gate_proj(x)) * up_proj(x) with gelu_pytorch_tanh / silu."""
    torch.manual_seed(3)
    x = torch.randn(4, 3, 74, dtype=torch.float64)
    a, u = x[..., :37], x[..., 37:]
    torch.testing.assert_close(gated_activation_reference(x, "gelu"), F.gelu(a) * u)
    torch.testing.assert_close(gated_activation_reference(x, "gelu_tanh"), F.gelu(a, approximate="tanh") * u)
    torch.testing.assert_close(gated_activation_reference(x, "silu"), F.silu(a) * u)
    torch.testing.assert_close(gated_activation_reference(x, "silu"), a * torch.sigmoid(a) * u)


def test_cpu_fallback_without_triton(monkeypatch):
    monkeypatch.setattr(glu_mod, "use_triton", lambda t: False)
    x = torch.randn(3, 8, requires_grad=True)
    y = gated_activation(x, "silu")
    assert "GatedAct" not in type(y.grad_fn).__name__
    torch.testing.assert_close(y, F.silu(x[:, :4]) * x[:, 4:])


def test_bad_args():
    with pytest.raises(ValueError):
        gated_activation(torch.randn(2, 4), "relu")
    with pytest.raises(ValueError):
        gated_activation(torch.randn(2, 5), "silu")
