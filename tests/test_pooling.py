"""Packed pooling (fastst_plugin.pooling) against stock ``Pooling`` on the padded batch: every mode,
with and without an excluded prompt, values and gradients, fp32 and bf16."""

from __future__ import annotations

import pytest
import torch

from fastst_plugin.packing import pack_features
from fastst_plugin.pooling import SUPPORTED_MODES, packed_pool, segment_mean

LENGTHS = [5, 1, 7, 3, 4]
WIDTH = 8


def _batch(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    n, lmax = len(LENGTHS), max(LENGTHS)
    mask = torch.zeros(n, lmax, dtype=torch.long)
    for i, length in enumerate(LENGTHS):
        mask[i, :length] = 1
    ids = torch.randint(5, 100, (n, lmax), generator=g) * mask
    padded = torch.randn(n, lmax, WIDTH, generator=g).to(dtype)
    return ids, mask, padded


def _stock_pooling(mode):
    try:
        from sentence_transformers.sentence_transformer.modules import Pooling
    except ImportError:  # older layouts
        from sentence_transformers.models import Pooling
    return Pooling(WIDTH, pooling_mode=mode, include_prompt=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("prompt_length", [None, 2])
@pytest.mark.parametrize("mode", SUPPORTED_MODES)
def test_packed_pool_matches_stock_pooling(mode, prompt_length, dtype):
    ids, mask, padded = _batch(dtype)
    packed = pack_features({"input_ids": ids, "attention_mask": mask})
    stock_in = padded.clone().requires_grad_(True)
    features = {"token_embeddings": stock_in, "attention_mask": mask}
    if prompt_length:
        features["prompt_length"] = prompt_length
    stock = _stock_pooling(mode)(features)["sentence_embedding"]

    hidden = padded.reshape(-1, WIDTH)[packed.orig_index].clone().requires_grad_(True)
    fast = packed_pool(hidden, packed, (mode,), prompt_length)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    assert fast.dtype == stock.dtype and fast.shape == stock.shape
    torch.testing.assert_close(fast.float(), stock.float(), **tol)

    weights = torch.randn(stock.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    (stock.float() * weights.float()).sum().backward()
    (fast.float() * weights.float()).sum().backward()
    stock_grad = stock_in.grad.reshape(-1, WIDTH)[packed.orig_index]
    torch.testing.assert_close(hidden.grad.float(), stock_grad.float(), **tol)


def test_segment_mean_is_one_autograd_node_and_matches_the_composed_ops():
    """The mean is one node in the backward graph (issue #5: host time of small models), with the
    composed ops' values and gradients; zero-length segments (graph padding slots) give zeros."""
    g = torch.Generator().manual_seed(3)
    seg = torch.tensor([0, 0, 0, 2, 2, 3])
    n = 5  # segments 1 and 4 are empty
    denom = torch.tensor([3.0, 1.0, 2.0, 1.0, 1.0])
    valid = torch.tensor([False, True, True, True, True, True])
    for mask in (None, valid):
        hidden = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
        out = segment_mean(hidden, seg, denom, mask, n)
        assert type(out.grad_fn).__name__ == "_SegmentMeanBackward"
        assert torch.equal(out[1], torch.zeros(4, dtype=torch.float64))
        x = hidden if mask is None else hidden * mask[:, None]
        ref = torch.zeros(n, 4, dtype=torch.float64).index_add(0, seg, x) / denom[:, None]
        torch.testing.assert_close(out, ref)
        torch.autograd.gradcheck(lambda h: segment_mean(h, seg, denom, mask, n), (hidden,))
    with torch.no_grad():  # no node at all without gradients (encode)
        assert segment_mean(hidden, seg, denom, None, n).grad_fn is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_l2_normalize_matches_f_normalize(dtype):
    """One node; values bit for bit stock's; gradients equal F.normalize's, zero rows included."""
    from fastst_plugin.pooling import l2_normalize

    x = torch.randn(6, 16, generator=torch.Generator().manual_seed(4)).to(dtype)
    x[2] = 0  # norm clamped to eps
    a = x.clone().requires_grad_(True)
    b = x.clone().requires_grad_(True)
    fast = l2_normalize(a)
    stock = torch.nn.functional.normalize(b, p=2, dim=-1)
    assert type(fast.grad_fn).__name__ == "_L2NormalizeBackward" and fast.dtype == stock.dtype == dtype
    assert torch.equal(fast, stock)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype != torch.bfloat16 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(fast.float(), stock.float(), **tol)
    w = torch.randn(6, 16, generator=torch.Generator().manual_seed(5)).to(dtype)
    (fast * w).sum().backward()
    (stock * w).sum().backward()
    torch.testing.assert_close(a.grad.float(), b.grad.float(), **tol)
    if dtype == torch.float64:
        torch.autograd.gradcheck(l2_normalize, (torch.randn(3, 5, dtype=dtype, requires_grad=True),))


def test_fast_model_uses_the_fused_tail_and_disable_restores_stock(minilm_path):
    """The real all-MiniLM-L6-v2 (Transformer, mean Pooling, Normalize) made fast runs the one-node
    mean and normalisation; embeddings and gradients equal stock's; disable_fast restores Normalize."""
    from sentence_transformers import SentenceTransformer

    from fastst_plugin import disable_fast, enable_fast
    from tests._grads import assert_grads_close
    from tests._texts import TEXTS

    model = SentenceTransformer(minilm_path, device="cpu")
    model.max_seq_length = 32
    model.eval()
    normalize = model[2]
    assert type(normalize).__name__ == "Normalize"

    def embed_and_grads():
        model.zero_grad(set_to_none=True)
        out = model(model.preprocess(TEXTS[:4]))["sentence_embedding"]
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out.detach(), grads, out.grad_fn

    stock_out, stock_grads, _ = embed_and_grads()
    enable_fast(model, kernels="torch")
    assert "forward" in vars(normalize)  # patched on the instance
    fast_out, fast_grads, grad_fn = embed_and_grads()
    assert type(grad_fn).__name__ == "_L2NormalizeBackward"
    assert type(grad_fn.next_functions[0][0]).__name__ == "_SegmentMeanBackward"
    torch.testing.assert_close(fast_out, stock_out, rtol=1e-5, atol=1e-5)
    assert_grads_close(fast_grads, stock_grads)
    disable_fast(model)
    assert "forward" not in vars(normalize)


def test_l2_normalize_under_autocast_keeps_stock_dtype_and_values():
    from fastst_plugin.pooling import l2_normalize

    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(6)).bfloat16().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = l2_normalize(x)
        stock = torch.nn.functional.normalize(x, p=2, dim=-1)
    assert fast.dtype == stock.dtype and torch.equal(fast, stock)
