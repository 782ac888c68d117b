"""The fused LoRA node (``kernels.lora``) against its plain composition: values and gradients of the
input, the adapters and (full fine-tuning) the base weight and bias; a quantized base via
``weight_fn``; dropout through its saved keep-mask."""

from __future__ import annotations

import pytest
import torch

from fastst_plugin.kernels import lora as L


def _inputs(shape, k, n, r, bias, train_w, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, k, generator=gen, dtype=torch.float64).requires_grad_(True)
    w = (torch.randn(n, k, generator=gen, dtype=torch.float64) / k**0.5).requires_grad_(train_w)
    b = torch.randn(n, generator=gen, dtype=torch.float64).requires_grad_(train_w) if bias else None
    a = (torch.randn(r, k, generator=gen, dtype=torch.float64) / k**0.5).requires_grad_(True)
    bm = (torch.randn(n, r, generator=gen, dtype=torch.float64) / r**0.5).requires_grad_(True)
    g = torch.randn(*shape, n, generator=gen, dtype=torch.float64)
    return x, w, b, a, bm, g


def _run(fn, x, w, b, a, bm, g):
    leaves = [t for t in (x, w, b, a, bm) if t is not None and t.requires_grad]
    for t in leaves:
        t.grad = None
    y = fn(x, w, b, a, bm)
    y.backward(g)
    return y.detach().clone(), [t.grad.clone() for t in leaves]


