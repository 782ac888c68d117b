"""The loss's cosine similarity as one autograd node, during a fast model's loss call.

Why: on small models a training step is bound by host time (MiniLM LoRA at 64 pairs, issue #5),
and every eager autograd node after the graphed encoder costs some. Sentence Transformers'
``util.cos_sim`` (what MultipleNegativesRankingLoss, its cached and symmetric variants and GISTEmbed
use by default) builds about ten: a cast to float32 in newer releases, two L2 normalisations (norm,
clamp, expand, divide each), a transpose and the matmul. ``fused_cos_sim`` runs the same forward
(Sentence Transformers' own conversion and normalisation functions, then ``torch.mm``: values and
dtypes are stock's, autocast included) as one node, with the analytic backward in float32.

``fused_similarity(loss)`` swaps it in as the loss's ``similarity_fct`` for the duration of one
loss call, only where that is exactly ``util.cos_sim``, and puts the original back afterwards (the
loss's config, model card and pickles never see it). ``FASTST_FUSED_SIMILARITY=0`` leaves it alone.
"""

from __future__ import annotations

import contextlib
import functools
import sys

import torch

from .config import env_switch
from .pooling import l2_normalize_backward

_EPS = 1e-12  # F.normalize's default, what Sentence Transformers' normalize_embeddings uses


@functools.lru_cache(maxsize=1)
def _stock_parts():
    """(cos_sim, its tensor conversion, its normalisation) from the installed Sentence Transformers."""
    try:
        from sentence_transformers import util
    except ImportError:  # pragma: no cover
        return None
    cos_sim = getattr(util, "cos_sim", None)
    module = sys.modules.get(getattr(cos_sim, "__module__", ""), None)
    convert = getattr(module, "_convert_to_batch_tensor", None)
    normalize = getattr(module, "normalize_embeddings", None)
    if cos_sim is None or convert is None or normalize is None:
        return None
    return cos_sim, convert, normalize


def fused_cos_sim(a, b) -> torch.Tensor:
    """``util.cos_sim(a, b)`` with one autograd node (dense 2-D tensors; anything else: stock's)."""
    parts = _stock_parts()
    if parts is None:  # pragma: no cover
        from sentence_transformers import util

        return util.cos_sim(a, b)
    cos_sim, convert, normalize = parts
    plain = (
        isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dim() == 2 and b.dim() == 2
        and a.is_floating_point() and b.is_floating_point() and not a.is_sparse and not b.is_sparse
    )
    if not plain or not torch.is_grad_enabled() or not (a.requires_grad or b.requires_grad):
        return cos_sim(a, b)
    return _CosSim.apply(a, b, convert, normalize)


class _CosSim(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, convert, normalize):
        ac, bc = convert(a), convert(b)
        an, bn = normalize(ac), normalize(bc)
        out = torch.mm(an, bn.transpose(0, 1))
        ctx.save_for_backward(ac, bc, an, bn)
        ctx.dtypes = (a.dtype, b.dtype)
        ctx.wants = (a.requires_grad, b.requires_grad)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        ac, bc, an, bn = ctx.saved_tensors
        acc = torch.float64 if grad_out.dtype == torch.float64 or an.dtype == torch.float64 else torch.float32
        g = grad_out.to(acc)
        grads = []
        for want, dtype, x, xn, d_xn in (
            (ctx.wants[0], ctx.dtypes[0], ac, an, lambda: g @ bn.to(acc)),
            (ctx.wants[1], ctx.dtypes[1], bc, bn, lambda: g.transpose(0, 1) @ an.to(acc)),
        ):
            if not want:
                grads.append(None)
                continue
            norm = torch.linalg.vector_norm(x.to(acc), dim=-1, keepdim=True)
            grads.append(l2_normalize_backward(d_xn(), xn.to(acc), norm, _EPS).to(dtype))
        return grads[0], grads[1], None, None


def _enabled() -> bool:
    return env_switch("FASTST_FUSED_SIMILARITY")


@contextlib.contextmanager
def fused_similarity(loss):
    """Within the block, ``loss.similarity_fct`` is :func:`fused_cos_sim` where it was ``util.cos_sim``."""
    parts = _stock_parts() if loss is not None and _enabled() else None
    if parts is None or loss.__dict__.get("similarity_fct", None) is not parts[0]:
        yield
        return
    loss.__dict__["similarity_fct"] = fused_cos_sim
    try:
        yield
    finally:
        loss.__dict__["similarity_fct"] = parts[0]
