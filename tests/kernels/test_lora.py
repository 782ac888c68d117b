"""The fused LoRA node (``kernels.lora``) against its plain composition, values and gradients, with the
low-rank factor computed inside the base GEMMs (``fuse_out`` / ``fuse_in``) and without."""

from __future__ import annotations

import pytest
import torch

from fastst_plugin.kernels import lora as L


def _inputs(shape, k, n, r, bias, train_w, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, k, generator=gen, dtype=torch.float64).requires_grad_(True)
    w = (torch.randn(n, k, generator=gen, dtype=torch.float64) / k**0.5).requires_grad_(train_w)
    b = (torch.randn(n, generator=gen, dtype=torch.float64)).requires_grad_(train_w) if bias else None
    a = (torch.randn(r, k, generator=gen, dtype=torch.float64) / k**0.5).requires_grad_(True)
    bm = (torch.randn(n, r, generator=gen, dtype=torch.float64) / r**0.5).requires_grad_(True)
    g = torch.randn(*shape, n, generator=gen, dtype=torch.float64)
    return x, w, b, a, bm, g


SEEN: dict = {}


def _run(fn, x, w, b, a, bm, g):
    """(output, leaf gradients, the raw output, the gradient handed to x as the node returned it:
    a leaf's .grad is re-laid out by AccumulateGrad, so it is caught on a non-leaf copy)."""
    leaves = [t for t in (x, w, b, a, bm) if t is not None and t.requires_grad]
    for t in leaves:
        t.grad = None
    x_in = x * 1.0
    x_in.register_hook(lambda grad: SEEN.__setitem__("dx", grad))
    y = fn(x_in, w, b, a, bm)
    y.backward(g)
    return y.detach().clone(), [t.grad.clone() for t in leaves], y


@pytest.mark.parametrize("shape", [(40,), (4, 10)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("train_w", [False, True])
@pytest.mark.parametrize("fuse", [(False, False), (True, False), (False, True), (True, True)])
def test_fused_matches_reference(shape, bias, train_w, fuse):
    k, n, r, s = 6, 5, 3, 0.7
    x, w, b, a, bm, g = _inputs(shape, k, n, r, bias, train_w)
    ref_y, ref_g, _ = _run(lambda *t: L.lora_linear_reference(*t, s), x, w, b, a, bm, g)
    before = L.FUSE_MIN_ROWS_PER_WEIGHT_ROW
    L.FUSE_MIN_ROWS_PER_WEIGHT_ROW = 0  # tiny shapes: fuse regardless of the weight-copy rule
    try:
        y, grads, raw = _run(lambda *t: L.lora_linear(*t, s, fuse_out=fuse[0], fuse_in=fuse[1]), x, w, b, a, bm, g)
    finally:
        L.FUSE_MIN_ROWS_PER_WEIGHT_ROW = before
    torch.testing.assert_close(y, ref_y)
    for got, want in zip(grads, ref_g):
        torch.testing.assert_close(got, want)
    # a fused output is a view of the wider [T, N + r] GEMM result; otherwise dense
    assert raw.is_contiguous() != fuse[0]
    assert SEEN["dx"].is_contiguous() != fuse[1]  # fused: [g W | du]'s first K columns


def test_fused_input_gradient_is_the_strided_view_only_when_asked():
    x, w, b, a, bm, g = _inputs((40,), 6, 5, 3, False, False)
    before = L.FUSE_MIN_ROWS_PER_WEIGHT_ROW
    L.FUSE_MIN_ROWS_PER_WEIGHT_ROW = 0
    try:
        _run(lambda *t: L.lora_linear(*t, 1.0), x, w, b, a, bm, g)
        assert SEEN["dx"].is_contiguous()
        _run(lambda *t: L.lora_linear(*t, 1.0, fuse_in=True), x, w, b, a, bm, g)
        assert SEEN["dx"].stride() == (6 + 3, 1)
    finally:
        L.FUSE_MIN_ROWS_PER_WEIGHT_ROW = before


def test_fusing_waits_for_enough_rows_and_can_be_turned_off(monkeypatch):
    # 40 rows, weight 5 x 6: the weight copy is worth it from 4 x 5 = 20 rows (forward) / 4 x 6 (backward)
    x, w, b, a, bm, g = _inputs((40,), 6, 5, 3, False, False)
    _, _, raw = _run(lambda *t: L.lora_linear(*t, 1.0, fuse_out=True, fuse_in=True), x, w, b, a, bm, g)
    assert not raw.is_contiguous() and not SEEN["dx"].is_contiguous()
    x, w, b, a, bm, g = _inputs((12,), 6, 5, 3, False, False)
    _, _, raw = _run(lambda *t: L.lora_linear(*t, 1.0, fuse_out=True, fuse_in=True), x, w, b, a, bm, g)
    assert raw.is_contiguous() and SEEN["dx"].is_contiguous()
    monkeypatch.setenv("FASTST_LORA_FUSED", "0")
    x, w, b, a, bm, g = _inputs((40,), 6, 5, 3, False, False)
    _, _, raw = _run(lambda *t: L.lora_linear(*t, 1.0, fuse_out=True, fuse_in=True), x, w, b, a, bm, g)
    assert raw.is_contiguous() and SEEN["dx"].is_contiguous()


def test_dropout_is_never_fused():
    x, w, b, a, bm, g = _inputs((40,), 6, 5, 3, False, False)
    torch.manual_seed(0)
    _, _, raw = _run(lambda *t: L.lora_linear(*t, 1.0, dropout_p=0.5, training=True, fuse_out=True, fuse_in=True),
                     x, w, b, a, bm, g)
    assert raw.is_contiguous() and SEEN["dx"].is_contiguous()


def test_quantized_base_through_weight_fn():
    x, w, b, a, bm, g = _inputs((40,), 6, 5, 3, True, False)
    ref_y, ref_g, _ = _run(lambda *t: L.lora_linear_reference(*t, 0.5), x, w, b, a, bm, g)
    frozen = w.detach().clone()
    y, grads, _ = _run(
        lambda x_, w_, b_, a_, bm_: L.lora_linear(x_, None, b_, a_, bm_, 0.5, weight_fn=lambda: frozen,
                                                 fuse_out=True, fuse_in=True),
        x, w, b, a, bm, g,
    )
    torch.testing.assert_close(y, ref_y)
    for got, want in zip(grads, ref_g):
        torch.testing.assert_close(got, want)
