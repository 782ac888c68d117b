"""fastst_plugin.similarity: the loss's cos_sim as one autograd node, against Sentence Transformers'."""

from __future__ import annotations

import pytest
import torch

from fastst_plugin.similarity import fused_cos_sim, fused_similarity

util = pytest.importorskip("sentence_transformers.util")


def _pair(dtype, zero_row=True):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 12, generator=g).to(dtype)
    b = torch.randn(7, 12, generator=g).to(dtype)
    if zero_row:
        b[3] = 0  # norm clamped to eps
    return a, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_values_are_stocks_and_gradients_match(dtype):
    a, b = _pair(dtype)
    fa, fb = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    sa, sb = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    fast = fused_cos_sim(fa, fb)
    stock = util.cos_sim(sa, sb)
    assert type(fast.grad_fn).__name__ == "_CosSimBackward"
    assert fast.dtype == stock.dtype and torch.equal(fast, stock)
    w = torch.randn(stock.shape, generator=torch.Generator().manual_seed(1)).to(stock.dtype)
    (fast * w).sum().backward()
    (stock * w).sum().backward()
    tol = dict(rtol=1e-5, atol=1e-6) if dtype != torch.bfloat16 else dict(rtol=2e-2, atol=2e-2)
    assert fa.grad.dtype == dtype and fb.grad.dtype == dtype
    torch.testing.assert_close(fa.grad.float(), sa.grad.float(), **tol)
    torch.testing.assert_close(fb.grad.float(), sb.grad.float(), **tol)


def test_gradcheck_and_one_sided_gradients():
    a, b = _pair(torch.float64, zero_row=False)
    torch.autograd.gradcheck(fused_cos_sim, (a.clone().requires_grad_(True), b.clone().requires_grad_(True)))
    only_a = a.clone().requires_grad_(True)
    fused_cos_sim(only_a, b).sum().backward()  # b without gradient (e.g. a frozen guide's embeddings)
    assert only_a.grad is not None


def test_under_autocast_dtype_and_values_are_stocks():
    a, b = _pair(torch.bfloat16)
    a.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = fused_cos_sim(a, b)
        stock = util.cos_sim(a, b)
    assert fast.dtype == stock.dtype and torch.equal(fast, stock)


def test_other_inputs_and_no_grad_take_stocks_path():
    a, b = _pair(torch.float32)
    assert fused_cos_sim(a, b).grad_fn is None  # nothing requires grad
    v = a[0].clone().requires_grad_(True)  # 1-D: stock unsqueezes
    assert type(fused_cos_sim(v, b).grad_fn).__name__ != "_CosSimBackward"
    assert torch.equal(fused_cos_sim([1.0, 2.0], [[1.0, 0.0]]), util.cos_sim([1.0, 2.0], [[1.0, 0.0]]))


def test_fused_similarity_swaps_only_cos_sim_and_restores_it(monkeypatch):
    class Loss(torch.nn.Module):
        def __init__(self, fn):
            super().__init__()
            self.similarity_fct = fn

    loss = Loss(util.cos_sim)
    with fused_similarity(loss):
        assert loss.similarity_fct is fused_cos_sim
    assert loss.similarity_fct is util.cos_sim
    with pytest.raises(RuntimeError), fused_similarity(loss):  # restored on errors too
        raise RuntimeError("boom")
    assert loss.similarity_fct is util.cos_sim

    dot = Loss(util.dot_score)
    with fused_similarity(dot):
        assert dot.similarity_fct is util.dot_score
    with fused_similarity(None):
        pass
    monkeypatch.setenv("FASTST_FUSED_SIMILARITY", "0")
    with fused_similarity(loss):
        assert loss.similarity_fct is util.cos_sim


def test_mnrl_loss_and_gradients_unchanged():
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    class Dummy(torch.nn.Module):
        pass

    loss = MultipleNegativesRankingLoss(Dummy())
    q, d = _pair(torch.float32, zero_row=False)
    d = torch.cat([d[:5], d[:5] + 0.1 * torch.randn(5, 12, generator=torch.Generator().manual_seed(2))])
    results = []
    for fused in (False, True):
        qq, dd = q.clone().requires_grad_(True), d.clone().requires_grad_(True)
        ctx = fused_similarity(loss) if fused else torch.enable_grad()
        with ctx:
            value = loss.compute_loss_from_embeddings([qq, dd[:5], dd[5:]], None)
        value.backward()
        results.append((value.detach(), qq.grad, dd.grad))
    (v0, q0, d0), (v1, q1, d1) = results
    torch.testing.assert_close(v1, v0)
    torch.testing.assert_close(q1, q0, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(d1, d0, rtol=1e-5, atol=1e-7)