@pytest.mark.parametrize("shape", [(40,), (4, 10)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("train_w", [False, True])
def test_matches_reference(shape, bias, train_w):
    x, w, b, a, bm, g = _inputs(shape, 6, 5, 3, bias, train_w)
    ref_y, ref_g = _run(lambda *t: L.lora_linear_reference(*t, 0.7), x, w, b, a, bm, g)
    y, grads = _run(lambda *t: L.lora_linear(*t, 0.7), x, w, b, a, bm, g)
    torch.testing.assert_close(y, ref_y)
    for got, want in zip(grads, ref_g):
        torch.testing.assert_close(got, want)
    if not train_w:
        assert w.grad is None  # never a gradient for a frozen base weight


def test_quantized_base_through_weight_fn():
    x, w, b, a, bm, g = _inputs((40,), 6, 5, 3, True, False)
    ref_y, ref_g = _run(lambda *t: L.lora_linear_reference(*t, 0.5), x, w, b, a, bm, g)
    frozen = w.detach().clone()
    # weight_fn hands out a fresh de-quantized temporary per call (the merged node merges into it)
    y, grads = _run(lambda x_, w_, b_, a_, bm_: L.lora_linear(x_, None, b_, a_, bm_, 0.5,
                                                               weight_fn=lambda: frozen.clone()),
                    x, w, b, a, bm, g)
    torch.testing.assert_close(y, ref_y)
    for got, want in zip(grads, ref_g):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(frozen, w.detach(), rtol=0, atol=0)


def test_dropout_uses_one_mask_for_forward_and_backward():
    """With dropout the rank-r branch sees dropout(x); the gradients are those of that same mask."""
    x, w, b, a, bm, g = _inputs((40,), 6, 5, 3, False, False)
    torch.manual_seed(0)
    y, grads = _run(lambda *t: L.lora_linear(*t, 1.0, dropout_p=0.5, training=True), x, w, b, a, bm, g)
    torch.manual_seed(0)
    mask = torch.empty_like(x).bernoulli_(0.5).div_(0.5)  # the node draws its mask the same way

    def reference(x_, w_, b_, a_, bm_):
        return x_ @ w_.t() + ((x_ * mask) @ a_.t()) @ bm_.t()

    ref_y, ref_g = _run(reference, x, w, b, a, bm, g)
    torch.testing.assert_close(y, ref_y)
    for got, want in zip(grads, ref_g):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("quantized", [False, True])
def test_no_grad_forward_merges_the_adapter_when_it_pays(monkeypatch, quantized):
    """Under inference mode and with enough tokens the adapter is folded into the weight
    (``x (W + s B A)ᵀ + b``): the same values as the unmerged node; few tokens, gradients, a
    training pass without gradients (a cached loss's first pass: plain ``no_grad``) or
    ``FASTST_LORA_MERGE_NO_GRAD=0`` keep the unmerged node; ``=1`` merges under ``no_grad`` too."""
    calls = []
    merged = L._merged_forward
    monkeypatch.setattr(L, "_merged_forward", lambda *a: calls.append(1) or merged(*a))
    x, w, b, a, bm, _ = _inputs((40,), 6, 5, 3, True, False)
    want = L.lora_linear_reference(x, w, b, a, bm, 0.7).detach()
    frozen = w.detach().clone()
    kwargs = {"weight_fn": lambda: frozen.clone()} if quantized else {}  # weight_fn hands out a fresh temporary

    def run(x_):
        return L.lora_linear(x_, None if quantized else w, b, a, bm, 0.7, **kwargs)

    with torch.inference_mode():
        torch.testing.assert_close(run(x), want)
    assert calls == [1]
    with torch.no_grad():  # a training pass without gradients: exact, unmerged
        torch.testing.assert_close(run(x), want)
    assert calls == [1]
    # 40 tokens x (6 + 2*5) >= 4 x 5 x 6 merges; 7 tokens do not.
    with torch.inference_mode():
        assert L.merge_pays(x[:8].detach(), w, None, a.detach(), bm.detach()) is True
        assert L.merge_pays(x[:7].detach(), w, None, a.detach(), bm.detach()) is False
        torch.testing.assert_close(run(x[:7]), want[:7])
    assert calls == [1]
    torch.testing.assert_close(run(x).detach(), want)  # with gradients: the node
    monkeypatch.setenv("FASTST_LORA_MERGE_NO_GRAD", "1")
    with torch.no_grad():
        torch.testing.assert_close(run(x), want)
    assert calls == [1, 1]
    monkeypatch.setenv("FASTST_LORA_MERGE_NO_GRAD", "0")
    with torch.inference_mode():
        torch.testing.assert_close(run(x), want)
    assert calls == [1, 1]
    torch.testing.assert_close(frozen, w.detach())  # the base weight is never written


@pytest.mark.parametrize("bias", [False, True])
def test_frozen_row_blocks_equal_the_concatenated_weight(bias):
    """A fused projection's frozen weights passed as row blocks (never concatenated into a kept copy):
    values and gradients as with the concatenated weight, with gradients and without (merged)."""
    x, w, b, a, bm, g = _inputs((40,), 6, 7, 3, bias, False)
    blocks = (w[:2].detach(), w[2:3].detach(), w[3:].detach())
    ref_y, ref_g = _run(lambda *t: L.lora_linear(*t, 0.7), x, w, b, a, bm, g)
    y, grads = _run(lambda x_, w_, b_, a_, bm_: L.lora_linear(x_, blocks, b_, a_, bm_, 0.7), x, w, b, a, bm, g)
    torch.testing.assert_close(y, ref_y)
    for got, want in zip(grads, ref_g):
        torch.testing.assert_close(got, want)
    with torch.no_grad():
        torch.testing.assert_close(L.lora_linear(x, blocks, b, a, bm, 0.7), ref_y)


@pytest.mark.parametrize("form", ["weight", "blocks", "weight_fn"])
@pytest.mark.parametrize("bias", [False, True])
def test_with_gradients_the_merged_node_equals_the_unmerged(monkeypatch, form, bias):
    """FASTST_LORA_MERGE_GRAD: with gradients the node may run over the merged weight W + sBA (forward
    y = x (W + sBA)ᵀ + b, backward dx = g (W + sBA)); values and gradients of x, A, B (and b) equal
    the unmerged node's and the reference's; the frozen weight is never written."""
    x, w, b, a, bm, g = _inputs((40,), 6, 7, 3, bias, False)
    frozen = w.detach().clone()
    weight = {"weight": w, "blocks": (w[:2].detach(), w[2:].detach()), "weight_fn": None}[form]
    kwargs = {"weight_fn": lambda: frozen.clone()} if form == "weight_fn" else {}
    ref_y, ref_g = _run(lambda *t: L.lora_linear_reference(*t, 0.7), x, w, b, a, bm, g)
    results = {}
    for mode in ("1", "0"):
        monkeypatch.setenv("FASTST_LORA_MERGE_GRAD", mode)
        results[mode] = _run(lambda x_, w_, b_, a_, bm_: L.lora_linear(x_, weight, b_, a_, bm_, 0.7, **kwargs),
                             x, w, b, a, bm, g)
    for y, grads in results.values():
        torch.testing.assert_close(y, ref_y)
        for got, want in zip(grads, ref_g):
            torch.testing.assert_close(got, want)
    torch.testing.assert_close(frozen, w.detach(), rtol=0, atol=0)


def test_merge_with_gradients_rule(monkeypatch):
    """Off by default; auto: merged when T (N + K) >= 2 N K; never with dropout or a trainable base
    weight."""
    x, w, b, a, bm, g = _inputs((40,), 6, 5, 3, True, False)
    assert not L.merge_pays_with_grad(x, w, a, bm)  # the default
    monkeypatch.setenv("FASTST_LORA_MERGE_GRAD", "auto")
    calls = []
    real = L._merged_weight
    monkeypatch.setattr(L, "_merged_weight", lambda *t: calls.append(1) or real(*t))
    # 40 tokens x (5 + 6) >= 2 x 5 x 6; 5 tokens do not (55 < 60)
    assert L.merge_pays_with_grad(x, w, a, bm) and not L.merge_pays_with_grad(x[:5], w, a, bm)
    _run(lambda *t: L.lora_linear(*t, 0.7), x, w, b, a, bm, g)
    assert len(calls) == 2  # forward and backward
    calls.clear()
    _run(lambda *t: L.lora_linear(*t, 0.7, dropout_p=0.5, training=True), x, w, b, a, bm, g)
    assert calls == []
    xw, ww, bw, aw, bmw, gw = _inputs((40,), 6, 5, 3, True, True)
    assert not L.merge_pays_with_grad(xw, ww, aw, bmw)
    monkeypatch.setenv("FASTST_LORA_MERGE_GRAD", "0")
    assert not L.merge_pays_with_grad(x, w, a, bm)
